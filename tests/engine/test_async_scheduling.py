"""Async scheduling: step N+1 is scheduled and launched before step N's sampled tokens
are processed. Whatever the sampling, stops, aborts and id reuse, requests get the tokens a
synchronous engine gives them, and no step is scheduled past a request's max_tokens."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODES = ["sync", "runner-thread", "inline"]


def make_engine(tiny_dir, mode: str, **kwargs) -> LLMEngine:
    """inline: launch on the calling thread, as on GPUs, so that step N+1 takes N's tokens
    from the device; runner-thread: the runner on its own thread, as on CPUs."""
    config = dict(model=str(tiny_dir), skip_tokenizer_init=True, max_model_len=96, block_size=4,
                  max_num_batched_tokens=16, max_num_seqs=6, num_gpu_blocks_override=24)
    config.update(kwargs)
    engine = LLMEngine(EngineConfig(**config, async_scheduling=mode != "sync"))
    if mode == "inline":
        engine._runner_thread = None
    return engine


def drain(engine) -> list:
    """Every output until the engine has none left, in a bounded number of steps (a stalled
    request fails the test instead of hanging it)."""
    outputs = []
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            return outputs
        outputs += engine.step()
    raise AssertionError("stalled: requests never finish")


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Final token ids and finish reason of each request's children."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    finals = {}
    for out in drain(engine):
        assert out.request_id not in finals, "an output after the final one"
        if out.finished:
            finals[out.request_id] = [(c.token_ids, c.finish_reason) for c in out.outputs]
    kvm = engine.kv_cache_manager
    assert kvm.num_free_blocks == kvm.block_pool.num_blocks, "blocks leaked"
    return finals


def mixed_requests(seed: int = 0) -> dict[str, tuple[list[int], SamplingParams]]:
    """Greedy, seeded random, penalised, n > 1 and min_tokens requests, long enough to chunk
    and, together, to preempt."""
    rng = random.Random(seed)
    requests = {}
    for i in range(10):
        prompt = [rng.randrange(3, 256) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.8]), seed=i, top_p=rng.choice([1.0, 0.9]),
            max_tokens=rng.randrange(3, 20), n=rng.choice([1, 1, 2]),
            frequency_penalty=rng.choice([0.0, 0.5]), repetition_penalty=rng.choice([1.0, 1.2]),
            min_tokens=rng.choice([0, 3]), stop_token_ids=rng.sample(range(3, 256), 30),
            logprobs=rng.choice([None, 2]))
        requests[f"r{i}"] = (prompt, params)
    return requests


@pytest.mark.parametrize("mode", MODES[1:])
def test_same_tokens_as_synchronous(tiny_dir, mode):
    expected = run(make_engine(tiny_dir, "sync"), mixed_requests())
    engine = make_engine(tiny_dir, mode)
    assert run(engine, mixed_requests()) == expected
    assert engine.scheduler.num_preemptions > 0
    # Some requests stopped on a stop token, so some steps ran ahead for nothing.
    assert any(reason == "stop" for final in expected.values() for _, reason in final)


@pytest.mark.parametrize("mode", MODES)
def test_nothing_scheduled_past_max_tokens(tiny_dir, mode):
    """A request's last step samples its max_tokens-th token; none runs ahead after it."""
    engine = make_engine(tiny_dir, mode)
    scheduled = Counter()
    schedule = engine.scheduler.schedule

    def counting_schedule():
        out = schedule()
        scheduled.update(out.num_scheduled_tokens)
        return out

    engine.scheduler.schedule = counting_schedule
    prompts = {f"r{i}": [7 + i] * (5 + 9 * i) for i in range(4)}
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)
    run(engine, {i: (p, params) for i, p in prompts.items()})
    # Every prompt token, then every sampled token but the last, computed once.
    assert dict(scheduled) == {i: len(p) + 6 - 1 for i, p in prompts.items()}


@pytest.mark.parametrize("mode", MODES[1:])
def test_reused_id_gets_its_own_tokens(tiny_dir, mode):
    """An id reused right after its request stopped, while a step still samples for the
    old one: the new request's tokens are its own."""
    engine = make_engine(tiny_dir, mode)
    first, second = [11] * 9, [23] * 5
    greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=4)
    reference = make_engine(tiny_dir, "sync")
    expected = run(reference, {"x": (second, greedy)})["x"]
    # A stop token that ends the first request at once, with steps still running ahead.
    stop_on_first = SamplingParams(temperature=0, ignore_eos=True, max_tokens=4,
                                   stop_token_ids=list(range(256)))
    engine.add_request("x", first, stop_on_first)
    # Another request keeps steps running ahead (an idle engine waits for the last one).
    engine.add_request("y", [7] * 3, SamplingParams(temperature=0, ignore_eos=True,
                                                    max_tokens=20))
    while not any(o.request_id == "x" and o.finished for o in engine.step()):
        pass
    assert "x" in engine._in_flight.scheduled.num_scheduled_tokens
    engine.add_request("x", second, greedy)
    finals = {out.request_id: [(c.token_ids, c.finish_reason) for c in out.outputs]
              for out in drain(engine) if out.finished}
    assert finals["x"] == expected


