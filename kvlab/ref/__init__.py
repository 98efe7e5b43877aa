"""NumPy reference ops: the definition of "correct" every other backend is tested against.

Depends on NumPy alone. One module per stage, each function documented with shapes and dtypes.
Slow is fine here; unclear is not.
"""
from typing import Any

import numpy as np

DESCRIPTION = "NumPy reference"


def asarray(array: Any, device: str | None = None) -> np.ndarray:
    """The NumPy backend's arrays are NumPy arrays: a copy, so ops never alias the caller's data."""
    return np.array(array, copy=True)


def to_numpy(array: np.ndarray) -> np.ndarray:
    return np.asarray(array)


def synchronize(device: str | None = None) -> None:
    """NumPy runs eagerly: nothing to wait for."""
