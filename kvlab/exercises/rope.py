"""Exercises of notebook 03 (RoPE): the two rotations, rotate-half and interleaved, Llama 3.1's
scaled frequencies, the rotate-half rotation as a kernel puzzle, and partial rotary as torch ops.

Each exercise is checked against :mod:`kvlab.ref.rope`. The cases are picked so that the usual
slips fail: positions out of order (token t is not at position t), the other style's pairs, the
sine's sign, fp16 inputs (rotate in float32, round once), and Llama 3.1 configurations with pairs
in all three of its bands (kept, divided by the factor, and the smooth ramp between). The kernel
puzzle runs in Numba's CUDA simulator under the access tracer, so a wrong index shows up as a
wrong picture.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kvlab.backends import cuda_mode
from kvlab.exercises.core import (FP16_KERNEL_ATOL, FP16_KERNEL_RTOL, ROUNDING_NOTE, Case,
                                  Exercise, copy_args, draw_accesses, launch_both, read_only,
                                  register, rounding_apart, run_torch)
from kvlab.ref import rope as ref
from kvlab.trace import index_runs, launch_traced

cuda_mode()  # decide GPU or simulator before numba is imported (kvlab.backends owns that)
from numba import cuda, float32  # noqa: E402

NOTEBOOK = "03_rope"
SECTION_ROTATION = "2.2 Rotating a head: rotate-half and interleaved"


# --- 03.rope_neox and 03.rope_gptj: one rotation, two layouts ----------------------------------

def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, positions: np.ndarray,
            first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Rotate pair i = dims (first[i], second[i]) of token t by row positions[t] of the tables."""
    c = cos[positions][:, None, :]                   # [T, 1, pairs]: one row per token, all heads
    s = sin[positions][:, None, :]
    a = x[..., first].astype(np.float32)             # widen once: the arithmetic is float32
    b = x[..., second].astype(np.float32)
    out = x.copy()
    out[..., first] = (a * c - b * s).astype(x.dtype)   # round once, to x's dtype
    out[..., second] = (b * c + a * s).astype(x.dtype)
    return out


def rope_neox_solution(x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                       positions: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of the whole head: pair i is dims (i, i + head_dim/2).

    x float16/float32 ``[T, heads, head_dim]``; cos, sin float32 ``[max_positions, head_dim/2]``;
    positions int32 ``[T]``. Returns a new array, x's dtype and shape."""
    half = x.shape[-1] // 2
    i = np.arange(half)
    return _rotate(x, cos, sin, positions, i, i + half)


def rope_gptj_solution(x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                       positions: np.ndarray) -> np.ndarray:
    """Interleaved RoPE of the whole head: pair i is dims (2i, 2i + 1). Shapes as rope_neox."""
    i = np.arange(x.shape[-1] // 2)
    return _rotate(x, cos, sin, positions, 2 * i, 2 * i + 1)


def _rotation_cases() -> list[Case]:
    def case(label, positions, heads=2, head_dim=8, theta=10000.0, dtype=np.float32, seed=0,
             random=False):
        rng = np.random.default_rng(seed)
        positions = np.asarray(positions, np.int32)
        cos, sin = ref.rope_tables(int(positions.max()) + 1, head_dim, theta)
        x = (2 * rng.standard_normal((len(positions), heads, head_dim))).astype(dtype)
        return Case(label, dict(x=x, cos=cos, sin=sin, positions=positions), random=random)

    cases = [
        case("position 0 turns nothing", [0], heads=1, head_dim=4),
        case("one pair (head_dim 2) at position 1: a turn of 1 radian", [1], heads=1, head_dim=2),
        case("positions out of order: token t is not at position t", [5, 2, 9, 0]),
        case("float16 input: rotate in float32, round once", [3, 17, 40], head_dim=16,
             dtype=np.float16, seed=1),
    ]
    rng = np.random.default_rng(5)
    for i in range(3):
        positions = rng.permutation(64)[:6]
        cases.append(case(f"random {i}", positions, heads=3, head_dim=int(rng.choice([8, 16, 32])),
                          dtype=np.float32 if i % 2 else np.float16, seed=10 + i, random=True))
    return cases


register(Exercise(
    name="03.rope_neox", notebook=NOTEBOOK, section=SECTION_ROTATION,
    signature="rope_neox(x, cos, sin, positions) -> rotated  # x's dtype and shape [T, heads, D]",
    hint="pair i = dims (i, i + D/2); c, s = cos[positions], sin[positions] (one row per token); "
         "in float32: a' = a c - b s, b' = b c + a s; round once to x's dtype.",
    solution=rope_neox_solution,
    reference=lambda x, cos, sin, positions: ref.apply_rope(x, cos, sin, positions, "neox"),
    cases=_rotation_cases,
    run=read_only("x"),
    # float32 math in another order (complex64, an FMA, float64 rounded once) may move a result by
    # an ulp of the products, |x| <~ 8 here: 5e-7, which a pair that nearly cancels cannot hide
    rtol=1e-6, atol=2e-6,
))

register(Exercise(
    name="03.rope_gptj", notebook=NOTEBOOK, section=SECTION_ROTATION,
    signature="rope_gptj(x, cos, sin, positions) -> rotated  # x's dtype and shape [T, heads, D]",
    hint="the same rotation as rope_neox; only the pairs change: pair i = dims (2i, 2i + 1), "
         "i.e. x[..., 0::2] and x[..., 1::2].",
    solution=rope_gptj_solution,
    reference=lambda x, cos, sin, positions: ref.apply_rope(x, cos, sin, positions, "gptj"),
    cases=_rotation_cases,
    run=read_only("x"),
    rtol=1e-6, atol=2e-6,  # as 03.rope_neox
))


# --- 03.llama3_inv_freq -----------------------------------------------------------------------

def llama3_inv_freq_solution(rotary_dim: int, theta: float, factor: float,
                             low_freq_factor: float, high_freq_factor: float,
                             original_max_position_embeddings: int) -> np.ndarray:
    """Llama 3.1's scaled speeds, float64 ``[rotary_dim // 2]`` radians per position."""
    inv_freq = theta ** (-np.arange(0, rotary_dim, 2) / rotary_dim)   # the plain speeds
    wavelength = 2 * np.pi / inv_freq                                 # positions per full turn
    long_edge = original_max_position_embeddings / low_freq_factor    # longer: divide by factor
    short_edge = original_max_position_embeddings / high_freq_factor  # shorter: keep
    # Between the edges, blend: weight 1 on the kept speed at short_edge, 0 at long_edge.
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelength < short_edge, inv_freq,
                    np.where(wavelength > long_edge, inv_freq / factor, blended))


def _llama3_reference(rotary_dim, theta, factor, low_freq_factor, high_freq_factor,
                      original_max_position_embeddings) -> np.ndarray:
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
               "high_freq_factor": high_freq_factor,
               "original_max_position_embeddings": original_max_position_embeddings}
    return ref.rope_frequencies(rotary_dim, theta, scaling)[0]


