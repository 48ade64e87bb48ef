"""Soak test: many streams, clients that walk away, and clients that crawl, all at once,
for a bounded time; then the server must be idle with every KV block back in the pool.

    python benchmarks/soak.py --launch --duration 120 --tag cpu_smollm2
    python benchmarks/soak.py --base-url http://127.0.0.1:8000/v1 --duration 60

Load (defaults): 256 concurrent streaming clients, each sending one request after
another; 50 clients that disconnect after a few chunks, spread over the run; 20 slow
clients, half trickling their request body a byte at a time (the server must answer
408 after its --request-body-timeout) and half reading their stream a chunk every few
seconds; a /health probe twice a second. Reports completed / failed / 5xx, the largest
gap between two chunks of one stream (the max stall), the slowest /health answer, and
whether running, waiting and KV usage are back to 0 afterwards (from /metrics).

Not part of `make test`: it takes minutes and its numbers depend on the machine. Writes
benchmarks/results/soak_<tag>.json and .md."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

from benchmarks.serve import (  # noqa: E402
    RESULTS_DIR,
    WORDS,
    first_model,
    launched_server,
    server_root,
)


@dataclass
class Tally:
    completed: int = 0  # streams that ended with a finish_reason and [DONE]
    failed: int = 0  # anything else: an error status, a torn stream, a transport error
    status_5xx: int = 0
    disconnects: int = 0  # streams we walked away from on purpose
    slow_body_408: int = 0  # trickling clients the server cut off, as it should
    slow_body_other: int = 0  # trickling clients that got anything else
    slow_readers_completed: int = 0
    max_stall_s: float = 0.0  # the largest gap between two chunks of one stream
    max_health_s: float = 0.0
    health_failures: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.errors) < 10:
            self.errors.append(what[:300])


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one_stream(client: httpx.AsyncClient, url: str, body: dict, tally: Tally, *,
                     stop_after: int | None = None, read_delay_s: float = 0.0) -> bool:
    """One streaming completion. `stop_after`: walk away after that many chunks.
    `read_delay_s`: sleep between chunks (a slow reader). True if it ended properly."""
    arrivals: list[float] = []
    finished = done = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code >= 500:
                tally.status_5xx += 1
            if response.status_code != 200:
                tally.fail(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                arrivals.append(time.monotonic())
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    tally.fail(f"error event: {chunk['error']}")
                    return False
                finished |= any(c.get("finish_reason") for c in chunk["choices"])
                if stop_after is not None and len(arrivals) >= stop_after:
                    tally.disconnects += 1
                    return True  # leaving the block closes the connection mid-stream
                if read_delay_s:
                    await asyncio.sleep(read_delay_s)
    except httpx.HTTPError as exc:
        tally.fail(f"{type(exc).__name__}: {exc}")
        return False
    finally:
        if not read_delay_s:  # a slow reader's gaps are its own doing
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
            tally.max_stall_s = max([tally.max_stall_s, *gaps])
    if not (finished and done):
        tally.fail(f"stream ended without {'[DONE]' if finished else 'a finish_reason'}")
        return False
    tally.completed += 1
    return True


async def slow_body(root: str, path: str, tally: Tally, deadline: float) -> None:
    """Send headers promising a body, then a byte a second: the server must cut us off
    with a 408 (its --request-body-timeout) rather than hold the connection."""
    parts = urlsplit(root)
    body = json.dumps({"model": "x", "prompt": "hi", "max_tokens": 1}).encode()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode())
        await writer.drain()
        for byte in body[:-1]:  # never the last one
            if reader.at_eof() or time.monotonic() > deadline:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                status_line = await asyncio.wait_for(reader.readline(), 1.0)
            except TimeoutError:
                continue
            if b" 408 " in status_line:
                tally.slow_body_408 += 1
            else:
                tally.slow_body_other += 1
                tally.errors.append(f"slow body got {status_line[:100]!r}")
            return
        tally.slow_body_other += 1
        tally.errors.append("slow body: no answer before the run ended")
    except (ConnectionError, OSError) as exc:
        tally.slow_body_other += 1
        tally.errors.append(f"slow body: {exc!r}")
    finally:
        writer.close()


async def health_probe(root: str, tally: Tally, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            start = time.monotonic()
            try:
                ok = (await client.get(root + "/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            tally.max_health_s = max(tally.max_health_s, time.monotonic() - start)
            tally.health_failures += not ok
            await asyncio.sleep(0.5)


def metrics(root: str, headers: dict) -> dict[str, float]:
    text = httpx.get(root + "/metrics", headers=headers, timeout=30).text
    wanted = ("pagedserve_num_requests_running", "pagedserve_num_requests_waiting",
              "pagedserve_kv_cache_usage_perc")
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name.removeprefix("pagedserve_")] = float(value)
    return out


async def soak(base_url: str, model: str, args: argparse.Namespace) -> dict:
    root = server_root(base_url)
    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed)
    tally = Tally()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    start = time.monotonic()
    deadline = start + args.duration

    def body() -> dict:
        return {"model": model, "prompt": prompt(rng, rng.randint(8, args.input_len)),
                "max_tokens": rng.randint(1, args.output_len), "stream": True,
                "temperature": 1.0}

    async with httpx.AsyncClient(timeout=args.request_timeout, headers=headers,
                                 limits=limits) as client:
        async def streamer() -> None:
            while time.monotonic() < deadline:
                await one_stream(client, url, body(), tally)

        async def disconnector(delay: float) -> None:
            await asyncio.sleep(delay)
            await one_stream(client, url, dict(body(), max_tokens=args.output_len,
                                                ignore_eos=True),
                             tally, stop_after=rng.randint(1, 5))

        async def slow_reader(delay: float) -> None:
            await asyncio.sleep(delay)
            if await one_stream(client, url, dict(body(), max_tokens=8), tally,
                                read_delay_s=args.slow_read_delay):
                tally.slow_readers_completed += 1

        stop = asyncio.Event()
        spread = args.duration * 0.8
        num_slow_body = args.slow_clients // 2
        tasks = [asyncio.create_task(streamer()) for _ in range(args.concurrency)]
        tasks += [asyncio.create_task(disconnector(rng.uniform(0, spread)))
                  for _ in range(args.disconnects)]
        tasks += [asyncio.create_task(slow_body(root, "/v1/completions", tally,
                                                deadline + args.request_timeout))
                  for _ in range(num_slow_body)]
        tasks += [asyncio.create_task(slow_reader(rng.uniform(0, spread)))
                  for _ in range(args.slow_clients - num_slow_body)]
        probe = asyncio.create_task(health_probe(root, tally, stop))
        await asyncio.gather(*tasks)
        stop.set()
        await probe
    duration = time.monotonic() - start
    # Idle now: give the engine a moment to retire the last aborts, then read the pool.
    after, settle_deadline = {}, time.monotonic() + 30
    while time.monotonic() < settle_deadline:
        after = metrics(root, headers)
        if not any(after.values()):
            break
        await asyncio.sleep(0.5)
    return {**asdict(tally), "duration_s": round(duration, 1), "metrics_after": after,
            "kv_back_in_pool": after.get("kv_cache_usage_perc") == 0.0,
            "idle_after": not after.get("num_requests_running")
            and not after.get("num_requests_waiting")}


ROWS = [
    ("duration (s)", "duration_s"), ("streams completed", "completed"),
    ("streams failed", "failed"), ("5xx answers", "status_5xx"),
    ("disconnects (on purpose)", "disconnects"), ("slow bodies cut off (408)", "slow_body_408"),
    ("slow bodies, other answer", "slow_body_other"),
    ("slow readers completed", "slow_readers_completed"),
    ("max stall between chunks (s)", "max_stall_s"), ("slowest /health (s)", "max_health_s"),
    ("/health failures", "health_failures"), ("idle afterwards", "idle_after"),
    ("KV blocks all back in the pool", "kv_back_in_pool"),
]


def write_results(tag: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"soak_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    fmt = {float: "{:.2f}", bool: "{}", int: "{:d}"}
    lines = [f"# Soak: {tag}", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}  ", f"Load: {result['load']}", "",
             "| metric | value |", "|---|---|"]
    for label, key in ROWS:
        value = result[key]
        lines.append(f"| {label} | {fmt[type(value)].format(value)} |")
    if result["errors"]:
        lines += ["", "Errors (first few):", *[f"- `{e}`" for e in result["errors"][:5]]]
    path = RESULTS_DIR / f"soak_{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--duration", type=float, default=120.0,
                   help="seconds during which new requests start (each then runs to its end)")
    p.add_argument("--concurrency", type=int, default=256, help="streaming clients")
    p.add_argument("--disconnects", type=int, default=50,
                   help="clients that leave after 1-5 chunks")
    p.add_argument("--slow-clients", type=int, default=20,
                   help="half trickle their body, half read their stream slowly")
    p.add_argument("--slow-read-delay", type=float, default=2.0,
                   help="seconds a slow reader waits between chunks")
    p.add_argument("--input-len", type=int, default=32, help="prompt words, at most")
    p.add_argument("--output-len", type=int, default=32, help="max_tokens, at most")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launch", action="store_true",
                   help="start `pagedserve serve` on a free port (ignores --base-url)")
    p.add_argument("--serve-args", default="--no-embedding-model --request-body-timeout 10",
                   help="arguments for the launched server")
    p.add_argument("--tag", default="default")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    loadavg = os.getloadavg()[0]

    def run(base_url: str) -> dict:
        model = args.model or first_model(base_url, args.api_key)
        return asyncio.run(soak(base_url, model, args))

    if args.launch:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        log = RESULTS_DIR / f"soak_{args.tag}.server.log"
        with launched_server(shlex.split(args.serve_args), log) as base_url:
            result = run(base_url)
        log.unlink()  # kept only if the server failed to start (launched_server raised)
    else:
        result = run(args.base_url)
    result.update(
        command="python benchmarks/soak.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, 1-min load avg before "
                f"{loadavg:.2f}",
        load=f"{args.concurrency} streams (prompts <= {args.input_len} words, max_tokens <= "
             f"{args.output_len}) for {args.duration:g} s, {args.disconnects} disconnects, "
             f"{args.slow_clients} slow clients (half slow bodies, half slow readers)")
    path = write_results(args.tag, result)
    print(path.read_text())


if __name__ == "__main__":
    main()
