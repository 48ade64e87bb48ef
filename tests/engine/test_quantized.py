"""Weight-only quantized linear layers (engine/models/quantized.py) against dense
references, and how a model's layers are chosen for them."""

import pytest
import torch

from pagedserve.engine.model_runner import cpu_has_bf16
from pagedserve.engine.models.quantized import (
    INT4_GROUP,
    PACKED_MAX_ROWS,
    Int4Weight,
    QuantizedLinear,
    RefinedHead,
    quantization_plan,
    quantize_int4,
    quantize_int8,
    quantize_linear,
)
from pagedserve.kernels import cpu_int4_linear

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
    reason="torch without packed int4 CPU kernels")


def q4_1_values(n, k, seed=0):
    """Values as GGUF Q4_1 stores them: d * q + m per group of 32, codes 0 and 15 used."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // 32, 32), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(n, k // 32, 1, generator=gen) * 0.01 + 1e-4).half().float()
    m = (-d * 8 + torch.randn(n, k // 32, 1, generator=gen) * 1e-3).half().float()
    return (d * codes + m).view(n, k), codes.view(n, k), d[..., 0], m[..., 0]


def test_int4_recovers_q4_1_codes_scales_and_minimums():
    values, codes, d, m = q4_1_values(32, 128)
    w = quantize_int4(values, "asym")
    assert torch.equal(w.codes.long(), codes)
    assert torch.allclose(w.scales, d, rtol=1e-5)
    assert torch.allclose(w.zeros, m + 8 * d, rtol=1e-5, atol=1e-8)
    assert torch.allclose(w.dequantize(), values, atol=1e-6)


def test_int4_recovers_q4_0_codes():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (16, 2, 32), generator=gen)
    codes[..., 0] = 0  # Q4_0's quantizer puts the group's largest magnitude at code 0
    codes[..., 1:] = codes[..., 1:].clamp(1, 15)
    d = (torch.rand(16, 2, 1, generator=gen) - 0.5).half().float() * 0.02
    values = (d * (codes - 8)).view(16, 64)
    w = quantize_int4(values, "sym")
    assert torch.equal(w.codes.view(16, 2, 32).long(), codes)
    assert torch.allclose(w.dequantize(), values, atol=1e-7)


def test_int8_is_per_row_symmetric():
    weight = torch.randn(48, 64)
    w = quantize_int8(weight)
    assert w.codes.dtype == torch.int8 and w.codes.abs().max() <= 127
    assert torch.allclose(w.dequantize(), weight, atol=w.scales.max().item() / 2 + 1e-6)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("rows", [1, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 5])
def test_quantized_linear_matches_its_dequantized_weight(scheme, dense, rows, vnni):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 4 * INT4_GROUP) * 0.05, torch.randn(96)
    layer = quantize_linear(weight, bias, scheme, dense=dense)
    assert isinstance(layer, QuantizedLinear) and layer.scheme == scheme
    quantized = quantize_int4(weight) if scheme == "int4" else quantize_int8(weight)
    x = torch.randn(rows, 4 * INT4_GROUP)
    reference = x @ quantized.dequantize().t() + bias
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == (rows, 96)
    # bf16 or int8 activations: ~3 significant digits.
    scale = reference.abs().max().item()
    assert (out - reference).abs().max().item() < 2e-2 * scale
    # The quantized weight stands for the original one to within its rounding.
    assert (out - (x @ weight.t() + bias)).abs().max().item() < 0.1 * scale


def test_shapes_int4_cannot_take_fall_back_to_int8():
    layer = quantize_linear(torch.randn(40, 64), None, "int4")  # 40 rows: not a multiple of 16
    assert layer.scheme == "int8"


def kernel_view(weight: torch.Tensor, vnni: bool) -> Int4Weight:
    """quantize_int4(weight) as the int4 kernel holds it: fp16 scales and group minimums in
    ours, bf16 scales and zeros in torch's."""
    w = quantize_int4(weight)
    if not vnni:
        return Int4Weight(w.codes, w.scales.bfloat16().float(), w.zeros.bfloat16().float())
    scales, mins = w.scales.half().float(), (w.zeros - 8 * w.scales).half().float()
    return Int4Weight(w.codes, scales, mins + 8 * scales)


