"""The app's edges without a real server: API key, engine overload/death, health."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from pagedserve.engine.async_engine import (
    EngineDeadError,
    EngineOverloadedError,
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


def test_api_key_guards_v1_only(server):
    # No `with`: the lifespan (which shuts the engine down) does not run.
    client = TestClient(build_app(server.async_engine, [MODEL_NAME], api_key="s3cret"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL_NAME
    assert client.get("/health").status_code == 200  # load balancers probe without a key


@pytest.mark.parametrize("error, status, code", [
    (EngineOverloadedError("10 requests are already waiting"), 503, "engine_overloaded"),
    (EngineDeadError("the engine loop died"), 500, "engine_dead"),
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


def test_health_is_503_when_the_engine_is_dead(real_engine):
    client = TestClient(build_app(FailingEngine(real_engine, RuntimeError(), healthy=False),
                                  [MODEL_NAME]))
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["error"]["type"]


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
