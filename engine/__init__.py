"""pagedserve's engine: continuous batching over a paged KV cache (no web code here).

Names are imported lazily so that `import pagedserve.engine.x` (and the CLI's
--help) stays cheap."""

from importlib import import_module

_EXPORTS = {
    "LLM": "pagedserve.engine.llm",
    "LLMEngine": "pagedserve.engine.llm_engine",
    "EngineConfig": "pagedserve.engine.config",
    "SamplingParams": "pagedserve.engine.sampling_params",
    "GuidedDecodingParams": "pagedserve.engine.sampling_params",
    "RequestOutput": "pagedserve.engine.outputs",
    "CompletionOutput": "pagedserve.engine.outputs",
    "Logprob": "pagedserve.engine.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagedserve.engine' has no attribute {name!r}")
