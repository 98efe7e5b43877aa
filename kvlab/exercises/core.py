"""The machinery every exercise shares: cases, the checker's verdict, and the solution swap.

An :class:`Exercise` is a function the learner writes (``signature``), the kvlab function its
answer must match (``reference``), and the inputs it is tried on (``cases``: hand-picked edge cases
first, then seeded random ones). ``check(fn)`` runs ``fn`` and the reference on every case and
prints a short verdict: ✓ with the number of cases, or the first failing case (its inputs, what was
expected, what came back, where they differ) and a hint. It returns True or False and never
raises, so a notebook still runs top to bottom while a stub is unfilled. A kernel puzzle's kernel
that passes every case in the simulator is then compiled for a real GPU
(:mod:`kvlab.exercises.gpu_compile`): the simulator runs any Python, a GPU only what a kernel
may do.

The solution swap: with the environment variable ``KVLAB_SOLUTIONS=1`` (the repo-root conftest.py
sets it, so ``make test`` runs every notebook that way) ``check`` checks the exercise's reference
solution in place of the learner's function. The notebooks on disk keep their stubs; the test run
still executes every checker, so a notebook cannot silently break.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import os
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kvlab.trace import (DivergentBarrierError, KernelTimeoutError, SharedMemoryRaceError,
                         WriteRaceError)

SOLUTIONS_ENV = "KVLAB_SOLUTIONS"


class WrongResult(TypeError):
    """Raised by an exercise's ``run`` when the learner's function returned something of the
    wrong kind (a float32 tensor where fp16 is asked for, a tuple, None): the verdict is its
    message, said as what is wrong with the result, not as an error the function raised."""


@dataclass(frozen=True)
class Case:
    """One set of arguments to try, by parameter name, with a label a learner can read."""

    label: str
    kwargs: dict[str, Any]
    random: bool = False  # a seeded random case (the verdict counts them apart)


def copy_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fresh copies of every array, so one call cannot change what the next one sees."""
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}


