"""AsyncEngine over a tiny model (token-id prompts): concurrent requests share the batch and
match the offline LLM, cancellation and abort free the blocks, bad input and overload fail
only their caller, a failing step kills the engine cleanly, and shutdown joins the thread."""

import asyncio
import contextlib
import itertools
import random
import threading

import pytest

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from pagedserve.engine.config import EngineConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_MODEL_LEN = 64
GREEDY = dict(temperature=0, ignore_eos=True)

_request_ids = itertools.count()


def make_config(tiny_dir, **overrides) -> EngineConfig:
    return EngineConfig(model=str(tiny_dir), skip_tokenizer_init=True,
                        max_model_len=MAX_MODEL_LEN, **overrides)


@pytest.fixture(scope="module")
def async_engine(tiny_dir):
    engine = AsyncEngine(make_config(tiny_dir))
    yield engine
    asyncio.run(engine.shutdown())


def make_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(length)]


def new_id() -> str:
    return f"req-{next(_request_ids)}"


async def collect(engine: AsyncEngine, prompt, params: SamplingParams, request_id=None):
    """All outputs of one request, in order."""
    return [out async for out in engine.generate(request_id or new_id(), prompt, params)]


def assert_pool_full(engine: AsyncEngine) -> None:
    kv = engine.engine.kv_cache_manager
    assert not engine.engine.has_unfinished_requests()
    assert kv.num_free_blocks == kv.block_pool.num_blocks


def test_concurrent_requests_share_the_batch_and_match_offline_generate(
        tiny_dir, async_engine, monkeypatch):
    prompts = [make_prompt(n, seed=n) for n in (3, 9, 17, 1, 30, 5, 12, 7)]
    params = SamplingParams(max_tokens=10, **GREEDY)
    llm = LLM(model=str(tiny_dir), skip_tokenizer_init=True, max_model_len=MAX_MODEL_LEN)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    # Hold the first step until every request is queued, so the batch they share is certain.
    engine = async_engine.engine
    all_queued = threading.Event()
    running_per_step = []
    step = engine.step

    def counting_step():
        assert all_queued.wait(timeout=60)
        outputs = step()
        running_per_step.append(len(engine.scheduler.running))
        return outputs

    monkeypatch.setattr(engine, "step", counting_step)

    async def main():
        tasks = [asyncio.create_task(collect(async_engine, p, params)) for p in prompts]
        await asyncio.sleep(0)  # one pass of the loop: each task has sent its add
        all_queued.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    for outs, want in zip(results, expected, strict=True):
        assert [o.finished for o in outs] == [False] * 9 + [True]  # one output per step
        token_ids = [o.outputs[0].token_ids for o in outs]
        assert token_ids == [want[:k] for k in range(1, 11)]  # cumulative
        assert outs[-1].outputs[0].finish_reason == "length"
    assert max(running_per_step) == len(prompts)
    assert len(running_per_step) <= 11  # 10 decode steps, plus one if the first ran alone
    stats = async_engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert stats.prefix_cache_queries >= sum(map(len, prompts))
    assert async_engine.is_healthy
    assert_pool_full(async_engine)


def test_closed_or_cancelled_consumers_abort_their_requests(async_engine):
    short = SamplingParams(max_tokens=8, **GREEDY)
    long = SamplingParams(max_tokens=50, **GREEDY)  # would outlive the short ones

    async def main():
        async def read_two_then_close():
            outs = []
            async with contextlib.aclosing(
                    async_engine.generate(new_id(), make_prompt(6, seed=1), long)) as stream:
                async for out in stream:
                    outs.append(out)
                    if len(outs) == 2:
                        break
            return outs

        got_two = asyncio.Event()
        cancelled_outs = []

        async def read_until_cancelled():
            async for out in async_engine.generate(new_id(), make_prompt(7, seed=2), long):
                cancelled_outs.append(out)
                if len(cancelled_outs) == 2:
                    got_two.set()

        victim = asyncio.create_task(read_until_cancelled())
        others = [asyncio.create_task(collect(async_engine, make_prompt(5, seed=s), short))
                  for s in (3, 4)]
        closed_outs = await read_two_then_close()
        await got_two.wait()
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        finished = await asyncio.gather(*others)
        await async_engine.abort("no-such-request")  # returns once earlier commands are done
        return closed_outs, cancelled_outs, finished

    closed_outs, cancelled_outs, finished = asyncio.run(main())
    assert not any(o.finished for o in closed_outs + cancelled_outs)
    assert len(closed_outs) == 2 and len(cancelled_outs) >= 2
    assert [len(outs[-1].outputs[0].token_ids) for outs in finished] == [8, 8]
    assert_pool_full(async_engine)


