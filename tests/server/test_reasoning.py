"""Reasoning models: --reasoning-parser takes `<think>...</think>` out of content into
reasoning_content (and reasoning), streamed as deltas; tool calls after the thinking are
still read; chat_template_kwargs and reasoning_effort reach the template. Parsers are
checked on recorded model texts, whole and character by character; the server on the
tiny model with Qwen3's real chat template (a fixture, no download), where guided decoding
makes its random output hold think tags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pagedserve.server.protocol import ChatCompletionRequest
from pagedserve.server.reasoning_parsers import get_reasoning_parser
from pagedserve.server.serving import ChoiceReader, chat_template_kwargs
from pagedserve.server.tool_parsers import get_tool_parser
from tests.server.conftest import MODEL_NAME, assert_invalid_request

QWEN3_TEMPLATE = (Path(__file__).parent / "fixtures" / "qwen3.jinja").read_text()

CASES = [  # parser, model text, reasoning, content
    ("deepseek_r1", "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.",
     "The answer is 4."),
    ("deepseek_r1", "<think>\nhmm, 2 + 2\n</think>\n\nyes", "hmm, 2 + 2", "yes"),
    ("deepseek_r1", "still thinking when max_tokens hit", "still thinking when max_tokens hit",
     ""),
    ("deepseek_r1", "a < b, so </thi", "a < b, so </thi", ""),
    ("qwen3", "<think>\nOkay, 2+2.\n</think>\n\n4", "Okay, 2+2.", "4"),
    ("qwen3", "\n<think>x</think>y", "x", "y"),
    ("qwen3", "Just an answer, < not a tag", None, "Just an answer, < not a tag"),
    ("qwen3", "  <thinking about it", None, "  <thinking about it"),
    ("qwen3", "<think>cut off", "cut off", ""),
    ("qwen3", "<think>a</think>b</think>c", "a", "b</think>c"),
    ("qwen3", "<think>\n\n</think>\n\nno thoughts", None, "no thoughts"),
    ("qwen3", "<think>x</think>\n    indented code", "x", "    indented code"),
]


@pytest.mark.parametrize("name, text, reasoning, content", CASES)
def test_parsers_whole_and_character_by_character(name, text, reasoning, content):
    parser = get_reasoning_parser(name)
    assert parser().parse(text) == (reasoning, content)
    streamed = parser()
    pieces = [streamed.feed(ch) for ch in text] + [streamed.finish()]
    assert "".join(r for r, _ in pieces) == (reasoning or "")
    assert "".join(c for _, c in pieces) == content


def test_tool_calls_after_the_thinking_are_read():
    text = ('<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": '
            '"get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    hermes = get_tool_parser("hermes")
    qwen3 = get_reasoning_parser("qwen3")
    reasoning, content, calls = ChoiceReader(qwen3(), hermes()).parse(text)
    assert reasoning == "The user wants the weather." and content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather",
                                                                   {"city": "Oslo"})]
    reader = ChoiceReader(qwen3(), hermes())
    deltas = [d for i, ch in enumerate(text)
              for d in reader.stream(ch, finished=i == len(text) - 1)]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == reasoning
    assert not any(d.get("content") for d in deltas)
    names = [call["function"]["name"] for d in deltas for call in d.get("tool_calls", [])
             if "name" in call.get("function", {})]
    assert names == ["get_weather"]
    hidden = ChoiceReader(qwen3(), None, include_reasoning=False)
    assert hidden.parse("<think>x</think>y") == (None, "y", [])


def test_reasoning_tokens_are_counted_through_the_closing_tag():
    """usage.output_tokens_details.reasoning_tokens: the generated tokens up to and with
    `</think>` (token 99 here), streamed in deltas or whole; 0 for a choice that did not
    think, or when the tag is no single token of the vocabulary."""
    pieces = [("<think>", [7]), ("hmm", [8, 9]), ("</think>", [99]), ("\n\n4", [10, 11])]

    def count(think_end_id, pieces, parser="qwen3"):
        reader = ChoiceReader(get_reasoning_parser(parser)(), None, think_end_id=think_end_id)
        for i, (text, ids) in enumerate(pieces):
            reader.stream(text, finished=i == len(pieces) - 1)
            reader.count(ids)
        return reader.reasoning_tokens

    assert count(99, pieces) == 4
    assert count(99, [("".join(t for t, _ in pieces), [7, 8, 9, 99, 10, 11])]) == 4
    assert count(99, [("<think>cut", [7, 8]), (" off", [9])]) == 3  # never closed
    assert count(99, [("just an answer", [1, 2, 3])]) == 0
    assert count(None, pieces) == 0
    assert count(99, [("x", [5])] + pieces[2:], "deepseek_r1") == 2  # opened in the prompt


def test_template_kwargs_carry_reasoning_effort():
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                    reasoning_effort="high",
                                    chat_template_kwargs={"enable_thinking": False})
    assert chat_template_kwargs(request) == {"enable_thinking": False,
                                             "reasoning_effort": "high"}


@pytest.fixture(scope="module")
def qwen3_app(long_server):
    from pagedserve.server.app import build_app

    app = build_app(long_server.async_engine, [MODEL_NAME], chat_template=QWEN3_TEMPLATE,
                    reasoning_parser="qwen3")
    return TestClient(app)  # no `with`: the lifespan would shut the shared engine down


# Guided decoding makes the random model write a thought, then an answer.
THINKING = r"<think>\n[a-z]{3,8}\n</think>\n\n[a-z]{2,6}"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


def test_reasoning_content_over_http_streamed_and_not(qwen3_app):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 60, "temperature": 0,
            "structured_outputs": {"regex": THINKING}}
    whole = qwen3_app.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    message = whole.json()["choices"][0]["message"]
    assert re.fullmatch("[a-z]{3,8}", message["reasoning_content"]), message
    assert message["reasoning"] == message["reasoning_content"]
    assert re.fullmatch("[a-z]{2,6}", message["content"]), message
    lines = qwen3_app.post("/v1/chat/completions", json={**body, "stream": True}).text
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in lines.splitlines()
              if line.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    hidden = qwen3_app.post("/v1/chat/completions", json={**body, "include_reasoning": False})
    assert hidden.json()["choices"][0]["message"]["reasoning_content"] is None
    assert hidden.json()["choices"][0]["message"]["content"] == message["content"]


def test_chat_template_kwargs_reach_the_template(qwen3_app):
    def prompt(**extra) -> str:
        tokens = qwen3_app.post("/tokenize", json={"messages": MESSAGES, **extra}).json()
        return qwen3_app.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]

    assert prompt().endswith("<|im_start|>assistant\n")
    off = prompt(chat_template_kwargs={"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    refused = qwen3_app.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}})
    assert "tokenize" in assert_invalid_request(refused, "chat_template_kwargs")


def test_guided_output_is_content_even_for_a_parser_that_opens_in_reasoning(long_server):
    """deepseek_r1 reads unmarked output as thinking, but a guided request's output is the
    grammar's from its first token: it stays content (and forced tool calls stay calls)."""
    from pagedserve.server.app import build_app

    app = TestClient(build_app(long_server.async_engine, [MODEL_NAME],
                               chat_template=QWEN3_TEMPLATE, reasoning_parser="deepseek_r1"))
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    guided = app.post("/v1/chat/completions", json={
        **body, "structured_outputs": {"choice": ["yes", "no"]}}).json()["choices"][0]
    assert guided["message"]["content"] in ("yes", "no")
    assert guided["message"]["reasoning_content"] is None
    tool = {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {}}}}
    forced = app.post("/v1/chat/completions", json={
        **body, "max_tokens": 40, "tools": [tool], "tool_choice": "required",
        "parallel_tool_calls": False}).json()["choices"][0]
    assert [c["function"]["name"] for c in forced["message"]["tool_calls"]] == ["now"]
    free = app.post("/v1/chat/completions", json={**body, "max_tokens": 4}).json()
    message = free["choices"][0]["message"]  # unguided: no </think>, so all thinking
    assert message["content"] is None and message["reasoning_content"]


