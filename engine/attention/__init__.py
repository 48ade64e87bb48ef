"""Attention backends behind one interface: write the new K/V into their cache slots, then
attend each query over its request's cached context through the block table.

A layer's KV cache is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(keys, then values)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """One step's flattened varlen batch, shared by every layer."""

    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    block_size: int
    query_start_loc_cpu: list[int]  # host copies, so no backend needs a device sync
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    backend_state: object = None  # whatever the backend precomputes once per step


def get_attention_backend(name: str, num_heads: int, num_kv_heads: int):
    if name == "torch":
        from pagedserve.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(num_heads, num_kv_heads)
    if name == "triton":
        from pagedserve.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(num_heads, num_kv_heads)
    raise ValueError(f"unknown attention backend {name!r}; available: 'torch', 'triton'")
