"""Triton attention (the GPU path): the new K/V go into their slots with one kernel, then
one unified paged-attention launch serves the whole mixed prefill + decode batch."""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata


class TritonAttentionBackend:
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int) -> None:
        # Imported here so the engine imports (and runs on CPU) without triton.
        from kernels.paged_attention import paged_attention
        from kernels.reshape_and_cache import reshape_and_cache

        self._paged_attention = paged_attention
        self._reshape_and_cache = reshape_and_cache

    def prepare(self, md: AttentionMetadata) -> None:
        pass  # the kernels read the step's metadata tensors directly

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, md: AttentionMetadata, scale: float) -> torch.Tensor:
        self._reshape_and_cache(
            k, v,  # [num_tokens, num_kv_heads, head_dim]
            kv_cache,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
            md.slot_mapping,  # [num_tokens] int64
        )
        return self._paged_attention(
            q,  # [num_tokens, num_heads, head_dim]
            kv_cache,
            md.block_table,  # [num_seqs, max_blocks_per_seq] int32
            md.seq_lens,  # [num_seqs] int32
            md.query_start_loc,  # [num_seqs + 1] int32
            scale,
            md.max_query_len,  # host int: sizes the grid without a device sync
        )
