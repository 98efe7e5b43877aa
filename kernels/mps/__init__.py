"""PyTorch implementations of kvlab's ops, one module per stage, mirroring ``kvlab.ref.<stage>``.

Named for Apple's MPS device, the reason this backend exists, but the same ops run on CUDA and on
the CPU. They use only ops and dtypes MPS has (no float64, no FP8 dtype, no integer matmul):
``tests/test_mps_safety.py`` records every aten op each public op calls and checks it against a
list made from the installed torch's own files (``scripts/mps_allowlist.py``).
Unverified on MPS: no machine this project is tested on has one.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

# Large CPU tensors on transparent huge pages, as NumPy puts its large arrays: without them every
# new tensor of 32 MiB or more (glibc's largest mmap threshold) is faulted in 4 KiB pages, measured
# 4x slower than NumPy's allocation of the same array (a gather of 4 x 4096 tokens: 40 ms against
# 13). torch reads the variable at its first large allocation; a value already set is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402  (after the variable above)

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


def has_float64(device: str | torch.device | None) -> bool:
    """False on MPS (``"mps"``, ``"mps:0"``, ...), whose GPUs have no float64; True elsewhere.

    The one place the backend asks: ops that would use float64 on other devices (a correctly
    rounded sqrt, in :mod:`kvlab.kernels.mps.fused_write`) take their float32 path when this is
    False, and ``tests/test_mps_safety.py`` sets it False to run the ops as they run on MPS.
    """
    return torch.device(device or "cpu").type != "mps"


def asarray(array: Any, device: str | None = None) -> torch.Tensor:
    """Copy a NumPy array to a tensor on ``device`` (dtype kept; float64 refused on MPS)."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.float64 and not has_float64(device):
        raise TypeError(f"MPS has no float64 (device {device!r}): convert the array to float32 "
                        f"first")
    return torch.from_numpy(array.copy()).to(device or "cpu")


# On the CPU an op over many tokens runs a tile of tokens at a time, so that each step's float32
# temporaries are still in the caches when the next step reads them: the same reason a kernel
# fuses its steps. Measured on a 2-core CPU (RoPE of 2048 tokens x 32 heads x 128, fp16): one
# pass over all the tokens 36-39 ms, tiles of 1-4 MiB of float32 12-14 ms, 8 MiB 20 ms, 128 KiB
# 39 ms (the per-op overhead). On a GPU or MPS every op is a kernel launch and the device's
# bandwidth, not a cache, is the budget: there an op takes all its tokens in one tile.
CPU_TILE_BYTES = 2 * 2**20


def token_tiles(num_tokens: int, bytes_per_token: int, device: str | torch.device) -> list[slice]:
    """The token ranges an op takes one at a time: tiles of :data:`CPU_TILE_BYTES`
    (``bytes_per_token``: the float32 bytes one token's step holds) on the CPU, one elsewhere."""
    if torch.device(device).type != "cpu":
        return [slice(0, num_tokens)]
    size = max(1, CPU_TILE_BYTES // max(bytes_per_token, 1))
    return [slice(start, start + size) for start in range(0, num_tokens, size)]


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def synchronize(device: str | None = None) -> None:
    """Wait for the device's queued work (``"mps"``, ``"mps:0"``, ``"cuda:1"``, ...); the CPU has
    none."""
    kind = torch.device(device or "cpu").type
    if kind == "mps":
        torch.mps.synchronize()
    elif kind == "cuda":
        torch.cuda.synchronize(device)


def require_tensors(**arrays: Any) -> None:
    """TypeError unless every array argument (None skipped) is a ``torch.Tensor``, ValueError
    unless they are all on one device.

    The argument checks of :mod:`kvlab.checks` are duck-typed (any array with ``.shape`` and
    ``.dtype`` passes them), so a NumPy array given to a torch op would only fail later, deep in
    the op, with an ``AttributeError`` about ``.float`` or ``.long`` (and a write could have
    started); a tensor on another device would fail in the middle of the op too.
    """
    first = None
    for name, array in arrays.items():
        if array is None or not hasattr(array, "shape"):
            continue  # not an array: kvlab.checks says what it should have been
        if not isinstance(array, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor for the torch backend, got "
                            f"{type(array).__module__}.{type(array).__name__} (convert it with "
                            f"backend.asarray)")
        if first is None:
            first = name, array.device
        elif array.device != first[1]:
            raise ValueError(f"{name} is on {array.device} but {first[0]} is on {first[1]}: the "
                             f"torch ops take tensors on one device")
