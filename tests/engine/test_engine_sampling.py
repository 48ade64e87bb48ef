"""Sampling and stopping through the whole engine (tiny model, token-id prompts): seeded
draws independent of the batch, stop conditions, logprobs, prompt logprobs against HF, and
input validation that leaves the engine serving."""

import itertools
import random

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.outputs import RequestOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_MODEL_LEN = 64
LOGPROB_ATOL = 2e-3  # fp32, different op order than HF (fused projections, SDPA over pages)
SEEDED = dict(temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True)
EOS_TOKEN_ID = 2  # tests.tiny_models

_request_ids = itertools.count()


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(model=str(tiny_dir), skip_tokenizer_init=True, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def chunked_llm(tiny_dir):
    """Small blocks and an 8-token budget: prompts are prefilled over several steps."""
    return LLM(model=str(tiny_dir), skip_tokenizer_init=True, max_model_len=MAX_MODEL_LEN,
               block_size=4, max_num_batched_tokens=8, max_num_seqs=4)


def make_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(length)]


def generate(llm, prompts: list[list[int]], params) -> list[RequestOutput]:
    """Run a batch to completion through the engine loop; whatever happens, leave the shared
    engine empty so that one failing test does not spill into the next."""
    engine = llm.llm_engine
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    ids = [f"req-{next(_request_ids)}" for _ in prompts]
    finished: dict[str, RequestOutput] = {}
    try:
        for request_id, prompt, sp in zip(ids, prompts, params, strict=True):
            engine.add_request(request_id, prompt, sp)
        for _ in range(10_000):
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                if out.finished:
                    assert out.request_id not in finished
                    finished[out.request_id] = out
    finally:
        engine.abort_request(ids)
    assert finished.keys() == set(ids)
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.block_pool.num_blocks
    return [finished[i] for i in ids]


def tokens(llm, prompt: list[int], **params) -> list[int]:
    (out,) = generate(llm, [prompt], SamplingParams(**params))
    return out.outputs[0].token_ids


# ---- seeded sampling -----------------------------------------------------------------


def test_seeded_request_samples_the_same_alone_or_anywhere_in_a_batch(llm, chunked_llm):
    target = make_prompt(9, seed=1)
    target_params = SamplingParams(seed=1234, **SEEDED)
    alone = tokens(llm, target, seed=1234, **SEEDED)
    assert len(alone) == 12

    others = [make_prompt(n, seed=100 + n) for n in (1, 5, 17, 30, 3, 12, 25, 8)]
    other_params = [
        SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),  # unseeded
        SamplingParams(seed=7, **SEEDED),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=20, max_tokens=12, ignore_eos=True),
        SamplingParams(seed=1234, temperature=1.0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=1.3, top_p=0.5, max_tokens=12, ignore_eos=True),
        SamplingParams(seed=99, min_p=0.1, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=7, ignore_eos=True),
    ]
    seeded_others = {}
    for position in (0, 4, 8):
        prompts = others[:position] + [target] + others[position:]
        params = other_params[:position] + [target_params] + other_params[position:]
        outs = generate(llm, prompts, params)
        assert outs[position].outputs[0].token_ids == alone, f"target at position {position}"
        for i, (p, out) in enumerate(zip(params, outs, strict=True)):
            if p.seed is not None and i != position:
                # The seeded neighbours are just as reproducible.
                key = (tuple(out.prompt_token_ids), p.seed)
                seeded_others.setdefault(key, out.outputs[0].token_ids)
                assert out.outputs[0].token_ids == seeded_others[key]
    # Prefilled in 8-token chunks with other requests: still the same draws.
    outs = generate(chunked_llm, others[:3] + [target], other_params[:3] + [target_params])
    assert outs[3].outputs[0].token_ids == alone


def test_different_seeds_give_different_samples(llm):
    prompt = make_prompt(6, seed=2)
    samples = [tuple(tokens(llm, prompt, seed=seed, **SEEDED)) for seed in range(4)]
    assert len(set(samples)) == 4, samples
    assert tokens(llm, prompt, seed=2, **SEEDED) == list(samples[2])


