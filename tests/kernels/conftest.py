"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else in Triton's
interpreter, which must be switched on before triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
