"""Sampler: turns one step's logits into next tokens (logit_bias, min_tokens, penalties,
temperature, top-k/top-p/min-p, seeded draws) plus the raw logprobs that requests asked for.

Nothing here reads a device tensor back to the host: the one sync of a step is the caller's
read of the sampled tokens (and logprobs)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.engine.sampling_params import GREEDY_BELOW, SamplingParams

# How many best tokens top-k / top-p look at before a full sort (see _truncate).
_CANDIDATE_SIZES = (64, 1024)
# Rows of prompt logits turned into logprobs at a time, to bound the [rows, V] temporaries.
_PROMPT_LOGPROBS_CHUNK = 256


@dataclass(slots=True)
class SamplingRows:
    """The per-row sampling knobs of one batch as arrays: what the runner's persistent input
    batch keeps for each of its rows, gathered for the rows that sample this step."""

    temperature: np.ndarray  # [B] float32; below GREEDY_BELOW samples greedily
    top_k: np.ndarray  # [B] int64; 0 disables
    top_p: np.ndarray  # [B] float32; 1.0 disables
    min_p: np.ndarray  # [B] float32; 0.0 disables
    repetition_penalty: np.ndarray  # [B] float32; 1.0 disables
    frequency_penalty: np.ndarray  # [B] float32; 0.0 disables
    presence_penalty: np.ndarray  # [B] float32; 0.0 disables
    num_logprobs: np.ndarray  # [B] int64; -1 where no logprobs were asked for
    # Sparse knobs, by batch row: seeded generators, logit_bias, and the stop ids that rows
    # still short of min_tokens may not sample.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    logit_bias: dict[int, dict[int, float]] = field(default_factory=dict)
    blocked_stop_ids: dict[int, Sequence[int]] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams],
                    num_output_tokens: Sequence[int],
                    generators: Sequence[torch.Generator | None]) -> SamplingRows:
        def array(name: str, dtype) -> np.ndarray:
            return np.array([getattr(p, name) for p in params], dtype=dtype)

        return cls(
            temperature=array("temperature", np.float32),
            top_k=array("top_k", np.int64),
            top_p=array("top_p", np.float32),
            min_p=array("min_p", np.float32),
            repetition_penalty=array("repetition_penalty", np.float32),
            frequency_penalty=array("frequency_penalty", np.float32),
            presence_penalty=array("presence_penalty", np.float32),
            num_logprobs=np.array([-1 if p.logprobs is None else p.logprobs for p in params],
                                  dtype=np.int64),
            generators={i: g for i, g in enumerate(generators) if g is not None},
            logit_bias={i: p.logit_bias for i, p in enumerate(params) if p.logit_bias},
            blocked_stop_ids={i: sorted(p.all_stop_token_ids) for i, p in enumerate(params)
                              if num_output_tokens[i] < p.min_tokens},
        )

    def argmax_only(self) -> bool:
        """Every row samples the argmax of the model's own logits and returns nothing else:
        greedy, no logprobs, nothing that edits logits (bias, min_tokens, penalties). Such a
        step reads only each row's best token, never the rest of the distribution."""
        return bool((self.temperature < GREEDY_BELOW).all() and (self.num_logprobs < 0).all()
                    and not has_penalty(self.repetition_penalty, self.frequency_penalty,
                                        self.presence_penalty).any()
                    and not self.logit_bias and not self.blocked_stop_ids)


