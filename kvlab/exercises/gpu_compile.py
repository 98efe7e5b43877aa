"""Does a learner's kernel compile for a real GPU? The question the simulator cannot answer.

Numba's CUDA simulator runs a kernel's Python as Python, so a kernel that passes every case there
may still be something no GPU compiler takes: a Python list, a NumPy call, a shared array sized at
run time (its size must be a compile-time constant). So once a kernel puzzle's cases pass in the
simulator, its checker hands the kernel's source to Numba's real compiler (NVVM, to PTX for
``sm_90``), which needs no GPU but does need a process of its own: ``numba.cuda.compile_ptx`` does
not exist where the simulator was imported (``kvlab.kernels.cuda.ptx`` works the same way).

What travels to that process: the kernel's source (its decorators dropped), the global names it
uses that can be rebuilt there (modules such as ``np``, ``math`` and ``cuda``, Numba types such as
``float32``, NumPy scalar types, and numbers such as ``THREADS``), and the types of the case's
arguments. A kernel that uses anything else (a device function of the learner's, say) is not
compiled, and :func:`compile_for_gpu` says why (as it does when the compiler asks for a GPU driver).
"""
from __future__ import annotations

import dis
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

CC = (9, 0)  # the architecture compiled for (an H100/H200); any recent one would do
TIMEOUT_S = 180

# Runs in the compiling process: rebuild the globals, define the kernel, type the arguments.
_COMPILER = r"""
import importlib, json, sys
import numpy as np
import numba
from numba import types
from numba.cuda import compile_ptx

job = json.load(sys.stdin)
scope = {}
for name, kind, value in job["globals"]:
    if kind == "module":
        scope[name] = importlib.import_module(value)
    elif kind == "numba_type":
        scope[name] = getattr(types, value)
    elif kind == "numpy_type":
        scope[name] = getattr(np, value)
    else:
        scope[name] = value
try:
    exec(compile(job["source"], "<your kernel>", "exec"), scope)
    argument_types = [numba.typeof(np.zeros(a["shape"], a["dtype"])) if a["kind"] == "array"
                      else getattr(types, a["type"]) for a in job["args"]]
    compile_ptx(scope[job["name"]], types.void(*argument_types), cc=tuple(job["cc"]))
    print(json.dumps({"ok": True}))
except Exception as error:
    print(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}))
"""


@dataclass(frozen=True)
class GpuCompile:
    """What the real compiler said: ``ok`` True (it compiled), False (it refused: ``message`` is
    its complaint) or None (it could not be asked: ``message`` says why)."""

    ok: bool | None
    message: str = ""


def _python_function(kernel: Any) -> Callable | None:
    """The Python function behind a ``@cuda.jit`` kernel (simulator: ``.fn``; GPU: ``.py_func``)."""
    return getattr(kernel, "fn", None) or getattr(kernel, "py_func", None)


def _source(function: Callable) -> str:
    """The function's ``def``, dedented, without its decorators."""
    lines = textwrap.dedent(inspect.getsource(function)).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def "))
    return "\n".join(lines[start:]) + "\n"


def _global_names(code: types.CodeType) -> set[str]:
    """The global names ``code`` loads (not its attribute names: ``k.shape`` does not use a global
    ``shape``, which a notebook may well have), in nested code objects too."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL"}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _portable_globals(function: Callable) -> tuple[list[tuple[str, str, Any]], list[str]]:
    """``(globals the compiling process can rebuild, names it cannot)``, for the global names the
    function's code uses."""
    import numba

    portable, foreign = [], []
    for name in sorted(_global_names(function.__code__)):
        if name not in function.__globals__:
            continue  # a builtin (range, max, abs)
        value = function.__globals__[name]
        if isinstance(value, types.ModuleType):
            portable.append((name, "module", value.__name__))
        elif isinstance(value, numba.core.types.Type) and getattr(numba.types, str(value),
                                                                  None) is value:
            portable.append((name, "numba_type", str(value)))
        elif isinstance(value, type) and getattr(np, value.__name__, None) is value:
            portable.append((name, "numpy_type", value.__name__))
        elif isinstance(value, (bool, int, float)) and not isinstance(value, np.generic):
            portable.append((name, "value", value))
        elif isinstance(value, np.generic):
            portable.append((name, "value", value.item()))
        else:
            foreign.append(name)
    return portable, foreign


def _argument(value: Any) -> dict[str, Any]:
    """One launch argument as the compiling process types it."""
    if isinstance(value, np.ndarray):
        return {"kind": "array", "shape": [1] * value.ndim, "dtype": value.dtype.str}
    if isinstance(value, (bool, np.bool_)):
        return {"kind": "scalar", "type": "boolean"}
    if isinstance(value, np.generic):
        return {"kind": "scalar", "type": value.dtype.name}
    return {"kind": "scalar", "type": "int64" if isinstance(value, int) else "float64"}


def compile_for_gpu(kernel: Any, arguments: dict[str, Any]) -> GpuCompile:
    """Compile ``kernel`` to PTX for a real GPU (``sm_90``), typed by these ``arguments`` (passed in
    this order). Only meaningful where the kernel ran in the simulator: on a GPU it has compiled."""
    function = _python_function(kernel)
    if function is None or function.__name__ == "<lambda>":
        return GpuCompile(None, "a kernel's body must be a def of its own to be compiled here")
    portable, foreign = _portable_globals(function)
    if foreign:
        return GpuCompile(None, f"it uses {', '.join(foreign)}, defined outside the kernel (only "
                                f"modules, Numba types and numbers are passed to the compiler)")
    job = {"source": _source(function), "name": function.__name__, "globals": portable,
           "args": [_argument(v) for v in arguments.values()], "cc": list(CC)}
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    try:
        done = subprocess.run([sys.executable, "-c", _COMPILER], input=json.dumps(job),
                              capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return GpuCompile(None, f"the compiler took over {TIMEOUT_S} s")
    try:
        verdict = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return GpuCompile(None, f"the compiler's process failed: {done.stderr[-300:]}")
    if verdict["ok"]:
        return GpuCompile(True)
    if verdict["error"].startswith("CudaSupportError"):
        # Numba asks the driver for the GPU's architecture when it must compile a device function
        # while typing (a NumPy function on an array does this); a machine without one cannot say
        return GpuCompile(None, "the compiler wanted a GPU driver to type part of the kernel "
                                "(a NumPy function called on a whole array does that, and a "
                                "kernel cannot make the new array it returns)")
    return GpuCompile(False, _short_error(verdict["error"]))


def _short_error(error: str) -> str:
    """The compiler's complaint without Numba's boilerplate: its lines up to the list of candidate
    implementations it tried, without memory addresses."""
    error = re.sub(r"<(?:built-in )?function ([\w.]+)(?: at 0x[0-9a-f]+)?>", r"\1", error)
    keep = []
    for line in error.splitlines():
        line = line.strip()
        if line.startswith(("There are", "During:", "File ")):
            break
        if line and not line.startswith(("^", "<source")):
            keep.append(line)
    return " ".join(keep)[:600]
