"""The torch attention backend against a per-token reference over random paged caches:
ragged mixes of decodes and prefill chunks (with and without cached context), GQA."""

import math

import pytest
import torch

from pagedserve.engine.attention import AttentionMetadata, torch_backend
from pagedserve.engine.attention.torch_backend import (
    TorchAttentionBackend,
    attend_single,
    single_decode,
)
from pagedserve.engine.models.mkl_packed import mkl_packing_available, pack_weight, packed_linear
from pagedserve.kernels import cpu_decode_attention, cpu_extension


def reference(q, k_ctx, v_ctx, scale):
    """One query [H, D] over its context [L, Hkv, D], GQA by repeating KV heads."""
    group = q.shape[0] // k_ctx.shape[1]
    k = k_ctx.repeat_interleave(group, dim=1)
    v = v_ctx.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q, k) * scale
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


# (context already cached, new tokens) of each sequence in the batch.
BATCHES = {
    # decodes, fresh prefills, chunks mid-block
    "mixed": [(0, 7), (10, 1), (37, 1), (3, 1), (0, 1), (5, 9), (120, 1), (13, 3), (64, 1)],
    # one decode bucket in batch order: the whole-batch path (_decode_whole)
    "single stream": [(120, 1)],
    "like decodes": [(40, 1), (41, 1), (46, 1)],
    "like decodes, out of context order": [(46, 1), (40, 1), (41, 1)],  # whole, unsorted
    "decodes in two buckets, out of order": [(300, 1), (2, 1), (250, 1), (30, 1)],
    "single stream, block boundary": [(63, 1)],  # its token fills the block's last slot
}


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "sdpa"])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_matches_reference(num_heads, num_kv_heads, cache_dtype, batch, kernel, monkeypatch):
    """fp32 activations over an fp32 cache, or over a bf16 one (--kv-cache-dtype bfloat16):
    the new K/V are stored rounded, and attention over the cache runs in its dtype (SDPA) or
    in fp32 from it (the CPU decode kernel). Decodes go through the kernel where it is
    built, else through SDPA over gathered contexts."""
    if kernel:
        assert cpu_decode_attention.available(), "the CPU decode kernel did not build"
    else:
        monkeypatch.setattr(torch_backend, "decode_kernel_available", lambda: False)
    # attend_single (the compiled one-token graph's attention) takes the same path.
    monkeypatch.setattr(torch_backend, "_single_decode_kernel", kernel)
    gen = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    head_dim, block_size, num_blocks = 16, 4, 300
    seqs = BATCHES[batch]
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim,
                           generator=gen).to(cache_dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # random, large block ids
    tables, slots, qsl, seq_lens = [], [], [0], []
    for cached, new in seqs:
        total = cached + new
        blocks = [perm.pop() for _ in range(math.ceil(total / block_size))]
        tables.append(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size
                  for p in range(cached, total)]
        qsl.append(qsl[-1] + new)
        seq_lens.append(total)
    num_tokens = qsl[-1]
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    width = max(len(t) for t in tables)
    md = AttentionMetadata(
        num_tokens=num_tokens,
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        block_size=block_size,
        query_start_loc_cpu=qsl,
        query_lens_cpu=[n for _, n in seqs],
        seq_lens_cpu=seq_lens,
        max_query_len=max(n for _, n in seqs),
        max_seq_len=max(seq_lens),
    )
    backend = TorchAttentionBackend(num_heads, num_kv_heads)
    backend.prepare(md)
    if kernel:
        assert md.backend_state.paged is not None and not md.backend_state.decodes
    elif batch.startswith("like decodes"):  # one bucket: in batch order, whatever its contexts
        assert [b.token_index for b in md.backend_state.decodes] == [None]
    scale = head_dim**-0.5
    before = kv_cache.clone()
    out = backend.forward(q, k, v, kv_cache, md, scale)
    if num_tokens == 1:
        # The compiled forward's one-token attention (in its graph; here eagerly): the same
        # cache write, the same result.
        own = attend_single(q, k, v, before, single_decode(md, num_blocks), scale)
        assert torch.equal(before, kv_cache)
        torch.testing.assert_close(own, out, atol=1e-5, rtol=1e-5)

    for i, (cached, new) in enumerate(seqs):
        # The context as the cache holds it after the write (the backend wrote k/v).
        ids = torch.tensor(tables[i])
        k_ctx = kv_cache[0, ids].reshape(-1, num_kv_heads, head_dim).float()
        v_ctx = kv_cache[1, ids].reshape(-1, num_kv_heads, head_dim).float()
        assert torch.equal(k_ctx[cached:cached + new],
                           k[qsl[i]:qsl[i + 1]].to(cache_dtype).float())
        # A fresh prefill attends over its own K/V as computed; everything else over the
        # cache, in bf16 when the cache is bf16.
        fresh = cached == 0 and new > 1
        tol = 1e-5 if fresh or cache_dtype == torch.float32 else 3e-2
        for j in range(new):
            pos, row = cached + j, qsl[i] + j
            if fresh:
                keys, values = k[qsl[i]:row + 1], v[qsl[i]:row + 1]
            else:
                keys, values = k_ctx[:pos + 1], v_ctx[:pos + 1]
            expected = reference(q[row], keys, values, scale)
            torch.testing.assert_close(out[row], expected, atol=tol, rtol=tol)
    assert out.dtype == q.dtype


@pytest.mark.skipif(not mkl_packing_available(), reason="this torch build has no MKL")
@pytest.mark.parametrize("rows", [1, 3, 32, 300])
def test_packed_linear_matches_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=gen)
    bias = torch.randn(96, generator=gen)
    x = torch.randn(rows, 40, generator=gen)
    expected = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(packed_linear(x, weight, pack_weight(weight), bias), expected,
                               atol=1e-4, rtol=1e-5)


