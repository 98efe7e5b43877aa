"""The one place that picks an implementation of kvlab's ops.

Three backends share one contract (docs/design.md#backends): the same stage modules with the same function
names and parameters, each taking and returning its own arrays.

| name      | package                | arrays               | runs on                                  |
|-----------|------------------------|----------------------|------------------------------------------|
| ``numpy`` | ``kvlab.ref``          | ``numpy.ndarray``    | the CPU; the definition of "correct"     |
| ``cuda``  | ``kvlab.kernels.cuda`` | Numba device arrays  | a real NVIDIA GPU, else Numba's simulator |
| ``torch`` | ``kvlab.kernels.mps``  | ``torch.Tensor``     | Apple's MPS, else CUDA, else the CPU     |

Numba reads ``NUMBA_ENABLE_CUDASIM`` once, when it is first imported, and a process cannot switch
afterwards. So :func:`cuda_mode` decides GPU-vs-simulator *before* anything imports numba (it asks
the CUDA driver directly through ``ctypes``), and every route into numba in kvlab goes through it.
``import kvlab`` imports neither numba nor torch: a backend is imported when first asked for.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

BACKENDS = ("numpy", "cuda", "torch")
_PACKAGES = {"numpy": "kvlab.ref", "cuda": "kvlab.kernels.cuda", "torch": "kvlab.kernels.mps"}
_CUDASIM = "NUMBA_ENABLE_CUDASIM"


def gpu_present() -> bool:
    """True when the CUDA driver is installed and reports at least one device.

    Asks ``libcuda`` itself (``cuInit`` + ``cuDeviceGetCount``), so it never imports numba and can
    be called before the simulator decision is made.
    """
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0:
            return False
        return driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def cuda_mode() -> str:
    """Return ``"gpu"`` or ``"simulator"``: how the ``cuda`` backend runs in this process.

    The first call decides, in this order: numba already imported → whatever it was imported with;
    ``NUMBA_ENABLE_CUDASIM`` set by the caller → that; otherwise a real GPU if the driver reports
    one, else the simulator (and the variable is set so numba picks it up when imported).
    """
    if "numba" in sys.modules:
        from numba import config  # numba is already loaded: reading its config costs nothing

        return "simulator" if config.ENABLE_CUDASIM else "gpu"
    chosen = os.environ.get(_CUDASIM, "").strip()
    if chosen == "":
        chosen = "0" if gpu_present() else "1"
        os.environ[_CUDASIM] = chosen
    return "gpu" if chosen == "0" else "simulator"


@dataclass(frozen=True)
class Backend:
    """A backend: its name, the device it runs on, and its stage modules as attributes.

    ``get_backend("torch").paging`` is ``kvlab.kernels.mps.paging``; ``get_backend("numpy").paging``
    is ``kvlab.ref.paging``. Every stage module of every backend defines the same functions.
    """

    name: str
    device: str
    package: ModuleType

    def __getattr__(self, stage: str) -> ModuleType:
        if stage.startswith("_"):
            raise AttributeError(stage)
        try:
            return importlib.import_module(f"{self.package.__name__}.{stage}")
        except ModuleNotFoundError as err:
            if err.name != f"{self.package.__name__}.{stage}":
                raise
            raise AttributeError(f"backend {self.name!r} has no stage {stage!r}") from None

    def asarray(self, array: Any) -> Any:
        """Copy a NumPy array to this backend's array type and device (dtype kept)."""
        return self.package.asarray(array, device=self.device)

    def to_numpy(self, array: Any) -> Any:
        """Copy one of this backend's arrays back to a ``numpy.ndarray``."""
        return self.package.to_numpy(array)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU); call before reading a clock."""
        self.package.synchronize(self.device)

    def describe(self) -> str:
        """One line saying what runs where, e.g. ``cuda on simulator (Numba CUDA simulator)``."""
        return f"{self.name} on {self.device} ({self.package.DESCRIPTION})"

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device!r})"


def get_backend(name: str = "numpy", device: str | None = None) -> Backend:
    """Return the backend ``name`` ("numpy" | "cuda" | "torch") on ``device``.

    device:
        numpy: ``None`` or ``"cpu"``.
        cuda: ``None`` (``"gpu"`` or ``"simulator"``, decided by :func:`cuda_mode`), or the mode
        itself, which must match what this process runs.
        torch: ``None`` picks ``"mps"``, then ``"cuda"``, then ``"cpu"``; or any torch device string.
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend name must be one of {BACKENDS}, got {name!r}")
    if device is not None and not isinstance(device, str):
        raise TypeError(f"device must be a string or None, got {type(device).__name__}")
    if name == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy backend runs on 'cpu' only, got device={device!r}")
        return Backend("numpy", "cpu", importlib.import_module(_PACKAGES[name]))
    if name == "cuda":
        mode = cuda_mode()
        if device not in (None, mode):
            raise ValueError(
                f"this process runs the cuda backend on {mode!r} (decided when numba was first "
                f"imported), so device={device!r} is not available; restart the kernel and set "
                f"{_CUDASIM}={'0' if device == 'gpu' else '1'} before importing kvlab"
            )
        package = importlib.import_module(_PACKAGES[name])
        package.check_available()
        return Backend("cuda", mode, package)
    package = importlib.import_module(_PACKAGES[name])
    return Backend("torch", package.pick_device(device), package)
