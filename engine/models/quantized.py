"""Quantized linear layers for CPUs, on packed kernels: ours for int4 where the CPU has
AVX512-VNNI, torch's otherwise.

int4: groups of 32 input features share a scale and a zero, `w = (q - 8) * scale + zero`
with q in 0..15. GGUF's Q4_1 (`d * q + m`) is carried as scale d, zero m + 8d; Q4_0
(`d * (q - 8)`) as scale d, zero 0. Our kernel (kernels/cpu_int4_linear.py) keeps d and
m in fp16, as GGUF does, and takes the activations as two int8 parts up to 32 rows (exact
up to fp32 summation), as one beyond (llama.cpp's rounding); torch's
(`aten._weight_int4pack_mm_for_cpu`) keeps scale and zero in bf16 and computes in bf16.
int8: one scale per output row, `w = q * scale` with q in -127..127
(`aten._weight_int8pack_mm`, bf16); GGUF's Q8_0 (a scale per 32) is re-scaled per row.

torch's kernels (their fp32 paths are reference loops, 20x slower) are fast for few rows
only: they dequantize per row, so their cost grows with the batch. Beyond
`PACKED_MAX_ROWS` rows (prefill, big decode batches) a dense copy of the dequantized
weight, when kept, is several times faster: bf16 with AVX512-BF16, fp32 without it. Ours
stays ahead of that copy up to `VNNI_MAX_ROWS`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.engine.models.mkl_packed import mkl_packing_available, pack_weight, packed_linear
from pagedserve.kernels import cpu_int4_linear

logger = logging.getLogger(__name__)

INT4_GROUP = 32
# Rows up to which the packed kernels beat a dense bf16 GEMM (2-core Xeon, AVX-512 BF16:
# at 8 rows they are even, at 16 the dense GEMM is 2x faster: benchmarks/results/
# quantized_linear_cpu.md).
PACKED_MAX_ROWS = 8
# The same for our int4 kernel (kernels/cpu_int4_linear.py): 2-5x faster than the dense bf16
# GEMM at 1-8 rows and about even at 32, exact; beyond 32 rows, where it rounds the
# activations to int8 alone (llama.cpp's rounding), 1.3x at 128 (benchmarks/results/
# quantized_linear_cpu_epyc_vnni.md).
VNNI_MAX_ROWS = 128
SCHEMES = ("int4", "int8")

# GGUF tensor type -> the scheme that carries it, and how its 4-bit codes are recovered
# from the dequantized values ("asym": q = 0 at the group minimum and 15 at its maximum;
# "sym": the largest magnitude sits at q = 0, d = value / -8).
_GGUF_SCHEMES = {
    "Q4_0": ("int4", "sym"), "Q4_1": ("int4", "asym"), "Q4_K": ("int4", "asym"),
    "IQ4_NL": ("int4", "asym"), "IQ4_XS": ("int4", "asym"),
    "Q2_K": ("int4", "asym"), "Q3_K": ("int4", "asym"),
    "Q5_0": ("int8", None), "Q5_1": ("int8", None), "Q5_K": ("int8", None),
    "Q6_K": ("int8", None), "Q8_0": ("int8", None), "Q8_1": ("int8", None),
    "Q8_K": ("int8", None),
}


def gguf_scheme(gguf_type: str) -> tuple[str | None, str | None]:
    """(scheme, int4 recovery) for a GGUF tensor type; (None, None) for a float type, which
    stays dense."""
    return _GGUF_SCHEMES.get(gguf_type, (None, None))


def fits_int4(out_features: int, in_features: int) -> bool:
    """Whether the int4 kernel takes a [out_features, in_features] weight (whole groups of
    32 inputs, outputs in tiles of 16)."""
    return in_features % INT4_GROUP == 0 and out_features % 16 == 0


def packed_kernels_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_weight_int8pack_mm")


@dataclass(slots=True)
class Int4Weight:
    codes: torch.Tensor  # [N, K] uint8 in 0..15
    scales: torch.Tensor  # [N, K / 32] float32
    zeros: torch.Tensor  # [N, K / 32] float32: w = (q - 8) * scale + zero

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        q = self.codes.view(n, k // INT4_GROUP, INT4_GROUP).float() - 8
        return (q * self.scales[..., None] + self.zeros[..., None]).view(n, k)


@dataclass(slots=True)
class Int8Weight:
    codes: torch.Tensor  # [N, K] int8 in -127..127
    scales: torch.Tensor  # [N] float32

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales[:, None]


def quantize_int4(weight: torch.Tensor, recovery: str = "asym") -> Int4Weight:
    """Groups of 32 along the input dimension. "asym" spans each group's [min, max] with 16
    levels (GGUF Q4_1's own rule, so Q4_1 values come back with their codes exactly); "sym"
    recovers Q4_0, whose quantizer puts the group's largest magnitude at code 0."""
    n, k = weight.shape
    if k % INT4_GROUP:
        raise ValueError(f"int4 needs in_features divisible by {INT4_GROUP}, got {k}")
    w = weight.detach().float().view(n, k // INT4_GROUP, INT4_GROUP)
    if recovery == "asym":
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scales = (high - low) / 15
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round((w - low[..., None]) / safe[..., None]).clamp_(0, 15)
        zeros = low + 8 * scales
    elif recovery == "sym":
        index = w.abs().argmax(dim=-1, keepdim=True)
        scales = w.gather(-1, index).squeeze(-1) / -8
        safe = torch.where(scales != 0, scales, torch.ones_like(scales))
        codes = torch.round(w / safe[..., None] + 8).clamp_(0, 15)
        zeros = torch.zeros_like(scales)
    else:
        raise ValueError(f"int4 recovery must be 'asym' or 'sym', got {recovery!r}")
    return Int4Weight(codes.to(torch.uint8).view(n, k), scales, zeros)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric, one scale per output row."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=-1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(codes, scales)


class QuantizedLinear(nn.Module):
    """A linear layer y = x W^T + b over a weight-only quantized W; any activation dtype in,
    the same dtype out. `dense` keeps a copy of the dequantized weight in `dense_dtype` for
    products of more than PACKED_MAX_ROWS rows (False: the packed kernel at every size):
    bf16 where the CPU computes it natively (AVX512-BF16), fp32 elsewhere, where a bf16
    GEMM is emulated and 4-6x slower than fp32 (AVX2)."""

    def __init__(self, weight: Int4Weight | Int8Weight, bias: torch.Tensor | None,
                 dense: bool, dense_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        n, k = weight.codes.shape
        self.in_features, self.out_features = k, n
        self.scheme = "int4" if isinstance(weight, Int4Weight) else "int8"
        # int4 on our VNNI kernel where it is built (its fp16 scales and mins are inside
        # `packed`) and fp16 carries them, else on torch's (bf16 scales and zeros).
        in_fp16 = (_in_fp16(weight.scales, weight.zeros - 8 * weight.scales)
                   if self.scheme == "int4" and cpu_int4_linear.available() else None)
        self.vnni = in_fp16 is not None
        # Beyond this many rows, the dense copy (if kept) serves.
        self.max_packed_rows = VNNI_MAX_ROWS if self.vnni else PACKED_MAX_ROWS
        if self.scheme == "int4" and n % 16:
            raise ValueError(f"int4 needs out_features divisible by 16, got {n}")
        if in_fp16 is not None:
            scales, mins = in_fp16
            self.register_buffer("packed", cpu_int4_linear.pack(weight.codes, scales, mins))
            weight = Int4Weight(weight.codes, scales, mins + 8 * scales)
            self.register_buffer("scales_zeros", None)
        elif self.scheme == "int4":
            weight = Int4Weight(weight.codes, _bf16(weight.scales), _bf16(weight.zeros))
            # The kernel takes the codes as int32 [N, K] and packs them its own way.
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                weight.codes.to(torch.int32), 1))
            self.register_buffer("scales_zeros", torch.stack(
                [weight.scales.t(), weight.zeros.t()], dim=-1).to(torch.bfloat16).contiguous())
        else:
            weight = Int8Weight(weight.codes, _bf16(weight.scales))
            self.register_buffer("packed", weight.codes.contiguous())
            self.register_buffer("scales_zeros", weight.scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(),
                                                           requires_grad=False)
        # The copy is made from the rounded scales and zeros the kernels use.
        self.register_buffer("dense", None)
        if dense:
            self.dense = weight.dequantize().to(dense_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.dense is not None and x2.shape[0] > self.max_packed_rows:
            out = F.linear(x2.to(self.dense.dtype), self.dense)
        elif self.vnni:
            out = cpu_int4_linear.int4_linear(x2, self.packed, self.out_features)
        elif self.scheme == "int4":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16), self.packed, INT4_GROUP, self.scales_zeros)
        else:
            out = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.packed,
                                                     self.scales_zeros)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme}, vnni={self.vnni}, dense_copy={self.dense is not None}")