def test_n_with_seed_gives_distinct_reproducible_samples(llm):
    prompt = make_prompt(10, seed=3)
    params = SamplingParams(n=3, seed=5, **SEEDED)
    (first,) = generate(llm, [prompt], params)
    assert [c.index for c in first.outputs] == [0, 1, 2]
    samples = [tuple(c.token_ids) for c in first.outputs]
    assert len(set(samples)) == 3, samples
    assert all(len(s) == 12 and c.finish_reason == "length"
               for s, c in zip(samples, first.outputs, strict=True))
    # Again, and again beside other requests: the same three samples.
    (again,) = generate(llm, [prompt], params)
    assert [tuple(c.token_ids) for c in again.outputs] == samples
    outs = generate(llm, [make_prompt(20, seed=4), prompt],
                    [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True), params])
    assert [tuple(c.token_ids) for c in outs[1].outputs] == samples


# ---- stopping ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_run(llm):
    """A prompt, its 16 greedy tokens, and a stop token first produced at position 4 or later."""
    prompt = make_prompt(7, seed=5)
    greedy = tokens(llm, prompt, temperature=0, max_tokens=16, ignore_eos=True)
    stop_at = next(i for i in range(4, 12) if greedy[i] not in greedy[:i])
    return prompt, greedy, stop_at


def test_stop_token_ids_stop_with_reason(llm, greedy_run):
    prompt, greedy, stop_at = greedy_run
    stop_token = greedy[stop_at]
    (out,) = generate(llm, [prompt], SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_token, 255]))
    completion = out.outputs[0]
    assert completion.token_ids == greedy[:stop_at + 1]
    assert completion.finish_reason == "stop"
    assert completion.stop_reason == stop_token
    assert out.finished


def test_min_tokens_prevents_an_early_stop(llm, greedy_run):
    prompt, greedy, stop_at = greedy_run
    stop_token = greedy[stop_at]
    min_tokens = stop_at + 3
    (out,) = generate(llm, [prompt], SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_token],
        min_tokens=min_tokens))
    completion = out.outputs[0]
    ids = completion.token_ids
    assert ids[:stop_at] == greedy[:stop_at]
    assert len(ids) >= min_tokens
    assert stop_token not in ids[:min_tokens]
    if completion.finish_reason == "stop":
        assert ids[-1] == stop_token and len(ids) > min_tokens
        assert completion.stop_reason == stop_token
    else:
        assert completion.finish_reason == "length" and len(ids) == 16


def test_min_tokens_holds_back_eos(llm):
    # A +100 bias makes EOS the greedy choice at every step once it is allowed.
    (out,) = generate(llm, [make_prompt(5, seed=6)], SamplingParams(
        temperature=0, max_tokens=10, min_tokens=4, logit_bias={EOS_TOKEN_ID: 100.0}))
    completion = out.outputs[0]
    assert len(completion.token_ids) == 5
    assert EOS_TOKEN_ID not in completion.token_ids[:4]
    assert completion.token_ids[4] == EOS_TOKEN_ID
    assert completion.finish_reason == "stop"
    assert completion.stop_reason is None  # EOS, not a user stop token


def test_max_tokens_finishes_with_length(llm, greedy_run):
    prompt, greedy, _ = greedy_run
    (out,) = generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    completion = out.outputs[0]
    assert completion.token_ids == greedy[:5]
    assert completion.finish_reason == "length"
    assert completion.stop_reason is None


# ---- logprobs ------------------------------------------------------------------------


def test_logprobs_hold_top_k_and_the_sampled_token(llm):
    (out,) = generate(llm, [make_prompt(8, seed=7)], SamplingParams(logprobs=5, seed=11, **SEEDED))
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids) == 12
    for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert len(entry) in (5, 6)
        assert next(iter(entry)) == token_id  # the sampled token comes first
        top = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == [1, 2, 3, 4, 5]
        assert all(a >= b for a, b in zip(top, top[1:], strict=False))
        assert all(lp <= 0.0 for lp in entry.values())
        # A sampled token outside the top 5 is the sixth entry, less likely than all five.
        if len(entry) == 6:
            assert entry[token_id] <= top[-1]
    sampled = [entry[t] for t, entry in zip(completion.token_ids, completion.logprobs,
                                              strict=True)]
    assert completion.cumulative_logprob == pytest.approx(sum(sampled), abs=1e-4)


