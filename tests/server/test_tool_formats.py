"""The other models' tool-call formats (tool_choice "auto"): Qwen3-Coder's XML, Llama 3's
JSON, the pythonic lists of Llama 3.2 / 4, and Mistral's [TOOL_CALLS], on recorded model
texts, whole and character by character; and --tool-call-parser auto's pick from a chat
template's markers."""

from __future__ import annotations

import json

import pytest

from pagedserve.server.tool_parsers import detect_tool_parser, get_tool_parser

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "zip": {"type": "string"},
                                     # Optional[str], as pydantic writes it
                                     "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                                     "flag": {"type": ["string", "null"]}}}}},
         {"type": "function", "function": {"name": "now"}}]
OSLO = ("get_weather", {"city": "Oslo", "days": 3})

CASES = {  # parser, text, content, calls as (name, arguments)
    "qwen3_xml one": ("qwen3_xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\n"
                      "Oslo\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n"
                      "</tool_call>", None, [OSLO]),
    "qwen3_xml typed by the schema": (
        "qwen3_xml", "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=zip>\n"
        "0150\n</parameter>\n</function>\n</tool_call>", "Let me check.",
        [("get_weather", {"zip": "0150"})]),
    "qwen3_xml optional strings stay text": (
        "qwen3_xml", "<tool_call>\n<function=get_weather>\n<parameter=note>\n12345\n"
        "</parameter>\n<parameter=flag>\ntrue\n</parameter>\n<parameter=extra>\n7\n"
        "</parameter>\n<parameter=city>\n\nOslo\n\n</parameter>\n</function>\n</tool_call>",
        None, [("get_weather", {"note": "12345", "flag": "true", "extra": "7",
                                "city": "\nOslo\n"})]),
    "qwen3_xml two": ("qwen3_xml", "<tool_call>\n<function=now>\n</function>\n</tool_call>\n"
                      "<tool_call>\n<function=now>\n</function>\n</tool_call>", None,
                      [("now", {}), ("now", {})]),
    "qwen3_xml not a call": ("qwen3_xml", "<tool_call>\nnot xml\n</tool_call>",
                             "<tool_call>\nnot xml\n</tool_call>", []),
    "llama3 json": ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo", '
                    '"days": 3}}', None, [OSLO]),
    "llama3 python_tag, two": ("llama3_json", '<|python_tag|>{"name": "now", "parameters": '
                               '{}}; {"name": "get_weather", "parameters": {"city": "Oslo", '
                               '"days": 3}}', None, [("now", {}), OSLO]),
    "llama3 plain": ("llama3_json", "The weather is fine.", "The weather is fine.", []),
    "llama3 braces that are not a call": ("llama3_json", '{"answer": 42}', '{"answer": 42}',
                                          []),
    "pythonic two": ("pythonic", '[get_weather(city="Oslo", days=3), now()]', None,
                     [OSLO, ("now", {})]),
    "pythonic llama4": ("pythonic", "<|python_start|>[get_weather(city='Oslo', days=3)]"
                        "<|python_end|>", None, [OSLO]),
    "pythonic literals": ("pythonic", "[now(flag=true, ids=[1, 2], opts={'a': None})]", None,
                          [("now", {"flag": True, "ids": [1, 2], "opts": {"a": None}})]),
    "pythonic not calls": ("pythonic", "[1] First point.", "[1] First point.", []),
    "pythonic code is not run": ("pythonic", "[now(x=__import__('os'))]",
                                 "[now(x=__import__('os'))]", []),
    **{f"pythonic refuses {label}": ("pythonic", text, text, []) for label, text in (
        ("complex", "[now(x=1+2j)]"), ("a set", "[now(x={1, 2})]"), ("bytes", '[now(x=b"a")]'),
        ("unhashable keys", "[now(x={[1]: 2})]"), ("tuple keys", "[now(x={(1, 2): 3})]"),
        ("NaN", "[now(x=1e999)]"), ("deep nesting", "[now(x=" + "-" * 3000 + "1)]"),
        ("repeated keys", "[now(a=1, a=2)]"), ("**kwargs", "[now(**{'a': 1})]"))},
    "mistral list": ("mistral", 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": '
                     '{"city": "Oslo", "days": 3}}]', "Sure.", [OSLO]),
    "mistral v11": ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 3}'
                    '[TOOL_CALLS]now[ARGS]{}', None, [OSLO, ("now", {})]),
    "mistral without its marker token": ("mistral", '[{"name": "now", "arguments": {}}]',
                                         None, [("now", {})]),
    "mistral plain": ("mistral", "No tools needed.", "No tools needed.", []),
}
MARKERS = ("<tool_call>", "<function=", "<|python_tag|>", "[TOOL_CALLS]", "<|python_start|>")


