"""The CPU linear kernels a quantized model can run on, by batch rows, at SmolLM2-135M's
shapes: fp32 (MKL, weight pre-packed: today's exact path), dense bf16, torch's packed
int4 (group 32) and int8 weight-only kernels, and our int4 kernel (int8 activations, VNNI:
kernels/cpu_int4_linear.py) where it is built. Where the packed kernels stop winning sets
engine/models/quantized.py's PACKED_MAX_ROWS; how far they fall behind beyond it is why
a dense bf16 copy serves prefill and big batches.

    python benchmarks/quantized_linear.py

Writes benchmarks/results/quantized_linear_<tag>.json and .md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu_int4_linear

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHAPES = {"qkv 576->960": (576, 960), "gate_up 576->3072": (576, 3072),
          "down 1536->576": (1536, 576), "head 576->49152": (576, 49152)}
ROWS = (1, 4, 8, 16, 32, 128, 512)


def _time_us(fn, budget_s: float = 0.3) -> float:
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def kernels(k: int, n: int):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    packed_fp32 = torch.ops.mkl._mkl_reorder_linear_weight(w, 256)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_zeros = torch.rand(k // 32, n, 2, generator=gen).bfloat16()
    int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, generator=gen).bfloat16()
    dense = w.bfloat16()
    vnni = (cpu_int4_linear.pack(codes, scales_zeros[..., 0].t().float(),
                                 scales_zeros[..., 1].t().float())
            if cpu_int4_linear.available() else None)
    return {
        "fp32 (MKL packed)": lambda x: (torch.ops.mkl._mkl_linear(x, packed_fp32, w, None,
                                                                  x.shape[0])
                                        if x.shape[0] <= 256 else F.linear(x, w)),
        "bf16 dense": lambda x: F.linear(x.bfloat16(), dense),
        "int4 packed": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), int4, 32, scales_zeros),
        "int8 packed": lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), int8, scales),
        **({"int4 VNNI (ours)": lambda x: cpu_int4_linear.int4_linear(x, vnni, n)}
           if vnni is not None else {}),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", default="cpu")
    args = p.parse_args(argv)
    results = []
    for shape, (k, n) in SHAPES.items():
        fns = kernels(k, n)
        for rows in ROWS:
            x = torch.randn(rows, k)
            entry = {"shape": shape, "rows": rows}
            for name, fn in fns.items():
                entry[name] = _time_us(lambda fn=fn, x=x: fn(x))
            results.append(entry)
            print(entry, flush=True)
    names = list(kernels(32, 16))
    lines = [f"# CPU linear kernels by batch rows: {args.tag}", "",
             "Command: `python benchmarks/quantized_linear.py`  ",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads  ",
             f"1-min load average at the end: {os.getloadavg()[0]:.2f}", "",
             "Microseconds per product (lower is better).", "",
             "| shape | rows | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for e in results:
        best = min(e[n] for n in names)
        cells = [f"**{e[n]:.0f}**" if e[n] == best else f"{e[n]:.0f}" for n in names]
        lines.append(f"| {e['shape']} | {e['rows']} | " + " | ".join(cells) + " |")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"quantized_linear_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