def skip_without_vnni() -> None:
    """Inside a test, not a skipif mark: asking builds the CPU kernels (~30 s), which
    collection must not wait for."""
    if not cpu_int4_linear.available():
        pytest.skip("the VNNI int4 kernel is not built on this CPU")


@pytest.fixture(params=[True, False], ids=["vnni", "torch-int4"])
def vnni(request, monkeypatch):
    """Both int4 kernels: ours where it is built (else skipped), then torch's."""
    if request.param:
        skip_without_vnni()
    else:
        monkeypatch.setattr(cpu_int4_linear, "available", lambda: False)
    return request.param


def test_the_dense_copy_carries_the_kernels_weight(vnni):
    weight = torch.randn(32, 64)
    layer = quantize_linear(weight, None, "int4", dense=True)
    assert layer.vnni == vnni
    assert torch.equal(layer.dense, kernel_view(weight, vnni).dequantize().bfloat16())


def test_vnni_packing_keeps_q4_1_exactly():
    """GGUF Q4_1's codes, d and m come back from the packed layout as they were stored."""
    skip_without_vnni()
    values, codes, d, m = q4_1_values(48, 96)
    layer = quantize_linear(values, None, "int4", dense=False)
    assert layer.vnni and layer.scales_zeros is None
    packed_codes, scales, mins = cpu_int4_linear.unpack(layer.packed, 48)
    assert torch.equal(packed_codes.long(), codes)
    assert torch.equal(scales, d) and torch.equal(mins, m)


@pytest.mark.parametrize("rows", [1, 3, 8, 11, 32, 37])
def test_vnni_int4_kernel_matches_the_dequantized_weight(rows):
    """Up to 32 rows the activations go in as int8 codes plus their int8 rounding residuals
    (~15 bits a group): the exact product up to fp32 summation, as close as an fp32 GEMM.
    Beyond, where the kernel is compute-bound, as the int8 codes alone (llama.cpp's
    rounding): exactly those codes times the weight. bf16 in, bf16 out. 11, 32 and 37 rows:
    passes of 8 rows and the rest."""
    skip_without_vnni()
    gen = torch.Generator().manual_seed(rows)
    codes = torch.randint(0, 16, (48, 160), generator=gen, dtype=torch.uint8)
    scales, mins = torch.rand(48, 5, generator=gen) * 0.01, torch.randn(48, 5, generator=gen)
    packed = cpu_int4_linear.pack(codes, scales, mins)
    weight = (codes.view(48, 5, 32) * scales.half().float()[..., None]
              + mins.half().float()[..., None]).view(48, 160)
    x = torch.randn(rows, 160, generator=gen)
    x[0, :32] = 0  # an all-zero group
    x[-1, 40] = 300  # an outlier: its group's other inputs ride on the residual
    out = cpu_int4_linear.int4_linear(x, packed, 48)
    assert out.dtype == torch.float32 and out.shape == (rows, 48)
    step = x.view(rows, 5, 32).abs().amax(-1, keepdim=True) / 127  # [rows, groups, 1]
    if rows <= 32:
        exact = x.double() @ weight.double().t()
        # At most one fine step (1/256 of the int8 step) off for each input.
        bound = (step[..., 0].double() / 256) @ weight.abs().view(48, 5, 32).sum(-1).double().t()
        assert ((out.double() - exact).abs() <= bound + 1e-5 * exact.abs().max()).all()
    else:
        codes_x = torch.round(x.view(rows, 5, 32) / torch.where(step > 0, step, 1))
        reference = (codes_x * step).view(rows, 160).double() @ weight.double().t()
        torch.testing.assert_close(out.double(), reference, rtol=1e-5,
                                   atol=1e-5 * reference.abs().max().item())
    half = cpu_int4_linear.int4_linear(x[:8].bfloat16(), packed, 48)
    assert half.dtype == torch.bfloat16
    half_exact = x[:8].bfloat16().double() @ weight.double().t()
    torch.testing.assert_close(half.double(), half_exact, rtol=2 ** -8,
                               atol=1e-3 * half_exact.abs().max().item())
    with pytest.raises(RuntimeError, match="does not match its packing"):
        cpu_int4_linear.int4_linear(x, packed, 32)


