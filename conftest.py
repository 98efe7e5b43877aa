"""Repo-root pytest set-up: choose Numba's CUDA simulator before anything imports numba.

Tests run the ``cuda`` backend in the simulator unless the caller chose (``NUMBA_ENABLE_CUDASIM``
set) or asked for the GPU tests (``pytest -m gpu``, as ``scripts/gpu_check.sh`` does), in
which case kvlab.backends decides from the driver. Tests marked ``gpu`` are skipped without a real GPU.
"""
import os

import pytest

from kvlab.backends import BACKENDS  # imports neither numba nor torch


def pytest_configure(config):
    markexpr = config.option.markexpr or ""
    wants_gpu = "gpu" in markexpr and "not gpu" not in markexpr
    if "NUMBA_ENABLE_CUDASIM" not in os.environ and not wants_gpu:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    # Every exercise checker in the notebooks checks its reference solution instead of the stub
    # (the notebooks' kernels inherit this process's environment): see kvlab.exercises.core.
    os.environ.setdefault("KVLAB_SOLUTIONS", "1")
    # The allocator setting kvlab.kernels.mps makes when it is the first to import torch, made
    # here before any test module imports torch, so every test process runs the way the torch
    # backend asks for, whichever module imports torch first.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


@pytest.fixture
def learner_view(monkeypatch):
    """For a test of an exercise checker: check the function given, not the reference solution
    the swap above puts in its place."""
    monkeypatch.delenv("KVLAB_SOLUTIONS", raising=False)


@pytest.fixture(params=[*BACKENDS, "torch-tiles"])
def backend(request, monkeypatch):
    """Every backend for an op's parity suite, and torch on the CPU once more with a tile of one
    token (``kvlab.kernels.mps.token_tiles``), so the tiled loops' edges are checked at the small
    sizes the suites use (where the CPU's 2 MiB tiles would hold every token at once). A test
    module with its own ``backend`` fixture overrides this one."""
    from kvlab.backends import get_backend

    if request.param != "torch-tiles":
        return get_backend(request.param)
    from kvlab.kernels import mps

    monkeypatch.setattr(mps, "CPU_TILE_BYTES", 1)
    return get_backend("torch", "cpu")


def pytest_collection_modifyitems(config, items):
    from kvlab.backends import cuda_mode

    if cuda_mode() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a real CUDA GPU (this run uses the simulator)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