def _llama3_cases() -> list[Case]:
    def case(label, rotary_dim, theta, factor, low, high, original, random=False):
        return Case(label, dict(rotary_dim=rotary_dim, theta=theta, factor=factor,
                                low_freq_factor=low, high_freq_factor=high,
                                original_max_position_embeddings=original), random=random)

    cases = [
        case("Llama 3.1's own config", 128, 500000.0, 8.0, 1.0, 4.0, 8192),
        case("a small head, every band present", 16, 10000.0, 4.0, 1.0, 4.0, 256),
        case("a context so long that every pair is kept", 16, 10000.0, 8.0, 1.0, 4.0,
             10 ** 9),
        case("low 2, high 8: the edges move", 32, 10000.0, 16.0, 2.0, 8.0, 4096),
    ]
    rng = np.random.default_rng(6)
    for i in range(4):
        low = float(rng.uniform(0.5, 2.0))
        cases.append(case(f"random {i}", int(rng.choice([16, 64, 128])),
                          float(10 ** rng.uniform(4, 6)), float(rng.choice([2.0, 4.0, 8.0, 32.0])),
                          low, low * float(rng.uniform(1.5, 8.0)), int(rng.choice([512, 8192])),
                          random=True))
    return cases


register(Exercise(
    name="03.llama3_inv_freq", notebook=NOTEBOOK,
    section="2.5 Scaling: stretching RoPE past the trained context",
    signature="llama3_inv_freq(rotary_dim, theta, factor, low_freq_factor, high_freq_factor, "
              "original_max_position_embeddings) -> inv_freq  # float64 [rotary_dim // 2]",
    hint="wavelength = 2 pi / inv_freq; below L/high_freq_factor keep, above L/low_freq_factor "
         "divide by factor, between blend with smooth = (L / wavelength - low) / (high - low).",
    solution=llama3_inv_freq_solution,
    reference=_llama3_reference,
    cases=_llama3_cases,
    rtol=1e-9, atol=0.0,
))