@pytest.mark.parametrize("rows", [2, 40])
def test_vnni_int4_kernel_gives_nan_for_a_row_with_nan_or_inf(rows):
    """int8 rounding has no NaN: a group holding one comes out as its row's NaN outputs
    (a float GEMM's answer), not as large finite garbage; other rows are untouched."""
    skip_without_vnni()
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (16, 64), generator=gen, dtype=torch.uint8)
    packed = cpu_int4_linear.pack(codes, torch.full((16, 2), 0.01), torch.zeros(16, 2))
    x = torch.randn(rows, 64, generator=gen)
    clean = cpu_int4_linear.int4_linear(x, packed, 16)
    x[0, 3], x[1, 40] = float("nan"), float("inf")
    out = cpu_int4_linear.int4_linear(x, packed, 16)
    assert out[:2].isnan().all()
    assert torch.equal(out[2:], clean[2:])


def test_vnni_int4_kernel_refuses_what_does_not_fit_its_packing():
    """A weight packed for [16, 64] cannot be called with other inputs, even where the byte
    counts agree; x must be [M, K]."""
    skip_without_vnni()
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = cpu_int4_linear.pack(codes, torch.rand(32, 2), torch.zeros(32, 2))
    with pytest.raises(RuntimeError, match="does not match its packing"):
        cpu_int4_linear.int4_linear(torch.randn(2, 128), packed, 16)  # same bytes, not K
    with pytest.raises(RuntimeError, match=r"must be \[M, K\]"):
        cpu_int4_linear.int4_linear(torch.randn(2, 2, 64), packed, 32)


@pytest.mark.parametrize("scale", [1e-7, 1e5])
def test_scales_fp16_cannot_carry_take_torchs_int4_kernel(scale, monkeypatch):
    """Our kernel keeps d and m in fp16; a checkpoint quantized at load whose weights are
    so small that d is subnormal there, or so large that m overflows, goes to torch's
    kernel (bf16 scales), which carries it as closely as usual."""
    skip_without_vnni()
    weight = torch.randn(16, 64) * scale
    layer = QuantizedLinear(quantize_int4(weight), None, dense=False)
    assert not layer.vnni
    x = torch.randn(3, 64)
    exact = x @ kernel_view(weight, vnni=False).dequantize().t()
    torch.testing.assert_close(layer(x), exact, rtol=0.02, atol=0.02 * exact.abs().max().item())
    assert QuantizedLinear(quantize_int4(torch.randn(16, 64) * 0.02), None, dense=False).vnni
    # One group far smaller than the rest (a subnormal scale in fp16) keeps the kernel.
    mixed = torch.randn(16, 64) * 0.02
    mixed[3, :32] *= 1e-4
    assert QuantizedLinear(quantize_int4(mixed), None, dense=False).vnni


