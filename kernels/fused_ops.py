"""Fused elementwise kernels for the GPU path: residual add + RMSNorm in one pass, and the
neox-style rotary embedding applied to queries and keys in place, looking cos/sin up by
position inside the kernel. On a decode step each replaces several small PyTorch kernels
(the add, the fp32 upcast, the norm, the scale; the lookups, halves, negation, products).

Both compute in fp32 and round once on store, in HF's order: the residual sum is rounded to
the activation dtype before it is normalised, and the normalised value is rounded before
the weight multiplies it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty),
             mask=mask)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """x [rows, hidden] -> RMSNorm(x + residual) * weight. With a residual, the sum is also
    written back into `residual` (the next layer's skip connection)."""
    rows, hidden = x.shape
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("x and residual need a contiguous hidden axis")
    out = torch.empty_like(x)
    if rows == 0:
        return out
    _add_rms_norm_kernel[(rows,)](
        x,  # [rows, hidden]
        residual if residual is not None else x,  # [rows, hidden], updated in place
        weight,  # [hidden]
        out,  # [rows, hidden]
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
    )
    return out


def fused_add_rms_norm_ref(x, residual, weight, eps):
    """Reference: the PyTorch ops the kernel replaces (updates residual in place too)."""
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


@triton.jit
def _rotary_kernel(
    x_ptr, positions_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_cos,
    num_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)
    # The cache holds [freqs, freqs]: the first half is all a rotation needs.
    cos = tl.load(cos_ptr + pos * stride_cos + dims)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + dims)[None, :]
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = heads < num_heads
    base = x_ptr + token * stride_xt + heads * stride_xh + dims[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(base + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> torch.Tensor:
    """Rotate x [num_tokens, num_heads, head_dim] (neox halves) in place by each token's
    position, with cos/sin caches [max_positions, head_dim] fp32; returns x."""
    num_tokens, num_heads, head_dim = x.shape
    if x.stride(2) != 1 or cos_cache.stride(1) != 1 or head_dim & (head_dim - 1):
        raise ValueError("rotary_embedding needs a contiguous head_dim that is a power of two")
    if num_tokens == 0:
        return x
    _rotary_kernel[(num_tokens,)](
        x,  # [num_tokens, num_heads, head_dim], rotated in place
        positions,  # [num_tokens] int64
        cos_cache, sin_cache,  # [max_positions, head_dim] fp32
        x.stride(0), x.stride(1), cos_cache.stride(0),
        num_heads, HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(num_heads),
    )
    return x


def rotary_embedding_ref(x, positions, cos_cache, sin_cache):
    """Reference: the same rotation in fp32 with PyTorch ops (returns a new tensor)."""
    cos = cos_cache[positions][:, None, :]
    sin = sin_cache[positions][:, None, :]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
