"""Sentence embeddings from a sentence-transformers style encoder (default all-MiniLM-L6-v2):
the HF encoder from transformers, then the checkpoint's pooling and optional L2 normalisation.

Separate from the paged LLM engine: an encoder has no KV cache and no decode loop, so one
padded forward per batch is all it needs."""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from pagedserve.engine.tokenization import max_text_chars, max_token_chars

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")

EmbeddingInput = list[str] | list[list[int]]


class InputTooLongError(ValueError):
    """An input has more tokens than the model's max_seq_length (the server answers 400)."""


@dataclass(slots=True)
class SentenceTransformerConfig:
    """What modules.json, 1_Pooling/config.json and sentence_bert_config.json say."""

    pooling_mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None

    def __post_init__(self) -> None:
        if self.pooling_mode not in POOLING_MODES:
            raise ValueError(f"pooling_mode must be one of {POOLING_MODES}, "
                             f"got {self.pooling_mode!r}")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise ValueError(f"max_seq_length must be >= 2, got {self.max_seq_length}")

    @classmethod
    def from_dir(cls, model_dir: pathlib.Path) -> SentenceTransformerConfig:
        modules_file = model_dir / "modules.json"
        if not modules_file.is_file():  # a plain HF encoder: mean pooling, as most are trained
            logger.info("%s has no modules.json; using mean pooling, no normalisation",
                        model_dir)
            return cls(max_seq_length=_read_json(model_dir / "sentence_bert_config.json")
                       .get("max_seq_length"))
        modules = json.loads(modules_file.read_text())
        pooling_mode, normalize = "mean", False
        for module in modules:
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind not in _KNOWN_MODULES:
                raise NotImplementedError(
                    f"{modules_file}: module {module.get('type')!r} is not supported "
                    f"(supported: {', '.join(_KNOWN_MODULES)})")
            if kind == "Pooling":
                pooling_mode = _pooling_mode(model_dir / module.get("path", "") / "config.json")
            elif kind == "Normalize":
                normalize = True
        st_config = _read_json(model_dir / "sentence_bert_config.json")
        return cls(pooling_mode, normalize, st_config.get("max_seq_length"))


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pooling_mode(config_file: pathlib.Path) -> str:
    config = _read_json(config_file)
    if "pooling_mode" in config:  # newer sentence-transformers write the mode by name
        return {"mean_sqrt_len_tokens": "mean_sqrt_len"}.get(config["pooling_mode"],
                                                             config["pooling_mode"])
    flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
             "max": "pooling_mode_max_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
             "lasttoken": "pooling_mode_lasttoken"}
    chosen = [mode for mode, flag in flags.items() if config.get(flag)]
    if len(chosen) != 1:  # several modes concatenate their vectors; nobody ships that
        raise NotImplementedError(f"{config_file}: exactly one pooling mode must be set, "
                                  f"got {chosen or 'none'}")
    return chosen[0]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[batch, seq, dim] hidden states, [batch, seq] mask (right padded) -> [batch, dim]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [batch, seq, 1]
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    if mode == "lasttoken":
        last = attention_mask.sum(dim=1) - 1  # [batch]
        return hidden[torch.arange(hidden.shape[0]), last]
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / (counts if mode == "mean" else counts.sqrt())