def pairs(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("case", list(CASES))
def test_whole_text(case):
    name, text, content, calls = CASES[case]
    got_content, got_calls = get_tool_parser(name)(tools=TOOLS).parse(text)
    assert (got_content, pairs(got_calls)) == (content, calls)


@pytest.mark.parametrize("case", list(CASES))
def test_character_by_character_equals_whole(case):
    name, text, content, calls = CASES[case]
    reader = get_tool_parser(name)(tools=TOOLS)
    deltas = [reader.feed(ch) for ch in text] + [reader.finish()]
    assert "".join(d.content for d in deltas) == (content or "")
    assert pairs(reader.calls) == calls
    if calls:  # a format's markup never leaks into content, however the text is cut
        assert not any(m in d.content for d in deltas for m in MARKERS)
    opened = [e for d in deltas for e in d.tool_calls if "id" in e]
    assert [e["function"]["name"] for e in opened] == [c[0] for c in calls]


@pytest.mark.parametrize("name, text", [
    ("llama3_json", '{"name": "now", "parameters": {}}; {"name": "now", "parameters": {}}'),
    ("pythonic", "[now(), now()]"),
    ("mistral", '[TOOL_CALLS][{"name": "now", "arguments": {}}, '
                '{"name": "now", "arguments": {}}]'),
    ("qwen3_xml", "<tool_call><function=now></function></tool_call>" * 2),
])
def test_without_parallel_calls_only_the_first(name, text):
    assert len(get_tool_parser(name)(parallel=False, tools=TOOLS).parse(text)[1]) == 1


@pytest.mark.parametrize("template, expected", [
    ("{{ '<tool_call>\\n<function=' }}{{ '<parameter=' }}", "qwen3_xml"),  # Qwen3-Coder
    ("... within <tool_call></tool_call> XML tags ...", "hermes"),  # Qwen2.5 / Qwen3
    ("{{- '[AVAILABLE_TOOLS]' }} ... {{- '[TOOL_CALLS]' }}", "mistral"),
    ("[func_name1(params_name1=params_value1, ...)]", "pythonic"),  # Llama 3.2 pythonic
    ("{{- '<|python_start|>' }}", "pythonic"),  # Llama 4
    ('{"name": function name, "parameters": dictionary of argument name and its value}',
     "llama3_json"),  # Llama 3.1 / 3.3
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes"),  # knows no tools
    (None, "hermes"),
])
def test_auto_picks_the_format_from_the_template(template, expected):
    assert detect_tool_parser(template) == expected


def test_auto_reads_llama3_calls_end_to_end(long_server):
    """Llama 3.2's real chat template (a fixture) -> --tool-call-parser auto picks
    llama3_json; the tiny model, made to write a Llama-style call (guided decoding), gets
    it back as tool_calls, streamed and not."""
    from pathlib import Path

    from fastapi.testclient import TestClient

    from pagedserve.server.app import build_app
    from tests.server.conftest import MODEL_NAME

    template = (Path(__file__).parent / "fixtures" / "llama3.2.jinja").read_text()
    app = build_app(long_server.async_engine, [MODEL_NAME], chat_template=template)
    assert app.state.serving.tool_parser.name == "llama3_json"
    client = TestClient(app)  # no `with`: the lifespan would shut the shared engine down
    written = '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}'
    body = {"model": MODEL_NAME, "max_tokens": 60, "temperature": 0, "tools": TOOLS,
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "structured_outputs": {"choice": [written]}}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    (call,) = whole["message"]["tool_calls"]
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == OSLO
    lines = client.post("/v1/chat/completions", json={**body, "stream": True}).text
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in lines.splitlines()
              if line.startswith("data: {")]
    names = [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])
             if c.get("function", {}).get("name")]
    assert names == ["get_weather"] and not any(d.get("content") for d in deltas)


def test_auto_reads_mistral_calls_and_the_next_turn_renders(long_server):
    """Mistral-7B-Instruct-v0.3's real chat template (a fixture) -> auto picks mistral; the
    call comes back with a 9-character id, which that template demands when the call and
    its result come back as history in the next turn."""
    from pathlib import Path

    from fastapi.testclient import TestClient

    from pagedserve.server.app import build_app
    from tests.server.conftest import MODEL_NAME

    template = (Path(__file__).parent / "fixtures" / "mistral-7b-instruct-v0.3.jinja").read_text()
    app = build_app(long_server.async_engine, [MODEL_NAME], chat_template=template)
    assert app.state.serving.tool_parser.name == "mistral"
    client = TestClient(app)  # no `with`: the lifespan would shut the shared engine down
    question = {"role": "user", "content": "Weather in Oslo?"}
    written = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}]'
    response = client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "max_tokens": 60, "temperature": 0, "tools": TOOLS,
        "messages": [question], "structured_outputs": {"choice": [written]}})
    message = response.json()["choices"][0]["message"]
    (call,) = message["tool_calls"]
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == OSLO
    assert len(call["id"]) == 9 and call["id"].isalnum()
    history = [question, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": call["id"], "content": "-3 C"}]
    tokens = client.post("/tokenize", json={"messages": history, "tools": TOOLS})
    assert tokens.status_code == 200, tokens.text
    prompt = client.post("/detokenize", json={"tokens": tokens.json()["tokens"]}).json()
    assert f'"call_id": "{call["id"]}"}}[/TOOL_RESULTS]' in prompt["prompt"]
