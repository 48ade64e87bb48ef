"""Runs one step: flattens every scheduled request's new tokens into one varlen batch,
runs the model once, and samples a token for each request whose prompt is fully computed.

A step is launched (execute_model) and later collected (collect, the one device-to-host
wait), so that the engine can launch step N+1 before it collects step N."""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedserve.engine.attention import AttentionMetadata, get_attention_backend
from pagedserve.engine.compiled import CompiledForward
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.cuda_graph import CudaGraphRunner
from pagedserve.engine.distributed import SINGLE, TensorParallel
from pagedserve.engine.input_batch import (
    CachedRequestState,
    InputBatch,
    Reservation,
    StepInputs,
)
from pagedserve.engine.loader import TENSOR_TYPES_FILE
from pagedserve.engine.loader.weights import init_dummy_weights, iterate_safetensors
from pagedserve.engine.models import get_model_class
from pagedserve.engine.models.llama import RotaryEmbedding
from pagedserve.engine.models.quantized import (
    cast_unquantized,
    packed_kernels_available,
    quantization_plan,
    quantized_bytes,
)
from pagedserve.engine.sampler import (
    Sampler,
    SamplingMetadata,
    SamplingRows,
    compute_prompt_logprobs,
    host_to_device,
)
from pagedserve.engine.scheduler import SchedulerOutput
from pagedserve.kernels import cpu_int4_linear
from pagedserve.kernels.cpu_decode_attention import available as decode_kernel_available

if TYPE_CHECKING:
    from pagedserve.engine.structured_output import GrammarBitmask

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30


@dataclass(slots=True)
class PromptLogprobsChunk:
    """Logprobs of prompt tokens first_index .. first_index + len - 1 (index 0 has none)."""

    first_index: int
    token_logprobs: list[float]
    topk_token_ids: list[list[int]]
    topk_logprobs: list[list[float]]


@dataclass(slots=True)
class ModelRunnerOutput:
    req_ids: list[str] = field(default_factory=list)  # requests that sampled, batch order
    sampled_token_ids: list[int] = field(default_factory=list)
    sampled_logprobs: list[float] | None = None
    topk_token_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    prompt_logprobs: dict[str, PromptLogprobsChunk] = field(default_factory=dict)


class _HostCopy:
    """Device tensors on their way to the host. The copies are queued at launch, behind the
    step's kernels (into pinned memory on CUDA), so reading them waits for that step only,
    not for one launched after it."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._event = None
        if tensors and tensors[0].is_cuda:
            tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
                t, non_blocking=True) for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        self._tensors = tensors

    def lists(self) -> list[list]:
        if self._event is not None:
            self._event.synchronize()
        return [t.tolist() for t in self._tensors]


@dataclass(slots=True)
class StepHandle:
    """A launched step. Until collect() reads its sampled tokens they exist only on the
    device, and the runner feeds them to the next step from there."""

    req_ids: list[str] = field(default_factory=list)  # requests that sample, batch order
    reserved: Reservation | None = None  # where their sampled tokens go in the input batch
    sampled: torch.Tensor | None = None  # [B] int64, on the device
    results: _HostCopy | None = None  # sampled ids, then logprobs, top-k ids and logprobs
    prompt_logprobs: list[tuple[str, int, _HostCopy]] = field(default_factory=list)
    output: ModelRunnerOutput | None = None  # set by collect()


def resolve_device(config: EngineConfig, tp: TensorParallel = SINGLE) -> torch.device:
    """The device; under tensor parallelism on GPUs, rank r's is cuda:r."""
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and tp.size > 1:
        device = torch.device("cuda", tp.rank)
    return device


def cpu_has_bf16() -> bool:
    """AVX512-BF16 (or AMX, which implies it): bf16 GEMMs in hardware, not emulated."""
    return bool(torch.cpu._is_avx512_bf16_supported())


