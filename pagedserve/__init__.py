"""pagedserve: high-throughput LLM inference, one import name for three packages:
pagedserve.engine, pagedserve.kernels and pagedserve.server.

In the repository they are the top-level folders engine/, kernels/ and server/; setup.py's
package_dir installs them inside this package, so a wheel holds only pagedserve/. In a
checkout that is not installed (its root on sys.path: pytest, benchmarks/, the GPU checks)
they sit beside this folder, and the package's path takes in the root. kernels/ has no
__init__.py: with the root on sys.path a regular package there would shadow Hugging Face's
`kernels`, which transformers imports (tests/test_packaging.py)."""

from pathlib import Path as _Path

if not (_Path(__file__).resolve().parent / "engine").is_dir():  # a source checkout
    __path__.append(str(_Path(__file__).resolve().parent.parent))
