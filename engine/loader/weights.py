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
    handles = [safe_open(str(path), framework="pt") for path in files]
    total = sum(len(list(h.keys())) for h in handles)
    with tqdm(total=total, desc="Loading weights", unit="tensor", leave=False) as bar:
        for handle in handles:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                bar.update(1)
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
                values = torch.empty(param.shape, dtype=torch.float32)
                values.uniform_(-0.02, 0.02, generator=gen)
                param.copy_(values)
