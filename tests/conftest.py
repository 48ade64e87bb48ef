"""Test-wide settings: offline, few threads, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny-model ops gain nothing from a second thread, and on a busy 2-core machine its
    spin-waits make each step many times slower. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random-weight Llama checkpoint (tests/tiny_models.py), one per test module."""
    from tests.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")
