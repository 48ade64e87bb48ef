"""The app's edges without a real server: API key, engine overload/death, health."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from pagedserve.engine.async_engine import (
    EngineDeadError,
    EngineOverloadedError,
    EngineShutDownError,
    RequestFailedError,
)
from pagedserve.engine.tokenization import AsyncTokenizer
from pagedserve.server.app import build_app
from tests.server.conftest import MODEL_NAME

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class FailingEngine:
    """Looks like AsyncEngine to the app (its public API: model_info, get_tokenizer, stats,
    generate); every generate() fails with `error`."""

    def __init__(self, real, error: Exception, healthy: bool = True, tokenizer=None) -> None:
        self.model_info = real.model_info
        self._tokenizer = tokenizer or real.get_tokenizer()
        self.stats = real.stats
        self.error = error
        self.is_healthy = healthy

    def get_tokenizer(self):
        return self._tokenizer

    async def generate(self, request_id, prompt, params):
        raise self.error
        yield  # an async generator, like AsyncEngine.generate

    async def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def real_engine(server):
    return server.async_engine


def test_api_key_guards_v1_and_tokenization(server):
    # No `with`: the lifespan (which shuts the engine down) does not run.
    client = TestClient(build_app(server.async_engine, [MODEL_NAME], api_key="s3cret"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                    {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer"}):
        for response in (client.get("/v1/models", headers=headers),
                         client.post("/tokenize", json={"prompt": "hi"}, headers=headers),
                         client.post("/detokenize", json={"tokens": [1]}, headers=headers)):
            assert response.status_code == 401, (headers, response.request.url)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
    for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme in any case (RFC 7235)
        ok = client.get("/v1/models", headers={"Authorization": f"{scheme} s3cret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL_NAME
    tokens = client.post("/tokenize", json={"prompt": "hi"},
                         headers={"Authorization": "Bearer s3cret"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    # Load balancers and scrapers probe without a key.
    for path in ("/health", "/version", "/metrics"):
        assert client.get(path).status_code == 200, path


def test_two_authorization_headers_are_a_400(server):
    """Which of two headers would win depends on the proxy in front: refuse both."""
    client = TestClient(build_app(server.async_engine, [MODEL_NAME], api_key="s3cret"))
    for pair in (["Bearer wrong", "Bearer s3cret"], ["Bearer s3cret", "Bearer s3cret"]):
        response = client.get("/v1/models",
                              headers=[("Authorization", pair[0]), ("Authorization", pair[1])])
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_authorization_header"


def test_protected_metrics_and_no_docs(server):
    client = TestClient(build_app(server.async_engine, [MODEL_NAME], api_key="s3cret",
                                  protect_metrics=True, enable_docs=False))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404, path
    assert TestClient(build_app(server.async_engine, [MODEL_NAME])).get(
        "/openapi.json").status_code == 200


@pytest.mark.parametrize("model, root", [(None, MODEL_NAME),  # the embedded default
                                         ("/models/smol.gguf", "/models/smol.gguf")])
def test_models_root_is_what_the_user_named_not_a_cache_path(real_engine, model, root):
    engine = FailingEngine(real_engine, RuntimeError())
    engine.model_info = dataclasses.replace(
        real_engine.model_info, model=model, model_dir="/root/.cache/pagedserve/gguf/1f2e")
    response = TestClient(build_app(engine, [MODEL_NAME])).get("/v1/models")
    (card,) = [c for c in response.json()["data"] if c["id"] == MODEL_NAME]
    assert card["root"] == root


def test_internal_errors_carry_an_id_not_the_exception(real_engine, caplog):
    secret = "/home/alice/secret/path"
    engine = FailingEngine(real_engine, KeyError(secret))  # a bug, not a client's error
    client = TestClient(build_app(engine, [MODEL_NAME]), raise_server_exceptions=False)
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500
    error = response.json()["error"]
    assert secret not in response.text and error["code"] == "internal_error"
    error_id = error["message"].rsplit(" ", 1)[-1].rstrip(")")
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True}).text
    assert secret not in streamed and "internal_error" in streamed


@pytest.mark.parametrize("error, status, code", [
    (EngineOverloadedError("10 requests are already waiting"), 503, "engine_overloaded"),
    (EngineDeadError("the engine loop died"), 500, "engine_dead"),
    (EngineShutDownError("the engine is shut down"), 503, "server_shutting_down"),
    (RequestFailedError("request x failed: RuntimeError"), 500, "request_failed"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_engine_errors_map_to_status(real_engine, error, status, code, stream):
    client = TestClient(build_app(FailingEngine(real_engine, error), [MODEL_NAME]))
    for path, body in (("/v1/chat/completions", CHAT),
                       ("/v1/completions", {"prompt": "hi", "max_tokens": 2})):
        response = client.post(path, json={**body, "stream": stream})
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
        assert str(error) in response.json()["error"]["message"]
        # Overloaded or shutting down: when to try again, as OpenAI's API says it.
        assert (response.headers.get("retry-after") == "1") == (status == 503)


def test_health_is_503_when_the_engine_is_dead(real_engine):
    client = TestClient(build_app(FailingEngine(real_engine, RuntimeError(), healthy=False),
                                  [MODEL_NAME]))
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["error"]["type"]
    assert "retry-after" not in response.headers  # no retry brings a dead engine back


def test_no_chat_template_is_a_clear_400(real_engine):
    tokenizer = AsyncTokenizer(SimpleNamespace(
        apply_chat_template=lambda *a, **k: (_ for _ in ()).throw(ValueError("no template"))))
    client = TestClient(build_app(FailingEngine(real_engine, RuntimeError(),
                                                tokenizer=tokenizer), [MODEL_NAME]))
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400 and "chat template" in response.json()["error"]["message"]


def test_oversize_body_is_413(server):
    client = TestClient(build_app(server.async_engine, [MODEL_NAME], max_body_bytes=1000))
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    response = client.post("/v1/chat/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced as the body streams in
        body = json.dumps(big).encode()
        for i in range(0, len(body), 500):
            yield body[i:i + 500]

    response = client.post("/v1/chat/completions", content=chunks(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


LONE = "ok \ud800 then"  # JSON can spell it ("\ud800"); no tokenizer takes it
TOOL = {"type": "function", "function": {"name": "f", "description": LONE}}


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONE}]},
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "system", "content": LONE},
                                                   {"role": "user", "content": "hi"}]},
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": LONE}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL]}, "tools.0.function.description"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stop": [LONE]}, "stop.0"),
    ("/v1/completions", {"prompt": LONE, "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", LONE], "max_tokens": 2}, "prompt.1"),
    ("/v1/completions", {"prompt": LONE, "echo": True, "stream": True, "max_tokens": 2},
     "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": LONE}, "model"),
    ("/v1/embeddings", {"input": [LONE]}, "input.0"),
    ("/tokenize", {"prompt": LONE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
])
def test_invalid_unicode_is_a_400_naming_the_field(server, path, body, field):
    client = TestClient(build_app(server.async_engine, [MODEL_NAME]))
    response = client.post(path, content=json.dumps(body),  # ASCII: the surrogate as \ud800
                           headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and "Unicode" in error["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "a " * 60_000, "max_tokens": 2}),
    ("/v1/completions", {"prompt": ["hi", "a " * 60_000], "max_tokens": 2}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a " * 60_000}]}),
    ("/tokenize", {"prompt": "a " * 60_000}),
])
def test_text_too_long_for_the_context_is_refused_before_tokenizing(server, path, body):
    """More characters than the context's tokens can hold (its longest token's length
    times max_model_len, with room to spare) is a 400 at once: tokenizing megabytes would
    hold the tokenizer thread for as many seconds."""
    app = build_app(server.async_engine, [MODEL_NAME])
    serving = app.state.serving
    assert 2 * 60_000 > serving.max_prompt_chars  # 256 tokens x 4 x the longest token
    calls = []
    tokenizer = serving.tokenizer
    original = tokenizer.encode, tokenizer.render_chat
    tokenizer.encode = lambda *a, **k: calls.append("encode")
    tokenizer.render_chat = lambda *a, **k: calls.append("render_chat")
    try:
        response = TestClient(app).post(path, json=body)
    finally:
        tokenizer.encode, tokenizer.render_chat = original
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
    assert calls == []


def test_a_body_that_trickles_in_too_slowly_is_a_408():
    """A client that sends its body a byte now and then cannot hold a connection: the
    whole body has a deadline."""
    import asyncio

    from pagedserve.server.app import RequestBodyMiddleware

    async def app(scope, receive, send):  # what would run if the body had arrived
        raise AssertionError("the app ran")

    sent = []

    async def main():
        async def trickle():
            await asyncio.sleep(0.05)
            return {"type": "http.request", "body": b"{", "more_body": True}

        async def send(message):
            sent.append(message)

        middleware = RequestBodyMiddleware(app, max_bytes=1 << 20, timeout_s=0.3)
        scope = {"type": "http", "method": "POST", "path": "/v1/completions",
                 "headers": [(b"content-type", b"application/json")]}
        await asyncio.wait_for(middleware(scope, trickle, send), 5)

    asyncio.run(main())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 408 and json.loads(body)["error"]["code"] == "request_timeout"


@pytest.mark.parametrize("body, field", [
    ({"prompt": "hi", "logit_bias": {"\ud800": 1}}, "logit_bias.\\ud800"),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"\udc00": {}}}}}},
     "response_format.json_schema.schema.properties.\\udc00"),
])
def test_invalid_unicode_in_a_key_is_a_400_too(server, body, field):
    client = TestClient(build_app(server.async_engine, [MODEL_NAME]))
    response = client.post("/v1/completions", content=json.dumps({"max_tokens": 2, **body}),
                           headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_extra_message_fields_are_checked_too(server):
    client = TestClient(build_app(server.async_engine, [MODEL_NAME]))
    body = {**CHAT, "messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}
    response = client.post("/v1/chat/completions", content=json.dumps(body),
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.name"


def test_the_key_is_checked_under_a_root_path_and_before_the_body(server):
    # Behind `uvicorn --root-path /api`, a request's path carries the prefix.
    client = TestClient(build_app(server.async_engine, [MODEL_NAME], api_key="s3cret"),
                        root_path="/api")
    for path in ("/api/v1/models", "/api/tokenize"):
        assert client.post(path, json={"prompt": "hi"}).status_code == 401, path
    ok = client.get("/api/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    # No key, a body over the limit: 401 (the body is never read), not 413.
    big = TestClient(build_app(server.async_engine, [MODEL_NAME], api_key="s3cret",
                               max_body_bytes=100))
    assert big.post("/v1/completions", json={"prompt": "x" * 500}).status_code == 401


def test_huge_inputs_do_not_stall_a_running_stream(server):
    """A 10 MB /tokenize (refused by its length in characters) and one just inside that
    bound (tokenized in full, on the tokenizer's thread) while streams run: no stream
    waits more than a second for its next chunk. Before preprocessing moved off the event
    loop, the 10 MB one froze every stream and /health for ~53 s."""
    import threading
    import time

    import httpx

    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    gaps: list[float] = []
    done = threading.Event()

    def stream_until_done():  # one stream after another, so one runs throughout
        while not done.is_set():
            arrivals = []
            with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                              timeout=60) as response:
                for _ in response.iter_lines():
                    arrivals.append(time.monotonic())
            gaps.extend(b - a for a, b in zip(arrivals, arrivals[1:]))

    streamer = threading.Thread(target=stream_until_done, daemon=True)
    streamer.start()
    serving = build_app(server.async_engine, [MODEL_NAME]).state.serving
    try:
        with server.http_client() as http:
            while not gaps:
                time.sleep(0.01)
            huge = http.post("/tokenize", json={"prompt": "a " * 5_000_000})  # 10 MB
            assert huge.status_code == 400, huge.text[:300]
            assert huge.json()["error"]["code"] == "context_length_exceeded"
            inside = http.post("/tokenize",
                               json={"prompt": "ab " * (serving.max_prompt_chars // 3 - 1)})
            assert inside.status_code == 200 and inside.json()["count"] > 10_000
            # /chat: rendering the template is the other preprocessing step.
            chat = http.post("/v1/chat/completions", json={
                **CHAT, "messages": [{"role": "user", "content": "ab " * 5_000_000}]})
            assert chat.status_code == 400, chat.text[:300]
    finally:
        done.set()
        streamer.join(timeout=60)
    assert not streamer.is_alive() and gaps
    assert max(gaps) < 1.0, f"a stream waited {max(gaps):.2f} s for its next chunk"


def test_n_beyond_the_waiting_cap_is_a_400_naming_n(server):
    """A request whose n alone exceeds --max-waiting-requests can never be queued: 400 on
    `n` (not a 503 to retry), while a smaller n fits."""
    engine = server.async_engine
    client = TestClient(build_app(engine, [MODEL_NAME]))
    cap, engine.max_waiting_requests = engine.max_waiting_requests, 2
    try:
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 3})
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 2})
    finally:
        engine.max_waiting_requests = cap
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "n" and "max_waiting_requests=2" in error["message"]
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
