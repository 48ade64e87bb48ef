"""Tensor parallelism's share of the model: which slice of each weight a rank holds, and
the collectives that join the slices (torch.distributed: gloo on CPUs, NCCL on GPUs).

Megatron's split, as vLLM does it: attention heads and the MLP's intermediate features are
divided among the ranks (column-parallel QKV and gate/up, row-parallel o and down, each
followed by one all-reduce); the vocabulary is divided for the embedding (an all-reduce of
the masked lookups) and the head (an all-gather of the logits). KV heads are divided too,
or replicated when there are fewer of them than ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This process's place among `size` ranks; size 1: no parallelism, no collectives."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside 0..{self.size - 1}")

    # ---- the split --------------------------------------------------------------------
    def split(self, total: int, what: str) -> int:
        """This rank's share of `total` (heads, features), which must divide evenly."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) must be divisible by "
                             f"tensor_parallel_size ({self.size})")
        return total // self.size

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, how many) this rank holds. With fewer KV heads than ranks each
        rank holds one, shared by size / num_kv_heads ranks: the one its query heads use."""
        if num_kv_heads >= self.size:
            per_rank = self.split(num_kv_heads, "num_key_value_heads")
            return self.rank * per_rank, per_rank
        if self.size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size ({self.size}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads}) when it is larger")
        return self.rank * num_kv_heads // self.size, 1

    def vocab_rows(self, vocab_size: int) -> tuple[int, int]:
        """(first row, rows per rank) of the embedding and the head: the vocabulary padded
        to a multiple of the size; the last rank's padding rows are zero."""
        per_rank = -(-vocab_size // self.size)
        return self.rank * per_rank, per_rank

    # ---- the collectives ----------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x, concatenated along the last dimension in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    def min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's value (KV cache blocks: each rank's own budget);
        `device`: where the group's backend takes tensors (a GPU for NCCL)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = TensorParallel()


def check_tensor_parallel(hf_config, size: int) -> None:
    """ValueError, before any worker starts, if the model can't be split over `size` ranks."""
    tp = TensorParallel(0, size)
    num_heads = hf_config.num_attention_heads
    tp.split(num_heads, "num_attention_heads")
    tp.kv_heads(getattr(hf_config, "num_key_value_heads", None) or num_heads)
    tp.split(hf_config.intermediate_size, "intermediate_size")


def shard_checkpoint_tensor(name: str, tensor: torch.Tensor, tp: TensorParallel,
                            config) -> torch.Tensor:
    """This rank's part of a full HF-named checkpoint tensor of the Llama family."""
    if tp.size == 1:
        return tensor
    leaf = name.rsplit(".", 2)[-2:]  # e.g. ["q_proj", "weight"]
    module, kind = leaf if len(leaf) == 2 else (leaf[0], "")
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    if module in ("embed_tokens", "lm_head"):
        start, rows = tp.vocab_rows(tensor.shape[0])
        part = tensor[start:start + rows]
        if part.shape[0] < rows:  # the last rank's padding
            pad = tensor.new_zeros(rows - part.shape[0], *tensor.shape[1:])
            part = torch.cat([part, pad])
        return part
    if module == "q_proj":
        rows = tp.split(num_heads, "num_attention_heads") * head_dim
        return tensor[tp.rank * rows:(tp.rank + 1) * rows]
    if module in ("k_proj", "v_proj"):
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        first, count = tp.kv_heads(num_kv_heads)
        return tensor[first * head_dim:(first + count) * head_dim]
    if module in ("gate_proj", "up_proj"):
        rows = tp.split(config.intermediate_size, "intermediate_size")
        return tensor[tp.rank * rows:(tp.rank + 1) * rows]
    if module in ("o_proj", "down_proj"):
        if kind == "bias":  # added once, after the all-reduce would sum it size times
            return tensor if tp.rank == 0 else torch.zeros_like(tensor)
        cols = tp.split(tensor.shape[1], f"{module}'s input features")
        return tensor[:, tp.rank * cols:(tp.rank + 1) * cols]
    return tensor  # norms: every rank holds them whole
