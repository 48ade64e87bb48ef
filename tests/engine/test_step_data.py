"""One step as plain data: the scheduler's output pickles and names no live object, the
runner's persistent batch follows its diffs, and delta / cumulative / final-only outputs
tell the same story."""

from __future__ import annotations

import dataclasses
import pickle
import random

import numpy as np
import pytest
import torch

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.input_batch import CachedRequestState, InputBatch
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.outputs import DeltaAccumulator, RequestOutput
from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.engine.scheduler import SchedulerOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLAIN_TYPES = (str, int, float, bool, type(None), SamplingParams)


def assert_plain(value, path="out") -> None:
    """Only ids, counts, token and block ids and params: nothing the receiver can reach into."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert_plain(k, path)
            assert_plain(v, f"{path}[{k!r}]")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            assert_plain(v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, SamplingParams):
        for f in dataclasses.fields(value):
            assert_plain(getattr(value, f.name), f"{path}.{f.name}")
    else:
        assert isinstance(value, PLAIN_TYPES), f"{path} is a {type(value).__name__}"


@pytest.fixture(scope="module")
def engine(tiny_dir):
    # Few blocks and a small budget: chunked prefill, preemption and prefix hits all happen.
    return LLMEngine(EngineConfig(model=str(tiny_dir), skip_tokenizer_init=True,
                                  max_model_len=64, block_size=4, max_num_batched_tokens=16,
                                  max_num_seqs=6, num_gpu_blocks_override=24))


def run(engine, prompts, params) -> dict[str, RequestOutput]:
    finals = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def test_scheduler_output_is_plain_data_that_pickles(engine):
    outputs: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        outputs.append(out)
        return out

    engine.scheduler.schedule = recording_schedule
    try:
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(5, 30))]
                   for _ in range(8)]
        run(engine, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                            n=2))
    finally:
        engine.scheduler.schedule = schedule
    assert any(o.preempted_request_ids for o in outputs)  # the regime is exercised
    assert any(any(o.scheduled_cached_reqs.resumed_from_preemption) for o in outputs)
    for out in outputs:
        assert_plain(out)
        assert pickle.loads(pickle.dumps(out)) == out


def test_preempted_and_penalised_requests_keep_their_tokens(engine, tiny_dir):
    """Resumed rows get back their tokens, penalty counts and seeded generator: the same
    output as an engine with room for everyone."""
    roomy = LLMEngine(EngineConfig(model=str(tiny_dir), skip_tokenizer_init=True,
                                   max_model_len=64, block_size=4))
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(5, 30))] for _ in range(8)]
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True,
                            repetition_penalty=1.3, frequency_penalty=0.4,
                            presence_penalty=0.2, logprobs=2)
    preempting, plain = run(engine, prompts, params), run(roomy, prompts, params)
    assert engine.scheduler.num_preemptions > 0 and roomy.scheduler.num_preemptions == 0
    for request_id, out in plain.items():
        assert preempting[request_id].outputs[0].token_ids == out.outputs[0].token_ids


def _batch(max_reqs=8, vocab=50) -> InputBatch:
    return InputBatch(max_reqs, 64, 4, vocab, torch.device("cpu"))


def _state(request_id: str, rng: random.Random, **params) -> CachedRequestState:
    prompt = [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
    return CachedRequestState(request_id, prompt, SamplingParams(**params), None, [])


def _blocks(state: CachedRequestState, rng: random.Random) -> list[int]:
    return [rng.randrange(1000) for _ in range(-(-len(state.prompt_token_ids) // 4))]


def test_input_batch_rows_follow_adds_removes_and_condense():
    rng = random.Random(2)
    batch, model = _batch(), {}  # model: request id -> (tokens, blocks, temperature)
    for step in range(200):
        if model and (len(model) == 8 or rng.random() < 0.4):
            request_id = rng.choice(sorted(model))
            batch.remove(request_id)
            del model[request_id]
        else:
            request_id = f"q{step}"
            temperature = rng.choice([0.0, 0.5, 1.0])
            state = _state(request_id, rng, temperature=temperature)
            blocks = _blocks(state, rng)
            batch.add(state, 0, blocks)
            model[request_id] = (list(state.prompt_token_ids), blocks, temperature)
        if rng.random() < 0.5:
            batch.condense()
            assert None not in batch.req_ids
        for request_id, (tokens, blocks, temperature) in model.items():
            row = batch.req_id_to_index[request_id]
            assert batch.req_ids[row] == request_id
            assert batch.token_ids[row, :batch.num_tokens[row]].tolist() == tokens
            assert batch.block_table[row, :batch.num_blocks[row]].tolist() == blocks
            assert batch.sampling.temperature[row] == np.float32(temperature)
        assert sorted(r for r in batch.req_ids if r is not None) == sorted(model)


def test_penalty_counts_follow_their_row_through_condense():
    rng = random.Random(3)
    batch = _batch()
    a = _state("a", rng)
    b = _state("b", rng, frequency_penalty=1.0)
    batch.add(a, 0, _blocks(a, rng))
    batch.add(b, 0, _blocks(b, rng))
    rows = np.array([0, 1])
    sampling = batch.sampling_rows(rows)
    positions, counts, _ = batch.penalty_tensors(rows, sampling)
    assert positions.tolist() == [1] and counts.sum() == 0
    batch.count_sampled(rows, positions, torch.tensor([5, 7]))
    batch.record_sampled(batch.reserve_sampled(rows, ["a", "b"]), [5, 7], {})
    batch.remove("a")
    batch.condense()
    assert batch.req_id_to_index["b"] == 0
    _, counts, _ = batch.penalty_tensors(np.array([0]), batch.sampling_rows(np.array([0])))
    assert counts[0, 7] == 1 and counts.sum() == 1
    assert batch.token_ids[0, batch.num_tokens[0] - 1] == 7


def test_sampled_tokens_follow_their_request_when_rows_change_hands():
    """A step's tokens written back after rows moved (async scheduling): a finished
    request's is dropped, a preempted one's goes into its state, a moved one's to its new
    row; with no row changed they go straight to the rows reserved."""
    rng = random.Random(4)
    batch = _batch()
    a, b, c, d = (_state(r, rng) for r in "abcd")
    for state in (a, b, c, d):
        batch.add(state, 0, _blocks(state, rng))
    rows = np.arange(4)
    reserved = batch.reserve_sampled(rows, ["a", "b", "c", "d"])
    ends = reserved.positions.copy()
    batch.remove("a")  # finished
    c_state = batch.remove("c", keep_tokens=True)  # preempted: its tokens go to its state
    batch.condense()  # d moves into a's row
    assert batch.req_id_to_index["d"] == 0 and reserved.layout != batch.layout
    batch.record_sampled(reserved, [11, 12, 13, 14], {"c": c_state})
    assert batch.token_ids[batch.req_id_to_index["b"], ends[1]] == 12
    assert batch.token_ids[0, ends[3]] == 14
    assert c_state.output_token_ids == [13]
    again = batch.reserve_sampled(np.array([0, 1]), ["d", "b"])
    batch.record_sampled(again, [21, 22], {})
    assert batch.token_ids[0, ends[3] + 1] == 21 and batch.token_ids[1, ends[1] + 1] == 22


@pytest.fixture(scope="module")
def text_engine(tiny_dir_49k):
    from pagedserve.engine.loader.resolve import resolve_model

    # No prefix caching: the tests rerun one prompt and compare logprobs exactly, and a
    # cached prefix attends through another path (last bits differ on some CPUs).
    return LLMEngine(EngineConfig(model=str(tiny_dir_49k), tokenizer=str(resolve_model(None)),
                                  max_model_len=128, block_size=4, max_num_batched_tokens=16,
                                  num_gpu_blocks_override=40,
                                  enable_prefix_caching=False))


@pytest.fixture(scope="module")
def tiny_dir_49k(tmp_path_factory):
    from tests.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("llama-49k"), "llama", vocab_size=49152)


def _outputs(engine, kind: RequestOutputKind) -> list[RequestOutput]:
    params = SamplingParams(n=2, temperature=0.9, seed=3, max_tokens=30, logprobs=2,
                            stop=["zqx", "!!"], output_kind=kind)
    engine.add_request("x", "Hello there, how are", params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(o for o in engine.step() if o.request_id == "x")
    return outputs


def test_delta_cumulative_and_final_only_outputs_agree(text_engine):
    cumulative = _outputs(text_engine, RequestOutputKind.CUMULATIVE)
    deltas = _outputs(text_engine, RequestOutputKind.DELTA)
    final_only = _outputs(text_engine, RequestOutputKind.FINAL_ONLY)
    assert len(final_only) == 1 and final_only[0].finished
    assert len(deltas) > 3 and len(cumulative) == len(deltas)
    accumulator = DeltaAccumulator()
    for delta in deltas:
        accumulator.add(delta)
    rebuilt = accumulator.result()
    for final in (cumulative[-1], final_only[0], rebuilt):
        assert final.finished
        for mine, theirs in zip(final.outputs, cumulative[-1].outputs, strict=True):
            assert (mine.index, mine.text, mine.token_ids, mine.finish_reason,
                    mine.stop_reason) == (theirs.index, theirs.text, theirs.token_ids,
                                          theirs.finish_reason, theirs.stop_reason)
            assert mine.logprobs == theirs.logprobs
            assert mine.cumulative_logprob == pytest.approx(theirs.cumulative_logprob)
    # A delta holds only what is new: one token per child per step, never a resend.
    for delta in deltas:
        for out in delta.outputs:
            assert len(out.token_ids) <= 1 and len(out.logprobs) == len(out.token_ids)