def test_abort_ends_the_stream_with_an_abort_output(async_engine):
    async def main():
        request_id = new_id()
        outs = []
        async for out in async_engine.generate(request_id, make_prompt(4, seed=5),
                                               SamplingParams(max_tokens=50, **GREEDY)):
            outs.append(out)
            if len(outs) == 1:
                await async_engine.abort(request_id)
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 50
    assert_pool_full(async_engine)


def test_bad_input_fails_its_caller_while_others_complete(async_engine):
    params = SamplingParams(max_tokens=6, **GREEDY)

    async def main():
        good_params = SamplingParams(max_tokens=30, **GREEDY)
        good = asyncio.create_task(
            collect(async_engine, make_prompt(5, seed=6), good_params, "dup"))
        bad = [
            collect(async_engine, [5, 300, 7], params),  # out of the 256-token vocabulary
            collect(async_engine, make_prompt(MAX_MODEL_LEN, seed=7), params),  # too long
            collect(async_engine, "text needs a tokenizer", params),
            collect(async_engine, [], params),
            collect(async_engine, 12345, params),  # TypeError
            collect(async_engine, [5, 6], params, "dup"),  # the id is in use
        ]
        errors = await asyncio.gather(*bad, return_exceptions=True)
        return errors, await good

    errors, good = asyncio.run(main())
    assert [type(e) for e in errors] == [ValueError] * 4 + [TypeError, ValueError]
    assert "[0, 256)" in str(errors[0]) and "context" in str(errors[1])
    assert "already in use" in str(errors[5])
    # The duplicate's failure did not abort the request that owns the id.
    assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 30
    assert async_engine.is_healthy
    assert_pool_full(async_engine)


def test_overload_rejects_beyond_max_waiting_requests(tiny_dir):
    # One sequence runs at a time, so the others wait, and at most 2 may.
    engine = AsyncEngine(make_config(tiny_dir, max_num_seqs=1), max_waiting_requests=2)
    params = SamplingParams(max_tokens=4, **GREEDY)

    async def main():
        results = await asyncio.gather(
            *(collect(engine, make_prompt(5, seed=s), params) for s in range(5)),
            return_exceptions=True)
        await engine.shutdown()
        return results

    results = asyncio.run(main())
    rejected = [r for r in results if isinstance(r, EngineOverloadedError)]
    completed = [r for r in results if isinstance(r, list)]
    assert len(rejected) >= 2 and len(completed) >= 2
    assert len(rejected) + len(completed) == 5
    assert all(len(outs[-1].outputs[0].token_ids) == 4 for outs in completed)
    assert_pool_full(engine)


def test_the_waiting_cap_counts_each_requests_n(tiny_dir):
    engine = AsyncEngine(make_config(tiny_dir, max_num_seqs=1), max_waiting_requests=3)

    def params(n: int, max_tokens: int = 2) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, n=n, **GREEDY)

    async def until(condition) -> None:
        while not condition():
            await asyncio.sleep(0.01)

    async def main():
        running = asyncio.ensure_future(collect(engine, make_prompt(5, seed=0), params(1, 30)))
        await until(lambda: engine.stats().num_running == 1)
        with pytest.raises(ValueError, match="max_waiting_requests=3"):
            await collect(engine, make_prompt(5, seed=1), params(4))  # can never fit
        waiting = asyncio.ensure_future(collect(engine, make_prompt(5, seed=2), params(2)))
        await until(lambda: engine.stats().num_waiting == 2)
        with pytest.raises(EngineOverloadedError):
            await collect(engine, make_prompt(5, seed=3), params(2))  # 2 + 2 > 3
        fits = asyncio.ensure_future(collect(engine, make_prompt(5, seed=4), params(1)))
        results = await asyncio.gather(running, waiting, fits)
        await engine.shutdown()
        return results

    assert all(outs[-1].finished for outs in asyncio.run(main()))
    assert_pool_full(engine)


def test_a_failing_step_fails_every_request_and_the_engine(tiny_dir):
    engine = AsyncEngine(make_config(tiny_dir))
    step, num_steps = engine.engine.step, itertools.count()

    def failing_step():
        if next(num_steps) == 3:
            raise RuntimeError("boom")
        return step()

    engine.engine.step = failing_step
    params = SamplingParams(max_tokens=20, **GREEDY)

    async def main():
        results = await asyncio.gather(
            *(collect(engine, make_prompt(4, seed=s), params) for s in range(3)),
            return_exceptions=True)
        with pytest.raises(EngineDeadError, match="boom"):
            await collect(engine, [5, 6], params)
        await engine.shutdown()
        return results

    results = asyncio.run(main())
    for error in results:
        assert isinstance(error, EngineDeadError)
        assert isinstance(error.__cause__, RuntimeError) and str(error.__cause__) == "boom"
    assert not engine.is_healthy
    assert not engine._thread.is_alive()


