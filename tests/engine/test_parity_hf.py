"""Greedy tokens equal HF transformers' (fp32, CPU) on tiny random-weight models, for any
batch composition, chunk size, prefix-cache state, preemption pattern and n."""

import random

import pytest

from pagedserve.engine import LLM, SamplingParams
from tests.tiny_models import build_tiny_model, hf_greedy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 10
LOGPROB_ATOL = 2e-3  # fp32, different op order than HF (fused projections, SDPA over pages)
PROMPT_LENS = [1, 3, 7, 16, 17, 31, 33, 50, 64, 5]

ARCHS = {
    "llama": dict(arch="llama"),  # GQA 4:2, untied
    "llama_tied_mha": dict(arch="llama", tie_word_embeddings=True, num_key_value_heads=4),
    "mistral": dict(arch="mistral"),
    # A window shorter than most prompts: keys older than 8 positions drop out.
    "mistral_sliding_window": dict(arch="mistral", sliding_window=8),
    # Layer 0 full attention, layer 1 a 12-token window (layer_types from max_window_layers).
    "qwen2_sliding_layers": dict(arch="qwen2", use_sliding_window=True, sliding_window=12,
                                 max_window_layers=1),
    "qwen2": dict(arch="qwen2"),  # qkv bias
    "qwen3": dict(arch="qwen3", tie_word_embeddings=True),  # q/k norm, head_dim != hidden/heads
}


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    spec = dict(ARCHS[request.param])
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), spec.pop("arch"), **spec)
    prompts = make_prompts()
    return path, prompts, hf_greedy(path, prompts, MAX_TOKENS)


def run(path, prompts, n=1, **engine_kwargs):
    llm = LLM(model=str(path), skip_tokenizer_init=True, **engine_kwargs)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0, n=n)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.llm_engine.kv_cache_manager.num_free_blocks == \
        llm.llm_engine.kv_cache_manager.block_pool.num_blocks, "blocks leaked"
    return llm, outs


def check(outs, expected):
    for out, (tokens, logprobs) in zip(outs, expected, strict=True):
        for completion in out.outputs:
            assert completion.token_ids == tokens
            assert completion.finish_reason == "length"
            ours = [next(iter(lp.values())) for lp in completion.logprobs]
            assert ours == pytest.approx(logprobs, abs=LOGPROB_ATOL)


def test_single_requests(tiny):
    path, prompts, expected = tiny
    llm = LLM(model=str(path), skip_tokenizer_init=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    for i in (0, 3, 8):
        check(llm.generate([{"prompt_token_ids": prompts[i]}], params, use_tqdm=False),
              [expected[i]])


def test_mixed_batch(tiny):
    path, prompts, expected = tiny
    _, outs = run(path, prompts)
    check(outs, expected)


def test_chunked_prefill_small_budget(tiny):
    path, prompts, expected = tiny
    _, outs = run(path, prompts, max_num_batched_tokens=13, max_num_seqs=4)
    check(outs, expected)


def test_prefix_cache_hits(tiny):
    path, prompts, expected = tiny
    llm, outs = run(path, prompts, block_size=4)
    check(outs, expected)
    # Same prompts again: their full blocks come from the cache.
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert sum(o.num_cached_tokens for o in again) > 0.8 * sum(PROMPT_LENS)
    check(again, expected)


def test_forced_preemption(tiny):
    path, prompts, expected = tiny
    # 24 blocks of 4 tokens cannot hold all ten sequences (~330 tokens) at once.
    llm, outs = run(path, prompts, block_size=4, num_gpu_blocks_override=24)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    check(outs, expected)


def test_n_greedy_shares_prompt(tiny):
    path, prompts, expected = tiny
    llm, outs = run(path, prompts[6:9], n=3, block_size=4)
    check(outs, expected[6:9])
    assert all(len(o.outputs) == 3 for o in outs)


def test_n_children_share_prompt_blocks(tiny):
    path, prompts, _ = tiny
    llm = LLM(model=str(path), skip_tokenizer_init=True, block_size=4)
    engine = llm.llm_engine
    prompt = prompts[7]  # 50 tokens: 12 full blocks
    engine.add_request("r", {"prompt_token_ids": prompt},
                       SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4))
    engine.step()
    tables = [engine.kv_cache_manager.get_block_ids(f"r#{i}") for i in range(3)]
    assert tables[0][:12] == tables[1][:12] == tables[2][:12]
    assert len({t[12] for t in tables}) == 3  # the partial last block is each child's own
    pool = engine.kv_cache_manager.block_pool
    assert all(pool.blocks[b].ref_cnt == 3 for b in tables[0][:12])
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache_manager.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize("inline", [False, True], ids=["runner-thread", "inline"])
def test_async_scheduling(tiny, inline):
    """Each step scheduled and launched before the previous one's tokens are known (on its
    own thread, as on CPUs, or inline, as on GPUs, taking them on the device): the same
    tokens and logprobs through chunked prefill and preemption."""
    path, prompts, expected = tiny
    llm = LLM(model=str(path), skip_tokenizer_init=True, async_scheduling=True, block_size=4,
              num_gpu_blocks_override=24, max_num_batched_tokens=13)
    engine = llm.llm_engine
    if inline:
        engine._runner_thread = None
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.block_pool.num_blocks
    check(outs, expected)
