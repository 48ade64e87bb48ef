"""Decode attention on a CPU straight from the paged KV cache, in C++ built at first use.

Each decode query (one token a sequence) attends over its context by walking its block
table: every cached key and value is read once, where the torch path first copies the
context out of the cache (index_select) and then runs SDPA over the copy, whose CPU kernel
has a high fixed cost per (sequence, head) at one query row. Batched decode spends most of
its step in attention on a CPU, so this is the kernel that sets batched decode speed there.

Work is split over (sequence, KV head) pairs on torch's own thread pool. With AVX-512 and a
head size of 64 or 128 (the sizes it is compiled for), each pair's scores take 16 keys at
a time (their dot products summed across lanes together), the softmax a vector exp, and
the weighted values a few queries' sums at a time in registers: 2-3x the plain loops
(whose scalar libm exp was most of their time), near the memory's bandwidth at batch
decode. Elsewhere the plain loops serve.

Built with the other CPU kernels (cpu_extension.py); `available()` is False where they
could not be built: callers then take the torch path."""

from __future__ import annotations

import torch

from pagedserve.kernels import cpu_extension

FUNCTIONS = ["decode_attention"]
SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#define PAGEDSERVE_DECODE_AVX512 1
#endif

// Element d of a cache row as float. bf16 is widened by a shift of its bits, which the
// compiler vectorizes (c10::BFloat16's own conversion it does not).
template <typename T>
static inline float load(const T* row, int64_t d) { return static_cast<float>(row[d]); }
template <>
inline float load<at::BFloat16>(const at::BFloat16* row, int64_t d) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(row)[d]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

#ifdef PAGEDSERVE_DECODE_AVX512
// The vector path: head sizes that are a multiple of 16, an fp32, bf16 or fp16 cache.
template <typename T, int64_t kDim>
constexpr bool kVector = kDim > 0 && kDim % 16 == 0 && !std::is_same_v<T, double>;

// 16 cache elements as 16 floats.
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
static inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The 16 sums of 16 vectors' lanes, as one vector: a transposing tree of 15 adds, where 16
// horizontal sums would take 64.
static inline __m512 sum_lanes16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int k = 0; k < 8; ++k)  // b[k]: a[2k]'s and a[2k+1]'s sums of lane pairs
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]),
                         _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // c[k]: a[4k..4k+3]'s sums within each 128-bit lane
    const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
    c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int k = 0; k < 2; ++k)  // then the 128-bit lanes, pairwise, twice
    d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88),
                       _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

static inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

// sc[g * n + j] = qf[g] . key j for the group's queries (fp32, scaled) and the n keys at
// keys + off[j]: 16 keys at a time, widened to fp32 once for all the group's queries.
template <int64_t kDim, typename T>
static void scores16(const float* qf, int64_t group, const T* keys, const int64_t* off,
                     int64_t n, float* sc) {
  constexpr int V = kDim / 16;
  alignas(64) float tile[16 * kDim];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - j0);
    for (int64_t t = 0; t < 16; ++t)
      for (int v = 0; v < V; ++v)
        _mm512_store_ps(tile + t * kDim + 16 * v,
                        t < m ? load16(keys + off[j0 + t] + 16 * v) : _mm512_setzero_ps());
    for (int64_t g = 0; g < group; ++g) {
      __m512 qv[V], dots[16];
      for (int v = 0; v < V; ++v) qv[v] = _mm512_loadu_ps(qf + g * kDim + 16 * v);
      for (int t = 0; t < 16; ++t) {
        __m512 dot = _mm512_mul_ps(qv[0], _mm512_load_ps(tile + t * kDim));
        for (int v = 1; v < V; ++v)
          dot = _mm512_fmadd_ps(qv[v], _mm512_load_ps(tile + t * kDim + 16 * v), dot);
        dots[t] = dot;
      }
      _mm512_mask_storeu_ps(sc + g * n + j0, first_lanes(m), sum_lanes16(dots));
    }
  }
}

// exp(x) for x <= 0 (softmax's shifted scores), to about an ulp: n = round(x / ln 2), a
// Cephes polynomial of x - n ln 2 (ln 2 in two parts), times 2^n. The libm call it
// replaces is scalar: it was most of the kernel's time.
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-88.f), x);  // (a NaN x stays NaN: max returns it)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

