"""The product as users meet it: the embedded SmolLM2-135M-Instruct behind the OpenAI API,
driven by the real openai SDK."""

import pytest

from tests.server.conftest import REAL_MODEL_NAME as SERVED

pytestmark = pytest.mark.slow


@pytest.fixture
def client(real_server):
    from openai import OpenAI

    return OpenAI(base_url=real_server.v1, api_key="unused")


def test_chat_answers_paris(client):
    reply = client.chat.completions.create(
        model=SERVED, temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert reply.usage.completion_tokens + reply.usage.prompt_tokens == reply.usage.total_tokens


def test_streamed_chat_equals_non_streamed(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model=SERVED, messages=messages, temperature=0,
                                           max_tokens=24)
    stream = client.chat.completions.create(model=SERVED, messages=messages, temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_with_stop_string(client):
    out = client.completions.create(model=SERVED, prompt="The capital of France is",
                                    temperature=0, max_tokens=16, stop=["Paris"])
    assert "Paris" not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
