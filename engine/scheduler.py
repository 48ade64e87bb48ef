"""Iteration-level scheduling: each step gives running requests, then waiting ones (FCFS),
as many new tokens as the token budget allows, with no prefill/decode phases.

What it hands the model runner is plain data (SchedulerOutput): a request's prompt, params
and blocks once when it is admitted, then only what changed each step."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request scheduled for the first time: everything the runner keeps for it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]  # its block table so far (prefix-cache hits, then new blocks)
    num_computed_tokens: int  # tokens already in the cache (prefix-cache hits)


@dataclass(slots=True)
class CachedRequestData:
    """Requests the runner already knows, scheduled again: what changed since last time.

    A request resumed after preemption gets its whole new block table in new_block_ids
    (resumed True); a running one the blocks to append to its table."""

    request_ids: list[str] = field(default_factory=list)
    resumed_from_preemption: list[bool] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)  # before this step


@dataclass(slots=True)
class SchedulerOutput:
    """What the model runner computes this step. Plain data: it can be pickled or sent to
    another process, and holds no object the scheduler goes on mutating."""

    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    # New tokens each scheduled request computes, in scheduling order.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # since the last step

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order; the last is preempted first
        self._finished_ids: list[str] = []
        self.num_preemptions = 0  # total, for stats and tests

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted_request_ids:
            # Admitting while preempting would only thrash the cache.
            self._schedule_waiting(out, budget)
        out.finished_request_ids, self._finished_ids = self._finished_ids, []
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        kvm, cached, running = self.kv_cache_manager, out.scheduled_cached_reqs, self.running
        scheduled = out.num_scheduled_tokens
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            placeholders = request.num_output_placeholders
            num_tokens = len(request.all_token_ids)
            if placeholders and (num_tokens - request.num_prompt_tokens + placeholders
                                 >= request.max_tokens):
                i += 1  # its last token is already being sampled (async scheduling)
                continue
            num_computed = request.num_computed_tokens
            num_new = min(num_tokens + placeholders - num_computed, budget)
            while (new_blocks := kvm.allocate_slots(request, num_new)) is None:
                victim = running.pop()
                self._preempt(victim)
                out.preempted_request_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                request_id = request.request_id
                cached.request_ids.append(request_id)
                cached.resumed_from_preemption.append(False)
                cached.new_block_ids.append([b.block_id for b in new_blocks] if new_blocks else [])
                cached.num_computed_tokens.append(num_computed)
                # _scheduled(), inlined: this loop runs for every running request each step.
                scheduled[request_id] = num_new
                request.num_computed_tokens = num_computed + num_new
                if num_computed + num_new == num_tokens + placeholders:
                    request.num_output_placeholders = placeholders + 1
                budget -= num_new
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        kvm = self.kv_cache_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.num_output_placeholders:
                break  # preempted while a step sampled for it: wait for that token
            hits, num_cached = kvm.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_cached, budget)
            if kvm.allocate_slots(request, num_new, hits) is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            resumed = request.status == RequestStatus.PREEMPTED
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            request.num_cached_tokens = num_cached
            self.running.append(request)
            block_ids = kvm.get_block_ids(request.request_id)
            if resumed:  # the runner kept its tokens; only its table is new
                cached = out.scheduled_cached_reqs
                cached.request_ids.append(request.request_id)
                cached.resumed_from_preemption.append(True)
                cached.new_block_ids.append(block_ids)
                cached.num_computed_tokens.append(num_cached)
            else:
                out.scheduled_new_reqs.append(NewRequestData(
                    request.request_id, request.prompt_token_ids, request.sampling_params,
                    block_ids, num_cached))
            self._scheduled(out, request, num_new)
            budget -= num_new

    @staticmethod
    def _scheduled(out: SchedulerOutput, request: Request, num_new: int) -> None:
        """Count the step's tokens as computed now, so the next step can be scheduled before
        this one's output is back; a step that reaches the end samples a placeholder."""
        out.num_scheduled_tokens[request.request_id] = num_new
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
            request.num_output_placeholders += 1

    def _preempt(self, request: Request) -> None:
        """Free everything and requeue at the front; it is recomputed (mostly from the
        prefix cache) when readmitted. Its sampled tokens are kept."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish_requests(self, requests: Iterable[Request], status: RequestStatus) -> None:
        """End requests (stopped, length or aborted) wherever they are and free their blocks."""
        for request in requests:
            if request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self.kv_cache_manager.free(request)
            del self.requests[request.request_id]
            self._finished_ids.append(request.request_id)
