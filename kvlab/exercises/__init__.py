"""Exercises the learner writes, each with a checker that says what is wrong and a solution.

In a notebook an exercise is two cells: a stub the learner fills (``raise NotImplementedError``
with a one-line hint), then ``check("01.slot_mapping", slot_mapping)``, which tries the learner's
function on hand-picked and seeded random cases against kvlab's reference and prints ✓ or the first
failing case. ``solution("01.slot_mapping")`` prints the reference solution for a learner who is
stuck. :data:`EXERCISES` maps each name to its :class:`Exercise` (``.notebook``, ``.section``,
``.solution``, ``.check(fn)``).

One module per notebook (``paging`` for 01, ``quant`` for 02, …) defines and registers that
notebook's exercises; every module of this package is imported here, so adding a module is all
it takes to add exercises. How ``make test`` swaps the solutions in: :mod:`kvlab.exercises.core`;
how a kernel puzzle's kernel is compiled for a real GPU: :mod:`kvlab.exercises.gpu_compile`.
"""
import importlib
import pkgutil

from kvlab.exercises.core import (
    EXERCISES, SOLUTIONS_ENV, Case, Exercise, check, compare, get, overview, register, solution,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "core":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["EXERCISES", "SOLUTIONS_ENV", "Case", "Exercise", "check", "compare", "get", "overview",
           "register", "solution"]
