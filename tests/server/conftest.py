"""A real uvicorn server on a free 127.0.0.1 port, in a background thread, over a tiny
random-weight model with the embedded model's tokenizer (so text endpoints work); the
`server_with_embeddings` one also serves the embedded all-MiniLM-L6-v2, `long_server` has
room for tool prompts (1024 tokens), and `real_server` serves the embedded SmolLM2."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest

from tests.tiny_models import build_tiny_model

MODEL_NAME = "tiny"
ALIAS = "tiny-alias"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
MAX_MODEL_LEN = 256
LONG_MAX_MODEL_LEN = 1024  # a tool prompt alone is ~250 tokens
REAL_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class RunningServer:
    base_url: str  # e.g. http://127.0.0.1:PORT
    async_engine: object
    server: object
    thread: threading.Thread

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def openai_client(self):
        """The real OpenAI SDK pointed at this server (no retries: errors surface)."""
        import openai

        return openai.OpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=60)

    def http_client(self):
        """A plain httpx client for this server's routes, as a context manager."""
        import httpx

        return httpx.Client(base_url=self.base_url, timeout=60)


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    """`response` is an error in OpenAI's shape with this status (and param); its body."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_invalid_request(response, param: str) -> str:
    """A 400 invalid_request_error naming `param`; its message."""
    error = assert_openai_error(response, 400, param)
    assert error["type"] == "invalid_request_error"
    return error["message"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app, async_engine) -> RunningServer:
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", async_engine, server, thread)


def stop_server(running: RunningServer) -> None:
    running.server.should_exit = True
    running.thread.join(timeout=30)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-server"), "llama", vocab_size=49152,
                            max_position_embeddings=MAX_MODEL_LEN)


def make_async_engine(model_dir, **engine_overrides):
    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.engine.config import EngineConfig
    from pagedserve.engine.loader.resolve import resolve_model

    config = EngineConfig(model=str(model_dir), tokenizer=str(resolve_model(None)),
                          max_num_seqs=16, max_num_batched_tokens=256,
                          kv_cache_memory=8 << 20, **engine_overrides)
    return AsyncEngine(config)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from pagedserve.server.app import build_app

    async_engine = make_async_engine(tiny_model_dir)
    app = build_app(async_engine, [MODEL_NAME, ALIAS])
    running = start_server(app, async_engine)
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def embedding_engine():
    from pagedserve.engine.embedding import EmbeddingEngine

    return EmbeddingEngine()  # the embedded all-MiniLM-L6-v2, loaded once (~2 s)


@pytest.fixture(scope="module")
def server_with_embeddings(tiny_model_dir, embedding_engine):
    from pagedserve.engine.embedding import AsyncEmbeddingEngine
    from pagedserve.server.app import build_app

    async_engine = make_async_engine(tiny_model_dir)
    app = build_app(async_engine, [MODEL_NAME, ALIAS],
                    embedding_engine=AsyncEmbeddingEngine(embedding_engine),
                    embedding_model_name=EMBEDDING_MODEL_NAME)
    running = start_server(app, async_engine)
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def long_server(tmp_path_factory):
    """The tiny model with a 1024-token context, shared by the structured-output and tool
    tests (guided decoding makes even its random output well-formed)."""
    from pagedserve.server.app import build_app

    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-long"), "llama",
                                 vocab_size=49152, max_position_embeddings=LONG_MAX_MODEL_LEN)
    async_engine = make_async_engine(model_dir)
    running = start_server(build_app(async_engine, [MODEL_NAME]), async_engine)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def long_client(long_server):
    return long_server.openai_client()


@pytest.fixture(scope="module")
def long_http(long_server):
    with long_server.http_client() as c:
        yield c


@pytest.fixture(scope="session")
def real_server():
    """The embedded SmolLM2-135M-Instruct, for tests where the output must make sense."""
    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.engine.config import EngineConfig
    from pagedserve.server.app import build_app

    async_engine = AsyncEngine(EngineConfig(kv_cache_memory=256 << 20))
    running = start_server(build_app(async_engine, [REAL_MODEL_NAME]), async_engine)
    yield running
    stop_server(running)
