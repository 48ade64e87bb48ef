"""Attention backends behind one interface: write the new K/V into their cache slots, then
attend each query over its request's cached context through the block table.

A layer's KV cache is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(keys, then values)."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from pagedserve.engine.attention.metadata import AttentionMetadata, SingleDecode
from pagedserve.engine.attention.torch_backend import TorchAttentionBackend, attend_single

__all__ = ["AttentionMetadata", "SingleDecode", "attend", "compiled_step",
           "get_attention_backend"]


def get_attention_backend(name: str, num_heads: int, num_kv_heads: int):
    if name == "torch":
        return TorchAttentionBackend(num_heads, num_kv_heads)
    if name == "triton":
        from pagedserve.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(num_heads, num_kv_heads)
    raise ValueError(f"unknown attention backend {name!r}; available: 'torch', 'triton'")


# The compiled forward (engine/compiled.py) treats attention as one opaque op per layer:
# its per-step metadata (python lists, the backend's buckets) is no graph input, so the op
# reads it from the step in progress on this thread instead.
_compiled_step = threading.local()


@contextmanager
def compiled_step(backend, md: AttentionMetadata):
    """Run a compiled forward over `md`: its paged_attention ops attend through backend."""
    _compiled_step.current = (backend, md)
    try:
        yield
    finally:
        _compiled_step.current = None


# Defined on torch.library's low-level API rather than with @custom_op: the dispatcher then
# calls the kernel straight from C++, without custom_op's Python layers (version bumps,
# redispatch), which cost ~4% of a single-stream decode step.
_library = torch.library.Library("pagedserve", "DEF")
_library.define("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, float scale, "
                "int? sliding_window) -> Tensor")


def _paged_attention(q, k, v, kv_cache, scale, sliding_window):
    """backend.forward(q, k, v, kv_cache, md, ...) of the compiled step in progress."""
    backend, md = _compiled_step.current
    return backend.forward(q, k, v, kv_cache, md, scale, sliding_window)


_library.impl("paged_attention", _paged_attention, "CPU")


@torch.library.register_fake("pagedserve::paged_attention", lib=_library)
def _(q, k, v, kv_cache, scale, sliding_window):
    return torch.empty_like(q)


def attend(backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
           md: AttentionMetadata | SingleDecode | None, scale: float,
           sliding_window: int | None):
    """A layer's attention: through the backend with the step's metadata md; inside a
    compiled forward, with md None, through the opaque paged_attention op, or, for a
    one-token step (md a SingleDecode; not with a sliding window), in the graph itself."""
    if md is None:
        return torch.ops.pagedserve.paged_attention(q, k, v, kv_cache, scale, sliding_window)
    if isinstance(md, SingleDecode):
        if sliding_window is not None:  # a Python constant while tracing: no cost per step
            raise ValueError("a SingleDecode attends over the whole context: no sliding window")
        return attend_single(q, k, v, kv_cache, md, scale)
    return backend.forward(q, k, v, kv_cache, md, scale, sliding_window)
