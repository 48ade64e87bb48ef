"""int4 weights times activations in int8 parts on a CPU with AVX512-VNNI, in C++ built at
first use.

A decode step of a quantized model reads every weight once per step, so its linear layers
are as fast as their weight bytes stream from memory. torch's int4 kernel
(`_weight_int4pack_mm_for_cpu`) unpacks its codes to bf16 and runs out of arithmetic at
about a quarter of a 2-core machine's memory bandwidth; this kernel multiplies the 4-bit
codes as bytes (`vpdpbusd`: 64 code-times-activation products an instruction).

Weights: w = d * q + m per output row and group of 32 inputs, q in 0..15, d and m in fp16
(GGUF Q4_1's own encoding, so its d and m are kept exactly). Activations: each row's group
of 32 as 256 * xq + xr in units of dx, xq its int8 rounding at max|x| / 127 (what
llama.cpp multiplies Q4 weights with) and xr the int8 rounding of what that left over, 256
times finer. A group's product is d * dx * (256 * sum(q * xq) + sum(q * xr)) + m * sx, in
int32 then fp32: the exact product up to fp32 summation (2e-5 relative), where xq alone
is 6e-3 (1.6x a bf16 rounding of the activations), enough to flip a near tie: SmolLM2's
"What is the capital of France?" went from "The capital of France is Paris." to
"L'Etoile, ...". The residual's 8 more instructions a group cost little at a few rows,
whose time is the weights' bytes. Beyond 32 rows (big batches, short prefills), where the
kernel is compute-bound, it takes xq alone, twice as fast: llama.cpp's rounding, which
follows the exact path less closely than a bf16 GEMM (benchmarks/results/
quantized_quality_*.md).

Layout (`pack`): blocks of 16 output rows by one group, 320 bytes each, in row-block then
group order, so each thread streams its row blocks front to back. In a block, 4 vectors of
64 code bytes, byte 4r + c of vector p holding row r's codes for inputs 8p + c (low nibble)
and 8p + 4 + c (high nibble), then the 16 rows' d, then their m.

A group holding NaN or inf makes its row's outputs NaN (int8 rounding has no such value).

Built with the other CPU kernels (cpu_extension.py); `available()` is False where they
could not be built or the CPU lacks AVX512-VNNI: callers then take torch's int4 kernel."""

from __future__ import annotations

import torch

from pagedserve.kernels import cpu_extension

ROWS, GROUP = 16, 32
FUNCTIONS = ["int4_linear_supported"]
SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define PAGEDSERVE_INT4_VNNI 1
#endif

bool int4_linear_supported() {
#ifdef PAGEDSERVE_INT4_VNNI
  return true;
#else
  return false;
#endif
}

#ifdef PAGEDSERVE_INT4_VNNI
namespace int4 {
constexpr int64_t kRows = 16, kGroup = 32, kBlockBytes = 320, kMaxRows = 8, kExactRows = 32;

// Each row's groups of 32 as 256 * xq + xr in units of dx: xq = round(x / step) with
// step = max|x| / 127 (-127..127), xr = round(256 * (x / step - xq)) (the rounding residual,
// -127..127 once clamped), dx = step / 256; sx = dx * sum(256 * xq + xr).
// x [M, K] float or bf16 -> xq, xr [M, K], dx, sx [M, G]. Without `residual`, xr is 0.
template <typename T>
static void quantize_activations(const T* x, int64_t M, int64_t K, bool residual, int8_t* xq,
                                 int8_t* xr, float* dx, float* sx) {
  const int64_t G = K / kGroup;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t at = m * K + g * kGroup;
      float amax = 0.f;
      bool finite = true;
      float xg[kGroup];
      for (int64_t i = 0; i < kGroup; ++i) {
        xg[i] = static_cast<float>(x[at + i]);
        amax = std::max(amax, std::fabs(xg[i]));
        finite &= std::isfinite(xg[i]);
      }
      if (!finite) {  // NaN out for the row, as a float GEMM gives (not int8 garbage)
        std::fill(xq + at, xq + at + kGroup, 0);
        std::fill(xr + at, xr + at + kGroup, 0);
        dx[m * G + g] = sx[m * G + g] = NAN;
        continue;
      }
      const float inverse = amax > 0.f ? 127.f / amax : 0.f;
      int sum = 0;
      for (int64_t i = 0; i < kGroup; ++i) {
        const float scaled = xg[i] * inverse;
        const float coarse = std::nearbyint(scaled);
        const float fine =
            residual ? std::clamp(std::nearbyint((scaled - coarse) * 256.f), -127.f, 127.f) : 0.f;
        xq[at + i] = static_cast<int8_t>(coarse);
        xr[at + i] = static_cast<int8_t>(fine);
        sum += 256 * static_cast<int>(coarse) + static_cast<int>(fine);
      }
      dx[m * G + g] = amax / 127.f / 256.f;
      sx[m * G + g] = amax / 127.f / 256.f * sum;
    }
}

