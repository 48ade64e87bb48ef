"""Triton kernels against their PyTorch references on random paged batches (on CPU through
the Triton interpreter: see conftest.py)."""

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels.paged_attention import (  # noqa: E402
    num_kv_splits,
    paged_attention,
    paged_attention_ref,
    paged_attention_split_kv,
)
from pagedserve.kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_BLOCKS = 2000  # large block ids; only the blocks a test uses are ever written
NUM_KV_HEADS = 2
# fp32: only summation order differs. fp16: the kernel rounds probabilities to fp16 for the
# P @ V dot, the reference doesn't. bf16: output rounding alone is ~1 ulp = 2^-7 relative.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def _make_batch(kind: str, block_size: int, rng: random.Random):
    """(query_lens, seq_lens) of one step. 'prefill': whole prompts and chunks that start
    mid-block; 'decode': one token each; 'mixed': both, in shuffled order."""
    seqs = []
    if kind in ("prefill", "mixed"):
        prompt = rng.randint(2, 100)
        seqs.append((prompt, prompt))  # a whole prompt, no cached context
        cached = rng.randint(1, 60)
        if cached % block_size == 0:
            cached += 1  # the chunk starts mid-block
        chunk = rng.randint(2, 40)
        seqs.append((chunk, cached + chunk))
        chunk = rng.randint(2, 9)  # a short chunk after a short context
        seqs.append((chunk, chunk + rng.randint(1, 20)))
    if kind in ("decode", "mixed"):
        seqs += [(1, 1)] + [(1, rng.randint(2, 100)) for _ in range(3)]
    rng.shuffle(seqs)
    return [q for q, _ in seqs], [s for _, s in seqs]


