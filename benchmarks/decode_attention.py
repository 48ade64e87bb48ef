"""Decode step time on a CPU with the C++ decode attention kernel against the SDPA path it
replaced, the two alternating every few steps in one process (this host's speed drifts by
tens of percent over a minute, which separate runs would read as a difference).

    python benchmarks/decode_attention.py                     # batch 1, 8, 32
    python benchmarks/decode_attention.py --batches 32 --tag quick

Embedded SmolLM2-135M Q4_1, greedy, prompts of 64-512 random tokens. Batch 1 switches the
compiled one-token graph's attention (both graphs stay compiled, dynamo picks by a guard);
larger batches switch the backend's decode path. Writes
benchmarks/results/decode_attention_<tag>.json and .md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout


def measure(batch: int, steps: int, block: int = 8) -> dict:
    from pagedserve.engine.attention import torch_backend
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.sampling_params import SamplingParams

    llm = LLM(max_num_seqs=max(batch, 8))
    engine = llm.llm_engine
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.randrange(100, 40000)
                                     for _ in range(rng.randrange(64, 512))], params)
    while engine.scheduler.waiting or any(  # until every request decodes
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    built = torch_backend.decode_kernel_available
    times: dict[str, list[float]] = {"kernel": [], "sdpa": []}
    for n in range(steps):
        use = (n // block) % 2 == 0
        torch_backend._single_decode_kernel = use and built()
        torch_backend.decode_kernel_available = built if use else (lambda: False)
        start = time.perf_counter()
        engine.step()
        if n % block >= 2:  # not the steps right after a switch
            times["kernel" if use else "sdpa"].append(time.perf_counter() - start)
    torch_backend.decode_kernel_available = built
    return {path: 1e3 * statistics.median(values) for path, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--tag", default="cpu_smollm2")
    args = parser.parse_args()
    rows = [dict(batch=b, **measure(b, args.steps)) for b in map(int, args.batches.split(","))]
    load = os.getloadavg()
    report = {"command": "python benchmarks/decode_attention.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                         f"cores, load {load[0]:.2f}", "rows": rows}
    lines = ["# Decode step: CPU attention kernel vs SDPA (alternating in one process)", "",
             f"`{report['command']}` — {report['machine']}; median ms a step.", "",
             "| batch | SDPA path | kernel | kernel / SDPA |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['sdpa']:.2f} | {r['kernel']:.2f} | "
              f"{r['kernel'] / r['sdpa']:.2f} |" for r in rows]
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"decode_attention_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
