"""The engine with the Triton backend forced (the interpreter on CPU) gives the torch
backend's greedy tokens on a tiny random model: mixed batches, chunked prefill, prefix hits."""

import random

import pytest

from pagedserve.engine import LLM, SamplingParams
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch, num_kv_heads, extra", [
    ("llama", 2, {}),
    ("qwen3", 1, {}),  # head_dim 32 (not hidden / heads) and q/k norms
    ("mistral", 2, dict(sliding_window=10)),  # windows cut into prompts and decodes
])
def test_triton_backend_matches_torch_backend(tmp_path, arch, num_kv_heads, extra):
    path = build_tiny_model(tmp_path / arch, arch, num_hidden_layers=1, intermediate_size=64,
                            num_key_value_heads=num_kv_heads, **extra)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (1, 5, 17, 33, 12)]
    prompts.append(prompts[3][:20] + [7, 8])  # a prefix-cache hit mid-prompt
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        # fp32 and eager on a GPU too: tokens must agree exactly, not within bf16 noise.
        llm = LLM(model=str(path), skip_tokenizer_init=True, attention_backend=backend,
                  block_size=16, max_num_batched_tokens=24, max_num_seqs=4, dtype="float32",
                  enforce_eager=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outputs[backend] = [o.outputs[0].token_ids for o in outs]
    assert outputs["triton"] == outputs["torch"]


class _EagerReplay:
    """Stands in for a captured CUDA graph on CPU: a replay reruns the recorded forward over
    the runner's static buffers, so padding and buffer handling are what is tested."""

    def __init__(self, runner, batch_size):
        self.runner, self.batch_size = runner, batch_size

    def replay(self):
        self.runner.outputs[self.batch_size] = self.runner.forward(self.batch_size)


def test_padded_decode_through_graph_buffers_matches_eager(tmp_path):
    """Decode batches padded up to the captured sizes (padding rows: empty context, slot
    -1) through the static buffers give the eager engine's tokens; with max_model_len
    deciding the split count, small decode batches take the split-KV kernels."""
    from pagedserve.engine.cuda_graph import CudaGraphRunner, capture_sizes

    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    path = build_tiny_model(tmp_path / "llama", "llama", num_hidden_layers=1,
                            intermediate_size=64)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (3, 40, 17, 9, 70)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outputs = []
    for use_graph_buffers in (False, True):
        llm = LLM(model=str(path), skip_tokenizer_init=True, attention_backend="triton",
                  max_num_seqs=8, dtype="float32", enforce_eager=True)
        runner = llm.llm_engine.model_runner
        if use_graph_buffers:
            graphs = CudaGraphRunner(runner.model, runner.attn_backend, runner.kv_caches,
                                     max_num_seqs=8, max_model_len=runner.max_model_len,
                                     block_size=runner.block_size, device=runner.device)
            graphs.graphs = {b: _EagerReplay(graphs, b) for b in graphs.sizes}
            assert graphs._metadata(5).backend_state > 1  # split-KV at max_model_len
            runner.cuda_graphs = graphs
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outputs.append([o.outputs[0].token_ids for o in outs])
    assert outputs[1] == outputs[0]
