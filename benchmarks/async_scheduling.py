"""Async scheduling on the CPU: the same decode workload through an engine that schedules
and launches step N+1 before processing step N's outputs (its runner on its own thread) and
through one that does not, alternating in one process, on the embedded model.

    python benchmarks/async_scheduling.py                   # batch 1/8/32/64, 64 tokens each
    python benchmarks/async_scheduling.py --batches 8 --repeats 2   # quick look

Each request streams deltas with text, as the server asks for them. Reported per batch:
output tokens/s and the median decode step (ms), each engine, and async / sync. Writes
benchmarks/results/async_scheduling_<tag>.json and .md."""

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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout, uninstalled


def run_batch(engine, prompts: list[list[int]], output_len: int) -> dict:
    """All prompts at once, greedy, to exactly output_len tokens each: (tokens/s over the
    whole run, median step time once every request decodes)."""
    from pagedserve.engine import SamplingParams
    from pagedserve.engine.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=output_len,
                            output_kind=RequestOutputKind.DELTA)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b{i}", prompt, params)
    started, tokens, decode_steps = set(), 0, []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = engine.step()
        if len(started) == len(prompts):
            decode_steps.append(time.perf_counter() - step_start)
        for out in outputs:
            started.add(out.request_id)
            tokens += sum(len(c.token_ids) for c in out.outputs)
    elapsed = time.perf_counter() - start
    assert tokens == len(prompts) * output_len
    return {"tokens_per_s": tokens / elapsed, "step_ms": 1e3 * statistics.median(decode_steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per engine")
    parser.add_argument("--tag", default="cpu_smollm2")
    args = parser.parse_args()

    import torch

    from pagedserve.engine.config import EngineConfig
    from pagedserve.engine.llm_engine import LLMEngine

    def engine(async_scheduling: bool) -> LLMEngine:
        return LLMEngine(EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048,
                                      enable_prefix_caching=False,
                                      async_scheduling=async_scheduling))

    engines = {"sync": engine(False), "async": engine(True)}
    vocab = engines["sync"].model_info.vocab_size
    rng = random.Random(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [[rng.randrange(64, vocab) for _ in range(args.input_len)]
                   for _ in range(batch)]
        runs = {name: [] for name in engines}
        for eng in engines.values():  # warm-up: first touch of the KV cache, kernels
            run_batch(eng, prompts[:2], 4)
        for _ in range(args.repeats):
            for name, eng in engines.items():
                runs[name].append(run_batch(eng, prompts, args.output_len))
        row = {"batch": batch}
        for name, results in runs.items():
            row[name] = {key: statistics.median(r[key] for r in results)
                         for key in ("tokens_per_s", "step_ms")}
        row["speedup"] = row["async"]["tokens_per_s"] / row["sync"]["tokens_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    load = os.getloadavg()
    report = {
        "command": "python benchmarks/async_scheduling.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch threads {torch.get_num_threads()}, load {load[0]:.2f}",
        "input_len": args.input_len, "output_len": args.output_len,
        "repeats": args.repeats, "rows": rows,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"async_scheduling_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Async scheduling on the CPU (embedded SmolLM2-135M)", "",
        f"`{report['command']}` — {report['machine']}; {args.input_len}-token prompts, "
        f"{args.output_len} output tokens each, streamed as text deltas; median of "
        f"{args.repeats} alternating runs.", "",
        "| batch | sync tok/s | async tok/s | async / sync | sync step ms | async step ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['sync']['tokens_per_s']:.1f} | "
                     f"{r['async']['tokens_per_s']:.1f} | {r['speedup']:.3f} | "
                     f"{r['sync']['step_ms']:.1f} | {r['async']['step_ms']:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