def test_guided_output_follows_the_thinking_when_the_engine_waits_for_it(tmp_path):
    """An engine given the reasoning tags holds the grammar until `</think>`; the server
    then reads the thinking where the prompt opened it (here a template ending in
    `<think>`, as DeepSeek-R1's does): an empty thought, then the grammar's answer as
    content, never `</think>yes`."""
    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.engine.config import EngineConfig
    from pagedserve.server.app import build_app
    from tests.tiny_models import build_thinking_tokenizer, build_tiny_model

    tokenizer, _, end = build_thinking_tokenizer(tmp_path / "tokenizer")
    model = build_tiny_model(tmp_path / "model", "llama", vocab_size=end + 1)
    engine = AsyncEngine(EngineConfig(model=str(model), tokenizer=str(tokenizer),
                                      kv_cache_memory=8 << 20,
                                      reasoning_tags=("<think>", "</think>")))
    template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}Answer: <think>\n{% endif %}")
    with TestClient(build_app(engine, [MODEL_NAME], chat_template=template,
                              reasoning_parser="deepseek_r1")) as client:
        body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 10, "temperature": 0,
                "logit_bias": {str(end): 100}, "structured_outputs": {"choice": ["yes", "no"]}}
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["content"] in ("yes", "no") and message["reasoning_content"] is None
