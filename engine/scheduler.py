"""Iteration-level scheduling: each step gives running requests, then waiting ones (FCFS),
as many new tokens as the token budget allows, with no prefill/decode phases."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerOutput:
    """What the model runner computes this step, in batch order."""

    scheduled_requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)  # per scheduled request
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # since the last step

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled_requests


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order; the last is preempted first
        self._finished_ids: list[str] = []
        self.num_preemptions = 0  # total, for stats and tests

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted_request_ids:
            # Admitting while preempting would only thrash the cache.
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while (new_blocks := self.kv_cache_manager.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_request_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                self._record(out, request, num_new, new_blocks)
                budget -= num_new
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hits, num_cached = self.kv_cache_manager.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_cached, budget)
            new_blocks = self.kv_cache_manager.allocate_slots(request, num_new, hits)
            if new_blocks is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            request.num_cached_tokens = num_cached
            self.running.append(request)
            request.block_ids = [b.block_id for b in hits]
            self._record(out, request, num_new, new_blocks)
            budget -= num_new

    def _record(self, out: SchedulerOutput, request: Request, num_new: int,
                new_blocks: list) -> None:
        # Block tables are append-only: extend with this step's blocks, no rebuild.
        request.block_ids.extend(b.block_id for b in new_blocks)
        out.scheduled_requests.append(request)
        out.num_scheduled_tokens.append(num_new)

    def _preempt(self, request: Request) -> None:
        """Free everything and requeue at the front; it is recomputed (mostly from the
        prefix cache) when readmitted. Its sampled tokens are kept."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.block_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress of what was computed. Sampled tokens are appended by the engine."""
        for request, num_new in zip(out.scheduled_requests, out.num_scheduled_tokens):
            request.num_computed_tokens += num_new

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
            self._finished_ids.append(request.request_id)
