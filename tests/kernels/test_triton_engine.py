"""The engine with the Triton backend forced (the interpreter on CPU) gives the torch
backend's greedy tokens on a tiny random model: mixed batches, chunked prefill, prefix hits."""

import random

import pytest

from engine import LLM, SamplingParams
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch, num_kv_heads", [("llama", 2), ("qwen3", 1)])
def test_triton_backend_matches_torch_backend(tmp_path, arch, num_kv_heads):
    # qwen3's tiny config has head_dim 32 (not hidden / heads) and q/k norms.
    path = build_tiny_model(tmp_path / arch, arch, num_hidden_layers=1, intermediate_size=64,
                            num_key_value_heads=num_kv_heads)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (1, 5, 17, 33, 12)]
    prompts.append(prompts[3][:20] + [7, 8])  # a prefix-cache hit mid-prompt
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(model=str(path), skip_tokenizer_init=True, attention_backend=backend,
                  block_size=16, max_num_batched_tokens=24, max_num_seqs=4)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outputs[backend] = [o.outputs[0].token_ids for o in outs]
    assert outputs["triton"] == outputs["torch"]
