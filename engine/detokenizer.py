"""Incremental detokenization of generated tokens with stop-string matching and a streaming
hold-back, after vLLM v1's IncrementalDetokenizer."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import tokenizers

from pagedserve.engine.sampling_params import SamplingParams

# Prompt tokens kept as decoding context (vLLM's numbers): decoders that add or drop a leading
# space (WordPiece, Metaspace) must see the previous word to render the first output token as it
# reads in the full text. Two extra ids are looked at so skipped special tokens still leave some.
_PROMPT_CONTEXT_TOKENS = 5
_PROMPT_LOOKBACK_IDS = _PROMPT_CONTEXT_TOKENS + 2
# A UTF-8 character has at most 4 bytes, so at most 4 tokens can wait on one. A longer run that
# still ends in U+FFFD is invalid bytes: emit them as U+FFFD (as a full decode does) rather than
# let the window, and with it the cost per token, grow.
_MAX_PENDING_TOKENS = 8
_REPLACEMENT_CHAR = "\ufffd"


# tokenizer -> {skip_special_tokens: {token id: decode([token id])}}. Weak keys: a cache
# goes with its tokenizer; it holds at most one entry per vocabulary token.
_SINGLE_TOKEN_TEXTS: weakref.WeakKeyDictionary[Any, dict[bool, dict[int, str]]] = (
    weakref.WeakKeyDictionary())


def _single_token_texts(tokenizer: Any, skip_special_tokens: bool) -> dict[int, str]:
    return _SINGLE_TOKEN_TEXTS.setdefault(tokenizer, {}).setdefault(skip_special_tokens, {})


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text, a few tokens at a time."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._output_token_ids: list[int] = []
        self._detokenize = params.detokenize
        if not self._detokenize:
            if params.stop:
                # Same rule as vLLM's SamplingParams: without text there is nothing to match.
                raise ValueError(
                    "SamplingParams.stop: stop strings are only supported when detokenize is True"
                )
            return

        self._stop: list[str] = list(params.stop or [])
        self._min_tokens = params.min_tokens
        self._include_stop = params.include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        # A stop string cut from the output must never have been streamed, so the last
        # (longest stop - 1) characters wait until the next token shows they are not a stop's start.
        self._stop_buffer_length = (
            self._max_stop_len - 1 if self._stop and not self._include_stop else 0
        )

        # The text is a list of pieces, not one string grown with +=, so that adding a token,
        # searching for stop strings and streaming a delta cost O(new text), not O(all text).
        self._pieces: list[str] = []
        self._text_len = 0
        self._last_output_text_offset = 0

        skip_special_tokens = params.skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if isinstance(backend, tokenizers.Tokenizer):
            # The Rust tokenizer directly: transformers' decode adds only Python overhead (and
            # clean_up_tokenization_spaces, a whole-text rewrite vLLM does not apply either).
            added_tokens = backend.get_added_tokens_decoder()
            added = {i: t.content for i, t in added_tokens.items()}
            special = {i for i, t in added_tokens.items() if t.special}
            decode: Callable[..., str] = backend.decode
        else:
            added = {i: str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
            special = set(getattr(tokenizer, "all_special_ids", ()))
            decode = tokenizer.decode
        # A partial, not a lambda: decodes run per token, without a Python frame each.
        self._decode_ids = functools.partial(decode, skip_special_tokens=skip_special_tokens)
        # A byte-level decoder (GPT-2, Llama 3, Qwen, SmolLM2) turns each token into its own
        # bytes and decodes their concatenation, so after whole text a token whose bytes are
        # whole UTF-8 adds exactly its own text: no decode at all. Other decoders add or drop
        # spaces by position (Metaspace's and WordPiece's leading space): always two decodes.
        self._concatenates = (isinstance(backend, tokenizers.Tokenizer)
                              and type(backend.decoder) is tokenizers.decoders.ByteLevel)
        # The decoding context is most often the one token emitted last, whose text this
        # tokenizer gives every request alike: cached, a token costs one decode, not two.
        self._single_texts = _single_token_texts(tokenizer, skip_special_tokens)
        # Skipped tokens decode to nothing; dropping them up front keeps them from taking the
        # place of real context in the window (exactly what the tokenizer does when skipping).
        self._skip_ids = frozenset(special) if skip_special_tokens else frozenset()

        # Like vLLM's fast path for tokenizers, which have no such option themselves: with
        # special tokens kept and spaces_between_special_tokens=False, a special token right
        # after another is rendered as its bare content, without the space the decoder adds.
        self._added_tokens: dict[int, str] | None = None
        if not skip_special_tokens and not params.spaces_between_special_tokens and added:
            self._added_tokens = added
        self._last_was_added = False

        # Decoding window: ids from prefix_offset on. window[:read] was emitted already and is
        # context only; window[read:] is new. prefix_text caches decode(window[:read]).
        tail = [i for i in prompt_token_ids[-_PROMPT_LOOKBACK_IDS:] if i not in self._skip_ids]
        self._window: list[int] = tail[-_PROMPT_CONTEXT_TOKENS:]
        self._read = len(self._window)
        self._prefix_text: str | None = None

    @property
    def output_token_ids(self) -> list[int]:
        return self._output_token_ids

    @property
    def output_text(self) -> str:
        if not self._detokenize:
            return ""
        text = "".join(self._pieces)
        # Keep the joined string so repeated reads don't join again.
        self._pieces = [text] if text else []
        return text

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Append newly generated token ids. `stop_terminated` is True when the engine already
        decided the last of these tokens ends the request (EOS or a stop_token_id): that token's
        text is then not added (unless params.include_stop_str_in_output). Returns the stop string
        that matched (output_text is then truncated before it, or after it if
        include_stop_str_in_output), else None."""
        if not new_token_ids:
            return None
        if not self._detokenize:
            self._output_token_ids.extend(new_token_ids)
            return None

        skipped_stop_token_id = None
        if stop_terminated and not self._include_stop:
            skipped_stop_token_id = new_token_ids[-1]
            new_token_ids = new_token_ids[:-1]

        # Text from tokens up to min_tokens is never searched for stop strings.
        stop_check_offset = self._text_len
        for token_id in new_token_ids:
            self._output_token_ids.append(token_id)
            piece = self._decode_next(token_id)
            if piece:
                self._pieces.append(piece)
                self._text_len += len(piece)
            if len(self._output_token_ids) <= self._min_tokens:
                stop_check_offset = self._text_len
        if skipped_stop_token_id is not None:
            self._output_token_ids.append(skipped_stop_token_id)

        if (
            not self._stop
            or len(self._output_token_ids) <= self._min_tokens
            or stop_check_offset == self._text_len
        ):
            return None
        return self._check_stop_strings(stop_check_offset)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to emit now. delta=True: only what was not emitted before. While not finished,
        hold back the last (max stop string length - 1) characters so a partial stop string never
        leaks to a streaming client; when finished, flush everything."""
        if not self._detokenize:
            return ""
        end = self._text_len - (0 if finished else self._stop_buffer_length)
        if not delta:
            return self.output_text[: max(end, 0)]
        start = self._last_output_text_offset
        if start >= end:
            return ""
        self._last_output_text_offset = end
        last = self._pieces[-1]
        if end == self._text_len and start == end - len(last):  # one token's text, most steps
            return last
        return self._text_from(start)[: end - start]

    def _decode_next(self, token_id: int) -> str:
        """Text that token_id adds, by the prefix_offset/read_offset technique: decode the
        window with and without the new tokens and emit the difference (or, where the decoder
        concatenates, the token's own text), so the cost per token does not depend on the
        length of the output."""
        if token_id in self._skip_ids:
            return ""
        window = self._window
        piece = None
        if self._concatenates and self._read == 1 and len(window) == 1:
            # Nothing pending behind the one token emitted last (most steps).
            singles = self._single_texts
            text = singles.get(token_id) or self._single_text(token_id)
            last = singles.get(window[0]) or self._single_text(window[0])
            if _REPLACEMENT_CHAR not in text and _REPLACEMENT_CHAR not in last:
                piece = self._prefix_text = text
                window[0] = token_id
        if piece is None:
            piece = self._decode_window(token_id)

        if self._added_tokens is not None:
            content = self._added_tokens.get(token_id)
            if content is not None and self._last_was_added:
                piece = content
            self._last_was_added = content is not None
        return piece

    def _decode_window(self, token_id: int) -> str:
        window = self._window
        window.append(token_id)
        if self._prefix_text is None:
            self._prefix_text = (self._single_text(window[0]) if self._read == 1
                                 else self._decode_ids(window[: self._read]))
        new_text = self._decode_ids(window)
        if (
            len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)
        ) and len(window) - self._read < _MAX_PENDING_TOKENS:
            # A trailing U+FFFD is a character whose bytes are still arriving: hold it back.
            return ""
        piece = new_text[len(self._prefix_text) :]
        del window[: self._read]
        self._read = len(window)
        self._prefix_text = None
        return piece

    def _single_text(self, token_id: int) -> str:
        text = self._single_texts.get(token_id)
        if text is None:
            text = self._single_texts[token_id] = self._decode_ids([token_id])
        return text

    def _check_stop_strings(self, new_text_offset: int) -> str | None:
        """Find the earliest stop string that ends in the text from new_text_offset on (any
        earlier match would have ended the request already) and truncate the text at it."""
        search_from = max(new_text_offset - (self._max_stop_len - 1), 0)
        tail = self._text_from(search_from)
        match: tuple[int, str] | None = None
        for stop_str in self._stop:
            start = max(new_text_offset - (len(stop_str) - 1) - search_from, 0)
            index = tail.find(stop_str, start)
            if index != -1 and (match is None or index < match[0]):
                match = (index, stop_str)
        if match is None:
            return None
        index, stop_str = match
        end = search_from + index + (len(stop_str) if self._include_stop else 0)
        self._truncate(end)
        return stop_str

    def _text_from(self, start: int) -> str:
        """Text from character offset `start` to the end, joining only the pieces it spans."""
        parts: list[str] = []
        pos = self._text_len
        i = len(self._pieces)
        while pos > start:
            i -= 1
            parts.append(self._pieces[i])
            pos -= len(self._pieces[i])
        parts.reverse()
        return "".join(parts)[start - pos :]

    def _truncate(self, length: int) -> None:
        while self._text_len > length:
            piece = self._pieces.pop()
            self._text_len -= len(piece)
            if self._text_len < length:
                self._pieces.append(piece[: length - self._text_len])
                self._text_len = length
