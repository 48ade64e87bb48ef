"""The embedded SmolLM2-135M-Instruct (Q4_1 GGUF) through our engine against HF
transformers loading the same GGUF file: the exact path (quantization none, fp32) gives
HF's tokens; the default path serves the file's own 4-bit weights."""

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams
from pagedserve.engine.loader.default_model import default_model_path

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def exact_llm():
    return LLM(kv_cache_memory=256 << 20, quantization="none")


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory=256 << 20)


@pytest.fixture(scope="module")
def hf_greedy(exact_llm):
    import transformers

    gguf = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    tokenizer = exact_llm.get_tokenizer()
    results = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.pad_token_id)
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item()
                    for s, t in zip(out.logits, tokens)]
        results.append((ids[0].tolist(), tokens, logprobs))
    return results


def test_greedy_matches_hf_on_gguf(exact_llm, hf_greedy):
    llm = exact_llm
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out, (prompt_ids, tokens, logprobs) in zip(outputs, hf_greedy, strict=True):
        assert out.prompt_token_ids == prompt_ids
        assert out.outputs[0].token_ids == tokens
        ours = [next(iter(lp.values())) for lp in out.outputs[0].logprobs]
        assert ours == pytest.approx(logprobs, abs=5e-3)
        assert out.outputs[0].text == llm.get_tokenizer().decode(tokens)


def test_chat_knows_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    completion = out[0].outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"  # ended by <|im_end|>, not by length
    assert "<|im_end|>" not in completion.text


def test_stop_string_and_streaming_text(llm):
    params = SamplingParams(temperature=0, max_tokens=24, stop=["Paris"])
    out = llm.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0]
    assert "Paris" not in out.text
    assert out.finish_reason == "stop" and out.stop_reason == "Paris"


def test_logprobs_carry_decoded_tokens(llm):
    """Logprob.decoded_token is each token's own text, for sampled, top-k and prompt
    entries alike (as vLLM fills it)."""
    tokenizer = llm.llm_engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    out = llm.generate(["The capital of France is"], params, use_tqdm=False)[0]
    entries = [e for e in out.outputs[0].logprobs] + [e for e in out.prompt_logprobs if e]
    assert len(entries) > 4
    for entry in entries:
        for token_id, logprob in entry.items():
            assert logprob.decoded_token == tokenizer.decode([token_id])
    assert "".join(next(iter(e.values())).decoded_token
                   for e in out.outputs[0].logprobs) == out.outputs[0].text
