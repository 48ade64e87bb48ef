"""Tool calls out of generated text, whole or as it streams: the Hermes `<tool_call>` parser
for tool_choice "auto" (a registry, chosen by `pagedserve serve --tool-call-parser`), and the
reader of guided output for forced calls (tool_choice "required" or a named function).

Every reader is a stream: feed() it text as it is generated, then finish(). A non-streamed
response feeds the whole text at once, so streamed and non-streamed answers cannot differ."""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")


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
        self._content_pieces: list[str] = []  # joined only when asked: O(length) a stream
        self._finished = False

    @property
    def content(self) -> str:
        """All the content (text that is not a call) read so far."""
        return "".join(self._content_pieces)

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
        if delta.content:
            self._content_pieces.append(delta.content)
        return delta

    def _read(self, text: str, final: bool) -> StreamDelta:
        raise NotImplementedError

    def _open_call(self, name: str, out: StreamDelta) -> int:
        """Start a call; its index (in `calls` and in the delta entries)."""
        call = ParsedToolCall(self._new_call_id(), name, "")
        out.tool_calls.append({"index": len(self.calls), "id": call.id, "type": "function",
                               "function": {"name": name, "arguments": ""}})
        self.calls.append(call)
        return len(self.calls) - 1

    def _new_call_id(self) -> str:
        return new_tool_call_id()

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


def split_at_tag(text: str, tags: tuple[str, ...], final: bool) -> tuple[str, str | None, str]:
    """(before, tag, after) around the first of `tags` in streamed `text`. With none
    there: (what is surely not a tag, None, the end that may yet become one; none of it
    once the text is `final`)."""
    found = [(text.find(tag), tag) for tag in tags if tag in text]
    if found:
        start, tag = min(found)
        return text[:start], tag, text[start + len(tag):]
    keep = 0 if final else max((partial_prefix_len(text, tag) for tag in tags), default=0)
    return text[:len(text) - keep], None, text[len(text) - keep:]


# ---- tool_choice "auto": parsers of the model's own call format -----------------------
class ToolParser(ToolCallStream):
    """A model's tool-call format, for tool_choice "auto". `parallel=False` keeps the first
    call only (the request's parallel_tool_calls). `tools`: the request's tools (OpenAI's
    JSON), for formats whose argument values are text that the schema types."""

    name: ClassVar[str]
    # The format's markers are special tokens ([TOOL_CALLS], <|python_tag|>): the text
    # must keep them (skip_special_tokens off) for the calls to be found.
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self, parallel: bool = True, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.parallel = parallel
        self.tools = tools or []

    def _send(self, calls: list[tuple[str, str]], out: StreamDelta) -> None:
        for name, arguments in calls[:None if self.parallel else max(0, 1 - len(self.calls))]:
            self._add_arguments(self._open_call(name, out), arguments, out)


