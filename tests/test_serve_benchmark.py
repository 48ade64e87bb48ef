"""benchmarks/serve.py against a fake OpenAI-compatible streaming server started in the test:
counts, token sums and metric consistency (no timing thresholds)."""

import asyncio
import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

SERVE_PY = Path(__file__).resolve().parent.parent / "benchmarks" / "serve.py"
MODEL = "fake-model"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SERVE_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


class FakeServer:
    """Streams max_tokens content chunks ("tok0 ", "tok1 ", ...) and a final usage chunk;
    prompts containing FAIL get a 500. Records the peak number of requests in flight."""

    def __init__(self) -> None:
        # Real (not string) annotations below: FastAPI must see `Request` to inject it.
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse

        self.in_flight = self.peak_in_flight = self.num_requests = 0
        self.payloads: list[dict] = []
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

        async def stream(body: dict, chat: bool):
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                n = body["max_tokens"]
                if chat:  # a role-only first chunk carries no content: not the first token
                    yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                for i in range(n):
                    await asyncio.sleep(0.002)
                    choice = ({"index": 0, "delta": {"content": f"tok{i} "}} if chat
                              else {"index": 0, "text": f"tok{i} "})
                    yield _sse({"choices": [choice]})
                yield _sse({"choices": [], "usage": {"prompt_tokens": 10,
                                                     "completion_tokens": n,
                                                     "total_tokens": 10 + n}})
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1

        async def handle(request: Request, chat: bool):
            body = await request.json()
            self.num_requests += 1
            self.payloads.append(body)
            text = json.dumps(body.get("messages") if chat else body.get("prompt"))
            if "FAIL" in text:
                return JSONResponse({"error": {"message": "boom", "type": "server_error"}},
                                    status_code=500)
            return StreamingResponse(stream(body, chat), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await handle(request, chat=True)

        self.app = app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@pytest.fixture(scope="module")
def fake():
    server_state = FakeServer()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(server_state.app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    server_state.base_url = f"http://127.0.0.1:{port}/v1"
    yield server_state
    server.should_exit = True
    thread.join(timeout=10)


def _reset(fake) -> None:
    fake.num_requests = fake.peak_in_flight = 0
    fake.payloads.clear()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_six_requests_at_concurrency_two(fake, endpoint):
    _reset(fake)
    specs = bench.synthetic_requests(6, input_len=12, output_len=5, seed=0)
    specs[3].max_tokens = 9  # uneven lengths: the token sum must follow usage, not a constant
    result = asyncio.run(bench.run_benchmark(fake.base_url, MODEL, endpoint, specs,
                                             max_concurrency=2))
    assert result["completed"] == 6 and result["failed"] == 0, result["errors"]
    assert fake.num_requests == 6
    assert 1 <= fake.peak_in_flight <= 2
    assert result["total_output_tokens"] == 5 * 5 + 9
    assert result["total_input_tokens"] == 6 * 10  # from usage, not the word estimate
    requests = result["requests"]
    for r, spec in zip(requests, specs):
        assert r["success"] and r["output_tokens"] == spec.max_tokens
        assert 0 < r["ttft"] <= r["latency"]
        assert len(r["itl"]) == spec.max_tokens - 1  # one gap between each content chunk
        assert sum(r["itl"]) <= r["latency"] - r["ttft"] + 1e-9
    assert result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    assert result["median_ttft_ms"] <= result["p99_ttft_ms"]
    assert result["mean_tpot_ms"] > 0 and result["mean_itl_ms"] > 0
    assert result["request_throughput"] == pytest.approx(6 / result["duration_s"])
    assert result["output_throughput"] == pytest.approx(34 / result["duration_s"])
    # What the benchmark asks of the server: streaming with usage, exact lengths.
    body = fake.payloads[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["model"] == MODEL
    assert ("messages" in body) == (endpoint == "chat")


def test_failed_requests_are_counted_not_measured(fake):
    _reset(fake)
    specs = bench.synthetic_requests(4, input_len=8, output_len=3, seed=1)
    specs[1].prompt = "FAIL " + specs[1].prompt
    result = asyncio.run(bench.run_benchmark(fake.base_url, MODEL, "completions", specs,
                                             request_rate=1000.0, seed=1))
    assert result["completed"] == 3 and result["failed"] == 1
    assert result["total_output_tokens"] == 9
    assert any("HTTP 500" in e for e in result["errors"])


def test_sharegpt_loader(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "hi there"},
                           {"from": "gpt", "value": "one two three"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn"}]},
        {"conversations": [{"from": "human", "value": "tell me a story"},
                           {"from": "gpt", "value": " ".join(["w"] * 50)}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    specs = bench.sharegpt_requests(path, 2, max_output_len=20, seed=0)
    by_prompt = {s.prompt: s.max_tokens for s in specs}
    assert by_prompt == {"hi there": 3, "tell me a story": 20}
    with pytest.raises(SystemExit):
        bench.sharegpt_requests(path, 3, max_output_len=20, seed=0)


def test_main_writes_json_and_markdown(fake, tmp_path, monkeypatch):
    _reset(fake)
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    bench.main(["--base-url", fake.base_url, "--sweep-concurrency", "1,2",
                "--sweep-num-prompts", "2,4", "--input-len", "8", "--output-len", "3",
                "--tag", "fake"])
    result = json.loads((tmp_path / "serve_fake.json").read_text())
    assert result["model"] == MODEL  # the first of /v1/models
    assert "--sweep-concurrency 1,2" in result["command"]
    assert [r["max_concurrency"] for r in result["runs"]] == [1, 2]
    assert [r["completed"] for r in result["runs"]] == [2, 4]
    assert fake.num_requests == 1 + 2 + 4  # warmup + the two runs
    prompts = [p["prompt"] for p in fake.payloads]
    assert len(set(prompts)) == len(prompts)  # no run reuses another's prompts
    md = (tmp_path / "serve_fake.md").read_text()
    assert "c=1 (2 req)" in md and "c=2 (4 req)" in md and "| median TTFT (ms) |" in md