def test_without_native_bf16_the_dense_copy_is_fp32():
    """A CPU without AVX512-BF16 emulates bf16 GEMMs (4-6x slower than fp32 on AVX2): the
    copy for many rows is the kernels' weight in fp32, and the head's big batches take the
    exact fp32 product (no copy, no refinement)."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 64, generator=gen)
    layer = quantize_linear(weight, None, "int4", dense=True, dense_dtype=torch.float32)
    x = torch.randn(layer.max_packed_rows + 1, 64, generator=gen)
    dequantized = kernel_view(weight, layer.vnni).dequantize()
    assert layer.dense.dtype == torch.float32
    assert torch.equal(layer.dense, dequantized)
    torch.testing.assert_close(layer(x), x @ dequantized.t())  # fp32 all through
    head = RefinedHead(weight, dense=True, dense_dtype=torch.float32)
    assert head.dense is None


def test_plan_serves_a_gguf_in_its_own_scheme():
    types = {
        "model.layers.0.self_attn.q_proj.weight": "Q4_1",
        "model.layers.0.self_attn.k_proj.weight": "Q4_1",
        "model.layers.0.self_attn.v_proj.weight": "Q6_K",
        "model.layers.0.mlp.down_proj.weight": "Q4_0",
        "model.layers.0.mlp.up_proj.weight": "F16",
        "model.embed_tokens.weight": "Q8_0",
    }
    plan = quantization_plan("auto", types)
    qkv = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    assert plan(qkv) == ("int8", None)  # the widest part wins
    assert plan(qkv[:2]) == ("int4", "asym")
    assert plan(["model.layers.0.mlp.down_proj.weight"]) == ("int4", "sym")
    assert plan(["model.layers.0.mlp.up_proj.weight"]) is None  # float stays dense
    assert plan(["model.embed_tokens.weight"]) is None  # the head stays dense
    assert plan(["model.layers.9.mlp.up_proj.weight"]) is None  # unknown: dense
    assert quantization_plan("auto", None) is None  # an HF checkpoint as it is
    assert quantization_plan("none", types) is None
    explicit = quantization_plan("int8", None)
    assert explicit(qkv) == ("int8", None)
    assert explicit(["lm_head.weight"]) is None
    assert quantization_plan("int4", types)(["model.layers.0.mlp.down_proj.weight"]) == (
        "int4", "sym")
    with pytest.raises(ValueError, match="quantization"):
        quantization_plan("fp8", None)


@pytest.mark.parametrize("qtype, recovery", [("Q4_0", "sym"), ("Q4_1", "asym")])
def test_int4_carries_what_ggufs_own_quantizer_wrote(qtype, recovery):
    """gguf-py quantizes and dequantizes (llama.cpp's rules); our int4 gives back the same
    values from the dequantized ones."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType[qtype]
    x = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)
    values = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind)
                              ).reshape(16, 256)
    w = quantize_int4(values, recovery)
    torch.testing.assert_close(w.dequantize(), values, rtol=0, atol=2e-6)