class EmbeddingEngine:
    """Embeds a list of texts (or token-id lists) into float32 vectors, batched by length.

    Token-id inputs are the text's tokens without special tokens, as a client's tokenizer
    (tiktoken, `tokenizer(text, add_special_tokens=False)`) gives them; the model's own
    special tokens ([CLS] ... [SEP]) are added here, so ids and their text embed the same.
    Token counts include the special tokens: they are what the model computes."""

    def __init__(self, model: str | None = None, device: str = "cpu",
                 max_batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_path = model  # as the user gave it; None: the embedded default
        if model is None:
            from pagedserve.engine.loader.default_model import default_embedding_model_path

            self.model_dir = default_embedding_model_path()
            self.name = DEFAULT_EMBEDDING_MODEL_NAME
        else:
            self.model_dir = pathlib.Path(model)
            self.name = self.model_dir.name
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"embedding model {str(self.model_dir)!r} is not an HF "
                                    "directory with a config.json")
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.st_config = SentenceTransformerConfig.from_dir(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True,
                                               dtype=torch.float32).to(self.device).eval()
        config = self.model.config
        limits = [n for n in (self.st_config.max_seq_length,
                              getattr(config, "max_position_embeddings", None)) if n]
        self.max_seq_length = min(limits) if limits else 512
        self.dim = config.hidden_size
        self.vocab_size = config.vocab_size
        self.pad_token_id = self.tokenizer.pad_token_id or 0
        # Text longer than this cannot fit max_seq_length: refused or cut before it is
        # tokenized (10 MB would hold this engine's thread for seconds).
        self.max_input_chars = max_text_chars(self.max_seq_length,
                                              max_token_chars(self.tokenizer) or 1)
        self._prefix_ids, self._suffix_ids = self._special_token_affixes()
        logger.info("embedding model %s: dim %d, max_seq_length %d, %s pooling%s",
                    self.model_dir, self.dim, self.max_seq_length, self.st_config.pooling_mode,
                    ", normalized" if self.st_config.normalize else "")

    @property
    def min_truncation(self) -> int:
        """The fewest tokens an input may be truncated to: its special tokens and one more."""
        return len(self._prefix_ids) + len(self._suffix_ids) + 1

    def _special_token_affixes(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text's tokens ([CLS], [SEP] for
        BERT), found from a probe text: transformers 5 dropped build_inputs_with_special_tokens."""
        content = self.tokenizer("hello", add_special_tokens=False).input_ids
        full = self.tokenizer("hello", add_special_tokens=True).input_ids
        for start in range(len(full) - len(content) + 1):
            if full[start:start + len(content)] == content:
                return full[:start], full[start + len(content):]
        raise ValueError(f"{self.model_dir}: cannot tell the tokenizer's special tokens apart")

    def tokenize(self, inputs: EmbeddingInput, truncate_to: int | None = None,
                 keep: str = "first") -> list[list[int]]:
        """Each input's token ids with special tokens; raises ValueError for bad input.
        `truncate_to`: cut each input so that, special tokens included, it has at most this
        many tokens, keeping its `keep` ("first": sentence-transformers' truncation; "last":
        vLLM's truncate_prompt_tokens); None: an input longer than max_seq_length is an
        InputTooLongError."""
        if keep not in ("first", "last"):
            raise ValueError(f"keep must be 'first' or 'last', got {keep!r}")
        if not inputs:
            raise ValueError("input must not be empty")
        limit = self.max_seq_length if truncate_to is None else truncate_to
        if not self.min_truncation <= limit <= self.max_seq_length:
            raise ValueError(f"truncation must keep from {self.min_truncation} tokens (one "
                             f"more than the special tokens) to max_seq_length, "
                             f"{self.max_seq_length}; got {limit}")
        if all(isinstance(x, str) for x in inputs):
            texts = list(inputs)
            for i, x in enumerate(texts):
                if len(x) <= self.max_input_chars:
                    continue
                if truncate_to is None:
                    raise InputTooLongError(
                        f"This model's maximum context length is {self.max_seq_length} "
                        f"tokens, however input[{i}] has {len(x)} characters, more than that "
                        "many tokens can hold. Please reduce the length of the input.")
                # Its first (last) max_input_chars characters already hold more tokens
                # than are kept.
                texts[i] = (x[:self.max_input_chars] if keep == "first"
                            else x[-self.max_input_chars:])
            # Truncated here, not by the tokenizer: its special tokens must stay.
            ids = self.tokenizer(texts, add_special_tokens=True, truncation=False,
                                 verbose=False).input_ids
        elif all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in inputs):
            for i, x in enumerate(inputs):
                bad = [t for t in x if not 0 <= t < self.vocab_size]
                if bad:
                    raise ValueError(f"input[{i}]: token ids must be in "
                                     f"[0, {self.vocab_size}), got {bad[:5]}")
            ids = [self._prefix_ids + list(x) + self._suffix_ids for x in inputs]
        else:
            raise ValueError("input must be a list of strings or a list of token-id lists")
        for i, x in enumerate(ids):
            if len(x) <= limit:
                continue
            if truncate_to is None:
                raise InputTooLongError(
                    f"This model's maximum context length is {self.max_seq_length} tokens, "
                    f"however input[{i}] has {len(x)} tokens. Please reduce the length of "
                    "the input.")
            prefix, suffix = len(self._prefix_ids), len(self._suffix_ids)
            content = x[prefix:len(x) - suffix]
            room = limit - prefix - suffix
            kept = content[:room] if keep == "first" else content[len(content) - room:]
            ids[i] = self._prefix_ids + kept + self._suffix_ids
        return ids

    @torch.inference_mode()
    def embed(self, inputs: EmbeddingInput, truncate_to: int | None = None,
              keep: str = "first") -> tuple[torch.Tensor, list[int]]:
        """[N, dim] float32 embeddings (on CPU, in input order) and each input's token count
        (what was embedded, after truncation: see tokenize)."""
        ids = self.tokenize(inputs, truncate_to, keep)
        # Longest first: batches of similar lengths waste little on padding.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        out = torch.empty(len(ids), self.dim, dtype=torch.float32)
        for start in range(0, len(order), self.max_batch_size):
            batch = order[start:start + self.max_batch_size]
            out[batch] = self._forward([ids[i] for i in batch]).float().cpu()
        return out, [len(x) for x in ids]

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, x in enumerate(batch):  # right padding, as the pooling expects
            input_ids[row, :len(x)] = torch.tensor(x)
            attention_mask[row, :len(x)] = 1
        input_ids = input_ids.to(self.device)  # [batch, width]
        attention_mask = attention_mask.to(self.device)  # [batch, width]
        hidden = self.model(input_ids=input_ids,
                            attention_mask=attention_mask).last_hidden_state
        pooled = pool(hidden, attention_mask, self.st_config.pooling_mode)  # [batch, dim]
        if self.st_config.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


class AsyncEmbeddingEngine:
    """EmbeddingEngine for asyncio callers: embed() runs on one dedicated worker thread, so
    the event loop never blocks and the (not thread-safe) tokenizer sees one caller at a time."""

    def __init__(self, engine: EmbeddingEngine, compute_threads: int | None = None) -> None:
        """compute_threads: torch's intra-op threads on the worker (None: torch's default);
        the server gives it 1, to leave the generation engine the only OpenMP pool."""
        self.engine = engine
        initializer = None if compute_threads is None else torch.set_num_threads
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="pagedserve-embed", initializer=initializer,
            initargs=() if compute_threads is None else (compute_threads,))

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def dim(self) -> int:
        return self.engine.dim

    @property
    def max_seq_length(self) -> int:
        return self.engine.max_seq_length

    @property
    def min_truncation(self) -> int:
        return self.engine.min_truncation

    @property
    def model_path(self) -> str | None:
        """The model's path as the user gave it (None: the embedded default)."""
        return self.engine.model_path

    async def embed(self, inputs: EmbeddingInput, truncate_to: int | None = None,
                    keep: str = "first") -> tuple[torch.Tensor, list[int]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.engine.embed, inputs,
                                          truncate_to, keep)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