def test_dummy_prefill_for_gpu_memory_profiling(tiny_dir):
    """The step the GPU KV sizing profiles (ModelRunner.dummy_prefill): a full token budget
    split at max_model_len, every token's slot is where its block table says, and the
    model runs on it (here on CPU, through the torch backend)."""
    from pagedserve.engine import LLM

    llm = LLM(model=str(tiny_dir), skip_tokenizer_init=True, max_model_len=100)
    runner = llm.llm_engine.model_runner
    input_ids, positions, caches, md = runner.dummy_prefill(250)
    assert md.seq_lens_cpu == [100, 100, 50] and md.query_start_loc_cpu == [0, 100, 200, 250]
    bs = md.block_size
    for seq, start in enumerate(md.query_start_loc_cpu[:-1]):
        for pos in range(md.seq_lens_cpu[seq]):
            block = int(md.block_table[seq, pos // bs])
            assert int(md.slot_mapping[start + pos]) == block * bs + pos % bs
            assert int(positions[start + pos]) == pos
    runner.attn_backend.prepare(md)
    hidden = runner.model(input_ids, positions, caches, md)
    assert hidden.shape[0] == 250 and torch.isfinite(hidden).all()


def test_cpu_kernels_that_cannot_build_leave_torchs_ops(monkeypatch, caplog):
    """No compiler or ninja: a warning, and no kernels (the backend then takes SDPA, the
    quantized layers torch's int4 kernel)."""
    import torch.utils.cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", fail)
    with caplog.at_level("WARNING"):
        assert cpu_extension.module.__wrapped__() is None  # the uncached build
    assert "using torch's ops" in caplog.text and "no C++ compiler here" in caplog.text


def _decode_inputs(num_heads=4, num_kv_heads=2, head_dim=16, ctx=40):
    """One sequence's decode: q [1, H, D], a bf16 cache of 20 blocks of 4, its block table
    row, context length and output row."""
    cache = torch.randn(2, 20, 4, num_kv_heads, head_dim).bfloat16()
    table = torch.arange(19, 19 - (ctx + 3) // 4, -1, dtype=torch.int32)[None]
    return (torch.randn(1, num_heads, head_dim), cache, table,
            torch.tensor([ctx], dtype=torch.int32), torch.zeros(1, dtype=torch.int64))


def test_cpu_decode_kernels_refuse_what_would_read_outside_their_tensors():
    """Every row, block and slot the kernels would read is checked first: a bad call is a
    RuntimeError, not a read past the cache (or uninitialised output)."""
    assert cpu_decode_attention.available(), "the CPU decode kernel did not build"
    q, cache, table, ctx, rows = _decode_inputs()
    out = torch.empty_like(q)

    def batched(q=q, cache=cache, table=table, ctx=ctx, rows=rows):
        cpu_decode_attention.decode_attention(torch.empty_like(q), q, cache, table, ctx, rows,
                                              0.25, None)

    batched()  # the good call
    for bad, match in [
        (dict(q=torch.randn(1, 4, 32)), "do not fit"),  # head size 32 over a 16 cache
        (dict(q=torch.randn(1, 5, 16)), "do not fit"),  # 5 heads over 2 KV heads
        (dict(cache=cache[0]), r"\[2, blocks"),  # a 4-D view
        (dict(ctx=torch.tensor([0], dtype=torch.int32)), "context 0"),
        (dict(ctx=torch.tensor([41], dtype=torch.int32)), "context 41"),  # past its table
        (dict(rows=torch.tensor([1])), "row 1"),
        (dict(table=table.clone().fill_(20)), "block 20"),
        (dict(table=table.clone().fill_(-1)), "block -1"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            batched(**bad)
    single = torch.ops.pagedserve_cpu.decode_single
    slots = torch.arange(40, dtype=torch.int32)
    torch.testing.assert_close(single(q, cache, slots, 0.25), single(q, cache, slots, 0.25))
    for bad_slots, match in [(torch.tensor([80], dtype=torch.int32), "slot 80"),
                             (torch.tensor([-1], dtype=torch.int32), "slot -1"),
                             (torch.tensor([], dtype=torch.int32), "slots")]:
        with pytest.raises(RuntimeError, match=match):
            single(q, cache, bad_slots, 0.25)
    with pytest.raises(RuntimeError, match="do not fit"):
        single(torch.randn(1, 4, 32), cache, slots, 0.25)
    assert out.shape == q.shape


def test_cpu_decode_kernel_lets_other_python_threads_run():
    """The batched decode kernel runs without the GIL: the server's event loop shares the
    process with the engine's thread, which calls it once a layer a step. With forced
    switches off, another thread can run during the call only if the call lets the GIL go."""
    import sys
    import threading

    assert cpu_decode_attention.available(), "the CPU decode kernel did not build"
    cache = torch.randn(2, 64 * 500, 4, 4, 64).bfloat16()
    table = torch.arange(64 * 500, dtype=torch.int32).view(64, 500)
    q = torch.randn(64, 8, 64)
    lens = torch.full((64,), 2000, dtype=torch.int32)
    out, rows = torch.empty_like(q), torch.arange(64)  # (torch's own ops let the GIL go)
    go, done, ran = threading.Event(), threading.Event(), []

    def other():
        go.wait()
        ran.append(True)
        done.wait()

    thread = threading.Thread(target=other)
    thread.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(100)
    try:
        go.set()
        # A busy host may not wake the thread within one call: a few more (holding the GIL,
        # no number of calls would let it run).
        for _ in range(40):
            cpu_decode_attention.decode_attention(out, q, cache, table, lens, rows, 0.125, None)
            if ran:
                break
        ran_during_the_call = bool(ran)
    finally:
        sys.setswitchinterval(interval)
        done.set()
        thread.join()
    assert ran_during_the_call


@pytest.mark.parametrize("head_dim", [64, 128, 48])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_decode_kernels_at_the_head_sizes_they_specialise(head_dim, cache_dtype):
    """Head sizes 64 and 128 compile to their own loops (48: the general one); both ops, GQA
    8 over 2, against the reference, with contexts of 1 token to a few blocks; decode_single
    also with a bf16 query (its output then bf16)."""
    assert cpu_decode_attention.available(), "the CPU decode kernel did not build"
    gen = torch.Generator().manual_seed(head_dim)
    block_size, num_blocks, heads, kv_heads = 16, 24, 8, 2
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    cache = cache.to(cache_dtype)
    lens = [1, 17, 100]
    table = torch.randperm(num_blocks, generator=gen, dtype=torch.int32)[:21].view(3, 7)
    q = torch.randn(3, heads, head_dim, generator=gen)
    out = torch.empty_like(q)
    ctx_lens = torch.tensor(lens, dtype=torch.int32)
    cpu_decode_attention.decode_attention(out, q, cache, table, ctx_lens, torch.arange(3), 0.1,
                                          None)
    for s, n in enumerate(lens):
        slots = torch.stack([table[s, t // block_size] * block_size + t % block_size
                             for t in range(n)]).int()
        flat = cache.float().view(2, -1, kv_heads, head_dim)
        expected = reference(q[s], flat[0, slots.long()], flat[1, slots.long()], 0.1)
        torch.testing.assert_close(out[s], expected, rtol=1e-4, atol=1e-4)
        single = torch.ops.pagedserve_cpu.decode_single(q[s:s + 1], cache, slots, 0.1)
        torch.testing.assert_close(single[0], expected, rtol=1e-4, atol=1e-4)
        half = torch.ops.pagedserve_cpu.decode_single(q[s:s + 1].bfloat16(), cache, slots, 0.1)
        assert half.dtype == torch.bfloat16
        expected_half = reference(q[s].bfloat16().float(), flat[0, slots.long()],
                                  flat[1, slots.long()], 0.1)
        torch.testing.assert_close(half[0].float(), expected_half, rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("head_dim", [64, 128, 48])
def test_cpu_decode_kernels_keep_nan(head_dim):
    """A NaN in a query or a key makes that query's output NaN, as in SDPA, in the vector
    path (64, 128) as in the plain loops (48): not a finite answer from a broken model."""
    assert cpu_decode_attention.available(), "the CPU decode kernel did not build"
    cache = torch.randn(2, 4, 16, 2, head_dim)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    lens = torch.tensor([20, 30], dtype=torch.int32)
    q = torch.randn(2, 4, head_dim)
    q[0, 1, 5] = float("nan")  # sequence 0, head 1 (KV head 0)
    cache[0, 2, 3, 1, 7] = float("nan")  # a key of sequence 1's KV head 1 (its heads 2, 3)
    out = torch.empty_like(q)
    cpu_decode_attention.decode_attention(out, q, cache, table, lens, torch.arange(2), 0.1,
                                          None)
    assert out[0, 1].isnan().all() and out[1, 2:].isnan().all()
    assert not out[0, [0, 2, 3]].isnan().any() and not out[1, :2].isnan().any()
    slots = torch.arange(32, 32 + 30, dtype=torch.int32)
    single = torch.ops.pagedserve_cpu.decode_single(q[1:], cache, slots, 0.1)
    assert single[0, 2:].isnan().all() and not single[0, :2].isnan().any()
