"""Between the engine and the model: one ModelRunner in the engine's process (one device), or
one per tensor-parallel rank, the others in worker processes.

Under tensor parallelism the engine's process is rank 0: it schedules, and each call it makes
on its runner is first broadcast to the workers (torch.distributed's broadcast_object_list:
the method's name and its plain-data arguments, a SchedulerOutput for a step), which make the
same call on theirs. The forward's collectives then keep the ranks in step; results (sampled
tokens, logprobs) are rank 0's. Ranks meet through a TCPStore on loopback at a port the OS
picks, which also carries a failing worker's error back to rank 0."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.distributed import TensorParallel, check_tensor_parallel
from pagedserve.engine.model_runner import ModelRunner, resolve_device

logger = logging.getLogger(__name__)

# Idle workers wait for the next call inside a broadcast over gloo; its timeout must outlast
# any idle spell. A dead peer is noticed at once (its sockets close), not by this timeout.
_IDLE_TIMEOUT = timedelta(days=365)
# NCCL's collectives (inside a step) keep torch's default: a peer lost mid-step is caught by
# the monitor, which aborts the communicator; failing that, the watchdog ends it here.
_NCCL_TIMEOUT = timedelta(minutes=10)
_JOIN_TIMEOUT_S = 120.0  # for the workers to start and meet rank 0 (and each other)
_STOP_TIMEOUT_S = 10.0  # for a worker to exit when told, before it is killed


class Executor:
    """In-process: the engine's own runner, called directly (one device, no extra cost)."""

    def __init__(self, config: EngineConfig, hf_config, model_dir, max_model_len: int) -> None:
        self.driver = ModelRunner(config, hf_config, model_dir, max_model_len)

    @staticmethod
    def create(config: EngineConfig, hf_config, model_dir, max_model_len: int) -> Executor:
        if config.tensor_parallel_size == 1:
            return Executor(config, hf_config, model_dir, max_model_len)
        check_tensor_parallel(hf_config, config.tensor_parallel_size)
        return MultiprocExecutor(config, hf_config, model_dir, max_model_len)

    def run(self, method: str, *args):
        """runner.method(*args) on every rank; returns rank 0's result."""
        return getattr(self.driver, method)(*args)

    def execute_model(self, so, grammar_bitmask=None):
        """Launch a step (ModelRunner.execute_model); `grammar_bitmask` stays on rank 0."""
        return self.driver.execute_model(so, grammar_bitmask)

    @property
    def failure(self) -> str | None:
        """Why the executor can no longer run steps (a worker died); None while it can."""
        return None

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(failure)` (from another thread) when the executor fails."""

    def shutdown(self) -> None:
        pass


class MultiprocExecutor(Executor):
    """Rank 0 here, ranks 1..N-1 in spawned worker processes (torch.multiprocessing)."""

    def __init__(self, config: EngineConfig, hf_config, model_dir, max_model_len: int) -> None:
        size = config.tensor_parallel_size
        device = resolve_device(config)
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs; "
                             f"{torch.cuda.device_count()} are visible")
        if dist.is_initialized():  # its group is the process's one default group
            raise RuntimeError("a tensor-parallel engine is already running in this process: "
                               "shut it down (LLM.shutdown()) before starting another")
        backend = "nccl" if device.type == "cuda" else "gloo"
        self._failure: str | None = None
        self._fail_lock = threading.Lock()
        self._callbacks: list[Callable[[str], None]] = []
        self._stopping = threading.Event()  # set once the workers are being stopped
        self._shut_down = False
        self._group = None  # the group calls travel in; None: the default group
        self._backend = backend
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                              timeout=_IDLE_TIMEOUT)
        self._store = store
        # CPU ranks share the threads this one was given (the server's, or torch's default).
        threads = max(1, torch.get_num_threads() // size)
        ctx = torch.multiprocessing.get_context("spawn")
        self.workers = [
            ctx.Process(target=_worker_main, name=f"pagedserve-tp{rank}", daemon=True,
                        args=(rank, size, store.port, backend, os.getpid(), threads, config,
                              hf_config, model_dir, max_model_len))
            for rank in range(1, size)
        ]
        for worker in self.workers:
            worker.start()
        # Killed however the engine goes unshut (garbage-collected, interpreter exit): a
        # worker waiting for its next call has nothing to finish. No orphans; and the group
        # goes too, so the process can start another engine.
        self._finalizer = weakref.finalize(self, _release, self.workers, self._stopping)
        try:
            self._wait_for_workers(size)
            if backend == "nccl":
                torch.cuda.set_device(0)  # NCCL's collectives run on the current device
            self._group = _join_group(backend, store, 0, size)
            # From here a worker's death (while loading, say) is noticed. The monitor holds
            # the executor weakly: an engine dropped unshut is still collected.
            threading.Thread(target=_watch, args=(weakref.ref(self), self._stopping),
                             name="pagedserve-tp-monitor", daemon=True).start()
            if device.type == "cpu":
                torch.set_num_threads(threads)
            self.driver = ModelRunner(config, hf_config, model_dir, max_model_len,
                                      TensorParallel(0, size))
        except BaseException:
            self.shutdown()
            raise
        logger.info("Tensor parallel: %d ranks over %s (workers %s)", size, backend,
                    [w.pid for w in self.workers])

    def _wait_for_workers(self, size: int) -> None:
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        while self._store.add("joined", 0) < size - 1:
            if (reason := self._dead_worker()) is not None:
                raise RuntimeError(reason)
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not start within "
                                   f"{_JOIN_TIMEOUT_S:g} s")
            time.sleep(0.02)

    def _worker_error(self, rank: int) -> str:
        key = f"error/{rank}"
        if self._store.check([key]):
            return self._store.get(key).decode(errors="replace")
        return ""

    def _dead_worker(self) -> str | None:
        """Which worker has exited, with its error; None while all run."""
        for rank, worker in enumerate(self.workers, start=1):
            if worker.exitcode is not None:
                error = self._worker_error(rank)
                return (f"tensor-parallel worker {rank} (pid {worker.pid}) exited with code "
                        f"{worker.exitcode}" + (f": {error}" if error else ""))
        return None

    # ---- calls ----------------------------------------------------------------------
    def run(self, method: str, *args):
        return self._call(method, args, lambda: getattr(self.driver, method)(*args))

    def execute_model(self, so, grammar_bitmask=None):
        return self._call("execute_model", (so,),
                          lambda: self.driver.execute_model(so, grammar_bitmask))

    def _call(self, method: str, args: tuple, local: Callable):
        """Broadcast the call, then make it here. A failure on any rank leaves the ranks out
        of step, so the executor is done: every worker stops, and this call and every later
        one raise."""
        if self._failure is not None:
            raise RuntimeError(f"the tensor-parallel executor failed: {self._failure}")
        try:
            dist.broadcast_object_list([(method, args)], src=0, group=self._group)
            return local()
        except BaseException as exc:
            self._fail(self._death_reason(wait_s=2.0) or f"{method} failed on rank 0: "
                       f"{type(exc).__name__}: {exc}")
            raise RuntimeError(f"the tensor-parallel executor failed: {self._failure}") from exc

    # ---- failures -------------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        return self._failure

    def on_failure(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)

    def _death_reason(self, wait_s: float = 0.0) -> str | None:
        """Which worker died, with its error; waits up to wait_s for one to be seen dead
        (a collective fails as the peer's sockets close, a moment before it has exited)."""
        deadline = time.monotonic() + wait_s
        while (reason := self._dead_worker()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return reason

    def _fail(self, reason: str) -> None:
        with self._fail_lock:  # the monitor and a failed call may both get here
            if self._failure is not None:
                return
            self._failure = reason
        logger.error("tensor-parallel executor failed: %s", reason)
        _stop_workers(self.workers, self._stopping, timeout=0)
        if self._backend == "nccl" and dist.is_initialized():
            # A collective waiting on the lost peer spins on the GPU for ever; aborting the
            # communicators ends it (and, with the default async error handling, maybe this
            # process: better than a hang). Every group goes, so shutdown has none to end.
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:
                logger.exception("could not abort the NCCL communicator")
        for callback in self._callbacks:
            callback(reason)

    def shutdown(self) -> None:
        """Stop every worker (told to, when they can hear it; killed otherwise)."""
        if self._shut_down:
            return
        self._shut_down = True
        stopped_already = self._stopping.is_set()
        self._stopping.set()  # first: the monitor must not take the exits for deaths
        if not stopped_already and dist.is_initialized():
            try:
                dist.broadcast_object_list([("shutdown", ())], src=0, group=self._group)
            except Exception:  # a worker already gone: it is killed below
                pass
        self._finalizer.detach()
        _stop_workers(self.workers, self._stopping)
        _destroy_group()


def _watch(executor_ref: weakref.ref, stopping: threading.Event) -> None:
    """The monitor: notice a worker that dies between steps, within a second."""
    while not stopping.wait(0.25):
        executor = executor_ref()
        if executor is None:
            return
        if (reason := executor._death_reason()) is not None:
            executor._fail(reason)
            return
        del executor


def _join_group(backend: str, store, rank: int, size: int):
    """init_process_group, bounded by the join timeout (a rank that dies before it meets the
    others is an error, not a hang), then the timeouts of use. Returns the group the calls
    travel in (None: the default group)."""
    join = timedelta(seconds=_JOIN_TIMEOUT_S)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=join)
    if backend == "nccl":
        dist.distributed_c10d._set_pg_timeout(_NCCL_TIMEOUT)
        # Calls travel as pickled objects, on the CPU: a gloo group beside NCCL's. NCCL's
        # ranks first meet here (its init is lazy): under the join timeout too.
        calls = dist.new_group(backend="gloo", timeout=join)
        dist.distributed_c10d._set_pg_timeout(_IDLE_TIMEOUT, calls)
        return calls
    dist.distributed_c10d._set_pg_timeout(_IDLE_TIMEOUT)
    return None


def _destroy_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # an aborted NCCL communicator
            logger.exception("could not destroy the process group")


def _release(workers, stopping: threading.Event) -> None:
    """The finalizer of an engine that was never shut down."""
    _stop_workers(workers, stopping, timeout=0)
    _destroy_group()


def _stop_workers(workers, stopping: threading.Event, timeout: float = _STOP_TIMEOUT_S) -> None:
    stopping.set()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.join(max(deadline - time.monotonic(), 0))
        if worker.exitcode is None:
            worker.kill()
            worker.join()


def _watch_parent(parent_pid: int) -> None:
    """A worker outlives no engine: when rank 0's process is gone (even SIGKILLed), exit."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(rank: int, size: int, port: int, backend: str, parent_pid: int, threads: int,
                 config: EngineConfig, hf_config, model_dir, max_model_len: int) -> None:
    """A worker: join the group, build this rank's runner, then make rank 0's calls until
    told to shut down. An error is left in the store for rank 0 to report, and ends it."""
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(levelname)s (tp rank {rank}) %(name)s: %(message)s")
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the server
    # drains on them, and its workers must live until it tells them to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=_IDLE_TIMEOUT)
    try:
        if backend == "gloo":
            torch.set_num_threads(threads)
        else:
            torch.cuda.set_device(rank)
        store.add("joined", 1)
        group = _join_group(backend, store, rank, size)
        torch.manual_seed(config.seed)
        runner = ModelRunner(config, hf_config, model_dir, max_model_len,
                             TensorParallel(rank, size))
        while True:
            call = [None]
            dist.broadcast_object_list(call, src=0, group=group)
            method, args = call[0]
            if method == "shutdown":
                break
            if method == "execute_model":
                runner.collect(runner.execute_model(*args))  # its tokens feed the next step
            else:
                getattr(runner, method)(*args)
        dist.destroy_process_group()
    except BaseException:
        store.set(f"error/{rank}", traceback.format_exc(limit=-3))
        os._exit(1)  # no atexit handlers: they may wait on a group that is gone
