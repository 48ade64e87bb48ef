"""`pagedserve serve` as a process, the way a load balancer or an operator meets it: it
comes up healthy on the embedded model and exits cleanly on SIGTERM mid-stream."""

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


def test_serve_starts_and_stops_on_sigterm():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.server.cli", "serve", "--port", str(port),
         "--no-embedding-model", "--kv-cache-memory", str(128 << 20), "--shutdown-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.2)
        streamed = []

        def stream_forever():  # an in-flight request when SIGTERM arrives
            body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time",
                    "max_tokens": 2000, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", base + "/v1/completions", json=body,
                                  timeout=60) as response:
                    for line in response.iter_lines():
                        streamed.append(line)
            except httpx.HTTPError:
                pass

        client = threading.Thread(target=stream_forever, daemon=True)
        client.start()
        while not streamed:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down, so the status says SIGTERM.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        client.join(timeout=10)
        assert not client.is_alive()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert f"127.0.0.1:{port}" in log  # start-up says where it listens
    assert "Application shutdown complete" in log, log  # the lifespan ran: engine stopped
