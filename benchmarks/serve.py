"""Online serving benchmark against any OpenAI-compatible base URL (vLLM's benchmark_serving,
in small): streaming requests at a Poisson request rate or a fixed concurrency, measuring
TTFT, TPOT, inter-token latency and end-to-end latency per request.

    python benchmarks/serve.py --base-url http://127.0.0.1:8000/v1 --max-concurrency 8
    python benchmarks/serve.py --launch --sweep-concurrency 1,8,32 --num-prompts 32 \\
        --input-len 128 --output-len 64 --tag cpu_smollm2     # starts `pagedserve serve` itself

Writes benchmarks/results/serve_<tag>.json and .md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # runnable from a checkout without installing

from benchmarks.throughput import child_env  # noqa: E402

# Common English words: each is about one BPE token (with its leading space) in most
# tokenizers, so N words is roughly N prompt tokens. The exact count comes from usage.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this which an are "
    "have had one not but all were when we there can been has more if no out so said what up "
    "its about into than them only other new some could time these two may first then do any "
    "like my now over such our man me even most made after also did many before must through "
    "back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come "
    "since against go came right used take three water house small place found part city "
    "light point home side river green music table paper story money school field"
).split()


@dataclass(slots=True)
class RequestSpec:
    prompt: str
    max_tokens: int
    prompt_len: int  # the generator's estimate; the server's usage count wins when present

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"RequestSpec.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(slots=True)
class RequestResult:
    success: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds from send to the first content chunk
    latency: float = 0.0  # seconds from send to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    output_tokens: int = 0
    prompt_tokens: int = 0


# Sent once before measuring: first-request costs (lazy init, allocator) out of the numbers.
WARMUP_REQUEST = RequestSpec("warmup " + " ".join(WORDS[:30]), 4, 31)


# ---- workload -----------------------------------------------------------------------
def synthetic_requests(num_prompts: int, input_len: int, output_len: int,
                       seed: int, max_input_len: int | None = None) -> list[RequestSpec]:
    """Random-word prompts of input_len words (or a length uniform in input_len ..
    max_input_len); each starts with a distinct number so that no two requests share a
    prefix (prefix caching would otherwise flatter TTFT)."""
    rng = random.Random(seed)
    specs = []
    for i in range(num_prompts):
        length = rng.randint(input_len, max_input_len) if max_input_len else input_len
        words = [str(i)] + [rng.choice(WORDS) for _ in range(length - 1)]
        specs.append(RequestSpec(" ".join(words), output_len, length))
    return specs


def sharegpt_requests(path: Path, num_prompts: int, max_output_len: int | None,
                      seed: int) -> list[RequestSpec]:
    """First human turn as prompt; the gpt answer's length in words (capped) as max_tokens."""
    data = json.loads(path.read_text())
    rng = random.Random(seed)
    rng.shuffle(data)
    specs = []
    for entry in data:
        turns = entry.get("conversations") or []
        first = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
        if first is None:
            continue
        human = turns[first].get("value")
        gpt = next((t.get("value") for t in turns[first + 1:] if t.get("from") == "gpt"), None)
        if not human or not gpt:
            continue
        out_len = max(1, len(gpt.split()))
        if max_output_len is not None:
            out_len = min(out_len, max_output_len)
        specs.append(RequestSpec(human, out_len, len(human.split())))
        if len(specs) == num_prompts:
            break
    if len(specs) < num_prompts:
        raise SystemExit(f"--dataset {path}: only {len(specs)} usable conversations, "
                         f"{num_prompts} requested")
    return specs


# ---- one streaming request ----------------------------------------------------------
def build_payload(endpoint: str, model: str, spec: RequestSpec) -> dict:
    payload = {
        "model": model, "max_tokens": spec.max_tokens, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True,  # vLLM's extra field: every request runs to max_tokens
    }
    if endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        payload["prompt"] = spec.prompt
    return payload


def _content(chunk: dict, endpoint: str) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


async def send_request(client: httpx.AsyncClient, url: str, endpoint: str,
                       payload: dict) -> RequestResult:
    """One streaming request, parsed as SSE lines (`data: {...}` ... `data: [DONE]`)."""
    result = RequestResult()
    start = last = time.perf_counter()
    num_chunks = 0
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:300]
                    return result
                now = time.perf_counter()
                if _content(chunk, endpoint):
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    num_chunks += 1
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.prompt_tokens = usage.get("prompt_tokens") or 0
        result.latency = time.perf_counter() - start
        if num_chunks == 0:
            result.error = "stream ended without content"
        elif result.output_tokens == 0:
            result.output_tokens = num_chunks  # server without usage: one token a chunk
            result.success = True
        else:
            result.success = True
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# ---- the benchmark ------------------------------------------------------------------
async def _arrivals(n: int, request_rate: float, rng: random.Random):
    """Poisson arrivals: exponential gaps of mean 1/rate; rate inf sends all at once."""
    for i in range(n):
        yield i
        if math.isfinite(request_rate) and i < n - 1:
            await asyncio.sleep(rng.expovariate(request_rate))


