"""The quantized head's two fast passes on the embedded model (SmolLM2 Q4_1): int8 (any
step) against int4 (steps that read only the best token, RefinedHead's `argmax_only`).

    python benchmarks/head_pass.py [--steps 256] [--requests 5]

1. The head alone at one row, weights streaming from memory (median of 30).
2. Single-stream greedy decode steps (`LLMEngine.step`, compiled forward), the two passes
   alternating every 8 steps in one process: the host's drift hits both alike.
3. Quality, on the hidden states of 40 greedy generations x 64 tokens: each pass's largest
   logit error, the rank of the exact best token in each pass (the head refines the
   top 64 exactly), the refined pick's agreement with the fp32 head, and the largest gap of
   the top-20 logprobs (what a pass would give were its tail used for logprobs).
Writes benchmarks/results/head_pass_<tag>.json and .md."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantized_quality import PROMPTS  # noqa: E402
from serve import RESULTS_DIR, synthetic_requests  # noqa: E402

from pagedserve.engine import LLM, SamplingParams  # noqa: E402
from pagedserve.engine.models.quantized import PACKED_MAX_ROWS  # noqa: E402

PASSES = ("int8", "int4")


def _median_ms(fn, n: int = 30) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def head_alone(head) -> dict:
    x = torch.randn(1, head.weight.shape[1])
    return {name: _median_ms(lambda f=fast: f(x)) for name, fast in
            (("int8", head.fast), ("int4", head.argmax_fast))}


def decode_steps(llm: LLM, head, num_requests: int, num_steps: int) -> dict:
    """Median step time of each pass, alternating every 8 steps."""
    engine = llm.llm_engine
    argmax_fast = head.argmax_fast
    times = {name: [] for name in PASSES}
    params = SamplingParams(temperature=0.0, max_tokens=num_steps, ignore_eos=True)
    for i, spec in enumerate(synthetic_requests(num_requests, 200, num_steps, seed=1)):
        engine.add_request(f"decode-{i}", spec.prompt, params)
        step = 0
        while engine.has_unfinished_requests():
            name = PASSES[(step // 8) % 2]
            head.argmax_fast = argmax_fast if name == "int4" else None  # None: int8
            start = time.perf_counter()
            engine.step()
            if step > 2:  # past the prefill
                times[name].append(time.perf_counter() - start)
            step += 1
    head.argmax_fast = argmax_fast
    return {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}


def quality(llm: LLM, head) -> dict:
    captured = []
    forward = head.forward

    def spy(hidden, argmax_only=False):
        captured.append(hidden.detach().float().clone())
        return forward(hidden, argmax_only)

    head.forward = spy
    try:
        llm.generate(PROMPTS + [p + " and then" for p in PROMPTS],
                     SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                     use_tqdm=False)
    finally:
        head.forward = forward
    hidden = torch.cat(captured)
    exact = hidden @ head.weight.t()
    best = exact.argmax(-1)
    top = exact.log_softmax(-1).topk(20, -1)
    out = {"rows": len(hidden)}
    for name, fast, argmax_only in (("int8", head.fast, False),
                                    ("int4", head.argmax_fast, True)):
        chunks = range(0, len(hidden), PACKED_MAX_ROWS)
        fast_logits = torch.cat([fast(hidden[i:i + PACKED_MAX_ROWS]).float() for i in chunks])
        refined = torch.cat([head(hidden[i:i + PACKED_MAX_ROWS], argmax_only) for i in chunks])
        rank = (fast_logits > fast_logits.gather(1, best[:, None])).sum(-1)
        out[name] = {
            "max_logit_error": round((fast_logits - exact).abs().max().item(), 3),
            "max_rank_of_exact_best": int(rank.max()),
            "pick_agreement": (refined.argmax(-1) == best).float().mean().item(),
            "max_top20_logprob_gap": round((refined.log_softmax(-1).gather(1, top.indices)
                                            - top.values).abs().max().item(), 4),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--tag", default="cpu_smollm2")
    args = parser.parse_args(argv)
    llm = LLM()
    head = llm.llm_engine.model_runner.model.refined_head
    if head is None or head.argmax_fast is None:
        raise SystemExit("the model has no quantized head with an int4 pass")
    result = {"command": "python benchmarks/head_pass.py " + " ".join(argv or sys.argv[1:]),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "head_alone_ms": head_alone(head),
              "decode_step_median_ms": decode_steps(llm, head, args.requests, args.steps),
              "quality": quality(llm, head)}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"head_pass_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    q, alone, steps = result["quality"], result["head_alone_ms"], result["decode_step_median_ms"]
    lines = [f"# The quantized head's passes: {args.tag}", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
             "| | int8 pass (any step) | int4 pass (argmax-only steps) |", "|---|---|---|",
             f"| head alone, 1 row (ms) | {alone['int8']:.2f} | {alone['int4']:.2f} |",
             f"| single-stream decode step, median (ms) | {steps['int8']:.2f} | "
             f"{steps['int4']:.2f} |"]
    for key, label in (("max_logit_error", "largest logit error"),
                       ("max_rank_of_exact_best", "worst rank of the exact best token"),
                       ("pick_agreement", "refined pick = fp32 head's"),
                       ("max_top20_logprob_gap", "largest top-20 logprob gap, refined")):
        lines.append(f"| {label} | {q['int8'][key]} | {q['int4'][key]} |")
    lines += ["", f"Quality over {q['rows']} decode rows (40 greedy generations x 64 tokens); "
              "the head recomputes the top 64 of a pass exactly, so the pick is exact while "
              "the exact best token ranks inside them. The int4 pass's tail would move "
              "logprobs (last row), so it serves argmax-only steps alone."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
