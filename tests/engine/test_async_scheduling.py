"""Async scheduling: step N+1 is scheduled and launched before step N's sampled tokens
are processed. Whatever the sampling, stops, aborts and id reuse, requests get the tokens a
synchronous engine gives them, and no step is scheduled past a request's max_tokens."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODES = ["sync", "runner-thread", "inline"]


def make_engine(tiny_dir, mode: str, **kwargs) -> LLMEngine:
    """inline: launch on the calling thread, as on GPUs, so that step N+1 takes N's tokens
    from the device; runner-thread: the runner on its own thread, as on CPUs."""
    config = dict(model=str(tiny_dir), skip_tokenizer_init=True, max_model_len=96, block_size=4,
                  max_num_batched_tokens=16, max_num_seqs=6, num_gpu_blocks_override=24)
    engine = LLMEngine(EngineConfig(**config, **kwargs, async_scheduling=mode != "sync"))
    if mode == "inline":
        engine._runner_thread = None
    return engine


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Final token ids of each request (per child), finish reasons, and every output seen."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    finals, seen = {}, Counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in finals, "an output after the final one"
            seen[out.request_id] += 1
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
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = [(c.token_ids, c.finish_reason) for c in out.outputs]
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
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "b"
    kvm = engine.kv_cache_manager
    assert kvm.num_free_blocks == kvm.block_pool.num_blocks
