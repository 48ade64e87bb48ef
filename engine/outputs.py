"""What the engine hands back: vLLM-shaped RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass


class Logprob(float):
    """A log probability that reads as a float (`lp[token_id] < 0`) and, like vLLM's
    `Logprob`, carries `.logprob`, `.rank` and `.decoded_token`."""

    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None):
        obj = super().__new__(cls, logprob)
        obj.rank = rank
        obj.decoded_token = decoded_token
        return obj

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob({float(self)!r}, rank={self.rank}, decoded_token={self.decoded_token!r})"


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] | None = None  # none are kept yet (vLLM's RequestMetrics)
    error: str | None = None  # set when the request failed inside the engine


class DeltaAccumulator:
    """Rebuilds a request's cumulative RequestOutput from its delta outputs
    (RequestOutputKind.DELTA) in O(total output), for callers that stream internally but
    answer once."""

    def __init__(self) -> None:
        self._last: RequestOutput | None = None
        self._prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self._completions: dict[int, CompletionOutput] = {}
        self._texts: dict[int, list[str]] = {}

    def add(self, delta: RequestOutput) -> None:
        self._last = delta
        if delta.prompt_logprobs is not None:
            self._prompt_logprobs = delta.prompt_logprobs
        for new in delta.outputs:
            done = self._completions.get(new.index)
            if done is None:
                self._completions[new.index] = CompletionOutput(
                    new.index, "", list(new.token_ids), new.cumulative_logprob,
                    None if new.logprobs is None else list(new.logprobs),
                    new.finish_reason, new.stop_reason)
                self._texts[new.index] = [new.text]
                continue
            self._texts[new.index].append(new.text)
            done.token_ids.extend(new.token_ids)
            if new.logprobs is not None:
                done.logprobs.extend(new.logprobs)
            done.cumulative_logprob = new.cumulative_logprob
            done.finish_reason, done.stop_reason = new.finish_reason, new.stop_reason

    def result(self) -> RequestOutput:
        """Everything added so far, as one cumulative output."""
        if self._last is None:
            raise ValueError("no output was added")
        outputs = []
        for index in sorted(self._completions):
            completion = self._completions[index]
            completion.text = "".join(self._texts[index])
            self._texts[index] = [completion.text]
            outputs.append(completion)
        last = self._last
        return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids,
                             self._prompt_logprobs, outputs, last.finished,
                             last.num_cached_tokens, last.metrics, last.error)
