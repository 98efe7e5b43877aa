"""What a run records about the machine: the device's name, its measured copy bandwidth and float32
matrix-product rate (the roofs a row is read against), and the library versions."""
from __future__ import annotations

import platform
import statistics
import sys
from typing import Any, Callable

import numpy as np

from kvlab.bench.timers import measure

COPY_BW_BYTES = 512 * 1024**2        # each of src and dst for the copy-bandwidth measurement


def device_name(backend: Any, torch: Any) -> str:
    if backend.name == "cuda" and backend.device == "gpu":
        from numba import cuda

        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    if backend.name == "cuda":
        return "Numba CUDA simulator on " + (platform.processor() or platform.machine())
    if backend.name == "torch" and backend.device.startswith("cuda"):
        return torch.cuda.get_device_name()
    if backend.name == "torch" and backend.device == "mps":
        return "Apple MPS"
    return f"CPU {platform.processor() or platform.machine()}"


def copy_bandwidth(backend: Any, timer: Any, torch: Any,
                   torch_timer: Any = None) -> tuple[float, str]:
    """GB/s of a device-to-device copy of COPY_BW_BYTES, counting bytes read + written: the faster
    of Numba's copy (cuMemcpyDtoD) and torch's ``copy_`` when both can run (on an H100 the driver's
    copy measured 2.5 TB/s while torch SDPA read K/V at 2.9 TB/s: the slower copy is no roof).
    Returns ``(GB/s, which copy)``."""
    def timed(fn: Callable[[], Any], clock: Any) -> float:
        return 2 * COPY_BW_BYTES / statistics.median(measure(clock, fn, 2, 10)) / 1e9

    rates = []  # (GB/s, how)
    if backend.name == "cuda":
        from numba import cuda

        src = cuda.device_array(COPY_BW_BYTES, np.uint8)
        dst = cuda.device_array(COPY_BW_BYTES, np.uint8)
        rates.append((timed(lambda: dst.copy_to_device(src), timer), "numba copy_to_device"))
        del src, dst
    device = backend.device if backend.name == "torch" else "cuda"
    if backend.name == "torch" or (torch_timer is not None and torch.cuda.is_available()):
        src = torch.empty(COPY_BW_BYTES, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        rates.append((timed(lambda: dst.copy_(src), torch_timer or timer), "torch copy_"))
    return max(rates)


def fp32_matmul_tflops(torch: Any, timer: Any) -> float:
    """TFLOP/s of a 4096^3 float32 matrix product through torch (cuBLAS) with TF32 off: the
    measured ceiling of plain float32 arithmetic, the compute roof of notebook 05's roofline."""
    n = 4096
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        times = measure(timer, lambda: a @ b, 2, 10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return 2 * n**3 / statistics.median(times) / 1e12


def library_versions(torch: Any) -> dict[str, str | None]:
    out = {"python": platform.python_version(), "numpy": np.__version__,
           "torch": getattr(torch, "__version__", None), "numba": None, "numba_cuda": None}
    if "numba" in sys.modules:
        import numba

        out["numba"] = numba.__version__
        try:
            from importlib.metadata import version

            out["numba_cuda"] = version("numba-cuda")
        except Exception:  # noqa: BLE001  (metadata is informative only)
            pass
    return out