@dataclass(slots=True)
class SamplingMetadata:
    """Batch tensors for one step.

    Per-row sampling knobs cover only the randomly sampled rows (`random_rows`, R of them);
    a knob nobody uses is None so the sampler skips it. Token-level edits (bias, min_tokens)
    are flat indices `row * vocab_size + token` into the [B, V] logits; penalties are dense
    over the P rows that have any.
    """

    vocab_size: int
    all_greedy: bool
    all_random: bool
    random_rows: torch.Tensor | None  # [R] int64; None when every row is random
    temperature: torch.Tensor | None  # [R, 1] float32; None when all R rows use 1.0
    top_k: torch.Tensor | None  # [R] int64 in [1, V], V where disabled
    max_top_k: int  # largest enabled top_k (0 if none)
    top_p: torch.Tensor | None  # [R] float32, 1.0 where disabled
    min_p: torch.Tensor | None  # [R] float32, 0.0 where disabled
    # With top_k or top_p set: which of the R rows they truncate (None: all of them), and
    # which they leave whole (None: none).
    truncated_rows: torch.Tensor | None
    whole_rows: torch.Tensor | None
    seeded_rows: torch.Tensor | None  # [S] int64 positions among the R random rows
    seeded_generators: list[torch.Generator] = field(default_factory=list)  # [S]
    bias_index: torch.Tensor | None = None  # [N] int64 flat index
    bias_value: torch.Tensor | None = None  # [N] float32
    stop_block_index: torch.Tensor | None = None  # [M] int64 flat index, set to -inf
    penalty_rows: torch.Tensor | None = None  # [P] int64 batch rows with any penalty
    output_counts: torch.Tensor | None = None  # [P, V] float32: each token's output count
    prompt_mask: torch.Tensor | None = None  # [P, V] bool: in the prompt (repetition only)
    repetition_penalty: torch.Tensor | None = None  # [P, 1] float32; None if all 1.0
    frequency_penalty: torch.Tensor | None = None  # [P, 1] float32
    presence_penalty: torch.Tensor | None = None  # [P, 1] float32
    max_num_logprobs: int | None = None  # K; None when no request asked for logprobs

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingMetadata:
        """From whole requests (tests, and callers without an input batch); the runner
        keeps the same state per row and calls from_rows."""
        rows = SamplingRows.from_params(params, [len(o) for o in output_token_ids], generators)
        counts = prompt_mask = None
        penalised = penalty_rows(rows)
        if penalised.size:
            counts, prompt_mask = penalty_state(
                [prompt_token_ids[i] for i in penalised],
                [output_token_ids[i] for i in penalised], vocab_size, device)
        return cls.from_rows(rows, vocab_size, device, counts, prompt_mask)

    @classmethod
    def from_rows(
        cls,
        rows: SamplingRows,
        vocab_size: int,
        device: torch.device,
        output_counts: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> SamplingMetadata:
        """`output_counts` and `prompt_mask` [P, V]: the state of the rows penalty_rows(rows)
        gives, in that order (None when there are none)."""
        V = vocab_size

        def tensor(values, dtype=torch.int64) -> torch.Tensor:
            return host_to_device(values, device, dtype)

        greedy = rows.temperature < GREEDY_BELOW
        random = np.flatnonzero(~greedy)
        all_random = random.size == len(greedy)
        temperature = rows.temperature[random]
        # top_k >= V keeps everything, so it is treated like 0 (disabled).
        ks = rows.top_k[random]
        ks = np.where((ks > 0) & (ks < V), ks, V)
        top_p = rows.top_p[random]
        min_p = rows.min_p[random]
        max_top_k = int(ks[ks < V].max()) if (ks < V).any() else 0
        truncated_mask = (ks < V) | (top_p < 1.0)
        truncated = np.flatnonzero(truncated_mask)
        whole = np.flatnonzero(~truncated_mask)
        # A generator on a greedy row is ignored: greedy draws no random numbers.
        seeded = []
        if rows.generators:
            position = {int(r): j for j, r in enumerate(random)}
            seeded = [(position[i], g) for i, g in sorted(rows.generators.items())
                      if i in position]

        meta = cls(
            vocab_size=V,
            all_greedy=random.size == 0,
            all_random=all_random,
            random_rows=None if all_random else tensor(random),
            temperature=(tensor(temperature, torch.float32).unsqueeze(1)
                         if (temperature != 1.0).any() else None),
            top_k=tensor(ks) if max_top_k else None,
            max_top_k=max_top_k,
            top_p=tensor(top_p, torch.float32) if (top_p < 1.0).any() else None,
            min_p=tensor(min_p, torch.float32) if (min_p > 0.0).any() else None,
            truncated_rows=tensor(truncated) if whole.size else None,
            whole_rows=tensor(whole) if whole.size and truncated.size else None,
            seeded_rows=tensor([r for r, _ in seeded]) if seeded else None,
            seeded_generators=[g for _, g in seeded],
            max_num_logprobs=(int(rows.num_logprobs.max())
                              if (rows.num_logprobs >= 0).any() else None),
        )
        bias = [(i * V + token, value) for i, biases in sorted(rows.logit_bias.items())
                for token, value in biases.items()
                if token < V]  # ids past the model's vocabulary cannot be sampled anyway
        if bias:
            meta.bias_index = tensor([b[0] for b in bias])
            meta.bias_value = tensor([b[1] for b in bias], torch.float32)
        stop_block = [i * V + t for i, stop in sorted(rows.blocked_stop_ids.items())
                      for t in stop if t < V]
        if stop_block:
            meta.stop_block_index = tensor(stop_block)

        penalised = penalty_rows(rows)
        if penalised.size:
            meta.penalty_rows = tensor(penalised)
            meta.output_counts = output_counts
            repetition = rows.repetition_penalty[penalised]
            if (repetition != 1.0).any():
                meta.repetition_penalty = tensor(repetition, torch.float32).unsqueeze(1)
                meta.prompt_mask = prompt_mask
            frequency = rows.frequency_penalty[penalised]
            presence = rows.presence_penalty[penalised]
            if (frequency != 0.0).any() or (presence != 0.0).any():
                meta.frequency_penalty = tensor(frequency, torch.float32).unsqueeze(1)
                meta.presence_penalty = tensor(presence, torch.float32).unsqueeze(1)
        return meta


def has_penalty(repetition, frequency, presence):
    """Whether a repetition, frequency or presence penalty applies: elementwise on arrays
    of the knobs, or for one row's values."""
    return (repetition != 1.0) | (frequency != 0.0) | (presence != 0.0)


def penalty_rows(rows: SamplingRows) -> np.ndarray:
    """Batch rows with a repetition, frequency or presence penalty, ascending."""
    return np.flatnonzero(has_penalty(rows.repetition_penalty, rows.frequency_penalty,
                                      rows.presence_penalty))


def penalty_state(prompt_token_ids: Sequence[Sequence[int]],
                  output_token_ids: Sequence[Sequence[int]], vocab_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(output token counts [N, V] float32, prompt token mask [N, V] bool) of N requests:
    what the runner keeps per row and updates with each sampled token."""
    n = len(prompt_token_ids)
    counts = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
    mask = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
    for i, (prompt, output) in enumerate(zip(prompt_token_ids, output_token_ids)):
        if prompt:
            mask[i, host_to_device(list(prompt), device)] = True
        if output:
            counts[i].index_put_((host_to_device(list(output), device),),
                                 torch.ones(len(output), device=device), accumulate=True)
    return counts, mask


def host_to_device(values, device: torch.device, dtype: torch.dtype | None = torch.int64,
                   ) -> torch.Tensor:
    """A host list or array as a tensor on `device` (on the CPU: the array itself, no copy).
    On a GPU the copy goes through pinned memory of its own, which the allocator keeps
    until the copy has run: the host neither waits for the steps still queued (a copy from
    pageable memory may, and async scheduling's overlap would be lost) nor can change the
    source under a queued copy (the runner's arrays may be views of its input batch)."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cpu":
        return tensor
    staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
    return staged.to(device, non_blocking=True)


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    # The three below are None when no request in the batch asked for logprobs. They are
    # computed for every row; a request that asked for k <= K reads topk[:, :k]. K may be 0,
    # which gives [B, 0] tensors.
    logprobs: torch.Tensor | None  # [B] float32, raw logprob of the sampled token
    topk_token_ids: torch.Tensor | None  # [B, K] int64, best first
    topk_logprobs: torch.Tensor | None  # [B, K] float32


class Sampler:
    """Stateless; the per-request state (generators, token history) arrives in the metadata."""

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[1] != metadata.vocab_size:
            raise ValueError(
                f"logits must be [batch, {metadata.vocab_size}], got {tuple(logits.shape)}"
            )
        logits = logits.float()
        # Returned logprobs describe the model's own distribution (vLLM's raw_logprobs),
        # so they are taken before any processing.
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        processed = apply_logits_processors(logits, metadata)
        sampled = _sample(processed, metadata, owned=processed is not logits)

        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        logprobs = raw_logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
        num_topk = min(metadata.max_num_logprobs, metadata.vocab_size)
        topk_logprobs, topk_ids = raw_logprobs.topk(num_topk, dim=-1)
        return SamplerOutput(sampled, logprobs, topk_ids, topk_logprobs)


def apply_logits_processors(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """logit_bias, min_tokens, then repetition / frequency / presence penalties (vLLM's order).

    Returns `logits` itself when nothing applies, else a processed copy.
    """
    m = metadata
    if m.bias_index is None and m.stop_block_index is None and m.penalty_rows is None:
        return logits
    logits = logits.clone(memory_format=torch.contiguous_format)
    flat = logits.view(-1)
    if m.bias_index is not None:
        flat.index_add_(0, m.bias_index, m.bias_value)
    if m.stop_block_index is not None:
        flat.index_fill_(0, m.stop_block_index, float("-inf"))
    if m.penalty_rows is not None:
        rows = logits[m.penalty_rows]  # [P, V]
        counts = m.output_counts
        if m.repetition_penalty is not None:
            # Every token seen in the prompt or the output so far.
            seen = m.prompt_mask | (counts > 0)
            penalty = m.repetition_penalty
            rows = torch.where(seen, torch.where(rows > 0, rows / penalty, rows * penalty), rows)
        if m.frequency_penalty is not None:
            # Same float32 product as vLLM's `frequency_penalties * output_bin_counts`; unseen
            # tokens subtract exact zeros.
            rows = rows - m.frequency_penalty * counts - m.presence_penalty * (counts > 0)
        logits[m.penalty_rows] = rows
    return logits


def _sample(logits: torch.Tensor, m: SamplingMetadata, owned: bool) -> torch.Tensor:
    """`owned`: the sampler made `logits` itself and may overwrite it."""
    if m.all_greedy:
        return _greedy(logits)
    if m.all_random:
        return _random_sample(logits, m, owned)
    sampled = _greedy(logits)
    sampled[m.random_rows] = _random_sample(logits[m.random_rows], m, owned=True)
    return sampled


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    # Same result as argmax (first index among ties, documented for both) but ~2x faster on CPU.
    return logits.max(dim=-1).indices


def _random_sample(logits: torch.Tensor, m: SamplingMetadata, owned: bool) -> torch.Tensor:
    """Sample rows [R, V] by inverse CDF with one uniform per row.

    One uniform per row keeps a seeded request's draw independent of its neighbours, as an
    exponential race would, without drawing R x V numbers (exponential_ over [64, 49152] takes
    ~50 ms on a CPU core). Each op here treats
    every row on its own, in an order that does not depend on the batch (softmax, cumsum, topk;
    not sum), so a seeded row samples the same token at any batch position.
    """
    if m.temperature is not None:
        logits = logits.div_(m.temperature) if owned else logits / m.temperature
        owned = True
    probs = _softmax(logits, in_place=owned)
    R = probs.shape[0]
    uniforms = torch.rand(R, device=probs.device)
    if m.seeded_rows is not None:
        draws = [torch.rand(1, generator=g, device=g.device) for g in m.seeded_generators]
        uniforms[m.seeded_rows] = torch.cat(draws).to(probs.device)

    if m.top_k is None and m.top_p is None:
        return _sample_whole_rows(probs, m.min_p, uniforms)
    sampled = torch.empty(R, dtype=torch.int64, device=probs.device)
    # Rows that top-k / top-p truncate are sampled among their best candidates, so no [R, V]
    # mask or cumsum is needed for them.
    for rows, values, ids, threshold in _truncate(
        probs, m.truncated_rows, m.top_k, m.max_top_k, m.top_p, m.min_p
    ):
        choice = _inverse_cdf(values * (values >= threshold), uniforms[rows])
        sampled[rows] = ids.gather(1, choice.unsqueeze(1)).squeeze(1)
    if m.whole_rows is not None:
        rows = m.whole_rows
        min_p = None if m.min_p is None else m.min_p[rows]
        sampled[rows] = _sample_whole_rows(probs[rows], min_p, uniforms[rows])
    return sampled


def _softmax(logits: torch.Tensor, in_place: bool) -> torch.Tensor:
    # A second [R, V] float32 temporary costs page faults on CPU (several ms at R=64, V=49k,
    # more than the softmax itself). The CPU last-dim kernel reads each element before it
    # writes it, so out=input is exact there; elsewhere stay out of place.
    if in_place and logits.device.type == "cpu":
        return torch.softmax(logits, dim=-1, out=logits)
    return torch.softmax(logits, dim=-1)


def _sample_whole_rows(
    probs: torch.Tensor, min_p: torch.Tensor | None, uniforms: torch.Tensor
) -> torch.Tensor:
    """Sample from whole rows of probs [R, V] (overwritten), after vLLM's min-p if given."""
    if min_p is not None:
        # masked_fill_ needs only a bool temporary; mul_ by the mask would cast it to float.
        probs.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1), 0.0)
    return _inverse_cdf(probs.cumsum_(dim=-1), uniforms, is_cdf=True)


def _inverse_cdf(
    weights: torch.Tensor, uniforms: torch.Tensor, is_cdf: bool = False
) -> torch.Tensor:
    """Index [R] whose cdf interval holds uniform * total; weights [R, N] need no normalising."""
    cdf = weights if is_cdf else weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total; stay strictly below it so the index found
    # always has non-zero weight (a zero weight never raises the cdf).
    target = torch.minimum(uniforms.unsqueeze(1) * total, torch.nextafter(total, cdf.new_zeros(())))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _truncate(
    probs: torch.Tensor,
    rows: torch.Tensor | None,
    top_k: torch.Tensor | None,
    max_top_k: int,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Apply min-p, then top-k, then top-p (vLLM's order) to `rows` of probs [R, V].

    Yields groups (rows [G], candidate probs [G, k] best first, their token ids [G, k],
    threshold [G, 1]): a row keeps exactly its candidates with prob >= threshold. Each filter
    keeps every token above some value, so one threshold per row expresses all three; ties
    at it are all kept (vLLM keeps top-k ties too; for top-p its sort picks among them
    arbitrarily). Candidates start at the best max(top_k + 1, 64) and widen, for the rows
    that need it, to 1024 and then the whole sorted row: on CPU topk(64) over 50k tokens costs
    ~0.04 ms a row, a full sort ~2 ms, and trained models' nuclei are usually small. Picking
    the rows still pending reads a mask back, free on a CPU but a host sync per stage on a
    GPU, so there every row gets one full sort instead (fast there) and nothing syncs.
    """
    V = probs.shape[1]
    if rows is not None:
        probs = probs[rows]
        top_k, top_p, min_p = (None if t is None else t[rows] for t in (top_k, top_p, min_p))
    n = probs.shape[0]
    staged = probs.device.type == "cpu"
    if staged:
        first = min(V, max(max_top_k + 1, _CANDIDATE_SIZES[0] if top_p is not None else 0))
        values, ids = probs.topk(first, dim=-1)
    else:
        first = V
        values, ids = probs.sort(dim=-1, descending=True)

    floor = probs.new_zeros(n, 1)  # the threshold of min-p and top-k
    if min_p is not None:
        floor = values[:, :1] * min_p.unsqueeze(1)
    if top_k is not None:
        kth = values.gather(1, (top_k.clamp(max=first) - 1).unsqueeze(1))
        floor = torch.maximum(floor, kth.masked_fill(top_k.unsqueeze(1) >= V, 0.0))
    if top_p is not None:
        target = _top_p_target(probs, values, floor, top_p, exact=min_p is None and top_k is None)

    pending = torch.arange(n, device=probs.device)
    for size in [first] + [k for k in (*_CANDIDATE_SIZES[1:], V) if k > first]:
        if size > first:
            if size < V:
                values, ids = probs[pending].topk(size, dim=-1)
            else:
                values, ids = probs[pending].sort(dim=-1, descending=True)
        threshold = floor[pending]
        if top_p is not None:
            weights = values * (values >= threshold)
            cum = weights.cumsum(dim=-1)
            # The nucleus is the prefix of tokens whose preceding mass is < top_p of the
            # survivors' mass; the best token is always in it.
            in_nucleus = ((cum - weights) < target[pending]) & (weights > 0)
            num_keep = in_nucleus.sum(dim=-1, keepdim=True).clamp(min=1)
            cut = values.gather(1, num_keep - 1)
            threshold = torch.where(
                top_p[pending].unsqueeze(1) < 1.0, torch.maximum(threshold, cut), threshold
            )
        if size == V:  # whole rows: every kept token is among the candidates
            yield (pending if rows is None else rows[pending]), values, ids, threshold
            return
        # Done when the candidates hold every kept token: the last one is cut.
        done = values[:, -1] < threshold[:, 0]
        out_rows = pending[done] if rows is None else rows[pending[done]]
        yield out_rows, values[done], ids[done], threshold[done]
        pending = pending[~done]
        if pending.numel() == 0:
            return


def _top_p_target(
    probs: torch.Tensor,
    values: torch.Tensor,
    floor: torch.Tensor,
    top_p: torch.Tensor,
    exact: bool,
) -> torch.Tensor:
    """top_p times the mass that survived min-p / top-k, per row [n, 1]."""
    if exact:
        return top_p.unsqueeze(1)  # softmax sums to 1, as vLLM's top-p assumes too
    # Sum the survivors best first over a fixed head, not the batch-dependent candidate count,
    # so a row's mass (and so its nucleus) does not depend on its neighbours; rows with
    # survivors past the head sum their whole row. cumsum, not sum: torch's CPU sum() orders
    # its additions differently for a lone row.
    whole = probs.device.type != "cpu"  # values are sorted whole rows (see _truncate)
    head = values if whole else values[:, : _CANDIDATE_SIZES[0]]
    survivors = head * (head >= floor)
    mass = survivors.cumsum(dim=-1)[:, -1:]
    if head.shape[1] < probs.shape[1]:
        wide = torch.nonzero(survivors[:, -1] > 0).squeeze(1)
        if wide.numel():
            row_probs = probs[wide]
            row_probs.masked_fill_(row_probs < floor[wide], 0.0)
            mass[wide] = row_probs.cumsum_(dim=-1)[:, -1:]
    return mass * top_p.unsqueeze(1)


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    """`logits` [R, V] with the tokens that min-p, top-k and top-p drop set to -inf.

    The sampler applies the same filter without materialising this tensor. top_k [R] int64
    (0 or >= V disables), top_p [R] (1.0 disables), min_p [R] (0.0 disables).
    """
    R, V = logits.shape
    probs = torch.softmax(logits, dim=-1)
    out = logits.clone()
    cut = torch.zeros(R, dtype=torch.bool, device=logits.device)
    max_top_k = 0
    if top_k is not None:
        top_k = torch.where((top_k <= 0) | (top_k >= V), V, top_k)
        cut |= top_k < V
        max_top_k = int(top_k.masked_fill(top_k >= V, 0).max()) if R else 0
    if top_p is not None:
        cut |= top_p < 1.0
    rows = torch.nonzero(cut).squeeze(1)
    if rows.numel():
        for group, _, _, threshold in _truncate(probs, rows, top_k, max_top_k, top_p, min_p):
            out[group] = out[group].masked_fill(probs[group] < threshold, float("-inf"))
    whole = torch.nonzero(~cut).squeeze(1)
    if min_p is not None and whole.numel():
        p = probs[whole]
        drop = p < p.amax(dim=-1, keepdim=True) * min_p[whole].unsqueeze(1)
        out[whole] = out[whole].masked_fill(drop, float("-inf"))
    return out


def compute_prompt_logprobs(
    logits: torch.Tensor, target_token_ids: torch.Tensor, num_topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw logprobs of the next prompt token at each prompt position.

    logits [T, V], target_token_ids [T] -> (target logprobs [T] float32,
    topk ids [T, K] int64, topk logprobs [T, K] float32), K = num_topk (0 allowed).
    """
    T, V = logits.shape
    num_topk = min(num_topk, V)
    target_logprobs = logits.new_empty(T, dtype=torch.float32)
    topk_ids = torch.empty(T, num_topk, dtype=torch.int64, device=logits.device)
    topk_logprobs = logits.new_empty(T, num_topk, dtype=torch.float32)
    for start in range(0, T, _PROMPT_LOGPROBS_CHUNK):
        end = min(start + _PROMPT_LOGPROBS_CHUNK, T)
        logprobs = torch.log_softmax(logits[start:end].float(), dim=-1)
        targets = target_token_ids[start:end].to(device=logits.device, dtype=torch.int64)
        target_logprobs[start:end] = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        values, ids = logprobs.topk(num_topk, dim=-1)
        topk_logprobs[start:end] = values
        topk_ids[start:end] = ids
    return target_logprobs, topk_ids, topk_logprobs
