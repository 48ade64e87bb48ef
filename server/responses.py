"""POST /v1/responses: OpenAI's Responses API, stateless, on the chat serving core.

A Responses request becomes a chat request (instructions and input items -> messages,
flat function tools -> chat tools, text.format -> response_format, reasoning.effort ->
the template's reasoning_effort) that OpenAIServing.start_chat validates, renders and
submits; what comes back is split by the same ChoiceReader (reasoning, text, tool calls)
into output items: `reasoning`, `message` (output_text) and `function_call`. Streamed,
the items arrive as the SDK's typed events (response.created, response.output_item.added,
response.output_text.delta, response.function_call_arguments.delta, ...,
response.completed).

Nothing is stored: `previous_response_id` is a 400 (send the whole conversation as input,
as a stateless client does), and every response says `store: false`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ConfigDict, Field, ValidationError, model_validator

from pagedserve.engine.outputs import RequestOutput
from pagedserve.server.errors import APIError, internal_error
from pagedserve.server.protocol import (
    ChatCompletionRequest,
    OpenAIBaseModel,
    RequestModel,
    refuse_unsupported,
)
from pagedserve.server.serving import ChatRun, ChoiceStream, OpenAIServing, engine_error

# Fields of OpenAI's Responses API that need what this server does not have (stored
# responses and conversations, prompt templates, background jobs), with their neutral
# values: anything else is a 400 naming the field.
_UNSUPPORTED = {"previous_response_id": (), "conversation": (), "prompt": (),
                "background": (False,), "max_tool_calls": ()}
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "reasoning_text",
               "summary_text")


class ResponsesTool(OpenAIBaseModel):
    """A tool as the Responses API spells it: flat (`name` beside `type`). Only functions;
    built-in tools (web_search, file_search, mcp, ...) are a 400."""

    model_config = ConfigDict(extra="allow")

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesTextFormat(OpenAIBaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")  # wire name "schema"
    strict: bool | None = None


class ResponsesText(OpenAIBaseModel):
    format: ResponsesTextFormat | None = None


class ResponsesReasoning(OpenAIBaseModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None  # accepted; the reasoning comes back whole, not summarised


class ResponsesRequest(RequestModel):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: ResponsesText | None = None
    reasoning: ResponsesReasoning | None = None
    stream: bool = False
    store: bool | None = None  # accepted: nothing is stored, and the response says so
    metadata: dict[str, str] | None = None
    user: str | None = None
    # vLLM's sampling extras, as on chat
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    seed: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported_fields(cls, data: Any) -> Any:
        return refuse_unsupported(data, _UNSUPPORTED)


# ---- request -> chat request ----------------------------------------------------------
def _part_text(part: Any, where: str) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise APIError(f"{where} has type {kind!r}: this server takes text only "
                       f"({', '.join(_TEXT_PARTS[:3])})", param="input")
    text = part.get("text", part.get("refusal"))
    if not isinstance(text, str):
        raise APIError(f"{where} needs its text as a string", param="input")
    return text


def _content_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(f"{where}.content must be a string or a list of parts", param="input")
    return "".join(_part_text(part, f"{where}.content[{j}]") for j, part in enumerate(content))


def _messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """instructions and input as chat messages: function_call items become an assistant
    message's tool_calls, function_call_output items tool messages; reasoning items are
    dropped (templates drop past thinking anyway)."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    items = ([{"role": "user", "content": request.input}] if isinstance(request.input, str)
             else request.input)
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(f"{where}.role must be user, assistant, system or developer, "
                               f"got {role!r}", param="input")
            # developer: OpenAI's new name for system, which templates know.
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _content_text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": item.get("name"),
                                 "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _content_text(output, where)
                             if not isinstance(output, str) else output})
        elif kind == "reasoning":
            continue
        else:
            raise APIError(f"{where} has type {kind!r}; this server takes message, "
                           "function_call, function_call_output and reasoning items",
                           param="input")
    return messages


def _tools(request: ResponsesRequest) -> list[dict[str, Any]] | None:
    if request.tools is None:
        return None
    tools = []
    for i, tool in enumerate(request.tools):
        if tool.type != "function":
            raise APIError(f"tools[{i}] has type {tool.type!r}: this server runs function "
                           "tools only (the client runs them)", param="tools")
        tools.append({"type": "function", "function": {
            "name": tool.name, "description": tool.description, "parameters": tool.parameters,
            "strict": tool.strict}})
    return tools


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(f"tool_choice {choice!r} is not supported: send \"none\", \"auto\", "
                   "\"required\" or {\"type\": \"function\", \"name\": ...}",
                   param="tool_choice")


