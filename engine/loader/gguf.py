"""Convert a llama.cpp GGUF file into a HuggingFace-format directory (fp32 safetensors,
config, tokenizer with chat template, generation config), the only format the engine loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from tqdm.auto import tqdm

from pagedserve.engine.loader import TENSOR_TYPES_FILE

logger = logging.getLogger(__name__)

# Bump when the output of the conversion changes, so caches keyed on it are rebuilt.
CONVERTER_VERSION = 2


@dataclass(frozen=True, slots=True)
class _ArchSpec:
    config_class: str  # name in `transformers`
    hf_architecture: str
    # llama.cpp permutes Q/K rows of "llama" models for its interleaved RoPE; the
    # NeoX-RoPE families (qwen2, qwen3) are stored unpermuted.
    permuted_qk: bool
    has_head_dim: bool  # whether the config class takes `head_dim`


_ARCHS: dict[str, _ArchSpec] = {
    # Mistral 7B GGUFs also use "llama": same weights layout, loaded as Llama.
    "llama": _ArchSpec("LlamaConfig", "LlamaForCausalLM", permuted_qk=True, has_head_dim=True),
    "qwen2": _ArchSpec("Qwen2Config", "Qwen2ForCausalLM", permuted_qk=False, has_head_dim=False),
    "qwen3": _ArchSpec("Qwen3Config", "Qwen3ForCausalLM", permuted_qk=False, has_head_dim=True),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Consumed into the config (llama3 RoPE scaling), not a model weight.
_ROPE_FREQS = "rope_freqs.weight"


def hf_tensor_name(gguf_name: str) -> str:
    """HF parameter name of a GGUF tensor name, e.g. blk.3.attn_q.weight ->
    model.layers.3.self_attn.q_proj.weight."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, kind, suffix = m.groups()
        if kind in _BLOCK_TENSORS:
            return f"model.layers.{layer}.{_BLOCK_TENSORS[kind]}.{suffix}"
    else:
        stem, _, suffix = gguf_name.rpartition(".")
        if stem in _GLOBAL_TENSORS and suffix in ("weight", "bias"):
            return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no HF equivalent in pagedserve's converter; supported "
        f"are {sorted(_GLOBAL_TENSORS)} and blk.N.{{{','.join(_BLOCK_TENSORS)}}}.weight/bias"
    )


