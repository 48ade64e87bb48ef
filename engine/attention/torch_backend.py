"""PyTorch attention over the paged cache (the CPU path and the reference): gather each
request's context through its block table and run SDPA, with decodes and prefill chunks
batched separately so neither pays for the other's padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata


@dataclass(slots=True)
class _Group:
    """Requests attended in one padded SDPA call."""

    token_index: torch.Tensor  # [S, max_q] int64 into the flat batch (padding -> 0)
    valid: torch.Tensor | None  # [S, max_q] bool, None when no padding
    flat_index: torch.Tensor  # [num valid tokens] int64: token_index[valid]
    block_table: torch.Tensor  # [S, max_blocks] int64
    mask: torch.Tensor  # [S, 1, group_size * max_q, max_ctx] bool: True = attend
    max_q: int


@dataclass(slots=True)
class _State:
    decode: _Group | None
    prefill: _Group | None


class TorchAttentionBackend:
    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int) -> None:
        self.group_size = num_heads // num_kv_heads

    def prepare(self, md: AttentionMetadata) -> None:
        """Precompute per-step index tensors and masks once, for all layers."""
        decode_seqs = [i for i, q in enumerate(md.query_lens_cpu) if q == 1]
        prefill_seqs = [i for i, q in enumerate(md.query_lens_cpu) if q > 1]
        md.backend_state = _State(self._group(md, decode_seqs), self._group(md, prefill_seqs))

    def _group(self, md: AttentionMetadata, seqs: list[int]) -> _Group | None:
        if not seqs:
            return None
        device = md.slot_mapping.device
        seq_idx = torch.tensor(seqs, dtype=torch.long, device=device)
        q_lens = [md.query_lens_cpu[i] for i in seqs]
        ctx_lens = [md.seq_lens_cpu[i] for i in seqs]
        max_q, max_ctx = max(q_lens), max(ctx_lens)
        q_lens_t = torch.tensor(q_lens, device=device)
        ctx_lens_t = torch.tensor(ctx_lens, device=device)
        starts = md.query_start_loc[seq_idx].long()
        q_pos = torch.arange(max_q, device=device)
        token_index = starts[:, None] + q_pos[None, :]  # [S, max_q]
        valid = q_pos[None, :] < q_lens_t[:, None]
        token_index = torch.where(valid, token_index, torch.zeros_like(token_index))
        # Query i of a request sits at absolute position ctx_len - q_len + i; it sees keys
        # at positions <= its own (causal within the chunk, everything cached before it).
        abs_pos = (ctx_lens_t - q_lens_t)[:, None] + q_pos[None, :]  # [S, max_q]
        key_pos = torch.arange(max_ctx, device=device)
        mask = key_pos[None, None, :] <= abs_pos[:, :, None]  # [S, max_q, max_ctx]
        mask[~valid] = True  # padded rows attend to something finite; their output is dropped
        # Rows are ordered (query head in group, query position): see _attend_group.
        mask = mask[:, None].repeat(1, 1, self.group_size, 1)  # [S, 1, G * max_q, max_ctx]
        return _Group(
            token_index=token_index,
            valid=None if bool(valid.all()) else valid,
            flat_index=token_index[valid],
            block_table=md.block_table[seq_idx].long(),
            mask=mask,
            max_q=max_q,
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, md: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        kv_cache: [num_blocks, 2, block_size, num_kv_heads, head_dim]. Returns like q."""
        write_kv_cache(k, v, kv_cache, md.slot_mapping)
        out = torch.empty_like(q)
        state: _State = md.backend_state
        for group in (state.decode, state.prefill):
            if group is not None:
                out[group.flat_index] = _attend_group(q, kv_cache, group, scale)
        return out


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    block_size = kv_cache.shape[2]
    block_idx = slot_mapping // block_size
    offset = slot_mapping % block_size
    kv_cache[block_idx, 0, offset] = k
    kv_cache[block_idx, 1, offset] = v


def _attend_group(q: torch.Tensor, kv_cache: torch.Tensor, g: _Group,
                  scale: float) -> torch.Tensor:
    num_seqs, max_q = g.token_index.shape
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = q.shape[1]
    group_size = num_heads // num_kv_heads
    max_ctx = g.mask.shape[-1]
    # Gather the context: [S, max_blocks, 2, block_size, Hkv, D] -> K, V as [S, Hkv, ctx, D].
    num_blocks = -(-max_ctx // block_size)
    ctx = kv_cache[g.block_table[:, :num_blocks]]
    ctx = ctx.transpose(1, 2).reshape(num_seqs, 2, num_blocks * block_size, num_kv_heads, head_dim)
    key = ctx[:, 0, :max_ctx].transpose(1, 2)
    value = ctx[:, 1, :max_ctx].transpose(1, 2)
    # Pack each KV head's query heads into the query-length axis, so GQA needs no K/V copies.
    query = q[g.token_index]  # [S, max_q, H, D]
    query = query.permute(0, 2, 1, 3).reshape(num_seqs, num_kv_heads, group_size * max_q, head_dim)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=g.mask, scale=scale)
    out = out.reshape(num_seqs, num_heads, max_q, head_dim).permute(0, 2, 1, 3)  # [S, max_q, H, D]
    return out[g.valid] if g.valid is not None else out.reshape(-1, num_heads, head_dim)