class RefinedHead(nn.Module):
    """The head of a quantized model, in two passes: every token's logit on a fast path,
    whose bf16 rounding (0.06-0.125 at logits of 16-32) ties or swaps close candidates;
    then each row's `refine` best recomputed exactly in fp32 from the dense weight. Greedy
    picks and the top logprobs are the exact path's at any batch size; the tail's logits
    keep the fast path's error (at most 0.6 on SmolLM2's head for the int8 pass).

    The fast path is the int8 kernel up to PACKED_MAX_ROWS rows (2.4x faster than fp32 at
    one row) and, with `dense`, a bf16 GEMM beyond (2x faster than fp32 at 16-64 rows,
    refinement included). Without `dense`, big batches get the exact fp32 product (MKL,
    pre-packed) and no refinement.

    A step that reads only each row's best token (`argmax_only`: greedy, no logprobs, no
    logit edits) takes an int4 pass instead of the int8 one, up to its kernel's
    max_packed_rows (128 on our VNNI kernel, 8 on torch's): at one row 0.2 against 0.9 ms
    on SmolLM2's head (VNNI), 1.0 against 2.1 ms (torch's). Its logits are further off (up
    to 4.8 on SmolLM2, 0.9 for int8): over the tail's mass that would move logprobs by up
    to 2 and skew sampling, hence argmax only. The pick stays exact: over 2,560 real decode
    rows the exact best token ranked at most 10th in the int4 pass (benchmarks/results/
    head_pass_cpu_epyc_vnni.md), well inside the `refine` candidates recomputed exactly."""

    def __init__(self, weight: torch.Tensor, dense: bool = True, refine: int = 64,
                 dense_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.weight = weight  # [V, K] float32, shared (a tied head's is the embedding's)
        self.refine = min(refine, weight.shape[0])
        self.fast = QuantizedLinear(quantize_int8(weight), None, dense=False)
        self.argmax_fast = (QuantizedLinear(quantize_int4(weight), None, dense=False)
                            if fits_int4(*weight.shape) else None)
        # Without native bf16 (dense_dtype fp32) big batches take the exact fp32 product.
        self.dense = weight.to(dense_dtype) if dense and dense_dtype != torch.float32 else None
        self.packed = (pack_weight(weight) if self.dense is None and mkl_packing_available()
                       else None)

    @property
    def argmax_max_rows(self) -> int:
        """Rows up to which an argmax_only call takes a fast pass."""
        return (self.argmax_fast or self.fast).max_packed_rows

    def forward(self, hidden: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        hidden = hidden.float()
        fast = self.argmax_fast if argmax_only and self.argmax_fast is not None else self.fast
        if hidden.shape[0] <= fast.max_packed_rows:
            logits = fast(hidden).float()
        elif self.dense is not None:
            logits = F.linear(hidden.to(self.dense.dtype), self.dense).float()
        else:
            return packed_linear(hidden, self.weight, self.packed)
        best = logits.topk(self.refine, dim=-1, sorted=False).indices  # [rows, refine]
        exact = torch.bmm(self.weight[best], hidden[:, :, None])[..., 0]
        return logits.scatter_(1, best, exact)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def _in_fp16(scales: torch.Tensor, mins: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A layer's group scales and minimums rounded to fp16, or None where fp16 does not
    hold them about as closely as its 11 bits do (GGUF's own fp16 values it holds exactly):
    where the layer's weights are so small that its scales are subnormal there, or so large
    that one overflows. A group far smaller than the layer's largest may round coarser:
    its weights add little."""
    def rounded(t: torch.Tensor, size: torch.Tensor) -> torch.Tensor | None:
        t16 = _fp16(t)
        close = ((t16 - t).abs() <= size * 2 ** -11 + size.amax() * 2 ** -16).all()
        return t16 if close else None

    scales16 = rounded(scales, scales.abs())
    mins16 = rounded(mins, mins.abs() + scales.abs())
    return None if scales16 is None or mins16 is None else (scales16, mins16)


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                    recovery: str | None = None, dense: bool = True,
                    dense_dtype: torch.dtype = torch.bfloat16) -> QuantizedLinear:
    n, k = weight.shape
    if scheme == "int4" and not fits_int4(n, k):
        logger.debug("a [%d, %d] weight does not fit int4's groups: int8 instead", n, k)
        scheme = "int8"
    if scheme == "int4":
        return QuantizedLinear(quantize_int4(weight, recovery or "asym"), bias, dense,
                               dense_dtype)
    if scheme == "int8":
        return QuantizedLinear(quantize_int8(weight), bias, dense, dense_dtype)
    raise ValueError(f"quantization scheme must be one of {SCHEMES}, got {scheme!r}")


def quantized_bytes(module: nn.Module) -> int:
    """Bytes the quantized layers of `module` hold (packed codes, scales, dense copies)."""
    total = 0
    for layer in module.modules():
        if isinstance(layer, QuantizedLinear):
            for tensor in (layer.packed, layer.scales_zeros, layer.dense):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
    return total


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype) for everything but the quantized layers, whose scales stay in the
    dtype their kernels take."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))


_DENSE_TENSORS = ("embed_tokens.weight", "lm_head.weight")


def _merge_gguf_schemes(types: list[str]) -> tuple[str, str | None] | None:
    """One scheme for a layer fused from tensors of these GGUF types: dense if any is a
    float type, int8 if any needs more than 4 bits, else int4 (Q4_0's recovery only when
    every part is Q4_0)."""
    schemes = [gguf_scheme(t) for t in types]
    if any(scheme is None for scheme, _ in schemes):
        return None
    if any(scheme == "int8" for scheme, _ in schemes):
        return ("int8", None)
    return ("int4", "sym" if all(recovery == "sym" for _, recovery in schemes) else "asym")


def quantization_plan(quantization: str, gguf_types: dict[str, str] | None):
    """scheme_of(checkpoint tensor names) -> (scheme, recovery) | None for a model's layers,
    or None when nothing is quantized.

    auto: a GGUF file's own quantization, tensor by tensor (float tensors stay dense); an HF
    checkpoint stays dense. int4/int8: every linear layer in that scheme.
    The embedding and the head are never planned: the kernels round their outputs to bf16,
    whose steps at logit magnitudes (0.06-0.125 at 16-32) tie or swap close candidates
    (SmolLM2's head so turned "The capital of France is Paris" into "L'Etoile, ..."). The
    model gives the head a RefinedHead instead, exact where it counts."""
    if quantization == "none" or (quantization == "auto" and gguf_types is None):
        return None
    if quantization == "auto":
        if not any(gguf_scheme(t)[0] for t in gguf_types.values()):
            return None  # a float GGUF: nothing to keep quantized

        def scheme_of(names: list[str]):
            if any(n.endswith(_DENSE_TENSORS) for n in names):
                return None
            types = [gguf_types.get(n) for n in names]
            if any(t is None for t in types):
                return None
            return _merge_gguf_schemes(types)
        return scheme_of
    if quantization not in SCHEMES:
        raise ValueError(f"quantization must be auto, none or one of {SCHEMES}, "
                         f"got {quantization!r}")

    def explicit(names: list[str]):
        if any(n.endswith(_DENSE_TENSORS) for n in names):
            return None
        recovery = None
        if gguf_types is not None and quantization == "int4":
            merged = _merge_gguf_schemes([gguf_types.get(n, "F32") for n in names])
            recovery = merged[1] if merged and merged[0] == "int4" else None
        return (quantization, recovery)
    return explicit
