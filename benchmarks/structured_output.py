"""What guided decoding costs: one batch of chat requests, half of them constrained by JSON
schemas (varied), against the same batch with no schemas, in the same process and run.

    python benchmarks/structured_output.py            # embedded SmolLM2-135M, 32 requests
    python benchmarks/structured_output.py --repeats 1 --num-requests 8   # quick look

Guided requests end when their JSON is complete, so the two runs would otherwise differ in
output lengths and hence in batch sizes step by step. The unguided run therefore gives each
request exactly the length it had in the guided run (max_tokens = that length, ignore_eos):
both runs schedule the same rows at every step, and what differs is the grammar work (mask
filling and applying, matcher advances). Runs alternate and each is repeated; medians are
reported. Writes benchmarks/results/structured_output_<tag>.json and .md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # runnable from a checkout without installing


def _obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required}


_NAME = {"type": "string", "pattern": "^[A-Za-z ]{1,16}$"}
SCHEMAS = [
    ("a person as JSON", _obj({"name": _NAME, "age": {"type": "integer", "minimum": 0,
                                                       "maximum": 120}})),
    ("a book as JSON", _obj({"title": _NAME, "year": {"type": "integer"},
                             "genres": {"type": "array", "items": {"type": "string"},
                                        "maxItems": 3}})),
    ("a city and its location as JSON", _obj({"city": _NAME, "location": _obj(
        {"lat": {"type": "number"}, "lon": {"type": "number"}})})),
    ("a t-shirt order as JSON", _obj({"color": {"enum": ["red", "green", "blue"]},
                                      "size": {"enum": ["S", "M", "L", "XL"]},
                                      "quantity": {"type": "integer", "minimum": 1}})),
    ("a list of prime numbers as JSON", _obj({"primes": {"type": "array",
                                                         "items": {"type": "integer"}}})),
    ("a weather report as JSON", _obj({"city": _NAME, "temperature_c": {"type": "number"},
                                       "sunny": {"type": "boolean"},
                                       "note": {"type": "string"}}, ["city", "sunny"])),
    ("a user account as JSON", _obj({"username": {"type": "string", "pattern": "^[a-z0-9_]{3,12}$"},
                                     "email": {"type": "string"},
                                     "admin": {"type": "boolean"}})),
    ("a recipe as JSON", _obj({"dish": _NAME, "ingredients": {"type": "array", "items": _obj(
        {"item": _NAME, "grams": {"type": "integer"}}), "maxItems": 4}})),
]


def make_requests(num_requests: int) -> list[tuple[str, dict | None]]:
    """(question, schema or None): even requests carry a schema, odd ones none."""
    requests = []
    for i in range(num_requests):
        subject, schema = SCHEMAS[(i // 2) % len(SCHEMAS)]
        if i % 2 == 0:
            requests.append((f"Describe {subject}.", schema))
        else:
            requests.append((f"Tell me about {subject.removesuffix(' as JSON')}.", None))
    return requests


class GrammarTimer:
    """Wall time inside the engine's per-step grammar calls (mask fill and apply)."""

    def __init__(self) -> None:
        from pagedserve.engine.structured_output import GrammarBitmask, StructuredOutputManager

        self.seconds = 0.0
        for owner, name in ((StructuredOutputManager, "fill_bitmask"), (GrammarBitmask, "apply")):
            original = getattr(owner, name)

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(owner, name, timed)