def torch_copies(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A torch exercise's arguments: every array as a CPU torch tensor of its own (a copy)."""
    import torch

    return {k: (torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v)
            for k, v in kwargs.items()}


def run_torch(fn: Callable, kwargs: dict[str, Any], dtype: str, what: str,
              shape: str = "") -> tuple[np.ndarray, dict[str, Any]]:
    """A torch exercise's learner side: ``fn`` on CPU tensor copies of ``kwargs``; returns its
    result as NumPy and the tensors it ran on (the pools it wrote, say). A result that is not a
    torch tensor of ``dtype`` ("float16", "float32") raises :class:`WrongResult`, whose message
    names ``what`` (and ``shape``, e.g. ``" [T, Hq, D]"``)."""
    args = torch_copies(kwargs)
    return tensor_result(fn(**args), dtype, what, shape), args


def tensor_result(got: Any, dtype: str, what: str, shape: str = "") -> np.ndarray:
    """``got`` as NumPy when it is a torch tensor of ``dtype`` ("float16", "int8", ...); else
    :class:`WrongResult`, whose message names ``what`` (and ``shape``)."""
    import torch

    if not isinstance(got, torch.Tensor):
        raise WrongResult(f"{what} should be a torch tensor ({dtype}{shape}), got "
                          f"{type(got).__name__}")
    if got.dtype != getattr(torch, dtype):
        raise WrongResult(f"{what} should be {dtype}, got {got.dtype}")
    return got.detach().cpu().numpy()


# A kernel puzzle with an fp16 result: bit-equal in the simulator, but on a GPU the compiler may
# contract a * c - b * s into one FMA (one rounding fewer), so an element may round to the
# neighbouring fp16 value: one fp16 ulp is at most 2**-10 of the value, hence rtol 1e-3 (and atol
# for results that cancel to about 0).
FP16_KERNEL_RTOL, FP16_KERNEL_ATOL = 1e-3, 1e-5

# What a torch exercise says when its fp16 result is off by rounding alone (see rounding_apart).
ROUNDING_NOTE = ("  Every difference is a few fp16 steps at most: the rounding, not the indices. "
                 "Do the arithmetic in float32 (every input widened: not fp16, bf16 or float64) "
                 "as a * c - b * s and b * c + a * s, and round to fp16 once, at the end, as the "
                 "reference does (a fused multiply-add such as torch.addcmul rounds once where "
                 "those round three times: write the two products apart).")


def call(fn: Callable, case: Case) -> Any:
    """The default way to run a case: call ``fn`` on copies of its arguments, return its result."""
    return fn(**copy_args(case.kwargs))


def read_only(*names: str) -> Callable[[Callable, Case], Any]:
    """A ``run`` like :func:`call` that also refuses a function which changed any of the
    arguments ``names`` in place (the checker hands it copies, so the answer would otherwise pass,
    and a caller that still needs its input would find it changed)."""
    def run(fn: Callable, case: Case) -> Any:
        args = copy_args(case.kwargs)
        before = {name: args[name].copy() for name in names}
        result = fn(**args)
        for name, was in before.items():
            if not np.array_equal(args[name], was, equal_nan=was.dtype.kind in "fc"):
                raise WrongResult(f"your function changed {name} in place: leave the inputs as "
                                  f"they were and return a new array")
        return result
    return run


def print_slot_walk(fn: Callable, case: Case, steps: list[str], expected: np.ndarray) -> None:
    """For a slot exercise's failure: one line per token — how its slot is found (``steps[i]``,
    e.g. ``"position 5 -> block_table[1] = 2, offset 1"``), the slot, and the learner's slot
    where it differs. Prints nothing when ``fn`` raises (the verdict already said so)."""
    try:
        got = np.asarray(call(fn, case))
    except Exception:
        return
    if got.shape != np.shape(expected) or got.dtype.kind not in "iuf" or not steps:
        return  # the verdict already said the shape or type is wrong, or no token to walk
    print("  token by token:")
    for row, (step, slot) in enumerate(zip(steps, expected)):
        yours = got[row] if row < got.size else "missing"
        mark = "" if row < got.size and yours == slot else f"   <- yours: {yours}"
        print(f"    {row}: {step} -> slot {slot}{mark}")


def launch_both(fn: Callable, solution: Callable, launch: Callable) -> list[tuple[Any, Any]]:
    """For a kernel puzzle's picture: ``launch(kernel) -> (result, AccessLog)`` run on the
    learner's kernel ``fn``, then on ``solution``. Returns the two ``(result, log)`` pairs; a
    kernel that raised gets result None and, as its log, the accesses it made before it did.
    Says why when a log is missing (no picture can be drawn then)."""
    runs = []
    for kernel in (fn, solution):
        try:
            runs.append(launch(kernel))
        except Exception as error:  # draw what the kernel did before it failed
            runs.append((None, getattr(error, "access_log", None)))
    if any(log is None for _, log in runs):
        from kvlab.backends import cuda_mode

        why = ("kernels run untraced on a real GPU" if cuda_mode() == "gpu" else
               "the kernel failed before the tracer saw an access")
        print(f"  (no access picture: {why})")
    return runs


def work_note(yours: Any, solution: Any, label: str) -> str:
    """What a right kernel's trace says about its speed on a GPU, against the solution's (two
    :class:`~kvlab.trace.AccessLog` of one case): the accesses to its array arguments in all
    (global memory: a kernel is judged by the bytes it moves; shared memory is watched for races
    only), and
    those of the busiest thread (the threads of a block run side by side, so a block takes as
    long as its busiest one). "" when neither is far above the solution's (1.5x in all, 2x for
    the busiest thread)."""
    def work(log) -> tuple[int, int]:
        per_thread = Counter((block, thread) for _, _, block, thread, _ in log.records)
        return len(log.records), max(per_thread.values(), default=0)

    (total, busiest), (solution_total, solution_busiest) = work(yours), work(solution)
    slower = []
    if total > 1.5 * solution_total:
        slower.append(f"it reads and writes its arrays {total} times where the solution does "
                      f"{solution_total}")
    if busiest > 2 * solution_busiest:
        slower.append(f"its busiest thread makes {busiest} reads and writes of the arrays where "
                      f"the solution's makes {solution_busiest}: a block takes as long as its "
                      f"busiest thread")
    if not slower:
        return ""
    return (f"\n  Right, but slower on a GPU than it needs to be (case '{label}'): "
            + "; ".join(slower) + ".")


def rounding_apart(yours: np.ndarray, expected: np.ndarray, steps: int = 4) -> bool:
    """Whether two fp16 results differ by rounding alone: every difference within ``steps`` fp16
    steps of its row's largest value (a row: the last axis; rounding a term of that size errs
    by about one step, and ``a * c - b * s`` rounds a few terms), NaN equal to NaN."""
    expected = np.asarray(expected)
    yours, want = np.asarray(yours, np.float32), expected.astype(np.float32)
    step = np.spacing(np.abs(expected).max(axis=-1, keepdims=True)).astype(np.float32)
    wrong = ~((yours == want) | (np.isnan(yours) & np.isnan(want)))
    return bool((np.abs(yours - want) <= steps * step)[wrong].all())


def draw_accesses(yours: np.ndarray, reference: np.ndarray, title: str) -> None:
    """Show two owner maps side by side (:func:`kvlab.plot.trace.plot_access_comparison`)."""
    import matplotlib.pyplot as plt

    from kvlab.plot.trace import plot_access_comparison

    plot_access_comparison(yours, reference, title)
    plt.show()


def compare(got: Any, expected: Any, rtol: float = 1e-5, atol: float = 1e-6,
            path: str = "result", names: tuple[str, ...] = (), exact_dtypes: bool = False
            ) -> str | None:
    """None when ``got`` matches ``expected``; else one sentence saying where they first differ.

    Tuples and lists compare item by item (named by ``names`` when given, e.g. ``("q_out",
    "k_pool")``, else ``result[i]``); arrays by shape, then value (exact for integers and
    booleans, which a float array does not match however equal its values, ``rtol``/``atol`` for
    floats, NaN equal to NaN; a float32 answer right to float32's precision against a float64
    reference whose tolerance is tighter than that is told so); anything else by ``==``. A None
    result is named as a missing return.
    ``exact_dtypes``: an array must also have the reference's dtype (where the dtype is the lesson:
    fp16 scales, a float32 result).
    """
    if got is None and expected is not None:
        return (f"{path} is None: does your function end without a `return`?" if path == "result"
                else f"{path} is None, expected {_short(expected)}")
    if isinstance(expected, (tuple, list)):
        kind = "tuple" if isinstance(expected, tuple) else "list"
        if (isinstance(got, np.ndarray) and got.ndim == 1
                and all(np.ndim(item) == 0 for item in expected)):
            got = tuple(got.tolist())  # an array of two numbers is as good a pair as a tuple
        if not isinstance(got, (tuple, list)):
            return f"{path} should be a {kind} of {len(expected)} items, got {_short(got)}"
        if len(got) != len(expected):
            return f"{path} has {len(got)} items, expected {len(expected)}: {_short(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            message = compare(g, e, rtol, atol, names[i] if i < len(names) else f"{path}[{i}]",
                              exact_dtypes=exact_dtypes)
            if message:
                return message
        return None
    if isinstance(expected, np.ndarray):
        try:
            got_array = np.asarray(got)
        except Exception:  # a learner's object numpy cannot read
            return f"{path} should be an array, got {type(got).__name__}"
        if got_array.shape != expected.shape:
            return f"{path} has shape {got_array.shape}, expected {expected.shape}"
        if exact_dtypes and got_array.dtype != expected.dtype:
            return f"{path} holds {got_array.dtype} values; expected {expected.dtype}"
        if expected.dtype.kind in "iub":
            # 3.0 == 3, but a slot or a code is an integer (an empty result has no value to judge)
            if got_array.dtype.kind not in "iub" and got_array.size:
                return (f"{path} holds {got_array.dtype} values; expected integers "
                        f"({expected.dtype})")
            same = got_array == expected
        else:
            same = np.isclose(got_array.astype(np.float64), expected.astype(np.float64),
                              rtol=rtol, atol=atol, equal_nan=True)
        if same.all():
            return None
        bad = np.argwhere(~same)
        where = tuple(int(i) for i in bad[0])
        return (f"{path}{list(where) if where else ''} is {got_array[where]!r}, expected "
                f"{expected[where]!r} ({len(bad)} of {expected.size} elements differ)"
                + _precision_note(got_array, expected))
    if isinstance(expected, float) or isinstance(got, float):
        try:
            ok = np.isclose(float(got), float(expected), rtol=rtol, atol=atol, equal_nan=True)
        except (TypeError, ValueError):
            ok = False
        return None if ok else f"{path} is {got!r}, expected {expected!r}"
    return None if got == expected else f"{path} is {got!r}, expected {expected!r}"


