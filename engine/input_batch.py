"""The model runner's persistent input batch: one row per scheduled-and-running request,
kept from step to step. Rows are added, removed and condensed as the scheduler's diffs say,
never rebuilt, so preparing a step costs O(batch), not O(batch x context)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from pagedserve.engine.sampler import (
    SamplingRows,
    has_penalty,
    host_to_device,
    penalty_rows,
    penalty_state,
)
from pagedserve.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class CachedRequestState:
    """What the runner keeps of a request from admission until it finishes (preempted ones
    included: their generator and tokens survive until they are resumed)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator | None
    output_token_ids: list[int]  # filled when its row is given up (preemption)
    num_prompt_logprobs_done: int = 0  # prompt positions whose logprobs were computed


@dataclass(slots=True)
class StepInputs:
    """One step's flat varlen batch as host arrays, rows in batch order."""

    rows: np.ndarray  # [S] batch rows scheduled this step, ascending
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [S + 1] int32
    seq_lens: np.ndarray  # [S] int32
    query_lens: np.ndarray  # [S] int32
    block_table: np.ndarray  # [S, max blocks this step] int32 (a view when it can be)
    logits_indices: np.ndarray  # [B] flat index of each sampling row's last token
    sample_rows: np.ndarray  # [B] batch rows that sample this step
    sample_request_ids: list[str]
    # (request state, flat offset, first prompt position, count) for prompt logprobs.
    prompt_logprobs: list[tuple[CachedRequestState, int, int, int]]


