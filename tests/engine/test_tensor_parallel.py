"""Tensor parallelism over gloo, 2 CPU ranks (the engine's process and one worker): exactly
TP=1's greedy tokens, and its logprobs within 1e-4, in every scheduler regime; a worker's
death fails every request within seconds and leaves no process behind."""

import asyncio
import os
import signal
import time

import pytest

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.distributed import TensorParallel, check_tensor_parallel
from tests.engine.test_parity_hf import make_prompts
from tests.tiny_models import build_tiny_model, make_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGPROB_ATOL = 1e-4
MAX_TOKENS = 10

MODELS = {
    "llama_gqa": dict(arch="llama"),  # 4 query heads, 2 KV heads: one KV head a rank
    "qwen3": dict(arch="qwen3", tie_word_embeddings=True),  # q/k norm, tied vocab-parallel head
    # One KV head for 2 ranks: replicated; a vocabulary of 253 rows pads the last rank's half.
    "llama_one_kv_head": dict(arch="llama", num_key_value_heads=1, vocab_size=253),
}

# One engine shape for every regime: a 13-token budget chunks prompts and mixes them with
# decodes, and 24 blocks of 4 tokens cannot hold ten sequences (~330 tokens): preemption.
ENGINE = dict(skip_tokenizer_init=True, max_num_batched_tokens=13, block_size=4,
              num_gpu_blocks_override=24)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _tokens_and_logprobs(outputs):
    return [[(c.token_ids, [next(iter(lp.values())).logprob for lp in c.logprobs])
             for c in out.outputs] for out in outputs]


def _run_regimes(path, vocab_size, tensor_parallel_size):
    """Mixed batch + chunked prefill + preemption, then the same prompts again (prefix
    hits), then n=2; with the engine's stats and the worker pids (empty at TP=1)."""
    llm = LLM(model=str(path), tensor_parallel_size=tensor_parallel_size, **ENGINE)
    engine = llm.llm_engine
    pids = [w.pid for w in getattr(engine.executor, "workers", [])]
    try:
        prompts = [{"prompt_token_ids": [t % vocab_size for t in p]} for p in make_prompts()]
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                logprobs=0)
        results = [_tokens_and_logprobs(llm.generate(prompts, params, use_tqdm=False))
                   for _ in range(2)]
        n2 = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0,
                            n=2)
        results.append(_tokens_and_logprobs(llm.generate(prompts[:3], n2, use_tqdm=False)))
        kvm = engine.kv_cache_manager
        assert kvm.num_free_blocks == kvm.block_pool.num_blocks, "blocks leaked"
        stats = engine.stats()
    finally:
        llm.shutdown()
    return results, stats, pids


@pytest.fixture(scope="module", params=list(MODELS))
def tiny_model(request, tmp_path_factory):
    spec = dict(MODELS[request.param])
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), spec.pop("arch"), **spec)
    vocab = spec.get("vocab_size", 256)
    return path, vocab, _run_regimes(path, vocab, 1)


def test_tp2_matches_tp1_in_every_regime(tiny_model):
    path, vocab, (expected, tp1_stats, _) = tiny_model
    results, stats, pids = _run_regimes(path, vocab, 2)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0  # the regimes happened
    assert stats.num_preemptions == tp1_stats.num_preemptions
    for ours_run, their_run in zip(results, expected, strict=True):
        for ours, theirs in zip(ours_run, their_run, strict=True):
            for (tokens, logprobs), (tp1_tokens, tp1_logprobs) in zip(ours, theirs, strict=True):
                assert tokens == tp1_tokens
                assert logprobs == pytest.approx(tp1_logprobs, abs=LOGPROB_ATOL)
    assert len(pids) == 1
    deadline = time.monotonic() + 10
    while _alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pids[0]), "shutdown left the worker running"


def test_models_that_do_not_split_are_refused_before_any_worker_starts():
    config = make_config("llama", num_attention_heads=9, num_key_value_heads=3,
                         hidden_size=576, intermediate_size=1536)  # SmolLM2-135M
    with pytest.raises(ValueError, match=r"num_attention_heads \(9\) must be divisible by "
                                         r"tensor_parallel_size \(2\)"):
        check_tensor_parallel(config, 2)
    check_tensor_parallel(config, 3)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        TensorParallel(0, 4).kv_heads(3)
    assert [TensorParallel(r, 4).kv_heads(2) for r in range(4)] == [(0, 1), (0, 1), (1, 1),
                                                                     (1, 1)]


@pytest.fixture(scope="module")
def tp_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tp_llama"), "llama")


def test_a_killed_worker_fails_the_generation_and_leaves_no_process(tp_dir):
    llm = LLM(model=str(tp_dir), skip_tokenizer_init=True, tensor_parallel_size=2)
    engine = llm.llm_engine
    worker = engine.executor.workers[0]
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7]}] * 4
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # it works first
    engine.add_request("victim", prompts[0], params)
    engine.step()
    os.kill(worker.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="worker 1 .* exited with code -9"):
        while engine.has_unfinished_requests():
            engine.step()
            assert time.monotonic() - started < 10, "the engine went on without its worker"
    assert engine.failure is not None
    # Every later call fails the same way, at once; nothing is left running.
    with pytest.raises(RuntimeError, match="executor failed"):
        llm.generate(prompts, params, use_tqdm=False)
    llm.shutdown()
    worker.join(5)
    assert not _alive(worker.pid)


