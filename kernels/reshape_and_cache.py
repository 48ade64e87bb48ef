"""Cache write: scatter each new token's K and V into its paged-cache slot.

The cache is one tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_dim]
(keys, then values); slot = block_id * block_size + offset, and slots < 0 are padding."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr, v_ptr, cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_block, stride_c_off, stride_c_head,
    num_kv_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # Padding tokens (slot < 0) write nothing; masking the stores keeps control flow uniform.
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    # (Slot broadcast as a tensor: the interpreter rejects a mask built with a scalar bool.)
    valid = (tl.zeros([BLOCK_H, 1], dtype=tl.int64) + slot) >= 0
    mask = (heads < num_kv_heads) & (dims < head_dim) & valid
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    # int64 throughout: block_id * stride_c_block overflows int32 on large caches.
    block_id = slot // block_size
    offset = slot % block_size
    dst = block_id * stride_c_block + offset * stride_c_off + heads * stride_c_head + dims
    tl.store(cache_ptr + dst, k, mask=mask)
    tl.store(cache_ptr + stride_c_kv + dst, v, mask=mask)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Write k, v [num_tokens, num_kv_heads, head_dim] into kv_cache at slot_mapping."""
    num_tokens, num_kv_heads, head_dim = k.shape
    _, _, block_size, cache_heads, cache_dim = kv_cache.shape
    if (cache_heads, cache_dim) != (num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} don't match "
                         f"kv_cache {tuple(kv_cache.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("k, v and kv_cache need a contiguous last (head_dim) axis")
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        k,  # [num_tokens, num_kv_heads, head_dim]
        v,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping,  # [num_tokens] int64; < 0 = padding
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_kv_heads, head_dim, block_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def reshape_and_cache_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Slow reference for reshape_and_cache."""
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    kv_cache[0, slots // block_size, slots % block_size] = k[valid]
    kv_cache[1, slots // block_size, slots % block_size] = v[valid]