async def run_benchmark(base_url: str, model: str, endpoint: str, specs: list[RequestSpec],
                        request_rate: float = math.inf, max_concurrency: int | None = None,
                        api_key: str | None = None, seed: int = 0,
                        timeout_s: float = 600.0) -> dict:
    """Send every spec as a streaming request; return the summary metrics (and, under
    "requests", the per-request results)."""
    url = base_url.rstrip("/") + ("/chat/completions" if endpoint == "chat" else "/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = max_concurrency or len(specs)
    semaphore = asyncio.Semaphore(limit)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    rng = random.Random(seed)

    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits) as client:
        async def limited(spec: RequestSpec) -> RequestResult:
            async with semaphore:
                return await send_request(client, url, endpoint,
                                          build_payload(endpoint, model, spec))

        start = time.perf_counter()
        tasks = []
        async for i in _arrivals(len(specs), request_rate, rng):
            tasks.append(asyncio.create_task(limited(specs[i])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(results, specs, duration)
    summary.update(endpoint=endpoint, model=model, num_prompts=len(specs),
                   request_rate=request_rate if math.isfinite(request_rate) else "inf",
                   max_concurrency=max_concurrency)
    summary["requests"] = [asdict(r) for r in results]
    return summary


def _stats(values_s: list[float], prefix: str) -> dict:
    """mean, median, p99 in milliseconds (0 when empty)."""
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        return {f"mean_{prefix}_ms": 0.0, f"median_{prefix}_ms": 0.0, f"p99_{prefix}_ms": 0.0}

    def pct(q: float) -> float:  # linear interpolation, as numpy.percentile
        pos = (len(ms) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return ms[lo] + (ms[hi] - ms[lo]) * (pos - lo)

    return {f"mean_{prefix}_ms": sum(ms) / len(ms), f"median_{prefix}_ms": pct(0.5),
            f"p99_{prefix}_ms": pct(0.99)}


def summarize(results: list[RequestResult], specs: list[RequestSpec], duration: float) -> dict:
    ok = [(r, s) for r, s in zip(results, specs) if r.success]
    output_tokens = sum(r.output_tokens for r, _ in ok)
    prompt_tokens = sum(r.prompt_tokens or s.prompt_len for r, s in ok)
    # TPOT excludes the first token: (E2E - TTFT) / (tokens - 1), per request.
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r, _ in ok if r.output_tokens > 1]
    out = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.success})[:5],
        "duration_s": duration,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
    }
    out.update(_stats([r.ttft for r, _ in ok], "ttft"))
    out.update(_stats(tpots, "tpot"))
    out.update(_stats([gap for r, _ in ok for gap in r.itl], "itl"))
    out.update(_stats([r.latency for r, _ in ok], "e2el"))
    return out


