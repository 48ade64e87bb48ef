"""CUDA graphs for decode steps: the model's forward is captured once per batch size in
CAPTURE_SIZES (up to max_num_seqs) and replayed with the step's inputs copied into static
buffers, so a decode step costs one graph launch instead of a few hundred kernel launches.

A batch is padded up to the next captured size. Padding rows are requests with an empty
context (seq_len 0) and slot -1: the cache write skips them and attention gives them
zeros, so they change nothing for the real rows. Anything that is not a decode-only batch
(or is larger than the largest graph) runs eagerly."""

from __future__ import annotations

import bisect
import logging
import time

import torch

from pagedserve.engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (as vLLM does): padding
    wastes at most 7 rows and there are ~max_num_seqs / 8 graphs to capture."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphRunner:
    def __init__(self, model, attn_backend, kv_caches: list[torch.Tensor], max_num_seqs: int,
                 max_model_len: int, block_size: int, device: torch.device) -> None:
        self.model = model
        self.attn_backend = attn_backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        max_bs = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        i32 = dict(dtype=torch.int32, device=device)
        # Static inputs every graph reads (graph b reads rows [:b]).
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_bs, **i32)
        self.block_table = torch.zeros(max_bs, max_blocks, **i32)
        # One query token per request, always: query_start_loc is fixed.
        self.query_start_loc = torch.arange(max_bs + 1, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        md = AttentionMetadata(
            num_tokens=batch_size,
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[:batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_table=self.block_table[:batch_size],
            block_size=self.block_size,
            query_start_loc_cpu=list(range(batch_size + 1)),
            query_lens_cpu=[1] * batch_size,
            # Launch parameters that depend on context length are sized for the longest
            # context a replay may see.
            seq_lens_cpu=[self.max_model_len] * batch_size,
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )
        self.attn_backend.prepare(md)
        return md

    def forward(self, batch_size: int) -> torch.Tensor:
        """The model over the static buffers' first batch_size rows: what a graph records."""
        return self.model(self.input_ids[:batch_size], self.positions[:batch_size],
                          self.kv_caches, self._metadata(batch_size))

    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # Largest first: smaller graphs then reuse the pool's blocks.
        for batch_size in reversed(self.sizes):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: triton compiles, cuBLAS picks its kernels
                    self.forward(batch_size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch_size] = self.forward(batch_size)
            self.graphs[batch_size] = graph
        torch.cuda.synchronize()
        logger.info("Captured %d CUDA graphs for decode batches of 1..%d in %.1fs",
                    len(self.sizes), self.max_batch_size, time.perf_counter() - start)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata,
            ) -> torch.Tensor:
        """The decode step's hidden states [num_seqs, hidden]; md is the eager metadata of a
        decode-only batch of at most max_batch_size requests."""
        n = md.num_tokens
        padded = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(md.slot_mapping)
        self.seq_lens[:n].copy_(md.seq_lens)
        cols = md.block_table.shape[1]
        self.block_table[:n, :cols].copy_(md.block_table)
        if padded > n:
            self.slot_mapping[n:padded].fill_(-1)
            self.seq_lens[n:padded].fill_(0)
        self.graphs[padded].replay()
        return self.outputs[padded][:n]
