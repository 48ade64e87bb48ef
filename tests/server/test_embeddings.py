"""/v1/embeddings end to end: the openai SDK and raw httpx against a real server that
serves the embedded all-MiniLM-L6-v2 next to the tiny chat model."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.server.conftest import ALIAS, EMBEDDING_MODEL_NAME, MODEL_NAME, assert_openai_error

TEXTS = ["The cat sat on the mat.", "Paged attention keeps the KV cache in blocks.", "hi"]


@pytest.fixture(scope="module")
def client(server_with_embeddings):
    return server_with_embeddings.openai_client()


@pytest.fixture(scope="module")
def http(server_with_embeddings):
    with server_with_embeddings.http_client() as c:
        yield c


def test_models_lists_the_embedding_model(client):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [MODEL_NAME, ALIAS, EMBEDDING_MODEL_NAME]
    assert models[EMBEDDING_MODEL_NAME].model_extra["max_model_len"] == 256


def test_float_and_base64_give_the_same_vectors(client, http, embedding_engine):
    expected, counts = embedding_engine.embed(TEXTS)
    as_float = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=TEXTS,
                                        encoding_format="float")
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    as_base64 = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=TEXTS)
    assert as_float.object == "list" and as_float.model == EMBEDDING_MODEL_NAME
    assert [d.index for d in as_float.data] == [0, 1, 2]
    for response in (as_float, as_base64):
        got = torch.tensor([d.embedding for d in response.data])
        assert got.shape == (3, 384)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        assert response.usage.prompt_tokens == response.usage.total_tokens == sum(counts)
    raw = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL_NAME, "input": TEXTS[0],
                                            "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    # Bit-exact against the same input embedded alone (a batch pads, which moves ~1e-7).
    np.testing.assert_array_equal(vector, embedding_engine.embed(TEXTS[:1])[0][0].numpy())
    assert raw["usage"] == {"prompt_tokens": counts[0], "total_tokens": counts[0]}


def test_single_string_and_batch_agree(client):
    batch = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=TEXTS)
    for i, text in enumerate(TEXTS):
        one = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=text)
        assert len(one.data) == 1 and one.data[0].index == 0
        np.testing.assert_allclose(one.data[0].embedding, batch.data[i].embedding, atol=1e-5)


def test_token_id_input_equals_text_input(client, embedding_engine):
    ids = [embedding_engine.tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS]
    from_text = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=TEXTS)
    from_ids = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=ids)
    single = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=ids[1])
    assert len(single.data) == 1
    np.testing.assert_allclose(single.data[0].embedding, from_text.data[1].embedding, atol=1e-5)
    for a, b in zip(from_ids.data, from_text.data):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)
    assert from_ids.usage == from_text.usage


def test_dimensions_equal_to_the_model_is_accepted(client):
    response = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input="x", dimensions=384)
    assert len(response.data[0].embedding) == 384


@pytest.mark.parametrize("body, status, param, match", [
    ({"model": "nope", "input": "x"}, 404, "model", "`nope` does not exist"),
    ({"model": MODEL_NAME, "input": "x"}, 404, "model", "is a chat/completions model"),
    ({"model": EMBEDDING_MODEL_NAME, "input": "x", "dimensions": 128}, 400, "dimensions",
     "dimensions=128 is not supported"),
    ({"model": EMBEDDING_MODEL_NAME, "input": []}, 400, "input", "must not be empty"),
    ({"model": EMBEDDING_MODEL_NAME, "input": ""}, 400, "input", "input\\[0\\] is empty"),
    ({"model": EMBEDDING_MODEL_NAME, "input": "x", "truncate_prompt_tokens": 257}, 400,
     "truncate_prompt_tokens", "from 3 to 256, got 257"),
    ({"model": EMBEDDING_MODEL_NAME, "input": "x", "truncate_prompt_tokens": 2}, 400,
     "truncate_prompt_tokens", "from 3 to 256, got 2"),
    ({"model": EMBEDDING_MODEL_NAME, "input": [[1, 2], [99999]]}, 400, "input",
     "token ids must be in \\[0, 30522\\)"),
    ({"model": EMBEDDING_MODEL_NAME, "input": "x", "encoding_format": "int8"}, 400,
     "encoding_format", "encoding_format"),
    ({"model": EMBEDDING_MODEL_NAME, "input": ["x"] * 2049}, 400, "input", "at most 2048"),
])
def test_errors_are_openai_shaped(http, body, status, param, match):
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert re.search(match, error["message"]), error["message"]
    assert http.get("/health").status_code == 200


def test_long_inputs_are_truncated_as_sentence_transformers_does(client, embedding_engine):
    """By default (--embedding-overflow truncate) an input over 256 tokens keeps its first
    tokens, special ones included, and usage counts what was embedded; truncate_prompt_tokens
    keeps its last ones, as in vLLM (-1: the model's maximum). The vectors are those of the
    kept tokens."""
    long_text = "word " * 300 + "tail"
    content = embedding_engine.tokenizer(long_text, add_special_tokens=False).input_ids
    default = client.embeddings.create(model=EMBEDDING_MODEL_NAME,
                                       input=["short", long_text])
    assert default.usage.prompt_tokens == 256 + len(
        embedding_engine.tokenizer("short").input_ids)
    kept = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=content[:254])
    np.testing.assert_allclose(default.data[1].embedding, kept.data[0].embedding, atol=1e-5)
    for k, expected in ((10, 10), (-1, 256)):
        response = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=long_text,
                                            extra_body={"truncate_prompt_tokens": k})
        assert response.usage.prompt_tokens == expected
    # Asked for, it keeps the last tokens, as vLLM's truncate_prompt_tokens does.
    ten = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=content[-8:])
    short = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=[content],
                                     extra_body={"truncate_prompt_tokens": 10})
    np.testing.assert_allclose(short.data[0].embedding, ten.data[0].embedding, atol=1e-5)


def test_overflow_error_mode_is_a_400(server_with_embeddings, embedding_engine):
    """--embedding-overflow error keeps the strict behaviour; a request asking for
    truncation still gets it."""
    # No `with`: the lifespan would shut the engines down.
    app_client = TestClient(_app(server_with_embeddings, embedding_engine, "error"))
    body = {"model": EMBEDDING_MODEL_NAME, "input": ["ok", "word " * 300]}
    error = assert_openai_error(app_client.post("/v1/embeddings", json=body), 400, "input")
    assert error["code"] == "context_length_exceeded"
    assert "input[1] has 302 tokens" in error["message"]
    asked = app_client.post("/v1/embeddings", json={**body, "truncate_prompt_tokens": -1})
    assert asked.status_code == 200 and asked.json()["usage"]["prompt_tokens"] == 256 + 3


def _app(running, engine, overflow: str):
    """An app over the running server's engine and a new async front for `engine`."""
    from pagedserve.engine.embedding import AsyncEmbeddingEngine
    from pagedserve.server.app import build_app

    return build_app(running.async_engine, [MODEL_NAME],
                     embedding_engine=AsyncEmbeddingEngine(engine),
                     embedding_model_name=EMBEDDING_MODEL_NAME, embedding_overflow=overflow)


def test_no_embedding_model_is_a_clear_404(server_with_embeddings):
    app_client = TestClient(build_app_without_embeddings(server_with_embeddings))
    response = app_client.post("/v1/embeddings", json={"model": "m", "input": "x"})
    assert response.status_code == 404
    assert "serves no embedding model" in response.json()["error"]["message"]
    models = app_client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL_NAME]