# ---- server discovery and --launch --------------------------------------------------
def server_root(base_url: str) -> str:
    """http://host:port/v1 -> http://host:port (where /health lives)."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def first_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched_process(cmd: list[str], health_url: str, log_path: Path,
                     startup_timeout_s: float = 300.0,
                     env: dict | None = None) -> Iterator[subprocess.Popen]:
    """Start a server process, wait until health_url answers 200, yield the process, and
    terminate it afterwards (SIGTERM, then SIGKILL)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health_url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"server not healthy after {startup_timeout_s:.0f}s; "
                                 f"see {log_path}")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pagedserve_process(port: int, serve_args: list[str]) -> tuple[list[str], dict]:
    """The command and environment that run this checkout's `pagedserve serve` on port."""
    cmd = [sys.executable, "-m", "pagedserve.server.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), *serve_args]
    return cmd, child_env()


@contextlib.contextmanager
def launched_server(serve_args: list[str], log_path: Path,
                    startup_timeout_s: float = 300.0) -> Iterator[str]:
    """Start `pagedserve serve` on a free port, wait for /health, yield its /v1 base URL,
    and terminate it afterwards."""
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    cmd, env = pagedserve_process(port, serve_args)
    with launched_process(cmd, root + "/health", log_path, startup_timeout_s, env):
        yield root + "/v1"


# ---- output -------------------------------------------------------------------------
ROWS = [  # (label, key, format)
    ("completed", "completed", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("duration (s)", "duration_s", "{:.2f}"),
    ("input tokens", "total_input_tokens", "{:d}"),
    ("output tokens", "total_output_tokens", "{:d}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("output tok/s", "output_throughput", "{:.1f}"),
    ("total tok/s", "total_token_throughput", "{:.1f}"),
    ("1-min load avg before", "loadavg_1m_before", "{:.2f}"),
] + [(f"{stat} {name} (ms)", f"{stat}_{key}_ms", "{:.1f}")
     for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2el"))
     for stat in ("mean", "median", "p99")]


def table(runs: list[dict]) -> list[str]:
    """A markdown table, one column per run."""
    def label(run: dict) -> str:
        if run["max_concurrency"]:
            return f"c={run['max_concurrency']} ({run['num_prompts']} req)"
        return f"rate={run['request_rate']} ({run['num_prompts']} req)"

    lines = ["| metric | " + " | ".join(label(r) for r in runs) + " |",
             "|---" * (len(runs) + 1) + "|"]
    for name, key, fmt in ROWS:
        lines.append(f"| {name} | " + " | ".join(fmt.format(r[key]) for r in runs) + " |")
    return lines


def write_results(tag: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"serve_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    runs = result["runs"]
    lines = [
        f"# Serving benchmark: {tag}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Server: {result['server']}; endpoint /v1/{result['endpoint_path']}, "
        f"model {result['model']}  ",
        f"Workload: {result['workload']}",
        "",
        *table(runs),
        "",
        "TTFT: send to first content chunk. TPOT: (E2E - TTFT) / (output tokens - 1) per "
        "request. ITL: gaps between content chunks. Percentiles over requests (ITL: over "
        "all gaps).",
    ]
    errors = sorted({e for r in runs for e in r["errors"]})
    if errors:
        lines += ["", "Errors (first few):", *[f"- `{e}`" for e in errors[:5]]]
    md_path = RESULTS_DIR / f"serve_{tag}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


# ---- main ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight")
    p.add_argument("--sweep-concurrency", default=None, metavar="C1,C2,...",
                   help="one run per concurrency against the same server, one results file")
    p.add_argument("--sweep-num-prompts", default=None, metavar="N1,N2,...",
                   help="prompts per sweep run (default: --num-prompts for each)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128, help="synthetic prompt length (words)")
    p.add_argument("--output-len", type=int, default=64,
                   help="max_tokens of synthetic requests; caps ShareGPT output lengths")
    p.add_argument("--dataset", type=Path, default=None, help="ShareGPT-format JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the one short request sent before measuring")
    p.add_argument("--launch", action="store_true",
                   help="start `pagedserve serve` on a free port for this run (ignores --base-url)")
    p.add_argument("--serve-args", default="",
                   help="extra arguments for the launched server, e.g. '--dtype bfloat16'")
    p.add_argument("--tag", default="default")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.sweep_concurrency:
        concurrencies: list[int | None] = [int(c) for c in args.sweep_concurrency.split(",")]
    else:
        concurrencies = [args.max_concurrency]
    if args.sweep_num_prompts:
        counts = [int(n) for n in args.sweep_num_prompts.split(",")]
        if len(counts) != len(concurrencies):
            raise SystemExit("--sweep-num-prompts needs one count per --sweep-concurrency entry")
    else:
        counts = [args.num_prompts] * len(concurrencies)
    # Each run gets its own prompts: reusing them would hit the server's prefix cache.
    total = sum(counts)
    if args.dataset:
        all_specs = sharegpt_requests(args.dataset, total, args.output_len, args.seed)
        workload = (f"ShareGPT {args.dataset.name}, output capped at {args.output_len} tokens")
    else:
        all_specs = synthetic_requests(total, args.input_len, args.output_len, args.seed)
        workload = (f"synthetic random words, ~{args.input_len} input tokens, {args.output_len} "
                    f"output tokens (ignore_eos)")
    workload += f", request rate {args.request_rate}, seed {args.seed}"

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.launch:
            log_path = RESULTS_DIR / f".serve_{args.tag}_{os.getpid()}.log"
            print(f"launching pagedserve serve (log: {log_path})", flush=True)
            base_url = stack.enter_context(launched_server(shlex.split(args.serve_args),
                                                           log_path))
            stack.callback(log_path.unlink, missing_ok=True)
            server = f"pagedserve serve {args.serve_args}".strip() + " (launched)"
        else:
            base_url, server = args.base_url, args.base_url
        model = args.model or first_model(base_url, args.api_key)
        if not args.no_warmup:
            asyncio.run(run_benchmark(base_url, model, args.endpoint, [WARMUP_REQUEST],
                                      api_key=args.api_key))
        runs, offset = [], 0
        for concurrency, count in zip(concurrencies, counts):
            specs, offset = all_specs[offset:offset + count], offset + count
            load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
            run = asyncio.run(run_benchmark(base_url, model, args.endpoint, specs,
                                            args.request_rate, concurrency, args.api_key,
                                            args.seed))
            run["loadavg_1m_before"] = load_before
            print(f"concurrency {concurrency}: {run['completed']}/{count} ok in "
                  f"{run['duration_s']:.1f}s, {run['output_throughput']:.1f} output tok/s, "
                  f"median TTFT {run['median_ttft_ms']:.0f} ms, "
                  f"median TPOT {run['median_tpot_ms']:.1f} ms", flush=True)
            runs.append(run)

    result = {
        "command": "python benchmarks/serve.py " + shlex.join(sys.argv[1:] if argv is None
                                                               else argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "server": server,
        "endpoint_path": "chat/completions" if args.endpoint == "chat" else "completions",
        "model": model,
        "workload": workload,
        "runs": runs,
    }
    print("\n".join(table(runs)))
    print(f"wrote {write_results(args.tag, result)}")


if __name__ == "__main__":
    main()
