"""Host time per engine step, with the model's forward replaced by a stub, at batch 1/32/256
and contexts 128/2k/8k: this tree and a baseline revision, each in its own process, in the
same run.

    python benchmarks/step_overhead.py --baseline REV     # e.g. the commit before a change
    python benchmarks/step_overhead.py --quick            # batch 1/32, contexts 128/2k

Each step is timed in phases: schedule, prepare (the runner's work before and around the
forward, which is a stub, as is the LM head), the sampler (real arithmetic over
[batch, vocab] logits: device work on a GPU, CPU work here), and output processing (appending
tokens, stop checks, detokenizing, building outputs). The model is a dummy-weight Llama
with SmolLM2's vocabulary (49,152), so detokenizing runs on the real tokenizer; "tokens
only" runs skip the tokenizer. Writes benchmarks/results/step_overhead_<tag>.json and .md."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 49152
PHASES = ("schedule", "prepare", "sample", "output")


class _Timed:
    """Wraps a callable and adds its wall time to `totals[name]`."""

    def __init__(self, fn, totals: dict, name: str) -> None:
        self.fn, self.totals, self.name = fn, totals, name

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.totals[self.name] += time.perf_counter() - start


def measure(batch: int, context: int, text: bool, num_steps: int, model_dir: str,
            stub_sampler: bool = False) -> dict:
    """Median per-phase milliseconds over `num_steps` decode steps of `batch` requests that
    each hold `context` tokens. Uses only what every revision has: LLMEngine.step, the
    scheduler's schedule, the runner's execute, its model and sampler."""
    import importlib

    import torch

    # Revisions before the one import name had a top-level `engine` package.
    prefix = "pagedserve." if Path("pagedserve").is_dir() else ""

    def engine_module(name: str):
        return importlib.import_module(f"{prefix}engine.{name}")

    EngineConfig = engine_module("config").EngineConfig
    LLMEngine = engine_module("llm_engine").LLMEngine
    resolve_model = engine_module("loader.resolve").resolve_model
    sampling_params = engine_module("sampling_params")
    SamplingParams = sampling_params.SamplingParams

    torch.set_num_threads(1)  # host work is one thread; keep the sampler's share comparable
    # Room for the tokens the first requests decode while the last ones prefill.
    max_model_len = context + num_steps + batch * context // 8192 + 64
    config = EngineConfig
    if "async_scheduling" in getattr(EngineConfig, "__dataclass_fields__", {}):
        # Phases one after another: with async scheduling they overlap (on a GPU).
        config = functools.partial(EngineConfig, async_scheduling=False)
    engine = LLMEngine(config(
        model=model_dir, load_format="dummy", max_model_len=max_model_len,
        tokenizer=str(resolve_model(None)) if text else None, skip_tokenizer_init=not text,
        max_num_seqs=max(batch, 1), max_num_batched_tokens=8192,
        kv_cache_memory=(batch * max_model_len + 4096) * 1024, enable_prefix_caching=True))
    runner = engine.model_runner
    hidden = runner.hf_config.hidden_size

    # The stubs hand out slices of tensors made once, so no step pays for allocating (and
    # freeing: tens of MB at batch 256) what a real forward and LM head would compute.
    hidden_states = torch.zeros(8192, hidden)
    logits = torch.randn(max(batch, 1), VOCAB_SIZE)

    def stub_forward(input_ids, positions, kv_caches, md):
        return hidden_states[:len(input_ids)]

    runner.model.forward = stub_forward
    # (later revisions pass argmax_only too)
    runner.model.compute_logits = lambda hidden, *_: logits[:len(hidden)]
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, detokenize=text)
    if hasattr(sampling_params, "RequestOutputKind"):  # a server streams deltas; revisions
        params.output_kind = sampling_params.RequestOutputKind.DELTA  # before built cumulative
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.randrange(64, VOCAB_SIZE) for _ in range(context)],
                           params)
    while len(engine.step()) < batch:
        pass  # prefill (the stub makes it cheap), until every request samples each step
    engine.step()

    totals = dict.fromkeys(("schedule", "execute", "sample"), 0.0)
    engine.scheduler.schedule = _Timed(engine.scheduler.schedule, totals, "schedule")
    # The runner's launch and its wait (one `execute` in revisions before async scheduling).
    for name in ("execute_model", "collect") if hasattr(runner, "collect") else ("execute",):
        setattr(runner, name, _Timed(getattr(runner, name), totals, "execute"))
    if stub_sampler:
        # What a GPU host sees: the sampler's work is the device's, and its sweep over the
        # [batch, vocab] logits (50 MB at batch 256) does not evict the host's caches.
        SamplerOutput = engine_module("sampler").SamplerOutput
        runner.sampler = lambda logits, metadata: SamplerOutput(
            torch.full((len(logits),), 100), None, None, None)
    runner.sampler = _Timed(runner.sampler, totals, "sample")
    samples = {phase: [] for phase in PHASES}
    for _ in range(num_steps):
        for key in totals:
            totals[key] = 0.0
        start = time.perf_counter()
        outputs = engine.step()
        step = time.perf_counter() - start
        assert len(outputs) == batch
        sample = totals["sample"]
        samples["schedule"].append(totals["schedule"])
        samples["prepare"].append(totals["execute"] - sample)
        samples["sample"].append(sample)
        samples["output"].append(step - totals["schedule"] - totals["execute"])
    result = {phase: 1e3 * statistics.median(values) for phase, values in samples.items()}
    result["host"] = result["schedule"] + result["prepare"] + result["output"]
    return result


def _worker(args) -> None:
    sys.path.insert(0, os.getcwd())  # the revision being measured (this tree or a worktree)
    results = [dict(batch=b, context=c, text=t, **measure(b, c, t, args.steps, args.model_dir,
                                                         args.stub_sampler))
               for b, c, t in json.loads(args.cases)]
    print(json.dumps(results))


def _tiny_llama(directory: Path) -> str:
    import transformers

    transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=16384,
        architectures=["LlamaForCausalLM"]).save_pretrained(directory)
    return str(directory)


def _run(tree: Path, cases, steps: int, model_dir: str, stub_sampler: bool) -> list[dict]:
    # `tree` first on PYTHONPATH (this script may measure another checkout), then the caller's.
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=str(tree) + (os.pathsep + path if path else ""))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", "--cases", json.dumps(cases),
         "--steps", str(steps), "--model-dir", model_dir,
         *(["--stub-sampler"] if stub_sampler else [])],
        cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measuring {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_of_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Per case, each phase's median over the rounds (host recomputed from those)."""
    merged = []
    for runs in zip(*rounds):
        case = {key: runs[0][key] for key in ("batch", "context", "text")}
        case.update({phase: statistics.median(r[phase] for r in runs) for phase in PHASES})
        case["host"] = case["schedule"] + case["prepare"] + case["output"]
        merged.append(case)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="git revision to measure beside this tree")
    parser.add_argument("--quick", action="store_true", help="batch 1/32, contexts 128/2k")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each tree, alternating; the report takes medians")
    parser.add_argument("--stub-sampler", action="store_true",
                        help="the sampler a stub too: host phases as a GPU host runs them, "
                             "without the CPU sampler's sweep of the logits between them")
    parser.add_argument("--tag", default=None, help="results file suffix (default: cpu, or "
                                                    "cpu_stub_sampler with --stub-sampler)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    batches, contexts = ((1, 32), (128, 2048)) if args.quick else ((1, 32, 256),
                                                                   (128, 2048, 8192))
    cases = [(b, c, False) for b in batches for c in contexts]
    cases += [(b, 2048, True) for b in batches]  # detokenizing, at one context
    trees = {"this tree": REPO_ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _tiny_llama(Path(tmp) / "model")
        if args.baseline:
            worktree = Path(tmp) / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.baseline],
                           cwd=REPO_ROOT, check=True, capture_output=True)
            trees = {f"baseline {args.baseline}": worktree, **trees}
        try:
            # Trees alternate, round after round: this host's speed drifts by tens of percent
            # over a minute, which one tree after the other would read as a difference.
            rounds = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    rounds[name].append(_run(tree, cases, args.steps, model_dir,
                                             args.stub_sampler))
            runs = {name: _median_of_rounds(results) for name, results in rounds.items()}
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)],
                               cwd=REPO_ROOT, check=False, capture_output=True)
    load = os.getloadavg()
    report = {
        "command": "python benchmarks/step_overhead.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"load {load[0]:.2f}",
        "steps_per_case": args.steps, "rounds": args.rounds, "stub_sampler": args.stub_sampler,
        "runs": runs,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    tag = args.tag or ("cpu_stub_sampler" if args.stub_sampler else "cpu")
    stem = RESULTS_DIR / f"step_overhead_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(report: dict) -> str:
    names = list(report["runs"])
    lines = [
        "# Host time per decode step (model forward stubbed)", "",
        f"`{report['command']}` — {report['machine']}; medians over "
        f"{report.get('rounds', 1)} alternating rounds of each tree's median of "
        f"{report['steps_per_case']} steps, milliseconds. host = schedule + prepare + output "
        + ("(the sampler a stub too, as on a GPU host: no sweep of the [batch, 49152] logits "
           "between the phases)." if report.get("stub_sampler") else
           "(sample is the sampler's arithmetic over [batch, 49152] logits)."), "",
        "| batch | context | text | " + " | ".join(
            f"{n}: schedule / prepare / sample / output / **host**" for n in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for i, case in enumerate(report["runs"][names[0]]):
        cells = []
        for n in names:
            r = report["runs"][n][i]
            cells.append(" / ".join(f"{r[p]:.2f}" for p in PHASES) + f" / **{r['host']:.2f}**")
        lines.append(f"| {case['batch']} | {case['context']} | {'yes' if case['text'] else 'no'}"
                     f" | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