def run_batch(llm, prompts: list[dict], params: list, timer: GrammarTimer) -> dict:
    engine = llm.llm_engine
    grammar_before = timer.seconds
    start = time.perf_counter()
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, sp)
    added = time.perf_counter()
    lengths, steps = {}, 0
    order = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                lengths[out.request_id] = len(out.outputs[0].token_ids)
                order.append(out)
        steps += 1
    elapsed = time.perf_counter() - start
    output_tokens = sum(lengths.values())
    by_index = sorted(order, key=lambda o: int(o.request_id.rsplit("-", 1)[1]))
    return {
        "elapsed_s": elapsed,
        "add_s": added - start,
        "steps": steps,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / elapsed,
        "ms_per_step": 1e3 * elapsed / steps,
        "grammar_s": timer.seconds - grammar_before,
        "outputs": by_index,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: steadier on a shared machine; 0: torch's default)")
    p.add_argument("--tag", default="cpu_smollm2")
    args = p.parse_args()

    import torch

    from pagedserve.engine import LLM, GuidedDecodingParams, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)

    timer = GrammarTimer()
    llm = LLM(model=args.model, kv_cache_memory=args.kv_cache_memory)
    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    requests = make_requests(args.num_requests)
    prompts = []
    for question, _ in requests:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
        prompts.append({"prompt": text,
                        "prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids})
    guided_params = [
        SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                       guided_decoding=None if schema is None
                       else GuidedDecodingParams(json=schema))
        for _, schema in requests
    ]

    # Cold: builds the grammar backend (tokenizer vocabulary scan) and compiles each schema.
    start = time.perf_counter()
    engine._get_structured_output()
    backend_init_s = time.perf_counter() - start
    compile_ms = []
    for _, schema in SCHEMAS:
        start = time.perf_counter()
        engine.structured_output.compile(GuidedDecodingParams(json=schema))
        compile_ms.append(1e3 * (time.perf_counter() - start))
    # Warm-up run (also fixes the output lengths the unguided run reproduces).
    first = run_batch(llm, prompts, guided_params, timer)
    lengths = [len(o.outputs[0].token_ids) for o in first["outputs"]]
    finish = [o.outputs[0].finish_reason for o in first["outputs"]]
    valid_json = sum(
        _parses(o.outputs[0].text) for o, (_, s) in zip(first["outputs"], requests) if s)
    plain_params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                    for n in lengths]

    runs = {"guided": [], "unguided": []}
    for _ in range(args.repeats):
        for name, params in (("unguided", plain_params), ("guided", guided_params)):
            result = run_batch(llm, prompts, params, timer)
            result.pop("outputs")
            runs[name].append(result)
    kvm = engine.kv_cache_manager
    assert kvm.num_free_blocks == kvm.block_pool.num_blocks

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    guided_ms = median("guided", "elapsed_s") * 1e3 / first["output_tokens"]
    plain_ms = median("unguided", "elapsed_s") * 1e3 / first["output_tokens"]
    num_guided = sum(1 for _, s in requests if s)
    result = {
        "command": "python benchmarks/structured_output.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "workload": (f"{args.num_requests} chat requests to the embedded SmolLM2-135M, "
                     f"{num_guided} with a JSON schema ({len(SCHEMAS)} distinct), greedy, "
                     f"max_tokens {args.max_tokens}; unguided run: same prompts and lengths, "
                     f"ignore_eos; {args.repeats} alternating repeats, medians"),
        "output_tokens": first["output_tokens"],
        "guided_outputs": {"finish_reasons": {r: finish[::2].count(r) for r in set(finish[::2])},
                           "valid_json": valid_json, "num_guided": num_guided},
        "backend_init_ms": 1e3 * backend_init_s,
        "compile_ms_per_schema": compile_ms,
        "runs": runs,
        "guided": {
            "output_tok_s": median("guided", "output_tok_s"),
            "ms_per_output_token": guided_ms,
            "ms_per_step": median("guided", "ms_per_step"),
            "grammar_ms_per_step": 1e3 * median("guided", "grammar_s")
            / median("guided", "steps"),
        },
        "unguided": {
            "output_tok_s": median("unguided", "output_tok_s"),
            "ms_per_output_token": plain_ms,
            "ms_per_step": median("unguided", "ms_per_step"),
        },
        "slowdown": guided_ms / plain_ms,
    }
    print(json.dumps({k: result[k] for k in ("guided", "unguided", "slowdown")}, indent=2))
    print(f"wrote {write_results(args, result)}")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def write_results(args, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = args.tag
    json_path = RESULTS_DIR / f"structured_output_{tag}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    g, u = result["guided"], result["unguided"]
    out = result["guided_outputs"]
    compile_ms = result["compile_ms_per_schema"]
    lines = [
        f"# Structured output overhead: {tag}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Workload: {result['workload']}",
        "",
        "| batch | output tok/s | ms / output token | ms / step |",
        "|---|---|---|---|",
        f"| half guided (JSON schema) | {g['output_tok_s']:.1f} | "
        f"{g['ms_per_output_token']:.2f} | {g['ms_per_step']:.1f} |",
        f"| unguided, same lengths | {u['output_tok_s']:.1f} | "
        f"{u['ms_per_output_token']:.2f} | {u['ms_per_step']:.1f} |",
        "",
        f"**Slowdown: {result['slowdown']:.3f}x** time per output token.",
        "",
        f"Grammar work inside the step loop (bitmask fill + apply, measured around those "
        f"calls): {g['grammar_ms_per_step']:.2f} ms per step. One-off costs: grammar backend "
        f"init {result['backend_init_ms']:.0f} ms (tokenizer vocabulary scan, first guided "
        f"request only); compiling a schema {min(compile_ms):.1f}-{max(compile_ms):.1f} ms "
        f"(once per distinct schema, cached).",
        "",
        f"Guided outputs: {out['valid_json']}/{out['num_guided']} parse as JSON; finish "
        f"reasons {out['finish_reasons']} (length: the model ran past max_tokens inside an "
        f"unbounded string or array).",
        "",
        "The machine is shared with other jobs (2 cores), so single runs vary by several "
        "percent; see the per-run numbers in the JSON file.",
    ]
    md_path = RESULTS_DIR / f"structured_output_{tag}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


if __name__ == "__main__":
    main()