def resolve_dtype(config: EngineConfig, device: torch.device, quantized: bool) -> torch.dtype:
    """The activations' dtype. auto: bf16 on GPUs; on CPUs fp32 (the exact path), and for
    quantized weights bf16 where the CPU computes bf16 natively and our int4 kernel is not
    built: torch's packed kernels take bf16 in anyway, and the dense copies' GEMMs run 3x
    faster in bf16 than fp32 (benchmarks/results/throughput_cpu_smollm2_int4.md). Ours
    (kernels/cpu_int4_linear.py) is exact for fp32 activations: a bf16 residual stream
    would be the quantized path's largest error beside the weights' own, and it flipped
    SmolLM2's 0.08-nat tie on "What is the capital of France?" to "L'Etoile, ..."."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type == "cuda" or (quantized and cpu_has_bf16()
                                 and not cpu_int4_linear.available()):
        return torch.bfloat16
    return torch.float32


def resolve_kv_cache_dtype(config: EngineConfig, device: torch.device, dtype: torch.dtype,
                           quantized: bool = False) -> torch.dtype:
    """auto: the activations' dtype, but bf16 beside a quantized model's fp32 activations on
    a CPU with AVX512-BF16: half the bytes for decode attention to read."""
    if config.kv_cache_dtype == "auto":
        if device.type == "cpu" and quantized and dtype == torch.float32 and cpu_has_bf16():
            return torch.bfloat16
        return dtype
    kv_dtype = getattr(torch, config.kv_cache_dtype)
    if device.type != "cpu" and kv_dtype != dtype:
        raise ValueError(f"kv_cache_dtype {config.kv_cache_dtype!r} differs from the "
                         f"activations' dtype ({dtype}): supported on CPUs only; on a GPU "
                         "use --kv-cache-dtype auto")
    return kv_dtype


def _physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc's malloc_trim). Loading leaves
    hundreds of MB free but mapped: the fp32 copies a checkpoint passes through on its way
    to packed or bf16 weights. Elsewhere (musl, macOS) a no-op."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    # An anonymous mapping: the kernel hands out zero pages lazily, so a 4 GiB cache costs
    # nothing until used (torch.zeros would touch every page: ~10 s at start). In 4 KB pages:
    # numpy's zeros ask for huge ones, whose first touch (zeroing 2 MB, compacting memory to
    # find it) cost ~4.6 ms a MB here, against ~0.5 for small pages: seconds of KV writes.
    nbytes = math.prod(shape) * dtype.itemsize
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: calloc's lazy zeros
        return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    except (AttributeError, OSError):  # not Linux, or a kernel built without huge pages
        pass
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


class ModelRunner:
    """One rank's model, KV cache and input batch. Under tensor parallelism every rank runs
    the same steps (engine/executor.py): its own heads' share of the forward, whole logits
    (gathered), and rank 0's sampled tokens, broadcast."""

    def __init__(self, config: EngineConfig, hf_config, model_dir, max_model_len: int,
                 tp: TensorParallel = SINGLE) -> None:
        self.config = config
        self.hf_config = hf_config
        self.tp = tp
        self.device = resolve_device(config, tp)
        # Which layers to quantize, decided before loading: it picks the activations' dtype.
        self.quantization_plan = self._quantization_plan(model_dir)
        self.dtype = resolve_dtype(config, self.device, self.quantization_plan is not None)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config, self.device, self.dtype,
                                                     self.quantization_plan is not None)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.vocab_size = hf_config.vocab_size
        if self.device.type == "cpu":
            # Subnormal activations (softmax tails, SiLU of large negatives) made decode steps
            # ~10x slower on x86; flushing them to zero changes no greedy token (the HF
            # parity tests run with it). Process-wide, as the engine owns its process.
            torch.set_flush_denormal(True)

        # Triton kernels on GPUs; the PyTorch path on CPUs (and as the reference).
        backend_name = config.attention_backend or (
            "triton" if self.device.type == "cuda" else "torch")
        num_heads = hf_config.num_attention_heads
        self.head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        # This rank's heads (all of them without tensor parallelism).
        self.num_kv_heads = tp.kv_heads(getattr(hf_config, "num_key_value_heads", None)
                                        or num_heads)[1]
        self.attn_backend = get_attention_backend(
            backend_name, tp.split(num_heads, "num_attention_heads"), self.num_kv_heads)
        if backend_name == "torch" and self.device.type == "cpu":
            # Build (once per machine, ~30 s) or load the CPU decode kernel now, not on the
            # first request's first decode step.
            decode_kernel_available()

        self.model = self._load_model(get_model_class(hf_config), model_dir)
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}  # every unfinished one it has seen
        # Launched steps whose sampled tokens are not yet in the input batch's rows.
        self._unrecorded: list[StepHandle] = []
        self.input_batch: InputBatch | None = None  # sized by allocate_kv_cache
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.cuda_graphs: CudaGraphRunner | None = None
        self.compiled: CompiledForward | None = None

    def _load_model(self, model_cls, model_dir):
        # Build on the meta device so no time goes into initialising weights we overwrite.
        with torch.device("meta"):
            model = model_cls(self.hf_config, self.attn_backend, self.max_model_len, self.tp)
        model = model.to_empty(device="cpu")
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.build_cache()
        if self.config.load_format == "dummy":
            init_dummy_weights(model, self.config.seed)
        else:
            model.load_weights(iterate_safetensors(model_dir, torch.float32))
        if not self._quantize(model):
            model = model.to(device=self.device, dtype=self.dtype)
        model.eval()
        if self.device.type == "cuda" and self.attn_backend.name == "triton":
            model.use_triton_kernels()
        if self.device.type == "cpu" and self.dtype == torch.float32:
            model.pack_for_cpu()
        return model

    def _quantization_plan(self, model_dir):
        """quantization_plan() for this model and config (CPU only); None: all dense."""
        config = self.config
        if self.device.type != "cpu":
            if config.quantization in ("int4", "int8"):
                raise ValueError(f"quantization {config.quantization!r} runs on CPUs only; "
                                 "on a GPU use --quantization none (or auto)")
            return None
        types_file = Path(model_dir) / TENSOR_TYPES_FILE
        gguf_types = json.loads(types_file.read_text()) if types_file.is_file() else None
        scheme_of = quantization_plan(config.quantization, gguf_types)
        if scheme_of is not None and not packed_kernels_available():
            raise RuntimeError(f"quantization {config.quantization!r} needs torch's packed "
                               "int4/int8 CPU kernels, which this torch build lacks")
        return scheme_of

    def _quantize(self, model) -> bool:
        """Swap in weight-only quantized layers where the plan asks; False when nothing was
        quantized."""
        config, scheme_of = self.config, self.quantization_plan
        if scheme_of is None:
            return False
        # The copies' GEMMs in bf16 where the CPU has it; emulated bf16 is slower than fp32.
        dense_dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
        dense_copy = config.quantized_dense_copy
        if dense_copy is None:
            params = sum(p.numel() for p in model.parameters())
            dense_copy = params * dense_dtype.itemsize <= _physical_memory() // 8
        count = model.quantize(scheme_of, dense_copy, dense_dtype)
        cast_unquantized(model, self.dtype)
        logger.info("Quantized %d layers (%s%s): %.1f MiB of quantized weights", count,
                    config.quantization if config.quantization != "auto" else "the file's own",
                    f", with dense {str(dense_dtype).removeprefix('torch.')} copies for large "
                    "batches" if dense_copy else "", quantized_bytes(model) / 2**20)
        return count > 0

    # ---- KV cache -------------------------------------------------------------------
    def block_bytes(self) -> int:
        per_token = 2 * self.num_kv_heads * self.head_dim * self.kv_cache_dtype.itemsize
        return per_token * self.block_size * self.hf_config.num_hidden_layers

    def determine_num_blocks(self, max_num_seqs: int, max_num_batched_tokens: int) -> int:
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        if self.device.type == "cuda":
            # What is left of gpu_memory_utilization * total once the weights, the CUDA
            # context and the peak activations of the largest step are accounted for.
            activations = self._profile_activation_bytes(max_num_seqs, max_num_batched_tokens)
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * self.config.gpu_memory_utilization) - used - activations
            logger.info("GPU memory: %.1f GiB total, %.1f GiB in use, %.2f GiB peak "
                        "activations -> %.1f GiB for the KV cache", total / 2**30,
                        used / 2**30, activations / 2**30, max(budget, 0) / 2**30)
        else:
            # CPU ranks share the machine's memory: each takes its share of the budget.
            budget = (self.config.kv_cache_memory or _DEFAULT_CPU_KV_CACHE_BYTES) // self.tp.size
        num_blocks = max(budget // self.block_bytes(), 1)
        # Beyond every sequence at full length, blocks only feed the prefix cache; cap there
        # so tiny models don't allocate millions of bookkeeping objects.
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        # Every rank holds the same blocks (of its own heads): as many as the tightest fits.
        return self.tp.min(int(min(num_blocks, 2 * blocks_per_seq * max_num_seqs)), self.device)

    def dummy_prefill(self, num_tokens: int):
        """Inputs of a prefill-only step of num_tokens dummy tokens, as sequences of up to
        max_model_len, each over its own consecutive blocks of a fresh cache:
        (input_ids, positions, kv_caches, metadata)."""
        bs, dev = self.block_size, self.device
        seq_len = min(num_tokens, self.max_model_len)
        seq_lens = [seq_len] * (num_tokens // seq_len)
        if num_tokens % seq_len:
            seq_lens.append(num_tokens % seq_len)
        blocks = [-(-n // bs) for n in seq_lens]
        first_blocks = [0, *accumulate(blocks)][:-1]
        starts = [0, *accumulate(seq_lens)]
        table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
        for row, (first, n) in enumerate(zip(first_blocks, blocks)):
            table[row, :n] = torch.arange(first, first + n)
        # A sequence's blocks are consecutive, so its slots are too.
        slots = torch.cat([first * bs + torch.arange(n)
                           for first, n in zip(first_blocks, seq_lens)])
        shape = (2, sum(blocks), bs, self.num_kv_heads, self.head_dim)
        caches = [torch.zeros(shape, dtype=self.kv_cache_dtype, device=dev)
                  for _ in range(self.hf_config.num_hidden_layers)]
        md = AttentionMetadata(
            num_tokens=num_tokens,
            slot_mapping=slots.to(dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_table=table.to(dev), block_size=bs,
            query_start_loc_cpu=starts, query_lens_cpu=seq_lens, seq_lens_cpu=seq_lens,
            max_query_len=max(seq_lens), max_seq_len=max(seq_lens),
        )
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(dev)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        return input_ids, positions, caches, md

    @torch.inference_mode()
    def _profile_activation_bytes(self, max_num_seqs: int, max_num_batched_tokens: int) -> int:
        """Peak memory of the largest step (a full token budget of prefill, logits for
        max_num_seqs rows) beyond the weights, measured by running it on dummy inputs."""
        dev = self.device
        input_ids, positions, caches, md = self.dummy_prefill(max_num_batched_tokens)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)  # weights and the temporary caches
        self.attn_backend.prepare(md)
        hidden = self.model(input_ids, positions, caches, md)
        logits = self.model.compute_logits(hidden[:min(md.num_tokens, max_num_seqs)])
        logits.softmax(dim=-1)  # the sampler's [rows, vocab] fp32 temporaries
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del hidden, logits, caches
        return max(peak, 0)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # K and V apart ([2, ...], as vLLM's flash layout): a block's keys are one contiguous
        # run, which is what makes the CPU gather a memcpy.
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        # Zeros, not empty: masked-out context slots are multiplied by 0 and must not be NaN.
        self.kv_caches = [_zeros(shape, self.kv_cache_dtype, self.device)
                          for _ in range(self.hf_config.num_hidden_layers)]
        self.num_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens, %s (%.1f MiB)", num_blocks,
                    self.block_size, str(self.kv_cache_dtype).removeprefix("torch."),
                    num_blocks * self.block_bytes() / 2**20)

    def init_input_batch(self, max_num_seqs: int, max_model_len: int) -> None:
        self.input_batch = InputBatch(max_num_seqs, max_model_len, self.block_size,
                                      self.vocab_size, self.device)

    def capture_cuda_graphs(self, max_num_seqs: int) -> None:
        """Capture decode-step graphs (GPU, graph-safe backend, not enforce_eager)."""
        if (self.device.type != "cuda" or self.config.enforce_eager or self.tp.size > 1
                or not getattr(self.attn_backend, "supports_cuda_graphs", False)):
            return
        self.cuda_graphs = CudaGraphRunner(self.model, self.attn_backend, self.kv_caches,
                                           max_num_seqs, self.max_model_len, self.block_size,
                                           self.device)
        self.cuda_graphs.capture()

    def compile_forward(self, max_num_batched_tokens: int) -> None:
        """CPU, quantized model, not enforce_eager: the forward under torch.compile, compiled
        now for every row count (engine/compiled.py). The exact fp32 path stays eager: fused
        loops round differently from HF's ops. Not under tensor parallelism (yet): its
        all-reduces run eagerly."""
        if (self.device.type != "cpu" or self.config.enforce_eager or self.tp.size > 1
                or self.quantization_plan is None or self.attn_backend.name != "torch"):
            return
        self.compiled = CompiledForward(self.model, self.attn_backend, self.kv_caches)

        def dummy_step(num_tokens):
            input_ids, positions, _, md = self.dummy_prefill(num_tokens)
            return input_ids, positions, md

        try:
            with torch.inference_mode():
                self.compiled.warm_up(dummy_step, max_num_batched_tokens)
        except Exception as e:  # no C++ compiler, an inductor bug: eager still serves
            logger.warning("Compiling the CPU forward failed, running it eagerly: %s: %s",
                           type(e).__name__, e)
            self.compiled = None

    def release_load_memory(self) -> None:
        """After start-up on a CPU: what loading and warming up freed goes back to the OS."""
        if self.device.type == "cpu":
            _trim_heap()

    # ---- one step -------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        """Apply the scheduler's diffs to the persistent batch: drop finished and preempted
        rows, add new and resumed requests, append new blocks, then close the holes."""
        batch = self.input_batch
        for request_id in so.finished_request_ids:
            batch.remove(request_id)
            self.requests.pop(request_id, None)
        for request_id in so.preempted_request_ids:
            batch.remove(request_id, keep_tokens=True)
        for new in so.scheduled_new_reqs:
            params = new.sampling_params
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.device)
                generator.manual_seed(params.seed)
            state = CachedRequestState(new.request_id, new.prompt_token_ids, params,
                                       generator, [])
            self.requests[new.request_id] = state
            batch.add(state, new.num_computed_tokens, new.block_ids)
        cached = so.scheduled_cached_reqs
        if any(cached.resumed_from_preemption):
            for request_id, resumed, new_block_ids, num_computed in zip(
                    cached.request_ids, cached.resumed_from_preemption, cached.new_block_ids,
                    cached.num_computed_tokens):
                if resumed:
                    batch.add(self.requests[request_id], num_computed, new_block_ids)
        # Running ones (the resumed too, harmlessly: add() set the same count), at once.
        count = len(cached.request_ids)
        rows = np.fromiter(map(batch.req_id_to_index.__getitem__, cached.request_ids),
                           dtype=np.int64, count=count)
        batch.num_computed_tokens[rows] = cached.num_computed_tokens
        # New blocks: a few requests a step (one in block_size decode steps each).
        grew = np.fromiter(map(len, cached.new_block_ids), dtype=np.int64, count=count)
        for i in np.flatnonzero(grew).tolist():
            if not cached.resumed_from_preemption[i]:
                batch.append_blocks(int(rows[i]), cached.new_block_ids[i])
        if so.finished_request_ids or so.preempted_request_ids:
            batch.condense()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return host_to_device(array, self.device, dtype=None)

    def _attention_metadata(self, step: StepInputs) -> AttentionMetadata:
        query_lens = step.query_lens.tolist()
        seq_lens = step.seq_lens.tolist()
        return AttentionMetadata(
            num_tokens=len(step.input_ids),
            slot_mapping=self._to_device(step.slot_mapping),
            query_start_loc=self._to_device(step.query_start_loc),
            seq_lens=self._to_device(step.seq_lens),
            block_table=self._to_device(step.block_table),
            block_size=self.block_size,
            query_start_loc_cpu=step.query_start_loc.tolist(),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )

    def execute(self, so: SchedulerOutput,
                grammar_bitmask: Callable[[list[str]], GrammarBitmask | None] | None = None,
                ) -> ModelRunnerOutput:
        """Run the step `so` describes and wait for its results."""
        return self.collect(self.execute_model(so, grammar_bitmask))

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput,
                      grammar_bitmask: Callable[[list[str]], GrammarBitmask | None] | None = None,
                      ) -> StepHandle:
        """Launch the step `so` describes without waiting for the device: its sampled tokens
        stay there until collect(). The step before may be uncollected still (async
        scheduling): its tokens are then taken as inputs from the device.
        `grammar_bitmask(request_ids)` gives the guided rows' masks for the requests that
        sample, in batch order (None: no guided request)."""
        self._record_collected()
        self._update_states(so)
        handle = StepHandle()
        if so.is_empty:
            return handle
        batch = self.input_batch
        step = batch.prepare(so.num_scheduled_tokens)
        input_ids, positions = self._to_device(step.input_ids), self._to_device(step.positions)
        self._feed_in_flight(step, input_ids)
        md = self._attention_metadata(step)
        graphs = self.cuda_graphs
        if graphs is not None and md.max_query_len == 1 and md.num_tokens <= graphs.max_batch_size:
            hidden = graphs.run(input_ids, positions, md)
        else:
            if self.compiled is not None:
                hidden = self.compiled(input_ids, positions, md)
            else:
                self.attn_backend.prepare(md)
                hidden = self.model(input_ids, positions, self.kv_caches, md)
        # Grammar masks are filled on the CPU after the forward is queued, so that on a GPU
        # the two overlap (on a CPU the forward has already run: nothing to overlap).
        bitmask = (grammar_bitmask(step.sample_request_ids)
                   if grammar_bitmask is not None and step.sample_request_ids else None)
        for state, offset, start, count in step.prompt_logprobs:
            handle.prompt_logprobs.append((state.request_id, start + 1, self._prompt_logprobs(
                hidden[offset:offset + count], state, start, count)))
        if not step.sample_request_ids:
            return handle
        sampling = batch.sampling_rows(step.sample_rows)
        logits = self.model.compute_logits(hidden[self._to_device(step.logits_indices)],
                                           self._argmax_only(step, sampling))
        if bitmask is not None:
            # Before the sampler: masked tokens get probability 0, in the returned logprobs too.
            bitmask.apply(logits)
        penalised, counts, prompt_mask = batch.penalty_tensors(step.sample_rows, sampling)
        metadata = SamplingMetadata.from_rows(sampling, self.vocab_size, self.device,
                                              counts, prompt_mask)
        if self.tp.rank == 0:
            result = self.sampler(logits, metadata)
            sampled = result.sampled_token_ids
        else:  # rank 0 samples (its grammar masks, its random streams) for every rank
            result = None
            sampled = torch.empty(len(step.sample_rows), dtype=torch.long, device=self.device)
        self.tp.broadcast(sampled)
        batch.count_sampled(step.sample_rows, penalised, sampled)
        handle.req_ids = step.sample_request_ids
        handle.reserved = batch.reserve_sampled(step.sample_rows, step.sample_request_ids)
        handle.sampled = sampled
        tensors = [sampled]
        if result is not None and result.logprobs is not None:
            tensors += [result.logprobs, result.topk_token_ids, result.topk_logprobs]
        handle.results = _HostCopy(tensors)
        self._unrecorded.append(handle)
        return handle

    def _argmax_only(self, step: StepInputs, sampling: SamplingRows) -> bool:
        """Whether this step reads only each sampling row's best token, so the head may take
        its fast argmax pass (a quantized model's RefinedHead, for up to its argmax_max_rows
        rows). Decided from what every tensor-parallel rank holds alike (guided rows count
        as not: a mask can leave the best allowed token outside the exactly refined ones)."""
        head = getattr(self.model, "refined_head", None)
        if (head is None or len(step.sample_rows) > head.argmax_max_rows
                or not sampling.argmax_only()):
            return False
        return all(self.requests[r].sampling_params.guided_decoding is None
                   for r in step.sample_request_ids)

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        """The step's results on the host: the one device-to-host wait of a step."""
        if handle.output is not None:
            return handle.output
        out = ModelRunnerOutput(req_ids=handle.req_ids)
        for request_id, first_index, chunk in handle.prompt_logprobs:
            out.prompt_logprobs[request_id] = PromptLogprobsChunk(first_index, *chunk.lists())
        if handle.results is not None:
            results = handle.results.lists()
            out.sampled_token_ids = results[0]
            if len(results) > 1:
                out.sampled_logprobs, out.topk_token_ids, out.topk_logprobs = results[1:]
        handle.output = out  # last: another thread may be reading it (see _record_collected)
        return out

    def reset_requests(self) -> None:
        """Forget every request (after a failed step): an empty batch, no steps pending."""
        self.requests.clear()
        self._unrecorded.clear()
        self.init_input_batch(self.input_batch.max_num_reqs, self.input_batch.max_model_len)

    def _record_collected(self) -> None:
        """Write the sampled tokens of collected steps into the input batch's rows (or into
        the state of a request preempted since). Done here, on the thread that owns the
        batch, not in collect()."""
        pending = []
        for handle in self._unrecorded:
            if handle.output is None:
                pending.append(handle)
            else:
                self.input_batch.record_sampled(handle.reserved, handle.output.sampled_token_ids,
                                                self.requests)
        self._unrecorded = pending

    def _feed_in_flight(self, step: StepInputs, input_ids: torch.Tensor) -> None:
        """Input tokens still being sampled by an uncollected step: copy them in on the
        device, where the step that samples them leaves them."""
        for handle in self._unrecorded:
            dst, src = self.input_batch.in_flight_inputs(step, handle.reserved)
            if len(dst):
                input_ids[self._to_device(dst)] = handle.sampled[self._to_device(src)]

    def _prompt_logprobs(self, hidden, state: CachedRequestState, start: int,
                         count: int) -> _HostCopy:
        logits = self.model.compute_logits(hidden)
        targets = host_to_device(state.prompt_token_ids[start + 1:start + 1 + count],
                                 self.device)
        return _HostCopy(list(compute_prompt_logprobs(
            logits, targets, state.sampling_params.prompt_logprobs)))
