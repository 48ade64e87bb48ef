"""Per-request sampling and stopping options, with vLLM's field names and validation."""

from __future__ import annotations

import enum
import json as json_lib
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
# A temperature below this samples greedily (the argmax), here and in the sampler.
GREEDY_BELOW = 1e-5


@dataclass(slots=True)
class GuidedDecodingParams:
    """Constrains a request's output to a structure (vLLM's names). Exactly one of json,
    json_object, regex, choice and grammar is set; the engine compiles it when the request
    is added, and a spec that does not compile is a ValueError there."""

    json: str | dict | None = None  # a JSON schema, as a dict or its JSON text
    json_object: bool = False  # any JSON object (OpenAI's response_format json_object)
    regex: str | None = None  # the whole output matches it
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # EBNF (GBNF dialect, root rule `root`), as xgrammar parses it
    # JSON only: allow any whitespace between tokens instead of the one canonical layout
    # (`{"a": 1, "b": [2, 3]}`). Off by default because small models, once allowed, tend to
    # emit runs of newlines until max_tokens.
    any_whitespace: bool = False

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, str):
            self.choice = list(self.choice)
        kinds = [k for k in ("json", "json_object", "regex", "choice", "grammar")
                 if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(
                "GuidedDecodingParams needs exactly one of json, json_object, regex, choice, "
                f"grammar; got {', '.join(kinds) if kinds else 'none'}"
            )
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    json_lib.loads(self.json)
                except ValueError as exc:
                    raise ValueError(
                        f"GuidedDecodingParams.json must be a JSON schema; its text is not "
                        f"valid JSON: {exc}"
                    ) from None
            elif not isinstance(self.json, dict):
                raise ValueError(
                    "GuidedDecodingParams.json must be a JSON schema as a dict or its JSON "
                    f"text, got {type(self.json).__name__}"
                )
        if self.json_object is not False and self.json_object is not True:
            raise ValueError(
                f"GuidedDecodingParams.json_object must be a bool, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(
                    f"GuidedDecodingParams.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None and (
            isinstance(self.choice, str)
            or not self.choice
            or any(not isinstance(c, str) or not c for c in self.choice)
        ):
            raise ValueError(
                "GuidedDecodingParams.choice must be a non-empty list of non-empty strings, "
                f"got {self.choice!r}"
            )

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "json_object", "regex", "choice" or "grammar"."""
        if self.json is not None:
            return "json"
        if self.json_object:
            return "json_object"
        if self.regex is not None:
            return "regex"
        if self.choice is not None:
            return "choice"
        return "grammar"


class RequestOutputKind(enum.Enum):
    """What each output of a running request holds (vLLM's names)."""

    CUMULATIVE = 0  # everything generated so far
    DELTA = 1  # only what is new since the previous output (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    guided_decoding: GuidedDecodingParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine from the model's generation config; not user-facing.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(
                f"SamplingParams.{name} must be {allowed}, got {getattr(self, name)!r}"
            )

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "in (0, 2]")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "in [0, 100] (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 1, or 0 / -1 to disable")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer or None")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", "an integer >= 1 or None (up to the context length)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must be <= max_tokens "
                f"({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"None or an integer in [0, {MAX_LOGPROBS}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        if self.stop and not self.detokenize:
            raise ValueError("SamplingParams.stop (stop strings) needs detokenize=True")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative token ids")
        if self.logit_bias is not None:
            for token_id, bias in self.logit_bias.items():
                if token_id < 0 or not -100.0 <= bias <= 100.0:
                    raise ValueError(
                        f"SamplingParams.logit_bias entries must map token ids >= 0 to biases in "
                        f"[-100, 100], got {token_id}: {bias}"
                    )
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", "a RequestOutputKind")
        if self.guided_decoding is not None:
            if not isinstance(self.guided_decoding, GuidedDecodingParams):
                raise bad("guided_decoding", "a GuidedDecodingParams or None")
            if self.min_tokens:
                # Once the structure is complete only a stop token may follow, which
                # min_tokens would forbid: no token would be left to sample.
                raise ValueError(
                    "SamplingParams.min_tokens cannot be combined with guided_decoding "
                    "(the grammar decides where the output ends)"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def max_stop_str_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)
