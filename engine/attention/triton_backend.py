"""Triton attention (the GPU path): the new K/V go into their slots with one kernel, then
one paged-attention launch serves the whole mixed prefill + decode batch. Decode-only
batches too small to fill the GPU take the split-KV (flash-decoding) kernels instead;
kernels.paged_attention.num_kv_splits is the rule."""

from __future__ import annotations

import torch

from pagedserve.engine.attention.metadata import AttentionMetadata


class TritonAttentionBackend:
    name = "triton"
    supports_cuda_graphs = True  # no host-side data in any launch beyond the grid sizes

    def __init__(self, num_heads: int, num_kv_heads: int) -> None:
        # Imported here so the engine imports (and runs on CPU) without triton.
        from pagedserve.kernels.paged_attention import (
            num_kv_splits,
            paged_attention,
            paged_attention_split_kv,
        )
        from pagedserve.kernels.reshape_and_cache import reshape_and_cache

        self.num_kv_heads = num_kv_heads
        self._num_kv_splits = num_kv_splits
        self._paged_attention = paged_attention
        self._paged_attention_split_kv = paged_attention_split_kv
        self._reshape_and_cache = reshape_and_cache

    def prepare(self, md: AttentionMetadata) -> None:
        # backend_state: how many KV splits a decode-only step uses (0: the unified kernel).
        # From host ints only; for a CUDA graph md.max_seq_len is max_model_len, so the
        # captured split count suits any context the graph will be replayed with.
        splits = 0
        if md.max_query_len == 1:
            splits = self._num_kv_splits(len(md.seq_lens_cpu), self.num_kv_heads,
                                         md.max_seq_len, md.block_size)
        md.backend_state = splits if splits > 1 else 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, md: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        self._reshape_and_cache(
            k, v,  # [num_tokens, num_kv_heads, head_dim]
            kv_cache,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
            md.slot_mapping,  # [num_tokens] int64
        )
        if md.backend_state:
            return self._paged_attention_split_kv(
                q,  # [num_seqs, num_heads, head_dim]: one token per request
                kv_cache,
                md.block_table,  # [num_seqs, max_blocks_per_seq] int32
                md.seq_lens,  # [num_seqs] int32
                scale,
                md.backend_state,  # number of splits
                sliding_window=sliding_window,
            )
        return self._paged_attention(
            q,  # [num_tokens, num_heads, head_dim]
            kv_cache,
            md.block_table,  # [num_seqs, max_blocks_per_seq] int32
            md.seq_lens,  # [num_seqs] int32
            md.query_start_loc,  # [num_seqs + 1] int32
            scale,
            md.max_query_len,  # host int: sizes the grid without a device sync
            sliding_window=sliding_window,
        )