def undo_llama_qk_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(weights, n_head, n_head_kv)` of Q/K rows
    (convert_hf_to_gguf.py), for a [n_head * head_dim, ...] weight or bias; pass the
    number of KV heads for K."""
    rows = weights.shape[0]
    if rows % (2 * n_head) != 0:
        raise ValueError(
            f"cannot un-permute a Q/K tensor with {rows} rows over {n_head} heads: "
            "rows must be a multiple of 2 * n_head"
        )
    # llama.cpp views each head's rows as [2, head_dim/2] and transposes to [head_dim/2, 2]
    # (rotary pairs interleaved); view them as [head_dim/2, 2] and transpose back.
    w = weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)


def dequantize_tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """Dequantize one GGUF tensor to float32 in PyTorch orientation: the numpy shape is the
    GGUF `shape` field reversed, e.g. [out_features, in_features] for a linear weight."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf "
            f"package ({getattr(gguf, '__version__', 'installed version')}) cannot dequantize"
        ) from e
    values = np.asarray(values, dtype=np.float32)
    if values.size != math.prod(shape):
        raise ValueError(
            f"GGUF tensor {tensor.name!r}: dequantized {values.size} values, "
            f"expected {math.prod(shape)} for shape {list(shape)}"
        )
    return values.reshape(shape)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(value: Any) -> float:
    # GGUF stores floats as float32; take the shortest decimal that rounds to it, so
    # 1e-5 comes back as 1e-05 rather than 9.999999747378752e-06, as in the HF original.
    return float(str(np.float32(value)))


def _required(reader: gguf.GGUFReader, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF metadata key {key!r} is missing; cannot build the model config")
    return value


def _llama3_rope_factors(
    theta: float, head_dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    # Same formula llama.cpp's converter used to produce the rope_freqs tensor.
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def _rope_parameters(
    reader: gguf.GGUFReader, arch: str, head_dim: int, rope_freqs: np.ndarray | None
) -> dict[str, Any]:
    theta = _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if scaling is None and _field(reader, f"{arch}.rope.scale_linear") is not None:
        scaling, factor = "linear", _field(reader, f"{arch}.rope.scale_linear")  # old GGUFs
    if scaling == "linear" and factor not in (None, 1.0):
        params.update(rope_type="linear", factor=_f32(factor))
    elif scaling == "yarn":
        params.update(rope_type="yarn", factor=_f32(factor))
        if original is not None:
            params["original_max_position_embeddings"] = int(original)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (v := _field(reader, f"{arch}.rope.scaling.{gguf_key}")) is not None:
                params[hf_key] = _f32(v)
    elif scaling not in (None, "none", "linear"):
        raise ValueError(
            f"GGUF RoPE scaling type {scaling!r} is not supported; supported: none, linear, yarn"
        )
    if rope_freqs is not None:
        # Llama 3.1+ GGUFs store llama3 RoPE scaling only as per-frequency factors; recover
        # the HF parameters by matching Meta's published settings.
        factor = _f32(rope_freqs.max())
        want = _llama3_rope_factors(theta, head_dim, factor, 1.0, 4.0, 8192)
        if want.shape != rope_freqs.shape or not np.allclose(want, rope_freqs, rtol=1e-4):
            raise ValueError(
                "GGUF tensor rope_freqs.weight does not match llama3 RoPE scaling with "
                f"factor={factor}, low_freq_factor=1, high_freq_factor=4, "
                "original_max_position_embeddings=8192; other RoPE factor tensors are unsupported"
            )
        params.update(
            rope_type="llama3",
            factor=factor,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
    return params


def _build_config(reader: gguf.GGUFReader, arch: str, shapes: dict[str, tuple[int, ...]]):
    import transformers

    spec = _ARCHS[arch]
    hidden = int(_required(reader, f"{arch}.embedding_length"))
    n_head = int(_required(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
    rope_freqs = None
    if _ROPE_FREQS in shapes:
        tensor = next(t for t in reader.tensors if t.name == _ROPE_FREQS)
        rope_freqs = dequantize_tensor(tensor)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    kwargs: dict[str, Any] = dict(
        architectures=[spec.hf_architecture],
        vocab_size=shapes["token_embd.weight"][0],
        hidden_size=hidden,
        intermediate_size=int(_required(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_required(reader, f"{arch}.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        max_position_embeddings=int(_required(reader, f"{arch}.context_length")),
        rms_norm_eps=_f32(_required(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_parameters=_rope_parameters(reader, arch, head_dim, rope_freqs),
        tie_word_embeddings="output.weight" not in shapes,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
        dtype="float32",
    )
    if spec.has_head_dim:
        kwargs["head_dim"] = head_dim
    elif head_dim != hidden // n_head:
        raise ValueError(
            f"GGUF {arch} model has head_dim {head_dim} != hidden_size / num_heads "
            f"({hidden} / {n_head}), which {spec.config_class} cannot express"
        )
    if arch in ("llama", "qwen3"):
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in shapes
    q_rows = shapes.get("blk.0.attn_q.weight", (n_head * head_dim,))[0]
    if q_rows != n_head * head_dim:
        raise ValueError(
            f"GGUF metadata says {n_head} heads of dim {head_dim}, but blk.0.attn_q.weight has "
            f"{q_rows} rows"
        )
    return getattr(transformers, spec.config_class)(**kwargs)


def _write_safetensors_f32(
    path: pathlib.Path, entries: list[tuple[str, tuple[int, ...]]], arrays: Iterator[np.ndarray]
) -> None:
    # A hand-written safetensors file (the format is a JSON header plus raw little-endian
    # data) lets tensors be streamed one at a time instead of holding the fp32 model in RAM.
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = 4 * math.prod(shape)
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for (name, shape), array in zip(entries, arrays, strict=True):
            if array.shape != shape:
                raise AssertionError(f"{name}: shape {array.shape} != header shape {shape}")
            f.write(np.ascontiguousarray(array, dtype="<f4").data)


def _save_tokenizer(reader: gguf.GGUFReader, gguf_path: pathlib.Path, out_dir: pathlib.Path):
    import transformers

    # transformers prefers tokenizer.json etc. lying next to the GGUF over the GGUF itself,
    # so show it a directory that holds nothing but (a link to) the file.
    with tempfile.TemporaryDirectory(dir=out_dir) as staging:
        source_dir, name = gguf_path.parent, gguf_path.name
        try:
            os.symlink(gguf_path, os.path.join(staging, name))
            source_dir = pathlib.Path(staging)
        except OSError:
            logger.debug("cannot symlink %s; loading its tokenizer in place", gguf_path)
        # Not AutoTokenizer: it also parses the whole GGUF into a model config (seconds) only
        # to pick this same class.
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(
            str(source_dir), gguf_file=name, local_files_only=True
        )
    template = _field(reader, "tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        logger.warning(
            "%s has no chat template (a base model?): chat requests will fail", gguf_path
        )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _save_generation_config(reader: gguf.GGUFReader, out_dir: pathlib.Path) -> None:
    import transformers

    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    bos, pad = (
        _field(reader, "tokenizer.ggml.bos_token_id"),
        _field(reader, "tokenizer.ggml.padding_token_id"),
    )
    config = transformers.GenerationConfig(
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        pad_token_id=None if pad is None else int(pad),
    )
    config.save_pretrained(str(out_dir))


def _convert_into(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHS)}"
        )
    if int(_field(reader, "split.count", 1)) > 1:
        raise ValueError(
            f"{gguf_path} is one part of a split GGUF; merge the parts first "
            "(llama.cpp's `llama-gguf-split --merge`)"
        )
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{gguf_path} has no token_embd.weight tensor")

    config = _build_config(reader, arch, shapes)
    config.save_pretrained(str(out_dir))

    tensors = [t for t in reader.tensors if t.name != _ROPE_FREQS]
    entries = [(hf_tensor_name(t.name), shapes[t.name]) for t in tensors]
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

    def weights() -> Iterator[np.ndarray]:
        for tensor in tqdm(tensors, desc="Dequantizing GGUF tensors", unit="tensor", disable=None):
            array = dequantize_tensor(tensor)
            kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
            if _ARCHS[arch].permuted_qk and kind in heads:
                array = undo_llama_qk_permute(array, heads[kind])
            yield array

    _write_safetensors_f32(out_dir / "model.safetensors", entries, weights())
    types = {hf_tensor_name(t.name): t.tensor_type.name for t in tensors}
    (out_dir / TENSOR_TYPES_FILE).write_text(json.dumps(types, indent=1) + "\n")
    _save_tokenizer(reader, gguf_path, out_dir)
    _save_generation_config(reader, out_dir)


def convert_gguf_to_hf_dir(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert `gguf_path` into a new HF directory `out_dir` (which must not exist).

    The directory is built beside `out_dir` and renamed into place, so `out_dir` either
    appears complete or not at all; if another process created it first, FileExistsError.
    """
    gguf_path = pathlib.Path(gguf_path).resolve()
    out_dir = pathlib.Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    if out_dir.exists():
        raise FileExistsError(f"output directory {str(out_dir)!r} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    logger.info("Converting GGUF %s to a HF directory at %s", gguf_path, out_dir)
    try:
        _convert_into(gguf_path, staging)
        staging.chmod(0o755)  # mkdtemp makes it owner-only
        try:
            os.rename(staging, out_dir)
        except OSError as e:
            if out_dir.exists():
                raise FileExistsError(
                    f"output directory {str(out_dir)!r} was created by someone else meanwhile"
                ) from e
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Converted %s -> %s", gguf_path.name, out_dir)