@pytest.mark.parametrize("abort_in_flight", [True, False])
def test_shutdown_joins_the_thread(tiny_dir, abort_in_flight):
    engine = AsyncEngine(make_config(tiny_dir))
    params = SamplingParams(max_tokens=50, **GREEDY)

    async def main():
        outs = []
        async for out in engine.generate(new_id(), make_prompt(4, seed=8), params):
            outs.append(out)
            if len(outs) == 1:
                shutdown = asyncio.create_task(engine.shutdown(abort_in_flight))
                await asyncio.sleep(0)  # let it start: new requests are now refused
                with pytest.raises(EngineDeadError, match="shut down"):
                    await collect(engine, [5, 6], params)
        await shutdown
        return outs

    outs = asyncio.run(main())
    last = outs[-1].outputs[0]
    if abort_in_flight:
        assert last.finish_reason == "abort" and len(last.token_ids) < 50
    else:
        assert last.finish_reason == "length" and len(last.token_ids) == 50
    assert not engine.is_healthy
    assert not engine._thread.is_alive()
    assert_pool_full(engine)


def test_a_request_that_outlives_the_loop_is_refused_not_left_waiting(tiny_dir, monkeypatch):
    """A guided request whose grammar still compiles when the engine stops (at the
    shutdown timeout) gets EngineShutDownError once it is compiled; it never waits on a
    queue nobody reads."""
    from pagedserve.engine.async_engine import EngineShutDownError
    from pagedserve.engine.sampling_params import GuidedDecodingParams

    engine = AsyncEngine(make_config(tiny_dir))
    compiled = threading.Event()

    async def slow_compile(guided):
        await asyncio.to_thread(compiled.wait, 10)

    monkeypatch.setattr(engine, "_compile_grammar", slow_compile)
    params = SamplingParams(max_tokens=4, guided_decoding=GuidedDecodingParams(regex="a+"),
                            **GREEDY)

    async def main():
        request = asyncio.create_task(collect(engine, [5, 6], params))
        await asyncio.sleep(0.05)  # it is compiling
        await engine.stop()
        compiled.set()
        with pytest.raises(EngineShutDownError):
            await asyncio.wait_for(request, 10)
        await engine.abort("nobody")  # returns at once: nothing runs
        await engine.shutdown()

    asyncio.run(main())
    assert not engine._thread.is_alive()


def test_one_failing_request_does_not_stop_the_others(tiny_dir, monkeypatch):
    """A request whose output processing raises fails alone; the engine stays healthy."""
    from pagedserve.engine.async_engine import RequestFailedError

    async def main():
        async_engine = AsyncEngine(make_config(tiny_dir))
        engine = async_engine.engine
        original = engine._check_stop

        def check_stop(req, token_id):
            if req.request_id == "bad" and req.num_output_tokens == 2:
                raise RuntimeError("boom")
            return original(req, token_id)

        monkeypatch.setattr(engine, "_check_stop", check_stop)

        async def run(request_id):
            params = SamplingParams(max_tokens=6, **GREEDY)
            outs = [o async for o in async_engine.generate(request_id, [5, 6, 7], params)]
            return outs[-1]

        results = await asyncio.gather(run("bad"), run("good"), return_exceptions=True)
        assert isinstance(results[0], RequestFailedError) and "boom" in str(results[0])
        assert results[1].outputs[0].finish_reason == "length"
        assert len(results[1].outputs[0].token_ids) == 6
        assert async_engine.is_healthy
        await async_engine.shutdown()
        pool = engine.kv_cache_manager.block_pool
        assert engine.kv_cache_manager.num_free_blocks == pool.num_blocks

    asyncio.run(main())


def test_the_engine_thread_builds_the_engine_with_its_own_thread_count(tiny_dir, monkeypatch):
    """compute_threads: the engine thread sets its torch thread count, then builds the
    engine and steps it; a failure to build raises from the constructor."""
    import pagedserve.engine.async_engine as async_engine_module

    calls = []
    real_init = async_engine_module.LLMEngine.__init__

    def recording_init(self, config):
        calls.append(("build", threading.current_thread().name))
        real_init(self, config)

    monkeypatch.setattr(async_engine_module.LLMEngine, "__init__", recording_init)
    monkeypatch.setattr(async_engine_module.torch, "set_num_threads",
                        lambda n: calls.append(("threads", n, threading.current_thread().name)))
    engine = AsyncEngine(make_config(tiny_dir), compute_threads=1)
    try:
        assert calls == [("threads", 1, "pagedserve-engine"), ("build", "pagedserve-engine")]
        outputs = asyncio.run(collect(engine, make_prompt(5, seed=1),
                                      SamplingParams(max_tokens=4, **GREEDY)))
        assert len(outputs[-1].outputs[0].token_ids) == 4
    finally:
        asyncio.run(engine.shutdown())
    with pytest.raises(ValueError, match="neither an existing directory"):
        AsyncEngine(EngineConfig(model=str(tiny_dir / "missing")), compute_threads=1)
