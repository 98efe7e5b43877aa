"""PyTorch implementations of kvlab's ops, one module per stage, mirroring ``kvlab.ref.<stage>``.

Named for Apple's MPS device, the reason this backend exists, but the same ops run on CUDA and on
the CPU. They use only float16/float32/int8/int32 ops MPS supports (no float64).
Unverified on MPS: no machine this project is tested on has one.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

DESCRIPTION = "PyTorch ops (mps → cuda → cpu; unverified on MPS)"


def pick_device(device: str | None = None) -> str:
    """``device`` checked, or the best available: ``"mps"``, then ``"cuda"``, then ``"cpu"``."""
    if device is None:
        if torch.backends.mps.is_available():
            return "mps"
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"torch device {device!r} is not usable here: {err}") from None
    return device


def asarray(array: Any, device: str | None = None) -> torch.Tensor:
    """Copy a NumPy array to a tensor on ``device`` (dtype kept; float64 refused on MPS)."""
    array = np.ascontiguousarray(array)
    if device == "mps" and array.dtype == np.float64:
        raise TypeError("MPS has no float64: convert the array to float32 first")
    return torch.from_numpy(array.copy()).to(device or "cpu")


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def synchronize(device: str | None = None) -> None:
    if device == "mps":
        torch.mps.synchronize()
    elif device is not None and device.startswith("cuda"):
        torch.cuda.synchronize()
