"""The exercise registry and its checkers (kvlab.exercises): every solution passes its own
checker, every stub and every recorded wrong answer fails with a message naming the failing case.

The wrong answers live beside each stage's exercises in ``tests/test_exercises_<stage>.py`` as
``WRONG_ANSWERS = {name: [function, ...]}``; this module gathers them, so each stage's file is
owned by one notebook and the rules are written once.
"""
import importlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kvlab.exercises import EXERCISES, SOLUTIONS_ENV, Exercise, check, compare, get, solution

ROOT = Path(__file__).resolve().parents[1]
STAGE_TEST_MODULES = sorted(p.stem for p in Path(__file__).parent.glob("test_exercises_*.py"))


def _wrong_answers() -> list[tuple[str, object]]:
    pairs = []
    for module in STAGE_TEST_MODULES:
        for name, wrongs in importlib.import_module(module).WRONG_ANSWERS.items():
            pairs += [(name, fn) for fn in wrongs]
    return pairs


WRONG = _wrong_answers()


@pytest.fixture(autouse=True)
def _learner_view(monkeypatch):
    """Check the function given, not the swapped-in solution (conftest sets the swap for nbval);
    close the figures a failing kernel's explanation draws (matplotlib warns past 20 open)."""
    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_one_exercise_in_the_tour_then_two_to_five_per_notebook():
    per_notebook = Counter(ex.notebook for ex in EXERCISES.values())
    assert len(EXERCISES) >= 15, sorted(EXERCISES)
    for number in ("00", "01", "02", "03", "04", "05", "06", "07"):
        count = sum(n for nb, n in per_notebook.items() if nb.startswith(number))
        low, high = (1, 1) if number == "00" else (2, 5)
        assert low <= count <= high, f"notebook {number} has {count} exercises"


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_names_and_notebooks_agree(name):
    exercise = EXERCISES[name]
    assert re.fullmatch(r"\d\d\.\w+", name)
    assert exercise.notebook.startswith(name[:2])
    assert (ROOT / "notebooks" / f"{exercise.notebook}.ipynb").exists()


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_the_solution_passes(name, capsys):
    assert EXERCISES[name].check(EXERCISES[name].solution) is True
    assert capsys.readouterr().out.startswith(f"✓ {name}")


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_a_stub_fails_saying_not_implemented(name, capsys):
    def function_stub(*args, **kwargs):
        raise NotImplementedError

    def kernel_stub(*args):
        raise NotImplementedError

    if EXERCISES[name].kernel:
        from numba import cuda

        stub = cuda.jit(kernel_stub)
    else:
        stub = function_stub
    assert EXERCISES[name].check(stub) is False
    out = capsys.readouterr().out
    assert out.startswith(f"✗ {name}: not implemented yet") and "Hint:" in out


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_every_exercise_has_a_recorded_wrong_answer(name):
    assert any(n == name for n, _ in WRONG), f"no wrong answer recorded for {name}"


# Some wrong answers overflow on purpose (e.g. a softmax without its max subtracted).
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name, wrong", WRONG, ids=[f"{n}-{getattr(f, '__name__', 'kernel')}"
                                                    for n, f in WRONG])
def test_a_wrong_answer_fails_naming_its_case(name, wrong, capsys):
    assert get(name).check(wrong) is False
    out = capsys.readouterr().out
    assert re.search(rf"✗ {re.escape(name)}: fails on case '[^']+'", out), out
    assert "Hint:" in out


def test_the_swap_checks_the_solution_in_place_of_the_stub(monkeypatch, capsys):
    monkeypatch.setenv(SOLUTIONS_ENV, "1")
    name = sorted(EXERCISES)[0]
    assert EXERCISES[name].check(lambda *a, **k: None) is True
    assert "reference solution swapped in" in capsys.readouterr().out


def test_a_learner_exception_is_reported_not_raised(capsys):
    name = "01.slot_mapping"
    assert check(name, lambda block_table, positions, block_size: 1 / 0) is None
    assert "your function raised ZeroDivisionError" in capsys.readouterr().out


