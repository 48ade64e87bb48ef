"""One sequence's state as it moves through the scheduler: tokens, progress, blocks."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from pagedserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import xgrammar

    from pagedserve.engine.detokenizer import IncrementalDetokenizer
    from pagedserve.engine.outputs import Logprob


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6  # this request's processing raised; the rest of the batch goes on

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FIRST_FINISHED = int(RequestStatus.FINISHED_STOPPED)

FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A single sequence, as the scheduler and the engine's output processing see it (the
    model runner never does: it gets plain data). A user request with n > 1 becomes n."""

    # Slots lie in this order in memory: what every step reads of every running sequence
    # comes first, so a step touches two cache lines of it rather than four.
    __slots__ = (
        "request_id", "all_token_ids", "num_prompt_tokens", "num_computed_tokens",
        "num_output_placeholders", "max_tokens", "status", "stop_token_ids", "detokenizer",
        "grammar", "logprobs", "error", "num_sent_tokens", "finish_sent",
        "prompt_token_ids", "sampling_params", "arrival_time", "num_cached_tokens",
        "cumulative_logprob", "prompt_logprobs", "stop_reason", "num_preemptions",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens  # resolved against max_model_len by the engine
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.all_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.stop_token_ids = sampling_params.all_stop_token_ids
        self.num_computed_tokens = 0  # advanced when scheduled, for the step being computed
        # Tokens being sampled by scheduled steps whose output has not been appended yet: one
        # between schedule and output, two while async scheduling runs a step ahead.
        self.num_output_placeholders = 0
        self.num_cached_tokens = 0  # prefix-cache hits at (latest) admission
        self.status = RequestStatus.WAITING
        self.detokenizer: IncrementalDetokenizer | None = None
        self.logprobs: list[dict[int, Logprob]] | None = (
            [] if sampling_params.logprobs is not None else None
        )
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if sampling_params.prompt_logprobs is not None else None
        )
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.error: str | None = None  # set with FINISHED_ERROR
        # Guided decoding: at the state after the output tokens so far (the engine advances
        # it with each sampled token); None for unguided requests and once finished.
        self.grammar: xgrammar.GrammarMatcher | None = None
        # Delta outputs (RequestOutputKind.DELTA): output tokens sent so far, and whether the
        # final output went out.
        self.num_sent_tokens = 0
        self.finish_sent = False

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status >= _FIRST_FINISHED  # a plain int compare: read per token

    def append_token(self, token_id: int) -> None:
        """A sampled token arrived: it takes the place of the oldest placeholder."""
        self.all_token_ids.append(token_id)
        self.num_output_placeholders -= 1

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
