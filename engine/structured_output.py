"""Structured output: compiles GuidedDecodingParams into xgrammar grammars (once per distinct
spec) and masks each guided row's logits to the tokens its grammar allows next.

xgrammar is imported only when the engine builds a StructuredOutputManager, i.e. on the first
guided request, so an engine that never sees one never loads it."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pagedserve.engine.sampling_params import GuidedDecodingParams

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)

# Compiled grammars kept; a server whose every request brings a new schema must not grow
# without bound. A compiled JSON schema grammar is tens to hundreds of KiB.
_MAX_CACHED_GRAMMARS = 256
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:line: "; the user needs the rest.
_XGRAMMAR_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
# An integer with no bounds in its schema gets int64's: a small model, once in a number,
# may write digits until max_tokens ("population": 1111111...), and no consumer holds more.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Keywords whose values are data, not schemas, or schemas a bound could make match more
# (under `not`, an `if`'s condition): copied as they are.
_LEFT_ALONE = frozenset({"const", "default", "enum", "examples", "not", "if"})
# Keywords whose values map names to schemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                          "dependentSchemas"})


@dataclass(slots=True)
class GrammarBitmask:
    """One step's allowed-token masks for the guided rows of the sampled batch."""

    bitmask: torch.Tensor  # [B, ceil(V / 32)] int32 on the logits' device; bit set = allowed
    rows: list[int]  # the rows it applies to; the other rows hold stale bits and are skipped
    vocab_size: int

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed tokens of `rows` of logits [B, V] to -inf, in place."""
        from xgrammar import apply_token_bitmask_inplace

        apply_token_bitmask_inplace(
            logits, self.bitmask, vocab_size=self.vocab_size, indices=self.rows
        )


class StructuredOutputManager:
    """Owned by the engine: compiles specs (cached), makes matchers, fills the step's bitmask.

    A matcher lives on its Request (`Request.grammar`) and is advanced by the engine with each
    token the request samples; this class keeps no per-request state.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 max_num_seqs: int, device: torch.device,
                 reasoning_ids: tuple[int, int] | None = None) -> None:
        """`reasoning_ids`: a reasoning model's thinking tags' token ids (reasoning_tag_ids):
        guided output is then constrained after the thinking; None: throughout."""
        import xgrammar as xgr

        self._xgr = xgr
        self.reasoning_ids = reasoning_ids
        # Text the grammar forces (keys, punctuation, a lone enum value) is spelled the way
        # the tokenizer spells it: the model is never made to write `s|et|u|p` for "setup"
        # (a spelling it never saw, after which small models derail). Off only to measure
        # what it is worth (benchmarks/structured_output_quality.py).
        self.canonical_forced_tokens = True
        # Its own copy: fill_bitmask runs on the engine thread, while the caller's copy may
        # be in use on another (a Rust tokenizer refuses two threads at once).
        self._tokenizer = copy.deepcopy(tokenizer)
        self.vocab_size = vocab_size
        self.device = device
        # vocab_size is the model's logits width, which may exceed the tokenizer's length:
        # xgrammar then masks the ids past the tokenizer, which no text can produce.
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        # Our own cache, keyed by the canonical spec, replaces xgrammar's (keyed by the raw
        # text), so that there is one bound on memory and equal schemas written differently
        # compile once.
        self._compiler = xgr.GrammarCompiler(
            info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False
        )
        self._cache: OrderedDict[tuple, xgrammar.CompiledGrammar] = OrderedDict()
        # compile() is called from the server's compile threads and the engine thread.
        self._cache_lock = threading.Lock()
        self.num_compilations = 0  # cache misses, for tests and stats
        # Rows are sampled-batch positions, and a batch never has more than max_num_seqs.
        self._bitmask = xgr.allocate_token_bitmask(max_num_seqs, vocab_size)
        if device.type == "cuda":
            # Pinned, so the per-step copy to the GPU does not wait for the queued forward.
            self._bitmask = self._bitmask.pin_memory()

    # ---- compiling ------------------------------------------------------------------
    def compile(self, guided: GuidedDecodingParams) -> xgrammar.CompiledGrammar:
        """The compiled grammar for `guided`; ValueError naming the problem if it has none."""
        try:
            key = _cache_key(guided)
        except (TypeError, ValueError) as exc:  # e.g. a schema dict holding a set
            raise ValueError(
                f"invalid guided_decoding.{guided.kind}: not serialisable as JSON: {exc}"
            ) from None
        with self._cache_lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        try:
            compiled = self._compile(guided)  # outside the lock: it may take seconds
        except (RuntimeError, ValueError, TypeError) as exc:
            message = _XGRAMMAR_ERROR_PREFIX.sub("", str(exc).strip())
            raise ValueError(f"invalid guided_decoding.{guided.kind}: {message}") from None
        with self._cache_lock:
            self.num_compilations += 1
            self._cache[key] = compiled
            if len(self._cache) > _MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, guided: GuidedDecodingParams) -> xgrammar.CompiledGrammar:
        compiler = self._compiler
        kind = guided.kind
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else guided.json
            if isinstance(schema, str):
                schema = json.loads(schema)  # valid: _cache_key parsed it
            return compiler.compile_json_schema(bound_integers(schema),
                                                any_whitespace=guided.any_whitespace)
        if kind == "regex":
            return compiler.compile_regex(guided.regex)
        if kind == "choice":
            # JSON string escapes are EBNF string escapes; non-ASCII stays as it is.
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in guided.choice)
            return compiler.compile_grammar(f"root ::= {alternatives}")
        return compiler.compile_grammar(guided.grammar)

    def new_matcher(self, compiled: xgrammar.CompiledGrammar, stop_token_ids: Iterable[int],
                    prompt_token_ids: list[int] | None = None):
        """A matcher at the start of the output. Once the structure is complete it allows
        only the request's stop tokens (the engine's EOS ids if the request has none, e.g.
        with ignore_eos), and accepting one terminates it. With reasoning tags, it waits
        for the thinking to end first (ThinkingFirst)."""
        stop = sorted(stop_token_ids)
        matcher = self._xgr.GrammarMatcher(compiled, override_stop_tokens=stop or None)
        if self.reasoning_ids is None:
            return matcher
        return ThinkingFirst(matcher, *self.reasoning_ids, prompt_token_ids or [])

    # ---- each step ------------------------------------------------------------------
    def fill_bitmask(self, matchers: list[xgrammar.GrammarMatcher | None]
                     ) -> GrammarBitmask | None:
        """Masks for the batch whose sampling rows have `matchers` (None: unguided row);
        None if no row needs one. Runs on the CPU, from each matcher's state after the
        previous step."""
        rows = [
            i for i, matcher in enumerate(matchers)
            # fill returns False when it allowed every token: nothing to mask in that row.
            if matcher is not None and matcher.fill_next_token_bitmask(self._bitmask, i)
        ]
        if not rows:
            return None
        if self.canonical_forced_tokens:
            for i in rows:
                token = self._forced_token(matchers[i], self._bitmask[i])
                if token is not None:  # the only token the row may take
                    self._bitmask[i].zero_()
                    self._bitmask[i, token >> 5] = _bit(token)
        bitmask = self._bitmask[:len(matchers)]
        if bitmask.device != self.device:
            # The host buffer is refilled next step only after this step's token read-back
            # has synchronised, so the copy is done by then.
            bitmask = bitmask.to(self.device, non_blocking=True)
        return GrammarBitmask(bitmask, rows, self.vocab_size)


    def _forced_token(self, matcher: xgrammar.GrammarMatcher,
                      row: torch.Tensor) -> int | None:
        """The next token of the tokenizer's own spelling of the text the grammar forces
        from here, or None when nothing is forced or the spelling's end is not settled."""
        forced = matcher.find_jump_forward_string()
        if not forced:
            return None
        # Only the first token is wanted: a bounded prefix keeps a long forced literal
        # from costing its whole length every step (no token is near 64 characters).
        ids = self._tokenizer.encode(forced[:_FORCED_PREFIX_CHARS], add_special_tokens=False)
        # The forced text's last token may merge with what the model writes next (` "`
        # then `A`...): a lone token is forced only where xgrammar finds no longer token
        # extending it. A tokenizer that spells text alone differently (SentencePiece
        # prepends a space) falls back to xgrammar's longest-match spelling.
        if not ids or not _allowed(row, ids[0]) or len(ids) == 1:
            longest = matcher.find_jump_forward_tokens()
            if not (ids and _allowed(row, ids[0]) and longest == ids):
                ids = longest
        return ids[0] if ids and _allowed(row, ids[0]) else None


