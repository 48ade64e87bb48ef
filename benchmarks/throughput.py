"""Offline throughput on a fixed synthetic workload: pagedserve against HF transformers'
`generate` (static batches, left-padded), each in its own process, in the same run.

    python benchmarks/throughput.py                       # embedded SmolLM2-135M, 64 prompts
    python benchmarks/throughput.py --num-prompts 16 --skip-hf   # quick look

Writes benchmarks/results/throughput_<tag>.json and .md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # runnable from a checkout without installing


def child_env(tree: Path = REPO_ROOT) -> dict[str, str]:
    """The environment for a child process that runs `tree`'s code: the tree first on
    PYTHONPATH, then whatever the caller had there (packages carried to a GPU machine)."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(tree) + (os.pathsep + path if path else ""))


def make_workload(num_prompts: int, input_range, output_range, vocab_size: int,
                  seed: int) -> list[dict]:
    """Random token prompts (ids from the ordinary part of the vocabulary) with their own
    output lengths; ignore_eos makes every request produce exactly that many tokens."""
    rng = random.Random(seed)
    low = 64 if vocab_size > 1000 else 3  # skip the special tokens at the start of the vocab
    workload = []
    for _ in range(num_prompts):
        n_in = rng.randint(*input_range)
        workload.append({
            "prompt_token_ids": [rng.randrange(low, vocab_size) for _ in range(n_in)],
            "max_tokens": rng.randint(*output_range),
        })
    return workload


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_workload(llm, workload: list[dict], on_step=None, on_start=None) -> tuple[float, int]:
    """Warm the engine up, then submit the whole workload (greedy, ignore_eos) and step it
    to completion; returns (seconds, output tokens). on_start() runs after the warm-up,
    on_step() after every timed step."""
    from pagedserve.engine import SamplingParams

    engine = llm.llm_engine
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": w["prompt_token_ids"][:32]} for w in workload[:4]], warm,
                 use_tqdm=False)
    if on_start is not None:
        on_start()
    start = time.perf_counter()
    for i, w in enumerate(workload):
        params = SamplingParams(max_tokens=w["max_tokens"], temperature=0, ignore_eos=True)
        engine.add_request(f"bench-{i}", {"prompt_token_ids": w["prompt_token_ids"]}, params)
    output_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                output_tokens += len(out.outputs[0].token_ids)
        if on_step is not None:
            on_step()
    return time.perf_counter() - start, output_tokens


def hf_run_workload(model, workload: list[dict], batch_size: int, device: str,
                    ) -> tuple[float, int]:
    """The workload through HF `generate` in static batches of batch_size, in arrival
    order, after a small warm-up; returns (seconds, output tokens a user of plain
    transformers actually gets: each request's own max_tokens)."""
    import torch

    model.generation_config.eos_token_id = None  # like ignore_eos: exact lengths
    pad_id = 0

    def generate(batch) -> int:
        # Left padding, as decoder-only generation needs; every row runs to the batch's
        # longest output.
        width = max(len(w["prompt_token_ids"]) for w in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):
            n = len(w["prompt_token_ids"])
            ids[row, width - n:] = torch.tensor(w["prompt_token_ids"])
            mask[row, width - n:] = 1
        max_new = max(w["max_tokens"] for w in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                           max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                           pad_token_id=pad_id)
        if device != "cpu":
            torch.cuda.synchronize()
        return sum(w["max_tokens"] for w in batch)

    generate([{"prompt_token_ids": w["prompt_token_ids"][:32], "max_tokens": 4}
              for w in workload[:4]])
    start = time.perf_counter()
    output_tokens = sum(generate(workload[i:i + batch_size])
                        for i in range(0, len(workload), batch_size))
    return time.perf_counter() - start, output_tokens


