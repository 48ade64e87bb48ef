"""Turn what the user names as a model (nothing, an HF directory or a GGUF file) into a
local HuggingFace-format directory; GGUF files are converted once and cached by content.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import time

logger = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
_HASH_CHUNK = 1 << 22  # 4 MiB


def pagedserve_cache_dir() -> pathlib.Path:
    """$PAGEDSERVE_CACHE_DIR, else $XDG_CACHE_HOME/pagedserve, else ~/.cache/pagedserve."""
    if explicit := os.environ.get("PAGEDSERVE_CACHE_DIR"):
        return pathlib.Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "pagedserve"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_gguf(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _is_complete(hf_dir: pathlib.Path) -> bool:
    return (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()


def gguf_cache_path(gguf_path: str | os.PathLike) -> pathlib.Path:
    """Cache directory for the HF conversion of `gguf_path`, keyed by its content and the
    converter version (so a changed converter never serves a stale conversion)."""
    from pagedserve.engine.loader.gguf import CONVERTER_VERSION

    digest = file_sha256(gguf_path)
    return pagedserve_cache_dir() / "gguf" / f"{digest[:20]}-c{CONVERTER_VERSION}"


# A conversion's staging directory (see convert_gguf_to_hf_dir) older than this belongs to
# a process that died mid-conversion: no conversion takes anywhere near as long.
_STALE_STAGING_S = 3600


def remove_stale_staging(cache_dir: pathlib.Path, max_age_s: float = _STALE_STAGING_S) -> None:
    """Remove staging directories (`.<name>.tmp-*`) that a killed conversion left behind
    in `cache_dir`, once they are older than max_age_s; younger ones may be in use."""
    now = time.time()
    for staging in cache_dir.glob(".*.tmp-*"):
        try:
            if staging.is_dir() and now - staging.stat().st_mtime > max_age_s:
                logger.info("Removing %s, left by an interrupted conversion", staging)
                shutil.rmtree(staging, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            pass


def _resolve_gguf(gguf_path: pathlib.Path) -> pathlib.Path:
    from pagedserve.engine.loader.gguf import convert_gguf_to_hf_dir

    start = time.perf_counter()
    out_dir = gguf_cache_path(gguf_path)
    remove_stale_staging(out_dir.parent)
    if _is_complete(out_dir):
        logger.info("Using cached conversion of %s at %s", gguf_path, out_dir)
        return out_dir
    if out_dir.exists():
        # Conversions appear by an atomic rename, so this was damaged after the fact.
        logger.warning("Cached conversion %s is incomplete; converting again", out_dir)
        shutil.rmtree(out_dir)
    logger.info("Converting %s (first use; cached afterwards in %s)", gguf_path, out_dir)
    try:
        convert_gguf_to_hf_dir(gguf_path, out_dir)
    except FileExistsError:
        # Another process converted the same file at the same time; use its result.
        if not _is_complete(out_dir):
            raise
    logger.info("GGUF conversion took %.1f s", time.perf_counter() - start)
    return out_dir


def resolve_model(model: str | os.PathLike | None) -> pathlib.Path:
    """Local HF-format directory for `model`.

    None: the embedded default model (SmolLM2-135M-Instruct GGUF). A directory: used as
    is, must contain config.json. A GGUF file: converted once into the pagedserve cache.
    Anything else (e.g. a hub id) is a ValueError: pagedserve never downloads models.
    """
    if model is None:
        from pagedserve.engine.loader.default_model import default_model_path

        return _resolve_gguf(default_model_path())
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; to use a GGUF file in it, pass its path, e.g. {ggufs[0]!r}" if ggufs else ""
            raise ValueError(
                f"model directory {str(model)!r} has no config.json; a model directory must be "
                f"in HuggingFace format (config.json, *.safetensors, tokenizer files){hint}"
            )
        return path.resolve()
    if path.is_file():
        if _is_gguf(path):
            return _resolve_gguf(path.resolve())
        raise ValueError(
            f"model file {str(model)!r} is not a GGUF file (no GGUF magic bytes); a model is "
            "a .gguf file or a HuggingFace-format directory with config.json"
        )
    if path.suffix.lower() == ".gguf":
        raise FileNotFoundError(f"GGUF file {str(model)!r} does not exist")
    raise ValueError(
        f"model {str(model)!r} is neither an existing directory nor a file. pagedserve does "
        "not download from model hubs; pass a local HuggingFace-format directory (with "
        "config.json), a local .gguf file, or nothing for the embedded default model"
    )
