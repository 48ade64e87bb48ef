"""Sampler tests: each step of the pipeline against a plain per-row reference, plus seeding,
empirical distributions and logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pagedserve.engine.sampler import (
    Sampler,
    SamplingMetadata,
    _inverse_cdf,
    _truncate,
    apply_logits_processors,
    apply_top_k_top_p_min_p,
    compute_prompt_logprobs,
)
from pagedserve.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def build(params, logits, prompts=None, outputs=None, generators=None):
    B, V = logits.shape
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(B)],
        outputs if outputs is not None else [[] for _ in range(B)],
        generators if generators is not None else [None] * B,
        V,
        CPU,
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- references


def ref_process(row, p: SamplingParams, prompt, output):
    """logit_bias, min_tokens, repetition, frequency, presence: one token at a time."""
    row = row.clone()
    V = row.shape[0]
    for token, bias in (p.logit_bias or {}).items():
        if token < V:
            row[token] += bias
    if len(output) < p.min_tokens:
        for token in p.all_stop_token_ids:
            row[token] = float("-inf")
    for token in set(prompt) | set(output):
        v = row[token]
        row[token] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for token in set(output):
        row[token] = row[token] - p.frequency_penalty * output.count(token)
        row[token] = row[token] - p.presence_penalty
    return row


def ref_kept(row, top_k: int, top_p: float, min_p: float):
    """Tokens that min-p, then top-k, then top-p keep (vLLM order), in float64.

    Returns None when a decision lies within rounding of its boundary, where float32 and
    float64 may legitimately disagree.
    """
    x = row.double()
    V = x.shape[0]
    probs = torch.softmax(x, dim=0)
    keep = torch.ones(V, dtype=torch.bool)
    if min_p > 0:
        bound = min_p * probs.max()
        gap = (probs - bound).abs()
        if ((gap > 0) & (gap < 1e-5 * bound)).any():
            return None
        keep &= probs >= bound
    if 0 < top_k < V and int(keep.sum()) > top_k:
        kth = x[keep].sort(descending=True).values[top_k - 1]
        keep &= x >= kth
    if top_p < 1.0:
        q = torch.where(keep, probs, 0.0)
        q = q / q.sum()
        cum, last = 0.0, None
        for j in torch.argsort(x, descending=True).tolist():
            if not keep[j]:
                continue
            if last is not None and abs(cum - top_p) < 1e-5:
                return None
            if last is not None and cum >= top_p:
                break
            last = j
            cum += float(q[j])
        keep &= x >= x[last]
    return keep


# ---------------------------------------------------------------- greedy


def test_greedy_is_exactly_argmax_including_ties():
    torch.manual_seed(0)
    logits = torch.randn(16, 1000)
    logits[3, [10, 500, 999]] = 50.0  # ties: argmax takes the first
    logits[5] = 1.0
    md = build([SamplingParams(temperature=0.0)] * 16, logits)
    assert md.all_greedy
    out = Sampler()(logits, md)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.sampled_token_ids[3] == 10 and out.sampled_token_ids[5] == 0
    assert out.logprobs is None and out.topk_token_ids is None and out.topk_logprobs is None


def test_mixed_batch_greedy_rows_are_argmax_of_processed_logits():
    torch.manual_seed(1)
    logits = torch.randn(6, 300)
    params = [
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(temperature=1.3),
    ]
    prompts = [[1, 2]] * 6
    outputs = [[int(logits[4].argmax())]] * 6
    md = build(params, logits, prompts, outputs)
    assert not md.all_greedy and not md.all_random
    sampled = Sampler()(logits, md).sampled_token_ids
    processed = apply_logits_processors(logits, md)
    for i in (0, 2, 4):
        assert sampled[i] == processed[i].argmax()
    assert sampled[0] == 7
    assert sampled[4] != logits[4].argmax()  # the penalised former winner lost


# ---------------------------------------------------------------- processors


def test_logits_processors_match_reference():
    torch.manual_seed(2)
    V = 60
    logits = torch.randn(7, V) * 3
    stop = {0, 5}
    params = [
        SamplingParams(logit_bias={3: 5.0, 59: -100.0, 1000: 7.0}),  # 1000 >= V: ignored
        SamplingParams(min_tokens=4),
        SamplingParams(min_tokens=2),
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(repetition_penalty=0.6, frequency_penalty=0.3),
        SamplingParams(frequency_penalty=-1.1, presence_penalty=0.9, logit_bias={11: 1.5}),
        SamplingParams(temperature=0.0, presence_penalty=-2.0, repetition_penalty=1.2),
    ]
    for p in params:
        p.all_stop_token_ids = set(stop)
    prompts = [[1, 2, 3, 3, 40], [4], [], [8, 9, 10, 8], [20, 21], [30], [2, 2, 2]]
    outputs = [[3], [5, 7], [9, 9, 9], [11, 8, 12], [21, 21, 22, 23, 21], [30, 31, 30], []]
    md = build(params, logits, prompts, outputs)
    original = logits.clone()
    got = apply_logits_processors(logits, md)
    want = torch.stack(
        [ref_process(logits[i], params[i], prompts[i], outputs[i]) for i in range(len(params))]
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.isinf(got[1, list(stop)]).all() and torch.isfinite(got[2]).all()
    assert torch.equal(logits, original)  # the caller's logits are not modified


def test_fast_path_builds_nothing_nobody_asked_for():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(seed=1)]
    md = build(params, logits, [[1, 2]] * 3, [[3]] * 3)
    for name in (
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "seeded_rows",
        "bias_index",
        "stop_block_index",
        "penalty_rows",
        "output_counts",
    ):
        assert getattr(md, name) is None, name
    assert md.max_num_logprobs is None
    assert apply_logits_processors(logits, md) is logits


def test_min_tokens_blocks_every_stop_id_until_reached():
    V = 40
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0  # EOS would win greedily
    logits[:, 9] = 9.0  # a stop_token_id, next best
    logits[:, 17] = 8.0
    params = [SamplingParams(temperature=0.0, min_tokens=3) for _ in range(3)]
    for p in params:
        p.all_stop_token_ids = {2, 9}
    outputs = [[], [4, 4], [4, 4, 4]]
    sampled = Sampler()(logits, build(params, logits, outputs=outputs)).sampled_token_ids
    assert sampled.tolist() == [17, 17, 2]


# ---------------------------------------------------------------- top-k / top-p / min-p


FILTER_CASES = [
    # (logit scale, top_k, top_p, min_p)
    (3.0, 5, 1.0, 0.0),
    (3.0, 0, 0.9, 0.0),
    (0.2, 0, 0.9, 0.0),  # flat: nucleus of ~90% of the vocab, past every candidate size
    (1.0, 0, 0.5, 0.0),  # nucleus between the first and second candidate sizes
    (3.0, 0, 1.0, 0.1),
    (3.0, 20, 0.8, 0.0),
    (3.0, 0, 0.7, 0.05),
    (1.0, 200, 0.95, 0.01),
    (6.0, 3000, 0.3, 0.0),  # top_k >= V is disabled
    (3.0, 1, 1.0, 0.0),
    (3.0, 0, 1e-6, 0.0),  # keeps at least the best token
    (3.0, 0, 1.0, 1.0),
]


def test_filters_match_reference():
    torch.manual_seed(3)
    V = 3000
    scales = torch.tensor([c[0] for c in FILTER_CASES]).unsqueeze(1)
    logits = torch.randn(len(FILTER_CASES), V) * scales
    top_k = torch.tensor([c[1] for c in FILTER_CASES])
    top_p = torch.tensor([c[2] for c in FILTER_CASES])
    min_p = torch.tensor([c[3] for c in FILTER_CASES])
    kept = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p).isfinite()
    checked = 0
    for i, (_, k, p, mp) in enumerate(FILTER_CASES):
        want = ref_kept(logits[i], k, p, mp)
        if want is None:
            continue
        checked += 1
        assert torch.equal(kept[i], want), (FILTER_CASES[i], int(kept[i].sum()), int(want.sum()))
    assert checked == len(FILTER_CASES)
    sizes = kept.sum(dim=-1).tolist()
    assert sizes[0] == 5 and sizes[2] > 1024 and 64 < sizes[3] < 1024 and sizes[9] == 1
    assert sizes[10] == 1 and sizes[11] == 1


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    num_rows=st.integers(1, 4),
    vocab=st.integers(2, 130),
)
def test_filters_match_reference_property(data, num_rows, vocab):
    # Values from a coarse grid so that ties happen; a scale makes rows flat or peaked.
    grid = st.integers(-40, 40).map(lambda v: v / 8)
    logits = torch.tensor(
        [data.draw(st.lists(grid, min_size=vocab, max_size=vocab)) for _ in range(num_rows)]
    ) * data.draw(st.sampled_from([0.2, 1.0, 4.0]))
    top_k = data.draw(st.lists(st.integers(0, vocab + 2), min_size=num_rows, max_size=num_rows))
    top_p = data.draw(
        st.lists(st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.13]), min_size=num_rows, max_size=num_rows)
    )
    min_p = data.draw(
        st.lists(st.sampled_from([0.0, 0.02, 0.3, 0.77]), min_size=num_rows, max_size=num_rows)
    )
    want = [ref_kept(logits[i], top_k[i], top_p[i], min_p[i]) for i in range(num_rows)]
    assume(all(w is not None for w in want))
    got = apply_top_k_top_p_min_p(
        logits, torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p)
    ).isfinite()
    assert torch.equal(got, torch.stack(want))


def test_samples_never_leave_the_kept_set():
    torch.manual_seed(4)
    V, per_group = 3000, 60
    groups = [
        (0.5, SamplingParams(top_k=40, top_p=0.6, min_p=0.02)),  # candidates
        (0.5, SamplingParams(min_p=0.3)),  # whole row, masked
        (0.2, SamplingParams(top_p=0.9)),  # flat: widens to a full sort
        (0.5, SamplingParams(top_k=200)),
        (0.5, SamplingParams(temperature=0.7)),  # whole row, unfiltered
    ]
    rows = torch.randn(len(groups), V) * torch.tensor([g[0] for g in groups]).unsqueeze(1)
    logits = rows.repeat_interleave(per_group, dim=0)
    params = [p for _, p in groups for _ in range(per_group)]
    sampled = Sampler()(logits, build(params, logits)).sampled_token_ids.view(len(groups), -1)
    for i, (_, p) in enumerate(groups):
        kept = ref_kept(rows[i] / p.temperature, p.top_k, p.top_p, p.min_p)
        assert kept[sampled[i]].all(), p
        assert len(set(sampled[i].tolist())) > 1, p


def test_small_top_k_and_narrow_nuclei_need_no_sort():
    torch.manual_seed(9)
    probs = torch.softmax(torch.randn(4, 5000) * 4, dim=-1)
    top_k = torch.tensor([10, 5000, 3, 5000])
    top_p = torch.tensor([1.0, 0.5, 0.9, 0.3])
    groups = list(_truncate(probs, None, top_k, 10, top_p, None))
    assert len(groups) == 1  # every row resolved among its first candidates
    rows, values, ids, _ = groups[0]
    assert sorted(rows.tolist()) == [0, 1, 2, 3] and values.shape == (4, 64)
    groups = list(_truncate(probs, torch.tensor([0, 2]), top_k, 10, None, None))
    assert len(groups) == 1 and groups[0][1].shape == (2, 11)


def test_inverse_cdf_never_picks_a_zero_weight_token():
    probs = torch.tensor([[0.0, 1.0, 3.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]])
    uniforms = torch.tensor([1.0 - 2.0**-24, 1.0 - 2.0**-24])
    assert _inverse_cdf(probs.clone(), uniforms).tolist() == [2, 0]
    assert _inverse_cdf(probs.clone(), torch.zeros(2)).tolist() == [1, 0]


# ---------------------------------------------------------------- seeding


def _seeded_run(request, rows_before, neighbours, logits_row, steps=6):
    """Tokens sampled for one seeded request placed after `rows_before` neighbours."""
    params = neighbours[:rows_before] + [request] + neighbours[rows_before:]
    gens = [seeded(1000 + i) if q.seed is not None else None for i, q in enumerate(params)]
    gens[rows_before] = seeded(request.seed)
    logits = torch.randn(len(params), logits_row.shape[0]) * 3
    logits[rows_before] = logits_row
    md = build(params, logits, generators=gens)
    sampler = Sampler()
    return [int(sampler(logits, md).sampled_token_ids[rows_before]) for _ in range(steps)]


def test_seeded_request_is_independent_of_batch_position_and_neighbours():
    torch.manual_seed(5)
    V = 1000
    flat_row = torch.randn(V)
    peaked_row = torch.randn(V)
    peaked_row[:20] += 8.0  # nucleus within the first candidates
    neighbours = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_k=100, seed=3),  # widens the batch's candidates
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=2.0, top_p=0.3, min_p=0.1),
        SamplingParams(temperature=0.8, seed=9, frequency_penalty=0.5),
    ]
    requests = [
        SamplingParams(temperature=0.9, top_p=0.95, seed=7),
        SamplingParams(temperature=0.9, top_p=0.9, min_p=0.001, seed=7),
        SamplingParams(temperature=1.1, top_k=30, seed=7),
        SamplingParams(temperature=1.0, min_p=0.2, seed=7),
        SamplingParams(temperature=1.0, seed=7),
    ]
    for request in requests:
        other_seed = SamplingParams(**{**_fields(request), "seed": 8})
        for row in (flat_row, peaked_row):
            alone = _seeded_run(request, 0, [], row)
            assert len(set(alone)) > 1, request  # the draws are random at all
            assert _seeded_run(request, 3, neighbours, row) == alone, request
            assert _seeded_run(request, 5, neighbours, row) == alone, request
            assert _seeded_run(request, 1, neighbours[3:], row) == alone, request
            assert _seeded_run(other_seed, 2, neighbours, row) != alone, request


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in ("temperature", "top_p", "top_k", "min_p", "seed")}


# ---------------------------------------------------------------- distributions


def _empirical(logits_row, p: SamplingParams, n: int):
    logits = logits_row.expand(n, -1).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(6)
        sampled = Sampler()(logits, build([p] * n, logits)).sampled_token_ids
    return torch.bincount(sampled, minlength=logits.shape[1]).double()


def _chi_square(counts, probs):
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum())


def test_temperature_sampling_matches_softmax():
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7])
    n = 20_000
    counts = _empirical(row, SamplingParams(temperature=0.7), n)
    probs = torch.softmax(row.double() / 0.7, dim=0)
    # 7 degrees of freedom: P(chi2 > 30) ~ 1e-4; the seed is fixed, so this cannot flake.
    assert _chi_square(counts, probs) < 30.0


def test_filtered_sampling_matches_renormalised_softmax():
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7])
    n = 20_000
    p = SamplingParams(temperature=1.5, top_k=6, top_p=0.8)
    counts = _empirical(row, p, n)
    scaled = row / 1.5
    kept = ref_kept(scaled, 6, 0.8, 0.0)
    probs = torch.softmax(torch.where(kept, scaled.double(), float("-inf")), dim=0)
    assert 1 < int(kept.sum()) < 6
    assert _chi_square(counts, probs) < 30.0


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_and_topk_sorted():
    torch.manual_seed(7)
    V = 200
    logits = torch.randn(4, V) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=2, logit_bias={5: 30.0}),
        SamplingParams(temperature=0.5, top_p=0.8, logprobs=5, repetition_penalty=1.5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=0),
    ]
    md = build(params, logits, [[1, 2, 3]] * 4, [[4]] * 4)
    out = Sampler()(logits, md)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.sampled_token_ids[0] == 5
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.sampled_token_ids[:, None])[:, 0])
    assert out.topk_logprobs.shape == (4, 5) and out.topk_token_ids.dtype == torch.int64
    want_values, want_ids = torch.topk(raw, 5, dim=-1)
    torch.testing.assert_close(out.topk_logprobs, want_values)
    assert torch.equal(out.topk_token_ids, want_ids)
    assert (out.topk_logprobs[:, :-1] >= out.topk_logprobs[:, 1:]).all()


def test_zero_logprobs_gives_empty_topk():
    logits = torch.randn(2, 30)
    out = Sampler()(logits, build([SamplingParams(logprobs=0), SamplingParams()], logits))
    assert out.topk_token_ids.shape == (2, 0) and out.topk_logprobs.shape == (2, 0)
    assert out.logprobs.shape == (2,)


def test_compute_prompt_logprobs_matches_reference():
    torch.manual_seed(8)
    T, V = 600, 50  # more rows than one internal chunk
    logits = torch.randn(T, V) * 3
    targets = torch.randint(0, V, (T,))
    got, ids, values = compute_prompt_logprobs(logits, targets, 4)
    for t in (0, 255, 256, 599):
        ref = [logits[t, j] - math.log(float(logits[t].exp().sum())) for j in range(V)]
        assert got[t].item() == pytest.approx(float(ref[targets[t]]), abs=1e-5)
        order = sorted(range(V), key=lambda j: -ref[j])[:4]
        assert ids[t].tolist() == order
        assert values[t].tolist() == pytest.approx([float(ref[j]) for j in order], abs=1e-5)
    empty = compute_prompt_logprobs(logits, targets, 0)
    assert empty[1].shape == (T, 0) and empty[2].shape == (T, 0)
    torch.testing.assert_close(empty[0], got)


def test_rejects_logits_of_the_wrong_vocabulary():
    logits = torch.randn(2, 30)
    md = build([SamplingParams()] * 2, logits)
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(torch.randn(2, 31), md)