static inline void store(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
static inline void store(at::BFloat16* out, __m512 v) {
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(v));
#else
  alignas(64) float values[16];
  _mm512_store_ps(values, v);
  for (int i = 0; i < 16; ++i) out[i] = values[i];
#endif
}

// out[m, 16 rb .. 16 rb + 15] for row blocks rb in [begin, end), MB activation rows at once
// (each block's codes are unpacked once for all of them).
template <int MB, bool kResidual, typename TO>
static void row_blocks(const uint8_t* w, const int8_t* xq, const int8_t* xr, const float* dx,
                       const float* sx, TO* out, int64_t N, int64_t K, int64_t begin,
                       int64_t end) {
  const int64_t G = K / kGroup;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t rb = begin; rb < end; ++rb) {
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* block = w + (rb * G + g) * kBlockBytes;
      __m512i q[8];  // q[j]: the 16 rows' codes for inputs 4j .. 4j + 3
      for (int p = 0; p < 4; ++p) {
        const __m512i v = _mm512_loadu_si512(block + 64 * p);
        q[2 * p] = _mm512_and_si512(v, nibble);
        q[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + 256)));
      const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + 288)));
      for (int m = 0; m < MB; ++m) {
        const int32_t* a = reinterpret_cast<const int32_t*>(xq + m * K + g * kGroup);
        const int32_t* r = reinterpret_cast<const int32_t*>(xr + m * K + g * kGroup);
        // sum(q * xq), in two chains of four for the instruction's latency; times 256, then
        // plus sum(q * xr): at most 32 * 15 * 127 * 257, well inside int32.
        __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[0], _mm512_set1_epi32(a[0]));
        __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[1], _mm512_set1_epi32(a[1]));
        for (int j = 2; j < 8; j += 2) {
          s0 = _mm512_dpbusd_epi32(s0, q[j], _mm512_set1_epi32(a[j]));
          s1 = _mm512_dpbusd_epi32(s1, q[j + 1], _mm512_set1_epi32(a[j + 1]));
        }
        s0 = _mm512_slli_epi32(_mm512_add_epi32(s0, s1), 8);
        s1 = _mm512_setzero_si512();
        if constexpr (kResidual) {
          for (int j = 0; j < 8; j += 2) {
            s0 = _mm512_dpbusd_epi32(s0, q[j], _mm512_set1_epi32(r[j]));
            s1 = _mm512_dpbusd_epi32(s1, q[j + 1], _mm512_set1_epi32(r[j + 1]));
          }
        }
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
        acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(dx[m * G + g])), acc[m]);
        acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx[m * G + g]), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) store(out + m * N + rb * kRows, acc[m]);
  }
}

// row_blocks for `rows` (1..kMaxRows) activation rows, with or without the residuals.
template <typename TO, int... MB>
static void dispatch(std::integer_sequence<int, MB...>, int64_t rows, bool residual,
                     const uint8_t* w, const int8_t* xq, const int8_t* xr, const float* dx,
                     const float* sx, TO* out, int64_t N, int64_t K, int64_t begin,
                     int64_t end) {
  ((rows == MB + 1
        ? (residual ? row_blocks<MB + 1, true>(w, xq, xr, dx, sx, out, N, K, begin, end)
                    : row_blocks<MB + 1, false>(w, xq, xr, dx, sx, out, N, K, begin, end))
        : void()),
   ...);
}
}  // namespace int4

