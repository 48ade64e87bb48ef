"""Two `pagedserve serve` replicas behind nginx (deploy/nginx.conf, ports swapped), on
loopback: what clients see when a replica dies, and when replicas restart one at a time.

    python benchmarks/replicas.py --tag cpu_smollm2

1. Kill: 64 clients send mixed requests (half streaming chat, half non-streaming
   completions) through nginx; once a quarter are done, one replica is SIGKILLed. Reported:
   requests completed, retried by nginx onto the survivor (its access log's "a, b"
   upstreams), failed (each with the error its client saw: a stream cut before `[DONE]`,
   nginx's 502 JSON), hung (none may: every client has a timeout), and how long the
   survivor took to absorb the load (from the kill to the last completion).
2. Rolling restart: the same load while each replica in turn is sent SIGTERM (it stops
   accepting, finishes what it has: --shutdown-timeout), restarted, waited for on /health,
   and then until nginx has sent it a request that finished (nginx gives a recovering
   server one request per fail_timeout until one succeeds: restarting the next sooner can
   leave no live replica). Every request must complete.

Needs nginx on PATH (Debian: apt-get install nginx-light). Writes
benchmarks/results/replicas_<tag>.json and .md."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.serve import RESULTS_DIR, WORDS, free_port, pagedserve_process  # noqa: E402
from pagedserve.server.cli import DEFAULT_SERVED_NAME as MODEL  # noqa: E402

NGINX_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"
CLIENT_TIMEOUT_S = 300.0  # a request still unanswered after this counts as hung


@dataclass(slots=True)
class Outcome:
    kind: str  # "stream" or "completion"
    ok: bool
    error: str  # what the client saw; "" when ok
    start: float
    end: float


class Replica:
    """One `pagedserve serve` process on its own port, restartable."""

    def __init__(self, name: str, port: int, serve_args: list[str], workdir: Path) -> None:
        self.name, self.port, self.serve_args, self.workdir = name, port, serve_args, workdir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        cmd, env = pagedserve_process(self.port, self.serve_args)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))  # a share each
        self.starts += 1
        log = open(self.workdir / f"{self.name}.{self.starts}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout_s: float = 600.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise SystemExit(f"replica {self.name} exited with {self.proc.returncode}; "
                                 f"see {self.workdir}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise SystemExit(f"replica {self.name} not healthy after {timeout_s:.0f} s")

    def requests_finished(self) -> float:
        """Requests this process has finished (its /metrics), 0 when it can't say."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return 0.0
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("pagedserve_request_success_total"))

    def wait_in_rotation(self, timeout_s: float = 300.0) -> float:
        """Wait until the balancer sends this replica work again and one request finishes:
        nginx lets a recovering server take one request per fail_timeout until one
        succeeds, so one restarted sooner could leave it no live replica."""
        started = time.monotonic()
        while self.requests_finished() < 1:
            if time.monotonic() - started > timeout_s:
                raise SystemExit(f"replica {self.name} got no traffic back in {timeout_s:.0f} s")
            time.sleep(0.25)
        return time.monotonic() - started

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = 120.0) -> int:
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nginx(port: int, upstream_ports: list[int], workdir: Path) -> subprocess.Popen:
    conf = NGINX_CONF.read_text()
    conf = re.sub(r"listen \d+;", f"listen 127.0.0.1:{port};", conf)
    servers = iter(upstream_ports)
    conf = re.sub(r"server 127\.0\.0\.1:\d+", lambda m: f"server 127.0.0.1:{next(servers)}",
                  conf)
    conf = conf.replace("/var/log/nginx/pagedserve.log", str(workdir / "access.log"))
    path = workdir / "nginx.conf"
    path.write_text(conf)
    cmd = ["nginx", "-p", str(workdir), "-c", str(path), "-g",
           f"daemon off; pid {workdir / 'nginx.pid'}; error_log {workdir / 'error.log'};"]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("nginx did not start; see " + str(workdir / "error.log"))


# ---- the clients ----------------------------------------------------------------------
def _prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(24))