class HermesToolParser(ToolParser):
    """Hermes / Qwen / many fine-tunes: `<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`, any number of blocks among ordinary text.

    A block is sent as a call once it is closed (or the text ends inside it) and its JSON
    reads as a call; a block that does not stays in the content, verbatim, as it would
    non-streamed. So streamed calls arrive whole: an opening entry, then all the arguments.
    Text that may be the start of `<tool_call>` is held back until it is known not to be."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, parallel: bool = True, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(parallel, tools)
        self._buffer = ""
        self._in_block = False
        self._text = TrimmedText()

    def _read(self, text: str, final: bool) -> StreamDelta:
        out = StreamDelta()
        self._buffer += text
        while True:
            if not self._in_block:
                before, tag, self._buffer = split_at_tag(self._buffer, (self.START,), final)
                out.content += self._text.push(before)
                if tag is None:
                    return out
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
            else:
                self._send([call], out)

    def _read_block(self, block: str) -> tuple[str, str] | None:
        """(name, arguments JSON) of a block, or None when it is not a call."""
        try:
            return _json_call(json.loads(block))
        except ValueError:
            return None


def _json_call(obj: Any) -> tuple[str, str] | None:
    """(name, arguments JSON) of {"name": ..., "arguments" or "parameters": {...}}."""
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


class Qwen3XmlToolParser(HermesToolParser):
    """Qwen3-Coder: `<tool_call>` blocks holding XML, one function each:
    `<function=NAME><parameter=KEY>value</parameter>...</function>`. Values are text; each
    is typed by the function's schema (a string stays text, anything else is read as
    JSON where it parses)."""

    name = "qwen3_xml"
    _FUNCTION = re.compile(r"\s*<function=([^>\s]+)>(.*?)</function>\s*", re.S)
    _PARAMETER = re.compile(r"<parameter=([^>\s]+)>(.*?)</parameter>", re.S)

    def _read_block(self, block: str) -> tuple[str, str] | None:
        match = self._FUNCTION.fullmatch(block)
        if match is None:
            return None
        name, body = match.groups()
        schemas = _parameter_schemas(self.tools, name)
        arguments = {}
        for key, raw in self._PARAMETER.findall(body):
            value = raw.removeprefix("\n").removesuffix("\n")
            if not _may_be_string(schemas.get(key)):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            arguments[key] = value
        return name, json.dumps(arguments, ensure_ascii=False)


def _parameter_schemas(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """{parameter: its JSON schema} for the function `name` among `tools`."""
    for tool in tools:
        function = tool.get("function", {})
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties", {})
            return {k: v for k, v in properties.items() if isinstance(v, dict)}
    return {}


def _may_be_string(schema: dict[str, Any] | None) -> bool:
    """Whether a value of this schema may be a string (or its type is not known: then the
    text is kept as it is): Optional[str] is anyOf string | null."""
    if not schema:
        return True
    kind = schema.get("type")
    if kind is None:
        branches = schema.get("anyOf") or schema.get("oneOf") or []
        return not branches or any(_may_be_string(b) for b in branches)
    return kind == "string" or (isinstance(kind, list) and "string" in kind)


class _TrailingCallsParser(ToolParser):
    """Formats whose calls take the rest of the output once they start: after one of
    MARKERS anywhere, or from the first character when the output opens with one of
    OPENERS (which belong to the calls' own syntax). Text before streams as content; the
    calls are read when the text ends. Calls that do not read go to the content verbatim,
    as they would non-streamed."""

    MARKERS: ClassVar[tuple[str, ...]] = ()
    OPENERS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, parallel: bool = True, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(parallel, tools)
        self._buffer = ""
        self._calls: str | None = None  # the text after the marker, once one came
        self._marker = ""
        self._started = False  # content has begun: openers no longer count
        self._text = TrimmedText()

    def _read(self, text: str, final: bool) -> StreamDelta:
        out = StreamDelta()
        if self._calls is not None:
            self._calls += text
        else:
            self._buffer += text
            if not self._started:
                head = self._buffer.lstrip()
                if any(head.startswith(o) for o in self.OPENERS):
                    self._calls, self._buffer = head, ""
                elif not final and any(o.startswith(head) for o in self.OPENERS):
                    return out  # it may yet open the calls
            if self._calls is None:
                self._find_marker(out, final)
        if final and self._calls is not None:
            calls = self._parse(self._calls)
            if calls is None:
                out.content += self._text.push(self._marker + self._calls)
            else:
                self._send(calls, out)
            self._calls = ""
        return out

    def _find_marker(self, out: StreamDelta, final: bool) -> None:
        before, marker, rest = split_at_tag(self._buffer, self.MARKERS, final)
        self._started |= bool(before.strip())
        out.content += self._text.push(before)
        if marker is None:
            self._buffer = rest
        else:
            self._calls, self._marker, self._buffer = rest, marker, ""

    def _parse(self, text: str) -> list[tuple[str, str]] | None:
        """(name, arguments JSON) of each call in `text`, or None if it is not calls."""
        raise NotImplementedError


def _json_values(text: str, separators: str) -> list[Any] | None:
    """The JSON values in `text`, one after another, `separators` between; None if
    anything else is there."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
        if pos == len(text):
            return values or None
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        values.append(value)


class Llama3JsonToolParser(_TrailingCallsParser):
    """Llama 3.1 / 3.2 / 3.3 JSON calls: `{"name": ..., "parameters": {...}}` as the whole
    reply (after `<|python_tag|>` or not), several separated by `;`."""

    name = "llama3_json"
    needs_special_tokens = True
    MARKERS = ("<|python_tag|>",)
    OPENERS = ("{",)

    def _parse(self, text: str) -> list[tuple[str, str]] | None:
        values = _json_values(text, ";")
        calls = [_json_call(v) for v in values or ()]
        return calls if calls and None not in calls else None


class MistralToolParser(_TrailingCallsParser):
    """Mistral: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"} (v0.3), or, from
    the v11 tokenizer on, `name[ARGS]{...}` for each call, `[TOOL_CALLS]` between."""

    name = "mistral"
    needs_special_tokens = True
    MARKERS = ("[TOOL_CALLS]",)
    OPENERS = ('[{"name"',)  # the list, when the marker token was skipped

    def _new_call_id(self) -> str:
        # Mistral's chat templates refuse history whose call ids are not 9 alphanumerics.
        return uuid.uuid4().hex[:9]

    def _parse(self, text: str) -> list[tuple[str, str]] | None:
        text = text.strip()
        if text.startswith("["):
            values = _json_values(text, "")
            if not values or len(values) != 1 or not isinstance(values[0], list):
                return None
            calls = [_json_call(v) for v in values[0]]
        else:
            calls = []
            for part in text.split("[TOOL_CALLS]"):
                name, sep, arguments = part.partition("[ARGS]")
                if not sep:
                    return None
                try:
                    calls.append(_json_call({"name": name.strip(),
                                             "arguments": json.loads(arguments)}))
                except ValueError:
                    return None
        return calls if calls and None not in calls else None


class PythonicToolParser(_TrailingCallsParser):
    """Llama 3.2 (pythonic template) and Llama 4: a Python list of calls with keyword
    arguments, `[get_weather(city="Oslo"), now()]`, as the whole reply (Llama 4 wraps it in
    `<|python_start|>...<|python_end|>`). Arguments are Python literals (true / false /
    null read as JSON's too)."""

    name = "pythonic"
    needs_special_tokens = True
    MARKERS = ("<|python_start|>",)
    OPENERS = ("[",)
    _NAMES = {"true": True, "false": False, "null": None}

    def _parse(self, text: str) -> list[tuple[str, str]] | None:
        text = text.strip().removesuffix("<|python_end|>").strip()
        if len(text) > self.MAX_CHARS:
            return None
        try:
            return self._read_calls(ast.parse(text, mode="eval").body)
        # Whatever the model wrote: not literals, unhashable keys, sets, NaN, too deep.
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return None

    MAX_CHARS = 1 << 16

    def _read_calls(self, tree: ast.expr) -> list[tuple[str, str]] | None:
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or node.args:
                return None
            name = ast.unparse(node.func)  # a name, or a dotted one
            keys = [kw.arg for kw in node.keywords]
            if None in keys or len(set(keys)) != len(keys) or not re.fullmatch(r"[\w.\-]+",
                                                                                name):
                return None
            arguments = {kw.arg: self._literal(kw.value) for kw in node.keywords}
            calls.append((name, json.dumps(arguments, ensure_ascii=False, allow_nan=False)))
        return calls

    def _literal(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name) and node.id in self._NAMES:
            return self._NAMES[node.id]
        if isinstance(node, ast.List):
            return [self._literal(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {self._literal(k): self._literal(v) for k, v in zip(node.keys, node.values)}
        return ast.literal_eval(node)  # ValueError for anything but a literal


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Qwen3XmlToolParser,
                                       Llama3JsonToolParser, MistralToolParser,
                                       PythonicToolParser)}


def detect_tool_parser(chat_template: str | None) -> str:
    """The tool-call format a chat template asks its model for, from its markers; "hermes"
    when it names none (also the format of the default tool prompt)."""
    template = chat_template or ""
    if "<function=" in template and "<parameter=" in template:
        return Qwen3XmlToolParser.name
    if "<tool_call>" in template:
        return HermesToolParser.name
    if "[TOOL_CALLS]" in template:
        return MistralToolParser.name
    if "<|python_start|>" in template or "[func_name1(" in template:
        return PythonicToolParser.name
    if "<|python_tag|>" in template or '"parameters"' in template:
        return Llama3JsonToolParser.name
    return HermesToolParser.name


def lookup_parser(registry: dict[str, T], name: str, what: str) -> T:
    """registry[name], or a ValueError that lists the known names."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: "
                         f"{', '.join(sorted(registry))}") from None


def get_tool_parser(name: str) -> type[ToolParser]:
    return lookup_parser(TOOL_PARSERS, name, "tool call parser")


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
    its arguments are the exact text of its arguments value.

    A model made to call (tool_choice "required") may go on repeating its last call until
    max_tokens: a call identical to an earlier one ends the reply there (`repeating`; the
    server then stops the request). So that a repeat is never sent, a later call of a
    function already called opens only once its arguments differ from that call's."""

    ARGS_KEY = "parameters"

    def __init__(self, function_name: str | None = None) -> None:
        super().__init__()
        self._json = JsonValueSpans()
        self._named = function_name is not None
        self._pending: list[_PendingCall] = [_PendingCall(function_name)] if self._named else []
        self.repeating = False  # the output went on to repeat a call: it is over

    def _read(self, text: str, final: bool) -> StreamDelta:
        events = self._json.feed(text)
        if final:
            events += self._json.end()
        for kind, path, pos in events:
            self._track(kind, path, pos)
        out = StreamDelta()
        source = self._json.text
        for pending in self._pending:
            if self.repeating:
                break
            if pending.index is None:
                if pending.name is None:
                    continue
                if not self._differs(pending, source):
                    break  # held back, and the calls after it, to keep their order
                pending.index = self._open_call(pending.name, out)
            if pending.args_start is not None:
                end = pending.args_end if pending.args_end is not None else len(source)
                start = pending.args_start + pending.sent
                self._add_arguments(pending.index, source[start:end], out)
                pending.sent = end - pending.args_start
        return out

    def _differs(self, pending: _PendingCall, source: str) -> bool:
        """Whether `pending` is known not to repeat an earlier call; sets `repeating` once
        it is complete and does."""
        earlier = [c.arguments for c in self.calls if c.name == pending.name]
        if not earlier:
            return True
        if pending.args_start is None:
            return False
        end = pending.args_end if pending.args_end is not None else len(source)
        arguments = source[pending.args_start:end]
        if not any(e.startswith(arguments) for e in earlier):
            return True
        if pending.args_end is not None and arguments in earlier:
            self.repeating = True
        return False

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