def _response_format(text: ResponsesText | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.json_schema is None:
        raise APIError('text.format of type "json_schema" needs a schema', param="text")
    return {"type": "json_schema", "json_schema": {
        "name": fmt.name, "description": fmt.description, "schema": fmt.json_schema,
        "strict": fmt.strict}}


def to_chat_request(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that computes this response."""
    body: dict[str, Any] = {
        "model": request.model, "messages": _messages(request),
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature, "top_p": request.top_p,
        "tools": _tools(request), "tool_choice": _tool_choice(request.tool_choice),
        "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": _response_format(request.text),
        "reasoning_effort": request.reasoning.effort if request.reasoning else None,
        "top_k": request.top_k, "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty, "seed": request.seed}
    if not body["messages"]:
        raise APIError("input must hold at least one message", param="input")
    try:
        return ChatCompletionRequest.model_validate(
            {k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:  # an input item that is not a valid chat message
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(f"input: {where}: {first['msg']}", param="input") from None


# ---- output items ---------------------------------------------------------------------
def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Output:
    """The response's output items as they form, from ChoiceReader deltas; `events` are
    the streaming events each step made (SDK event shapes, without sequence numbers)."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item text or arguments go into
        self.calls: dict[int, dict[str, Any]] = {}  # tool-call index -> its item
        self.events: list[dict[str, Any]] = []
        # Text and arguments come a token at a time: kept in pieces and joined into their
        # item when it is read, so a long output costs O(its length), not O(length^2).
        # id(the dict holding the text) -> (that dict, its key, the pieces).
        self._pieces: dict[int, tuple[dict[str, Any], str, list[str]]] = {}

    @property
    def items(self) -> list[dict[str, Any]]:
        """The output items so far, their text whole."""
        self._settle()
        return self._items

    def _append(self, holder: dict[str, Any], key: str, text: str) -> None:
        entry = self._pieces.get(id(holder))
        if entry is None:
            entry = self._pieces[id(holder)] = (holder, key, [holder[key]])
        entry[2].append(text)

    def _settle(self) -> None:
        for holder, key, pieces in self._pieces.values():
            holder[key] = "".join(pieces)
        self._pieces.clear()

    def _emit(self, kind: str, **fields: Any) -> None:
        self.events.append({"type": kind, **fields})

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, x in enumerate(self._items) if x is item)

    def _start(self, item: dict[str, Any]) -> dict[str, Any]:
        self.close()
        self._items.append(item)
        self.open = item
        self._emit("response.output_item.added", output_index=len(self._items) - 1,
                   item=json.loads(json.dumps(item)))
        return item

    def close(self) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        self._settle()
        index = self._index(item)
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            self._emit("response.reasoning_text.done", item_id=item["id"], output_index=index,
                       content_index=0, text=text)
        elif item["type"] == "message":
            part = item["content"][0]
            self._emit("response.output_text.done", item_id=item["id"], output_index=index,
                       content_index=0, text=part["text"], logprobs=[])
            self._emit("response.content_part.done", item_id=item["id"], output_index=index,
                       content_index=0, part=part)
        else:
            self._emit("response.function_call_arguments.done", item_id=item["id"],
                       output_index=index, name=item["name"], arguments=item["arguments"])
        item["status"] = "completed"
        self._emit("response.output_item.done", output_index=index, item=item)

    def reasoning(self, text: str) -> None:
        item = self.open
        if item is None or item["type"] != "reasoning":
            item = self._start({"type": "reasoning", "id": _new_id("rs"), "summary": [],
                                "content": [{"type": "reasoning_text", "text": ""}],
                                "status": "in_progress"})
        self._append(item["content"][0], "text", text)
        self._emit("response.reasoning_text.delta", item_id=item["id"],
                   output_index=self._index(item), content_index=0, delta=text)

    def text(self, text: str) -> None:
        item = self.open
        if item is None or item["type"] != "message":
            item = self._start({"type": "message", "id": _new_id("msg"), "role": "assistant",
                                "status": "in_progress", "content": []})
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(part)
            self._emit("response.content_part.added", item_id=item["id"],
                       output_index=self._index(item), content_index=0, part=dict(part))
        self._append(item["content"][0], "text", text)
        self._emit("response.output_text.delta", item_id=item["id"],
                   output_index=self._index(item), content_index=0, delta=text, logprobs=[])

    def tool_call(self, entry: dict[str, Any]) -> None:
        """A chat tool-call delta entry: one that opens a call (id, name), or arguments."""
        function = entry.get("function", {})
        if "id" in entry:
            self.calls[entry["index"]] = self._start({
                "type": "function_call", "id": _new_id("fc"), "call_id": entry["id"],
                "name": function["name"], "arguments": "", "status": "in_progress"})
        arguments = function.get("arguments")
        if arguments:
            item = self.calls[entry["index"]]
            self._append(item, "arguments", arguments)
            self._emit("response.function_call_arguments.delta", item_id=item["id"],
                       output_index=self._index(item), delta=arguments)

    def add(self, deltas: list[dict[str, Any]]) -> None:
        for delta in deltas:
            if delta.get("reasoning_content"):
                self.reasoning(delta["reasoning_content"])
            if delta.get("content"):
                self.text(delta["content"])
            for entry in delta.get("tool_calls", ()):
                self.tool_call(entry)


class OpenAIServingResponses:
    """POST /v1/responses over an OpenAIServing (the chat core)."""

    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, request: ResponsesRequest):
        run = await self.serving.start_chat(to_chat_request(request), id_prefix="resp_")
        created = int(time.time())
        if not request.stream:
            final = await self.serving.final_output(run)
            out = final.outputs[0]
            output = _Output()
            reader = run.new_reader()
            # The whole text as one piece of a stream: the same items a stream builds.
            output.add(reader.stream(out.text, finished=True))
            reader.count(out.token_ids)
            output.close()
            finish_reason = "stop" if reader.done else out.finish_reason  # (repeats cut)
            return JSONResponse(self._response(request, run, created, output.items,
                                               finish_reason, len(out.token_ids),
                                               reader.reasoning_tokens))
        first = await self.serving.first_output(run)
        return StreamingResponse(self._events(request, run, created, first),
                                 media_type="text/event-stream")

    def _response(self, request: ResponsesRequest, run: ChatRun, created: int,
                  items: list[dict[str, Any]], finish_reason: str | None,
                  num_output_tokens: int, num_reasoning_tokens: int = 0) -> dict[str, Any]:
        """The Response object; finish_reason None: still in progress."""
        status, incomplete = "completed", None
        if finish_reason is None:
            status = "in_progress"
        elif finish_reason == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        elif finish_reason == "abort":  # the server shut down mid-response
            status = "failed"
        fmt = request.text.format if request.text is not None else None
        text_format = ({"type": "text"} if fmt is None or fmt.type == "text"
                       else fmt.model_dump(by_alias=True, exclude_none=True))
        usage = None
        if finish_reason is not None:
            num_prompt_tokens = run.num_prompt_tokens
            usage = {"input_tokens": num_prompt_tokens,
                     "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": num_output_tokens,
                     "output_tokens_details": {"reasoning_tokens": num_reasoning_tokens},
                     "total_tokens": num_prompt_tokens + num_output_tokens}
        return {
            "id": run.request_id, "object": "response", "created_at": created,
            "status": status, "error": None, "incomplete_details": incomplete,
            "model": run.model,
            "instructions": request.instructions, "output": items,
            "parallel_tool_calls": request.parallel_tool_calls,
            "tool_choice": request.tool_choice or "auto",  # OpenAI's default
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or ()],
            "temperature": request.temperature, "top_p": request.top_p,
            "max_output_tokens": request.max_output_tokens,
            "previous_response_id": None, "store": False, "truncation": "disabled",
            "reasoning": {"effort": request.reasoning.effort if request.reasoning else None,
                          "summary": None},
            "text": {"format": text_format}, "metadata": request.metadata or {},
            "user": request.user, "usage": usage}

    async def _events(self, request: ResponsesRequest, run: ChatRun, created: int,
                      first) -> AsyncIterator[str]:
        sequence = 0

        def event(payload: dict[str, Any]) -> str:
            nonlocal sequence
            payload = {**payload, "sequence_number": sequence}
            sequence += 1
            return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"

        def snapshot(items, finish_reason, num_output_tokens) -> dict[str, Any]:
            return self._response(request, run, created, items, finish_reason,
                                  num_output_tokens, reader.reasoning_tokens)

        output, reader, counted = _Output(), run.new_reader(), ChoiceStream()
        start = snapshot([], None, 0)
        yield event({"type": "response.created", "response": start})
        yield event({"type": "response.in_progress", "response": start})
        finish_reason = None
        try:
            outputs = _chain(first, run.merged)
            async for _, result in outputs:
                out = result.outputs[0]
                if not counted.finished:  # tokens whose text is held back count too
                    reader.count(out.token_ids)
                if not counted.advance(out, False):
                    continue
                finish_reason = out.finish_reason
                output.add(reader.stream(out.text, finished=finish_reason is not None))
                for payload in output.events:
                    yield event(payload)
                output.events.clear()
                if reader.done:  # it began repeating its calls: over (leaving aborts it)
                    finish_reason = "stop"
                    break
            output.close()
            for payload in output.events:
                yield event(payload)
            final = snapshot(output.items, finish_reason or "stop", counted.num_generated)
            if final["status"] == "failed":  # aborted: the server is shutting down
                final["error"] = {"code": "server_shutting_down",
                                  "message": "The server is shutting down; the response was "
                                             "cut short"}
            kind = {"incomplete": "response.incomplete",
                    "failed": "response.failed"}.get(final["status"], "response.completed")
            yield event({"type": kind, "response": final})
        except Exception as exc:
            error = engine_error(exc) or internal_error(exc, "a response stream")
            failed = snapshot(output.items, "stop", counted.num_generated)
            failed.update(status="failed", error={"code": error.code or error.type,
                                                  "message": error.message})
            yield event({"type": "response.failed", "response": failed})
        finally:
            with anyio.CancelScope(shield=True):
                await run.merged.aclose()


async def _chain(first: tuple[int, RequestOutput] | None, rest) -> AsyncIterator:
    if first is not None:
        yield first
    async for item in rest:
        yield item
