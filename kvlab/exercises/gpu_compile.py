"""Does a learner's kernel compile for a real GPU? The question the simulator cannot answer.

Numba's CUDA simulator runs a kernel's Python as Python, so a kernel that passes every case there
may still be something no GPU compiler takes: a Python list, a NumPy call, a shared array sized at
run time (its size must be a compile-time constant). So once a kernel puzzle's cases pass in the
simulator, its checker hands the kernel's source to Numba's real compiler (NVVM, to PTX for
``sm_90``), which needs no GPU but does need a process of its own: ``numba.cuda.compile_ptx`` does
not exist where the simulator was imported (``kvlab.kernels.cuda.ptx`` works the same way).

What travels to that process: the kernel's source (its decorators dropped), the global and
closure names it uses that can be rebuilt there (modules such as ``np``, ``math`` and ``cuda``, a
module's functions such as ``exp`` from ``math``, Numba types such as ``float32``, NumPy scalar
types, numbers such as ``THREADS``, and the learner's own ``@cuda.jit`` functions, with or
without ``device=True``, by their source), and the types of the case's arguments. The PTX then
goes through ptxas (:func:`kvlab.kernels.cuda.ptx.ptxas_resources`), which refuses what PTX
still allows: more static shared memory than a block may have, say. A kernel that uses anything
else is not compiled, and :func:`compile_for_gpu` says why; so is one whose compile fails for a
reason that is not the compiler's verdict on the kernel (no source to read, no NVVM library).
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

# Runs in the compiling process: rebuild the globals, define the functions, type the arguments,
# compile to PTX, run ptxas. It prints one JSON line: ok true / false (the compiler's verdict on
# the kernel) / null (something else failed: not a verdict).
_COMPILER = r"""
import importlib, json, sys
from types import SimpleNamespace
import numpy as np
import numba
import numba.cuda.dispatcher
from numba import cuda, types
from numba.core.errors import NumbaError
from numba.cuda import compile_ptx
from numba.cuda.cudadrv.error import NvvmSupportError

job = json.load(sys.stdin)
cc = tuple(job["cc"])
# Typing some calls makes Numba compile a device function for "the current device"; with no GPU
# that would ask the driver, so the device is the architecture compiled for.
numba.cuda.dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)

def say(ok, **more):
    print(json.dumps({"ok": ok, **more}))
    sys.exit(0)

scope = {}
try:
    for name, kind, value in job["globals"]:
        if kind == "module":
            scope[name] = importlib.import_module(value)
        elif kind == "attribute":
            scope[name] = getattr(importlib.import_module(value[0]), value[1])
        elif kind == "numba_type":
            scope[name] = getattr(types, value)
        elif kind == "device":  # [the name its def gives it, its source]
            exec(compile("from __future__ import annotations\n" + value[1], "<your " + name + ">",
                         "exec"), scope)
            scope[name] = cuda.jit(device=True)(scope[value[0]])
        else:
            scope[name] = value
    exec(compile("from __future__ import annotations\n" + job["source"], "<your kernel>", "exec"),
         scope)
    argument_types = [numba.typeof(np.zeros(a["shape"], a["dtype"])) if a["kind"] == "array"
                      else getattr(types, a["type"]) for a in job["args"]]
    argument_types += [types.Omitted(d) for d in job["defaults"]]
except Exception as error:
    say(None, error=f"{type(error).__name__}: {error}")
try:
    ptx, _ = compile_ptx(scope[job["name"]], types.void(*argument_types), cc=cc)
except NvvmSupportError as error:
    say(None, error=f"{type(error).__name__}: {error}")
except NumbaError as error:
    say(False, error=f"{type(error).__name__}: {error}")
except Exception as error:
    say(None, error=f"{type(error).__name__}: {error}")
try:
    from kvlab.kernels.cuda.ptx import ptxas_resources
    registers = ptxas_resources(ptx, cc)["registers"]
except RuntimeError as error:  # ptxas's refusal
    say(False, error=f"ptxas: {error}")
except Exception as error:
    say(None, error=f"{type(error).__name__}: {error}")
say(True, registers=registers)
"""


@dataclass(frozen=True)
class GpuCompile:
    """What the real compiler said: ``ok`` True (it compiled, and ptxas allocated ``registers``
    per thread), False (it refused: ``message`` is its complaint) or None (it could not be
    asked: ``message`` says why)."""

    ok: bool | None
    message: str = ""
    registers: int = 0


def _python_function(kernel: Any) -> Callable | None:
    """The Python function behind a ``@cuda.jit`` kernel (simulator: ``.fn``; GPU: ``.py_func``)."""
    return getattr(kernel, "fn", None) or getattr(kernel, "py_func", None)


def _source(function: Callable) -> str:
    """The function's ``def``, dedented, without its decorators (OSError: no source to read)."""
    lines = textwrap.dedent(inspect.getsource(function)).splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("def ")), None)
    if start is None:
        raise OSError("its source has no def line")
    return "\n".join(lines[start:]) + "\n"