def test_renamed_parameters_are_told_apart_from_a_keyword_slip_inside(capsys):
    """The arguments go in by name: a renamed parameter is told to keep the stub's names; a
    wrong keyword inside the function (np.max(..., dim=1)) is not blamed on the parameters."""
    check("01.slot_mapping", lambda table, positions, block_size: positions)
    assert "so keep the stub's: slot_mapping(block_table, positions, block_size)" in \
        capsys.readouterr().out
    check("01.slot_mapping", lambda block_table, positions, block_size:
          np.zeros((2, 3)).max(dim=1))
    out = capsys.readouterr().out
    assert "unexpected keyword argument 'dim'" in out and "keep the stub's" not in out


def test_a_kernel_puzzle_asks_for_a_kernel(capsys):
    kernels = [ex for ex in EXERCISES.values() if ex.kernel]
    assert kernels, "no kernel puzzle registered"
    assert kernels[0].check(lambda *args: None) is False
    assert "expected a @cuda.jit kernel" in capsys.readouterr().out


def test_solution_prints_the_source_and_returns_the_function(capsys):
    fn = solution("01.slot_mapping")
    assert fn is EXERCISES["01.slot_mapping"].solution
    assert "def slot_mapping_solution" in capsys.readouterr().out


def test_unknown_names_list_the_real_ones():
    with pytest.raises(KeyError, match="01.slot_mapping"):
        get("01.no_such_exercise")


def test_compare_names_the_first_difference():
    assert compare(np.array([1, 2, 3]), np.array([1, 2, 3])) is None
    assert "shape (2,)" in compare(np.array([1, 2]), np.array([1, 2, 3]))
    assert "result[1] is" in compare(np.array([1, 5, 3]), np.array([1, 2, 3]))
    assert "1 of 3 elements differ" in compare(np.array([1, 5, 3]), np.array([1, 2, 3]))
    assert compare(np.array([np.nan, 1.0]), np.array([np.nan, 1.0 + 1e-9])) is None
    assert "result[1]" in compare((np.zeros(2), np.ones(2)), (np.zeros(2), np.zeros(2)))
    assert compare(3, 4) == "result is 3, expected 4"


def test_compare_tells_a_missing_return_a_float_for_an_integer_and_float32_precision():
    assert "without a `return`" in compare(None, np.array([1, 2]))
    assert "without a `return`" in compare(None, (np.zeros(2), np.zeros(2)))
    assert compare((np.zeros(1), None), (np.zeros(1), np.ones(1)), names=("codes", "scales")) == (
        "scales is None, expected [1.] (float64)")  # an item, not the function, came back None
    assert compare(np.array([]), np.zeros(0, np.int32)) is None  # np.array of an empty list
    # equal values, but a slot or a code is an integer
    message = compare(np.array([1.0, 2.0]), np.array([1, 2], np.int32))
    assert message == "result holds float64 values; expected integers (int32)"
    # right to float32's precision against a float64 reference: the dtype is named
    want = np.array([0.8146172338565447, 1.0])
    message = compare(want.astype(np.float32), want, rtol=1e-9, atol=0)
    assert "result[0]" in message and "compute in float64" in message
    # a float32 answer that is wrong, not merely rounded, gets no such note
    assert "compute in" not in compare(np.array([0.81, 1.0], np.float32), want, rtol=1e-9, atol=0)


def test_compare_lists_exact_dtypes_and_an_array_as_a_pair():
    assert compare([1, 2], [1, 2, 3]) == "result has 2 items, expected 3: [1, 2]"
    assert compare(5, [1, 2]) == "result should be a list of 2 items, got 5"
    assert compare(np.array([0.5, 2.0]), (0.5, 2.0)) is None  # two numbers, as an array
    scales = np.array([0.02], np.float16)
    assert compare(scales.astype(np.float32), scales, rtol=1, atol=1) is None
    assert compare(scales.astype(np.float32), scales, exact_dtypes=True) == (
        "result holds float32 values; expected float16")


def test_read_only_refuses_an_input_changed_in_place():
    from kvlab.exercises.core import Case, WrongResult, read_only

    def rotate_in_place(x):
        x *= -1
        return x

    run = read_only("x")
    case = Case("a case", dict(x=np.ones(3, np.float32)))
    with pytest.raises(WrongResult, match="changed x in place"):
        run(rotate_in_place, case)
    assert run(lambda x: -x, case).tolist() == [-1, -1, -1]
    assert case.kwargs["x"].tolist() == [1, 1, 1]  # the checker's own copy is untouched


