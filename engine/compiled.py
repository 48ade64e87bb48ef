"""The CPU counterpart of cuda_graph.py: the model's forward under torch.compile (inductor's
C++ backend), so that a decode step's hundreds of small eager ops (norms, rotary, SiLU,
residual adds, casts) run as a few fused loops. A one-token step (a single stream's decode)
attends inside the graph too, its context's cache slots a graph input (attention.
SingleDecode). Other steps attend eagerly, through one opaque op per layer
(torch.ops.pagedserve.paged_attention, engine/attention) that reads the step's metadata
from the step in progress.

Graphs are specialised by row count the way the layers branch on it: one for a single row,
one dynamic graph for 2..max_packed_rows rows (the packed int4/int8 kernels: 8 rows for
torch's, 128 for our VNNI int4 kernel), one for more (the dense bf16 copies: prefill and
big decode batches). warm_up() compiles them all at
start-up; inductor's cache under the user cache dir makes a restart reuse their code."""

from __future__ import annotations

import logging
import os
import time

import torch

from pagedserve.engine.attention import AttentionMetadata, SingleDecode, compiled_step
from pagedserve.engine.attention.torch_backend import single_decode, use_single_decode_kernel
from pagedserve.engine.loader.resolve import pagedserve_cache_dir
from pagedserve.engine.models.quantized import QuantizedLinear
from pagedserve.kernels import cpu_extension

logger = logging.getLogger(__name__)


def use_inductor_cache_dir() -> str:
    """Inductor's on-disk cache under ours ($TORCHINDUCTOR_CACHE_DIR wins), instead of a /tmp
    folder that a reboot empties. Importing torch._dynamo (transformers does) writes
    inductor's /tmp default into the variable: that value counts as unset.

    One folder per version of our CPU kernels' sources: a cached graph holds what our
    operators returned when it was compiled (an output dtype, say), which inductor's cache
    key (the graph and the operators' schemas) does not see change."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # an older torch: nothing writes the variable for it
        default_cache_dir = None
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or (default_cache_dir is not None and os.path.abspath(current)
                           == os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = current = str(
            pagedserve_cache_dir() / "inductor" / f"kernels-{cpu_extension.source_hash()}")
    return current


def _guards_worth_checking(guard_entries) -> list[bool]:
    """The guards each call checks (dynamo's cache lookup: ~0.2 ms a step for ~200 guards).
    Left out, as what they check never changes after start-up: the modules
    (skip_guard_on_all_nn_modules_unsafe), the weights' aliasing (DUPLICATE_INPUT: a tied
    head's weight stays the embedding's) and the KV caches, allocated once (their block
    count is already dynamic)."""
    keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe(guard_entries)
    return [k and entry.guard_type != "DUPLICATE_INPUT"
            and not (entry.guard_type == "TENSOR_MATCH" and entry.name.startswith("kv_caches"))
            for k, entry in zip(keep, guard_entries)]


class CompiledForward:
    def __init__(self, model, attn_backend, kv_caches: list[torch.Tensor]) -> None:
        use_inductor_cache_dir()
        self.model = model
        self.attn_backend = attn_backend
        self.kv_caches = kv_caches
        # A sliding window would cut the context at a length the graph would branch on:
        # models with one attend through the opaque op in every step.
        self.attend_in_graph = all(getattr(m, "sliding_window", None) is None
                                   for m in model.modules())
        if self.attend_in_graph:
            use_single_decode_kernel()
        for cache in kv_caches:
            # Its block count is not baked in: engines with caches of other sizes then share
            # the compiled code.
            torch._dynamo.mark_dynamic(cache, 1)
        # dynamic=None: the first graph is specialised to its row count, a second row count
        # makes the row dimension dynamic (torch.compile's automatic dynamic shapes).
        self._forward = torch.compile(model, fullgraph=True, options={
            "guard_filter_fn": _guards_worth_checking})

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 md: AttentionMetadata) -> torch.Tensor:
        """The model's hidden states for the step md describes."""
        if md.num_tokens == 1 and self.attend_in_graph:
            if md.seq_lens_cpu[0] > 1:
                return self._forward(input_ids, positions, self.kv_caches,
                                     single_decode(md, self.kv_caches[0].shape[1]))
            # A one-token prompt: a context of one would need a graph of its own
            # (torch.compile specialises sizes 0 and 1). Rare enough to run eagerly.
            self.attn_backend.prepare(md)
            return self.model(input_ids, positions, self.kv_caches, md)
        self.attn_backend.prepare(md)
        with compiled_step(self.attn_backend, md):
            return self._forward(input_ids, positions, self.kv_caches, None)

    def warm_up(self, dummy_step, max_rows: int) -> None:
        """Compile every graph a step can need before the first request: 1 row, 2 rows (the
        dynamic graph for up to the quantized layers' max_packed_rows), and one beyond each
        row count where they branch, where steps get that big.
        dummy_step(num_tokens) gives a dummy prefill's (input_ids, positions, md) over the
        real cache; what it writes there is overwritten before any request reads it."""
        # (The head's layers run outside the graph, in compute_logits.)
        branches = {m.max_packed_rows + 1 for m in self.model.layers.modules()
                    if isinstance(m, QuantizedLinear)}
        sizes = [n for n in sorted({1, 2} | branches) if n <= max_rows]
        start = time.perf_counter()
        for i, num_tokens in enumerate(sizes):
            logger.warning("Compiling the CPU forward (%d/%d, %d rows; cached for the next "
                           "start; --enforce-eager skips this)", i + 1, len(sizes), num_tokens)
            input_ids, positions, md = dummy_step(num_tokens)
            if num_tokens == 1 and self.attend_in_graph:
                self._warm_up_single(input_ids, positions, md)
            else:
                self(input_ids, positions, md)
        logger.warning("Compiled the CPU forward in %.1fs", time.perf_counter() - start)

    def _warm_up_single(self, input_ids, positions, md: AttentionMetadata) -> None:
        """The one-token graph, over a dummy context of two slots (the dummy prefill's own
        and the next), its length dynamic from the start: decodes then never recompile."""
        rows, _ = single_decode(md, self.kv_caches[0].shape[1])
        decode = SingleDecode(rows, torch.cat((md.slot_mapping, md.slot_mapping + 1)).int())
        torch._dynamo.mark_dynamic(decode.context_slots, 0)
        self._forward(input_ids, positions + 1, self.kv_caches, decode)