def _precision_note(got: np.ndarray, expected: np.ndarray) -> str:
    """A float32 answer to a float64 reference that is right to float32's precision says so: the
    numbers look equal when printed, and the fix is the dtype, not the formula."""
    if got.dtype != np.float32 or expected.dtype != np.float64:
        return ""
    if not np.allclose(got, expected, rtol=1e-6, atol=0, equal_nan=True):
        return ""
    return (". Your result is float32 and right to float32's precision (~1e-7 relative); the "
            "reference keeps float64's: compute in float64 (np.float64, torch.float64)")


WARP_LEVEL = re.compile(r"shfl|syncwarp|ballot|activemask|lanemask|match_|_sync$")


def _missing_cuda_name(name: str) -> str:
    """What to tell a kernel puzzle that used ``cuda.<name>``, which the simulator lacks: a
    warp-level operation runs only on a GPU; anything else is likely a typo of one it has."""
    if WARP_LEVEL.search(name):  # e.g. cuda.shfl_down_sync, cuda.syncwarp
        return (f"The CUDA simulator that runs these puzzles has no cuda.{name}: warp-level "
                f"operations (shuffles, syncwarp) run only on a GPU. Exchange values through a "
                f"cuda.shared.array and cuda.syncthreads() instead")
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    known = [n for n in dir(FakeCUDAModule) if not n.startswith("_")] + ["blockDim", "gridDim"]
    close = [f"cuda.{n}" for n in difflib.get_close_matches(name, known, n=2)]
    if close:
        return f"numba.cuda has no {name}: did you mean {' or '.join(close)}?"
    return f"numba.cuda has no {name} (in the simulator it has {', '.join(known)})"


