"""Stream tensors out of an HF checkpoint directory, one at a time (no full copy in memory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm


def iterate_safetensors(model_dir: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {model_dir}; pagedserve loads safetensors or GGUF"
        )
    for path in tqdm(files, desc="Loading safetensors", unit="file", disable=len(files) < 2):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights at the model's shapes (benchmarks at real shapes, no checkpoint).
    Small values keep activations finite through many layers; norms stay at one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                values = torch.empty(param.shape, dtype=torch.float32).uniform_(-0.02, 0.02, generator=gen)
                param.copy_(values)
