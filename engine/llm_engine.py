"""The engine loop for callers that drive it: add_request / step / abort."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.executor import Executor
from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.model_runner import ModelRunnerOutput, StepHandle
from pagedserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.engine.request import FINISH_REASONS, Request, RequestStatus
from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.engine.structured_output import StructuredOutputManager, reasoning_tag_ids

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict
# Read per sampled token: module constants skip the enum class's attribute lookup.
_DELTA, _FINAL_ONLY, _CUMULATIVE = (RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY,
                                    RequestOutputKind.CUMULATIVE)
_GONE = (None, None)  # _sequences' answer for a sequence finished and forgotten


@dataclass(slots=True)
class _UserRequest:
    """A user request and its n sequences (n > 1 shares the prompt's cached blocks)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    output_kind: RequestOutputKind
    prompt_logprobs_sent: bool = False  # delta outputs: sent with the first one


@dataclass(slots=True)
class _Launched:
    """A step launched and not yet processed."""

    scheduled: SchedulerOutput
    handle: StepHandle | Future  # a Future when the runner has its own thread


@dataclass(slots=True)
class KVCacheStats:
    num_blocks: int
    num_used_blocks: int
    allocated_slots: int  # slots in blocks held by running requests
    filled_slots: int  # of those, slots holding a token's KV

    @property
    def waste(self) -> float:
        return 1.0 - self.filled_slots / self.allocated_slots if self.allocated_slots else 0.0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the engine's callers may know of the loaded model."""

    model: str | None  # as the user named it (a directory or a .gguf); None: the default
    model_dir: str  # the directory loaded (for a GGUF, its converted copy)
    max_model_len: int
    vocab_size: int
    has_tokenizer: bool
    # The thinking tags guided output waits for (EngineConfig.reasoning_tags, when they are
    # single tokens); None: guided output is constrained from its first token.
    reasoning_tags: tuple[str, str] | None = None


@dataclass(slots=True)
class EngineStats:
    """A snapshot for /metrics and /health; counts are sequences (n > 1 counts n)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks held by requests, 0..1
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens served from it
    num_preemptions: int


def load_eos_token_ids(model_dir: Path, hf_config, tokenizer) -> set[int]:
    """EOS ids from generation_config.json (else the model config) and the tokenizer."""
    gen_config = Path(model_dir) / "generation_config.json"
    if gen_config.exists():
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
    else:
        eos = getattr(hf_config, "eos_token_id", None)
    ids = set([eos] if isinstance(eos, int) else eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from pagedserve.engine.loader.resolve import resolve_model

        self.config = config
        start = time.perf_counter()
        model_dir = resolve_model(config.model)
        self.model_dir = model_dir
        self.hf_config = AutoConfig.from_pretrained(model_dir)
        self.tokenizer = (
            None if config.skip_tokenizer_init
            else AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
        )
        self.max_model_len = self._resolve_max_model_len()
        self.eos_token_ids = load_eos_token_ids(model_dir, self.hf_config, self.tokenizer)
        torch.manual_seed(config.seed)

        # Every rank's runner makes the calls made through the executor; model_runner is
        # rank 0's (the only one without tensor parallelism), whose results they are.
        self.executor = Executor.create(config, self.hf_config, model_dir, self.max_model_len)
        self.model_runner = self.executor.driver
        try:
            num_blocks = self._init_runners()
        except BaseException:
            self.executor.shutdown()
            raise
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size,
                                               config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs,
                                   self._token_budget(), self.max_model_len)
        # sequence id -> the sequence and its user request: one lookup per sampled token
        self._sequences: dict[str, tuple[Request, _UserRequest]] = {}
        self._parents: dict[str, _UserRequest] = {}  # user request id -> its sequences
        self._token_texts: dict[int, str] = {}  # token id -> its text, for logprobs
        # Built on the first guided request, so unguided use never loads xgrammar.
        self.structured_output: StructuredOutputManager | None = None
        tags = config.reasoning_tags
        self.reasoning_ids = (reasoning_tag_ids(self.tokenizer, tags)
                              if tags is not None and self.tokenizer is not None else None)
        self._num_guided = 0  # sequences with a live grammar matcher

        # Async scheduling: step N+1 is scheduled and launched before step N's outputs are
        # processed. On a GPU the launch returns at once; on a CPU the runner works on its
        # own thread, so that the forward releases the GIL to output processing.
        device = self.model_runner.device
        self.async_scheduling = (device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        self._runner_thread = (ThreadPoolExecutor(1, thread_name_prefix="pagedserve-runner")
                               if self.async_scheduling and device.type == "cpu" else None)
        self._in_flight: _Launched | None = None
        # Outputs not yet returned by step(): of a step finished between two calls (an id
        # reused), or made before a step failed.
        self._deferred_outputs: list[RequestOutput] = []
        logger.info("Engine ready in %.1fs: %s on %s (%s), max_model_len=%d",
                    time.perf_counter() - start, model_dir, self.model_runner.device,
                    self.model_runner.dtype, self.max_model_len)

    def _init_runners(self) -> int:
        """Size the KV cache, allocate it and the input batch, capture or compile the
        forward; returns the number of KV blocks."""
        config, run = self.config, self.executor.run
        num_blocks = run("determine_num_blocks", config.max_num_seqs, self._token_budget())
        capacity = num_blocks * config.block_size
        if capacity < self.max_model_len:
            if config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len={self.max_model_len} does not fit in the KV cache "
                    f"({num_blocks} blocks x {config.block_size} = {capacity} tokens); "
                    "give the cache more memory or lower max_model_len"
                )
            logger.warning("max_model_len lowered from %d to the KV cache's %d tokens",
                           self.max_model_len, capacity)
            self.max_model_len = capacity
        run("allocate_kv_cache", num_blocks)
        run("init_input_batch", config.max_num_seqs, self.max_model_len)
        run("capture_cuda_graphs", config.max_num_seqs)
        run("compile_forward", self._token_budget())
        run("release_load_memory")
        return num_blocks

    def _token_budget(self) -> int:
        if self.config.max_num_batched_tokens is not None:
            return self.config.max_num_batched_tokens
        return 2048 if self.model_runner.device.type == "cuda" else 512

    def _resolve_max_model_len(self) -> int:
        model_max = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        if self.config.max_model_len is None:
            return model_max
        if self.config.max_model_len > model_max:
            raise ValueError(
                f"max_model_len={self.config.max_model_len} exceeds the model's "
                f"max_position_embeddings={model_max}"
            )
        return self.config.max_model_len

    # ---- requests -------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init is set)")
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, list | tuple):
            return None, list(prompt)
        raise TypeError(f"prompt must be a str, a list of token ids or a dict, got {type(prompt)}")

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._parents or any(
                o.request_id == request_id for o in self._deferred_outputs):
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        self._validate_prompt(token_ids)
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        # Compiled now, before anything is queued, so a bad spec fails only this call.
        grammar = None
        if params.guided_decoding is not None:
            grammar = self._get_structured_output().compile(params.guided_decoding)
        child_ids = ([request_id] if params.n == 1
                     else [f"{request_id}#{i}" for i in range(params.n)])
        in_flight = self._in_flight
        if in_flight is not None and any(
                c in in_flight.scheduled.num_scheduled_tokens for c in child_ids):
            # A finished request's id, reused while a step still samples for the old one:
            # finish that step first, so that its tokens cannot reach the new request.
            self._in_flight = None
            self._deferred_outputs += self._finish_step(in_flight)
        children = []
        for i, child_id in enumerate(child_ids):
            child_params = replace(params, all_stop_token_ids=stop_ids)
            if params.seed is not None:
                child_params.seed = params.seed + i
            child = Request(child_id, token_ids, child_params, max_tokens, arrival_time)
            if child_params.detokenize and self.tokenizer is not None:
                child.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, child_params)
            if grammar is not None:
                child.grammar = self.structured_output.new_matcher(grammar, stop_ids, token_ids)
            children.append(child)
        parent = _UserRequest(request_id, text, token_ids, children, params.output_kind)
        self._parents[request_id] = parent
        if grammar is not None:
            self._num_guided += len(children)
        for child in children:
            self._sequences[child.request_id] = child, parent
            self.scheduler.add_request(child)

    def _get_structured_output(self) -> StructuredOutputManager:
        if self.structured_output is None:
            if self.tokenizer is None:
                raise ValueError(
                    "guided decoding needs the tokenizer (skip_tokenizer_init is set)")
            self.structured_output = self.new_structured_output(self.tokenizer)
        return self.structured_output

    def new_structured_output(self, tokenizer) -> StructuredOutputManager:
        """A structured-output manager for this model, built from `tokenizer` (a copy of
        the engine's, when another thread builds it). Install it with use_structured_output
        on the engine's thread; compile() on it may be called from any thread."""
        return StructuredOutputManager(tokenizer, self.hf_config.vocab_size,
                                       self.eos_token_ids, self.config.max_num_seqs,
                                       self.model_runner.device, self.reasoning_ids)

    def use_structured_output(self, manager: StructuredOutputManager) -> None:
        """Take `manager` (see new_structured_output) unless the engine has one already."""
        if self.structured_output is None:
            self.structured_output = manager

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.hf_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens, which must leave room for at least one output token"
            )

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Abort user requests wherever they are; returns their final outputs."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outputs = []
        for request_id in request_ids:
            parent = self._parents.get(request_id)
            if parent is None:
                continue
            # Outputs of a step finished early and not yet returned go first: nothing may
            # follow a request's final output.
            outputs += [o for o in self._deferred_outputs if o.request_id == request_id]
            self._deferred_outputs = [o for o in self._deferred_outputs
                                      if o.request_id != request_id]
            self.scheduler.finish_requests(parent.children, RequestStatus.FINISHED_ABORTED)
            outputs.append(self._make_output(parent, finished=True))
            self._forget(parent)
        outputs = [o for o in outputs if o is not None]
        return outputs

    def has_unfinished_requests(self) -> bool:
        """True while step() has outputs to give: requests, or outputs held back."""
        return bool(self._parents or self._deferred_outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ---- the loop -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; return the outputs that became ready.

        Without async scheduling that is this step's outputs. With it, the step runs while
        the previous step's outputs are processed, and those are returned: the host's work
        hides behind the device's, for one step computed in vain by a request that stops.
        Guided requests turn it off while they run (their masks need the latest token).
        When a step is finished early (that, or an id reused), one call can return two
        steps' outputs of a request, in order."""
        try:
            self._step(self._deferred_outputs)
        except Exception as exc:
            self._fail_unfinished(exc)  # what was ready stays, for the next call
            raise
        outputs, self._deferred_outputs = self._deferred_outputs, []
        return outputs

    def _step(self, outputs: list[RequestOutput]) -> None:
        """One step; the outputs that become ready are appended to `outputs`."""
        in_flight, self._in_flight = self._in_flight, None
        overlap = self.async_scheduling and not self._num_guided
        if in_flight is not None and not overlap:
            outputs += self._finish_step(in_flight)
            in_flight = None
        so = self.scheduler.schedule()
        launched = None
        if not so.is_empty:
            launched = self._launch(so)
        elif so.finished_request_ids or so.preempted_request_ids:
            self._finish_step(self._launch(so))  # nothing to run; the runner frees their rows
        if in_flight is not None:
            outputs += self._finish_step(in_flight)
        if launched is not None:
            if overlap and self._parents:
                self._in_flight = launched
            else:
                outputs += self._finish_step(launched)

    def _fail_unfinished(self, exc: Exception) -> None:
        """A step raised. Progress was counted when it was scheduled, and the runner may be
        halfway through it, so no unfinished request can go on: each ends with an error
        (its final output comes with the next step) and the engine stays usable."""
        logger.exception("an engine step failed; ending %d requests", len(self._parents))
        if self._runner_thread is not None:
            self._runner_thread.submit(lambda: None).result()  # let queued steps end first
        self._in_flight = None
        try:
            self.executor.run("reset_requests")  # every rank's persistent batch
        except RuntimeError:  # the executor failed: no step runs again; rank 0's rows go
            self.model_runner.reset_requests()
        for parent in list(self._parents.values()):
            for child in parent.children:
                child.error = child.error or f"the engine step failed: {type(exc).__name__}: {exc}"
            self.scheduler.finish_requests(parent.children, RequestStatus.FINISHED_ERROR)
            output = self._make_output(parent, finished=True)
            if output is not None:
                self._deferred_outputs.append(output)
            self._forget(parent)
        # Blocks the failed step was to fill were published to the prefix cache when it was
        # scheduled; with every request ended, all blocks are free and the cache can go.
        self.kv_cache_manager.reset_prefix_cache()

    def _launch(self, so: SchedulerOutput) -> _Launched:
        bitmask = self._grammar_bitmask if self._num_guided else None
        executor = self.executor
        if self._runner_thread is not None:
            return _Launched(so, self._runner_thread.submit(executor.execute_model, so, bitmask))
        return _Launched(so, executor.execute_model(so, bitmask))

    def _finish_step(self, launched: _Launched) -> list[RequestOutput]:
        """Wait for a launched step and process its results into outputs."""
        handle = launched.handle
        if isinstance(handle, Future):
            handle = handle.result()
        result = self.model_runner.collect(handle)
        if self.executor.failure is not None:  # a worker died mid-step: its tokens are noise
            raise RuntimeError(f"the tensor-parallel executor failed: {self.executor.failure}")
        outputs: list[RequestOutput] = []
        for parent in self._process_outputs(result, outputs):
            children = parent.children  # n > 1: its output waits for all its sequences
            if any(c.error for c in children):
                # A failed sequence fails its whole user request (its siblings too).
                self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)
            self._emit(parent, all(c.is_finished for c in children), outputs)
        return outputs

    def _emit(self, parent: _UserRequest, finished: bool, outputs: list[RequestOutput]) -> None:
        output = self._make_output(parent, finished)
        if output is not None:
            outputs.append(output)
        if finished:
            self._forget(parent)

    def _grammar_bitmask(self, request_ids: list[str]):
        return self.structured_output.fill_bitmask(
            [self._sequences[i][0].grammar for i in request_ids])

    def _process_outputs(self, result: ModelRunnerOutput, outputs: list[RequestOutput]
                         ) -> Iterable[_UserRequest]:
        """Append the sampled tokens and check for stops, in one pass that also appends the
        outputs of single-sequence requests to `outputs`; returns the user requests of n > 1
        touched, whose outputs wait for all their sequences. Results for sequences that
        stopped meanwhile (async scheduling) are dropped."""
        sequences = self._sequences
        touched: dict[str, _UserRequest] = {}  # by user request id, in batch order
        for req_id, chunk in result.prompt_logprobs.items():
            req, _ = sequences.get(req_id, _GONE)
            if req is None or req.is_finished:
                continue
            for j, lp in enumerate(chunk.token_logprobs):
                index = chunk.first_index + j
                if index < len(req.prompt_logprobs):
                    continue  # recomputed after preemption: already recorded
                token_id = req.prompt_token_ids[index]
                entry = {token_id: Logprob(lp, None, self._token_text(req, token_id))}
                for rank, (tid, tlp) in enumerate(zip(chunk.topk_token_ids[j],
                                                      chunk.topk_logprobs[j]), start=1):
                    entry.setdefault(tid, Logprob(tlp, rank, self._token_text(req, tid)))
                req.prompt_logprobs.append(entry)
        with_logprobs = result.sampled_logprobs is not None
        for i, (req_id, token_id) in enumerate(zip(result.req_ids, result.sampled_token_ids)):
            req, parent = sequences.get(req_id, _GONE)
            if req is None or req.is_finished:
                continue
            try:
                req.append_token(token_id)
                if req.grammar is not None and not req.grammar.accept_token(token_id):
                    raise RuntimeError(f"the grammar rejected sampled token {token_id}")
                if with_logprobs:
                    self._record_logprobs(req, token_id, i, result)
                status = self._check_stop(req, token_id)
            except Exception as exc:  # one request's failure must not take the batch down
                logger.exception("request %s failed while processing its output", req_id)
                req.error = f"{type(exc).__name__}: {exc}"
                status = RequestStatus.FINISHED_ERROR
            if status is not None:
                self.scheduler.finish_requests([req], status)
                self._drop_grammar(req)
            if len(parent.children) == 1:
                self._emit(parent, status is not None, outputs)
            else:
                touched[parent.request_id] = parent
        return touched.values()

    def _drop_grammar(self, req: Request) -> None:
        if req.grammar is not None:
            req.grammar = None
            self._num_guided -= 1

    def _record_logprobs(self, req: Request, token_id: int, i: int,
                         result: ModelRunnerOutput) -> None:
        lp = result.sampled_logprobs[i]
        req.cumulative_logprob += lp
        if req.logprobs is None:
            return
        entry = {}
        for rank, (tid, tlp) in enumerate(zip(result.topk_token_ids[i],
                                              result.topk_logprobs[i]), start=1):
            if rank > req.sampling_params.logprobs:
                break
            entry[tid] = Logprob(tlp, rank, self._token_text(req, tid))
        entry.setdefault(token_id, Logprob(lp, None, self._token_text(req, token_id)))
        # The sampled token first, as vLLM orders them.
        req.logprobs.append({token_id: entry.pop(token_id), **entry})

    def _token_text(self, req: Request, token_id: int) -> str | None:
        """Logprob.decoded_token: the token's own text (None without detokenization).
        Cached: logprobs=20 asks for 21 of these per generated token."""
        if self.tokenizer is None or not req.sampling_params.detokenize:
            return None
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _check_stop(self, req: Request, token_id: int) -> RequestStatus | None:
        status = None
        stop_terminated = False
        num_output_tokens = len(req.all_token_ids) - req.num_prompt_tokens
        # A terminated grammar has just accepted one of its stop tokens: the structure is
        # complete. Its stop tokens are the request's, or the EOS ids under ignore_eos.
        if ((req.grammar is not None and req.grammar.is_terminated())
                or (token_id in req.stop_token_ids
                    and num_output_tokens >= req.sampling_params.min_tokens)):
            status, stop_terminated = RequestStatus.FINISHED_STOPPED, True
            req.stop_reason = (token_id if token_id in req.sampling_params.stop_token_ids
                               else None)
        if req.detokenizer is not None:
            stop_str = req.detokenizer.update([token_id], stop_terminated)
            if stop_str is not None and status is None:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        if status is None and num_output_tokens >= req.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        return status

    def _make_output(self, parent: _UserRequest, finished: bool) -> RequestOutput | None:
        """The parent's output after a step, as its output kind asks: everything so far,
        only what is new (None when nothing is), or the whole output once finished."""
        kind, children = parent.output_kind, parent.children
        first, single = children[0], len(children) == 1
        if kind is _DELTA:
            if single:  # most requests: no list to filter
                completion = self._delta_completion(0, first)
                completions = [completion] if completion is not None else None
            else:
                completions = [c for i, req in enumerate(children)
                               if (c := self._delta_completion(i, req)) is not None]
            if not completions:
                return None
            prompt_logprobs = None if parent.prompt_logprobs_sent else first.prompt_logprobs
            parent.prompt_logprobs_sent = True
        elif kind is _FINAL_ONLY and not finished:
            return None
        else:
            completions = [self._cumulative_completion(i, req, kind)
                           for i, req in enumerate(children)]
            prompt_logprobs = first.prompt_logprobs
        error = first.error if single else next((c.error for c in children if c.error), None)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids,
                             prompt_logprobs, completions, finished, first.num_cached_tokens,
                             None, error)

    def _cumulative_completion(self, index: int, req: Request,
                               kind: RequestOutputKind) -> CompletionOutput:
        text = ""
        if req.detokenizer is not None and req.error is None:
            text = req.detokenizer.get_next_output_text(req.is_finished, delta=False)
        logprobs = req.logprobs
        if logprobs is not None and kind is _CUMULATIVE:
            logprobs = list(logprobs)  # the engine goes on appending to its own list
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=req.output_token_ids,
            cumulative_logprob=(req.cumulative_logprob
                                if req.sampling_params.logprobs is not None else None),
            logprobs=logprobs,
            finish_reason=FINISH_REASONS.get(req.status),
            stop_reason=req.stop_reason,
        )

    def _delta_completion(self, index: int, req: Request) -> CompletionOutput | None:
        """What is new in child `index` since its last output: O(new), not O(all)."""
        if req.finish_sent:
            return None
        finished = req.is_finished
        text = ""
        if req.detokenizer is not None and req.error is None:
            text = req.detokenizer.get_next_output_text(finished, delta=True)
        tokens, sent = req.all_token_ids, req.num_sent_tokens
        start = req.num_prompt_tokens + sent
        if not finished and not text and start == len(tokens):
            return None
        req.num_sent_tokens = len(tokens) - req.num_prompt_tokens
        req.finish_sent = finished
        logprobs = req.logprobs
        return CompletionOutput(
            index, text, tokens[start:],
            None if logprobs is None else req.cumulative_logprob,
            None if logprobs is None else logprobs[sent:],
            FINISH_REASONS.get(req.status) if finished else None, req.stop_reason)

    def _forget(self, parent: _UserRequest) -> None:
        del self._parents[parent.request_id]
        for child in parent.children:
            self._drop_grammar(child)  # aborted ones too
            self._sequences.pop(child.request_id, None)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a no-op without them). The engine is done."""
        if self._runner_thread is not None:
            # A step still in flight (async scheduling) ends before its workers are told to.
            self._runner_thread.shutdown(wait=True)
        self.executor.shutdown()

    # ---- introspection --------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        """Why no step can run any more (a tensor-parallel worker died); None when they can."""
        return self.executor.failure

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(self.config.model, str(self.model_dir), self.max_model_len,
                         self.hf_config.vocab_size, self.tokenizer is not None,
                         self.config.reasoning_tags if self.reasoning_ids else None)

    def get_num_waiting_requests(self) -> int:
        """Sequences waiting for admission (n > 1 counts n)."""
        return len(self.scheduler.waiting)

    def stats(self) -> EngineStats:
        scheduler, kv = self.scheduler, self.kv_cache_manager
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_stats.queries,
            prefix_cache_hits=kv.prefix_cache_stats.hits,
            num_preemptions=scheduler.num_preemptions,
        )

    def kv_cache_stats(self) -> KVCacheStats:
        bs = self.config.block_size
        kvm = self.kv_cache_manager
        allocated = filled = 0
        for req in self.scheduler.running:
            num_slots = len(kvm.req_to_blocks.get(req.request_id, ())) * bs
            allocated += num_slots
            filled += min(req.num_computed_tokens, num_slots)
        return KVCacheStats(kvm.block_pool.num_blocks,
                            kvm.block_pool.num_blocks - kvm.num_free_blocks, allocated, filled)
