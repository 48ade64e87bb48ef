"""LangChain's tool calling and structured output against the embedded SmolLM2, with only
base_url changed: bind_tools, an agent loop through a ToolMessage, with_structured_output."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.server.conftest import REAL_MODEL_NAME

pytestmark = pytest.mark.slow

QUESTION = "What is the weather in Paris?"


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 21 C in {city}."


class Person(BaseModel):
    """A person."""

    name: str = Field(description="first name")
    age: int


@pytest.fixture(scope="module")
def llm(real_server):
    return ChatOpenAI(base_url=real_server.v1, api_key="x", model=REAL_MODEL_NAME,
                      temperature=0, max_tokens=64, max_retries=0, timeout=60)


def test_bind_tools_with_a_named_choice_invoke_and_stream(llm):
    forced = llm.bind_tools([get_weather], tool_choice="get_weather")
    message = forced.invoke(QUESTION)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.invalid_tool_calls == []
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert set(call["args"]) == {"city"} and "Paris" in call["args"]["city"]
    chunks = list(forced.stream(QUESTION))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]
    assert len(chunks) > 4  # the arguments arrived in pieces


def test_agent_loop_through_a_tool_result(llm):
    """Call, run the tool, hand back a ToolMessage, until the model answers in text. The first
    step forces the call: a 135M model rarely calls tools on its own."""
    messages = [HumanMessage(QUESTION)]
    step = llm.bind_tools([get_weather], tool_choice="required")
    auto = llm.bind_tools([get_weather])
    for _ in range(3):
        reply = step.invoke(messages)
        assert isinstance(reply, AIMessage)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            messages.append(ToolMessage(get_weather.invoke(call["args"]),
                                        tool_call_id=call["id"]))
        step = auto
    assert isinstance(messages[1], AIMessage) and messages[1].tool_calls
    assert isinstance(messages[2], ToolMessage)
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert isinstance(final.content, str) and final.content.strip()


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(llm, method):
    structured = llm.with_structured_output(Person, method=method)
    person = structured.invoke("Make up a person named Anna who is 31 years old.")
    assert isinstance(person, Person)
    assert person.name == "Anna" and person.age == 31


# Deprecated for langchain's create_agent, but what today's agents are built with.
@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")
def test_langgraph_react_agent_loop(llm):
    """LangGraph's create_react_agent over /v1/chat/completions: model -> tool -> model ->
    answer. Its first turn forces the call (a 135M model rarely calls tools on its own);
    after the ToolMessage the model may call again or answer, and the graph ends in text."""
    from langgraph.prebuilt import create_react_agent

    forced = llm.bind_tools([get_weather], tool_choice="required")
    auto = llm.bind_tools([get_weather])

    def select_model(state, runtime):
        called = any(isinstance(m, ToolMessage) for m in state["messages"])
        return auto if called else forced

    agent = create_react_agent(select_model, [get_weather])
    result = agent.invoke({"messages": [HumanMessage(QUESTION)]}, {"recursion_limit": 8})
    messages = result["messages"]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls and calls[0]["name"] == "get_weather"
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert results and "sunny" in results[0].content
    assert isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls
