"""A kernel puzzle's checker also asks a GPU's real compiler (kvlab.exercises.gpu_compile): the
simulator runs any Python, so a kernel that passes every case there must still compile to PTX."""
import re

import numpy as np
import pytest
from numba import cuda, float32

from kvlab.backends import cuda_mode
from kvlab.exercises import EXERCISES, SOLUTIONS_ENV, check
from kvlab.exercises.gpu_compile import compile_for_gpu

pytestmark = pytest.mark.skipif(cuda_mode() == "gpu", reason="on a GPU the kernels compile to run")
KERNEL_PUZZLES = sorted(name for name, ex in EXERCISES.items() if ex.kernel)


@pytest.fixture(autouse=True)
def _learner_view(monkeypatch):
    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)


@pytest.mark.parametrize("name", KERNEL_PUZZLES)
def test_every_puzzle_solution_compiles_for_a_gpu_and_says_so(name, capsys):
    exercise = EXERCISES[name]
    assert compile_for_gpu(exercise.solution, exercise.cases()[0].kwargs).ok is True
    check(name, exercise.solution)
    compiled = r"and it compiles for a GPU \(PTX and ptxas for sm_90: \d+ registers a thread\)"
    assert re.search(compiled, capsys.readouterr().out)


@cuda.jit
def scale_with_a_shared_array_sized_at_run_time(x, scales):
    """Right in the simulator; a GPU needs a shared array's size when it compiles the kernel."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    local = np.float32(0)
    for d in range(tid, x.shape[2], cuda.blockDim.x):
        local = max(local, abs(x[token, head, d]))
    partial = cuda.shared.array(cuda.blockDim.x, np.float32)
    partial[tid] = local
    cuda.syncthreads()
    width = cuda.blockDim.x // 2
    while width > 0:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
        cuda.syncthreads()
        width //= 2
    if tid == 0:
        scales[token, head] = max(partial[0], np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_with_a_python_list(x, scales):
    """Right in the simulator; a GPU kernel has no Python lists."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    if tid == 0:
        magnitudes = [abs(x[token, head, d]) for d in range(x.shape[2])]
        scales[token, head] = max(max(magnitudes), np.float32(1e-8)) / np.float32(127)


@pytest.mark.parametrize("kernel, complaint", [
    (scale_with_a_shared_array_sized_at_run_time, ">>> array(int32, class(float32))"),
    (scale_with_a_python_list, "TypingError"),
])
def test_a_kernel_only_the_simulator_runs_is_refused_with_the_compilers_words(kernel, complaint,
                                                                              capsys):
    assert EXERCISES["02.scale_kernel"].check(kernel) is False
    out = capsys.readouterr().out
    assert "passes all 10 cases in the simulator, but a GPU's compiler refuses it" in out
    assert complaint in out and "0x" not in out  # no memory addresses in the message


def _magnitude(value):
    return abs(value)


@cuda.jit(device=True)
def _device_magnitude(value):
    return abs(value)


@cuda.jit
def _jit_magnitude(value):  # no device=True: called from a kernel, a GPU compiles it as one
    return abs(value)


def _serial_scale_kernel(magnitude):
    """Thread 0 alone (slow, but right), through a helper defined outside the kernel."""
    @cuda.jit
    def scale_through_a_helper(x, scales):
        token, head = cuda.blockIdx.x, cuda.blockIdx.y
        if cuda.threadIdx.x == 0:
            amax = np.float32(0)
            for d in range(x.shape[2]):
                amax = max(amax, magnitude(x[token, head, d]))
            scales[token, head] = max(amax, np.float32(1e-8)) / np.float32(127)
    return scale_through_a_helper


def test_a_device_helper_goes_with_the_kernel_and_a_python_one_is_refused(capsys):
    """The learner's @cuda.jit(device=True) function is compiled with the kernel (here read from
    the closure); a plain Python function cannot be called from a GPU kernel at all."""
    assert EXERCISES["02.scale_kernel"].check(_serial_scale_kernel(_device_magnitude)) is True
    assert "and it compiles for a GPU" in capsys.readouterr().out
    assert EXERCISES["02.scale_kernel"].check(_serial_scale_kernel(_jit_magnitude)) is True
    assert "and it compiles for a GPU" in capsys.readouterr().out
    assert EXERCISES["02.scale_kernel"].check(_serial_scale_kernel(_magnitude)) is False
    assert "it calls magnitude, a plain Python function" in capsys.readouterr().out


