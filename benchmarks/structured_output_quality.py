"""Does structured output make sense with a small model? LangChain's with_structured_output
(pydantic, TypedDict and JSON schema; greedy and temperature 0.7) against the embedded
SmolLM2-135M served in this process: the share of calls whose answer parses into the
schema, and output tokens per call, with forced text spelled as the tokenizer spells it
(the default) and without (the grammar alone, where the model may be made to write a key
in pieces it never saw and derail). Both modes run in the same process and run.

    python benchmarks/structured_output_quality.py            # ~3 minutes on 2 cores
    python benchmarks/structured_output_quality.py --seeds 1  # quicker

Writes benchmarks/results/structured_output_quality_<tag>.json and .md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import TypedDict

from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

from benchmarks.serve import RESULTS_DIR, free_port  # noqa: E402


class Joke(BaseModel):
    """A joke."""

    setup: str = Field(description="the question or situation")
    punchline: str = Field(description="the answer that makes it funny")


class Person(TypedDict):
    """A person."""

    name: str
    age: int


CITY = {"title": "City", "description": "A city.", "type": "object",
        "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                       "population": {"type": "integer"}},
        "required": ["name", "country", "population"]}

CASES = [  # (label, schema, prompts)
    ("pydantic Joke", Joke, ["Tell me a joke about cats.", "Tell me a joke about computers.",
                             "Tell me a joke about the sea.", "Tell me a joke about bread."]),
    ("TypedDict Person", Person, ["Describe a famous scientist.", "Invent a pirate captain.",
                                  "Describe your best friend.", "Who wrote Hamlet?"]),
    ("JSON schema City", CITY, ["Tell me about Paris.", "Describe the capital of Japan.",
                                "Name a big city in Brazil.", "Describe London."]),
]


def start_server():
    import uvicorn

    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.engine.config import EngineConfig
    from pagedserve.server.app import build_app

    engine = AsyncEngine(EngineConfig(kv_cache_memory=512 << 20))
    app = build_app(engine, ["SmolLM2-135M-Instruct"])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return engine, server, thread, f"http://127.0.0.1:{port}/v1"


def run_mode(base_url: str, temperature: float, seed: int | None, max_tokens: int,
             concurrency: int) -> list[dict]:
    from langchain_openai import ChatOpenAI

    kwargs = {"seed": seed} if seed is not None else {}
    llm = ChatOpenAI(base_url=base_url, api_key="x", model="SmolLM2-135M-Instruct",
                     temperature=temperature, max_tokens=max_tokens, max_retries=0,
                     timeout=300, **kwargs)
    calls = []
    for label, schema, prompts in CASES:
        structured = llm.with_structured_output(schema, method="json_schema", include_raw=True)
        results = structured.batch(prompts, config={"max_concurrency": concurrency},
                                   return_exceptions=True)
        for prompt, result in zip(prompts, results):
            call = {"case": label, "prompt": prompt, "temperature": temperature, "seed": seed}
            if isinstance(result, Exception):
                # The SDK refuses to parse an answer cut at max_tokens (LengthFinishReasonError).
                completion = getattr(result, "completion", None)
                call.update(parsed=False, finish_reason="length" if completion else "error",
                            output_tokens=completion.usage.completion_tokens if completion
                            else None, text=(completion.choices[0].message.content or "")[:300]
                            if completion else repr(result)[:300])
            else:
                raw = result["raw"]
                call.update(parsed=result["parsing_error"] is None
                            and result["parsed"] is not None,
                            finish_reason=raw.response_metadata.get("finish_reason"),
                            output_tokens=(raw.usage_metadata or {}).get("output_tokens"),
                            text=raw.content[:300] if isinstance(raw.content, str) else "")
            calls.append(call)
    return calls


def summarize(calls: list[dict]) -> dict:
    out = {}
    for key in sorted({(c["case"], c["temperature"]) for c in calls}):
        group = [c for c in calls if (c["case"], c["temperature"]) == key]
        out[f"{key[0]} @ T={key[1]:g}"] = {
            "parsed": sum(c["parsed"] for c in group), "calls": len(group),
            "tokens_per_call": sum(c["output_tokens"] or 0 for c in group) / len(group)}
    total = {"parsed": sum(c["parsed"] for c in calls), "calls": len(calls),
             "tokens_per_call": sum(c["output_tokens"] or 0 for c in calls) / len(calls)}
    return {"groups": out, "total": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=2, help="sampled runs per prompt at T=0.7")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tag", default="cpu_smollm2")
    args = p.parse_args()
    load = os.getloadavg()[0]
    engine, server, thread, base_url = start_server()
    try:
        run_mode(base_url, 0.0, None, 8, 1)  # warm-up: builds the grammar backend
        manager = engine.engine.structured_output
        modes = {}
        for name, canonical in (("canonical spelling", True), ("grammar alone", False)):
            manager.canonical_forced_tokens = canonical
            start = time.perf_counter()
            calls = run_mode(base_url, 0.0, None, args.max_tokens, args.concurrency)
            for seed in range(args.seeds):
                calls += run_mode(base_url, 0.7, seed, args.max_tokens, args.concurrency)
            modes[name] = {"seconds": time.perf_counter() - start, "calls": calls,
                           **summarize(calls)}
        manager.canonical_forced_tokens = True
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    write(args, load, modes)


def write(args, load: float, modes: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/structured_output_quality.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, 1-min load avg before {load:.2f}"
    result = {"command": command.strip(), "machine": machine, "modes": modes}
    (RESULTS_DIR / f"structured_output_quality_{args.tag}.json").write_text(
        json.dumps(result, indent=2) + "\n")
    names = list(modes)
    lines = [f"# Structured output that a small model can follow: {args.tag}", "",
             f"Command: `{command.strip()}`  ", f"Machine: {machine}  ",
             f"Workload: LangChain `with_structured_output(..., method=\"json_schema\", "
             f"include_raw=True)` on the embedded SmolLM2-135M, {len(CASES)} schemas x 4 "
             f"prompts, greedy and T=0.7 ({args.seeds} seeds), max_tokens {args.max_tokens}",
             "", "| schema @ temperature | " + " | ".join(
                 f"{n}: parsed / tokens per call" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for group in modes[names[0]]["groups"]:
        cells = [f"{modes[n]['groups'][group]['parsed']}/{modes[n]['groups'][group]['calls']}"
                 f" / {modes[n]['groups'][group]['tokens_per_call']:.0f}" for n in names]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    cells = [f"**{modes[n]['total']['parsed']}/{modes[n]['total']['calls']}** / "
             f"{modes[n]['total']['tokens_per_call']:.0f}" for n in names]
    lines += ["| all | " + " | ".join(cells) + " |", "",
              "Parsed: LangChain returned the schema's object (no parsing error). Tokens: "
              "output tokens per call (a call that derails runs to max_tokens)."]
    (RESULTS_DIR / f"structured_output_quality_{args.tag}.md").write_text(
        "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
