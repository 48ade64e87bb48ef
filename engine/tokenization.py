"""Tokenization for the engine's asyncio callers (the server): a private copy of the
engine's tokenizer that exactly one worker thread uses.

The engine thread keeps its own tokenizer for detokenizing, so no two threads ever share a
Rust tokenizer (the tokenizers library's "Already borrowed" hazard), and a large prompt or
chat template is rendered off the caller's event loop."""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def max_token_chars(tokenizer: Any) -> int | None:
    """The most characters of (normalised) text one token covers: the vocabulary's longest
    entry, or WordPiece's one [UNK] for a word of up to max_input_chars_per_word. A text of
    n characters has at least n / max_token_chars tokens (None: unknown)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    unk_word = getattr(getattr(backend, "model", None), "max_input_chars_per_word", 0)
    longest = max(map(len, vocab), default=0)
    return max(longest, unk_word) or None


def max_text_chars(num_tokens: int, token_chars: int | None) -> int | None:
    """More characters than this cannot fit in `num_tokens` tokens, whatever they say (4x:
    normalisation, NFKC and the like, may fold several characters into one). Text beyond
    it is refused, or cut, before it is tokenized: megabytes would hold a tokenizer for
    seconds."""
    return num_tokens * 4 * token_chars if token_chars else None


class AsyncTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-tokenizer")
        self.chat_template: str | None = getattr(tokenizer, "chat_template", None)
        self.max_token_chars = max_token_chars(tokenizer)
        # Added tokens by text (`</think>` -> its id): a plain dict, read on any thread.
        get_added = getattr(tokenizer, "get_added_vocab", None)
        self.added_vocab: dict[str, int] = dict(get_added()) if get_added else {}

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def run_with_tokenizer(self, fn: Callable[[Any], T]) -> T:
        """fn(tokenizer) on the worker thread, with this copy of the tokenizer."""
        return await self._run(fn, self._tokenizer)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._run(self._encode, text, add_special_tokens)

    async def decode(self, token_ids: list[int]) -> str:
        return await self._run(self._tokenizer.decode, token_ids)

    async def render_chat(self, conversation: list[dict], *, add_generation_prompt: bool,
                          chat_template: str | None = None, **template_kwargs: Any,
                          ) -> tuple[str, list[int]]:
        """The chat template's text for `conversation` and its token ids, in one trip to
        the worker. Errors of the template (none, or it rejects the messages) propagate."""
        return await self._run(self._render_chat, conversation, add_generation_prompt,
                               chat_template, template_kwargs)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def _render_chat(self, conversation: list[dict], add_generation_prompt: bool,
                     chat_template: str | None, template_kwargs: dict) -> tuple[str, list[int]]:
        text = self._tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
            chat_template=chat_template, **template_kwargs)
        # The template already holds the special tokens (BOS included, if any).
        return text, self._encode(text, add_special_tokens=False)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
