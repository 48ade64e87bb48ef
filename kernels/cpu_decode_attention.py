"""Decode attention on a CPU straight from the paged KV cache, in C++ built at first use.

Each decode query (one token a sequence) attends over its context by walking its block
table: every cached key and value is read once, where the torch path first copies the
context out of the cache (index_select) and then runs SDPA over the copy, whose CPU kernel
has a high fixed cost per (sequence, head) at one query row. Batched decode spends most of
its step in attention on a CPU, so this is the kernel that sets batched decode speed there.

Work is split over (sequence, KV head) pairs on torch's own thread pool. Built with the
other CPU kernels (cpu_extension.py); `available()` is False where they could not be built:
callers then take the torch path."""

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
#include <vector>

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
      const int* blocks = table + s * width;
      // Where token t of the context sits in a cache plane, for this KV head.
      auto row = [&](int64_t t) {
        return ((int64_t)blocks[t / block_size] * block_size + t % block_size) * token_stride;
      };
      // Scores, one key row at a time (each row read once for all the group's queries).
      for (int64_t j = 0; j < n; ++j) {
        const T* __restrict k = keys + row(first + j);
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
        const T* __restrict v = values + row(first + j);
        for (int64_t g = 0; g < group; ++g) {
          const float p = sc[g * n + j];
          float* __restrict ag = acc.data() + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * load(v, d);
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
              && cache.device().is_cpu(), "decode: q [T, H, D] and a contiguous CPU cache "
              "[2, blocks, block_size, Hkv, D], got ", q.sizes(), " and ", cache.sizes());
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
  TORCH_CHECK(q.size(0) == 1 && slots.dim() == 1 && slots.size(0) > 0,
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
