"""Test setup.

Without CUDA, Triton kernels run under the interpreter (the variable must be set before triton is
imported) and tests marked `gpu` are skipped. With CUDA the interpreter is off, so the kernel tests that
feed CPU tensors to Triton (the interpreter tests of the modules below) are skipped; their `gpu`
counterparts run the compiled kernels instead.

Every test starts from a fixed seed of torch, numpy and random: its own (a hash of its node id, so a
test's inputs do not depend on which tests ran before it), or TWOMAMBA_TEST_SEED=N for all. A failing
test's report names its seed and the command that replays it.
"""
import os
import random
import zlib

import numpy as np
import pytest
import torch

INTERPRETER_MODULES = {"test_triton_attention.py", "test_triton_conv.py", "test_kron.py", "test_norm.py",
                       "test_decay.py", "test_dense.py"}

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


SEED_VARIABLE = "TWOMAMBA_TEST_SEED"
seed_key = pytest.StashKey[int]()


def seed_for(nodeid: str) -> int:
    chosen = os.environ.get(SEED_VARIABLE)
    return int(chosen) if chosen else zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def fixed_seed(request):
    seed = seed_for(request.node.nodeid)
    request.node.stash[seed_key] = seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and seed_key in item.stash:
        seed = item.stash[seed_key]
        report.sections.append(("seed", f"seed {seed}; replay: {SEED_VARIABLE}={seed} pytest '{item.nodeid}'"))
    return report
