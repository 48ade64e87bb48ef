"""PyTorch attention over the paged cache (the CPU path and the reference).

On a CPU, decodes go to a C++ kernel that reads their contexts straight from the cache
(kernels/cpu_decode_attention.py). Elsewhere, or where it did not build, they are gathered
through their block tables and attended in a few padded SDPA calls, bucketed by context
length so that short contexts don't pay for long ones. Prefill chunks
run one request at a time (they are few and long): a chunk with no cached context attends
over its own K/V with a plain causal SDPA, with no gather at all."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pagedserve.engine.attention.metadata import AttentionMetadata, SingleDecode
from pagedserve.kernels.cpu_decode_attention import available as decode_kernel_available
from pagedserve.kernels.cpu_decode_attention import decode_attention

# A decode bucket grows while its longest context is at most this factor of its shortest:
# bounds padding waste at ~1/3 of the gathered context, with only a handful of buckets.
# Cost model for splitting decodes into padded SDPA calls: one more call per layer costs
# about as much as gathering and attending this many padded context tokens (measured on
# CPU: ~80 us of dispatch per call against ~0.2 us per token).
_CALL_COST_IN_TOKENS = 400


def _visible(q_pos: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """[len(q_pos), num_keys] bool: a query at position p sees keys at positions <= p and,
    with a sliding window W, > p - W (HF's rule: its W latest positions)."""
    key_pos = torch.arange(num_keys, device=q_pos.device)[None, :]
    visible = key_pos <= q_pos[:, None]
    if window is not None:
        visible &= key_pos > q_pos[:, None] - window
    return visible


@dataclass(slots=True)
class _DecodeBucket:
    # [S] int64: each decode token's row in the flat batch; None when the bucket is the
    # whole batch in its order (a decode-only step, e.g. a single stream): no gather, no scatter
    token_index: torch.Tensor | None
    block_table: torch.Tensor  # [S, num_blocks] int32, contiguous
    q_pos: torch.Tensor  # [S] int64: each decode token's position (context length - 1)
    max_ctx: int
    # Gather buffers reused by every layer of the step: fresh multi-MB tensors per layer
    # would cost page faults comparable to the copy itself.
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    kv_buffer: torch.Tensor | None = None  # the same for _decode_whole: [2, S * blocks, ...]
    masks: dict = field(default_factory=dict)  # (window, dtype) -> [S, 1, 1, max_ctx]

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive (0 or -inf, in the queries' dtype): CPU SDPA runs decode shapes ~1.4x
        faster with it than with a boolean mask, to the same result."""
        if (window, dtype) not in self.masks:
            visible = _visible(self.q_pos, self.max_ctx, window)[:, None, None, :]
            self.masks[window, dtype] = torch.zeros(visible.shape, dtype=dtype,
                                                    device=visible.device
                                                    ).masked_fill_(~visible, float("-inf"))
        return self.masks[window, dtype]


@dataclass(slots=True)
class _Prefill:
    start: int  # rows start:end of the flat batch
    end: int
    ctx_len: int  # context length after this chunk
    block_table: torch.Tensor | None  # [num_blocks] int64; None when no cached context
    q_pos: torch.Tensor  # [q_len] int64: the chunk's positions
    group_size: int
    masks: dict = field(default_factory=dict)  # window -> [1, 1, G * q_len, ctx_len] bool

    def plain_causal(self, window: int | None) -> bool:
        """No cached context and no window cutting into the chunk: SDPA's own causal mask."""
        q_len = self.end - self.start
        return self.block_table is None and (window is None or window >= q_len)

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self.masks:
            # Query rows are ordered (head in group, position): see _attend.
            visible = _visible(self.q_pos, self.ctx_len, window).repeat(self.group_size, 1)
            self.masks[window] = visible[None, None]
        return self.masks[window]


@dataclass(slots=True)
class _PagedDecodes:
    """The step's decodes for the CPU kernel, which attends straight from the cache."""
    rows: torch.Tensor  # [S] int64: each decode token's row in the flat batch
    block_table: torch.Tensor  # [S, width] int32, contiguous
    ctx_lens: torch.Tensor  # [S] int32


@dataclass(slots=True)
class _State:
    decodes: list[_DecodeBucket]
    prefills: list[_Prefill]
    paged: _PagedDecodes | None = None  # instead of decodes, where the CPU kernel is built


def _buckets(ctx_lens: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted decode context lengths into [start, end) runs, one padded SDPA call
    each: a run grows until padding everyone in it up to the next, longer context would
    cost more than another call."""
    n = len(ctx_lens)
    if n < 2 or (np.arange(1, n) * np.diff(ctx_lens) <= _CALL_COST_IN_TOKENS).all():
        return [(0, n)] if n else []  # no split even from the first row (a batch of like contexts)
    ctx_lens = ctx_lens.tolist()
    bounds, start = [], 0
    for i in range(1, len(ctx_lens)):
        if (i - start) * (ctx_lens[i] - ctx_lens[i - 1]) > _CALL_COST_IN_TOKENS:
            bounds.append((start, i))
            start = i
    if ctx_lens:
        bounds.append((start, len(ctx_lens)))
    return bounds


class TorchAttentionBackend:
    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int) -> None:
        self.group_size = num_heads // num_kv_heads

    def prepare(self, md: AttentionMetadata) -> None:
        """Precompute per-step index tensors and masks once, for all layers."""
        qsl = np.asarray(md.query_start_loc_cpu)
        query_lens, seq_lens = np.asarray(md.query_lens_cpu), np.asarray(md.seq_lens_cpu)
        decodes = np.flatnonzero(query_lens == 1)
        ctx_lens = seq_lens[decodes]
        prefills = [self._prefill(md, i, md.query_start_loc_cpu)
                    for i in np.flatnonzero(query_lens > 1).tolist()]
        if len(decodes) and md.slot_mapping.device.type == "cpu" and decode_kernel_available():
            md.backend_state = _State([], prefills, self._paged(md, decodes, qsl, ctx_lens))
            return
        order = np.argsort(ctx_lens, kind="stable")
        bounds = _buckets(ctx_lens[order])
        if len(bounds) > 1:  # buckets are runs of contexts in length order
            decodes, ctx_lens = decodes[order], ctx_lens[order]
        # One bucket keeps batch order: a decode-only step is then attended whole, with no
        # gather of its queries and no scatter of their outputs.
        md.backend_state = _State(
            decodes=[self._decode_bucket(md, decodes[a:b], qsl, ctx_lens[a:b])
                     for a, b in bounds],
            prefills=prefills,
        )

    @staticmethod
    def _paged(md: AttentionMetadata, seqs: np.ndarray, qsl: np.ndarray,
               ctx_lens: np.ndarray) -> _PagedDecodes:
        rows = qsl[seqs].astype(np.int64)
        whole = len(seqs) == len(md.seq_lens_cpu)  # every sequence decodes: the whole table
        table = md.block_table if whole else md.block_table[torch.from_numpy(seqs)]
        return _PagedDecodes(torch.from_numpy(rows), table.to(torch.int32).contiguous(),
                             torch.from_numpy(ctx_lens.astype(np.int32)))

    def _decode_bucket(self, md: AttentionMetadata, seqs: np.ndarray, qsl: np.ndarray,
                       ctx_lens: np.ndarray) -> _DecodeBucket:
        device = md.slot_mapping.device
        max_ctx = int(ctx_lens.max())
        num_blocks = -(-max_ctx // md.block_size)
        rows = qsl[seqs].astype(np.int64)
        whole = len(rows) == md.num_tokens and np.array_equal(rows, np.arange(md.num_tokens))
        # Whole: the sequences are the batch's, in order: their tables are a slice.
        table = (md.block_table[:, :num_blocks] if whole
                 else md.block_table[torch.from_numpy(seqs).to(device), :num_blocks])
        return _DecodeBucket(
            token_index=None if whole else torch.from_numpy(rows).to(device),
            block_table=table.contiguous(),  # int32 indexes as fast, at half the copy
            q_pos=torch.from_numpy(ctx_lens - 1).to(device=device, dtype=torch.long),
            max_ctx=max_ctx,
        )

    def _prefill(self, md: AttentionMetadata, i: int, qsl: list[int]) -> _Prefill:
        q_len, ctx_len = md.query_lens_cpu[i], md.seq_lens_cpu[i]
        device = md.slot_mapping.device
        # Query j sits at absolute position ctx_len - q_len + j.
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
        block_table = None
        if ctx_len > q_len:
            block_table = md.block_table[i, :-(-ctx_len // md.block_size)].long()
        return _Prefill(qsl[i], qsl[i] + q_len, ctx_len, block_table, q_pos, self.group_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, md: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]. Returns like q.
        With a sliding_window W, each query sees only its W latest positions.
        A cache of another dtype than q (a bf16 cache beside fp32 activations) is attended in
        its own dtype: the queries are cast, not the whole gathered context."""
        state: _State = md.backend_state
        if not state.prefills and len(state.decodes) == 1 and state.decodes[0].token_index is None:
            return _decode_whole(q, k, v, kv_cache, md.slot_mapping, state.decodes[0],
                                 scale, sliding_window)
        write_kv_cache(k, v, kv_cache, md.slot_mapping)
        if state.paged is not None:
            out = _paged_decode(q, kv_cache, state.paged, scale, sliding_window)
            if not state.prefills:
                return out
        else:
            out = torch.empty_like(q)
        cache_dtype = kv_cache.dtype
        for bucket in state.decodes:
            if bucket.buffers is None:
                bucket.buffers = _gather_buffers(kv_cache, bucket.block_table)
            key, value = _gather(kv_cache, bucket.block_table, bucket.max_ctx, bucket.buffers)
            whole = bucket.token_index is None
            query = (q if whole else q[bucket.token_index]).to(cache_dtype)  # [S, H, D]
            mask = bucket.mask(sliding_window, cache_dtype)
            attended = _attend(query[:, None], key, value, mask, scale)[:, 0].to(out.dtype)
            if whole:  # laid out like `out` (the compiled graph's view of this op's result)
                return attended.contiguous()
            out[bucket.token_index] = attended
        for p in state.prefills:
            if p.plain_causal(sliding_window):
                out[p.start:p.end] = _causal(q[p.start:p.end], k[p.start:p.end],
                                             v[p.start:p.end], scale)
                continue
            query = q[None, p.start:p.end]
            if p.block_table is None:  # the chunk's own K/V are its whole context
                key, value = k[None, p.start:p.end], v[None, p.start:p.end]
            else:
                key, value = _gather(kv_cache, p.block_table[None], p.ctx_len)
                query = query.to(cache_dtype)
            out[p.start:p.end] = _attend(query, key, value, p.mask(sliding_window), scale)[0]
        return out


def _paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, paged: _PagedDecodes, scale: float,
                  sliding_window: int | None) -> torch.Tensor:
    """Attention of the decode rows by the CPU kernel (fp32 queries and outputs), as a
    tensor like q whose other rows are for the caller to fill."""
    out = torch.empty(q.shape, dtype=torch.float32)
    decode_attention(out, q.float().contiguous(), kv_cache, paged.block_table, paged.ctx_lens,
                     paged.rows, scale, sliding_window)
    return out.to(q.dtype)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter new k, v [T, Hkv, D] into their slots (block_id * block_size + offset), in
    the cache's dtype."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    slots = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    slots[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    slots[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _decode_whole(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, bucket: _DecodeBucket, scale: float,
                  sliding_window: int | None) -> torch.Tensor:
    """forward() of a step that is one decode bucket in batch order (a single stream, a
    decode-only batch of like contexts): the same arithmetic in half the ops, K and V
    written and gathered together, no scatter, no GQA reshuffle (one query per sequence)."""
    num_seqs, num_heads, head_dim = q.shape
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    cache_dtype = kv_cache.dtype
    slots = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    slots.index_copy_(1, slot_mapping, torch.stack((k, v)).to(cache_dtype))
    index = bucket.block_table.view(-1)
    if bucket.kv_buffer is None:
        bucket.kv_buffer = kv_cache.new_empty((2, index.numel(), *kv_cache.shape[2:]))
    kv = bucket.kv_buffer
    # Each plane along its first dimension: runs of memcpys (one index_select along dim 1
    # of both planes at once takes a slower, element-wise path).
    torch.index_select(kv_cache[0], 0, index, out=kv[0])
    torch.index_select(kv_cache[1], 0, index, out=kv[1])
    # [2, S, Hkv, ctx, D]: each sequence's context, heads first (a view).
    kv = kv.view(2, num_seqs, -1, num_kv_heads, head_dim)[:, :, :bucket.max_ctx].transpose(2, 3)
    # One query a sequence: its G query heads of a KV head are the query rows of that head.
    query = q.to(cache_dtype).view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(query, kv[0], kv[1], scale=scale,
                                         attn_mask=bucket.mask(sliding_window, cache_dtype))
    return out.view(num_seqs, num_heads, head_dim).to(q.dtype)


def single_decode(md: AttentionMetadata, num_cache_blocks: int) -> SingleDecode:
    """attend_single's inputs for the one-token step md, over caches of num_cache_blocks."""
    bs, ctx = md.block_size, md.seq_lens_cpu[0]
    blocks = md.block_table[0, :-(-ctx // bs)].int()
    # int32, as the kernel's operator reads it (no conversion in each layer).
    context = (blocks[:, None] * bs + torch.arange(bs, dtype=torch.int32, device=blocks.device)
               ).view(-1)[:ctx]
    slot = md.slot_mapping
    return SingleDecode(torch.cat((slot, slot + num_cache_blocks * bs)), context)


# Whether attend_single calls the CPU decode kernel's operator (set before compiling, by
# use_single_decode_kernel(): the graph holds whichever op this said when it was traced).
_single_decode_kernel = False


def use_single_decode_kernel() -> bool:
    """Have attend_single use the CPU decode kernel where it is built; returns whether."""
    global _single_decode_kernel
    _single_decode_kernel = decode_kernel_available()
    return _single_decode_kernel


def attend_single(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                  decode: SingleDecode, scale: float) -> torch.Tensor:
    """A one-token step's attention in ops a compiled graph can hold: q [1, H, D] over its
    context's slots, its own last, straight from the cache, by the CPU decode kernel's
    operator or else by SDPA over a gather (inductor fuses the cache write and the gather
    into one loop). The query sees its whole context: no mask."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_slots = num_blocks * block_size
    rows = kv_cache.view(2 * num_slots, num_kv_heads, head_dim)
    rows.index_put_((decode.write_rows,), torch.cat((k, v)).to(kv_cache.dtype))
    if _single_decode_kernel:
        return torch.ops.pagedserve_cpu.decode_single(q, kv_cache, decode.context_slots, scale)
    # [2, 1, Hkv, ctx, D]: keys and values of the context, heads first.
    kv = rows.view(2, num_slots, num_kv_heads, head_dim).index_select(
        1, decode.context_slots).transpose(1, 2)[:, None]
    num_heads = q.shape[1]
    # One query: its G query heads of a KV head are the query rows of that head.
    query = q.to(kv_cache.dtype).view(1, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(query, kv[0], kv[1], scale=scale)
    return out.reshape(1, num_heads, head_dim).to(q.dtype)


def _gather_buffers(kv_cache: torch.Tensor, block_table: torch.Tensor):
    shape = (block_table.numel(), *kv_cache.shape[2:])
    return (torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device),
            torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device))


def _gather(kv_cache: torch.Tensor, block_table: torch.Tensor, ctx_len: int,
            buffers: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Contexts [S, ctx_len, Hkv, D] of K and V through block tables [S, num_blocks]."""
    num_seqs, num_blocks = block_table.shape
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    shape = (num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    if buffers is None:
        buffers = _gather_buffers(kv_cache, block_table)
    # index_select over whole contiguous blocks is a run of memcpys (several times faster
    # than advanced indexing on CPU).
    index = block_table.reshape(-1)
    key = torch.index_select(kv_cache[0], 0, index, out=buffers[0]).view(shape)[:, :ctx_len]
    value = torch.index_select(kv_cache[1], 0, index, out=buffers[1]).view(shape)[:, :ctx_len]
    return key, value


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A chunk with no cached context: q [T, H, D], k, v [T, Hkv, D] -> [T, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor, scale: float) -> torch.Tensor:
    """query [S, q, H, D]; key, value [S, ctx, Hkv, D]; mask broadcastable to
    [S, 1, G * q, ctx]. Returns [S, q, H, D]."""
    num_seqs, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    group = num_heads // num_kv_heads
    # Pack each KV head's query heads into the query axis, so GQA needs no K/V copies.
    query = query.permute(0, 2, 1, 3).reshape(num_seqs, num_kv_heads, group * q_len, head_dim)
    key, value = key.transpose(1, 2), value.transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out.reshape(num_seqs, num_heads, q_len, head_dim).permute(0, 2, 1, 3)