def build_app_without_embeddings(running):
    from pagedserve.server.app import build_app

    return build_app(running.async_engine, [MODEL_NAME])


def test_megabytes_of_text_are_never_tokenized_in_full(server_with_embeddings,
                                                      embedding_engine, monkeypatch):
    """An input with more characters than max_seq_length tokens can cover: in error mode a
    400 before tokenizing; when truncating, only its first max_input_chars characters are
    tokenized (they already hold more tokens than are kept). Tokenizing megabytes would
    hold the embedding thread for seconds."""
    # WordPiece turns a word of up to 100 characters into one [UNK]: no token covers more.
    assert embedding_engine.max_input_chars == 256 * 4 * 100
    seen = []
    tokenizer = embedding_engine.tokenizer
    monkeypatch.setattr(embedding_engine, "tokenizer",
                        lambda texts, **k: seen.append(max(map(len, texts)))
                        or tokenizer(texts, **k))
    over = "ab " * 1_000_000  # 3 MB
    body = {"model": EMBEDDING_MODEL_NAME, "input": ["ok", over]}
    for overflow in ("error", "truncate"):
        app = _app(server_with_embeddings, embedding_engine, overflow)
        response = TestClient(app).post("/v1/embeddings", json=body)
        if overflow == "error":
            error = assert_openai_error(response, 400, "input")
            assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
            assert seen == []
        else:
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["prompt_tokens"] == 256 + 3
            assert seen == [embedding_engine.max_input_chars]
