"""POST /v1/responses with the real openai SDK (responses.create, responses.stream) and
LangChain's ChatOpenAI(use_responses_api=True), on the tiny model (guided decoding makes
its random output well-formed where a test needs that) and the embedded SmolLM2."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from pagedserve.server.reasoning_parsers import get_reasoning_parser
from pagedserve.server.responses import _Output
from pagedserve.server.serving import ChoiceReader
from tests.server.conftest import MODEL_NAME, REAL_MODEL_NAME, assert_openai_error

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "required": ["city"],
                          "properties": {"city": {"type": "string",
                                                  "enum": ["Oslo", "Paris"]}}}}
PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
       "required": ["kind"], "additionalProperties": False}
PET_FORMAT = {"format": {"type": "json_schema", "name": "pet", "schema": PET, "strict": True}}


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_text_matches_chat_completions(long_client):
    """The same serving core: instructions + input give chat's greedy text and usage."""
    response = long_client.responses.create(
        model=MODEL_NAME, instructions="Be brief.", input="Hello there", temperature=0,
        max_output_tokens=8)
    chat = long_client.chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=8,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello there"}])
    assert response.output_text == chat.choices[0].message.content
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == 8 and response.usage.total_tokens == (
        chat.usage.prompt_tokens + 8)
    assert response.store is False
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"


def test_stream_events_rebuild_the_response(long_client, long_http):
    """Streamed, the SDK's helper puts the events together into the same response; the
    raw events are numbered from 0 and open, fill and close each item in order."""
    kwargs = dict(model=MODEL_NAME, input="Describe a pet.", text=PET_FORMAT,
                  max_output_tokens=40, temperature=0)
    whole = long_client.responses.create(**kwargs)
    assert whole.status == "completed"
    jsonschema.validate(json.loads(whole.output_text), PET)
    with long_client.responses.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == whole.output_text and final.status == "completed"
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    raw = sse_events(long_http.post("/v1/responses", json={**kwargs, "stream": True}).text)
    assert [e["sequence_number"] for e in raw] == list(range(len(raw)))
    deltas = "".join(e["delta"] for e in raw if e["type"] == "response.output_text.delta")
    assert deltas == whole.output_text
    assert raw[-1]["response"]["usage"]["output_tokens"] == whole.usage.output_tokens


def test_function_calls_and_a_multi_turn_with_their_output(long_client):
    kwargs = dict(model=MODEL_NAME, input="Weather in Oslo?", tools=[WEATHER],
                  tool_choice="required", max_output_tokens=60, temperature=0)
    several = long_client.responses.create(**kwargs)
    assert {item.name for item in several.output} == {"get_weather"}
    arguments = [item.arguments for item in several.output]  # repeats are cut off
    assert len(set(arguments)) == len(arguments) and several.status == "completed"
    kwargs["parallel_tool_calls"] = False  # at most one call
    response = long_client.responses.create(**kwargs)
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["city"] in ("Oslo", "Paris")
    with long_client.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()
    (streamed,) = final.output
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
    # A named choice, in the Responses API's flat shape.
    named = long_client.responses.create(**{**kwargs, "tool_choice": {
        "type": "function", "name": "get_weather"}})
    assert [item.type for item in named.output] == ["function_call"]
    # The next turn: the call and its output go back in as input items.
    follow_up = long_client.responses.create(
        model=MODEL_NAME, tools=[WEATHER], max_output_tokens=4, temperature=0, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
            {"type": "function_call", "call_id": call.call_id, "name": call.name,
             "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "-3 C"}])
    assert follow_up.usage.input_tokens > response.usage.input_tokens


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input"),
    ({"input": [{"role": "critic", "content": "hi"}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input"),
    ({"input": []}, "input"),
    ({"input": "hi", "tool_choice": {"type": "allowed_tools"}, "tools": [WEATHER]},
     "tool_choice"),
    ({"input": "hi", "model": "nope"}, "model"),
])
def test_bad_requests_are_400s_naming_the_field(long_http, body, param):
    response = long_http.post("/v1/responses", json={"max_output_tokens": 2, **body})
    status = 404 if param == "model" else 400
    assert_openai_error(response, status, param)


def test_reasoning_becomes_a_reasoning_item_before_the_message():
    reader = ChoiceReader(get_reasoning_parser("qwen3")(), None)
    output = _Output()
    text = "<think>\nThe user greets me.\n</think>\n\nHello!"
    for i, ch in enumerate(text):
        output.add(reader.stream(ch, finished=i == len(text) - 1))
    output.close()
    assert [item["type"] for item in output.items] == ["reasoning", "message"]
    assert output.items[0]["content"][0]["text"] == "The user greets me."
    assert output.items[1]["content"][0]["text"] == "Hello!"
    kinds = [e["type"] for e in output.events]
    assert kinds.index("response.reasoning_text.done") < kinds.index(
        "response.content_part.added")
    assert all(item["status"] == "completed" for item in output.items)


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 21 C in {city}."


@pytest.mark.slow
def test_langchain_use_responses_api(real_server):
    """ChatOpenAI(use_responses_api=True) with only base_url changed: invoke, stream, and a
    forced tool call handed back as a ToolMessage."""
    llm = ChatOpenAI(base_url=real_server.v1, api_key="x", model=REAL_MODEL_NAME,
                     temperature=0, max_tokens=24, max_retries=0, timeout=60,
                     use_responses_api=True)
    answer = llm.invoke("What is the capital of France?")
    assert isinstance(answer, AIMessage) and "Paris" in answer.text
    streamed = list(llm.stream("What is the capital of France?"))
    merged = streamed[0]
    for chunk in streamed[1:]:
        merged += chunk
    assert merged.text == answer.text and len(streamed) > 2
    forced = llm.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("What is the weather in Paris?")
    message = forced.invoke([question])
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and "Paris" in call["args"]["city"]
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    final = llm.bind_tools([get_weather]).invoke([question, message, result])
    assert isinstance(final, AIMessage) and final.text


def test_raw_http_without_the_sdk(long_server):
    """curl-style: the smallest body works, and the JSON has the Response shape."""
    body = httpx.post(long_server.v1 + "/responses", timeout=60, json={
        "input": "hi", "max_output_tokens": 3}).json()
    assert body["object"] == "response" and body["output"][0]["content"][0]["type"] == (
        "output_text")
    assert set(body["usage"]) >= {"input_tokens", "output_tokens", "total_tokens"}


def test_stored_responses_are_a_clear_404(long_client):
    import openai

    with pytest.raises(openai.NotFoundError, match="stores no responses"):
        long_client.responses.retrieve("resp_123")
    with pytest.raises(openai.NotFoundError, match="stores no responses"):
        long_client.responses.delete("resp_123")
