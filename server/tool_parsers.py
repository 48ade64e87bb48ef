"""Tool calls out of generated text, whole or as it streams: the Hermes `<tool_call>` parser
for tool_choice "auto" (a registry, chosen by `pagedserve serve --tool-call-parser`), and the
reader of guided output for forced calls (tool_choice "required" or a named function).

Every reader is a stream: feed() it text as it is generated, then finish(). A non-streamed
response feeds the whole text at once, so streamed and non-streamed answers cannot differ."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI's tool_calls carry it


@dataclass(slots=True)
class StreamDelta:
    """What a choice sends next: content text and OpenAI `delta.tool_calls` entries, in
    order; an entry either opens a call (id, type, name, arguments "") or adds arguments."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def extend(self, other: StreamDelta) -> StreamDelta:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)
        return self


class ToolCallStream:
    """Reads the tool calls in one choice's text. Subclasses implement _read()."""

    def __init__(self) -> None:
        self.calls: list[ParsedToolCall] = []
        self.content = ""
        self._finished = False

    def feed(self, text: str) -> StreamDelta:
        return self._record(self._read(text, final=False))

    def finish(self) -> StreamDelta:
        if self._finished:
            return StreamDelta()
        self._finished = True
        return self._record(self._read("", final=True))

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """The whole text at once: (content or None, calls)."""
        self.feed(text)
        self.finish()
        return self.content or None, self.calls

    def _record(self, delta: StreamDelta) -> StreamDelta:
        self.content += delta.content
        return delta

    def _read(self, text: str, final: bool) -> StreamDelta:
        raise NotImplementedError

    def _open_call(self, name: str, out: StreamDelta) -> int:
        """Start a call; its index (in `calls` and in the delta entries)."""
        call = ParsedToolCall(new_tool_call_id(), name, "")
        out.tool_calls.append({"index": len(self.calls), "id": call.id, "type": "function",
                               "function": {"name": name, "arguments": ""}})
        self.calls.append(call)
        return len(self.calls) - 1

    def _add_arguments(self, index: int, text: str, out: StreamDelta) -> None:
        if text:
            self.calls[index].arguments += text
            out.tool_calls.append({"index": index, "function": {"arguments": text}})


class TrimmedText:
    """Passes text through with the whole's leading and trailing whitespace removed: what
    streams out, joined, is the stripped text (trailing blanks wait for more text)."""

    __slots__ = ("started", "held")

    def __init__(self) -> None:
        self.started, self.held = False, ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        return body


def partial_prefix_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (a tag still arriving)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# ---- tool_choice "auto": parsers of the model's own call format -----------------------
class ToolParser(ToolCallStream):
    """A model's tool-call format, for tool_choice "auto". `parallel=False` keeps the first
    call only (the request's parallel_tool_calls)."""

    name: ClassVar[str]

    def __init__(self, parallel: bool = True) -> None:
        super().__init__()
        self.parallel = parallel


