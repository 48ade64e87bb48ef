"""Tiny random-weight checkpoints built with transformers' own config classes, saved as HF
directories, so tests compare our engine with transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SHAPES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
    # Large init makes logits peaked, so greedy argmax is not decided by float noise.
    initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def make_config(arch: str, **overrides):
    import transformers

    shapes = dict(TINY_SHAPES, **overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**shapes)
    if arch == "mistral":
        return transformers.MistralConfig(**{"sliding_window": None, **shapes})
    if arch == "qwen2":
        return transformers.Qwen2Config(**shapes)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=32, **shapes)
    raise ValueError(arch)


def build_tiny_model(path: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Save a random-weight model of `arch` to `path` (safetensors) and return the path."""
    import transformers

    config = make_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(path)
    return path


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int):
    """HF transformers' greedy tokens and per-step logprobs, one prompt at a time (no padding)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # compare full lengths; we use ignore_eos
    results = []
    for prompt in prompts:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            )
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                    for step, t in zip(out.logits, tokens)]
        results.append((tokens, logprobs))
    return results


def build_thinking_tokenizer(path: Path) -> tuple[Path, int, int]:
    """The embedded model's tokenizer with <think> and </think> added as single tokens (not
    special: kept in decoded text, as Qwen3's are), saved to `path`: (path, start id, end
    id). A tiny model for it needs vocab_size=end id + 1."""
    from transformers import AutoTokenizer

    from pagedserve.engine.loader.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.save_pretrained(path)
    start, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    return path, start, end
