"""`pagedserve serve` as a process, the way a load balancer or an operator meets it: it
comes up healthy on the embedded model and exits cleanly on SIGTERM mid-stream."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server.conftest import _free_port

pytestmark = pytest.mark.slow


def _running(base: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        if line.startswith("pagedserve_num_requests_running "):
            return float(line.split()[1])
    raise AssertionError("no pagedserve_num_requests_running in /metrics")


def _wait_healthy(proc: subprocess.Popen, base: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become healthy"
        time.sleep(0.2)


def test_serve_starts_and_stops_on_sigterm():
    """SIGTERM mid-request: past --shutdown-timeout, every stream still ends with a chunk
    that has a finish_reason, then [DONE] (a Responses stream with response.failed); a
    non-streaming request gets a 503 in OpenAI's JSON; the process exits 0 with no
    traceback in its log."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.server.cli", "serve", "--port", str(port),
         "--no-embedding-model", "--kv-cache-memory", str(128 << 20), "--shutdown-timeout", "2",
         # Shutdown is the subject, not the compiled forward (minutes to compile cold).
         "--enforce-eager"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    long = {"model": "SmolLM2-135M-Instruct", "max_tokens": 2000, "ignore_eos": True}
    requests = {  # in flight when SIGTERM arrives, none can finish within the timeout
        "completion stream": ("/v1/completions",
                              dict(long, prompt="Once upon a time", stream=True)),
        "chat stream n=2": ("/v1/chat/completions",
                            dict(long, messages=[{"role": "user", "content": "Hi"}],
                                 n=2, stream=True)),
        "completion": ("/v1/completions", dict(long, prompt="Once upon a time")),
        "responses stream": ("/v1/responses", {"input": "Tell me a story",
                                               "max_output_tokens": 2000, "stream": True}),
    }
    answers: dict[str, tuple[int, list[str]]] = {}
    try:
        _wait_healthy(proc, base)

        def send(name: str, path: str, body: dict) -> None:
            with httpx.stream("POST", base + path, json=body, timeout=60) as response:
                answers[name] = (response.status_code, list(response.iter_lines()))

        clients = [threading.Thread(target=send, args=(name, *request), daemon=True)
                   for name, request in requests.items()]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while _running(base) < 5:  # 1 + 2 + 1 + 1 sequences
            assert time.monotonic() < deadline, "the requests did not start running"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        for client in clients:
            client.join(timeout=10)
            assert not client.is_alive()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert f"127.0.0.1:{port}" in log  # start-up says where it listens
    assert "Application shutdown complete" in log, log  # the lifespan ran: engine stopped
    assert "Traceback" not in log and "CancelledError" not in log, log

    for name in ("completion stream", "chat stream n=2"):
        status, lines = answers[name]
        assert status == 200, (name, lines)
        data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]", (name, data[-3:])
        chunks = [json.loads(d) for d in data[:-1]]
        assert all("error" not in chunk for chunk in chunks), (name, chunks[-3:])
        finished = {choice["index"]: choice["finish_reason"]
                    for chunk in chunks for choice in chunk["choices"]
                    if choice.get("finish_reason") is not None}
        expected = 2 if name.startswith("chat") else 1
        assert finished == dict.fromkeys(range(expected), "abort"), (name, finished)
    status, lines = answers["responses stream"]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert status == 200 and events[-1]["type"] == "response.failed", events[-1:]
    assert events[-1]["response"]["error"]["code"] == "server_shutting_down"
    status, lines = answers["completion"]
    assert status == 503, lines
    error = json.loads("".join(lines))["error"]
    assert error["code"] == "server_shutting_down" and error["message"], error


def test_serve_exits_when_its_engine_dies(tmp_path):
    """A tensor-parallel worker killed mid-stream: the stream ends with an error event, and
    the process exits 1 within seconds (so a balancer's passive checks see refused
    connections and a supervisor restarts it), leaving no worker behind."""
    import shutil

    from pagedserve.engine.loader.resolve import resolve_model
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", "llama", vocab_size=49152,
                             max_position_embeddings=16384)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(resolve_model(None) / name, model / name)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.server.cli", "serve", str(model), "--port",
         str(port), "--no-embedding-model", "--kv-cache-memory", str(32 << 20), "-tp", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base)
        (worker,) = _spawned_children(proc.pid)
        body = {"model": str(model), "prompt": "Once", "max_tokens": 16000, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # it is running
            os.kill(worker, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert "error" in json.loads(rest[-2][6:]) and rest[-1] == "data: [DONE]", rest[-3:]
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert "the engine died" in log, log
    assert not _spawned_children(proc.pid)


def _spawned_children(pid: int) -> list[int]:
    """Live processes spawned (multiprocessing's spawn) by `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if ppid == pid and spawned:
            found.append(int(entry))
    return found
