"""The per-step inputs every attention backend takes (apart from the backends, so that they
and the dispatch in engine/attention/__init__.py import them without a cycle)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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


class SingleDecode(NamedTuple):
    """A one-token step's attention inputs as tensors, so that a compiled graph takes them
    as inputs and attends inside the graph (engine/compiled.py)."""

    # [2] int64: the new token's rows in a cache viewed as [2 * slots, Hkv, D] (its key's
    # slot, then its value's, one cache's worth of slots further)
    write_rows: torch.Tensor
    context_slots: torch.Tensor  # [context length] int32: its context's slots, itself last