// s[j] = exp(s[j] - max(s)) for j < n; returns their sum.
static inline float softmax_numerators(float* s, int64_t n) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = first_lanes(n - j);
    top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, s + j));
  }
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = first_lanes(n - j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), shift));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// acc[g] = sum_j p[g * n + j] * value j for kG of the group's queries at once: their sums
// stay in registers, and each value row is widened once for all of them.
template <int64_t kDim, int kG, typename T>
static void values_block(const float* p, int64_t n, const T* values, const int64_t* off,
                         float* acc) {
  constexpr int V = kDim / 16;
  __m512 sums[kG * V];
  for (int i = 0; i < kG * V; ++i) sums[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 row[V];
    for (int v = 0; v < V; ++v) row[v] = load16(values + off[j] + 16 * v);
    for (int g = 0; g < kG; ++g) {
      const __m512 weight = _mm512_set1_ps(p[g * n + j]);
      for (int v = 0; v < V; ++v)
        sums[g * V + v] = _mm512_fmadd_ps(weight, row[v], sums[g * V + v]);
    }
  }
  for (int g = 0; g < kG; ++g)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + g * kDim + 16 * v, sums[g * V + v]);
}

template <int64_t kDim, typename T>
static void values16(const float* p, int64_t group, int64_t n, const T* values,
                     const int64_t* off, float* acc) {
  constexpr int kMaxG = kDim <= 64 ? 4 : 2;  // up to 16 vectors of sums in registers
  for (int64_t g = 0; g < group; g += kMaxG) {
    const float* pg = p + g * n;
    float* ag = acc + g * kDim;
    switch (std::min<int64_t>(kMaxG, group - g)) {
      case 1: values_block<kDim, 1>(pg, n, values, off, ag); break;
      case 2: values_block<kDim, 2>(pg, n, values, off, ag); break;
      case 3: values_block<kDim, 3>(pg, n, values, off, ag); break;
      default: values_block<kDim, kMaxG>(pg, n, values, off, ag); break;
    }
  }
}
#else
template <typename T, int64_t kDim>
constexpr bool kVector = false;
#endif

// out[rows[i]] = softmax(q[rows[i]] K^T * scale) V over sequence i's context, read from the
// cache through its block table. q, out: [T, H, D] float32; cache: [2, blocks, block_size,
// Hkv, D]; table: [S, width] int32; ctx_lens: [S] int32 (the query is the context's last
// token); window > 0: only the window's latest keys. D is a template argument where it is
// one of the usual sizes (the row loops then compile to straight vector code), else 0.
template <typename T, int64_t kDim, typename TQ>
static void decode_kernel(const TQ* q, TQ* out, const T* cache, const int* table,
                          const int* ctx_lens, const int64_t* rows, int64_t num_seqs,
                          int64_t width, int64_t num_blocks, int64_t block_size,
                          int64_t num_heads, int64_t num_kv_heads, int64_t dim_arg,
                          float scale, int64_t window) {
  const int64_t head_dim = kDim ? kDim : dim_arg;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t plane = num_blocks * block_size * num_kv_heads * head_dim;
  const int64_t token_stride = num_kv_heads * head_dim;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(group * head_dim), qf(group * head_dim), total(group);
    std::vector<int64_t> offsets;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t ctx = ctx_lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const int64_t n = ctx - first;
      const TQ* qs = q + (rows[s] * num_heads + h * group) * head_dim;
      for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = static_cast<float>(qs[i]) * scale;
      scores.resize(group * n);
      float* __restrict sc = scores.data();
      const T* keys = cache + h * head_dim;
      const T* values = cache + plane + h * head_dim;
      // Where each context token sits in a cache plane: a division a block, not a token
      // (decode_single's one-slot blocks: none).
      const int* blocks = table + s * width;
      offsets.resize(n);
      if (block_size == 1) {
        for (int64_t j = 0; j < n; ++j) offsets[j] = (int64_t)blocks[first + j] * token_stride;
      } else {
        for (int64_t j = 0, t = first; j < n;) {
          const int64_t base = (int64_t)blocks[t / block_size] * block_size;
          for (int64_t slot = t % block_size; slot < block_size && j < n; ++slot, ++j, ++t)
            offsets[j] = (base + slot) * token_stride;
        }
      }
#ifdef PAGEDSERVE_DECODE_AVX512
      if constexpr (kVector<T, kDim>) {
        scores16<kDim>(qf.data(), group, keys, offsets.data(), n, sc);
        for (int64_t g = 0; g < group; ++g) total[g] = softmax_numerators(sc + g * n, n);
        values16<kDim>(sc, group, n, values, offsets.data(), acc.data());
      } else
#endif
      {
        // Scores, one key row at a time (each row read once for all the group's queries).
        for (int64_t j = 0; j < n; ++j) {
          const T* __restrict k = keys + offsets[j];
          for (int64_t g = 0; g < group; ++g) {
            const float* __restrict qg = qf.data() + g * head_dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * load(k, d);
            sc[g * n + j] = dot;
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          float* __restrict sg = sc + g * n;
          float top = -INFINITY;
#pragma omp simd reduction(max : top)
          for (int64_t j = 0; j < n; ++j) top = std::max(top, sg[j]);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            sg[j] = std::exp(sg[j] - top);
            sum += sg[j];
          }
          total[g] = sum;
        }
        // Weighted values, one value row at a time.
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const T* __restrict v = values + offsets[j];
          for (int64_t g = 0; g < group; ++g) {
            const float p = sc[g * n + j];
            float* __restrict ag = acc.data() + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * load(v, d);
          }
        }
      }
      TQ* os = out + (rows[s] * num_heads + h * group) * head_dim;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < head_dim; ++d)
          os[g * head_dim + d] = static_cast<TQ>(acc[g * head_dim + d] / total[g]);
    }
  });
}