@pytest.mark.parametrize("mode", MODES[1:])
def test_abort_with_a_step_in_flight(tiny_dir, mode):
    engine = make_engine(tiny_dir, mode)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=30)
    engine.add_request("a", [5] * 10, params)
    engine.add_request("b", [6] * 10, params)
    for _ in range(4):
        engine.step()
    (aborted,) = engine.abort_request("a")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert {out.request_id for out in drain(engine)} == {"b"}
    kvm = engine.kv_cache_manager
    assert kvm.num_free_blocks == kvm.block_pool.num_blocks


@pytest.mark.parametrize("mode", MODES[1:])
def test_preemption_in_a_step_that_runs_nothing(tiny_dir, mode):
    """S's last token is being sampled, so S is not scheduled again; R, behind it, finds no
    block and preempts itself. That step runs nothing, and the runner must still hear of
    the preemption (or R gets a second row and never samples again)."""
    requests = {"S": ([9] * 60, SamplingParams(temperature=0, ignore_eos=True, max_tokens=3)),
                "R": ([8] * 31, SamplingParams(temperature=0, ignore_eos=True, max_tokens=20))}
    kwargs = dict(max_num_batched_tokens=64)
    expected = run(make_engine(tiny_dir, "sync", **kwargs), requests)
    engine = make_engine(tiny_dir, mode, **kwargs)
    schedule, empty_preemptions = engine.scheduler.schedule, []

    def recording_schedule():
        out = schedule()
        if out.is_empty and out.preempted_request_ids:
            empty_preemptions.append(out.preempted_request_ids)
        return out

    engine.scheduler.schedule = recording_schedule
    assert run(engine, requests) == expected
    assert empty_preemptions == [["R"]]


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_step_ends_its_requests_and_the_engine_goes_on(tiny_dir, mode):
    engine = make_engine(tiny_dir, mode)
    greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8)
    for i in range(3):
        engine.add_request(f"r{i}", [5 + i] * (3 + 4 * i), greedy)
    runner, calls = engine.model_runner, [0]
    execute_model = runner.execute_model

    def failing_once(*args):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("device lost")
        return execute_model(*args)

    runner.execute_model = failing_once
    with pytest.raises(RuntimeError, match="device lost"):
        for _ in range(10):
            engine.step()
    finals = {out.request_id: out for out in drain(engine)}
    assert sorted(finals) == ["r0", "r1", "r2"]
    for out in finals.values():
        assert out.finished and "device lost" in out.error
        assert out.outputs[0].finish_reason == "error"
    kvm = engine.kv_cache_manager
    assert kvm.num_free_blocks == kvm.block_pool.num_blocks
    # A new request runs as on a fresh engine.
    again = {"a": ([5] * 3, greedy), "b": ([7] * 11, greedy)}
    assert run(engine, again) == run(make_engine(tiny_dir, "sync"), again)


@pytest.mark.parametrize("mode", MODES[1:])
def test_outputs_held_back_come_before_the_final_one(tiny_dir, mode):
    """Reusing an id finishes the step in flight early; its outputs wait for the next
    step(). Until then their ids stay in use, an abort returns them first, and nothing
    follows a request's final output."""
    engine = make_engine(tiny_dir, mode, max_num_batched_tokens=64)  # all prompts in step 1
    delta = SamplingParams(temperature=0, ignore_eos=True, max_tokens=20,
                           output_kind=RequestOutputKind.DELTA)
    stop_at_once = SamplingParams(temperature=0, ignore_eos=True, max_tokens=4,
                                  stop_token_ids=list(range(256)))
    engine.add_request("x", [11] * 9, stop_at_once)  # ends with its first token
    engine.add_request("w", [12] * 9, SamplingParams(temperature=0, ignore_eos=True,
                                                     max_tokens=2))  # with its second
    engine.add_request("b", [7] * 3, delta)
    tokens = []
    while True:
        outputs = engine.step()
        tokens += [t for o in outputs if o.request_id == "b" for t in o.outputs[0].token_ids]
        if any(o.request_id == "x" and o.finished for o in outputs):
            break
    engine.add_request("x", [23] * 5, stop_at_once)  # finishes the step in flight
    held = {o.request_id: o.finished for o in engine._deferred_outputs}
    assert held == {"w": True, "b": False}
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("w", [1], stop_at_once)  # its final output is not out yet
    outputs = engine.abort_request(["b", "x"])
    assert [o.request_id for o in outputs] == ["b", "b", "x"] and outputs[1].finished
    tokens += [t for o in outputs if o.request_id == "b" for t in o.outputs[0].token_ids]
    assert [(o.request_id, o.finished) for o in drain(engine)] == [("w", True)]
    reference = make_engine(tiny_dir, "sync")
    expected = run(reference, {"b": ([7] * 3, SamplingParams(temperature=0, ignore_eos=True,
                                                             max_tokens=20))})["b"][0][0]
    assert tokens and tokens == expected[:len(tokens)]
