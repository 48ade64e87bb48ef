"""How pagedserve sits among other packages.

The checkout's top-level folders must not shadow installed packages of the same name.

Run from the repository root (`python -m pytest`, `python -c`), the root is on sys.path. Hugging
Face's `kernels` package (a dependency of recent transformers) shares its name with our
kernels/ folder; transformers imports it at model load, so a shadowing folder breaks every
model load. kernels/ has no __init__.py for that reason: a namespace portion loses to any
regular package later on sys.path, and pagedserve.kernels still resolves."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_folder_does_not_shadow_an_installed_kernels_package(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("MARKER = 'installed'\n")
    probe = textwrap.dedent(f"""
        import importlib.util, sys
        assert sys.path[0] in ('', {str(ROOT)!r}), sys.path[0]  # the root comes first
        sys.path.insert(1, {str(site)!r})  # an installed package, right after the root
        import kernels
        print(kernels.MARKER)
        print(importlib.util.find_spec('pagedserve.kernels.paged_attention').origin)
    """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["installed", str(ROOT / "kernels" / "paged_attention.py")]


# Packages the GPU image lacks (see DEVELOPERS.md): the server's, the GGUF converter's.
NOT_ON_THE_GPU_IMAGE = ["fastapi", "uvicorn", "starlette", "pydantic", "openai", "xgrammar",
                        "gguf", "prometheus_client"]


def test_the_engine_runs_without_the_server_and_gguf_packages(tiny_dir):
    """A safetensors model loads and generates with none of those importable."""
    probe = textwrap.dedent(f"""
        import json, sys
        for name in {NOT_ON_THE_GPU_IMAGE!r}:
            sys.modules[name] = None  # `import name` now raises ImportError
        from pagedserve.engine import LLM, SamplingParams
        llm = LLM(model={str(tiny_dir)!r}, skip_tokenizer_init=True, enforce_eager=True)
        out = llm.generate([{{"prompt_token_ids": [5, 6, 7]}}],
                           SamplingParams(max_tokens=4, ignore_eos=True))
        llm.shutdown()
        print(json.dumps(out[0].outputs[0].token_ids))
    """)
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads(done.stdout.splitlines()[-1])) == 4
