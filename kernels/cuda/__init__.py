"""Numba CUDA kernels, one module per stage, each mirroring ``kvlab.ref.<stage>``.

Runs on a real GPU when the driver reports one, else in Numba's CUDA simulator: the choice is made
by :func:`kvlab.backends.cuda_mode` *before* numba is imported here.

Every kernel is declared with :func:`kernel`, which is ``numba.cuda.jit`` plus a record of the
argument types the kernel is compiled for. The simulator runs any Python, so the test suite also
compiles every recorded kernel to PTX and through ptxas for real (``kvlab.kernels.cuda.ptx``:
registers, spills, shared memory, the decode loops' instruction budget) — no GPU needed.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kvlab.backends import cuda_mode

MODE = cuda_mode()  # must run before the first `import numba`

from numba import cuda  # noqa: E402  (after the simulator decision, on purpose)

DESCRIPTION = "Numba CUDA simulator" if MODE == "simulator" else "Numba CUDA on a GPU"

# The simulator runs each CUDA thread as a Python thread, and its block manager waits for a
# barrier by polling those threads in a loop that never blocks. A thread that wakes from a barrier
# must wait for the manager to hand over the GIL, which Python forces only every
# ``sys.getswitchinterval()`` (5 ms by default): a kernel with thousands of barriers then spends
# minutes waiting, how long depending on the operating system's whims (the same launch took 0.2 s
# or 60 s). At 20 us the hand-over costs little and is steady. Only ever lowered, never raised.
SIMULATOR_SWITCH_INTERVAL_S = 20e-6
if MODE == "simulator" and sys.getswitchinterval() > SIMULATOR_SWITCH_INTERVAL_S:
    sys.setswitchinterval(SIMULATOR_SWITCH_INTERVAL_S)


def _simulated_shared_array(self: Any, shape: Any, dtype: Any, alignment: Any = None) -> Any:
    """``cuda.shared.array`` in the simulator: one array per thread block and source line, made by
    the first thread to get there — under a lock.

    numba-cuda's own version looks the line up and, if nothing is there yet, creates the array and
    stores it, with no lock: two threads arriving together can each create one, and then each
    writes into an array the other never reads (a kernel that is correct on a GPU gives wrong
    answers now and then; seen in a test run once the switch interval above made threads
    interleave finely). It also finds the line with ``traceback.extract_stack``, which reads
    source files; the caller's frame says the same for much less.
    """
    if shape == 0 or alignment is not None:  # dynamic shared memory, or the simulator's refusal
        return _NUMBA_SHARED_ARRAY(self, shape, dtype, alignment)
    caller = sys._getframe(1)
    where = (caller.f_code.co_filename, caller.f_lineno)
    with _SHARED_LOCK:
        array = self._allocations.get(where)
        if array is None:
            array = self._allocations[where] = np.empty(shape, numpy_support.as_dtype(dtype)
                                                        if isinstance(dtype, types.Type) else dtype)
    return array


if MODE == "simulator":
    import threading

    from numba.cuda import types  # noqa: E402  (the simulator's own, as kernelapi uses them)
    from numba.cuda.np import numpy_support  # noqa: E402
    from numba.cuda.simulator.kernelapi import FakeCUDAShared  # noqa: E402

    _SHARED_LOCK = threading.Lock()
    _NUMBA_SHARED_ARRAY = FakeCUDAShared.array
    FakeCUDAShared.array = _simulated_shared_array


@dataclass(frozen=True)
class RegisteredKernel:
    """A kernel's Python source function, the signatures the PTX-compile test builds, the
    launch bounds it is compiled with (None: the compiler's choice), its ``cuda.jit``
    dispatcher (some kernels live in a dict, not under their name in a module) and the oldest
    compute capability whose instructions it uses (None: any)."""

    name: str
    py_func: Callable
    signatures: tuple[str, ...]
    launch_bounds: tuple[int, int] | None
    dispatcher: Any
    min_cc: tuple[int, int] | None = None


REGISTRY: list[RegisteredKernel] = []


def kernel(*signatures: str, launch_bounds: tuple[int, int] | None = None,
           min_cc: tuple[int, int] | None = None) -> Callable:
    """Decorator: ``cuda.jit`` the function (lazily, any types) and register ``signatures``.

    Signatures are Numba type strings such as ``"void(float16[:, :, :, ::1], int32[::1])"``;
    give one per dtype combination the launch wrapper can pass. ``launch_bounds`` =
    ``(threads per block, blocks per SM)`` promises the compiler those launches (CUDA's
    ``__launch_bounds__``), so it fits the registers to that many blocks; the simulator ignores it.
    ``min_cc``: the kernel uses instructions older GPUs lack (``kvlab.kernels.cuda.ptx`` compiles
    it only for that compute capability and newer).
    """
    if not signatures:
        raise ValueError("kernel() needs at least one signature for the PTX-compile test")

    def register(func: Callable) -> Any:
        if launch_bounds is not None and MODE == "gpu":
            dispatcher = cuda.jit(func, launch_bounds=launch_bounds)
        else:
            dispatcher = cuda.jit(func)
        REGISTRY.append(RegisteredKernel(f"{func.__module__}.{func.__name__}", func, signatures,
                                         launch_bounds, dispatcher, min_cc))
        return dispatcher

    return register


# ``a * c - b * s`` (RoPE) is where a GPU compiler likes to contract a multiply and an add into
# one FMA: one rounding instead of two, so a GPU result would differ from the reference's in the
# last bit. ``mul_rn`` is a multiply the compiler promises never to contract (libdevice's
# ``fmul_rn``); the simulator, plain Python floats, never contracts and multiplies as written.
#
# ``float_from_bits`` reads 32 bits as the float32 they encode (a bitcast, no conversion): how a
# kernel that loads 8-byte words of a pool turns a word's halves back into numbers. libdevice's
# ``int_as_float`` on a GPU (a register move); NumPy's ``view`` in the simulator.
if MODE == "gpu":
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline="always")
    def mul_rn(a, b):
        return libdevice.fmul_rn(a, b)

    @cuda.jit(device=True, inline="always")
    def float_from_bits(bits):
        return libdevice.int_as_float(np.int32(np.uint32(bits)))
else:
    @cuda.jit(device=True, inline="always")
    def mul_rn(a, b):
        return a * b

    @cuda.jit(device=True, inline="always")
    def float_from_bits(bits):
        return np.uint32(bits).view(np.float32)


def load_all_stages() -> list[str]:
    """Import every stage module in this package (so REGISTRY is complete); return their names."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    stages = [n for n in names if n != "ptx"]
    for stage in stages:
        importlib.import_module(f"{__name__}.{stage}")
    return stages


def check_available() -> None:
    """Raise a clear error when this process was set up for a GPU that is not there."""
    if MODE == "gpu" and not cuda.is_available():
        raise RuntimeError(
            "numba was imported with NUMBA_ENABLE_CUDASIM=0 but finds no usable GPU; restart and "
            "let kvlab.backends.cuda_mode() choose (or set NUMBA_ENABLE_CUDASIM=1)"
        )


def asarray(array: Any, device: str | None = None) -> Any:
    """Copy a NumPy array to the device (dtype and shape kept)."""
    return cuda.to_device(np.ascontiguousarray(array))


def to_numpy(array: Any) -> np.ndarray:
    """Copy a device array back to the host."""
    return array.copy_to_host()


def synchronize(device: str | None = None) -> None:
    cuda.synchronize()


# The flag the check kernels raise (a bad value found), made once per process: a fresh one per
# call is a cuMemAlloc and a host-to-device copy before every checked write (one `cuda.to_device`
# of a few bytes took 191 us on the H200, data/bench/h200_2026-11-27_host_overhead.txt). It is 0
# between calls: whoever reads it raised resets it. Safe because every launch here goes to the
# legacy default stream of one context, in order (as the attention's scratch buffers); host
# threads launching at once would need one flag each.
_ERROR_FLAG: Any = None


def error_flag() -> Any:
    """The process's check flag: a device int32 ``[1]`` holding 0."""
    global _ERROR_FLAG
    if _ERROR_FLAG is None:
        _ERROR_FLAG = cuda.to_device(np.zeros(1, np.int32))
    return _ERROR_FLAG


def read_and_reset_flag(flag: Any) -> bool:
    """Whether a check kernel raised ``flag`` (:func:`error_flag`): one 4-byte read back, which
    waits for the kernel. A raised flag is set back to 0 here, for the next call."""
    if not flag.copy_to_host()[0]:
        return False
    flag.copy_to_device(np.zeros(1, np.int32))
    return True