def test_a_quantized_gguf_is_served_in_its_own_scheme(tmp_path):
    """A Q4_1 GGUF: its layers run on int4 kernels by default, and their logprobs stay
    close to the exact (dequantized fp32) path's."""
    import gguf

    from pagedserve.engine import LLM, SamplingParams
    from tests.engine.test_gguf_loader import tiny_model, write_tiny_gguf

    arch, model = tiny_model("llama")
    path = tmp_path / "tiny-q4_1.gguf"
    write_tiny_gguf(path, arch, model, gguf.GGMLQuantizationType.Q4_1)
    prompt = [1, 50, 70, 90, 110, 130, 7, 200, 31, 64]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    runs = {}
    # The exact path, the file's own quantization (bf16 activations where the CPU has
    # AVX512-BF16 but not our int4 kernel; with it fp32, over a bf16 cache), and the exact
    # path's fp32 activations over a bf16 KV cache. Prefill in chunks of 4, so that later
    # chunks attend through the cache.
    for quantization, kv_cache_dtype in (("none", "auto"), ("auto", "auto"),
                                         ("none", "bfloat16")):
        llm = LLM(model=str(path), quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                  kv_cache_memory=16 << 20, max_num_batched_tokens=4)
        runner = llm.llm_engine.model_runner
        ours = runner.model
        layers = [m for m in ours.layers.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == (4 * model.config.num_hidden_layers if quantization == "auto"
                               else 0)
        assert all(layer.scheme == "int4" for layer in layers)
        assert (ours.refined_head is not None) == (quantization == "auto")
        quantized_bf16 = quantization == "auto" and cpu_has_bf16()
        vnni = quantized_bf16 and cpu_int4_linear.available()
        assert all(layer.vnni == vnni for layer in layers)
        assert runner.dtype == (torch.bfloat16 if quantized_bf16 and not vnni
                                else torch.float32)
        assert runner.kv_caches[0].dtype == (torch.bfloat16 if quantized_bf16
                                             or kv_cache_dtype == "bfloat16"
                                             else torch.float32)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        runs[quantization, kv_cache_dtype] = [next(iter(e.values())).logprob
                                              for e in out.prompt_logprobs[1:]]
    exact = runs["none", "auto"]
    # The file's values exactly, fp32 activations: only the bf16 cache's rounding is left.
    assert runs["auto", "auto"] == pytest.approx(exact, abs=0.02 if vnni else 0.05)
    assert runs["none", "bfloat16"] == pytest.approx(exact, abs=0.02)
    assert runs["none", "bfloat16"] != exact  # the cache did round


def test_dtypes_follow_quantization_and_the_cpu(monkeypatch):
    """auto: bf16 activations for quantized weights where the CPU computes bf16 natively
    and our int4 kernel is not built, else the exact path's fp32 (beside a bf16 cache for a
    quantized model where the CPU has bf16); a KV cache of another dtype than the
    activations is a CPU feature."""
    from pagedserve.engine import model_runner
    from pagedserve.engine.config import EngineConfig

    cpu, cuda, auto = torch.device("cpu"), torch.device("cuda"), EngineConfig()
    monkeypatch.setattr(model_runner, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(cpu_int4_linear, "available", lambda: True)
    assert model_runner.resolve_dtype(auto, cpu, quantized=True) == torch.float32
    assert model_runner.resolve_kv_cache_dtype(auto, cpu, torch.float32, True) == torch.bfloat16
    monkeypatch.setattr(cpu_int4_linear, "available", lambda: False)
    assert model_runner.resolve_dtype(auto, cpu, quantized=True) == torch.bfloat16
    assert model_runner.resolve_dtype(auto, cpu, quantized=False) == torch.float32
    assert model_runner.resolve_dtype(EngineConfig(dtype="float32"), cpu, True) == torch.float32
    assert model_runner.resolve_dtype(auto, cuda, quantized=False) == torch.bfloat16
    monkeypatch.setattr(model_runner, "cpu_has_bf16", lambda: False)
    assert model_runner.resolve_dtype(auto, cpu, quantized=True) == torch.float32

    kv = model_runner.resolve_kv_cache_dtype
    assert kv(auto, cpu, torch.float32) == torch.float32
    assert kv(EngineConfig(kv_cache_dtype="bfloat16"), cpu, torch.float32) == torch.bfloat16
    assert kv(EngineConfig(kv_cache_dtype="bfloat16"), cuda, torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="CPUs only"):
        kv(EngineConfig(kv_cache_dtype="float16"), cuda, torch.bfloat16)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp8")


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("rows", [1, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 40])
def test_the_refined_head_gives_exact_top_logits(rows, dense):
    """Greedy picks and the top logprobs come out as the fp32 product gives them at every
    batch size, on either fast path (int8 for few rows, bf16 for many) or the exact one;
    the rest stay within the fast pass's error. bf16 hidden states (a quantized model's
    activations) are refined from their exact values."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(2048, 64, generator=gen) * 0.1
    hidden = torch.randn(rows, 64, generator=gen) * 4
    if rows == 40:
        hidden = hidden.bfloat16()
    exact = hidden.float() @ weight.t()
    logits = RefinedHead(weight, dense, refine=32)(hidden)
    assert logits.dtype == torch.float32 and logits.shape == exact.shape
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    top = exact.topk(20, dim=-1)
    torch.testing.assert_close(logits.gather(1, top.indices), top.values, rtol=0, atol=1e-5)
    assert (logits - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("rows", [1, PACKED_MAX_ROWS, 40])
def test_an_argmax_only_head_takes_the_int4_pass_and_keeps_the_exact_pick(rows):
    """Where only the best token is read, the head's fast pass is int4 (half the int8 pass's
    bytes): the pick and the refined candidates are still the fp32 product's, the rest are
    the int4 pass's own logits. A head whose shape int4 cannot take keeps the int8 pass."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(2048, 64, generator=gen) * 0.1
    hidden = torch.randn(rows, 64, generator=gen) * 4
    exact = hidden @ weight.t()
    head = RefinedHead(weight, dense=True, refine=32)
    if rows > head.argmax_max_rows:
        pytest.skip("torch's int4 kernel takes up to PACKED_MAX_ROWS rows")  # ours: 128
    logits = head(hidden, argmax_only=True)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    refined = exact.topk(5, dim=-1)
    torch.testing.assert_close(logits.gather(1, refined.indices), refined.values, rtol=0,
                               atol=1e-5)
    int4, int8 = head.argmax_fast(hidden).float(), head.fast(hidden).float()

    def tail(fast):  # all but the candidates refined from this pass
        return torch.ones_like(fast, dtype=torch.bool).scatter_(
            1, fast.topk(head.refine, dim=-1).indices, False)

    assert torch.equal(logits[tail(int4)], int4[tail(int4)])
    assert not torch.equal(int4, int8)
    if rows <= PACKED_MAX_ROWS:
        assert torch.equal(head(hidden)[tail(int8)], int8[tail(int8)])  # the default: int8
    odd = RefinedHead(torch.randn(2040, 64, generator=gen), dense=False)  # 2040 % 16 != 0
    assert odd.argmax_fast is None
    torch.testing.assert_close(odd(hidden, argmax_only=True), odd(hidden))


def test_only_plain_greedy_rows_are_argmax_only():
    from pagedserve.engine.sampler import SamplingRows
    from pagedserve.engine.sampling_params import SamplingParams

    def rows(**kwargs):
        params = [SamplingParams(temperature=0.0),
                  SamplingParams(**{"temperature": 0.0, **kwargs})]
        return SamplingRows.from_params(params, [0, 0], [None, None])

    assert rows().argmax_only()
    for knob in ({"temperature": 0.7}, {"logprobs": 0}, {"repetition_penalty": 1.1},
                 {"frequency_penalty": 0.5}, {"presence_penalty": -0.5},
                 {"logit_bias": {5: 1.0}}, {"min_tokens": 3}):
        assert not rows(**knob).argmax_only(), knob


def _spy_on_head(llm, monkeypatch) -> tuple[RefinedHead, list[bool]]:
    head = llm.llm_engine.model_runner.model.refined_head
    calls: list[bool] = []
    forward = head.forward
    monkeypatch.setattr(head, "forward", lambda hidden, argmax_only=False: (
        calls.append(argmax_only), forward(hidden, argmax_only))[1])
    return head, calls


def _generate(llm, calls: list[bool], **kwargs) -> tuple[list[int], set[bool]]:
    """Greedy-by-default tokens of one prompt, and the argmax_only flags the head saw."""
    from pagedserve.engine import SamplingParams

    calls.clear()
    prompt = [{"prompt_token_ids": [1, 50, 70, 90, 110, 130, 7, 200]}]
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 12, "ignore_eos": True,
                               **kwargs})
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    return out.token_ids, set(calls)