# --- 03.rope_kernel: a kernel puzzle ----------------------------------------------------------
#
# The learner writes a Numba CUDA kernel ``rope_kernel(x, cos, sin, positions, out)``: rotate-half
# RoPE of the whole head, launched with one block per token and one thread per (head, pair). It
# runs in the simulator under the access tracer; a failure draws which thread wrote each element
# of ``out``, beside the solution.

@cuda.jit
def rope_kernel_solution(x, cos, sin, positions, out):
    token = cuda.blockIdx.x                     # one block per token
    half = x.shape[2] // 2                      # pairs per head
    head = cuda.threadIdx.x // half             # one thread per (head, pair)
    p = cuda.threadIdx.x % half                 # rotate-half: pair p is dims (p, p + half)
    pos = positions[token]                      # the token's position, not its index
    c = cos[pos, p]
    s = sin[pos, p]
    a = float32(x[token, head, p])              # widen fp16 once: the arithmetic is float32
    b = float32(x[token, head, p + half])
    out[token, head, p] = a * c - b * s         # the store rounds once, to out's dtype
    out[token, head, p + half] = b * c + a * s




def _rope_reference(x, cos, sin, positions, out):
    """kvlab's rotation (``out`` is the kernel's output buffer: the reference makes its own)."""
    return ref.apply_rope(x, cos, sin, positions, "neox")


