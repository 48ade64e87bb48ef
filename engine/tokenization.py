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


class AsyncTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-tokenizer")
        self.chat_template: str | None = getattr(tokenizer, "chat_template", None)
        # The longest token's text: no token covers more characters of (normalised) text,
        # so a text of n characters has at least n / max_token_chars tokens (None: unknown).
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self.max_token_chars: int | None = max(map(len, vocab), default=None)

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