def _global_names(code: types.CodeType) -> set[str]:
    """The global names ``code`` loads (not its attribute names: ``k.shape`` does not use a global
    ``shape``, which a notebook may well have), in nested code objects too."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL"}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _names_used(function: Callable) -> dict[str, Any]:
    """The globals and closure variables ``function`` reads, by name (builtins left out)."""
    used = {name: function.__globals__[name] for name in _global_names(function.__code__)
            if name in function.__globals__}
    cells = function.__closure__ or ()
    for name, cell in zip(function.__code__.co_freevars, cells):
        try:
            used[name] = cell.cell_contents
        except ValueError:  # a cell not yet filled
            pass
    return used


def _portable(name: str, value: Any, sent: set[int]) -> list[tuple[str, str, Any]] | None:
    """How the compiling process rebuilds ``value`` (a device function: its own names first),
    or None when it cannot."""
    import numba

    if isinstance(value, types.ModuleType):
        return [(name, "module", value.__name__)]
    if isinstance(value, numba.core.types.Type) and getattr(numba.types, str(value), None) is value:
        return [(name, "numba_type", str(value))]
    if isinstance(value, (bool, int, float)):
        return [(name, "value", value)]
    if isinstance(value, np.generic):
        return [(name, "value", value.item())]
    # a @cuda.jit function the kernel calls, device=True or not: a GPU compiles the call as a
    # device function either way (the simulator's kernels carry _device, True or False)
    if isinstance(getattr(value, "_device", None), bool) and _python_function(value) is not None:
        function = _python_function(value)
        if id(function) in sent:
            return []
        sent.add(id(function))
        needs = _portable_names(function, sent)
        if needs is None:
            return None
        return needs + [(name, "device", [function.__name__, _source(function)])]
    module = getattr(value, "__module__", None)
    attribute = getattr(value, "__name__", None)
    if isinstance(value, types.FunctionType):
        raise _PlainFunction(name)  # a kernel calls device functions only
    if (module and attribute and not module.startswith("__")
            and getattr(sys.modules.get(module), attribute, None) is value):
        return [(name, "attribute", [module, attribute])]  # math.exp, np.float32, np.exp
    return None


def _portable_names(function: Callable, sent: set[int]) -> list[tuple[str, str, Any]] | None:
    """Everything ``function`` reads, as the compiling process rebuilds it; None when something
    cannot be (its name is then in the exception's message)."""
    out = []
    for name, value in sorted(_names_used(function).items()):
        rebuilt = _portable(name, value, sent)
        if rebuilt is None:
            raise _CannotSend(name)
        out += rebuilt
    return out


class _CannotSend(Exception):
    """A name the kernel reads that the compiling process cannot rebuild."""


class _PlainFunction(Exception):
    """A plain Python function the kernel calls: no GPU kernel can."""


def _argument(value: Any) -> dict[str, Any]:
    """One launch argument as the compiling process types it."""
    if isinstance(value, np.ndarray):
        return {"kind": "array", "shape": [1] * value.ndim, "dtype": value.dtype.str}
    if isinstance(value, (bool, np.bool_)):
        return {"kind": "scalar", "type": "boolean"}
    if isinstance(value, np.generic):
        return {"kind": "scalar", "type": value.dtype.name}
    return {"kind": "scalar", "type": "int64" if isinstance(value, int) else "float64"}


_VERDICTS: dict[str, GpuCompile] = {}  # by job: the same kernel on the same types, asked once


def compile_for_gpu(kernel: Any, arguments: dict[str, Any]) -> GpuCompile:
    """Compile ``kernel`` to PTX for a real GPU (``sm_90``) and through ptxas, typed by these
    ``arguments`` (passed in this order; parameters past them take their defaults). Only
    meaningful where the kernel ran in the simulator: on a GPU it has compiled to run."""
    function = _python_function(kernel)
    if function is None or function.__name__ == "<lambda>":
        return GpuCompile(None, "a kernel's body must be a def of its own to be compiled here")
    try:
        names = _portable_names(function, {id(function)})
        source = _source(function)
    except _PlainFunction as error:
        return GpuCompile(False, f"it calls {error}, a plain Python function: a kernel can call "
                                 f"@cuda.jit functions (and cuda's and math's), not "
                                 f"Python ones")
    except _CannotSend as error:
        return GpuCompile(None, f"it uses {error}, which cannot be passed to the compiler (only "
                                f"modules and their functions, Numba types, numbers and "
                                f"@cuda.jit functions can)")
    except (OSError, TypeError) as error:
        return GpuCompile(None, f"its source could not be read ({error}): a kernel typed at a "
                                f"plain Python prompt or built by exec has none")
    # the parameters past the launch's arguments take the last of the defaults
    unfilled = function.__code__.co_argcount - len(arguments)
    defaults = list(function.__defaults__ or ())[-unfilled:] if unfilled > 0 else []
    if any(not isinstance(d, (bool, int, float)) for d in defaults):
        return GpuCompile(None, "a parameter past the launch's arguments has a default that is "
                                "not a number")
    job = json.dumps({"source": source, "name": function.__name__, "globals": names,
                      "args": [_argument(v) for v in arguments.values()],
                      "defaults": defaults,
                      "cc": list(CC)})
    if job not in _VERDICTS:
        _VERDICTS[job] = _ask_the_compiler(job)
    return _VERDICTS[job]


def _ask_the_compiler(job: str) -> GpuCompile:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    try:
        done = subprocess.run([sys.executable, "-c", _COMPILER], input=job, capture_output=True,
                              text=True, env=env, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return GpuCompile(None, f"the compiler took over {TIMEOUT_S} s")
    try:
        verdict = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return GpuCompile(None, f"the compiler's process failed: {done.stderr[-300:]}")
    if verdict["ok"] is None:
        return GpuCompile(None, f"the compile could not run: {_short_error(verdict['error'])}")
    if verdict["ok"]:
        return GpuCompile(True, registers=verdict["registers"])
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