# ---- the two runners, each executed in a child process -----------------------------
def run_pagedserve(args, workload) -> dict:
    import torch

    from pagedserve.engine import LLM

    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=False,
              load_format=args.load_format, quantization=args.quantization,
              enforce_eager=args.enforce_eager)
    engine = llm.llm_engine
    waste_samples, batch_sizes = [], []

    def on_step():
        stats = engine.kv_cache_stats()
        if stats.allocated_slots:
            waste_samples.append(stats.waste)
        batch_sizes.append(len(engine.scheduler.running))

    elapsed, output_tokens = run_workload(llm, workload, on_step)
    steps = len(batch_sizes)
    return {
        "elapsed_s": elapsed,
        "output_tokens": output_tokens,
        "steps": steps,
        "mean_running_seqs": sum(batch_sizes) / max(len(batch_sizes), 1),
        "kv_waste_mean": sum(waste_samples) / max(len(waste_samples), 1),
        "kv_waste_max": max(waste_samples, default=0.0),
        "num_preemptions": engine.scheduler.num_preemptions,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mib": peak_rss_mib(),
        "dtype": str(engine.model_runner.dtype).removeprefix("torch."),
        "compiled": engine.model_runner.compiled is not None,
        "quantized": engine.model_runner.quantization_plan is not None,
    }


