"""Fused residual-add + RMSNorm and rotary kernels against their PyTorch references (on CPU
through the Triton interpreter: see conftest.py)."""

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels.fused_ops import (  # noqa: E402
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rotary_embedding,
    rotary_embedding_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: summation order only. fp16/bf16: both sides round once per stored value, but the
# sum of squares is ordered differently, which can flip the last bit of a rounded value.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])  # 96: a hidden size that is no power of two
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rms_norm_matches_reference(dtype, hidden, with_residual):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=gen).to(dtype).to(DEVICE)
    weight = (1 + torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    residual = torch.randn(7, hidden, generator=gen).to(dtype).to(DEVICE) if with_residual else None
    ref_residual = residual.clone() if with_residual else None

    out = fused_add_rms_norm(x, residual, weight, 1e-6)
    expected = fused_add_rms_norm_ref(x, ref_residual, weight, 1e-6)

    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    if with_residual:
        if dtype == torch.bfloat16 and DEVICE == "cpu":
            # The interpreter (numpy has no bf16) truncates on the cast instead of rounding
            # to nearest: one ulp apart at most.
            torch.testing.assert_close(residual, ref_residual, atol=0, rtol=2**-7)
        else:  # the sum is rounded once on both sides: exactly equal
            assert torch.equal(residual, ref_residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64])
def test_rotary_embedding_in_place_on_strided_view(dtype, head_dim):
    """q and k are a view into the fused qkv projection's output (rows strided past v):
    the kernel rotates exactly those heads, in place, and leaves v untouched."""
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens, heads, kv_heads, max_pos = 9, 4, 2, 5000
    qkv = torch.randn(num_tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    qkv = qkv.to(DEVICE)
    qk = qkv[:, :heads + kv_heads]
    v_before = qkv[:, heads + kv_heads:].clone()
    freqs = torch.rand(max_pos, head_dim // 2, generator=gen) * 3
    table = torch.cat([freqs, freqs], dim=-1)
    cos, sin = table.cos().to(DEVICE), table.sin().to(DEVICE)
    positions = torch.tensor([0, 1, 4999, 17, 16, 3000, 2, 2, 1024], device=DEVICE)
    expected = rotary_embedding_ref(qk, positions, cos, sin)

    out = rotary_embedding(qk, positions, cos, sin)

    assert out.data_ptr() == qk.data_ptr()
    torch.testing.assert_close(qk, expected, **TOLERANCES[dtype])
    assert torch.equal(qkv[:, heads + kv_heads:], v_before)
