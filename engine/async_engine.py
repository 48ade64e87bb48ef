"""AsyncEngine: the LLMEngine loop on a background thread, for asyncio callers (the server).

The LLMEngine is not thread-safe, so one thread owns it: the event loop sends it commands
through a queue, and the thread hands each request's outputs to that request's asyncio.Queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm_engine import EngineStats, LLMEngine, ModelInfo, PromptType
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.tokenization import AsyncTokenizer

if TYPE_CHECKING:
    from pagedserve.engine.structured_output import StructuredOutputManager

__all__ = ["AsyncEngine", "EngineDeadError", "EngineOverloadedError", "EngineShutDownError",
           "EngineStats", "ModelInfo", "RequestFailedError"]

logger = logging.getLogger(__name__)

DEFAULT_GRAMMAR_COMPILE_TIMEOUT_S = 5.0


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (max_waiting_requests); the server answers 503."""


class EngineDeadError(RuntimeError):
    """The engine loop died (its cause is chained) or was shut down."""


class EngineShutDownError(EngineDeadError):
    """The engine was shut down (it did not fail); the server answers 503."""


class RequestFailedError(RuntimeError):
    """This request failed inside the engine; the engine and other requests carry on."""


@dataclass(slots=True, eq=False)
class _Stream:
    """Where the engine thread delivers one request's outputs: a queue on the caller's loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    stream: _Stream
    accepted: Future  # the result of add_request, for the caller
    # Its grammar already compiled in here (guided requests): the engine takes it.
    structured_output: StructuredOutputManager | None = None


@dataclass(slots=True)
class _Abort:
    request_id: str
    stream: _Stream | None  # only abort if the id still belongs to this stream; None: any
    done: Future | None


@dataclass(slots=True)
class _Stop:
    abort_in_flight: bool


@dataclass(slots=True)
class _Failed:
    """The executor failed between steps (a tensor-parallel worker died)."""

    reason: str


class AsyncEngine:
    def __init__(self, config: EngineConfig, max_waiting_requests: int | None = None, *,
                 engine: LLMEngine | None = None,
                 grammar_compile_timeout: float = DEFAULT_GRAMMAR_COMPILE_TIMEOUT_S,
                 compute_threads: int | None = None) -> None:
        """`engine`: drive an LLMEngine already built (then `config` is not used).
        `grammar_compile_timeout`: seconds a guided request's grammar may take to compile
        (on a thread of its own, never the engine's) before the request is refused.
        `compute_threads`: torch's intra-op threads for the engine thread, which then also
        builds the engine. On CPUs the caller should run its own torch work on one thread
        (torch.set_num_threads(1) first): while a second thread holds an OpenMP pool, even
        an idle one, the engine's small kernels run 1.7-2.5x slower (SmolLM2 decode: 47 ms
        a token instead of 27 on 2 cores)."""
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(
                f"max_waiting_requests must be >= 1 or None, got {max_waiting_requests}")
        if not grammar_compile_timeout > 0:
            raise ValueError(
                f"grammar_compile_timeout must be > 0, got {grammar_compile_timeout}")
        self.grammar_compile_timeout = grammar_compile_timeout
        # Grammars compile here, not on the engine thread, where a slow one (a schema
        # nested hundreds deep takes seconds) would stall every running request.
        self._grammar_pool = ThreadPoolExecutor(2, thread_name_prefix="pagedserve-grammar")
        self._structured_output: StructuredOutputManager | None = None
        self._compute_threads = compute_threads
        self._ready = threading.Event()  # set once the fields the loop reads exist
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(engine, config, built),
                                        name="pagedserve-engine", daemon=True)
        self._thread.start()
        self.engine: LLMEngine = built.result()  # raises what building it raised
        self.max_waiting_requests = max_waiting_requests
        # Fixed once loaded, so callers read them without asking the engine thread.
        self.model_info = self.engine.model_info
        self._tokenizer = (AsyncTokenizer(self.engine.tokenizer)
                           if self.engine.tokenizer is not None else None)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # Held to queue a command that wants an answer, and by the thread for its last
        # look at the queue: no caller then waits on a command nobody will read.
        self._submit_lock = threading.Lock()
        self._drained = False
        self._streams: dict[str, _Stream] = {}  # in-flight requests; the engine thread's own
        self._dead: BaseException | None = None  # what killed the loop
        self._closed = False
        self._stats = self.engine.stats()
        # Woken at once, so in-flight requests fail and /health turns within a second.
        self.engine.executor.on_failure(lambda reason: self._commands.put(_Failed(reason)))
        self._ready.set()  # the loop may start

    @classmethod
    def from_engine(cls, engine: LLMEngine,
                    max_waiting_requests: int | None = None) -> AsyncEngine:
        return cls(engine.config, max_waiting_requests, engine=engine)

    # ---- the event loop's side ------------------------------------------------------
    async def generate(self, request_id: str, prompt: PromptType,
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as it progresses, shaped by params.output_kind
        (cumulative, delta: only what is new, or final only); the last has finished=True.
        Bad input raises from the first iteration. Closing or cancelling the iterator
        aborts the request; use `contextlib.aclosing` so that a `break` closes it
        at once rather than when it is garbage-collected."""
        self._check_alive()
        manager = None
        if params.guided_decoding is not None:
            manager = await self._compile_grammar(params.guided_decoding)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        accepted: Future = Future()
        # Checked again: the engine may have stopped while the grammar compiled.
        self._submit(_Add(request_id, prompt, params, stream, accepted, manager))
        finished = False
        try:
            await asyncio.wrap_future(accepted)
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(f"request {request_id} failed: {item.error}")
                yield item
        finally:
            if not finished:  # client gone, timeout, or an error: the engine drops it
                self._commands.put(_Abort(request_id, stream, None))

    async def _compile_grammar(self, guided) -> StructuredOutputManager | None:
        """Compile the request's grammar into the shared manager's cache (where the engine's
        add_request finds it), off the engine thread and within grammar_compile_timeout.
        ValueError naming the problem, as the engine would raise it, or if it takes too
        long (the compilation then finishes in the background, and is cached)."""
        if self._tokenizer is None:
            return None  # the engine refuses it: it has no tokenizer either
        if self._structured_output is None:
            # Built with the callers' copy of the tokenizer, on the thread that owns it.
            manager = await self._tokenizer.run_with_tokenizer(self.engine.new_structured_output)
            if self._structured_output is None:
                self._structured_output = manager
        manager = self._structured_output
        compiling = asyncio.get_running_loop().run_in_executor(
            self._grammar_pool, manager.compile, guided)
        try:
            await asyncio.wait_for(asyncio.shield(compiling), self.grammar_compile_timeout)
        except TimeoutError:
            raise ValueError(
                f"invalid guided_decoding.{guided.kind}: it did not compile within "
                f"{self.grammar_compile_timeout:g} s; simplify it") from None
        return manager

    async def abort(self, request_id: str) -> None:
        """Abort a request (its generate() ends with finish_reason "abort"); returns once
        the engine has done so. Unknown ids are ignored."""
        done: Future = Future()
        try:
            self._submit(_Abort(request_id, None, done))
        except EngineDeadError:
            return  # stopped: nothing runs any more
        await asyncio.wrap_future(done)

    def stats(self) -> EngineStats:
        return self._stats  # replaced whole by the engine thread, never mutated

    def get_tokenizer(self) -> AsyncTokenizer | None:
        """The callers' tokenizer (None when the engine runs without one): its own copy,
        used off the event loop by one worker thread, never the engine thread's."""
        return self._tokenizer

    @property
    def dead_reason(self) -> str | None:
        """Why the engine can serve nothing more (its loop died, or a tensor-parallel
        worker); None while it can, and after a shutdown asked for."""
        if self._dead is not None:
            return repr(self._dead)
        if not self._closed and not self._thread.is_alive():
            return "the engine thread exited"
        return self.engine.failure

    @property
    def is_healthy(self) -> bool:
        return (self._dead is None and not self._closed and self._thread.is_alive()
                and self.engine.failure is None)

    async def stop(self, abort_in_flight: bool = True) -> None:
        """Stop the loop thread: abort in-flight requests (they end with finish_reason
        "abort"), or let them finish first. New requests are refused from now on
        (EngineShutDownError); the tokenizer stays usable, so a request being prepared
        learns that from generate() rather than from a closed tokenizer."""
        if not self._closed:
            self._closed = True
            self._commands.put(_Stop(abort_in_flight))
        await asyncio.to_thread(self._thread.join)

    async def shutdown(self, abort_in_flight: bool = True) -> None:
        """stop(), then release the tokenizer and grammar threads."""
        await self.stop(abort_in_flight)
        if self._tokenizer is not None:
            self._tokenizer.close()
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, command: _Add | _Abort) -> None:
        """Queue a command the caller awaits an answer to; EngineDeadError (or
        EngineShutDownError) if the loop no longer reads commands."""
        with self._submit_lock:
            self._check_alive()
            if self._drained:
                raise EngineShutDownError("the engine is shut down")
            self._commands.put(command)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop died: {self._dead!r}") from self._dead
        if self._closed:
            raise EngineShutDownError("the engine is shut down")

    # ---- the engine thread's side ---------------------------------------------------
    def _run(self, engine: LLMEngine | None, config: EngineConfig, built: Future) -> None:
        try:
            if self._compute_threads is not None:
                torch.set_num_threads(self._compute_threads)
            built.set_result(engine if engine is not None else LLMEngine(config))
        except BaseException as exc:
            built.set_exception(exc)
            return
        self._ready.wait()
        try:
            self._loop()
        finally:
            if engine is None:  # built here: its workers, if any, end with the loop
                self.engine.shutdown()

    def _loop(self) -> None:
        stopping = False
        while not (stopping and (self._dead is not None
                             or not self.engine.has_unfinished_requests())):
            busy = self._dead is None and self.engine.has_unfinished_requests()
            commands = [] if busy else [self._commands.get()]  # sleep until there is work
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                try:
                    stopping |= self._handle(command, stopping)
                except Exception as exc:
                    self._die(exc)
            outputs = []
            if self._dead is None and self.engine.has_unfinished_requests():
                try:
                    outputs = self.engine.step()
                except Exception as exc:
                    self._die(exc)
            if self._dead is None:
                # Before delivery: callers see it with the outputs.
                self._stats = self.engine.stats()
            for output in outputs:
                self._deliver(output)
        with self._submit_lock:  # the last look: what is still queued gets its answer
            self._drained = True
            while True:
                try:
                    self._refuse(self._commands.get_nowait())
                except queue.Empty:
                    break
        logger.info("engine loop stopped")

    def _refuse(self, command: _Add | _Abort | _Stop | _Failed) -> None:
        if isinstance(command, _Add) and command.accepted.set_running_or_notify_cancel():
            command.accepted.set_exception(EngineShutDownError("the engine is shut down"))
        elif (isinstance(command, _Abort) and command.done is not None
              and command.done.set_running_or_notify_cancel()):
            command.done.set_result(None)

    def _handle(self, command: _Add | _Abort | _Stop | _Failed, stopping: bool) -> bool:
        """Run one command; True if it was the stop."""
        if isinstance(command, _Failed):
            if self._dead is None:
                self._die(RuntimeError(f"the tensor-parallel executor failed: {command.reason}"))
            return False
        if isinstance(command, _Add):
            if not command.accepted.set_running_or_notify_cancel():
                return False  # the caller went away before we got to it
            try:
                if self._dead is not None or stopping:
                    self._check_alive()  # raises: stopping implies _closed
                # The cap counts sequences: a request with n > 1 waits as n of them.
                waiting, cap = self.engine.get_num_waiting_requests(), self.max_waiting_requests
                n = command.params.n if command.params is not None else 1
                if cap is not None and n > cap:
                    raise ValueError(f"SamplingParams.n={n} is more sequences than this "
                                     f"server queues at once (max_waiting_requests={cap})")
                if cap is not None and waiting + n > cap:
                    raise EngineOverloadedError(
                        f"{waiting} requests are already waiting (max_waiting_requests="
                        f"{cap}); try again later")
                if command.structured_output is not None:
                    self.engine.use_structured_output(command.structured_output)
                self.engine.add_request(command.request_id, command.prompt, command.params)
            except Exception as exc:  # bad input is the caller's error, not the loop's
                command.accepted.set_exception(exc)
            else:
                self._streams[command.request_id] = command.stream
                command.accepted.set_result(None)
        elif isinstance(command, _Abort):
            stream = self._streams.get(command.request_id)
            if self._dead is None and stream is not None and command.stream in (None, stream):
                for output in self.engine.abort_request(command.request_id):
                    self._deliver(output)
            if command.done is not None and command.done.set_running_or_notify_cancel():
                command.done.set_result(None)
        else:
            if command.abort_in_flight and self._dead is None:
                for output in self.engine.abort_request(list(self._streams)):
                    self._deliver(output)
            return True
        return False

    def _deliver(self, output: RequestOutput) -> None:
        stream = (self._streams.pop if output.finished else self._streams.get)(output.request_id)
        if stream is not None:
            stream.put(output)

    def _die(self, cause: BaseException) -> None:
        """Fail every in-flight request; from now on the thread only refuses commands."""
        logger.error("the engine loop died; failing %d requests", len(self._streams),
                     exc_info=cause)
        self._dead = cause
        for stream in self._streams.values():
            error = EngineDeadError(f"the engine loop died: {cause!r}")
            error.__cause__ = cause
            stream.put(error)
        self._streams.clear()