_FORCED_PREFIX_CHARS = 64


# A prompt whose end tag is among its last few tokens closed the thinking itself (Qwen3's
# template with enable_thinking=False ends in "<think>\n\n</think>\n\n"): the answer is next.
_CLOSED_THINKING_TAIL = 4


def thinking_state(prompt_token_ids: list[int], start_id: int, end_id: int) -> str:
    """How a reasoning model's output begins after this prompt: "thinking" (the prompt
    opened a block it did not close: DeepSeek-R1's template), "answer" (the prompt just
    closed one) or "open" (the model may open one, as Qwen3 does, or answer)."""
    last_start = _last_index(prompt_token_ids, start_id)
    last_end = _last_index(prompt_token_ids, end_id)
    if last_start > last_end:
        return "thinking"
    if last_end >= 0 and len(prompt_token_ids) - last_end <= _CLOSED_THINKING_TAIL:
        return "answer"
    return "open"


class ThinkingFirst:
    """A grammar matcher that lets a reasoning model think first: output is free until the
    end tag, and the grammar holds from the token after it. Where the prompt leaves the
    thinking (thinking_state): under way, the grammar waits for the end tag; just closed,
    it holds at once; else the first token may be the start tag or the grammar's."""

    _OPENING, _THINKING, _GRAMMAR = range(3)

    def __init__(self, matcher, start_id: int, end_id: int, prompt_token_ids: list[int]):
        self.matcher, self.start_id, self.end_id = matcher, start_id, end_id
        self.phase = {"thinking": self._THINKING, "answer": self._GRAMMAR,
                      "open": self._OPENING}[thinking_state(prompt_token_ids, start_id, end_id)]

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Like GrammarMatcher's: False when every token is allowed (while thinking)."""
        if self.phase == self._THINKING:
            return False
        masked = self.matcher.fill_next_token_bitmask(bitmask, row)
        if masked and self.phase == self._OPENING:
            bitmask[row, self.start_id >> 5] |= _bit(self.start_id)
        return masked

    def accept_token(self, token_id: int) -> bool:
        if self.phase == self._THINKING:
            if token_id == self.end_id:
                self.phase = self._GRAMMAR
            return True
        if self.phase == self._OPENING:
            if token_id == self.start_id:
                self.phase = self._THINKING
                return True
            self.phase = self._GRAMMAR
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self.phase == self._GRAMMAR and self.matcher.is_terminated()

    def find_jump_forward_string(self) -> str:
        """Nothing is forced while the start tag is still an option."""
        return self.matcher.find_jump_forward_string() if self.phase == self._GRAMMAR else ""

    def find_jump_forward_tokens(self) -> list[int]:
        return self.matcher.find_jump_forward_tokens() if self.phase == self._GRAMMAR else []