// x [M, K] times the packed [N, K] weight: [M, N], bf16 for bf16 x, else float32 (x of
// another dtype is read as float32). Up to kExactRows rows the activations go in with their
// residuals; beyond, where the kernel is compute-bound, without (twice the speed).
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, int64_t N) {
  TORCH_CHECK(x.dim() == 2, "int4_linear: x must be [M, K], got ", x.sizes());
  const auto xf = (x.scalar_type() == at::kBFloat16 ? x : x.to(at::kFloat)).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), G = K / int4::kGroup;
  TORCH_CHECK(K % int4::kGroup == 0 && N % int4::kRows == 0 && packed.is_contiguous()
              && packed.scalar_type() == at::kByte && packed.dim() == 3
              && packed.size(0) == N / int4::kRows && packed.size(1) == G
              && packed.size(2) == int4::kBlockBytes,
              "int4_linear: a [", N, ", ", K, "] weight does not match its packing ",
              packed.sizes());
  auto out = torch::empty({M, N}, xf.options());
  std::vector<int8_t> xq(M * K), xr(M * K);
  std::vector<float> dx(M * G), sx(M * G);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const bool residual = M <= int4::kExactRows;
  auto run = [&](const auto* xp, auto* o) {
    int4::quantize_activations(xp, M, K, residual, xq.data(), xr.data(), dx.data(), sx.data());
    at::parallel_for(0, N / int4::kRows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t m0 = 0; m0 < M; m0 += int4::kMaxRows)
        int4::dispatch(std::make_integer_sequence<int, int4::kMaxRows>(),
                       std::min(int4::kMaxRows, M - m0), residual, w, xq.data() + m0 * K,
                       xr.data() + m0 * K, dx.data() + m0 * G, sx.data() + m0 * G,
                       o + m0 * N, N, K, begin, end);
    });
  };
  if (xf.scalar_type() == at::kBFloat16)
    run(xf.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  else
    run(xf.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

TORCH_LIBRARY_FRAGMENT(pagedserve_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor packed, int out_features) -> Tensor");
}
TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) { m.impl("int4_linear", &int4_linear); }
#endif
"""


def register_fakes() -> None:
    """Shapes for tracing the operator (engine/compiled.py), once the extension is built."""
    if hasattr(torch.ops.pagedserve_cpu, "int4_linear"):
        torch.library.register_fake("pagedserve_cpu::int4_linear")(
            lambda x, packed, out_features: x.new_empty(x.shape[0], out_features,
                                                        dtype=_out_dtype(x)))


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def available() -> bool:
    """Whether the kernel is built for this CPU (building the CPU kernels on the first call)."""
    module = cpu_extension.module()
    return module is not None and module.int4_linear_supported()


def pack(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The kernel's layout (module docstring) of w = scales * codes + mins: codes [N, K] uint8
    in 0..15, scales and mins [N, K / 32]; N a multiple of 16, K of 32. Builds (or loads)
    the kernel, which int4_linear then calls; raises where it is not available()."""
    if not available():
        raise RuntimeError("the VNNI int4 kernel is not built on this machine")
    n, k = codes.shape
    blocks, groups = n // ROWS, k // GROUP
    c = codes.to(torch.uint8).view(blocks, ROWS, groups, 4, 2, 4)  # ..., p, nibble, c
    code_bytes = (c[..., 0, :] | (c[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)

    def per_block(t: torch.Tensor) -> torch.Tensor:  # [N, G] -> [blocks, G, 16 rows as bytes]
        return t.to(torch.float16).view(blocks, ROWS, groups).transpose(1, 2).contiguous().view(
            torch.uint8)

    return torch.cat([code_bytes.reshape(blocks, groups, 4 * 64), per_block(scales),
                      per_block(mins)], dim=-1).contiguous()


def unpack(packed: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """pack's inverse: (codes [N, K] uint8, scales, mins [N, K / 32] float32)."""
    blocks, groups = out_features // ROWS, packed.shape[1]
    code_bytes = packed[..., :256].view(blocks, groups, 4, ROWS, 4).permute(0, 3, 1, 2, 4)
    codes = torch.stack([code_bytes & 0x0F, code_bytes >> 4], dim=-2)  # ..., p, nibble, c

    def per_row(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(torch.float16).float().transpose(1, 2).reshape(
            out_features, groups)

    return (codes.reshape(out_features, groups * GROUP), per_row(packed[..., 256:288]),
            per_row(packed[..., 288:]))


def int4_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] times the packed [out_features, K] weight: [M, out_features], bf16 for bf16
    x, else float32."""
    return torch.ops.pagedserve_cpu.int4_linear(x, packed, out_features)
