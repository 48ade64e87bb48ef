"""llama.cpp's `llama-server`, the CPU peer: built once from the llama-cpp-python sdist on
PyPI (its vendored llama.cpp) and cached outside the repository.

    python benchmarks/llamacpp.py          # builds if needed, prints the binary's path

The build turns off every AMX code path: the CPU flags of the VMs we measure on list AMX,
but its tile instructions fault there."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pagedserve.engine.loader.resolve import pagedserve_cache_dir  # noqa: E402

CACHE_DIR = pagedserve_cache_dir() / "llama.cpp"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    # Not -march=native: these VMs list AMX, whose instructions fault. Without NATIVE, ggml
    # builds AVX, AVX2, FMA and F16C code; AVX-512 is added where the CPU has it.
    "-DGGML_NATIVE=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
]
AVX512_FLAGS = {  # cpuinfo flag -> cmake option
    "avx512f": "-DGGML_AVX512=ON",
    "avx512vbmi": "-DGGML_AVX512_VBMI=ON",
    "avx512_vnni": "-DGGML_AVX512_VNNI=ON",
    "avx512_bf16": "-DGGML_AVX512_BF16=ON",
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cmake_flags() -> tuple[str, list[str]]:
    """(a name for this instruction set, the cmake flags for it)."""
    cpu = _cpu_flags()
    if "avx512f" not in cpu:
        return "avx2", CMAKE_FLAGS
    return "avx512", CMAKE_FLAGS + [opt for flag, opt in AVX512_FLAGS.items() if flag in cpu]


def server_binary(cache_dir: Path = CACHE_DIR) -> Path:
    """One build per instruction set: a cache shared by different machines keeps both."""
    return cache_dir / f"build-{cmake_flags()[0]}" / "bin" / "llama-server"


def ensure_llama_server(cache_dir: Path = CACHE_DIR, jobs: int | None = None) -> Path:
    """Path of a built llama-server, building it first when the cache has none."""
    binary = server_binary(cache_dir)
    if binary.is_file():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = cache_dir / "src"
    if not (source / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                            "--no-deps", "--dest", tmp, "llama-cpp-python"], check=True)
            (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            (vendor,) = Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp")
            shutil.rmtree(source, ignore_errors=True)
            shutil.move(vendor, source)
            (cache_dir / "sdist.txt").write_text(sdist.name + "\n")
    build = binary.parent.parent
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *cmake_flags()[1]],
                   check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server",
                    "-j", str(jobs or os.cpu_count() or 1)], check=True)
    if not binary.is_file():
        raise FileNotFoundError(f"the llama.cpp build finished without {binary}")
    return binary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--jobs", type=int, default=None)
    args = p.parse_args(argv)
    print(ensure_llama_server(args.cache_dir, args.jobs))


if __name__ == "__main__":
    main()
