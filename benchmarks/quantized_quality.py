"""How closely the quantized CPU path follows the exact one: the embedded SmolLM2 Q4_1 GGUF
served in its own 4-bit scheme (--quantization auto) against the same file dequantized to
fp32 (--quantization none, which gives HF's greedy tokens), on 20 varied prompts.

    python benchmarks/quantized_quality.py [--max-tokens 64] [--serve-args ...]

Reports greedy agreement (the tokens both paths generate before they first differ) and,
teacher-forced on the exact path's tokens, how often the quantized path's top-1 is the same
token and the largest gap between the two paths' logprobs of that token.
Writes benchmarks/results/quantized_quality_<tag>.json and .md."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from pagedserve.engine import LLM, SamplingParams

RESULTS_DIR = Path(__file__).resolve().parent / "results"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "To make a good cup of tea, you should",
    "The three laws of thermodynamics are",
    "SELECT name, COUNT(*) FROM orders",
    "Photosynthesis is the process by which",
    "Here is a list of the planets in our solar system:\n1.",
    "La tour Eiffel est",
    "Q: What is 12 times 7?\nA:",
    "The main causes of the First World War were",
    "import numpy as np\n\ndef normalize(x):",
    "Dear hiring manager,\n\nI am writing to apply for",
    "The best way to learn a new language is",
    "In 1969, the Apollo 11 mission",
    "A haiku about autumn:\n",
    "The difference between a list and a tuple in Python is",
    "Water boils at 100 degrees Celsius because",
    "My favourite recipe for pancakes:\nIngredients:",
    "The stock market crashed in 1929, and",
]


def run_path(quantization: str, prompts, max_tokens: int, extra: dict) -> tuple[dict, LLM]:
    """Greedy generations of one path, and the engine that made them."""
    llm = LLM(quantization=quantization, **extra)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    result = {
        "prompt_ids": [o.prompt_token_ids for o in outs],
        "tokens": [o.outputs[0].token_ids for o in outs],
        "logprobs": [[next(iter(e.values())).logprob for e in o.outputs[0].logprobs]
                     for o in outs],
        "texts": [o.outputs[0].text for o in outs],
        "elapsed_s": elapsed,
    }
    return result, llm


def teacher_forced(llm: LLM, prompt_ids, tokens) -> tuple[list[int], list[float]]:
    """The quantized path's top-1 and its logprob of the given token at each of `tokens`."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0)
    out = llm.generate([{"prompt_token_ids": prompt_ids + tokens}], params, use_tqdm=False)[0]
    top, chosen = [], []
    for position, token in enumerate(tokens, start=len(prompt_ids)):
        entry = out.prompt_logprobs[position]
        top.append(max(entry.items(), key=lambda item: item[1].logprob)[0])
        chosen.append(entry[token].logprob)
    return top, chosen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quantization", default="auto", help="the quantized path's setting")
    p.add_argument("--dense-copy", choices=["auto", "on", "off"], default="auto",
                   help="off: every product on the packed kernels, as decode steps of up to "
                        "8 rows run (the prompts here are batched, and prefill is many rows)")
    p.add_argument("--dtype", default="auto",
                   help="the quantized path's activations (auto: bf16 where the CPU has "
                        "AVX512-BF16)")
    p.add_argument("--kv-cache-dtype", default="auto", help="the quantized path's KV cache")
    p.add_argument("--tag", default="cpu_smollm2")
    args = p.parse_args(argv)
    extra = dict(kv_cache_memory=512 << 20)
    dense = {"auto": None, "on": True, "off": False}[args.dense_copy]

    exact, exact_llm = run_path("none", PROMPTS, args.max_tokens, extra)
    del exact_llm  # one model in memory at a time
    gc.collect()
    quant, quant_llm = run_path(args.quantization, PROMPTS, args.max_tokens,
                                dict(extra, quantized_dense_copy=dense, dtype=args.dtype,
                                     kv_cache_dtype=args.kv_cache_dtype))
    runner = quant_llm.llm_engine.model_runner
    activations = str(runner.dtype).removeprefix("torch.")
    kv_cache = str(runner.kv_cache_dtype).removeprefix("torch.")
    rows, forced_agree, forced_total, max_gap = [], 0, 0, 0.0
    for i, prompt in enumerate(PROMPTS):
        a, b = exact["tokens"][i], quant["tokens"][i]
        same = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        top, chosen = teacher_forced(quant_llm, exact["prompt_ids"][i], a)
        agree = sum(t == x for t, x in zip(top, a))
        gap = max(abs(c - e) for c, e in zip(chosen, exact["logprobs"][i]))
        forced_agree, forced_total = forced_agree + agree, forced_total + len(a)
        max_gap = max(max_gap, gap)
        rows.append({"prompt": prompt, "greedy_tokens_before_divergence": same,
                     "teacher_forced_top1_agreement": agree / len(a), "max_logprob_gap": gap,
                     "exact_text": exact["texts"][i], "quantized_text": quant["texts"][i]})
    n = args.max_tokens
    summary = {
        "prompts": len(PROMPTS), "max_tokens": n,
        "identical_generations": sum(r["greedy_tokens_before_divergence"] == n for r in rows),
        "mean_greedy_tokens_before_divergence":
            sum(r["greedy_tokens_before_divergence"] for r in rows) / len(rows),
        "greedy_token_agreement": sum(r["greedy_tokens_before_divergence"] for r in rows)
        / (n * len(rows)),
        "teacher_forced_top1_agreement": forced_agree / forced_total,
        "max_top1_logprob_gap": max_gap,
        "exact_elapsed_s": exact["elapsed_s"], "quantized_elapsed_s": quant["elapsed_s"],
    }
    result = {
        "command": "python benchmarks/quantized_quality.py " + shlex.join(
            sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "quantization": args.quantization, "dense_copy": args.dense_copy,
        "activations": activations, "kv_cache": kv_cache,
        "summary": summary, "rows": rows,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"quantized_quality_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Quantized path against the exact path: {args.tag}", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Quantized: `--quantization {args.quantization} --quantized-dense-copy "
        f"{args.dense_copy} --dtype {args.dtype} --kv-cache-dtype {args.kv_cache_dtype}` "
        f"(SmolLM2-135M-Instruct Q4_1 GGUF: int4 layers, refined head; {activations} "
        f"activations, {kv_cache} KV cache); "
        "exact: `--quantization none` (fp32, HF's greedy tokens)", "",
        "| measure | value |", "|---|---|",
        f"| greedy generations identical over {n} tokens | "
        f"{summary['identical_generations']} / {len(rows)} |",
        f"| greedy tokens before the first difference (mean) | "
        f"{summary['mean_greedy_tokens_before_divergence']:.1f} of {n} |",
        f"| greedy token agreement (identical prefix / all) | "
        f"{summary['greedy_token_agreement']:.1%} |",
        f"| teacher-forced top-1 agreement | {summary['teacher_forced_top1_agreement']:.1%} |",
        f"| largest gap in the exact top-1's logprob | {summary['max_top1_logprob_gap']:.3f} |",
        "", "| prompt | tokens before divergence | teacher-forced top-1 | max logprob gap |",
        "|---|---|---|---|",
        *[f"| {json.dumps(r['prompt'])[1:-1][:48]} | {r['greedy_tokens_before_divergence']} | "
          f"{r['teacher_forced_top1_agreement']:.0%} | {r['max_logprob_gap']:.3f} |"
          for r in rows],
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[6:13]))
    print(f"wrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