// The kernel for this head size: compiled for it where it is a usual one.
template <typename T, typename TQ = float>
static auto kernel_for(int64_t head_dim) {
  return head_dim == 64    ? decode_kernel<T, 64, TQ>
         : head_dim == 128 ? decode_kernel<T, 128, TQ>
                           : decode_kernel<T, 0, TQ>;
}

// q [T, H, D] against cache [2, blocks, block_size, Hkv, D]: shapes that fit each other.
static void check_shapes(const torch::Tensor& q, const torch::Tensor& cache) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous()
              && cache.device().is_cpu() && q.device().is_cpu(), "decode: q [T, H, D] and a "
              "contiguous cache [2, blocks, block_size, Hkv, D] on the CPU, got ", q.sizes(),
              " and ", cache.sizes());
  TORCH_CHECK(cache.size(4) == q.size(2) && cache.size(3) > 0 && q.size(1) % cache.size(3) == 0,
              "decode: q's heads and head size do not fit the cache's: ", q.sizes(), " and ",
              cache.sizes());
}

void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor cache,
                      torch::Tensor table, torch::Tensor ctx_lens, torch::Tensor rows,
                      double scale, int64_t window) {
  check_shapes(q, cache);
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && table.is_contiguous()
              && ctx_lens.is_contiguous() && rows.is_contiguous() && out.sizes() == q.sizes());
  TORCH_CHECK(out.device().is_cpu() && table.device().is_cpu() && ctx_lens.device().is_cpu()
              && rows.device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat);
  TORCH_CHECK(table.scalar_type() == at::kInt && ctx_lens.scalar_type() == at::kInt
              && rows.scalar_type() == at::kLong);
  const int64_t num_seqs = rows.size(0);
  TORCH_CHECK(table.dim() == 2 && ctx_lens.dim() == 1 && rows.dim() == 1
              && ctx_lens.size(0) == num_seqs && table.size(0) >= num_seqs,
              "decode_attention: one block table row and context length a sequence");
  // Every row, context and block the kernel will read lies inside its tensor.
  const int64_t width = table.size(1), block_size = cache.size(2), num_blocks = cache.size(1);
  const int* blocks = table.data_ptr<int>();
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t ctx = ctx_lens.data_ptr<int>()[s], row = rows.data_ptr<int64_t>()[s];
    TORCH_CHECK(0 <= row && row < q.size(0) && 0 < ctx && ctx <= width * block_size,
                "decode_attention: sequence ", s, " has row ", row, " and context ", ctx);
    for (int64_t b = 0; b < (ctx + block_size - 1) / block_size; ++b)
      TORCH_CHECK(0 <= blocks[s * width + b] && blocks[s * width + b] < num_blocks,
                  "decode_attention: block ", blocks[s * width + b], " is not in the cache");
  }
  // The work holds no Python object: the server's thread runs meanwhile.
  pybind11::gil_scoped_release no_gil;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cache.scalar_type(), "decode", [&] {
    kernel_for<scalar_t>(q.size(2))(
        q.data_ptr<float>(), out.data_ptr<float>(), cache.data_ptr<scalar_t>(),
        table.data_ptr<int>(), ctx_lens.data_ptr<int>(), rows.data_ptr<int64_t>(), num_seqs,
        table.size(1), cache.size(1), cache.size(2), q.size(1), cache.size(3), q.size(2),
        (float)scale, window);
  });
}

