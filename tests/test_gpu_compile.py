"""A kernel puzzle's checker also asks a GPU's real compiler (kvlab.exercises.gpu_compile): the
simulator runs any Python, so a kernel that passes every case there must still compile to PTX."""
import numpy as np
import pytest
from numba import cuda

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
    assert "and it compiles for a GPU (PTX for sm_90)" in capsys.readouterr().out


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


@cuda.jit
def scale_through_a_helper(x, scales):
    """Thread 0 alone (slow, but right), through a helper defined outside the kernel."""
    token, head = cuda.blockIdx.x, cuda.blockIdx.y
    if cuda.threadIdx.x == 0:
        amax = np.float32(0)
        for d in range(x.shape[2]):
            amax = max(amax, _magnitude(x[token, head, d]))
        scales[token, head] = max(amax, np.float32(1e-8)) / np.float32(127)


def test_what_cannot_be_sent_to_the_compiler_is_said_not_failed(capsys):
    """A helper defined outside the kernel stays behind: the verdict passes and says so."""
    assert EXERCISES["02.scale_kernel"].check(scale_through_a_helper) is True
    assert "not compiled for a GPU: it uses _magnitude, defined outside the kernel" in \
        capsys.readouterr().out


shape = (3, 4)  # a global that shares its name with an attribute the kernel below reads


@cuda.jit
def copy_what_fits(x, out):
    i = cuda.threadIdx.x
    if i < x.shape[0] and i < out.shape[0]:
        out[i] = x[i]


def test_an_attribute_name_is_not_taken_for_a_global():
    """``x.shape`` reads no global ``shape`` (a notebook may have one): only loaded globals are
    sent, so this kernel compiles."""
    arrays = {"x": np.zeros(4, np.float32), "out": np.zeros(4, np.float32)}
    assert compile_for_gpu(copy_what_fits, arrays).ok is True
