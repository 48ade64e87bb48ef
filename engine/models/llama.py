"""The Llama family in one file: Llama 2/3, SmolLM2, TinyLlama, Mistral (sliding window),
Qwen2 (qkv bias) and Qwen3 (per-head q/k RMSNorm). Attention goes through the engine's paged
backend."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.engine.attention import AttentionMetadata, SingleDecode, attend
from pagedserve.engine.distributed import SINGLE, TensorParallel, shard_checkpoint_tensor
from pagedserve.engine.models.mkl_packed import pack_linears, pack_weight, packed_linear
from pagedserve.engine.models.quantized import RefinedHead, quantize_linear

# scheme_of(checkpoint tensor names a layer holds) -> (scheme, int4 recovery), or None to
# keep the layer dense.
SchemeOf = Callable[[list[str]], "tuple[str, str | None] | None"]


class RMSNorm(nn.Module):
    """RMSNorm, optionally with the residual add folded in: norm(x, residual) returns
    (norm(x + residual), x + residual), so the GPU path does both in one kernel."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = None  # kernels.fused_ops.fused_add_rms_norm, set on GPU

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.kernel is not None:
            shape = x.shape
            out = self.kernel(x.reshape(-1, shape[-1]), residual, self.weight, self.eps)
            return out.view(shape) if residual is None else (out, residual)
        if residual is not None:
            x = residual = x + residual
        # HF's order (normalise in fp32, cast back, then scale), in one fused op.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        out = self.weight * normed.to(x.dtype)
        return out if residual is None else (out, residual)


def rope_parameters(config) -> dict:
    """RoPE settings from a transformers config of either the 4.x or the 5.x style."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = rope_type
    return params


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a precomputed cos/sin cache indexed by position."""

    def __init__(self, config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.config, self.head_dim, self.max_positions = config, head_dim, max_positions
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.kernel = None  # kernels.fused_ops.rotary_embedding, set on GPU
        if self.cos.device.type != "meta":
            self.build_cache()

    def build_cache(self) -> None:
        """Fill the cos/sin tables [max_positions, head_dim] in fp32, exactly as HF does."""
        params = rope_parameters(self.config)
        if params["rope_type"] == "default":
            dim = self.head_dim
            exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
        else:
            # transformers owns the zoo of scaling rules (llama3, yarn, linear, ...).
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if params["rope_type"] not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"unsupported rope_type {params['rope_type']!r}")
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](self.config, "cpu")
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :].float()
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * scaling).to(self.cos.device)
        self.sin = (emb.sin() * scaling).to(self.sin.device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> StepRope:
        """The step's rotation, prepared once and used by every layer."""
        if self.kernel is not None:  # the kernel looks cos/sin up itself
            return StepRope(self.cos, self.sin, positions, self.kernel)
        return StepRope(self.cos[positions].to(dtype)[:, None, :],
                        self.sin[positions].to(dtype)[:, None, :])


@dataclass(slots=True)
class StepRope:
    """cos, sin [T, 1, D] of the step's positions; or, with a kernel (GPU), the whole
    [max_positions, D] tables and the positions, for kernels.fused_ops.rotary_embedding."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None = None
    kernel: object = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, D]; the kernel rotates in place."""
        if self.kernel is not None:
            return self.kernel(x, self.positions, self.cos, self.sin)
        x1, x2 = x.chunk(2, dim=-1)
        return x * self.cos + torch.cat([-x2, x1], dim=-1) * self.sin


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The layer's sliding window as HF applies it: per `layer_types` where the config has
    them (Qwen2/3: "sliding_attention" layers), else the config's sliding_window on every
    layer (Mistral); None for full attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None
                          and layer_types[layer_idx] != "sliding_attention"):
        return None
    return int(window)


class Attention(nn.Module):
    """Under tensor parallelism: this rank's query and KV heads (column-parallel QKV), and
    o_proj over their features (row-parallel), summed over the ranks."""

    def __init__(self, config, layer_idx: int, backend, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.num_heads = tp.split(total_heads, "num_attention_heads")
        self.num_kv_heads = tp.kv_heads(total_kv_heads)[1]
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.sliding_window = layer_sliding_window(config, layer_idx)
        self.backend = backend

    def forward(self, rope, x: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata | SingleDecode | None) -> torch.Tensor:
        num_tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        # Queries and keys rotate together: one set of elementwise ops instead of two.
        q, k = rope.apply(qk).split([self.num_heads, self.num_kv_heads], dim=1)
        out = attend(self.backend, q, k, v, kv_cache, md, self.scale, self.sliding_window)
        return self.tp.all_reduce(self.o_proj(out.reshape(num_tokens, self.q_size)))


class MLP(nn.Module):
    """Under tensor parallelism: this rank's intermediate features, summed over the ranks."""

    def __init__(self, config, tp: TensorParallel) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; the Llama family uses 'silu'")
        self.tp = tp
        self.intermediate_size = tp.split(config.intermediate_size, "intermediate_size")
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))