def test_greedy_logprobs_rank_the_sampled_token_first(llm):
    (out,) = generate(llm, [make_prompt(8, seed=8)],
                      SamplingParams(temperature=0, logprobs=5, max_tokens=6, ignore_eos=True))
    for token_id, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True):
        assert len(entry) == 5
        assert entry[token_id].rank == 1
        assert entry[token_id] == max(entry.values())


@pytest.fixture(scope="module")
def hf_prompt_logprobs(tiny_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.eval()

    def compute(prompt: list[int]) -> torch.Tensor:
        """[len(prompt), V]: row i holds log p(next token | prompt[:i + 1])."""
        with torch.inference_mode():
            return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)

    return compute


@pytest.mark.parametrize("engine_name", ["llm", "chunked_llm"])
def test_prompt_logprobs_match_hf(request, engine_name, hf_prompt_logprobs):
    llm = request.getfixturevalue(engine_name)
    prompt = make_prompt(21, seed=9)
    (out,) = generate(llm, [prompt], SamplingParams(
        temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=2))
    ours = out.prompt_logprobs
    assert len(ours) == len(prompt)
    assert ours[0] is None
    hf = hf_prompt_logprobs(prompt)
    for i in range(1, len(prompt)):
        entry = ours[i]
        assert prompt[i] in entry
        assert len(entry) in (2, 3)
        for token_id, lp in entry.items():
            assert lp == pytest.approx(hf[i - 1, token_id].item(), abs=LOGPROB_ATOL)
        hf_top2 = hf[i - 1].topk(2).indices.tolist()
        ranked = {lp.rank: t for t, lp in entry.items() if lp.rank is not None}
        assert ranked == {1: hf_top2[0], 2: hf_top2[1]}


def test_logprobs_are_the_models_own_not_the_processed_ones(llm, hf_prompt_logprobs):
    prompt = make_prompt(8, seed=12)
    hf = hf_prompt_logprobs(prompt)[-1]
    forced = int(hf.argmin())  # the least likely token, made the greedy pick by a bias
    (out,) = generate(llm, [prompt], SamplingParams(
        temperature=0, max_tokens=1, ignore_eos=True, logprobs=2, logit_bias={forced: 100.0}))
    completion = out.outputs[0]
    assert completion.token_ids == [forced]
    entry = completion.logprobs[0]
    assert list(entry) == [forced, *hf.topk(2).indices.tolist()]
    for token_id, lp in entry.items():
        assert lp == pytest.approx(hf[token_id].item(), abs=LOGPROB_ATOL)


# ---- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(logprobs=21), "logprobs"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=3), "min_tokens"),
    (dict(logit_bias={5: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_the_engine_keeps_serving(llm, greedy_run):
    engine = llm.llm_engine
    ok = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    with pytest.raises(ValueError) as too_long:
        engine.add_request("too-long", make_prompt(100, seed=10), ok)
    assert "100" in str(too_long.value) and str(MAX_MODEL_LEN) in str(too_long.value)
    # A prompt filling the whole context leaves no room for an output token.
    with pytest.raises(ValueError, match=str(MAX_MODEL_LEN)):
        engine.add_request("full", make_prompt(MAX_MODEL_LEN, seed=10), ok)
    with pytest.raises(ValueError, match="256"):
        engine.add_request("oov", [5, 256, 7], ok)
    with pytest.raises(ValueError):
        engine.add_request("negative", [5, -1], ok)
    with pytest.raises(ValueError):
        engine.add_request("empty", [], ok)
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.has_unfinished_requests()

    # A bad prompt in a batch: the good ones added before it are aborted, not left behind.
    with pytest.raises(ValueError):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [9, 300]}], ok,
                     use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.has_unfinished_requests()
    kvm = engine.kv_cache_manager
    assert kvm.num_free_blocks == kvm.block_pool.num_blocks

    prompt, greedy, _ = greedy_run
    assert tokens(llm, prompt, temperature=0, max_tokens=16, ignore_eos=True) == greedy
    longest = make_prompt(MAX_MODEL_LEN - 1, seed=10)  # one token of room: max_tokens -> 1
    (out,) = generate(llm, [longest], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