def test_a_torch_result_is_shown_as_its_values_on_one_line():
    import torch

    from kvlab.exercises.core import _short

    assert _short(torch.tensor([1.5, 2.0])) == "[1.5, 2. ] (float32) (torch, cpu)"


def test_a_missing_cuda_name_is_matched_against_the_simulator_s_names():
    from kvlab.exercises.core import _missing_cuda_name

    assert "did you mean cuda.blockDim or" in _missing_cuda_name("blockdim")
    assert "warp-level" in _missing_cuda_name("shfl_xor_sync")


def test_a_registered_name_cannot_be_registered_twice():
    from kvlab.exercises.core import register

    existing = EXERCISES["01.slot_mapping"]
    with pytest.raises(ValueError, match="registered twice"):
        register(Exercise(**{**existing.__dict__}))


def test_a_slot_exercise_walks_the_failing_case_token_by_token(capsys):
    assert check("01.slot_mapping", lambda block_table, positions, block_size: positions) is None
    assert "0: position 0 -> block_table[0] = 7, offset 0 -> slot 28   <- yours: 0" in \
        capsys.readouterr().out
    assert check("06.step_slots", lambda **kwargs: 1 / 0) is None
    out = capsys.readouterr().out
    assert "your function raised ZeroDivisionError" in out and "token by token" not in out


def test_an_odd_result_gets_no_walk_and_check_never_raises(capsys):
    for odd in (lambda **k: [np.arange(2), None], lambda **k: np.array([[28]]),
                lambda **k: [28, 99], lambda **k: "28"):
        assert check("01.slot_mapping", odd) is None
        assert "token by token" not in capsys.readouterr().out


def test_a_kernel_stub_on_a_gpu_still_says_not_implemented(monkeypatch, capsys):
    """A GPU runs `raise NotImplementedError` in a kernel as a silent exit: the checker reads the
    stub's source there instead of calling it (the cases would only say 'fails on case')."""
    from types import SimpleNamespace

    import kvlab.backends

    def kernel_stub(k, v, k_pool, v_pool, slots):
        raise NotImplementedError("hint: ...")

    monkeypatch.setattr(kvlab.backends, "cuda_mode", lambda: "gpu")
    as_compiled = SimpleNamespace(py_func=kernel_stub, __getitem__=None)  # what cuda.jit returns
    assert get("01.write_kv_kernel").check(as_compiled) is False
    assert capsys.readouterr().out.startswith("✗ 01.write_kv_kernel: not implemented yet")


def test_launch_both_keeps_what_a_failing_kernel_did_and_says_when_there_is_no_picture(capsys):
    from kvlab.exercises.core import launch_both
    from kvlab.trace import AccessLog

    recorded = AccessLog()

    def launch(kernel):
        if kernel == "traced fault":
            error = IndexError("out of range")
            error.access_log = recorded
            raise error
        if kernel == "untraced fault":
            raise RuntimeError("no driver")
        return "result", AccessLog()

    runs = launch_both("traced fault", "solution", launch)
    assert runs[0] == (None, recorded) and runs[1][0] == "result"
    assert capsys.readouterr().out == ""
    launch_both("untraced fault", "solution", launch)
    assert "(no access picture: the kernel failed before the tracer saw an access)" in \
        capsys.readouterr().out


def test_a_finished_kernel_that_mentions_the_stub_is_not_taken_for_one(monkeypatch):
    from types import SimpleNamespace

    import kvlab.backends
    from kvlab.exercises.core import _kernel_stub_on_a_gpu

    def finished(k, v, k_pool, v_pool, slots):
        # was: raise NotImplementedError("hint: ...")
        if slots[0] < 0:
            raise NotImplementedError  # in a branch: not the stub's body
        k_pool[0, 0, 0, 0] = k[0, 0, 0]

    monkeypatch.setattr(kvlab.backends, "cuda_mode", lambda: "gpu")
    assert not _kernel_stub_on_a_gpu(SimpleNamespace(py_func=finished))