def test_async_engine_turns_unhealthy_and_fails_streams_when_a_worker_dies(tp_dir):
    from pagedserve.engine.async_engine import AsyncEngine, EngineDeadError
    from pagedserve.engine.config import EngineConfig

    async def scenario():
        engine = AsyncEngine(EngineConfig(model=str(tp_dir), skip_tokenizer_init=True,
                                          tensor_parallel_size=2))
        worker = engine.engine.executor.workers[0]
        assert engine.is_healthy
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        stream = engine.generate("a", {"prompt_token_ids": [5, 6, 7]}, params)
        await anext(stream)  # it is running
        os.kill(worker.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="tensor-parallel"):
            async for _ in stream:
                pass
        while engine.is_healthy:
            assert time.monotonic() - started < 5, "still healthy without its worker"
            await asyncio.sleep(0.05)
        await engine.shutdown()
        assert not _alive(worker.pid)

    asyncio.run(scenario())


def test_async_engine_notices_a_worker_dying_while_idle(tp_dir):
    from pagedserve.engine.async_engine import AsyncEngine, EngineDeadError
    from pagedserve.engine.config import EngineConfig

    async def scenario():
        engine = AsyncEngine(EngineConfig(model=str(tp_dir), skip_tokenizer_init=True,
                                          tensor_parallel_size=2))
        worker = engine.engine.executor.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        started = time.monotonic()
        while engine.is_healthy:
            assert time.monotonic() - started < 5, "still healthy without its worker"
            await asyncio.sleep(0.05)
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("b", {"prompt_token_ids": [5]},
                                           SamplingParams(max_tokens=2)):
                pass
        await engine.shutdown()

    asyncio.run(scenario())


def test_an_engine_dropped_without_shutdown_frees_its_workers_and_its_group(tp_dir):
    """Garbage collection stops the workers (nothing else holds the executor: not its
    monitor thread) and destroys the process group, so another TP engine can start; one
    started beside a live one is refused before it touches the live one's group."""
    import gc
    import weakref

    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = [{"prompt_token_ids": [5, 6, 7]}]
    llm = LLM(model=str(tp_dir), skip_tokenizer_init=True, tensor_parallel_size=2)
    expected = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    worker, executor = llm.llm_engine.executor.workers[0], weakref.ref(llm.llm_engine.executor)
    del llm
    gc.collect()
    assert executor() is None, "something still holds the executor"
    worker.join(5)
    assert not _alive(worker.pid)
    again = LLM(model=str(tp_dir), skip_tokenizer_init=True, tensor_parallel_size=2)
    try:
        # A second one while this one lives is refused, and leaves this one working.
        with pytest.raises(RuntimeError, match="already running"):
            LLM(model=str(tp_dir), skip_tokenizer_init=True, tensor_parallel_size=2)
        assert again.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == expected
    finally:
        again.shutdown()


@pytest.mark.slow
def test_the_embedded_model_split_over_three_ranks_gives_the_same_greedy_text():
    """SmolLM2-135M has 9 query and 3 KV heads: it splits over 3 ranks, not 2 (see the
    refusal above). The exact path (fp32, dequantized): TP=1's tokens, logprobs within 1e-4."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    runs = []
    for size in (1, 3):
        llm = LLM(kv_cache_memory=64 << 20, quantization="none", tensor_parallel_size=size)
        try:
            runs.append(llm.generate(prompts, params, use_tqdm=False))
        finally:
            llm.shutdown()
    for tp1, tp3 in zip(*runs, strict=True):
        assert tp3.outputs[0].text == tp1.outputs[0].text
        assert tp3.outputs[0].token_ids == tp1.outputs[0].token_ids
        assert _tokens_and_logprobs([tp3])[0][0][1] == pytest.approx(
            _tokens_and_logprobs([tp1])[0][0][1], abs=LOGPROB_ATOL)


def test_a_checkpoint_that_fails_to_load_raises_and_leaves_no_worker(tmp_path):
    import json

    path = build_tiny_model(tmp_path / "broken", "llama")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 256  # the weights are 128 wide: every rank's load fails
    (path / "config.json").write_text(json.dumps(config))
    children_before = set(_children())
    with pytest.raises(ValueError, match="checkpoint shape"):
        LLM(model=str(path), skip_tokenizer_init=True, tensor_parallel_size=2)
    deadline = time.monotonic() + 10
    while set(_children()) - children_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(_children()) - children_before, "a worker outlived the failed start"


def _children() -> list[int]:
    """This process's live spawned children (Linux), multiprocessing's resource tracker
    left out: it lives as long as this process."""
    pids = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    spawned = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    spawned.append(pid)
        except FileNotFoundError:
            pass
    return spawned
