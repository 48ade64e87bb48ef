"""End-to-end offline throughput on a GPU with dummy weights at real shapes (configs in
benchmarks/configs/, no weights needed): pagedserve against HF transformers' `generate`
(static batches, left-padded) on the same workload, each in its own process, same run.

    python benchmarks/gpu_throughput.py --config benchmarks/configs/qwen3-0.6b.json
    python benchmarks/gpu_throughput.py --config benchmarks/configs/llama-3.2-1b.json \\
        --num-prompts 256 --output-len 256

Also reports decode step time against the memory-bandwidth floor: a decode step must at
least read every weight once and each request's KV context once, at the device's measured
copy bandwidth. Prints one JSON line; benchmarks/device_check.sh collects them."""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.throughput import (  # noqa: E402
    add_child_args,
    child_env,
    hf_run_workload,
    make_workload,
    run_as_child,
    run_workload,
)


def run_pagedserve(args, workload) -> dict:
    import torch

    from pagedserve.engine import LLM

    llm = LLM(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, enable_prefix_caching=False,
              enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling)
    engine = llm.llm_engine
    runner = engine.model_runner
    steps = []  # (seconds, tokens, requests, kv tokens read, decode-only)
    schedule, step = engine.scheduler.schedule, engine.step
    scheduled = collections.deque(maxlen=2)

    def recording_schedule():
        so = schedule()
        scheduled.append(so)
        return so

    def timed_step():
        # A step's wall time, from the host. With async scheduling a call launches one step
        # and waits for the one before, which is what its time measures: the period at
        # which steps complete (the host's work hides behind the device's, or shows here).
        start = time.perf_counter()
        outputs = step()
        seconds = time.perf_counter() - start
        back = 2 if engine.async_scheduling else 1
        so = scheduled[-back] if len(scheduled) >= back else None
        counts = list(so.num_scheduled_tokens.values()) if so is not None else []
        if counts:
            computed = ([r.num_computed_tokens for r in so.scheduled_new_reqs]
                        + so.scheduled_cached_reqs.num_computed_tokens)
            steps.append((seconds, sum(counts), len(counts),
                          sum(computed) + sum(counts), max(counts) == 1))
        return outputs

    engine.scheduler.schedule, engine.step = recording_schedule, timed_step
    elapsed, output_tokens = run_workload(llm, workload, on_start=steps.clear)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    return {
        "elapsed_s": elapsed, "output_tokens": output_tokens, "steps": steps,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": runner.block_bytes() // runner.block_size,
        "num_kv_blocks": runner.num_blocks, "cuda_graphs": runner.cuda_graphs is not None,
        "attention_backend": runner.attn_backend.name,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "preemptions": engine.scheduler.num_preemptions,
        "async_scheduling": engine.async_scheduling,
    }


def run_hf(args, workload) -> dict:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(args.model_dir)
    with torch.device("cuda"):  # random init on the GPU: seconds faster than on the CPU
        model = transformers.AutoModelForCausalLM.from_config(
            config, torch_dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    elapsed, output_tokens = hf_run_workload(model, workload, args.hf_batch_size, "cuda")
    return {"elapsed_s": elapsed, "output_tokens": output_tokens,
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def run_child(runner: str, args, workload_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", runner, "--workload-file", str(workload_path),
           "--model-dir", args.model_dir, "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--max-model-len", str(args.max_model_len), "--hf-batch-size", str(args.hf_batch_size)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if args.async_scheduling is not None:
        cmd.append("--async-scheduling" if args.async_scheduling else "--no-async-scheduling")
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=child_env())
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"{runner} run failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decode_step_summary(steps, weight_bytes: int, kv_bytes_per_token: int, bandwidth: float):
    """Decode-only steps grouped by batch size: mean time against the bandwidth floor."""
    groups: dict[str, list] = {}
    for seconds, _tokens, reqs, kv_tokens, decode_only in steps:
        if not decode_only:
            continue
        key = ("1-31" if reqs < 32 else "32-127" if reqs < 128 else "128-255" if reqs < 256
               else "256+")
        groups.setdefault(key, []).append((seconds, reqs, kv_tokens))
    summary = {}
    for key, rows in groups.items():
        mean_s = sum(r[0] for r in rows) / len(rows)
        floor_s = sum((weight_bytes + r[2] * kv_bytes_per_token) / bandwidth
                      for r in rows) / len(rows)
        summary[key] = {"steps": len(rows), "mean_batch": sum(r[1] for r in rows) / len(rows),
                        "mean_kv_tokens": sum(r[2] for r in rows) / len(rows),
                        "mean_step_ms": mean_s * 1e3, "floor_ms": floor_s * 1e3,
                        "floor_fraction": floor_s / mean_s}
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, help="a model's config.json (benchmarks/configs/)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, nargs=2, default=(128, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="default: the engine's (on for GPUs)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--bandwidth-gb-s", type=float, default=None,
                   help="measured copy bandwidth (default: measure it here)")
    add_child_args(p)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if run_as_child(args, run_pagedserve, run_hf):
        return

    config = json.loads(args.config.read_text())
    workload = make_workload(args.num_prompts, args.input_len, (args.output_len,) * 2,
                             config["vocab_size"], args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = tmp
        shutil.copy(args.config, Path(tmp) / "config.json")
        workload_path = Path(tmp) / "workload.json"
        workload_path.write_text(json.dumps(workload))
        if args.bandwidth_gb_s is None:
            from benchmarks.gpu_checks import copy_bandwidth

            args.bandwidth_gb_s = copy_bandwidth() / 1e9
        ours = run_child("pagedserve", args, workload_path)
        hf = None if args.skip_hf else run_child("hf", args, workload_path)
    ours["output_tok_s"] = ours["output_tokens"] / ours["elapsed_s"]
    steps = ours.pop("steps")
    result = {
        "model": args.config.stem,
        "command": "python benchmarks/gpu_throughput.py " + " ".join(sys.argv[1:]),
        "workload": (f"{args.num_prompts} prompts, input {args.input_len[0]}-{args.input_len[1]} "
                     f"tokens, output {args.output_len}, ignore_eos, seed {args.seed}, bf16, "
                     "dummy weights"),
        "copy_bandwidth_gb_s": args.bandwidth_gb_s,
        "pagedserve": ours,
        "decode_steps_vs_floor": decode_step_summary(
            steps, ours["weight_bytes"], ours["kv_bytes_per_token"], args.bandwidth_gb_s * 1e9),
        "step_count": len(steps),
        "step_time_total_s": sum(s[0] for s in steps),
    }
    if hf is not None:
        hf["output_tok_s"] = hf["output_tokens"] / hf["elapsed_s"]
        result["hf_transformers"] = hf
        result["ratio"] = ours["output_tok_s"] / hf["output_tok_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
