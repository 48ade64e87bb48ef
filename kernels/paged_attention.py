"""Unified paged attention: one launch for a mixed batch of prefill chunks and decodes.

Each query at absolute position seq_len - q_len + i attends over its request's cached
context (positions <= its own) through the block table; the new K/V must already be in
the cache (kernels.reshape_and_cache). A program owns BLOCK_Q query positions of one
request times the query heads of one KV head (GQA packed into the tile's rows), and walks
the context one cache block at a time with an online softmax in fp32. For decode-only
batches too small to fill the GPU, paged_attention_split_kv (flash-decoding) also splits
each context across programs and merges the slices; num_kv_splits is the rule."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# Real GPUs reject tl.dot with fewer than 16 rows, so a tile always has at least 16.
_MIN_TILE_ROWS = 16
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NO_WINDOW = 1 << 30  # a sliding window no context reaches (positions stay int32)


@triton.jit
def _attend_cache_blocks(
    q, q_pos, m_i, l_i, acc, cache_ptr, block_table_row_ptr, kv_head,
    first_block, last_block, kv_end, window, scale_log2,
    stride_c_kv, stride_c_block, stride_c_off, stride_c_head,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Online-softmax update of (m_i, l_i, acc) over cache blocks [first_block, last_block)
    of one request: keys at positions < kv_end, <= each row's q_pos and > q_pos - window
    (the sliding window; a window >= the context length is plain causal attention)."""
    dims = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_SIZE)
    kv_off = offs_n[:, None] * stride_c_off + kv_head * stride_c_head + dims[None, :]
    for j in range(first_block, last_block):
        # int64 block id: block_id * stride_c_block overflows int32 on large caches.
        block_id = tl.load(block_table_row_ptr + j).to(tl.int64)
        key_pos = j * BLOCK_SIZE + offs_n
        key_mask = key_pos < kv_end
        base = cache_ptr + block_id * stride_c_block + kv_off
        k = tl.load(base, mask=key_mask[:, None], other=0.0)
        v = tl.load(base + stride_c_kv, mask=key_mask[:, None], other=0.0)
        if DOT_FP32:
            # ieee: a GPU would otherwise round fp32 dots to tf32.
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2  # [rows, BLOCK_SIZE], log2 units
        attend = (key_mask[None, :] & (key_pos[None, :] <= q_pos[:, None])
                  & (key_pos[None, :] > q_pos[:, None] - window))
        s = tl.where(attend, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr, cache_ptr, out_ptr, block_table_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_block, stride_c_off, stride_c_head,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = seq_len - q_len  # absolute position of the chunk's first query

    # Row r of the tile: query position r // GROUP_PAD, head r % GROUP_PAD of the group.
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_idx = q_block * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_mask = (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = ctx_start + q_idx
    dims = tl.arange(0, HEAD_DIM)

    token = (q_start + q_idx).to(tl.int64)
    q_off = token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Finite start for the running max: rows with nothing to attend (padding) stay NaN-free.
    m_i = tl.full([BLOCK_Q * GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], dtype=tl.float32)

    # Keys this tile can see end at its last query's position (causal); a tile past the
    # chunk's end (the grid is sized for the longest chunk) sees none.
    last_q = tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
    kv_end = tl.where(last_q > q_block * BLOCK_Q, ctx_start + last_q, 0)
    num_kv_blocks = tl.cdiv(kv_end, BLOCK_SIZE)
    # Blocks wholly before the tile's first query's window are never read.
    first_block = tl.maximum(ctx_start + q_block * BLOCK_Q - window + 1, 0) // BLOCK_SIZE

    m_i, l_i, acc = _attend_cache_blocks(
        q, q_pos, m_i, l_i, acc, cache_ptr, block_table_ptr + seq * stride_bt, kv_head,
        first_block, num_kv_blocks, kv_end, window, scale_log2,
        stride_c_kv, stride_c_block, stride_c_off, stride_c_head,
        HEAD_DIM, BLOCK_SIZE, DOT_FP32)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def _window_arg(sliding_window: int | None) -> int:
    """The kernels' window: no sliding window is one wider than any context."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window {sliding_window}: must be >= 1 or None")
    return sliding_window or _NO_WINDOW


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32 inputs keep an fp32 dot; the interpreter computes bf16 dots wrongly (numpy has
    # no bf16), so there they go through fp32 too.
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting)


@triton.jit
def _split_kv_decode_kernel(
    q_ptr, cache_ptr, partial_out_ptr, partial_lse_ptr, block_table_ptr, seq_lens_ptr,
    scale_log2, window,
    stride_qt, stride_qh,
    stride_c_kv, stride_c_block, stride_c_off, stride_c_head,
    stride_bt,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_BLOCKS_PER_SPLIT: tl.constexpr,
    GROUP: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One decode token's query heads of one KV head over one slice of its context."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, ROWS)  # the group's heads, padded to a dot-sized tile
    row_mask = rows < GROUP
    head = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q_off = seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = tl.zeros([ROWS], dtype=tl.int32) + seq_len - 1

    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    # Each request cuts its own context (no host-side bound needed, so a CUDA graph can
    # replay it at any length); a short context fills only the first few slices, and the
    # slices past its end are empty and report lse = -inf.
    # The slices cover the blocks the query's window reaches, [window_block, num_blocks).
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    window_block = tl.maximum(seq_len - window, 0) // BLOCK_SIZE
    blocks_per_split = tl.maximum(tl.cdiv(num_blocks - window_block, NUM_SPLITS),
                                  MIN_BLOCKS_PER_SPLIT)
    first_block = window_block + split * blocks_per_split
    last_block = tl.minimum(first_block + blocks_per_split, num_blocks)
    m_i, l_i, acc = _attend_cache_blocks(
        q, q_pos, m_i, l_i, acc, cache_ptr, block_table_ptr + seq * stride_bt, kv_head,
        first_block, last_block, seq_len, window, scale_log2,
        stride_c_kv, stride_c_block, stride_c_off, stride_c_head,
        HEAD_DIM, BLOCK_SIZE, DOT_FP32)

    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    row = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split  # [seq, head, split]
    tl.store(partial_lse_ptr + row, lse, mask=row_mask)
    tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], out,
             mask=row_mask[:, None])


@triton.jit
def _split_kv_reduce_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Merge one (token, head)'s per-split softmax results, weighting each by its mass."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    row = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + splits
    lse = tl.load(partial_lse_ptr + row, mask=splits < NUM_SPLITS, other=float("-inf"))
    # Only an empty context (a padding row of a CUDA graph) has every slice empty; it
    # gets zeros instead of 0/0.
    lse_max = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    partial = tl.load(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :],
                      mask=(splits < NUM_SPLITS)[:, None], other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(partial * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    o_off = seq.to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty))


def _check_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor) -> None:
    _, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_dim = kv_cache.shape
    if q.dtype not in _SUPPORTED_DTYPES or kv_cache.dtype != q.dtype:
        raise ValueError(f"q dtype {q.dtype} / kv_cache dtype {kv_cache.dtype}: both must be "
                         f"one of {_SUPPORTED_DTYPES}")
    if cache_dim != head_dim or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim {head_dim} (cache {cache_dim}): must match and be a "
                         "power of two >= 16")
    if block_size & (block_size - 1) or block_size < 16:
        raise ValueError(f"block_size {block_size}: must be a power of two >= 16")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads "
                         f"{num_kv_heads}")
    if q.stride(2) != 1 or kv_cache.stride(4) != 1 or block_table.stride(1) != 1:
        raise ValueError("q, kv_cache and block_table need a contiguous last axis")


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    max_query_len: int, out: torch.Tensor | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> out like q.

    max_query_len is a host-side bound on any request's query length this step (the
    grid is sized from it, so deciding the launch needs no device sync). With a
    sliding_window W, a query sees only the W latest positions up to its own (HF's rule)."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    _check_inputs(q, kv_cache, block_table)
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # At least _MIN_TILE_ROWS rows (decode-only batches pad up to it); up to 64 rows of
    # query positions when chunks are long, so each loaded K/V block serves more queries.
    block_q = max(_MIN_TILE_ROWS // group_pad, 1)
    block_q = max(block_q, min(triton.next_power_of_2(max(max_query_len, 1)),
                               max(64 // group_pad, 1)))
    max_q_blocks = triton.cdiv(max(max_query_len, 1), block_q)

    grid = (num_seqs, max_q_blocks, num_kv_heads)
    _paged_attention_kernel[grid](
        q,  # [num_tokens, num_heads, head_dim]
        kv_cache,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        out,  # [num_tokens, num_heads, head_dim]
        block_table,  # [num_seqs, max_blocks_per_seq] int32
        seq_lens,  # [num_seqs] int32: context length after this step
        query_start_loc,  # [num_seqs + 1] int32
        scale * math.log2(math.e), _window_arg(sliding_window),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_table.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q,
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, DOT_FP32=_dot_fp32(q.dtype),
    )
    return out


# A GPU wants several programs per SM in flight (an H100 has 132 SMs); below this many
# (num_seqs * num_kv_heads) the plain kernel leaves bandwidth unused on long contexts, so the
# context is split. Measured on an H100 (benchmarks/results/gpu/): batch 32 x 8 KV heads at
# 4k context ran 334 us unsplit and 191 us in 4 splits; batch 256 reaches ~90% of copy
# bandwidth unsplit.
_SPLIT_KV_TARGET_PROGRAMS = 1024
# Fewer cache blocks than this per split and the reduction's extra traffic isn't worth it.
_SPLIT_KV_MIN_BLOCKS_PER_SPLIT = 16
_SPLIT_KV_MAX_SPLITS = 32


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_size: int) -> int:
    """The rule for decode-only batches: how many slices to split each context into
    (1 = use paged_attention). Split only when the batch alone gives fewer than
    _SPLIT_KV_TARGET_PROGRAMS programs, and keep >= _SPLIT_KV_MIN_BLOCKS_PER_SPLIT cache
    blocks per slice. All inputs are host-side ints."""
    programs = num_seqs * num_kv_heads
    if programs >= _SPLIT_KV_TARGET_PROGRAMS:
        return 1
    by_occupancy = triton.cdiv(_SPLIT_KV_TARGET_PROGRAMS, programs)
    by_length = triton.cdiv(max_seq_len, block_size) // _SPLIT_KV_MIN_BLOCKS_PER_SPLIT
    return max(1, min(by_occupancy, by_length, _SPLIT_KV_MAX_SPLITS))


def paged_attention_split_kv(q: torch.Tensor, kv_cache: torch.Tensor,
                             block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                             num_splits: int, out: torch.Tensor | None = None,
                             min_blocks_per_split: int | None = None,
                             sliding_window: int | None = None) -> torch.Tensor:
    """Flash-decoding for a decode-only batch (one query token per request, token i of q
    belongs to request i): q [num_seqs, num_heads, head_dim] -> out like q.

    Each request's context is cut into up to num_splits slices of whole cache blocks (at
    least _SPLIT_KV_MIN_BLOCKS_PER_SPLIT each); each slice is attended separately and a
    second kernel merges the slices by their log-sum-exp. A request with an empty context
    (seq_len 0: padding) gets zeros."""
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    _check_inputs(q, kv_cache, block_table)
    if seq_lens.shape[0] != num_seqs:
        raise ValueError(f"decode-only: q has {num_seqs} tokens but seq_lens has "
                         f"{seq_lens.shape[0]} requests")
    if num_splits < 1:
        raise ValueError(f"num_splits {num_splits}: must be >= 1")
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim,
                              dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(num_seqs, num_heads, num_splits,
                              dtype=torch.float32, device=q.device)
    _split_kv_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,  # [num_seqs, num_heads, head_dim]
        kv_cache,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        partial_out,  # [num_seqs, num_heads, num_splits, head_dim] fp32
        partial_lse,  # [num_seqs, num_heads, num_splits] fp32, log2 units
        block_table,  # [num_seqs, max_blocks_per_seq] int32
        seq_lens,  # [num_seqs] int32: context length after this step
        scale * math.log2(math.e), _window_arg(sliding_window),
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_table.stride(0),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits,
        MIN_BLOCKS_PER_SPLIT=min_blocks_per_split or _SPLIT_KV_MIN_BLOCKS_PER_SPLIT,
        GROUP=group, ROWS=max(triton.next_power_of_2(group), _MIN_TILE_ROWS),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, DOT_FP32=_dot_fp32(q.dtype),
    )
    _split_kv_reduce_kernel[(num_seqs, num_heads)](
        partial_out,  # [num_seqs, num_heads, num_splits, head_dim] fp32
        partial_lse,  # [num_seqs, num_heads, num_splits] fp32
        out,  # [num_seqs, num_heads, head_dim]
        out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
    )
    return out


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Slow reference: per sequence, gather the context, mask causally, softmax in fp32."""
    num_heads = q.shape[1]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        blocks = block_table[i, :triton.cdiv(seq_len, block_size)].long()
        key = kv_cache[0, blocks].flatten(0, 1)[:seq_len].float()  # [ctx, Hkv, D]
        value = kv_cache[1, blocks].flatten(0, 1)[:seq_len].float()
        key = key.repeat_interleave(group, dim=1)  # [ctx, H, D]
        value = value.repeat_interleave(group, dim=1)
        query = q[start:end].float()  # [q_len, H, D]
        scores = torch.einsum("qhd,khd->hqk", query, key) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        key_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = key_pos <= q_pos  # [q_len, ctx]
        if sliding_window is not None:
            visible &= key_pos > q_pos - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, value).to(q.dtype)
    return out
