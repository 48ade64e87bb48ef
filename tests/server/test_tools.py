"""Tool calling over HTTP with the openai SDK: forced calls (tool_choice "required" and a
named function) made valid by guided decoding even from the tiny random model, streamed
calls that reassemble into the non-streamed ones, "auto" calls read from Hermes markup,
multi-turn tool conversations, and the 400s."""

from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import MODEL_NAME
from tests.server.conftest import assert_invalid_request as invalid

MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "enum": ["Oslo", "Paris", "Lima"]},
                          "celsius": {"type": "boolean"}},
           "required": ["city", "celsius"], "additionalProperties": False}
ALERTS = {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}},
          "required": ["level"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_alerts", "parameters": ALERTS}},
    {"type": "function", "function": {"name": "now", "description": "The time"}},
]
SCHEMAS = {"get_weather": WEATHER, "get_alerts": ALERTS,
           "now": {"type": "object", "maxProperties": 0}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def assert_valid_calls(calls) -> list[tuple[str, dict]]:
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    assert len({c.id for c in calls}) == len(calls)
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def reassemble(stream, n: int = 1):
    """Streamed chat chunks -> per choice (content, [(name, arguments)], finish_reason),
    checking OpenAI's shape: an opening entry with id, type and name, then arguments."""
    content, calls, reasons = [""] * n, [{} for _ in range(n)], [None] * n
    for chunk in stream:
        for choice in chunk.choices:
            i, delta = choice.index, choice.delta
            content[i] += delta.content or ""
            assert "<tool_call" not in (delta.content or "")
            for entry in delta.tool_calls or ():
                if entry.id is not None:
                    assert entry.index == len(calls[i]) and entry.type == "function"
                    assert entry.function.arguments == ""
                    calls[i][entry.index] = [entry.function.name, ""]
                else:
                    assert entry.function.name is None
                    calls[i][entry.index][1] += entry.function.arguments
            if choice.finish_reason is not None:
                assert reasons[i] is None
                reasons[i] = choice.finish_reason
    return [(content[i], [(name, json.loads(args)) for name, args in calls[i].values()],
             reasons[i]) for i in range(n)]


def test_named_tool_choice_returns_that_call(long_client):
    out = long_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS,
                                              tool_choice=NAMED, n=2, temperature=1.0, seed=5,
                                              max_tokens=40)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = assert_valid_calls(choice.message.tool_calls)
        assert [name for name, _ in calls] == ["get_weather"]
    no_args = long_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "now"}})
    assert assert_valid_calls(no_args.choices[0].message.tool_calls) == [("now", {})]


def test_required_tool_choice_calls_some_tool(long_client):
    for seed in range(3):
        out = long_client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=60)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(assert_valid_calls(choice.message.tool_calls)) == 1


@pytest.mark.parametrize("tool_choice", [NAMED, "required"])
def test_streamed_calls_reassemble_into_the_non_streamed_ones(long_client, tool_choice):
    # (without `now`, whose arguments are just "{}": every call here has arguments to stream)
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS[:2],
                  tool_choice=tool_choice, parallel_tool_calls=False, temperature=0,
                  max_tokens=60)
    whole = long_client.chat.completions.create(**kwargs)
    expected = assert_valid_calls(whole.choices[0].message.tool_calls)
    chunks = list(long_client.chat.completions.create(**kwargs, stream=True))
    (content, calls, reason), = reassemble(chunks)
    assert (content, calls, reason) == ("", expected, "tool_calls")
    fragments = [e for c in chunks for e in c.choices[0].delta.tool_calls or ()
                 if e.id is None]
    assert len(fragments) > 3  # the arguments stream as they are generated


# Forces the model to write a Hermes call after some text, so that tool_choice "auto" has
# markup to read even from a random model (guided_regex constrains, it does not force a call).
HERMES_REGEX = (r'Checking[.]\n<tool_call>\n\{"name": "get_weather", "arguments": '
                r'\{"city": "(Oslo|Lima)", "celsius": (true|false)\}\}\n</tool_call>')


def test_auto_reads_hermes_calls_from_the_output(long_client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=1,
                  max_tokens=120, n=2, extra_body={"guided_regex": HERMES_REGEX})
    whole = long_client.chat.completions.create(**kwargs)
    for choice in whole.choices:
        assert choice.message.content == "Checking."
        assert choice.finish_reason == "tool_calls"
        assert [name for name, _ in assert_valid_calls(choice.message.tool_calls)] == [
            "get_weather"]
    streamed = reassemble(long_client.chat.completions.create(**kwargs, stream=True), n=2)
    assert streamed == [(c.message.content, assert_valid_calls(c.message.tool_calls),
                         "tool_calls") for c in whole.choices]
    # free text without markup is plain content
    plain = long_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS,
                                                temperature=0, max_tokens=8)
    assert plain.choices[0].message.tool_calls in (None, [])
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_none_leaves_the_tools_out(long_client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=4)
    bare = long_client.chat.completions.create(**kwargs)
    none = long_client.chat.completions.create(**kwargs, tools=TOOLS, tool_choice="none")
    auto = long_client.chat.completions.create(**kwargs, tools=TOOLS)
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens
    assert none.choices[0].message.content == bare.choices[0].message.content
    assert auto.usage.prompt_tokens > bare.usage.prompt_tokens + 100  # the tool prompt