def _short(value: Any, limit: int = 220, names: tuple[str, ...] = ()) -> str:
    """A one-line picture of an argument: small arrays in full, large ones by shape and dtype;
    a tuple's items named by ``names`` when given."""
    if isinstance(value, tuple):
        if names and len(names) == len(value):
            return ", ".join(f"{name} {_short(item, limit)}" for name, item in zip(names, value))
        return "(" + ", ".join(_short(item, limit) for item in value) + ")"
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return f"{_short(value.detach().cpu().numpy(), limit)} (torch, {value.device})"
    if isinstance(value, np.ndarray):
        if value.size <= 12:
            text = np.array2string(value, separator=", ", threshold=12).replace("\n", "")
            return f"{' '.join(text.split())} ({value.dtype})"
        return f"<{value.dtype} array, shape {value.shape}>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _kernel_stub_on_a_gpu(kernel: Any) -> bool:
    """Whether ``kernel`` is still its stub, where a stub cannot say so itself: a GPU compiles
    ``raise NotImplementedError`` in a kernel to a silent exit (Numba checks a kernel's exceptions
    only with ``debug=True``), so there the source is read. The simulator raises it as Python."""
    from kvlab.backends import cuda_mode

    if cuda_mode() != "gpu":
        return False
    function = getattr(kernel, "py_func", None)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):  # no source to read (a kernel built by exec, say)
        return False
    body = next((node.body for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)), [])
    return any(isinstance(statement, ast.Raise) and "NotImplementedError" in ast.unparse(statement)
               for statement in body)  # a statement of the body, not a comment or a branch


