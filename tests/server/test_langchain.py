"""LangChain's OpenAI integrations against the server, with only base_url changed:
ChatOpenAI over the tiny chat model, OpenAIEmbeddings over the embedded all-MiniLM-L6-v2."""

from __future__ import annotations

import langchain_openai
import numpy as np
import pytest

from tests.server.conftest import EMBEDDING_MODEL_NAME, MODEL_NAME

PROMPT = "Name three colors."
DOCS = ["The cat sat on the mat.", "Paged attention keeps the KV cache in blocks.", "hi"]


@pytest.fixture(scope="module")
def chat(server_with_embeddings):
    return langchain_openai.ChatOpenAI(base_url=server_with_embeddings.v1, api_key="x",
                                       model=MODEL_NAME, temperature=0, max_tokens=8,
                                       max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def embeddings(server_with_embeddings):
    # check_embedding_ctx_length=False sends text: the default would tokenize with tiktoken,
    # whose encodings cannot be downloaded here (and whose ids mean nothing to MiniLM).
    return langchain_openai.OpenAIEmbeddings(base_url=server_with_embeddings.v1, api_key="x",
                                             model=EMBEDDING_MODEL_NAME,
                                             check_embedding_ctx_length=False, max_retries=0)


def test_invoke_and_stream_agree(chat):
    message = chat.invoke(PROMPT)
    assert isinstance(message.content, str) and message.content
    assert message.response_metadata["model_name"] == MODEL_NAME
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    usage = message.usage_metadata
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    chunks = list(chat.stream(PROMPT))
    assert len(chunks) > 1
    assert "".join(chunk.content for chunk in chunks) == message.content


def test_batch(chat):
    single = chat.invoke(PROMPT).content
    replies = chat.batch([PROMPT, "Say hello.", PROMPT])
    assert len(replies) == 3 and all(r.content for r in replies)
    assert replies[0].content == replies[2].content == single  # greedy, any batch


def test_embed_documents_and_query(embeddings, embedding_engine):
    expected, _ = embedding_engine.embed(DOCS)
    docs = embeddings.embed_documents(DOCS)
    assert len(docs) == 3 and all(len(v) == 384 for v in docs)
    np.testing.assert_allclose(np.array(docs), expected.numpy(), atol=1e-5)
    query = embeddings.embed_query(DOCS[1])
    np.testing.assert_allclose(query, docs[1], atol=1e-5)
    assert np.linalg.norm(query) == pytest.approx(1.0, abs=1e-5)
