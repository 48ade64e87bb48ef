"""Shutting down without tearing a stream.

uvicorn's own graceful shutdown waits for in-flight requests, then cancels their tasks:
a stream cut that way ends mid-chunk, with no finish_reason and no `[DONE]`, and the
process then re-raises SIGTERM on itself (exit 143). Here, when the drain time is up, the
engine aborts what is still running instead: every stream sends its last chunk (with
finish_reason "abort", as vLLM's does) and `[DONE]`, a non-streaming request gets a 503
in OpenAI's JSON, and the process exits 0."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from pagedserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

# After the engine aborts, how long the aborted requests get to write their last bytes
# before uvicorn cancels whatever is left.
FINAL_WRITE_S = 5.0


class GracefulServer(uvicorn.Server):
    """A uvicorn server that, on SIGTERM or Ctrl-C, stops accepting connections, gives
    in-flight requests `drain_timeout` seconds to finish, then aborts the rest in the
    engine so each ends with a proper final message."""

    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine,
                 drain_timeout: float) -> None:
        # uvicorn's cancel is the backstop, after the abort and its final writes.
        config.timeout_graceful_shutdown = drain_timeout + FINAL_WRITE_S
        super().__init__(config)
        self.async_engine = async_engine
        self.drain_timeout = drain_timeout
        self._aborting: asyncio.Future | None = None
        self.engine_died = False  # the server exits because its engine died

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        abort = asyncio.get_running_loop().call_later(self.drain_timeout, self._start_abort)
        try:
            await super().shutdown(sockets)
        finally:
            abort.cancel()
        if not self.force_exit:
            # Shut down as asked: exit 0, not by re-raising the signal on ourselves.
            self._captured_signals.clear()

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (every 0.1 s): also, once a second, exit when the engine has died
        (as vLLM's server does), so that a balancer's passive checks see refused connections
        and a supervisor restarts the process, instead of a live process answering 503s."""
        if counter % 10 == 0 and not self.should_exit and not self.engine_died:
            reason = self.async_engine.dead_reason
            if reason is not None:
                logger.error("the engine died (%s): the server exits", reason)
                self.engine_died, self.should_exit = True, True
        return await super().on_tick(counter)

    def _start_abort(self) -> None:
        self._aborting = asyncio.ensure_future(self._abort_in_flight())  # held: not GC'd

    async def _abort_in_flight(self) -> None:
        stats = self.async_engine.stats()
        logger.info("shutdown timeout reached: aborting %d in-flight requests",
                    stats.num_running + stats.num_waiting)
        try:
            # stop, not shutdown: a request still being tokenized then gets its 503 from
            # the engine, not an error from a closed tokenizer (the lifespan closes it).
            await self.async_engine.stop(abort_in_flight=True)
        except Exception:
            logger.exception("aborting in-flight requests at shutdown failed")