@dataclass(frozen=True)
class Exercise:
    """One exercise: what the learner writes, what it must match, and what it is tried on.

    name: ``"NN.what"``, e.g. ``"01.slot_mapping"`` (NN is the notebook's number).
    notebook, section: where it lives, e.g. ``"01_paging"``, ``"2.2 From a position to a slot"``.
    signature: the function the learner implements, as they would write its ``def`` line.
    hint: one line that points at the idea without giving the code.
    solution: the reference solution, written as a learner would (``solution(name)`` shows it).
    reference: the kvlab function the answer must match (often the same as ``solution``'s result,
        but computed by the package, e.g. ``kvlab.ref.paging.slot_mapping``).
    cases: makes the cases, hand-picked first, then seeded random ones.
    run: how one case is run with a function (default :func:`call`); kernels launch here.
    explain: optional ``(fn, case) -> None`` shown with a failure (e.g. a picture of the accesses).
    kernel: True for a kernel puzzle: the learner writes a ``@cuda.jit`` kernel, not a function.
    trace: for a kernel puzzle, ``(kernel, case) -> (result, AccessLog)``: the traced launch, by
        which a passing kernel's work is compared with the solution's (:func:`work_note`).
    outputs: names of what ``run`` returns when it is a tuple (e.g. ``q_out`` and the pools the
        function wrote), so a verdict says ``k_pool[...]``, not ``result[1][...]``.
    exact_dtypes: the result's arrays must have the reference's dtypes, not only its values.
    pass_note: optional ``fn -> str`` added to a pass of the learner's function: what it does
        right but could do better (a torch answer that reads back to the host, say).
    """

    name: str
    notebook: str
    section: str
    signature: str
    hint: str
    solution: Callable
    reference: Callable
    cases: Callable[[], list[Case]]
    run: Callable[[Callable, Case], Any] = call
    rtol: float = 1e-5
    atol: float = 1e-6
    explain: Callable[[Callable, Case], None] | None = field(default=None, repr=False)
    kernel: bool = False
    trace: Callable[[Callable, Case], tuple[Any, Any]] | None = field(default=None, repr=False)
    outputs: tuple[str, ...] = ()
    exact_dtypes: bool = False
    pass_note: Callable[[Callable], str] | None = field(default=None, repr=False)

    def check(self, fn: Callable, *, quiet: bool = False) -> bool:
        """Try ``fn`` on every case; print ✓ or the first failing case; return whether it passed."""
        say = (lambda *a: None) if quiet else print
        swapped = os.environ.get(SOLUTIONS_ENV) == "1"
        if swapped:
            fn = self.solution
        if self.kernel and not hasattr(fn, "__getitem__"):
            say(f"✗ {self.name}: expected a @cuda.jit kernel, got {_short(fn)} "
                f"(put @cuda.jit above its def)")
            return False
        if not callable(fn) and not self.kernel:
            say(f"✗ {self.name}: expected a function {self.signature}, got {_short(fn)}")
            return False
        if self.kernel and _kernel_stub_on_a_gpu(fn):
            say(f"✗ {self.name}: not implemented yet.\n  Hint: {self.hint}")
            return False
        cases = self.cases()
        for case in cases:
            expected = self.run(self.reference, case)
            try:
                got = self.run(fn, case)
            except NotImplementedError:
                say(f"✗ {self.name}: not implemented yet.\n  Hint: {self.hint}")
                return False
            except WrongResult as error:  # ran, but returned what cannot be compared
                return self._fail(say, fn, case, str(error))
            except Exception as error:  # the learner's bug: report it as a failing case
                # no picture of a kernel the time limit stopped: drawing it runs it again
                return self._fail(say, fn, case, self._raised(fn, case, error),
                                  draw=not isinstance(error, KernelTimeoutError))
            message = compare(got, expected, self.rtol, self.atol, names=self.outputs,
                              exact_dtypes=self.exact_dtypes)
            if message:
                return self._fail(say, fn, case, message, expected, got)
        hand = sum(not c.random for c in cases)
        note = " (reference solution swapped in: KVLAB_SOLUTIONS=1)" if swapped else ""
        compiled = self._compile_for_gpu(fn, cases[0])
        if compiled is not None and compiled.ok is False:
            returns = ("\n  (A kernel returns nothing: it writes its results into arrays. Drop "
                       "the return value.)" if "return_value" in compiled.message else "")
            say(f"✗ {self.name}: your kernel passes all {len(cases)} cases in the simulator, but "
                f"a GPU's compiler refuses it (the simulator runs any Python; a kernel may use "
                f"numbers, array elements, cuda.* and math functions, device functions, and "
                f"local or shared arrays of a constant size):\n  {compiled.message}{returns}")
            return False
        if compiled is not None:
            note += (f" and it compiles for a GPU (PTX and ptxas for sm_90: {compiled.registers} "
                     f"registers a thread)" if compiled.ok else
                     f"; not compiled for a GPU: {compiled.message}")
        say(f"✓ {self.name}: all {len(cases)} cases pass ({hand} hand-picked, "
            f"{len(cases) - hand} random){note}" + self._work_note(fn, cases[0])
            + ("" if self.pass_note is None or fn is self.solution else self.pass_note(fn)))
        return True

    def _work_note(self, fn: Callable, case: Case) -> str:
        """For a passing kernel puzzle traced in the simulator: :func:`work_note` on the first
        case against the solution ("" when there is nothing to say or nothing to trace)."""
        if self.trace is None or fn is self.solution:
            return ""
        try:
            logs = [self.trace(kernel, case)[1] for kernel in (fn, self.solution)]
        except Exception:  # a help, like the explanations: it must not break check()
            return ""
        return "" if None in logs else work_note(logs[0], logs[1], case.label)

    def _compile_for_gpu(self, fn: Callable, case: Case) -> Any:
        """For a kernel puzzle run in the simulator, what a GPU's compiler makes of the kernel
        (:mod:`kvlab.exercises.gpu_compile`); None otherwise (on a GPU it compiled to run)."""
        from kvlab.backends import cuda_mode

        if not self.kernel or cuda_mode() == "gpu":
            return None
        from kvlab.exercises.gpu_compile import GpuCompile, compile_for_gpu

        try:
            return compile_for_gpu(fn, case.kwargs)
        except Exception as error:  # a help, like the explanations: it must not break check()
            return GpuCompile(None, f"{type(error).__name__}: {error}")

    def _fail(self, say, fn, case: Case, message: str, expected: Any = None,
              got: Any = None, draw: bool = True) -> bool:
        lines = [f"✗ {self.name}: fails on case '{case.label}'"]
        lines += [f"  {name} = {_short(value)}" for name, value in case.kwargs.items()]
        if expected is not None:
            lines += [f"  expected: {_short(expected, names=self.outputs)}",
                      f"  got:      {_short(got, names=self.outputs)}"]
        lines += [f"  {message}"] + self._parameter_note(fn) + [f"  Hint: {self.hint}"]
        say("\n".join(lines))
        if self.explain is not None and draw and say is print:
            try:
                self.explain(fn, case)
            except Exception as error:  # the explanation is a help: it must not break check()
                say(f"  (no picture of this case: {type(error).__name__}: {error})")
        return False

    def _raised(self, fn: Callable, case: Case, error: Exception) -> str:
        """What to say of an exception from a case: the tracer's refusals as refusals, a
        function that cannot take the case's arguments by name as that."""
        if isinstance(error, KernelTimeoutError):
            return f"the tracer stopped your kernel: {error}"
        if isinstance(error, (DivergentBarrierError, WriteRaceError, SharedMemoryRaceError)):
            return f"the tracer refuses your kernel ({type(error).__name__}): {error}"
        what = "kernel" if self.kernel else "function"
        message = f"your {what} raised {type(error).__name__}: {error}"
        missing = re.search(r"'FakeCUDAModule' object has no attribute '(\w+)'", str(error))
        if self.kernel and missing:
            return f"{message}. {_missing_cuda_name(missing.group(1))}"
        if not self.kernel and isinstance(error, TypeError):
            try:
                inspect.signature(fn).bind(**case.kwargs)
            except TypeError:  # its parameters are not the stub's
                return (f"{message}; the checker passes the arguments by name, so keep the "
                        f"stub's: {self.signature.split(' ->')[0]}")
            except ValueError:  # no signature to read
                pass
        return message

    def _parameter_note(self, fn: Callable) -> list[str]:
        """For a kernel puzzle whose kernel names its parameters otherwise than the signature:
        a line saying so (a launch passes its arguments by position, so the order matters)."""
        wanted = re.search(r"def \w+\(([^)]*)\)", self.signature)
        function = getattr(fn, "py_func", None) or getattr(fn, "fn", None)
        if not self.kernel or wanted is None or function is None:
            return []
        try:
            yours = list(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            return []
        expected = [name.strip() for name in wanted.group(1).split(",")]
        if yours == expected:
            return []
        return [f"  Your kernel's parameters are ({', '.join(yours)}); the launch passes "
                f"({', '.join(expected)}), in that order, by position."]

    def show_solution(self) -> Callable:
        """Print the reference solution's source and return the function."""
        # A Numba kernel keeps its Python function as .py_func (GPU) or .fn (simulator).
        source = getattr(self.solution, "py_func", None) or getattr(self.solution, "fn", None)
        print(inspect.getsource(source or self.solution))
        return self.solution


EXERCISES: dict[str, Exercise] = {}


def register(exercise: Exercise) -> Exercise:
    """Add an exercise to :data:`EXERCISES` (each name once)."""
    if exercise.name in EXERCISES:
        raise ValueError(f"exercise {exercise.name!r} is registered twice")
    EXERCISES[exercise.name] = exercise
    return exercise


def get(name: str) -> Exercise:
    """The exercise called ``name``; a KeyError lists the names there are."""
    try:
        return EXERCISES[name]
    except KeyError:
        raise KeyError(f"no exercise {name!r}; there are: {', '.join(sorted(EXERCISES))}") from None


def kind(exercise: Exercise) -> str:
    """What the learner writes: ``"CUDA kernel"``, ``"torch ops"`` or ``"Python"`` (NumPy)."""
    if exercise.kernel:
        return "CUDA kernel"
    return "torch ops" if exercise.name.endswith("_torch") else "Python"


def overview() -> str:
    """Every exercise as a Markdown table, in course order: where it is, what the learner writes
    and in what (docs/exercises.md holds this table; a test keeps the two equal)."""
    lines = ["| exercise | notebook, section | you write | in |", "|---|---|---|---|"]
    registered = list(EXERCISES)  # each module registers its notebook's exercises in its order
    for name in sorted(EXERCISES, key=lambda n: (n[:2], registered.index(n))):
        exercise = EXERCISES[name]
        what = exercise.signature.replace("@cuda.jit\ndef ", "").split("  #")[0].strip()
        what = what.removesuffix(": ...").replace("|", "\\|")
        lines.append(f"| `{name}` | {exercise.notebook} §{exercise.section.split()[0]} "
                     f"{' '.join(exercise.section.split()[1:])} | `{what}` | {kind(exercise)} |")
    return "\n".join(lines) + "\n"


def check(name: str, fn: Callable) -> None:
    """Print exercise ``name``'s verdict on ``fn``: the call a notebook's checker cell makes.

    It returns nothing, so the cell shows the verdict alone; ``EXERCISES[name].check(fn)``
    returns it as a bool.
    """
    get(name).check(fn)


def solution(name: str) -> Callable:
    """Print exercise ``name``'s reference solution and return it (for a learner who is stuck)."""
    return get(name).show_solution()