async def one_request(client: httpx.AsyncClient, base: str, i: int, max_tokens: int) -> Outcome:
    """Even i: a streaming chat completion, which succeeds only with a finish_reason and
    `[DONE]`; odd i: a non-streaming completion, which succeeds with a 200 and a choice."""
    stream = i % 2 == 0
    start = time.monotonic()
    error = ""
    try:
        if stream:
            payload = {"model": MODEL, "messages": [{"role": "user", "content": _prompt(i)}],
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True}
            finished = done = False
            async with client.stream("POST", base + "/v1/chat/completions",
                                     json=payload) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")
                    error = f"HTTP {response.status_code}: {body[:160]}"
                else:
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                error = f"error event: {json.dumps(chunk['error'])[:160]}"
                            for choice in chunk.get("choices") or []:
                                finished |= choice.get("finish_reason") is not None
                    if not error and not (finished and done):
                        error = "stream ended before its finish_reason and [DONE]"
        else:
            payload = {"model": MODEL, "prompt": _prompt(i), "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True}
            response = await client.post(base + "/v1/completions", json=payload)
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {response.text[:160]}"
            elif not response.json().get("choices"):
                error = "no choices"
    except httpx.TimeoutException:
        error = "hung: no answer within the client timeout"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return Outcome("stream" if stream else "completion", not error, error, start,
                   time.monotonic())


async def load(base: str, concurrency: int, max_tokens: int, until) -> list[Outcome]:
    """`concurrency` clients, each sending one request after another while until(requests
    sent so far, requests finished) is False; after a failure a client waits half a second
    before its next request, as the OpenAI SDK's retries do."""
    outcomes: list[Outcome] = []
    counter = iter(range(10**9))
    sent = [0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        async def worker():
            while not until(sent[0], len(outcomes)):
                sent[0] += 1
                outcome = await one_request(client, base, next(counter), max_tokens)
                outcomes.append(outcome)
                if not outcome.ok:
                    await asyncio.sleep(0.5)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def retried_requests(access_log: Path, since_line: int) -> tuple[int, int]:
    """(requests nginx passed on to a second replica, log lines) from its access log."""
    lines = access_log.read_text().splitlines() if access_log.exists() else []
    retried = sum(1 for line in lines[since_line:]
                  if re.search(r"upstream=[^ ]+, ", line) and "/v1/" in line)
    return retried, len(lines)


def summarize(outcomes: list[Outcome], retried: int, t0: float) -> dict:
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            key = re.sub(r"\d+\.\d+|\d{4,}", "N", o.error)[:120]  # times, ports
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(outcomes),
        "completed": sum(o.ok for o in outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "failed_streams": sum(not o.ok and o.kind == "stream" for o in outcomes),
        "failed_completions": sum(not o.ok and o.kind == "completion" for o in outcomes),
        "hung": sum(o.error.startswith("hung") for o in outcomes),
        "retried_by_nginx": retried,
        "duration_s": max(o.end for o in outcomes) - t0,
        "errors": errors,
    }


# ---- the two scenarios ------------------------------------------------------------------
async def kill_scenario(base: str, replicas: list[Replica], args, access_log: Path) -> dict:
    _, log_start = retried_requests(access_log, 0)
    victim, survivor = replicas
    total = args.num_requests
    killed_at: list[float] = []

    def until(sent: int, done: int) -> bool:
        if not killed_at and done >= total // 4:
            victim.signal(signal.SIGKILL)
            killed_at.append(time.monotonic())
        return sent >= total

    t0 = time.monotonic()
    outcomes = await load(base, args.concurrency, args.max_tokens, until)
    kill = killed_at[0]
    result = summarize(outcomes, retried_requests(access_log, log_start)[0], t0)
    after = [o for o in outcomes if o.ok and o.start >= kill]
    before = [o for o in outcomes if o.ok and o.end <= kill]
    result.update(
        killed_after_s=kill - t0,
        # The survivor alone, from the kill until the last request finished.
        absorb_s=max(o.end for o in outcomes) - kill,
        req_per_s_before_kill=len(before) / (kill - t0),
        req_per_s_after_kill=(len(after) / (max(o.end for o in after) - kill)) if after else 0.0,
    )
    return result


async def rolling_restart(base: str, replicas: list[Replica], args, access_log: Path) -> dict:
    _, log_start = retried_requests(access_log, 0)
    restarts: list[dict] = []
    cycle_done = asyncio.Event()

    async def cycle():
        await asyncio.sleep(3)  # under load first
        for replica in replicas:
            t = time.monotonic()
            replica.signal(signal.SIGTERM)
            code = await asyncio.to_thread(replica.wait_exit, args.shutdown_timeout + 60)
            drained = time.monotonic() - t
            replica.start()
            ready = await asyncio.to_thread(replica.wait_healthy)
            # As a Deployment's minReadySeconds: the next goes once this one serves again.
            back = await asyncio.to_thread(replica.wait_in_rotation)
            restarts.append({"replica": replica.name, "exit_code": code,
                             "drain_s": round(drained, 2), "restart_s": round(ready, 2),
                             "back_in_rotation_s": round(back, 2)})
        cycle_done.set()

    t0 = time.monotonic()
    task = asyncio.ensure_future(cycle())
    outcomes = await load(base, args.concurrency, args.max_tokens,
                          lambda sent, done: cycle_done.is_set() and sent >= args.num_requests)
    await task
    result = summarize(outcomes, retried_requests(access_log, log_start)[0], t0)
    result["restarts"] = restarts
    return result


def write_results(tag: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"replicas_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    kill, roll = result["kill"], result["rolling_restart"]
    rows = [("requests", "requests", "{:d}"), ("completed", "completed", "{:d}"),
            ("failed", "failed", "{:d}"), ("  of them streams", "failed_streams", "{:d}"),
            ("  of them non-streaming", "failed_completions", "{:d}"),
            ("hung", "hung", "{:d}"), ("retried by nginx", "retried_by_nginx", "{:d}"),
            ("duration (s)", "duration_s", "{:.1f}")]
    lines = [f"# Replicas behind nginx: {tag}", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}  ",
             f"Workload: {result['workload']}", "",
             "| | SIGKILL one replica | rolling restart (SIGTERM, restart, each in turn) |",
             "|---|---|---|"]
    lines += [f"| {label} | {fmt.format(kill[key])} | {fmt.format(roll[key])} |"
              for label, key, fmt in rows]
    lines += ["",
              f"Kill after {kill['killed_after_s']:.1f} s; the survivor absorbed the rest in "
              f"{kill['absorb_s']:.1f} s ({kill['req_per_s_before_kill']:.2f} req/s with two "
              f"replicas before, {kill['req_per_s_after_kill']:.2f} req/s alone after).", ""]
    for scenario, data in (("kill", kill), ("rolling restart", roll)):
        if data["errors"]:
            lines.append(f"What failed clients saw ({scenario}):")
            lines += [f"- {n} x `{e}`" for e, n in data["errors"].items()]
            lines.append("")
    lines.append("Restarts: " + "; ".join(
        f"{r['replica']} exit {r['exit_code']}, drained in {r['drain_s']} s, healthy again "
        f"{r['restart_s']} s after its start, serving through nginx "
        f"{r['back_in_rotation_s']} s later" for r in roll["restarts"]))
    md = RESULTS_DIR / f"replicas_{tag}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-requests", type=int, default=128, help="per scenario")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="each replica's --shutdown-timeout (drain time on SIGTERM)")
    p.add_argument("--serve-args", default="", help="more `pagedserve serve` arguments")
    p.add_argument("--tag", default="cpu_smollm2")
    args = p.parse_args(argv)
    if args.num_requests < 2 * args.concurrency:
        # The kill comes after a quarter of the requests finish: some must be left to send.
        p.error("--num-requests must be at least twice --concurrency")
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is not on PATH (Debian: apt-get install nginx-light)")
    workdir = Path(tempfile.mkdtemp(prefix="pagedserve-replicas-"))
    serve_args = ["--shutdown-timeout", str(args.shutdown_timeout), *args.serve_args.split()]
    replicas = [Replica(name, free_port(), serve_args, workdir) for name in ("a", "b")]
    nginx = None
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_healthy()
        port = free_port()
        nginx = start_nginx(port, [r.port for r in replicas], workdir)
        base = f"http://127.0.0.1:{port}"
        access_log = workdir / "access.log"
        kill = asyncio.run(kill_scenario(base, replicas, args, access_log))
        print(json.dumps(kill, indent=2))
        replicas[0].wait_exit()
        replicas[0].start()
        replicas[0].wait_healthy()
        roll = asyncio.run(rolling_restart(base, replicas, args, access_log))
        print(json.dumps(roll, indent=2))
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait()
        for replica in replicas:
            replica.stop()
    result = {
        "command": "python benchmarks/replicas.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"load avg {os.getloadavg()[0]:.2f}",
        "workload": f"{args.concurrency} concurrent clients, half streaming chat, half "
                    f"non-streaming completions, {args.max_tokens} tokens each (ignore_eos); "
                    f"2 replicas of `pagedserve serve {' '.join(serve_args)}` behind "
                    f"deploy/nginx.conf; logs in {workdir}",
        "kill": kill, "rolling_restart": roll, "args": vars(args),
    }
    print(write_results(args.tag, result))


if __name__ == "__main__":
    main()
