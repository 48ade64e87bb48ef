"""Structured output over HTTP: response_format and vLLM's structured_outputs and guided_*
fields, streamed and not, driven by the openai SDK. The tiny random model's output is
well-formed only because of guided decoding, so these tests fail if the constraint does not
reach the engine; the real SmolLM2 covers json_object, whose open-ended objects a random
model never closes."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.server.conftest import MODEL_NAME, REAL_MODEL_NAME
from tests.server.conftest import assert_invalid_request as invalid

MESSAGES = [{"role": "user", "content": "Describe a pet."}]
# Closed value sets keep a random model's output short: it must end within a few tokens.
PET = {"type": "object",
       "properties": {"kind": {"type": "string", "enum": ["cat", "dog", "fish"]},
                      "indoor": {"type": "boolean"},
                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
       "required": ["kind", "indoor", "tags"], "additionalProperties": False}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET,
                                                     "strict": True}}


def streamed_texts(stream, n: int = 1) -> tuple[list[str], list[str | None]]:
    texts, reasons = [""] * n, [None] * n
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += getattr(choice, "text", None) or (
                choice.delta.content if hasattr(choice, "delta") else "") or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    return texts, reasons


def test_json_schema_sampled_n2_and_greedy_stream(long_client):
    sampled = long_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, response_format=PET_FORMAT, n=2, temperature=1.0,
        seed=3, max_tokens=60)
    for choice in sampled.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PET)
        assert choice.message.tool_calls in (None, [])
    greedy = long_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, response_format=PET_FORMAT, temperature=0,
        max_tokens=60)
    jsonschema.validate(json.loads(greedy.choices[0].message.content), PET)
    texts, reasons = streamed_texts(long_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, response_format=PET_FORMAT, temperature=0,
        max_tokens=60, stream=True))
    assert texts == [greedy.choices[0].message.content] and reasons == ["stop"]


def test_guided_fields_on_both_endpoints(long_client):
    # guided_json as JSON text, on /v1/completions, two prompts, streamed
    texts, reasons = streamed_texts(long_client.completions.create(
        model=MODEL_NAME, prompt=["A pet:", "Another pet:"], max_tokens=60, temperature=0,
        stream=True, extra_body={"guided_json": json.dumps(PET)}), n=2)
    for text in texts:
        jsonschema.validate(json.loads(text), PET)
    assert reasons == ["stop", "stop"]
    # response_format works on /v1/completions too (as in vLLM)
    out = long_client.completions.create(model=MODEL_NAME, prompt="A pet:", max_tokens=60,
                                         temperature=0, extra_body={"response_format": PET_FORMAT})
    jsonschema.validate(json.loads(out.choices[0].text), PET)
    choice = long_client.completions.create(model=MODEL_NAME, prompt="Is it?", max_tokens=10,
                                            n=3, temperature=1.0, seed=0,
                                            extra_body={"guided_choice": ["yes", "no way"]})
    assert {c.text for c in choice.choices} <= {"yes", "no way"}
    regex = r"\d{3}-[a-z]{2}"
    chat = long_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=20,
                                               temperature=0, extra_body={"guided_regex": regex})
    assert re.fullmatch(regex, chat.choices[0].message.content)
    assert chat.choices[0].finish_reason == "stop"
    grammar = 'root ::= "x" ("y" | "z") "!"'
    chat = long_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=20,
                                               temperature=0,
                                               extra_body={"guided_grammar": grammar})
    assert chat.choices[0].message.content in ("xy!", "xz!")
    text = long_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=3,
                                               temperature=0, response_format={"type": "text"})
    assert text.usage.completion_tokens <= 3  # text: no constraint, plain generation


def test_bad_constraints_are_400s_naming_the_field(long_http, long_client):
    chat = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8}
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}
    message = invalid(long_http.post("/v1/chat/completions",
                               json={**chat, "response_format": bad_schema}), "response_format")
    assert "no-such-type" in message
    invalid(long_http.post("/v1/chat/completions", json={**chat, "stream": True,
                                                   "response_format": bad_schema}),
           "response_format")
    invalid(long_http.post("/v1/chat/completions", json={**chat, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x"}}}), "response_format")
    invalid(long_http.post("/v1/chat/completions", json={**chat, "response_format": {
        "type": "yaml"}}), "response_format")
    invalid(long_http.post("/v1/completions", json={"prompt": "x", "guided_regex": "(unclosed"}),
           "guided_regex")
    invalid(long_http.post("/v1/completions", json={"prompt": "x", "guided_json": "{not json"}),
           "guided_json")
    message = invalid(long_http.post("/v1/chat/completions", json={
        **chat, "guided_regex": "a+", "guided_choice": ["a"]}), "guided_choice")
    assert "guided_regex" in message and "guided_choice" in message
    invalid(long_http.post("/v1/chat/completions", json={
        **chat, "response_format": {"type": "json_object"}, "guided_json": PET}), "guided_json")
    # the server is still fine
    ok = long_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=30,
                                             temperature=0, response_format=PET_FORMAT)
    jsonschema.validate(json.loads(ok.choices[0].message.content), PET)


@pytest.mark.slow
def test_json_object_with_the_real_model(real_server):
    client = real_server.openai_client()
    messages = [{"role": "user", "content": "Give the name and age of a person as JSON."}]
    kwargs = dict(model=REAL_MODEL_NAME, messages=messages, temperature=0, max_tokens=80,
                  response_format={"type": "json_object"})
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    texts, reasons = streamed_texts(client.chat.completions.create(**kwargs, stream=True))
    assert texts == [whole.choices[0].message.content] and reasons == ["stop"]


def nested_schema(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def test_a_grammar_too_slow_to_compile_is_a_400_and_stalls_nobody(long_server, long_http,
                                                                  long_client):
    """Grammars compile beside the engine thread, within a time limit: a schema nested 100
    deep (~0.1 s here; 300 deep takes ~9 s) against a 1 ms limit is a 400 naming the
    field, while a stream started before it runs on to its end."""
    engine = long_server.async_engine
    stream = long_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))  # the stream is running
    limit, engine.grammar_compile_timeout = engine.grammar_compile_timeout, 0.001
    try:
        message = invalid(long_http.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8,
            "guided_json": nested_schema(100)}), "guided_json")
    finally:
        engine.grammar_compile_timeout = limit
    assert "did not compile within" in message
    reasons = [c.choices[0].finish_reason for c in [first, *stream] if c.choices]
    assert reasons[-1] == "length"
    # Guided requests go on working, with the limit back as it was.
    ok = long_http.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 200, "temperature": 0,
        "guided_json": nested_schema(3)})
    assert ok.status_code == 200, ok.text


def test_vllm_structured_outputs_field(long_client, long_http):
    """vLLM >= 0.12 clients send `structured_outputs` (the guided_* fields are gone there):
    each kind constrains the output; a key this server does not implement is a 400 naming
    it, never a constraint silently dropped."""
    choice = long_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"choice": ["cat", "dog"]}})
    assert choice.choices[0].message.content in ("cat", "dog")
    regex = long_client.completions.create(
        model=MODEL_NAME, prompt="A number:", max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}"}})
    assert re.fullmatch("[0-9]{3}", regex.choices[0].text)
    schema = long_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=60, temperature=0,
        extra_body={"structured_outputs": {"json": PET, "disable_any_whitespace": True}})
    jsonschema.validate(json.loads(schema.choices[0].message.content), PET)
    chat = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4}
    message = invalid(long_http.post("/v1/chat/completions", json={
        **chat, "structured_outputs": {"regex": "a+", "whitespace_pattern": " "}}),
        "structured_outputs")
    assert "structured_outputs.whitespace_pattern" in message
    message = invalid(long_http.post("/v1/chat/completions", json={
        **chat, "structured_outputs": {"regex": "a+", "choice": ["a"]}}), "structured_outputs")
    assert "exactly one of" in message
    message = invalid(long_http.post("/v1/chat/completions", json={
        **chat, "structured_outputs": {"regex": "a+"}, "guided_choice": ["a"]}),
        "structured_outputs")
    assert "guided_choice" in message
