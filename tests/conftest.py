"""Test setup.

Without CUDA, Triton kernels run under the interpreter (the variable must be set before triton is
imported) and tests marked `gpu` are skipped. With CUDA the interpreter is off, so the kernel tests that
feed CPU tensors to Triton (the interpreter tests of the modules below) are skipped; their `gpu`
counterparts run the compiled kernels instead.
"""
import os

import pytest
import torch

INTERPRETER_MODULES = {"test_triton_attention.py", "test_kron.py"}

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def skip_reason(item) -> str | None:
    if torch.cuda.is_available():
        if item.path.name in INTERPRETER_MODULES and "gpu" not in item.keywords:
            return "Triton interpreter test on CPU tensors (runs on CPU-only machines)"
        return None
    return "needs a CUDA GPU" if "gpu" in item.keywords else None


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