def _launch_rope(kernel: Callable, case: Case):
    """Launch ``kernel`` on the case in the simulator, traced: grid = tokens, block = heads ×
    pairs. Returns ``(out after the launch, the AccessLog)``."""
    tokens, heads, head_dim = case.kwargs["x"].shape
    after, log = launch_traced(kernel, tokens, heads * (head_dim // 2), **copy_args(case.kwargs))
    return after["out"], log


def _run_rope(fn: Callable, case: Case) -> Any:
    """``out`` after ``fn`` ran: the NumPy reference is called, a kernel is launched."""
    if fn is _rope_reference:
        return fn(**copy_args(case.kwargs))
    return _launch_rope(fn, case)[0]


def _print_wrong_elements(got: np.ndarray, expected: np.ndarray, positions: np.ndarray,
                          limit: int = 6) -> None:
    """One line per (token, head) whose output differs: the dims that do."""
    wrong = ~np.isclose(got.astype(np.float64), expected.astype(np.float64), rtol=FP16_KERNEL_RTOL,
                        atol=FP16_KERNEL_ATOL)
    groups = [(t, h) for t in range(wrong.shape[0]) for h in range(wrong.shape[1])
              if wrong[t, h].any()]
    if not groups:
        return
    print("  where out differs (token, head: the dims that do):")
    for t, h in groups[:limit]:
        print(f"    token {t} (position {int(positions[t])}), head {h}: "
              f"dims {index_runs(np.flatnonzero(wrong[t, h]))}")
    if len(groups) > limit:
        print(f"    ... and {len(groups) - limit} more (token, head) rows")


def _explain_rope(fn: Callable, case: Case) -> None:
    """Say which (token, head) rows of ``out`` are wrong, and draw which thread wrote each element
    of ``out``: yours beside the solution's."""
    runs = launch_both(fn, rope_kernel_solution, lambda kernel: _launch_rope(kernel, case))
    got = runs[0][0]
    if got is not None:
        _print_wrong_elements(got, _run_rope(_rope_reference, case), case.kwargs["positions"])
    if any(log is None for _, log in runs):
        return
    yours, reference = (log.owner_map("out", "write") for _, log in runs)
    if np.array_equal(yours, reference):
        print("  each element of out was written by the thread that should write it: the indices "
              "are right, the values are not (the sign? the table row? arithmetic in fp16?)")
    draw_accesses(yours, reference, "writes to out")


# Llama 3.1's RoPE scaling (its config.json's rope_scaling), for tables no formula of theta gives
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_kernel_case(label: str, positions, heads: int = 1, head_dim: int = 8, seed: int = 0,
                      theta: float = 10000.0, scaling: dict | None = None,
                      random: bool = False) -> Case:
    """fp16 x (the cache's dtype), float32 tables, int32 positions, a zeroed fp16 ``out``."""
    rng = np.random.default_rng(seed)
    positions = np.asarray(positions, np.int32)
    cos, sin = ref.rope_tables(int(positions.max()) + 1, head_dim, theta, scaling)
    x = (2 * rng.standard_normal((len(positions), heads, head_dim))).astype(np.float16)
    return Case(label, dict(x=x, cos=cos, sin=sin, positions=positions,
                            out=np.zeros_like(x)), random=random)


def _rope_kernel_cases() -> list[Case]:
    """Few and tiny: the simulator runs every thread as Python (at most 4 tokens × 16 threads)."""
    cases = [
        _rope_kernel_case("position 0 turns nothing", [0], head_dim=4),
        _rope_kernel_case("one token, one head, at position 3", [3], seed=1),
        _rope_kernel_case("positions out of order: token t is not at position t", [5, 2, 9, 0],
                          seed=2),
        _rope_kernel_case("two heads of 16 dims", [3, 1, 4], heads=2, head_dim=16, seed=3),
        _rope_kernel_case("Llama 3.1's tables (theta 500,000, scaled): read them, do not "
                          "recompute the angles", [700, 5, 3000], seed=4, theta=500000.0,
                          scaling=LLAMA31_SCALING),
    ]
    rng = np.random.default_rng(8)
    for i in range(3):
        tokens = int(rng.integers(1, 5))
        cases.append(_rope_kernel_case(
            f"random {i}", rng.permutation(64)[:tokens], heads=int(rng.integers(1, 3)),
            head_dim=int(rng.choice([4, 8, 16])), seed=20 + i, random=True))
    return cases


register(Exercise(
    name="03.rope_kernel", notebook=NOTEBOOK, section="3 As a Numba CUDA kernel",
    signature="@cuda.jit\ndef rope_kernel(x, cos, sin, positions, out): ...  "
              "# grid = tokens, block = heads * (head_dim // 2) threads",
    hint="token = blockIdx.x; thread t handles head t // (D/2), pair p = t % (D/2), dims p and "
         "p + D/2; c, s = cos[positions[token], p], sin[positions[token], p]; in float32 write "
         "a c - b s and b c + a s into out.",
    solution=rope_kernel_solution,
    reference=_rope_reference,
    cases=_rope_kernel_cases,
    run=_run_rope,
    rtol=FP16_KERNEL_RTOL, atol=FP16_KERNEL_ATOL,  # one fp16 ulp: a GPU may fuse an FMA
    explain=_explain_rope,
    kernel=True,
    trace=_launch_rope,
))


# --- 03.rope_partial_torch: partial rotary, as torch ops -------------------------------------
#
# §2.4's partial rotary in torch: the tables are built for rotary_dim (their width is
# rotary_dim / 2), the pairs are (i, i + rotary_dim / 2) inside the first rotary_dim dims, and the
# rest of the head is copied. The classic slip pairs dims by head_dim / 2 instead, as if the whole
# head turned; a full-head case cannot tell the two apart, a partial one can.

def rope_partial_torch_solution(x, cos, sin, positions):
    """Rotate-half RoPE on the first ``rotary_dim = 2 * cos.shape[1]`` dims of every head.

    x: float16 torch ``[T, H, D]``; cos, sin: float32 ``[max_positions, rotary_dim // 2]``;
    positions: int32 ``[T]``. Returns float16 ``[T, H, D]``: dims past rotary_dim as they were.
    """
    import torch

    half = cos.shape[1]                                     # pairs: (i, i + half), i < half
    c = cos[positions.long()][:, None, :]                   # [T, 1, half]: every head alike
    s = sin[positions.long()][:, None, :]
    a, b = x[..., :half].float(), x[..., half:2 * half].float()
    turned = torch.cat([a * c - b * s, b * c + a * s], dim=-1).to(x.dtype)  # rounded once
    return torch.cat([turned, x[..., 2 * half:]], dim=-1)   # the pass-through dims: copied


def rope_partial_torch_reference(x, cos, sin, positions):
    """``kvlab.ref.rope.apply_rope`` with rotate-half pairs (its rotary_dim from the tables)."""
    return ref.apply_rope(x, cos, sin, positions, "neox")


def _run_rope_partial_torch(fn: Callable, case: Case) -> Any:
    """NumPy in for the reference; torch tensors in for the learner's function, whose result must
    be an fp16 tensor."""
    if fn is rope_partial_torch_reference:
        return fn(**copy_args(case.kwargs))
    return run_torch(fn, case.kwargs, "float16", "the result", ", x's shape")[0]


def _explain_rope_partial(fn: Callable, case: Case) -> None:
    """Which of the head's three parts is off (the pairs' first dims, their second dims, the
    pass-through), and whether the differences are rounding or the pairing."""
    x, cos = case.kwargs["x"], case.kwargs["cos"]
    try:
        got = _run_rope_partial_torch(fn, case)
    except Exception:
        return
    expected = rope_partial_torch_reference(**copy_args(case.kwargs))
    if got.shape != expected.shape:
        return
    half, head_dim = cos.shape[1], x.shape[-1]
    parts = [(f"dims 0-{half - 1} (each pair's first)", slice(0, half)),
             (f"dims {half}-{2 * half - 1} (each pair's second)", slice(half, 2 * half))]
    if 2 * half < head_dim:
        parts.append((f"dims {2 * half}-{head_dim - 1} (not turned: copied)",
                      slice(2 * half, head_dim)))
    print(f"  rotary_dim = 2 x cos.shape[1] = {2 * half} of head_dim {head_dim}: pair i is dims "
          f"(i, i + {half})")
    steps = []
    for name, dims in parts:
        yours, want = got[..., dims].astype(np.float32), expected[..., dims].astype(np.float32)
        wrong = ~((yours == want) | (np.isnan(yours) & np.isnan(want)))
        print(f"    {name}: " + ("✓" if not wrong.any() else
                                 f"{int(wrong.sum())} of {wrong.size} values differ"))
        if wrong.any():
            steps.append(rounding_apart(got[..., dims], expected[..., dims]))
    if steps and all(steps):
        print(ROUNDING_NOTE)
    elif 2 * half < head_dim and np.array_equal(got, _paired_by_head_dim(**case.kwargs)):
        print(f"  Yours pairs dim i with dim i + head_dim / 2 = i + {head_dim // 2}, as if the "
              f"whole head turned; with rotary_dim {2 * half} the pair is (i, i + {half}).")


def _paired_by_head_dim(x, cos, sin, positions):
    """The usual slip of partial rotary, for the explanation to recognise: pairs (i, i + D/2)."""
    half, middle = cos.shape[1], x.shape[-1] // 2
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    a = x[..., :half].astype(np.float32)
    b = x[..., middle:middle + half].astype(np.float32)
    out = x.copy()
    out[..., :half] = (a * c - b * s).astype(x.dtype)
    out[..., middle:middle + half] = (b * c + a * s).astype(x.dtype)
    return out


def _rope_partial_cases() -> list[Case]:
    def case(label, positions, heads=2, head_dim=16, rotary_dim=8, seed=0, theta=10000.0,
             scaling=None, random=False):
        rng = np.random.default_rng(seed)
        positions = np.asarray(positions, np.int32)
        cos, sin = ref.rope_tables(int(positions.max()) + 1, rotary_dim, theta, scaling)
        x = (2 * rng.standard_normal((len(positions), heads, head_dim))).astype(np.float16)
        return Case(label, dict(x=x, cos=cos, sin=sin, positions=positions), random=random)

    rng = np.random.default_rng(3)
    cases = [
        case("rotary_dim 8 of head_dim 16: pairs (i, i + 4), dims 8-15 copied", [3, 1, 4]),
        case("the whole head turns (rotary_dim = head_dim = 8)", [2, 7], head_dim=8, seed=1),
        case("GPT-NeoX's 25%: rotary_dim 8 of head_dim 32, positions out of order",
             [9, 0, 30, 5], heads=1, head_dim=32, seed=2),
        case("Llama 3.1's scaled tables, rotary_dim 16 of 64: read the tables", [700, 5, 3000],
             head_dim=64, rotary_dim=16, seed=4, theta=500000.0, scaling=LLAMA31_SCALING),
        case("random, large: 256 tokens x 8 heads of 128, rotary_dim 64 (rounding shows here)",
             rng.permutation(2048)[:256], heads=8, head_dim=128, rotary_dim=64, seed=5,
             random=True),
    ]
    for i in range(2):
        head_dim = int(rng.choice([16, 32, 64]))
        cases.append(case(f"random {i}", rng.permutation(100)[:int(rng.integers(1, 6))],
                          heads=int(rng.integers(1, 4)), head_dim=head_dim,
                          rotary_dim=head_dim // int(rng.choice([1, 2, 4])), seed=30 + i,
                          random=True))
    return cases


register(Exercise(
    name="03.rope_partial_torch", notebook=NOTEBOOK, section="4 As MPS ops (torch)",
    signature="rope_partial_torch(x, cos, sin, positions) -> out  # torch; x, out float16 "
              "[T, H, D]; rotary_dim = 2 * cos.shape[1]",
    hint="half = cos.shape[1]; c, s = cos[positions], sin[positions] as [T, 1, half]; a, b = the "
         "first half dims and the next half dims, in float32; cat(a c - b s, b c + a s) to fp16, "
         "then the dims from 2 * half on, unchanged.",
    solution=rope_partial_torch_solution,
    reference=rope_partial_torch_reference,
    cases=_rope_partial_cases,
    run=_run_rope_partial_torch,
    explain=_explain_rope_partial,
    rtol=0.0, atol=0.0,  # one float32 rotation, rounded once: bit for bit
))