def _last_index(ids: list[int], token: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1


def reasoning_tag_ids(tokenizer, tags: tuple[str, str]) -> tuple[int, int] | None:
    """The thinking tags' token ids; None (with a warning) unless each is one token."""
    ids = [tokenizer.encode(tag, add_special_tokens=False) for tag in tags]
    if all(len(i) == 1 for i in ids):
        return ids[0][0], ids[1][0]
    logger.warning("reasoning tags %s are not single tokens of this tokenizer: guided output "
                   "is constrained from the first token, thinking or not", tags)
    return None


def _bit(token: int) -> int:
    """Token's bit in its int32 bitmask word (bit 31 is the sign)."""
    bit = 1 << (token & 31)
    return bit - (1 << 32) if bit >= 1 << 31 else bit


def _allowed(row: torch.Tensor, token: int) -> bool:
    return 0 <= token < row.numel() * 32 and bool((int(row[token >> 5]) >> (token & 31)) & 1)


def bound_integers(schema):
    """A copy of a JSON schema in which every integer without a lower (upper) bound gets
    int64's; the rest unchanged. Output valid for the copy is valid for the original (the
    negated and conditional parts, where a bound could widen it, are left alone)."""
    if isinstance(schema, list):
        return [bound_integers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):  # name -> schema
            bounded[key] = {name: bound_integers(sub) for name, sub in value.items()}
        elif key in _LEFT_ALONE:
            bounded[key] = value
        else:
            bounded[key] = bound_integers(value)
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "integer" in kinds and "number" not in kinds:  # a bound would cap numbers too
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            bounded["minimum"] = _INT64_MIN
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            bounded["maximum"] = _INT64_MAX
    return bounded


def _cache_key(guided: GuidedDecodingParams) -> tuple:
    kind = guided.kind
    if kind == "json":
        schema = json.loads(guided.json) if isinstance(guided.json, str) else guided.json
        spec = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    elif kind == "json_object":
        spec = ""
    elif kind == "choice":
        spec = json.dumps(guided.choice)
    else:
        spec = getattr(guided, kind)
    return kind, spec, guided.any_whitespace if kind in ("json", "json_object") else None