// One sequence's one-token step inside a compiled graph (engine/compiled.py): q [1, H, D] over
// its context's cache slots, [ctx] int32 (or int64) with its own last; the output in q's
// dtype. The slots are a one-row block table of one-slot blocks over the same memory. A
// bf16 or fp32 q and int32 slots are read as they are: no conversions, 30-odd calls a step.
torch::Tensor decode_single(torch::Tensor q, torch::Tensor cache, torch::Tensor slots,
                            double scale) {
  check_shapes(q, cache);
  TORCH_CHECK(q.size(0) == 1 && slots.dim() == 1 && slots.size(0) > 0
              && slots.device().is_cpu(),
              "decode_single: one query [1, H, D] and its context's slots, got ", q.sizes(),
              " and ", slots.sizes());
  const bool native = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat;
  const auto qc = (native ? q : q.to(at::kFloat)).contiguous();
  auto out = torch::empty_like(qc);
  const auto table = (slots.scalar_type() == at::kInt ? slots : slots.to(at::kInt)).contiguous();
  const int ctx = static_cast<int>(slots.size(0));
  const int64_t num_slots = cache.size(1) * cache.size(2);
  const int* slot = table.data_ptr<int>();
  for (int i = 0; i < ctx; ++i)
    TORCH_CHECK(0 <= slot[i] && slot[i] < num_slots,
                "decode_single: slot ", slot[i], " is not in the cache");
  const int64_t row = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cache.scalar_type(), "single", [&] {
    auto run = [&](auto* typed_q, auto* typed_out) {
      using TQ = std::remove_const_t<std::remove_pointer_t<decltype(typed_out)>>;
      kernel_for<scalar_t, TQ>(q.size(2))(
          typed_q, typed_out, cache.data_ptr<scalar_t>(), table.data_ptr<int>(), &ctx, &row, 1,
          ctx, cache.size(1) * cache.size(2), 1, q.size(1), cache.size(3), q.size(2),
          (float)scale, 0);
    };
    if (qc.scalar_type() == at::kBFloat16)
      run(qc.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
    else
      run(qc.data_ptr<float>(), out.data_ptr<float>());
  });
  return native ? out : out.to(q.scalar_type());
}

// An operator, so that a compiled graph calls it through the dispatcher, with no Python.
TORCH_LIBRARY_FRAGMENT(pagedserve_cpu, m) {
  m.def("decode_single(Tensor q, Tensor kv_cache, Tensor context_slots, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) { m.impl("decode_single", &decode_single); }
"""


def register_fakes() -> None:
    """Shapes for tracing the operators (engine/compiled.py), once the extension is built."""
    torch.library.register_fake("pagedserve_cpu::decode_single")(
        lambda q, kv_cache, context_slots, scale: torch.empty_like(q))


def available() -> bool:
    """Whether the kernel is built (building it on the first call)."""
    return cpu_extension.module() is not None


def decode_attention(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor,
                     block_table: torch.Tensor, ctx_lens: torch.Tensor, rows: torch.Tensor,
                     scale: float, sliding_window: int | None) -> None:
    """out[rows[i]] = attention of q[rows[i]] over sequence i's context in kv_cache.
    q, out: [T, H, D] float32 contiguous; kv_cache: [2, blocks, block_size, Hkv, D];
    block_table: [S, width] int32; ctx_lens: [S] int32, each query its context's last
    token; rows: [S] int64."""
    cpu_extension.module().decode_attention(out, q, kv_cache, block_table, ctx_lens, rows,
                                            scale, sliding_window or 0)
