"""The CPU kernels' C++ extension: every kernel source in kernels/ that is C++ built into one
module, once per machine, at first use.

Built with torch.utils.cpp_extension (a C++ compiler and ninja, as inductor needs too) into
the torch extensions cache, -march=native: so its name carries a hash of the CPU's
instruction sets, and only the first start on a machine pays the build (~30 s, most of it
torch's headers, hence one module for all the kernels). `module()` is None where it could
not be built: each kernel's callers then take their torch path."""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

logger = logging.getLogger(__name__)


def _cpu_fingerprint() -> str:
    """A short hash of this CPU's instruction sets: the build is -march=native, and a home
    directory (with its build cache) can move to a machine with fewer of them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def _kernels() -> tuple:
    from pagedserve.kernels import cpu_decode_attention, cpu_int4_linear

    return (cpu_decode_attention, cpu_int4_linear)


def source_hash() -> str:
    """A short hash of the kernels' sources (what their operators do)."""
    return hashlib.sha256("".join(k.SOURCE for k in _kernels()).encode()).hexdigest()[:10]


@functools.cache
def module():
    """The built extension, or None (logged once) when it cannot be built here."""
    kernels = _kernels()
    name = f"pagedserve_cpu_kernels_{_cpu_fingerprint()}"
    try:
        # (torch's build helpers: inside the try, as a torch without them cannot build)
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        if not (Path(_get_build_directory(name, False)) / f"{name}.so").exists():
            logger.warning("Building the CPU kernels (once, ~30 s; cached)")
        built = load_inline(
            name, cpp_sources=[kernel.SOURCE for kernel in kernels],
            functions=[f for kernel in kernels for f in kernel.FUNCTIONS],
            # -fopenmp: at::parallel_for is OpenMP in torch's headers (it finds torch's own
            # libgomp already loaded); fast-math lets the row sums and exp vectorize.
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math",
                          "-fno-finite-math-only"],
            extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja: the torch paths still serve
        logger.warning("Building the CPU kernels failed, using torch's ops: %s: %s",
                       type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    for kernel in kernels:
        kernel.register_fakes()
    return built