def _paged_inputs(query_lens, seq_lens, num_heads, head_dim, block_size, dtype, seed):
    """A cache whose used blocks (random, distinct, large ids) hold random K/V, and the
    metadata tensors for one step."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    ids = torch.randperm(NUM_BLOCKS, generator=gen)[: len(seq_lens) * max_blocks]
    block_table = ids.view(len(seq_lens), max_blocks).to(torch.int32)
    kv_cache = torch.zeros(2, NUM_BLOCKS, block_size, NUM_KV_HEADS, head_dim, dtype=dtype)
    used = ids.long()
    kv_cache[:, used] = torch.randn(2, len(used), block_size, NUM_KV_HEADS, head_dim,
                                    generator=gen).to(dtype)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()],
                                   dtype=torch.int32)
    to = lambda t: t.to(DEVICE)
    return (to(q), to(kv_cache), to(block_table), to(torch.tensor(seq_lens, dtype=torch.int32)),
            to(query_start_loc))


def _slot_mapping(query_lens, seq_lens, block_table, block_size):
    """Cache slot of every new token: positions seq_len - q_len .. seq_len - 1."""
    slots = []
    for i, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(block_table[i, pos // block_size]) * block_size + pos % block_size)
    return torch.tensor(slots, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 32])
def test_reshape_and_cache_matches_reference(dtype, block_size, head_dim):
    gen = torch.Generator().manual_seed(block_size + head_dim)
    num_tokens = 40
    # Distinct slots across large block ids, some marked as padding (-1).
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:7]] = -1
    k = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
    shape = (2, NUM_BLOCKS, block_size, NUM_KV_HEADS, head_dim)
    cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    expected = cache.clone()
    slots, k, v = slots.to(DEVICE), k.to(DEVICE), v.to(DEVICE)

    reshape_and_cache(k, v, cache, slots)
    reshape_and_cache_ref(k, v, expected, slots)

    assert torch.equal(cache, expected)  # a copy: bit-exact, padding wrote nothing
    valid = slots >= 0
    written = cache[0].flatten(0, 1)[slots[valid]]
    assert torch.equal(written, k[valid])


def test_reshape_and_cache_strided_inputs():
    """k and v as views into a fused qkv projection output (non-contiguous token stride)."""
    head_dim, block_size = 32, 16
    qkv = torch.randn(9, 3, NUM_KV_HEADS, head_dim, device=DEVICE)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([5, 17, -1, 1999 * 16 + 15, 40, 41, 42, -1, 3], device=DEVICE)
    cache = torch.zeros(2, NUM_BLOCKS, block_size, NUM_KV_HEADS, head_dim, device=DEVICE)
    expected = cache.clone()
    reshape_and_cache(k, v, cache, slots)
    reshape_and_cache_ref(k, v, expected, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("kind", ["prefill", "decode", "mixed"])
def test_paged_attention_matches_reference(kind, group, block_size, dtype):
    seed = 1000 * group + block_size + len(kind) + len(str(dtype))  # stable across runs
    query_lens, seq_lens = _make_batch(kind, block_size, random.Random(seed))
    head_dim = 64
    q, kv_cache, block_table, seq_lens_t, query_start_loc = _paged_inputs(
        query_lens, seq_lens, NUM_KV_HEADS * group, head_dim, block_size, dtype, seed)
    scale = head_dim ** -0.5

    out = paged_attention(q, kv_cache, block_table, seq_lens_t, query_start_loc, scale,
                          max_query_len=max(query_lens))
    expected = paged_attention_ref(q, kv_cache, block_table, seq_lens_t, query_start_loc, scale)

    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_attention_head_dim_32_gqa_8(dtype):
    seed = 7
    query_lens, seq_lens = _make_batch("mixed", 16, random.Random(seed))
    q, kv_cache, block_table, seq_lens_t, query_start_loc = _paged_inputs(
        query_lens, seq_lens, NUM_KV_HEADS * 8, 32, 16, dtype, seed)
    out = paged_attention(q, kv_cache, block_table, seq_lens_t, query_start_loc, 0.2,
                          max_query_len=max(query_lens))
    expected = paged_attention_ref(q, kv_cache, block_table, seq_lens_t, query_start_loc, 0.2)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


def test_paged_attention_loose_max_query_len_bound():
    """The grid bound may exceed the longest chunk (e.g. the step's token budget): the
    extra query blocks must write nothing."""
    query_lens, seq_lens = [3, 1, 20], [50, 9, 20]
    q, kv_cache, block_table, seq_lens_t, query_start_loc = _paged_inputs(
        query_lens, seq_lens, 4, 64, 16, torch.float32, 3)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, kv_cache, block_table, seq_lens_t, query_start_loc, 0.125,
                    max_query_len=256, out=out)
    expected = paged_attention_ref(q, kv_cache, block_table, seq_lens_t, query_start_loc, 0.125)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [1, 5, 16, 37])
def test_sliding_window_unified_and_split_kv(window, dtype):
    """A sliding window W: each query sees its W latest positions (HF's rule). Windows
    smaller than a block, equal to one and spanning several, over mixed and decode batches;
    the split-KV path cuts only the blocks the window reaches."""
    seed = 300 + window
    query_lens, seq_lens = _make_batch("mixed", 16, random.Random(seed))
    q, kv_cache, block_table, seq_lens_t, query_start_loc = _paged_inputs(
        query_lens, seq_lens, NUM_KV_HEADS * 2, 32, 16, dtype, seed)
    out = paged_attention(q, kv_cache, block_table, seq_lens_t, query_start_loc, 0.3,
                          max_query_len=max(query_lens), sliding_window=window)
    expected = paged_attention_ref(q, kv_cache, block_table, seq_lens_t, query_start_loc, 0.3,
                                   sliding_window=window)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])

    seq_lens = [1, 15, 16, 17, 60, 100]
    q, kv_cache, block_table, seq_lens_t, query_start_loc = _paged_inputs(
        [1] * len(seq_lens), seq_lens, NUM_KV_HEADS * 2, 32, 16, dtype, seed)
    split = paged_attention_split_kv(q, kv_cache, block_table, seq_lens_t, 0.3, num_splits=3,
                                     min_blocks_per_split=1, sliding_window=window)
    expected = paged_attention_ref(q, kv_cache, block_table, seq_lens_t, query_start_loc, 0.3,
                                   sliding_window=window)
    torch.testing.assert_close(split, expected, **TOLERANCES[dtype])


def test_cache_write_then_attention_matches_torch_backend():
    """One mixed step end to end: write the new K/V with reshape_and_cache and attend with
    paged_attention, against the engine's torch backend doing both."""
    from pagedserve.engine.attention import AttentionMetadata
    from pagedserve.engine.attention.torch_backend import TorchAttentionBackend

    block_size, head_dim, group = 16, 64, 2
    num_heads = NUM_KV_HEADS * group
    query_lens, seq_lens = _make_batch("mixed", block_size, random.Random(11))
    q, kv_cache, block_table, seq_lens_t, query_start_loc = _paged_inputs(
        query_lens, seq_lens, num_heads, head_dim, block_size, torch.float32, 11)
    num_tokens = q.shape[0]
    k = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, device=DEVICE)
    v = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, device=DEVICE)
    slot_mapping = _slot_mapping(query_lens, seq_lens, block_table, block_size)
    scale = head_dim ** -0.5
    md = AttentionMetadata(
        num_tokens=num_tokens, slot_mapping=slot_mapping, query_start_loc=query_start_loc,
        seq_lens=seq_lens_t, block_table=block_table, block_size=block_size,
        query_start_loc_cpu=query_start_loc.tolist(), query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens, max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    backend = TorchAttentionBackend(num_heads, NUM_KV_HEADS)
    backend.prepare(md)
    cache_torch = kv_cache.clone()
    expected = backend.forward(q, k, v, cache_torch, md, scale)

    reshape_and_cache(k, v, kv_cache, slot_mapping)
    out = paged_attention(q, kv_cache, block_table, seq_lens_t, query_start_loc, scale,
                          max_query_len=md.max_query_len)

    assert torch.equal(kv_cache, cache_torch)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_split_kv_decode_matches_reference(group, block_size, dtype):
    seed = 2000 + 100 * group + block_size
    rng = random.Random(seed)
    # Ragged contexts: with 3 splits over the longest, short ones leave whole splits empty.
    seq_lens = [1, rng.randint(2, 30), rng.randint(60, 100), rng.randint(2, 100)]
    query_lens = [1] * len(seq_lens)
    q, kv_cache, block_table, seq_lens_t, _ = _paged_inputs(
        query_lens, seq_lens, NUM_KV_HEADS * group, 64, block_size, dtype, seed)
    scale = 64 ** -0.5

    out = paged_attention_split_kv(q, kv_cache, block_table, seq_lens_t, scale,
                                   num_splits=3, min_blocks_per_split=1)
    query_start_loc = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    expected = paged_attention_ref(q, kv_cache, block_table, seq_lens_t, query_start_loc, scale)

    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("num_splits,min_blocks", [(1, 1), (2, 1), (7, 1), (4, 2)])
def test_split_kv_decode_split_counts(num_splits, min_blocks):
    """Any split count (7 over 4 blocks: most splits empty; 2 blocks at least per split:
    short contexts use fewer splits) equals the unified kernel on the same decode batch,
    and an empty context (a CUDA graph's padding row) gives zeros, not NaN."""
    seq_lens = [53, 7, 64, 1, 33, 0]
    query_lens = [1] * len(seq_lens)
    q, kv_cache, block_table, seq_lens_t, query_start_loc = _paged_inputs(
        query_lens, seq_lens, 8, 32, 16, torch.float32, num_splits)
    out = paged_attention_split_kv(q, kv_cache, block_table, seq_lens_t, 0.3,
                                   num_splits=num_splits, min_blocks_per_split=min_blocks)
    unified = paged_attention(q, kv_cache, block_table, seq_lens_t, query_start_loc, 0.3,
                              max_query_len=1)
    torch.testing.assert_close(out, unified, atol=2e-5, rtol=2e-5)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def test_num_kv_splits_rule():
    # A full batch never splits; a small batch splits long contexts, not short ones.
    assert num_kv_splits(num_seqs=256, num_kv_heads=8, max_seq_len=4096, block_size=16) == 1
    assert num_kv_splits(num_seqs=128, num_kv_heads=8, max_seq_len=4096, block_size=16) == 1
    assert num_kv_splits(num_seqs=1, num_kv_heads=8, max_seq_len=64, block_size=16) == 1
    assert num_kv_splits(num_seqs=1, num_kv_heads=8, max_seq_len=4096, block_size=16) == 16
    assert num_kv_splits(num_seqs=32, num_kv_heads=8, max_seq_len=4096, block_size=16) == 4
    assert num_kv_splits(num_seqs=32, num_kv_heads=8, max_seq_len=512, block_size=16) == 2
    assert num_kv_splits(num_seqs=1, num_kv_heads=1, max_seq_len=1 << 20, block_size=16) == 32