@cuda.jit
def scale_by_numpy_on_a_slice(x, scales):
    """Right in the simulator; a GPU kernel cannot call np.max on an array."""
    token, head = cuda.blockIdx.x, cuda.blockIdx.y
    if cuda.threadIdx.x == 0:
        amax = np.max(np.abs(x[token, head, :]))
        scales[token, head] = max(amax, np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_with_too_much_shared_memory(x, scales):
    """Right in the simulator, and valid PTX; ptxas refuses 256 KiB of static shared memory."""
    token, head = cuda.blockIdx.x, cuda.blockIdx.y
    scratch = cuda.shared.array(1 << 16, np.float32)
    if cuda.threadIdx.x == 0:
        scratch[0] = np.float32(0)
        for d in range(x.shape[2]):
            scratch[0] = max(scratch[0], abs(x[token, head, d]))
        scales[token, head] = max(scratch[0], np.float32(1e-8)) / np.float32(127)


@pytest.mark.parametrize("kernel, complaint", [
    (scale_by_numpy_on_a_slice, ">>> max(array(float32, 1d"),
    (scale_with_too_much_shared_memory, "ptxas"),
])
def test_what_the_compiler_or_ptxas_refuses_is_refused(kernel, complaint, capsys):
    assert EXERCISES["02.scale_kernel"].check(kernel) is False
    out = capsys.readouterr().out
    assert "a GPU's compiler refuses it" in out and complaint in out


@cuda.jit
def scale_annotated_with_a_default(x: np.ndarray, scales: "np.ndarray", floor=1e-8):
    """Annotations name np without the body using it; a parameter past the launch's takes its
    default: both compile."""
    token, head = cuda.blockIdx.x, cuda.blockIdx.y
    if cuda.threadIdx.x == 0:
        amax = 0.0
        for d in range(x.shape[2]):
            amax = max(amax, abs(x[token, head, d]))
        scales[token, head] = max(float32(amax), float32(floor)) / float32(127)


def test_annotations_and_defaults_do_not_stop_the_compile(capsys):
    assert EXERCISES["02.scale_kernel"].check(scale_annotated_with_a_default) is True
    assert "and it compiles for a GPU" in capsys.readouterr().out


def test_a_kernel_without_source_gets_a_note_and_check_does_not_raise(capsys):
    import inspect

    from kvlab.exercises.paging import write_kv_kernel_solution

    scope = {}
    source = inspect.getsource(write_kv_kernel_solution.fn)
    exec("import numpy as np\nfrom numba import cuda\n" + source, scope)  # no file to read back
    assert EXERCISES["01.write_kv_kernel"].check(scope["write_kv_kernel_solution"]) is True
    assert "not compiled for a GPU: its source could not be read" in capsys.readouterr().out


@cuda.jit
def scale_with_two_defaults(x, scales, floor=1e-8, levels=127):
    """Two parameters past the launch's two arguments: both take their defaults."""
    token, head = cuda.blockIdx.x, cuda.blockIdx.y
    if cuda.threadIdx.x == 0:
        amax = 0.0
        for d in range(x.shape[2]):
            amax = max(amax, abs(x[token, head, d]))
        scales[token, head] = max(float32(amax), float32(floor)) / float32(levels)


def test_every_parameter_past_the_arguments_takes_its_own_default():
    arguments = EXERCISES["02.scale_kernel"].cases()[0].kwargs
    assert compile_for_gpu(scale_with_two_defaults, arguments).ok is True


@cuda.jit
def scale_then_return_it(x, scales):
    """Right in the simulator (which drops what a kernel returns); a GPU kernel returns nothing."""
    token, head = cuda.blockIdx.x, cuda.blockIdx.y
    if cuda.threadIdx.x == 0:
        amax = np.float32(0)
        for d in range(x.shape[2]):
            amax = max(amax, abs(x[token, head, d]))
        scales[token, head] = max(amax, np.float32(1e-8)) / np.float32(127)
    return scales


def test_a_kernel_that_returns_a_value_is_told_that_kernels_return_nothing(capsys):
    assert EXERCISES["02.scale_kernel"].check(scale_then_return_it) is False
    out = capsys.readouterr().out
    assert "a GPU's compiler refuses it" in out
    assert "(A kernel returns nothing: it writes its results into arrays. Drop the return " \
        "value.)" in out, out
