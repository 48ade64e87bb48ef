"""Reasoning out of generated text, whole or as it streams: reasoning models (DeepSeek-R1
and its distills, Qwen3) think inside `<think>...</think>` before they answer; the server
returns that as `reasoning_content` (and `reasoning`, the newer name) and only the answer
as `content`, where tool calls are then read. Chosen by `pagedserve serve
--reasoning-parser`.

Like the tool parsers, each reader is a stream: feed() text as it is generated, then
finish(); a non-streamed response feeds the whole text at once, so streamed and
non-streamed answers cannot differ."""

from __future__ import annotations

from typing import ClassVar

from pagedserve.server.tool_parsers import TrimmedText, lookup_parser, split_at_tag

_START, _REASONING, _AFTER, _CONTENT = range(4)


class ReasoningParser:
    """Splits one choice's text into (reasoning, content) deltas. The reasoning is the text
    inside the think tags, trimmed; the content is what follows `</think>`, its leading
    blank lines dropped. Text that may be the start of a tag is held back until it is known
    not to be."""

    name: ClassVar[str]
    START, END = "<think>", "</think>"
    # Whether output without an opening <think> starts in reasoning: the template opened
    # the block in the prompt (DeepSeek-R1), or the model opens it itself (Qwen3).
    opens_in_reasoning: ClassVar[bool]

    def __init__(self, opens_in_reasoning: bool | None = None) -> None:
        """`opens_in_reasoning`: override the format's default (False for a guided request:
        its grammar shapes the output from the first token, so only an explicit <think>
        can start reasoning)."""
        if opens_in_reasoning is not None:
            self.opens_in_reasoning = opens_in_reasoning
        self._buffer = ""
        self._state = _START
        self._reasoning = TrimmedText()
        # What was read, in pieces: joining only when asked keeps a stream O(its length).
        self._reasoning_pieces: list[str] = []
        self._content_pieces: list[str] = []

    @property
    def reasoning(self) -> str:
        """All the reasoning read so far."""
        return "".join(self._reasoning_pieces)

    @property
    def content(self) -> str:
        """All the content read so far."""
        return "".join(self._content_pieces)

    def feed(self, text: str) -> tuple[str, str]:
        return self._record(*self._read(text, final=False))

    def finish(self) -> tuple[str, str]:
        return self._record(*self._read("", final=True))

    def parse(self, text: str) -> tuple[str | None, str]:
        """The whole text at once: (reasoning or None, content)."""
        self.feed(text)
        self.finish()
        return self.reasoning or None, self.content

    def _record(self, reasoning: str, content: str) -> tuple[str, str]:
        if reasoning:
            self._reasoning_pieces.append(reasoning)
        if content:
            self._content_pieces.append(content)
        return reasoning, content

    def _read(self, text: str, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        self._buffer += text
        while True:
            if self._state == _START:
                head = self._buffer.lstrip()
                if head.startswith(self.START):
                    self._buffer = head[len(self.START):]
                    self._state = _REASONING
                elif not final and self.START.startswith(head):
                    return reasoning, content  # it may still become <think>
                else:
                    self._state = _REASONING if self.opens_in_reasoning else _CONTENT
            elif self._state == _REASONING:
                before, tag, self._buffer = split_at_tag(self._buffer, (self.END,), final)
                reasoning += self._reasoning.push(before)
                if tag is None:
                    return reasoning, content
                self._state = _AFTER
            elif self._state == _AFTER:  # "</think>\n\n" comes before the answer
                self._buffer = self._buffer.lstrip("\r\n")  # (not its indentation)
                if not self._buffer:
                    return reasoning, content
                self._state = _CONTENT
            else:
                content += self._buffer
                self._buffer = ""
                return reasoning, content


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1 and its distills (and Qwen3 "Thinking-2507"): the chat template ends the
    prompt with `<think>\\n`, so the output is reasoning until `</think>` (all of it if
    that never comes: max_tokens hit mid-thought)."""

    name = "deepseek_r1"
    opens_in_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: the model opens `<think>` itself; output without it is all content (as with
    chat_template_kwargs {"enable_thinking": false}, where the template closes an empty
    block in the prompt)."""

    name = "qwen3"
    opens_in_reasoning = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    return lookup_parser(REASONING_PARSERS, name, "reasoning parser")