class VocabParallelEmbedding(nn.Embedding):
    """The embedding, its vocabulary divided among the ranks (TensorParallel.vocab_rows):
    each looks up the ids it holds, zeros the others, and the all-reduce fills them in."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        first_row, rows = tp.vocab_rows(vocab_size)
        super().__init__(rows, hidden_size)
        self.first_row, self.tp = first_row, tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.first_row
        elsewhere = (local < 0) | (local >= self.num_embeddings)
        x = super().forward(local.masked_fill(elsewhere, 0))
        return self.tp.all_reduce(x.masked_fill_(elsewhere[:, None], 0))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, backend, qkv_bias, o_bias, qk_norm,
                 tp: TensorParallel) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, backend, qkv_bias, o_bias, qk_norm, tp)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope, x, residual, kv_cache, md):
        """Returns (the MLP's output, the residual stream before it is added): the add
        happens in the next norm, which fuses it on GPU."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(rope, h, kv_cache, md)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


# checkpoint name -> (our fused parameter, shard index)
_STACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    qkv_bias = False  # True: q/k/v always have a bias (Qwen2), whatever attention_bias says
    o_bias_follows_config = True  # o_proj has a bias when config.attention_bias is set
    qk_norm = False

    def __init__(self, config, backend, max_positions: int,
                 tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        head_dim = (getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        self.rotary = RotaryEmbedding(config, head_dim, max_positions)
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = self.qkv_bias or attention_bias
        o_bias = self.o_bias_follows_config and attention_bias
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, backend, qkv_bias, o_bias, self.qk_norm, tp)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.packed_embedding: torch.Tensor | None = None  # tied head, packed by pack_for_cpu
        self.refined_head: RefinedHead | None = None  # set by quantize()
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            # This rank's rows of the vocabulary, as the embedding's.
            self.lm_head = nn.Linear(config.hidden_size, self.embed_tokens.num_embeddings,
                                     bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor],
                md: AttentionMetadata | SingleDecode | None) -> torch.Tensor:
        """input_ids, positions: [num_tokens]. Returns final hidden states [num_tokens, hidden].
        md None: the metadata of the compiled step in progress (attention.compiled_step);
        a SingleDecode: a one-token step attending inside the compiled graph."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(rope, x, residual, kv_cache, md)
        return self.norm(x, residual)[0]

    def use_triton_kernels(self) -> None:
        """GPU: fused residual-add + RMSNorm and in-place rotary (kernels.fused_ops)."""
        from pagedserve.kernels.fused_ops import fused_add_rms_norm, rotary_embedding

        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.kernel = fused_add_rms_norm
        self.rotary.kernel = rotary_embedding

    def compute_logits(self, hidden: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        """fp32 logits [rows, vocab_size]; under tensor parallelism every rank gets them all.
        argmax_only: the caller reads only each row's best token (a refined head may then
        take a faster pass whose other logits are further off)."""
        if self.refined_head is not None:
            logits = self.refined_head(hidden, argmax_only)
        elif self.lm_head is not None:
            logits = self.lm_head(hidden).float()
        else:
            logits = packed_linear(hidden, self.embed_tokens.weight,
                                   self.packed_embedding).float()
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits)[:, :self.config.vocab_size]

    def pack_for_cpu(self) -> None:
        """Pre-pack fp32 GEMM weights for MKL (see mkl_packed); a no-op elsewhere."""
        if pack_linears(self) and self.lm_head is None and self.refined_head is None:
            self.packed_embedding = pack_weight(self.embed_tokens.weight)

    def quantize(self, scheme_of: SchemeOf, dense_copy: bool,
                 dense_dtype: torch.dtype = torch.bfloat16) -> int:
        """Swap linear layers for weight-only quantized ones where scheme_of names a scheme;
        returns how many were swapped. The embedding stays dense, and the head computes
        on an int8 copy (int4 where only the best token is read) with its best candidates
        refined from the dense weight (RefinedHead), once any layer is quantized."""
        fused_from = {}
        for ckpt_name, (fused, _) in _STACKED.items():
            fused_from.setdefault(fused, []).append(ckpt_name)
        swaps = []
        for parent_name, parent in self.named_modules():
            for name, child in parent.named_children():
                if not isinstance(child, nn.Linear):
                    continue
                full = f"{parent_name}.{name}" if parent_name else name
                prefix = "" if full == "lm_head" else "model."
                stems = [full[:-len(name)] + part for part in fused_from.get(name, [name])]
                choice = scheme_of([f"{prefix}{stem}.weight" for stem in stems])
                if choice is not None:
                    swaps.append((parent, name, child, choice))
        for parent, name, child, (scheme, recovery) in swaps:
            setattr(parent, name, quantize_linear(child.weight, child.bias, scheme, recovery,
                                                  dense_copy, dense_dtype))
        if swaps:
            head = self.embed_tokens if self.lm_head is None else self.lm_head
            if getattr(head, "bias", None) is None:
                self.refined_head = RefinedHead(head.weight.detach().float(), dense_copy,
                                                dense_dtype=dense_dtype)
        return len(swaps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into our (partly fused) parameters; every parameter must
        be covered exactly, so a mismatched checkpoint fails loudly instead of running."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            tensor = shard_checkpoint_tensor(name, tensor, self.tp, self.config)
            target, shard = name, None
            for ckpt_name, (fused, index) in _STACKED.items():
                if f".{ckpt_name}." in name:
                    target, shard = name.replace(ckpt_name, fused), index
                    break
            if target not in params:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            if shard is None:
                _copy(param.data, tensor, name)
            else:
                _copy(self._shard(target, param, shard), tensor, name)
            loaded.add(target)
        missing = [n for n in params if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing tensors for: {missing[:8]}")

    def _shard(self, name: str, param: torch.Tensor, index: int) -> torch.Tensor:
        attn = self.layers[0].self_attn
        if "qkv_proj" in name:
            sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        else:
            sizes = [self.layers[0].mlp.intermediate_size] * 2
        start = sum(sizes[:index])
        return param.data.narrow(0, start, sizes[index])


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"tensor {name!r}: checkpoint shape {tuple(src.shape)}, "
                         f"model expects {tuple(dst.shape)}")
    dst.copy_(src)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_bias_follows_config = False


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