HISTORY = MESSAGES + [
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_abc", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "celsius": true}'}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "-3 and snowing"},
]


def test_multi_turn_with_tool_results(long_client, long_http):
    out = long_client.chat.completions.create(model=MODEL_NAME, messages=HISTORY, tools=TOOLS,
                                              tool_choice="none", temperature=0, max_tokens=4)
    assert out.choices[0].message.content is not None
    tokens = long_http.post("/tokenize",
                            json={"messages": HISTORY, "tools": TOOLS}).json()["tokens"]
    prompt = long_http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    # SmolLM2's template knows no tools: the default prompt and Hermes text stand in.
    assert "<tools>" in prompt and '"name": "get_alerts"' in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Oslo", "celsius": true}}\n</tool_call><|im_end|>') in prompt
    assert ('<|im_start|>user\n<tool_response>\n{"name": "get_weather", "content": '
            '"-3 and snowing"}\n</tool_response><|im_end|>') in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_call_arguments_whose_escapes_spell_a_lone_surrogate_pass_as_text(long_http):
    """The arguments are JSON text; one escaping a lone surrogate ("\\ud800") is valid
    text but parses into a string no tokenizer takes: the template gets the text as sent
    (it was a vague 400 "cannot apply the chat template")."""
    arguments = '{"city": "Oslo \\ud800"}'
    history = [HISTORY[0], {**HISTORY[1], "tool_calls": [
        {**HISTORY[1]["tool_calls"][0], "function": {"name": "get_weather",
                                                     "arguments": arguments}}]}, *HISTORY[2:]]
    response = long_http.post("/tokenize", json={"messages": history, "tools": TOOLS})
    assert response.status_code == 200, response.text
    prompt = long_http.post("/detokenize", json={"tokens": response.json()["tokens"]})
    assert json.dumps(arguments)[1:-1] in prompt.json()["prompt"]


TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}"
    "({{ c.function.arguments.city }}){% endfor %}"
    "{% if m.tool_call_id %} [for {{ m.tool_call_id }}]{% endif %}|{% endfor %}")


def test_a_template_that_knows_tools_renders_them_itself(long_server):
    from pagedserve.server.app import build_app

    app = build_app(long_server.async_engine, [MODEL_NAME], chat_template=TOOL_TEMPLATE)
    client = TestClient(app)  # no `with`: the lifespan would shut the shared engine down
    tokens = client.post("/tokenize", json={"messages": HISTORY, "tools": TOOLS}).json()
    prompt = client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert prompt == ("TOOLS:get_weather;get_alerts;now;|"
                      "user: What is the weather in Oslo?|"
                      "assistant: CALL get_weather(Oslo)|"
                      "tool: -3 and snowing [for call_abc]|")


def test_bad_tool_requests_are_400s(long_http):
    chat = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8}
    assert "nope" in invalid(long_http.post("/v1/chat/completions", json={
        **chat, "tools": TOOLS, "tool_choice": {"type": "function", "function": {
            "name": "nope"}}}), "tool_choice")
    invalid(long_http.post("/v1/chat/completions", json={**chat, "tool_choice": "required"}),
           "tool_choice")
    invalid(long_http.post("/v1/chat/completions", json={**chat, "tools": TOOLS,
                                                   "tool_choice": "sometimes"}), "tool_choice")
    invalid(long_http.post("/v1/chat/completions", json={**chat, "tools": [
        {"type": "function", "function": {"name": "bad name!"}}]}), "tools")
    invalid(long_http.post("/v1/chat/completions", json={
        **chat, "tools": TOOLS, "tool_choice": "required",
        "response_format": {"type": "json_object"}}), "response_format")
    assert long_http.get("/health").status_code == 200


def test_required_calls_stop_where_the_model_repeats_itself(long_client):
    """Under tool_choice "required" the tiny model writes the same call twice (and would go
    on): the reply ends at the repeat, never sending it, with finish_reason "tool_calls",
    streamed or not; the request stops there."""
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.", "parameters": {
        "type": "object", "required": ["city"],
        "properties": {"city": {"type": "string", "enum": ["Oslo", "Paris"]}}}}}
    kwargs = dict(model=MODEL_NAME, temperature=0, max_tokens=60, tool_choice="required",
                  tools=[weather], messages=[{"role": "user", "content": "Weather in Oslo?"}])
    response = long_client.chat.completions.create(**kwargs)
    whole = response.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert len(calls) == len(set(calls)) == 1 and whole.finish_reason == "tool_calls"
    chunks = list(long_client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    opened = [c.function.name for chunk in chunks if chunk.choices
              for c in chunk.choices[0].delta.tool_calls or () if c.function.name]
    reasons = [chunk.choices[0].finish_reason for chunk in chunks
               if chunk.choices and chunk.choices[0].finish_reason]
    assert opened == ["get_weather"] and reasons == ["tool_calls"]
    # Both stop the request at the repeat instead of running on to max_tokens.
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens < 60
