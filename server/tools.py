"""Tool calling on /v1/chat/completions: what a request's tools and tool_choice mean for the
prompt, for guided decoding and for reading the output (server/tool_parsers.py reads it).

- "auto" (the default with tools): the tools are in the prompt, the model writes freely and
  the server's tool parser (Hermes `<tool_call>` blocks by default) finds the calls.
- "required" / a named function: guided decoding makes the output a call, so even a model
  never trained on tools answers with valid ones; finish_reason is "tool_calls" (as vLLM
  does for "required"; OpenAI says "stop" for a named function, but LangChain and agent
  loops key on "tool_calls", and the message carries tool_calls either way).
- "none": the tools are left out of the prompt and the output is plain content (OpenAI: the
  model will not call a tool). Earlier calls and results in the messages still render.

Chat templates that know tools get them through apply_chat_template(tools=...). Templates
that do not (SmolLM2's ChatML one, among others) get DEFAULT_TOOL_PROMPT as (or appended to)
the system message, earlier assistant calls as `<tool_call>` text and tool results as
`<tool_response>` text in a user turn: the Hermes format, which the hermes parser reads."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pagedserve.server.errors import APIError
from pagedserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionTool,
    ChatMessage,
    first_invalid_text,
)
from pagedserve.server.tool_parsers import GuidedToolCallStream, ToolCallStream, ToolParser

# Hermes 2 Pro's own function-calling system prompt, lightly shortened.
DEFAULT_TOOL_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user "
    "query. Don't make assumptions about what values to plug into functions. Here are the "
    "available tools:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a JSON object with the function name and arguments "
    "within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)

# A function without parameters takes none: its arguments are exactly {}.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {},
                                 "additionalProperties": False}


def template_knows_tools(template: str | dict | None) -> bool:
    """Whether a chat template renders `tools` itself (HF templates that do name it)."""
    if isinstance(template, dict):  # named templates: HF picks "tool_use" when tools are given
        return "tool_use" in template or any(template_knows_tools(t) for t in template.values())
    return bool(template) and re.search(r"\btools\b", template) is not None


def tool_dicts(tools: list[ChatCompletionTool] | None) -> list[dict[str, Any]] | None:
    """Tools as chat templates take them (OpenAI's JSON); None for none."""
    return [tool.model_dump(exclude_none=True) for tool in tools or ()] or None


def _parameters(tool: ChatCompletionTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else NO_PARAMETERS


def required_calls_schema(tools: list[ChatCompletionTool], parallel: bool) -> dict[str, Any]:
    """tool_choice "required": a JSON array of one or more {"name", "parameters"} calls,
    each naming one of the tools with arguments that fit its parameters (vLLM's shape)."""
    schema: dict[str, Any] = {
        "type": "array", "minItems": 1,
        "items": {"anyOf": [{
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                           GuidedToolCallStream.ARGS_KEY: _parameters(tool)},
            "required": ["name", GuidedToolCallStream.ARGS_KEY],
            "additionalProperties": False,
        } for tool in tools]},
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


@dataclass(slots=True)
class ToolPlan:
    """What one chat request's tools mean: `prompt_tools` go in the prompt, `guide_schema`
    (forced calls) constrains the output, and new_reader() reads each choice's output."""

    prompt_tools: list[dict[str, Any]] | None
    forced_function: str | None  # a named tool_choice
    guide_schema: dict[str, Any] | None
    mode: str  # "none" (no tools, or tool_choice "none"), "auto", "required", "named"
    parallel: bool

    @classmethod
    def from_request(cls, request: ChatCompletionRequest) -> ToolPlan:
        tools = request.tools or []
        choice = request.tool_choice
        if choice is None:
            choice = "auto" if tools else "none"
        if not tools and choice != "none":
            shown = choice if isinstance(choice, str) else choice.function.name
            raise APIError(f"tool_choice {shown!r} needs tools: give the functions the model "
                           "may call in `tools`", param="tool_choice")
        names = [tool.function.name for tool in tools]
        if len(set(names)) != len(names):
            raise APIError(f"tools must have distinct function names, got {names}",
                           param="tools")
        prompt_tools = tool_dicts(tools)
        if choice == "none":
            return cls(None, None, None, "none", request.parallel_tool_calls)
        if choice == "auto":
            return cls(prompt_tools, None, None, "auto", request.parallel_tool_calls)
        if choice == "required":
            return cls(prompt_tools, None,
                       required_calls_schema(tools, request.parallel_tool_calls), "required",
                       request.parallel_tool_calls)
        name = choice.function.name
        if name not in names:
            raise APIError(f"tool_choice names the function {name!r}, which is not among the "
                           f"tools ({', '.join(names)})", param="tool_choice")
        tool = tools[names.index(name)]
        return cls(prompt_tools, name, _parameters(tool), "named", request.parallel_tool_calls)

    def new_reader(self, parser: type[ToolParser]) -> ToolCallStream | None:
        """A fresh reader for one choice's output; None: the output is plain content."""
        if self.mode == "auto":
            return parser(parallel=self.parallel, tools=self.prompt_tools)
        if self.mode in ("required", "named"):
            return GuidedToolCallStream(self.forced_function)
        return None


# ---- messages for the chat template ---------------------------------------------------
def _arguments_object(arguments: str) -> Any:
    """HF templates expect a call's arguments as a mapping; OpenAI sends JSON text. Text
    that is not JSON, or whose escapes spell lone surrogates (no tokenizer takes those),
    goes to the template as the text it is."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return arguments if first_invalid_text(parsed) else parsed


def _hermes_call(call) -> str:
    return ("<tool_call>\n" + json.dumps({"name": call.function.name,
                                          "arguments": _arguments_object(call.function.arguments)},
                                         ensure_ascii=False) + "\n</tool_call>")


def conversation(messages: list[ChatMessage], tools: list[dict[str, Any]] | None,
                 template_has_tools: bool) -> list[dict[str, Any]]:
    """The messages as chat-template dicts. Calls and results pass through as HF templates
    expect them, or, for a template that knows no tools, become Hermes text."""
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for tool results
    results_turn: dict[str, Any] | None = None  # the user turn tool results go into
    for message in messages:
        entry: dict[str, Any] = {**(message.model_extra or {}), "role": message.role,
                                 "content": message.text()}
        for call in message.tool_calls or ():
            call_names[call.id] = call.function.name
        if template_has_tools:
            if message.tool_calls:
                entry["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.function.name,
                                  "arguments": _arguments_object(c.function.arguments)}}
                    for c in message.tool_calls]
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
                if message.tool_call_id in call_names:
                    entry.setdefault("name", call_names[message.tool_call_id])
        elif message.role == "tool":
            name = entry.get("name") or call_names.get(message.tool_call_id or "", "")
            response = ("<tool_response>\n" + json.dumps({"name": name,
                                                          "content": entry["content"]},
                                                         ensure_ascii=False)
                        + "\n</tool_response>")
            if results_turn is not None:  # the results of one turn share a user turn
                results_turn["content"] += "\n" + response
                continue
            entry = results_turn = {"role": "user", "content": response}
            out.append(entry)
            continue
        elif message.tool_calls:
            calls = "\n".join(_hermes_call(c) for c in message.tool_calls)
            entry["content"] = f"{entry['content']}\n{calls}" if entry["content"] else calls
        results_turn = None
        out.append(entry)
    if tools and not template_has_tools:
        prompt = DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False)
                                                            for t in tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