def run_hf(args, workload) -> dict:
    import torch
    import transformers

    from pagedserve.engine.loader.resolve import resolve_model

    model_dir = resolve_model(args.model)  # same weights as ours (a GGUF is converted once)
    dtype = {"auto": torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.load_format == "dummy":
        config = transformers.AutoConfig.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    model.eval()
    elapsed, output_tokens = hf_run_workload(model, workload, args.hf_batch_size, "cpu")
    return {"elapsed_s": elapsed, "output_tokens": output_tokens,
            "torch_threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib()}


# ---- orchestration ------------------------------------------------------------------
def add_child_args(parser: argparse.ArgumentParser) -> None:
    """The hidden options a benchmark passes to its own child processes."""
    parser.add_argument("--child", choices=["pagedserve", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--workload-file", type=Path, help=argparse.SUPPRESS)


def run_as_child(args, run_pagedserve, run_hf) -> bool:
    """In a child process (--child): run one engine on the workload file and print its
    result as the last stdout line. False in the parent."""
    if not args.child:
        return False
    workload = json.loads(args.workload_file.read_text())
    runner = run_pagedserve if args.child == "pagedserve" else run_hf
    print(json.dumps(runner(args, workload)))
    return True

def run_child(runner: str, args, workload_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", runner, "--workload-file", str(workload_path)]
    for key in ("model", "dtype", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory",
                "hf_batch_size", "load_format", "quantization"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{runner} run failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_config(model):
    from transformers import AutoConfig

    from pagedserve.engine.loader.resolve import resolve_model

    return AutoConfig.from_pretrained(resolve_model(model))


def linear_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of every GEMM a token goes through, per layer, as our model fuses them."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv, inter = heads * head_dim, kv_heads * head_dim, config.intermediate_size
    return [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter)]


def compute_floor(config, workload, dtype_name: str) -> dict:
    """FLOPs of the workload's GEMMs against this machine's measured GEMM rate in our
    activations' dtype (dense GEMMs: the quantized path's big batches run on dense bf16
    copies): the time no engine can beat on this CPU without skipping work."""
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    per_layer = sum(2 * o * i for o, i in linear_shapes(config))
    flops_token = per_layer * config.num_hidden_layers
    flops_head = 2 * config.hidden_size * config.vocab_size

    def rate(rows: int) -> float:
        xs = [(torch.randn(rows, i, dtype=dtype), torch.randn(o, i, dtype=dtype))
              for o, i in linear_shapes(config)]
        for x, w in xs:
            F.linear(x, w)
        reps = max(1, 2048 // rows)
        start = time.perf_counter()
        for _ in range(reps):
            for x, w in xs:
                F.linear(x, w)
        return reps * rows * per_layer / (time.perf_counter() - start)

    prompt = sum(len(w["prompt_token_ids"]) for w in workload)
    output = sum(w["max_tokens"] for w in workload)
    prefill_rate, decode_rate = rate(1024), rate(32)
    prefill_flops = prompt * flops_token + len(workload) * flops_head
    decode_flops = output * (flops_token + flops_head)
    return {
        "gflop_per_token": (flops_token + flops_head) / 1e9,
        "gemm_gflops_m1024": prefill_rate / 1e9,
        "gemm_gflops_m32": decode_rate / 1e9,
        "workload_tflop": (prefill_flops + decode_flops) / 1e12,
        # Prefill at large-GEMM speed, decode at the 32-row speed (the mean batch is ~32).
        "floor_s": prefill_flops / prefill_rate + decode_flops / decode_rate,
    }


def write_results(args, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = args.tag
    json_path = RESULTS_DIR / f"throughput_{tag}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    ours, hf = result["pagedserve"], result.get("hf_transformers")
    lines = [
        f"# Offline throughput: {tag}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; workload: {result['workload']}",
        "",
        "| engine | output tok/s | elapsed s | peak RSS MiB | KV waste (mean / max) |",
        "|---|---|---|---|---|",
        f"| pagedserve | {ours['output_tok_s']:.1f} | {ours['elapsed_s']:.1f} | "
        f"{ours['peak_rss_mib']:.0f} | {ours['kv_waste_mean']:.1%} / {ours['kv_waste_max']:.1%} |",
    ]
    if hf:
        lines.append(f"| HF transformers generate (batch {args.hf_batch_size}) | "
                     f"{hf['output_tok_s']:.1f} | {hf['elapsed_s']:.1f} | "
                     f"{hf['peak_rss_mib']:.0f} | n/a |")
        lines += ["", f"**Ratio: {result['ratio']:.2f}x** HF's useful output tok/s."]
    floor = result["gemm_floor"]
    lines += [
        "",
        f"pagedserve ran {ours['dtype']} activations"
        f"{', compiled forward' if ours['compiled'] else ', eager'}.",
        "",
        f"{'Dense ' if ours.get('quantized') else ''}GEMM floor on this machine: "
        f"{floor['workload_tflop']:.2f} TFLOP of linear layers "
        f"({floor['gflop_per_token']:.3f} GFLOP/token) at the measured {ours['dtype']} "
        f"{floor['gemm_gflops_m1024']:.0f} GFLOP/s (1024-row GEMMs, prefill) and "
        f"{floor['gemm_gflops_m32']:.0f} GFLOP/s (32-row GEMMs, decode) = "
        f"**{floor['floor_s']:.1f} s** minimum for this workload; output tok/s ceiling "
        f"{result['total_output_tokens'] / floor['floor_s']:.0f}."
        + (" The quantized path is not bound by it: its int4 kernel multiplies bytes "
           "(VNNI), at up to 32 rows reading 4-bit weights where a GEMM reads "
           f"{ours['dtype']} ones." if ours.get("quantized") else ""),
    ]
    md_path = RESULTS_DIR / f"throughput_{tag}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int4", "int8"],
                   help="pagedserve's (HF generate always runs the dequantized fp32 model)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--kv-cache-memory", type=int, default=2 << 30)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--enforce-eager", action="store_true",
                   help="pagedserve without its compiled CPU forward")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--tag", default="cpu_smollm2")
    add_child_args(p)
    args = p.parse_args()
    if run_as_child(args, run_pagedserve, run_hf):
        return

    config = load_config(args.model)
    workload = make_workload(args.num_prompts, args.input_len, args.output_len,
                             config.vocab_size, args.seed)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    workload_path = RESULTS_DIR / f".workload_{os.getpid()}.json"
    workload_path.write_text(json.dumps(workload))
    try:
        result = {
            "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "workload": (f"{args.num_prompts} prompts, input {args.input_len[0]}-"
                         f"{args.input_len[1]} tokens, output {args.output_len[0]}-"
                         f"{args.output_len[1]} tokens, ignore_eos, seed {args.seed}"),
            "total_prompt_tokens": sum(len(w["prompt_token_ids"]) for w in workload),
            "total_output_tokens": sum(w["max_tokens"] for w in workload),
        }
        ours = run_child("pagedserve", args, workload_path)
        ours["output_tok_s"] = ours["output_tokens"] / ours["elapsed_s"]
        result["pagedserve"] = ours
        result["gemm_floor"] = compute_floor(config, workload, ours["dtype"])
        print(f"pagedserve: {ours['output_tok_s']:.1f} output tok/s "
              f"({ours['elapsed_s']:.1f}s, KV waste {ours['kv_waste_mean']:.1%})", flush=True)
        if not args.skip_hf:
            hf = run_child("hf", args, workload_path)
            hf["output_tok_s"] = hf["output_tokens"] / hf["elapsed_s"]
            result["hf_transformers"] = hf
            result["ratio"] = ours["output_tok_s"] / hf["output_tok_s"]
            print(f"HF transformers: {hf['output_tok_s']:.1f} output tok/s ({hf['elapsed_s']:.1f}s)"
                  f"; ratio {result['ratio']:.2f}x", flush=True)
    finally:
        workload_path.unlink(missing_ok=True)
    print(f"wrote {write_results(args, result)}")


if __name__ == "__main__":
    main()
