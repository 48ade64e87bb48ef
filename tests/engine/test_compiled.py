"""The compiled CPU forward (engine/compiled.py) against the eager one on a quantized tiny
GGUF, in each row regime it has a graph for, and when it is used at all."""

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
    reason="torch without packed int4 CPU kernels")


@pytest.fixture(scope="module")
def q4_1_gguf(tmp_path_factory):
    import gguf

    from tests.engine.test_gguf_loader import tiny_model, write_tiny_gguf

    arch, model = tiny_model("llama")
    path = tmp_path_factory.mktemp("compiled") / "tiny-q4_1.gguf"
    write_tiny_gguf(path, arch, model, gguf.GGMLQuantizationType.Q4_1)
    return path


def _engine(path, **kwargs):
    return LLM(model=str(path), kv_cache_memory=16 << 20, max_num_batched_tokens=256,
               enable_prefix_caching=False, **kwargs)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def test_the_compiled_forward_matches_the_eager_one(q4_1_gguf):
    """One prompt (the 1-row graph, attention inside it), 5 (the dynamic graph up to the
    layers' max_packed_rows), 12 (the same graph with our int4 kernel, the one beyond with
    torch's) and their prefill of 516 tokens in steps of up to 256 (the one beyond): the
    same greedy tokens, except where the eager path's two best tokens are a near tie, and
    close logprobs."""
    compiled, eager = _engine(q4_1_gguf), _engine(q4_1_gguf, enforce_eager=True)
    assert compiled.llm_engine.model_runner.compiled is not None
    assert eager.llm_engine.model_runner.compiled is None
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=2, prompt_logprobs=0,
                            ignore_eos=True)
    prompts = [{"prompt_token_ids": [1, *range(10 + 7 * i, 30 + 11 * i)]} for i in range(12)]
    # A one-token prompt: its prefill is a one-token step with no context (run eagerly).
    for batch in (prompts[:1], [{"prompt_token_ids": [7]}], prompts[:5], prompts):
        ours = compiled.generate(batch, params, use_tqdm=False)
        ref = eager.generate(batch, params, use_tqdm=False)
        for a, b in zip(ours, ref):
            prompt_a = [next(iter(e.values())).logprob for e in a.prompt_logprobs[1:]]
            prompt_b = [next(iter(e.values())).logprob for e in b.prompt_logprobs[1:]]
            assert prompt_a == pytest.approx(prompt_b, abs=0.02)
            tokens_a, tokens_b = a.outputs[0].token_ids, b.outputs[0].token_ids
            agree = _first_difference(tokens_a, tokens_b)
            if agree is not None:
                top2 = sorted((e.logprob for e in b.outputs[0].logprobs[agree].values()),
                              reverse=True)[:2]
                assert top2[0] - top2[1] < 0.05, (len(batch), tokens_a, tokens_b)
            else:
                agree = len(tokens_b)
            logprobs_a = [a.outputs[0].logprobs[i][t].logprob for i, t in
                          enumerate(tokens_a[:agree])]
            logprobs_b = [b.outputs[0].logprobs[i][t].logprob for i, t in
                          enumerate(tokens_b[:agree])]
            assert logprobs_a == pytest.approx(logprobs_b, abs=0.02)
    # The warm-up compiled every graph these steps needed.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_only_the_quantized_cpu_path_is_compiled(q4_1_gguf):
    """The exact fp32 path stays eager: fused loops would round differently from HF."""
    assert _engine(q4_1_gguf, quantization="none").llm_engine.model_runner.compiled is None


def test_inductor_caches_under_the_user_cache_dir(monkeypatch, tmp_path):
    from pagedserve.engine.compiled import use_inductor_cache_dir
    from pagedserve.kernels import cpu_extension, cpu_int4_linear

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    ours = str(tmp_path / "inductor" / f"kernels-{cpu_extension.source_hash()}")
    assert use_inductor_cache_dir() == ours
    # Graphs compiled around other versions of our operators are not reused.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr(cpu_int4_linear, "SOURCE", cpu_int4_linear.SOURCE + "// changed\n")
    assert use_inductor_cache_dir() != ours
    monkeypatch.undo()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert use_inductor_cache_dir() == "/elsewhere"
    # What importing torch._dynamo leaves there (inductor's /tmp default) is not a choice.
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    cache_dir()
    assert use_inductor_cache_dir() == ours


def test_a_failed_compile_falls_back_to_eager(q4_1_gguf, monkeypatch):
    """No C++ compiler (or an inductor bug) must not keep the engine from serving."""
    from pagedserve.engine.compiled import CompiledForward

    def fail(self, dummy_step, max_rows):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(CompiledForward, "warm_up", fail)
    llm = _engine(q4_1_gguf)
    assert llm.llm_engine.model_runner.compiled is None
    out = llm.generate([{"prompt_token_ids": [1, 5, 9]}], SamplingParams(max_tokens=3),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