def test_the_runner_asks_for_the_argmax_pass_only_in_plain_greedy_steps(tmp_path,
                                                                        monkeypatch):
    """A step that reads logprobs, samples, or is guided needs the int8 pass's tail."""
    import gguf

    from pagedserve.engine import LLM
    from pagedserve.engine.sampling_params import GuidedDecodingParams
    from tests.engine.test_gguf_loader import tiny_model, write_tiny_gguf

    arch, model = tiny_model("llama")
    path = tmp_path / "tiny-q4_1.gguf"
    write_tiny_gguf(path, arch, model, gguf.GGMLQuantizationType.Q4_1)
    llm = LLM(model=str(path), kv_cache_memory=16 << 20, enforce_eager=True)
    _, calls = _spy_on_head(llm, monkeypatch)
    assert _generate(llm, calls)[1] == {True}
    assert _generate(llm, calls, logprobs=2)[1] == {False}
    assert _generate(llm, calls, temperature=0.8, seed=1)[1] == {False}
    assert _generate(llm, calls, repetition_penalty=1.2)[1] == {False}
    assert _generate(llm, calls, guided_decoding=GuidedDecodingParams(regex="[a-z ]+"))[1] == {
        False}


def test_the_argmax_pass_gives_the_int8_pass_greedy_tokens(tiny_dir, monkeypatch):
    from pagedserve.engine import LLM

    llm = LLM(model=str(tiny_dir), quantization="int4", kv_cache_memory=16 << 20,
              enforce_eager=True, skip_tokenizer_init=True)
    head, calls = _spy_on_head(llm, monkeypatch)
    assert head.argmax_fast is not None
    tokens, modes = _generate(llm, calls)
    assert modes == {True}
    monkeypatch.setattr(head, "argmax_fast", None)  # the int8 pass, as before
    assert _generate(llm, calls) == (tokens, {True})