@dataclass(slots=True)
class Reservation:
    """Where a launched step's sampled tokens go once they are on the host."""

    req_ids: list[str]  # the requests that sample, batch order
    rows: np.ndarray  # [B] their rows at launch
    positions: np.ndarray  # [B] each one's token index in its row
    layout: int  # InputBatch.layout at launch: while unchanged, `rows` still hold them


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, block_size: int,
                 vocab_size: int, device: torch.device) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        self.req_ids: list[str | None] = []  # by row; None marks a hole until condensed
        self.layout = 0  # bumped whenever a row changes hands (add, remove, condense)
        self.req_id_to_index: dict[str, int] = {}
        self.states: list[CachedRequestState | None] = []
        max_blocks = -(-max_model_len // block_size)
        # np.zeros is calloc: pages arrive as rows grow into them, so a long max_model_len
        # costs address space, not memory.
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        # Sampling knobs per row, gathered for the sampling rows each step.
        self.sampling = SamplingRows(
            temperature=np.ones(max_num_reqs, dtype=np.float32),
            top_k=np.zeros(max_num_reqs, dtype=np.int64),
            top_p=np.ones(max_num_reqs, dtype=np.float32),
            min_p=np.zeros(max_num_reqs, dtype=np.float32),
            repetition_penalty=np.ones(max_num_reqs, dtype=np.float32),
            frequency_penalty=np.zeros(max_num_reqs, dtype=np.float32),
            presence_penalty=np.zeros(max_num_reqs, dtype=np.float32),
            num_logprobs=np.full(max_num_reqs, -1, dtype=np.int64),
        )
        self.min_tokens: dict[int, int] = {}  # row -> min_tokens, for rows that set it
        self.prompt_logprobs_rows: set[int] = set()
        # Penalty state, allocated with the first penalised request: per row, each token's
        # count among the outputs and whether it is in the prompt, updated with each token.
        self.output_counts: torch.Tensor | None = None  # [max_num_reqs, V] float32
        self.prompt_mask: torch.Tensor | None = None  # [max_num_reqs, V] bool

    # ---- rows -----------------------------------------------------------------------
    def add(self, state: CachedRequestState, num_computed_tokens: int,
            block_ids: list[int]) -> None:
        """Give the request a row (the first hole, else a new one at the end) with its
        block table so far."""
        try:
            row = self.req_ids.index(None)
        except ValueError:
            row = len(self.req_ids)
            if row == self.max_num_reqs:
                raise RuntimeError(f"the input batch is full ({self.max_num_reqs} rows)") from None
            self.req_ids.append(None)
            self.states.append(None)
        self.req_ids[row], self.states[row] = state.request_id, state
        self.req_id_to_index[state.request_id] = row
        self.layout += 1
        prompt, output = state.prompt_token_ids, state.output_token_ids
        num_tokens = len(prompt) + len(output)
        self.token_ids[row, :len(prompt)] = prompt
        self.token_ids[row, len(prompt):num_tokens] = output
        self.num_tokens[row] = num_tokens
        self.num_prompt_tokens[row] = len(prompt)
        self.num_computed_tokens[row] = num_computed_tokens
        self.num_blocks[row] = 0
        self.append_blocks(row, block_ids)

        p, s = state.sampling_params, self.sampling
        s.temperature[row], s.top_k[row], s.top_p[row], s.min_p[row] = (
            p.temperature, p.top_k, p.top_p, p.min_p)
        s.repetition_penalty[row] = p.repetition_penalty
        s.frequency_penalty[row] = p.frequency_penalty
        s.presence_penalty[row] = p.presence_penalty
        s.num_logprobs[row] = -1 if p.logprobs is None else p.logprobs
        if state.generator is not None:
            s.generators[row] = state.generator
        if p.logit_bias:
            s.logit_bias[row] = p.logit_bias
        if p.min_tokens:
            self.min_tokens[row] = p.min_tokens
            s.blocked_stop_ids[row] = sorted(p.all_stop_token_ids)
        if p.prompt_logprobs is not None:
            self.prompt_logprobs_rows.add(row)
        if self._penalised(row):
            self._init_penalty_row(row, prompt, output)

    def _penalised(self, row: int) -> bool:
        s = self.sampling
        return bool(has_penalty(s.repetition_penalty[row], s.frequency_penalty[row],
                                s.presence_penalty[row]))

    def _init_penalty_row(self, row: int, prompt: list[int], output: list[int]) -> None:
        if self.output_counts is None:
            shape = (self.max_num_reqs, self.vocab_size)
            self.output_counts = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        counts, mask = penalty_state([prompt], [output], self.vocab_size, self.device)
        self.output_counts[row] = counts[0]
        self.prompt_mask[row] = mask[0]

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = self.num_blocks[row]
        self.block_table[row, start:start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def remove(self, request_id: str, keep_tokens: bool = False) -> CachedRequestState | None:
        """Free the request's row (a hole until condense). keep_tokens: copy its output
        tokens into its state first (it is preempted and comes back). Returns its state, or
        None if it has no row."""
        row = self.req_id_to_index.pop(request_id, None)
        if row is None:
            return None
        state = self.states[row]
        if keep_tokens:
            state.output_token_ids = self.token_ids[
                row, self.num_prompt_tokens[row]:self.num_tokens[row]].tolist()
        self.req_ids[row] = self.states[row] = None
        self.layout += 1
        s = self.sampling
        for table in (s.generators, s.logit_bias, s.blocked_stop_ids, self.min_tokens):
            table.pop(row, None)
        self.prompt_logprobs_rows.discard(row)
        return state

    def condense(self) -> None:
        """Move the last rows into the holes, so rows 0..num_reqs-1 are the batch."""
        holes = [i for i, r in enumerate(self.req_ids) if r is None]
        for hole in holes:
            self._drop_trailing_holes()
            if hole >= len(self.req_ids):
                break
            self._move(len(self.req_ids) - 1, hole)
            self.req_ids.pop()
            self.states.pop()
        self._drop_trailing_holes()

    def _drop_trailing_holes(self) -> None:
        while self.req_ids and self.req_ids[-1] is None:
            self.req_ids.pop()
            self.states.pop()

    def _move(self, src: int, dst: int) -> None:
        request_id = self.req_ids[src]
        self.req_ids[dst], self.states[dst] = request_id, self.states[src]
        self.req_id_to_index[request_id] = dst
        self.layout += 1
        n, nb = self.num_tokens[src], self.num_blocks[src]
        self.token_ids[dst, :n] = self.token_ids[src, :n]
        self.block_table[dst, :nb] = self.block_table[src, :nb]
        for array in (self.num_tokens, self.num_prompt_tokens, self.num_computed_tokens,
                      self.num_blocks):
            array[dst] = array[src]
        s = self.sampling
        for array in (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty,
                      s.frequency_penalty, s.presence_penalty, s.num_logprobs):
            array[dst] = array[src]
        for table in (s.generators, s.logit_bias, s.blocked_stop_ids, self.min_tokens):
            if src in table:
                table[dst] = table.pop(src)
        if src in self.prompt_logprobs_rows:
            self.prompt_logprobs_rows.discard(src)
            self.prompt_logprobs_rows.add(dst)
        if self._penalised(dst):
            self.output_counts[dst] = self.output_counts[src]
            self.prompt_mask[dst] = self.prompt_mask[src]

    # ---- one step -------------------------------------------------------------------
    def prepare(self, num_scheduled_tokens: dict[str, int]) -> StepInputs:
        """The flat varlen batch of the scheduled requests' new tokens, in row order."""
        rows = np.fromiter(map(self.req_id_to_index.__getitem__, num_scheduled_tokens),
                           dtype=np.int64, count=len(num_scheduled_tokens))
        n = np.fromiter(num_scheduled_tokens.values(), dtype=np.int64, count=len(rows))
        order = np.argsort(rows)
        if (np.diff(order) != 1).any():  # scheduled in another order than the rows'
            rows, n = rows[order], n[order]
        contiguous = rows[-1] == len(rows) - 1  # rows 0..S-1: views instead of gathers
        pick = (lambda a: a[:len(rows)]) if contiguous else (lambda a: a[rows])

        cu = np.cumsum(n)
        starts = cu - n
        computed = pick(self.num_computed_tokens)
        token_rows = np.repeat(rows, n)
        positions = np.repeat(computed - starts, n) + np.arange(cu[-1])
        bs = self.block_size
        block_index = positions // bs
        slot_mapping = self.block_table[token_rows, block_index].astype(np.int64) * bs
        slot_mapping += positions % bs
        seq_lens = computed + n
        max_blocks = -(-int(seq_lens.max()) // bs)
        block_table = (self.block_table[:len(rows), :max_blocks] if contiguous
                       else self.block_table[rows, :max_blocks])

        samples = seq_lens == pick(self.num_tokens)
        sample_rows = rows[samples]
        prompt_logprobs = []
        wanted = (np.flatnonzero(np.isin(rows, list(self.prompt_logprobs_rows)))
                  if self.prompt_logprobs_rows else ())
        for i in wanted:
            state = self.states[rows[i]]
            start, num_prompt = int(computed[i]), int(self.num_prompt_tokens[rows[i]])
            if start < num_prompt - 1 and state.num_prompt_logprobs_done < num_prompt - 1:
                count = min(start + int(n[i]), num_prompt - 1) - start
                prompt_logprobs.append((state, int(starts[i]), start, count))
                state.num_prompt_logprobs_done = max(state.num_prompt_logprobs_done,
                                                     start + count)
        return StepInputs(
            rows=rows,
            input_ids=self.token_ids[token_rows, positions].astype(np.int64),
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=np.concatenate(([0], cu)).astype(np.int32),
            seq_lens=seq_lens.astype(np.int32),
            query_lens=n.astype(np.int32),
            block_table=block_table,
            logits_indices=cu[samples] - 1,
            sample_rows=sample_rows,
            sample_request_ids=(self.req_ids[:len(rows)] if contiguous and samples.all()
                                else list(map(self.req_ids.__getitem__, sample_rows.tolist()))),
            prompt_logprobs=prompt_logprobs,
        )

    def sampling_rows(self, rows: np.ndarray) -> SamplingRows:
        """The sampling knobs of `rows`, in that order."""
        s = self.sampling
        position = {int(r): i for i, r in enumerate(rows)} if (
            s.generators or s.logit_bias or self.min_tokens) else {}

        def sparse(table: dict) -> dict:
            return {position[r]: v for r, v in table.items() if r in position}

        blocked = {position[r]: s.blocked_stop_ids[r] for r, k in self.min_tokens.items()
                   if r in position and self.num_tokens[r] - self.num_prompt_tokens[r] < k}
        return SamplingRows(
            temperature=s.temperature[rows], top_k=s.top_k[rows], top_p=s.top_p[rows],
            min_p=s.min_p[rows], repetition_penalty=s.repetition_penalty[rows],
            frequency_penalty=s.frequency_penalty[rows],
            presence_penalty=s.presence_penalty[rows], num_logprobs=s.num_logprobs[rows],
            generators=sparse(s.generators), logit_bias=sparse(s.logit_bias),
            blocked_stop_ids=blocked)

    def penalty_tensors(self, rows: np.ndarray, sampling: SamplingRows
                        ) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
        """(batch positions of penalised rows, their output counts [P, V], prompt masks)."""
        positions = penalty_rows(sampling)
        if not positions.size:
            return positions, None, None
        index = host_to_device(rows[positions], self.device)
        return positions, self.output_counts[index], self.prompt_mask[index]

    def reserve_sampled(self, rows: np.ndarray, req_ids: list[str]) -> Reservation:
        """Make room for each row's token being sampled (`req_ids`: the rows' requests)."""
        ends = self.num_tokens[rows]
        self.num_tokens[rows] = ends + 1
        return Reservation(req_ids, rows, ends, self.layout)

    def record_sampled(self, reserved: Reservation, token_ids: list[int],
                       states: dict[str, CachedRequestState]) -> None:
        """Write sampled tokens where reserve_sampled put them: into the request's row, or
        into its state if it was preempted since (finished ones are dropped)."""
        rows, positions = self._rows_of(reserved), reserved.positions
        tokens = np.asarray(token_ids, dtype=np.int32)
        if rows is reserved.rows:  # every one still in its row (most steps)
            self.token_ids[rows, positions] = tokens
            return
        here = rows >= 0
        self.token_ids[rows[here], positions[here]] = tokens[here]
        for i in np.flatnonzero(~here):
            state = states.get(reserved.req_ids[i])
            if state is not None:
                state.output_token_ids[positions[i] - len(state.prompt_token_ids)] = token_ids[i]

    def _rows_of(self, reserved: Reservation) -> np.ndarray:
        """Each reserved request's row now, -1 for one without a row (preempted or
        finished): the reserved rows themselves while no row has changed hands since."""
        if reserved.layout == self.layout:
            return reserved.rows
        return np.fromiter(map(self.req_id_to_index.get, reserved.req_ids, repeat(-1)),
                           dtype=np.int64, count=len(reserved.req_ids))

    def in_flight_inputs(self, step: StepInputs, reserved: Reservation
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Of the tokens still being sampled into `reserved`, those this step takes as
        inputs: (their flat indices in the step, their indices in the reservation)."""
        rows, positions = self._rows_of(reserved), reserved.positions
        step_index = np.full(self.max_num_reqs + 1, -1)  # row -> its place in the step
        step_index[step.rows] = np.arange(len(step.rows))
        i = step_index[rows]  # a request with no row (-1) reads the last entry: -1
        scheduled = np.flatnonzero(i >= 0)
        i = i[scheduled]
        query_lens = step.query_lens[i]
        computed = step.seq_lens[i] - query_lens
        pos = positions[scheduled]
        inside = (pos >= computed) & (pos < computed + query_lens)
        dst = step.query_start_loc[i] + pos - computed
        return dst[inside].astype(np.int64), scheduled[inside]

    def count_sampled(self, rows: np.ndarray, positions: np.ndarray,
                      sampled: torch.Tensor) -> None:
        """Add the penalised rows' sampled tokens to their counts, on the device (no sync).
        `positions`: those rows' places in the sampled batch."""
        if not positions.size:
            return
        dev = self.device
        row_index = host_to_device(rows[positions], dev)
        tokens = sampled[host_to_device(positions, dev)]
        self.output_counts.index_put_((row_index, tokens),
                                      torch.ones(len(positions), device=dev), accumulate=True)