class HermesToolParser(ToolParser):
    """Hermes / Qwen / many fine-tunes: `<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`, any number of blocks among ordinary text.

    A block is sent as a call once it is closed (or the text ends inside it) and its JSON
    reads as a call; a block that does not stays in the content, verbatim, as it would
    non-streamed. So streamed calls arrive whole: an opening entry, then all the arguments.
    Text that may be the start of `<tool_call>` is held back until it is known not to be."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, parallel: bool = True) -> None:
        super().__init__(parallel)
        self._buffer = ""
        self._in_block = False
        self._text = TrimmedText()

    def _read(self, text: str, final: bool) -> StreamDelta:
        out = StreamDelta()
        self._buffer += text
        while True:
            if not self._in_block:
                start = self._buffer.find(self.START)
                if start < 0:
                    keep = 0 if final else partial_prefix_len(self._buffer, self.START)
                    out.content += self._text.push(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return out
                out.content += self._text.push(self._buffer[:start])
                self._buffer = self._buffer[start + len(self.START):]
                self._in_block = True
            end = self._buffer.find(self.END)
            if end < 0 and not final:
                return out
            block = self._buffer if end < 0 else self._buffer[:end]
            markup = self.START + block + ("" if end < 0 else self.END)
            self._buffer = "" if end < 0 else self._buffer[end + len(self.END):]
            self._in_block = False
            if end < 0:  # the text ended inside the block, perhaps inside its closing tag
                block = block[:len(block) - partial_prefix_len(block, self.END)]
            call = self._read_block(block)
            if call is None:
                out.content += self._text.push(markup)
            elif self.parallel or not self.calls:
                self._add_arguments(self._open_call(call[0], out), call[1], out)

    @staticmethod
    def _read_block(block: str) -> tuple[str, str] | None:
        """(name, arguments JSON) of a block, or None when it is not a call."""
        try:
            obj = json.loads(block)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):  # some models encode the arguments object twice
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return obj["name"], json.dumps(arguments, ensure_ascii=False)


TOOL_PARSERS: dict[str, type[ToolParser]] = {HermesToolParser.name: HermesToolParser}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: "
                         f"{', '.join(sorted(TOOL_PARSERS))}") from None


# ---- forced calls: the output is JSON that guided decoding made well-formed ------------
_KEY, _COLON, _VALUE = 0, 1, 2


class _Frame:
    __slots__ = ("kind", "key", "state", "start", "path")

    def __init__(self, kind: str, key: Any, state: int, start: int, path: tuple) -> None:
        self.kind, self.key, self.state, self.start, self.path = kind, key, state, start, path


class JsonValueSpans:
    """A resumable JSON reader that reports where each value starts and ends, by its path
    from the root (object keys and array indices): ("start" | "end", path, position).
    It never rejects input (guided decoding already made it valid); it just follows it."""

    __slots__ = ("text", "_frames", "_in_string", "_escape", "_is_key", "_in_scalar",
                 "_value_start", "_value_path")

    def __init__(self) -> None:
        self.text = ""
        self._frames: list[_Frame] = []
        self._in_string = self._escape = self._is_key = self._in_scalar = False
        self._value_start = 0
        self._value_path: tuple = ()

    def _path(self) -> tuple:
        return tuple(frame.key for frame in self._frames)

    def feed(self, chunk: str) -> list[tuple[str, tuple, int]]:
        events: list[tuple[str, tuple, int]] = []
        base = len(self.text)
        self.text += chunk
        for pos, c in enumerate(chunk, base):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                    if self._is_key:
                        frame = self._frames[-1]
                        try:
                            frame.key = json.loads(self.text[self._value_start:pos + 1])
                        except ValueError:
                            frame.key = None
                        frame.state = _COLON
                    else:
                        events.append(("end", self._value_path, pos + 1))
                continue
            if self._in_scalar:
                if c not in ",]}" and not c.isspace():
                    continue
                self._in_scalar = False
                events.append(("end", self._value_path, pos))
            if c.isspace():
                continue
            frame = self._frames[-1] if self._frames else None
            if c in "}]":
                if frame is not None:
                    self._frames.pop()
                    events.append(("end", frame.path, pos + 1))
            elif c == ",":
                if frame is not None:
                    frame.state = _KEY if frame.kind == "{" else _VALUE
                    if frame.kind == "[":
                        frame.key += 1
            elif c == ":":
                if frame is not None:
                    frame.state = _VALUE
            elif frame is not None and frame.kind == "{" and frame.state != _VALUE:
                if c == '"':  # a key
                    self._in_string, self._is_key, self._value_start = True, True, pos
            else:  # a value starts
                path = self._path()
                events.append(("start", path, pos))
                if c == "{":
                    self._frames.append(_Frame("{", None, _KEY, pos, path))
                elif c == "[":
                    self._frames.append(_Frame("[", 0, _VALUE, pos, path))
                else:
                    self._in_string, self._is_key = c == '"', False
                    self._in_scalar = not self._in_string
                    self._value_start, self._value_path = pos, path
        return events

    def end(self) -> list[tuple[str, tuple, int]]:
        """The text is complete: a number at the very end ends with it."""
        if self._in_scalar:
            self._in_scalar = False
            return [("end", self._value_path, len(self.text))]
        return []


class _PendingCall:
    __slots__ = ("name", "name_start", "args_start", "args_end", "index", "sent")

    def __init__(self, name: str | None = None) -> None:
        self.name, self.name_start = name, None
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.index: int | None = None  # in `calls`, once opened
        self.sent = 0  # arguments characters sent


class GuidedToolCallStream(ToolCallStream):
    """The calls in guided output, with their arguments streamed as they are generated.

    With `function_name` (a named tool_choice) the output is that function's arguments
    object itself. Without, it is a JSON array of {"name": ..., "parameters": {...}} (the
    schema `tools.required_calls_schema` builds). A call opens once its name is complete;
    its arguments are the exact text of its arguments value."""

    ARGS_KEY = "parameters"

    def __init__(self, function_name: str | None = None) -> None:
        super().__init__()
        self._json = JsonValueSpans()
        self._named = function_name is not None
        self._pending: list[_PendingCall] = [_PendingCall(function_name)] if self._named else []

    def _read(self, text: str, final: bool) -> StreamDelta:
        events = self._json.feed(text)
        if final:
            events += self._json.end()
        for kind, path, pos in events:
            self._track(kind, path, pos)
        out = StreamDelta()
        source = self._json.text
        for pending in self._pending:
            if pending.index is None:
                if pending.name is None:
                    continue
                pending.index = self._open_call(pending.name, out)
            if pending.args_start is not None:
                end = pending.args_end if pending.args_end is not None else len(source)
                start = pending.args_start + pending.sent
                self._add_arguments(pending.index, source[start:end], out)
                pending.sent = end - pending.args_start
        return out

    def _track(self, kind: str, path: tuple, pos: int) -> None:
        if self._named:
            if path == ():
                self._mark(self._pending[0], kind, pos)
            return
        if len(path) != 2 or not isinstance(path[0], int):
            return
        while len(self._pending) <= path[0]:
            self._pending.append(_PendingCall())
        pending = self._pending[path[0]]
        if path[1] == "name":
            if kind == "start":
                pending.name_start = pos
            elif pending.name_start is not None:
                try:
                    name = json.loads(self._json.text[pending.name_start:pos])
                except ValueError:
                    name = None
                pending.name = name if isinstance(name, str) else None
        elif path[1] == self.ARGS_KEY:
            self._mark(pending, kind, pos)

    @staticmethod
    def _mark(pending: _PendingCall, kind: str, pos: int) -> None:
        if kind == "start":
            pending.args_start = pos
        else:
            pending.args_end = pos
