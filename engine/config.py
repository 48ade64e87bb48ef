"""Engine options, under vLLM's names, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOAD_FORMATS = ("auto", "dummy")
_QUANTIZATIONS = ("auto", "none", "int4", "int8")


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # HF directory or .gguf file; None: the embedded default model
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    skip_tokenizer_init: bool = False  # token-id prompts only; outputs carry no text
    # Activations and dense weights. auto: bfloat16 on CUDA; on a CPU float32, except for a
    # quantized model on a CPU with AVX512-BF16 but without our int4 kernel (AVX512-VNNI),
    # where bf16 is torch's kernels' own input and its GEMMs 3x faster (see
    # engine/model_runner.py:resolve_dtype).
    dtype: str = "auto"
    device: str = "auto"  # auto: cuda if available, else cpu
    load_format: str = "auto"  # dummy: random weights at the config's shapes
    # CPU weight-only quantization (engine/models/quantized.py). auto: a GGUF file's own
    # quantization, an HF checkpoint as it is; none: dense weights in `dtype` (a GGUF
    # dequantized); int4/int8: quantize at load.
    quantization: str = "auto"
    # Keep a dense copy of quantized weights (bf16 with AVX512-BF16, else fp32) for products
    # of many rows (prefill, big decode batches), where it is several times faster than the
    # packed kernels. None: when the copy takes at most 1/8 of the machine's memory.
    quantized_dense_copy: bool | None = None
    # The KV cache's dtype; auto: the activations' (dtype), but bf16 beside a quantized
    # model's fp32 activations on a CPU with AVX512-BF16. A bf16 cache beside fp32
    # activations halves the cache's memory and the attention's reads (CPU only).
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    max_num_seqs: int = 128
    # Token budget of one step; None: 2048 on GPU, 512 on CPU, where a 2048-token step takes
    # seconds and every running stream would wait that long for its next token.
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None  # force the KV cache size in blocks (any device)
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # CPU KV cache bytes, all TP ranks together; default 4 GiB
    seed: int = 0
    # No CUDA graphs for decode steps (GPU), no torch.compile'd forward (CPU, quantized model).
    enforce_eager: bool = False
    # Schedule and launch step N+1 before processing step N's outputs (vLLM's
    # --async-scheduling). None: on for GPUs; off for CPUs, where it has not paid (see
    # benchmarks/results/async_scheduling_cpu_smollm2.md).
    async_scheduling: bool | None = None
    attention_backend: str | None = None  # "torch" or "triton"; None: triton on GPU, torch on CPU
    # Ranks the model is split over (engine/executor.py): heads, MLP features and vocabulary
    # divided among worker processes, gloo on CPUs, NCCL on GPUs (one GPU per rank).
    tensor_parallel_size: int = 1
    # A reasoning model's (start, end) thinking tags, e.g. ("<think>", "</think>"), each one
    # token: guided output is then constrained only after the thinking (vLLM's default
    # with --reasoning-parser). None: the grammar holds from the first output token.
    reasoning_tags: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {_KV_CACHE_DTYPES}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}"
            )
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}"
            )
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size",
                     "tensor_parallel_size"):
            value = getattr(self, name)
            if value is None and name == "max_num_batched_tokens":
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(
                f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(
                f"kv_cache_memory must be a positive byte count, got {self.kv_cache_memory}"
            )
        if self.attention_backend not in (None, "torch", "triton"):
            raise ValueError(
                "attention_backend must be 'torch', 'triton' or None, "
                f"got {self.attention_backend!r}"
            )
