"""Tool-call readers and tool prompts without a server: the Hermes parser, the reader of
guided (forced) calls, the required-calls schema, and messages rendered for templates."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pagedserve.server.errors import APIError
from pagedserve.server.protocol import ChatCompletionRequest, ChatMessage
from pagedserve.server.tool_parsers import GuidedToolCallStream, HermesToolParser, get_tool_parser
from pagedserve.server.tools import (
    DEFAULT_TOOL_PROMPT,
    ToolPlan,
    conversation,
    required_calls_schema,
    template_knows_tools,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "days": {"type": "integer"}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]


def call(name: str, arguments: dict, spacing: str = "\n") -> str:
    return (f"<tool_call>{spacing}{json.dumps({'name': name, 'arguments': arguments})}"
            f"{spacing}</tool_call>")


def streamed(reader, pieces: list[str]):
    """Feed `pieces` one at a time; (content, calls as (name, arguments), delta entries)."""
    deltas = [reader.feed(p) for p in pieces] + [reader.finish()]
    content = "".join(d.content for d in deltas)
    entries = [e for d in deltas for e in d.tool_calls]
    calls: dict[int, dict] = {}
    for entry in entries:
        if "id" in entry:
            assert entry["index"] not in calls and entry["index"] == len(calls)
            assert entry["id"].startswith("call_") and entry["type"] == "function"
            assert entry["function"]["arguments"] == ""  # the opening entry carries no arguments
            calls[entry["index"]] = {"name": entry["function"]["name"], "arguments": ""}
        else:
            calls[entry["index"]]["arguments"] += entry["function"]["arguments"]
    for d in deltas:  # markup never leaks into content, however the text is cut
        assert "<tool" not in d.content and "</tool" not in d.content
    return content, [(c["name"], c["arguments"]) for c in calls.values()], deltas


def as_pairs(calls) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


HERMES_CASES = {
    "plain": ("  Just an answer.\n", "Just an answer.", []),
    "one call": (call("get_weather", {"city": "Oslo"}), None,
                 [("get_weather", '{"city": "Oslo"}')]),
    "two calls": (call("get_weather", {"city": "Oslo", "days": 2}) + "\n" + call("now", {}),
                  None, [("get_weather", '{"city": "Oslo", "days": 2}'), ("now", "{}")]),
    "text around": ("Let me check. " + call("now", {}, spacing="") + " Done <3",
                    "Let me check.  Done <3", [("now", "{}")]),
    "unterminated at the end": ("ok " + call("now", {})[:-len("</tool_call>")], "ok",
                                [("now", "{}")]),
    "cut inside the closing tag": ("ok " + call("now", {})[:-3], "ok", [("now", "{}")]),
    "markup in an argument": (call("get_weather", {"city": "<tool_call>"}), None,
                              [("get_weather", '{"city": "<tool_call>"}')]),
    "arguments as JSON text": ('<tool_call>{"name": "now", "arguments": "{\\"tz\\": 1}"}'
                               "</tool_call>", None, [("now", '{"tz": 1}')]),
}


@pytest.mark.parametrize("case", list(HERMES_CASES))
def test_hermes_parses_whole_text(case):
    text, content, calls = HERMES_CASES[case]
    got_content, got_calls = HermesToolParser().parse(text)
    assert got_content == content
    assert as_pairs(got_calls) == calls
    assert all(c.id.startswith("call_") for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("bad", ['{"name": "now", "arguments": {"a": }', '["now"]',
                                 '{"arguments": {}}', '{"name": "now", "arguments": 3}'])
def test_hermes_leaves_a_block_that_is_not_a_call_as_content(bad):
    text = f"before <tool_call>{bad}</tool_call> after"
    content, calls = HermesToolParser().parse(text)
    assert calls == [] and content == text
    # and a good call next to it still counts
    content, calls = HermesToolParser().parse(text + call("now", {}))
    assert content == text and as_pairs(calls) == [("now", "{}")]


def test_hermes_without_parallel_calls_keeps_the_first():
    text = call("get_weather", {"city": "Oslo"}) + call("now", {})
    _, calls = HermesToolParser(parallel=False).parse(text)
    assert as_pairs(calls) == [("get_weather", '{"city": "Oslo"}')]
    assert get_tool_parser("hermes") is HermesToolParser
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")


def _token_pieces(text: str) -> list[str]:
    from transformers import AutoTokenizer

    from pagedserve.engine.loader.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces, done = [], ""
    for i in range(1, len(ids) + 1):  # cumulative decode, as the engine's detokenizer sends
        whole = tokenizer.decode(ids[:i])
        pieces.append(whole[len(done):])
        done = whole
    assert "".join(pieces) == text
    return pieces


@pytest.fixture(scope="module")
def token_pieces():
    return {case: _token_pieces(text) for case, (text, _, _) in HERMES_CASES.items()}


@pytest.mark.parametrize("case", list(HERMES_CASES))
def test_hermes_stream_equals_whole_however_the_text_arrives(case, token_pieces):
    text, content, calls = HERMES_CASES[case]
    cuts = {"chars": list(text), "tokens": token_pieces[case],
            **{f"{n}-char pieces": [text[i:i + n] for i in range(0, len(text), n)]
               for n in (2, 3, 5, 11)}}
    for how, pieces in cuts.items():
        got_content, got_calls, deltas = streamed(HermesToolParser(), pieces)
        assert (got_content or None, got_calls) == (content, calls), how
    # A call is sent whole once its block closes: opening entry, then all its arguments.
    if calls:
        _, _, deltas = streamed(HermesToolParser(), list(text))
        with_calls = [d for d in deltas if d.tool_calls]
        assert [len(d.tool_calls) for d in with_calls] == [2] * len(calls)


REQUIRED_OUTPUT = ('[{"name": "get_weather", "parameters": {"city": "Sankt \\"}]\\" Ol", '
                   '"days": 10}}, {"parameters": {}, "name": "now"}]')


def test_guided_required_calls_stream_their_arguments_as_generated():
    whole_content, whole = GuidedToolCallStream().parse(REQUIRED_OUTPUT)
    assert whole_content is None
    assert [(c.name, json.loads(c.arguments)) for c in whole] == [
        ("get_weather", {"city": 'Sankt "}]" Ol', "days": 10}), ("now", {})]
    jsonschema.validate(json.loads(REQUIRED_OUTPUT), required_calls_schema(
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS).tools,
        parallel=True))
    content, calls, deltas = streamed(GuidedToolCallStream(), list(REQUIRED_OUTPUT))
    assert content == "" and calls == as_pairs(whole)
    # the first call opens as soon as its name is complete, long before its arguments end
    first_open = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert first_open < REQUIRED_OUTPUT.index("parameters")
    fragments = [e for d in deltas for e in d.tool_calls if e["index"] == 0 and "id" not in e]
    assert len(fragments) > 10


def _calls_json(*calls) -> str:
    return json.dumps([{"name": name, "parameters": args} for name, args in calls])


@pytest.mark.parametrize("text, expected", [
    # a no-argument function called again and again until max_tokens (cut mid-call)
    (_calls_json(("now", {}), ("now", {}), ("now", {}))[:-20], [("now", "{}")]),
    # a repeat ends the reply even when something else would follow
    (_calls_json(("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Oslo"}),
                 ("now", {})), [("get_weather", '{"city": "Oslo"}')]),
    # the same function with other arguments is no repeat: both calls, in order
    (_calls_json(("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Oslo 2"}),
                 ("now", {})),
     [("get_weather", '{"city": "Oslo"}'), ("get_weather", '{"city": "Oslo 2"}'),
      ("now", "{}")]),
])
def test_guided_required_calls_end_where_they_start_repeating(text, expected):
    """tool_choice "required" lets the model add calls until it closes the array; a small
    one repeats its call until max_tokens. The first repeat ends the reply, and is never
    sent, however the text arrives (a later call of a function already called opens only
    once its arguments differ)."""
    repeats = len(expected) < text.count('"name"')
    whole = GuidedToolCallStream()
    assert as_pairs(whole.parse(text)[1]) == expected and whole.repeating == repeats
    reader = GuidedToolCallStream()
    content, calls, _ = streamed(reader, list(text))
    assert calls == expected and reader.repeating == repeats


def test_guided_named_call_is_the_whole_output():
    text = '  {"city": "Oslo", "days": 3}\n'
    content, calls, deltas = streamed(GuidedToolCallStream("get_weather"), list(text))
    assert content == "" and calls == [("get_weather", '{"city": "Oslo", "days": 3}')]
    assert deltas[0].tool_calls[0]["function"]["name"] == "get_weather"  # opens at once
    _, whole = GuidedToolCallStream("get_weather").parse(text)
    assert as_pairs(whole) == calls
    # cut off by max_tokens: the call still comes, with the arguments generated so far
    _, cut = GuidedToolCallStream("get_weather").parse('{"city": "Os')
    assert as_pairs(cut) == [("get_weather", '{"city": "Os')]


def test_required_schema_allows_one_call_without_parallel_calls():
    tools = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS).tools
    one = [{"name": "now", "parameters": {}}]
    jsonschema.validate(one, required_calls_schema(tools, parallel=False))
    for bad in ([], one * 2, [{"name": "get_weather", "parameters": {"days": 1}}],
                [{"name": "nope", "parameters": {}}], [{"name": "now", "parameters": {"x": 1}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required_calls_schema(tools, parallel=False))


def _plan(**fields) -> ToolPlan:
    return ToolPlan.from_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}], **fields))


def test_tool_plan_modes_and_errors():
    assert _plan().mode == "none" and _plan(tools=TOOLS).mode == "auto"
    none = _plan(tools=TOOLS, tool_choice="none")
    assert none.prompt_tools is None and none.new_reader(HermesToolParser) is None
    named = _plan(tools=TOOLS, tool_choice={"type": "function",
                                            "function": {"name": "get_weather"}})
    assert named.guide_schema == WEATHER and named.mode == "named"
    assert _plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}}
                 ).guide_schema["properties"] == {}
    assert _plan(tools=TOOLS, tool_choice="required").guide_schema["minItems"] == 1
    with pytest.raises(APIError, match="'nope'") as exc:
        _plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert exc.value.param == "tool_choice"
    with pytest.raises(APIError, match="needs tools") as exc:
        _plan(tool_choice="required")
    assert exc.value.param == "tool_choice"
    with pytest.raises(APIError, match="distinct"):
        _plan(tools=TOOLS + TOOLS[:1])


HISTORY = [
    {"role": "user", "content": "Weather in Oslo and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "09:00"},
]


def test_conversation_for_a_template_without_tools_uses_hermes_text():
    messages = [ChatMessage(**m) for m in [{"role": "system", "content": "Be brief."}] + HISTORY]
    tools = [{"type": "function", "function": {"name": "now"}}]
    rendered = conversation(messages, tools, template_has_tools=False)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    system = rendered[0]["content"]
    assert system.startswith("Be brief.\n\n") and '{"type": "function", "function": ' \
        '{"name": "now"}}' in system and "<tool_call>" in system
    assert rendered[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    assert rendered[3]["content"] == (  # both results in one user turn, named by their call
        '<tool_response>\n{"name": "get_weather", "content": "-3 C"}\n</tool_response>\n'
        '<tool_response>\n{"name": "now", "content": "09:00"}\n</tool_response>')
    # no system message: the tool prompt becomes one; no tools: no prompt
    plain = conversation([ChatMessage(**HISTORY[0])], tools, template_has_tools=False)
    assert plain[0] == {"role": "system", "content": DEFAULT_TOOL_PROMPT.format(
        tools=json.dumps(tools[0]))}
    assert conversation([ChatMessage(**HISTORY[0])], None, False) == [HISTORY[0]]


def test_conversation_for_a_template_with_tools_passes_calls_through():
    rendered = conversation([ChatMessage(**m) for m in HISTORY], None, template_has_tools=True)
    assert rendered[1]["tool_calls"][0] == {"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Oslo"}}}
    assert rendered[1]["content"] == ""
    assert rendered[2] == {"role": "tool", "content": "-3 C", "tool_call_id": "call_1",
                           "name": "get_weather"}
    assert template_knows_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_knows_tools("{% for message in messages %}{% endfor %}")
    assert not template_knows_tools(None)
    assert template_knows_tools({"default": "x", "tool_use": "{{ tools }}"})
