"""Exercises of notebook 02 (quantization): the INT8 cache's scale rule, one FP8 byte by hand,
the block reduction that finds a vector's scale on a GPU (a kernel puzzle), and quantization at
any granularity as torch ops (where the scale sits).

Each exercise is checked against :mod:`kvlab.ref.quant`, on edge cases (an all-zero vector, whose
scale is the 1e-8 floor, and a vector under the floor, whose codes stay small) and on cases picked
so that the usual slips fail: exact ties (round half to even), vectors of very different size (one
scale per (token, KV head), not per tensor), codes from the fp16 scale instead of the float32 one,
fp16 arithmetic where float32 is meant, and FP8 values in the subnormal range, on a mantissa tie,
and past 448 (saturation). The kernel puzzle runs in Numba's CUDA simulator under the access
tracer: its cases put the largest |x| where each usual slip of a reduction misses it (a negative
value, the last element, the tail of a head_dim that is not a multiple of the block, a thread the
tree reaches only at its last step).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kvlab.backends import cuda_mode
from kvlab.exercises.core import (Case, Exercise, copy_args, draw_accesses, launch_both,
                                  read_only, register, run_torch)
from kvlab.ref import quant as ref
from kvlab.trace import launch_traced

cuda_mode()  # decide GPU or simulator before numba is imported (kvlab.backends owns that)
from numba import cuda  # noqa: E402

NOTEBOOK = "02_quantization"
SECTION_INT8 = "2.1 INT8 with one scale per (token, KV head)"


# --- 02.quantize_int8 ----------------------------------------------------------------------------

def quantize_int8_solution(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 ``[T, num_kv_heads, head_dim]`` -> (codes int8 ``[T, Hkv, D]``, scales fp16
    ``[T, Hkv]``): one symmetric scale per (token, KV head) vector."""
    amax = np.abs(x).max(axis=-1)                                  # [T, H]
    scale = np.maximum(amax, np.float32(1e-8)) / np.float32(127)   # float32; the floor: x = 0
    codes = np.rint(np.clip(x / scale[..., None], -127, 127))      # np.rint: half to even
    return codes.astype(np.int8), scale.astype(np.float16)         # the cache stores fp16 scales


def _quantize_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ref.quantize(x, "int8")


def _vectors(rng: np.random.Generator, tokens: int, heads: int, head_dim: int) -> np.ndarray:
    """Gaussian vectors, each (token, head) scaled by its own size (log-uniform over 1e-3..1e3),
    so one scale for the whole tensor is visibly wrong."""
    size = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), (tokens, heads, 1)))
    return (rng.standard_normal((tokens, heads, head_dim)) * size).astype(np.float32)


def _quantize_cases() -> list[Case]:
    f32 = np.float32
    cases = [
        Case("the notebook's vector (scale 0.02)",
             dict(x=np.array([[[0.9, -2.54, 0.01, 1.27, -0.635, 0.0, 2.54, 0.3175]]], f32))),
        Case("ties with scale exactly 1: 0.5, 1.5, 2.5 round half to even",
             dict(x=np.array([[[127, 0.5, 1.5, 2.5, -2.5, -0.5]]], f32))),
        Case("an all-zero vector (its scale is the 1e-8 floor / 127)",
             dict(x=np.zeros((1, 1, 4), f32))),
        Case("a vector under the floor (amax 1e-9): codes 13, -6, 0, 3, not 127, -64, 0, 32",
             dict(x=np.array([[[1e-9, -5e-10, 0.0, 2.5e-10]]], f32))),
        Case("two heads of very different size: one scale each",
             dict(x=np.array([[[1000.0, -3.0, 7.0, 0.25]], [[0.001, -0.0004, 0.0002, 0.0]]],
                             f32).reshape(1, 2, 4))),
        Case("amax 3.0 and an element 1.0 (code 42)",
             dict(x=np.array([[[3.0, 1.0, -1.5, 0.0]]], f32))),
    ]
    rng = np.random.default_rng(2)
    for i in range(4):
        cases.append(Case(f"random {i}", dict(x=_vectors(rng, 5, 2, 16)), random=True))
    return cases


register(Exercise(
    name="02.quantize_int8", notebook=NOTEBOOK, section=SECTION_INT8,
    signature="quantize_int8(x) -> (codes, scales)  # int8 [T, Hkv, D], float16 [T, Hkv]",
    hint="amax over the last axis; scale = max(amax, 1e-8) / 127 in float32; codes = "
         "np.rint(np.clip(x / scale, -127, 127)) as int8; return the scales as float16.",
    solution=quantize_int8_solution,
    reference=_quantize_reference,
    cases=_quantize_cases,
    run=read_only("x"),
    outputs=("codes", "scales"),
    exact_dtypes=True,  # int8 codes, fp16 scales: the bytes a cache stores
    rtol=0.0, atol=0.0,  # codes and fp16 scales are exact: any difference is a different rule
))


# --- 02.dequantize_int8 ---------------------------------------------------------------------------

def dequantize_int8_solution(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """codes int8 ``[T, Hkv, D]``, scales fp16 ``[T, Hkv]`` -> float32 ``[T, Hkv, D]``."""
    return codes.astype(np.float32) * scales.astype(np.float32)[..., None]  # float32 math


def _dequantize_reference(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return ref.dequantize(codes, scales, "int8")


def _dequantize_cases() -> list[Case]:
    cases = [
        Case("the notebook's vector", dict(zip(("codes", "scales"), ref.quantize(np.array(
            [[[0.9, -2.54, 0.01, 1.27, -0.635, 0.0, 2.54, 0.3175]]], np.float32), "int8")))),
        Case("codes ±127 with a scale whose product needs more than fp16's 11 bits",
             dict(codes=np.array([[[127, -127, 101, 3]]], np.int8),
                  scales=np.array([[0.3645]], np.float16))),
        Case("three tokens × two heads, each (token, head) with its own scale",
             dict(codes=np.arange(-12, 12, dtype=np.int8).reshape(3, 2, 4) * 9,
                  scales=np.array([[0.5, 0.001], [3.0, 0.07], [1e-4, 20.0]], np.float16))),
    ]
    rng = np.random.default_rng(3)
    for i in range(3):
        codes, scales = ref.quantize(_vectors(rng, 4, 3, 8), "int8")
        cases.append(Case(f"random {i}", dict(codes=codes, scales=scales), random=True))
    return cases


register(Exercise(
    name="02.dequantize_int8", notebook=NOTEBOOK, section=SECTION_INT8,
    signature="dequantize_int8(codes, scales) -> x_hat  # float32 [T, Hkv, D]",
    hint="widen both to float32 first (fp16 arithmetic would round the product), then "
         "code * scale, the scale broadcast over head_dim with [..., None].",
    solution=dequantize_int8_solution,
    reference=_dequantize_reference,
    cases=_dequantize_cases,
    run=read_only("codes", "scales"),
    exact_dtypes=True,  # float32, as attention reads it: float64 would double the bytes
    rtol=0.0, atol=0.0,  # code * fp16(scale) is exact in float32
))


# --- 02.fp8_e4m3_encode ---------------------------------------------------------------------------

def fp8_e4m3_encode_solution(value: float) -> int:
    """The E4M3FN byte (an int 0..255) nearest to ``value``, rounding half to even; |value| > 448
    saturates to ±448. ``value`` is a finite float."""
    sign = 0x80 if np.signbit(value) else 0            # -0.0 has its sign bit set too
    magnitude = min(abs(float(value)), 448.0)          # saturate: no infinities in E4M3FN
    exponent = -6                                      # subnormals share the smallest exponent
    while exponent < 8 and magnitude >= 2.0 ** (exponent + 1):
        exponent += 1                                  # exponent = floor(log2(magnitude)), >= -6
    steps = round(magnitude / 2.0 ** (exponent - 3))   # 8..16 (normal) or 0..8 (subnormal);
    return sign | ((exponent + 6) * 8 + steps)         # Python's round() is half to even; a 16
    #                                                    carries into the exponent field by itself


def _fp8_reference(value: float) -> int:
    return int(ref.fp8_e4m3_encode(np.float32(value)))


def _fp8_cases() -> list[Case]:
    hand = [
        ("one", 1.0), ("0.3 (rounds to 0.3125)", 0.3), ("-2.0: the sign bit", -2.0),
        ("17: a tie between 16 and 18, to the even mantissa", 17.0),
        ("15.9: rounds up to 16 and carries into the exponent", 15.9),
        ("448, the largest value", 448.0), ("1000: saturates to 448", 1000.0),
        ("-465: saturates to -448", -465.0),
        ("2**-6, the smallest normal", 2.0 ** -6), ("2**-9, the smallest subnormal", 2.0 ** -9),
        ("3 * 2**-9, a subnormal", 3 * 2.0 ** -9),
        ("2**-10: a tie between 0 and 2**-9, to even (0)", 2.0 ** -10),
        ("0.0155: a subnormal that rounds up to the smallest normal", 0.0155),
        ("zero", 0.0),
        ("-0.0: zero has a sign bit too (-0.0 < 0 is False, np.signbit(-0.0) True)", -0.0),
    ]
    cases = [Case(label, dict(value=float(np.float32(v)))) for label, v in hand]
    rng = np.random.default_rng(4)
    for i in range(12):
        value = float(np.float32(rng.choice([-1, 1]) * 2.0 ** rng.uniform(-11, 9)))
        cases.append(Case(f"random {i}", dict(value=value), random=True))
    return cases


register(Exercise(
    name="02.fp8_e4m3_encode", notebook=NOTEBOOK, section="2.2 FP8 E4M3, bit by bit",
    signature="encode_by_hand(value) -> byte  # an int 0..255, the E4M3FN code of one float",
    hint="saturate |value| to 448; E = floor(log2|value|) but at least -6; byte = sign * 128 + "
         "(E + 6) * 8 + round(|value| / 2**(E - 3)), with round half to even.",
    solution=fp8_e4m3_encode_solution,
    reference=_fp8_reference,
    cases=_fp8_cases,
))


# --- 02.scale_kernel: a kernel puzzle, the block reduction ---------------------------------------
#
# The learner writes ``scale_kernel(x, scales)``: x float32 ``[T, Hkv, D]``, scales float16
# ``[T, Hkv]``, launched ``scale_kernel[(T, Hkv), THREADS]``. Thread block (t, h) owns x[t, h, :]:
# each thread takes max |x| over its strided elements, the partials meet in shared memory, a tree
# folds them (w = THREADS/2, ..., 1, a barrier after each step), and thread 0 stores the vector's
# scale max(amax, 1e-8) / 127 as fp16: the scales kvlab.ref.quant.quantize(x, "int8") returns.
# A failure draws which thread of each vector's own block read each element of x (yours beside the
# solution's) and prints the solution's tree, step by step, for the first vector that differs.
#
# The fp16 store hides the 1e-8 floor: 1e-8 / 127 is below fp16's smallest subnormal, so an
# all-zero vector stores 0 with or without it (the floor shows in the codes: 02.quantize_int8).

THREADS = 8  # threads per block in this puzzle: a power of two, below every case's head_dim


@cuda.jit
def scale_kernel_solution(x, scales):
    token = cuda.blockIdx.x                      # thread block (token, head) owns x[token, head, :]
    head = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    local = np.float32(0)                        # 1. this thread's max |x| over its elements:
    for d in range(tid, x.shape[2], THREADS):    #    tid, tid + THREADS, tid + 2 * THREADS, ...
        local = max(local, abs(x[token, head, d]))
    partial = cuda.shared.array(THREADS, np.float32)
    partial[tid] = local                         # 2. every partial into shared memory
    cuda.syncthreads()                           #    all written before any is read
    width = THREADS // 2                         # 3. the tree: w = 4, 2, 1 for 8 threads
    while width > 0:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
        cuda.syncthreads()                       #    the next step reads what this one wrote
        width //= 2
    if tid == 0:                                 # 4. partial[0] is the vector's amax
        scales[token, head] = max(partial[0], np.float32(1e-8)) / np.float32(127)  # -> fp16


def _scale_reference(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The fp16 scales ``kvlab.ref.quant.quantize(x, "int8")`` stores (``scales`` is not read)."""
    return ref.quantize(x, "int8")[1]


def _launch_scale(kernel: Callable, case: Case):
    """Launch ``kernel`` traced: grid = (tokens, heads), block = THREADS threads.
    Returns ``(scales after the launch, the AccessLog)``."""
    tokens, heads, _ = case.kwargs["x"].shape
    after, log = launch_traced(kernel, (tokens, heads), THREADS, **copy_args(case.kwargs))
    return after["scales"], log


def _run_scale(fn: Callable, case: Case) -> Any:
    if fn is _scale_reference:
        return _scale_reference(**copy_args(case.kwargs))
    return _launch_scale(fn, case)[0]


def _reads_by_own_block(log) -> tuple[np.ndarray, int]:
    """``(owners, foreign)``: owners is int ``x``'s shape, the threadIdx.x of the thread of block
    (t, h) that read x[t, h, d] (-1: none of that block, -2: two of its threads); foreign counts
    the reads of x made by a block that does not own the vector."""
    owners = np.full(log.shapes["x"], -1, dtype=np.int64)
    foreign = 0
    for block, thread, element in log.accesses("x", "read"):
        if tuple(block[:2]) != tuple(element[:2]):
            foreign += 1
            continue
        owners[element] = thread[0] if owners[element] in (-1, thread[0]) else -2
    return owners, foreign


def _print_tree(x: np.ndarray, token: int, head: int, yours: Any) -> None:
    """The solution's reduction of x[token, head, :], step by step (in NumPy, as the kernel
    does it: a max is exact in any order)."""
    vector = np.abs(x[token, head].astype(np.float32))
    partial = np.array([vector[i::THREADS].max(initial=0) for i in range(THREADS)], np.float32)

    def show(values: np.ndarray) -> str:
        return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"

    largest = int(np.argmax(vector))
    print(f"  the solution's reduction of x[{token}, {head}, :] ({vector.size} elements, "
          f"{THREADS} threads): the largest |x|, {vector[largest]:.4g}, is element {largest}, "
          f"read by thread {largest % THREADS}")
    print(f"    partials     {show(partial)}   thread i: max |x| of elements i, i + {THREADS}, ...")
    width = THREADS // 2
    while width > 0:
        partial[:width] = np.maximum(partial[:width], partial[width:2 * width])
        print(f"    after w = {width}  {show(partial[:width])}")
        width //= 2
    scale = np.maximum(partial[0], ref.AMAX_FLOOR) / np.float32(127)
    print(f"    amax = partial[0] = {partial[0]:.6g}; scale = max(amax, 1e-8) / 127 = {scale:.6g}"
          f" -> fp16 {str(np.float16(scale))}; yours: {str(yours)}")


def _explain_scale(fn: Callable, case: Case) -> None:
    """Draw which thread read each element of x (yours beside the solution's; gaps: read by no
    thread of the vector's block), then print the solution's tree for the first vector whose scale
    differs (none when your kernel raised: the verdict says where)."""
    runs = launch_both(fn, scale_kernel_solution, lambda kernel: _launch_scale(kernel, case))
    if all(log is not None for _, log in runs):
        (yours, foreign), (reference, _) = (_reads_by_own_block(log) for _, log in runs)
        if foreign:
            print(f"  {foreign} reads of x came from a thread block that does not own the vector "
                  f"(block (t, h) = (blockIdx.x, blockIdx.y) owns x[t, h, :])")
        print("  the picture: a row per vector x[t, h, :]; each element shows threadIdx.x of the "
              "thread of block (t, h) that read it (grey: none did)")
        draw_accesses(yours, reference, "reads of x")
    got = runs[0][0]
    if got is None:
        return  # your kernel raised: the verdict says where
    expected = _scale_reference(**copy_args(case.kwargs))
    differs = np.argwhere(expected != got) if got.shape == expected.shape else []
    if len(differs):
        token, head = (int(i) for i in differs[0])
        _print_tree(case.kwargs["x"], token, head, got[token, head])


def _scale_case(label: str, x, random: bool = False) -> Case:
    x = np.asarray(x, np.float32)
    return Case(label, dict(x=x, scales=np.zeros(x.shape[:2], np.float16)), random=random)


def _one_vector(head_dim: int, index: int, value: float, seed: int) -> np.ndarray:
    """``[1, 1, head_dim]``: values in (-1, 1), and ``value`` (the largest |x|) at ``index``."""
    x = np.random.default_rng(seed).uniform(-1, 1, head_dim).astype(np.float32)
    x[index] = value
    return x.reshape(1, 1, head_dim)


def _scale_kernel_cases() -> list[Case]:
    """Small: the simulator runs every thread of every block as a Python thread. Each
    hand-picked case puts the largest |x| where one usual slip misses it."""
    rng = np.random.default_rng(6)
    two_heads = rng.uniform(-1, 1, (1, 2, 12)).astype(np.float32)
    two_heads[0, 0] = 0.0
    two_heads[0, 1, 9] = 3.0
    cases = [
        _scale_case("one token, one head of 16: the largest |x| is negative (-4 at index 0)",
                    _one_vector(16, 0, -4.0, seed=1)),
        _scale_case("the largest |x| at index 4: thread 4's partial, folded into partial[0] at "
                    "w = 4", _one_vector(16, 4, 2.0, seed=2)),
        _scale_case("the largest |x| at index 6: thread 6 -> partial[2] at w = 4 -> partial[0] "
                    "at w = 2", _one_vector(16, 6, -2.0, seed=3)),
        _scale_case("the largest |x| at index 1: thread 1's partial reaches partial[0] only at "
                    "the last step, w = 1", _one_vector(16, 1, 2.0, seed=4)),
        _scale_case("the largest |x| in the last element, index 15 (thread 7's second turn)",
                    _one_vector(16, 15, -2.5, seed=5)),
        _scale_case("head_dim 17, not a multiple of 8: the largest |x| in the last element, "
                    "index 16 (thread 0's third turn)", _one_vector(17, 16, 3.0, seed=6)),
        _scale_case("two heads, head 0 all zeros: its scale 1e-8 / 127 is fp16 0", two_heads),
        _scale_case("three tokens × two heads of very different size: one scale each",
                    _vectors(rng, 3, 2, 10)),
    ]
    for i in range(2):
        head_dim = int(rng.integers(THREADS + 1, 3 * THREADS))
        cases.append(_scale_case(f"random {i}", _vectors(rng, 2, 2, head_dim), random=True))
    return cases


register(Exercise(
    name="02.scale_kernel", notebook=NOTEBOOK, section="3 As a Numba CUDA kernel",
    signature="@cuda.jit\ndef scale_kernel(x, scales): ...  "
              "# grid = (num_tokens, num_kv_heads), block = THREADS threads",
    hint="block (blockIdx.x, blockIdx.y) owns x[t, h, :]; thread i: max |x| of elements i, "
         "i + THREADS, ... into partial[i]; barrier; w = THREADS // 2, ..., 1: threads i < w take "
         "max(partial[i], partial[i + w]), a barrier after each step; thread 0 stores "
         "max(partial[0], 1e-8) / 127.",
    solution=scale_kernel_solution,
    reference=_scale_reference,
    cases=_scale_kernel_cases,
    run=_run_scale,
    explain=_explain_scale,
    kernel=True,
    trace=_launch_scale,
    rtol=0.0, atol=0.0,  # the fp16 scale is exact: any difference is a different amax
))


# --- 02.fake_quant_torch: where the scale sits, in torch ---------------------------------------
#
# The cache keeps one scale per (token, KV head); §5.2 asks what other places for the scale would
# buy. The learner writes the experiment's tool as whole-tensor torch ops: quantize to int8 with
# one scale per cell of a granularity and read the values back. The whole lesson is which axes
# the amax runs over (and keepdim, so the scale broadcasts back).

def fake_quant_torch_solution(x, granularity: str):
    """x: float32 torch ``[T, Hkv, D]`` -> float32 torch, same shape: int8 codes with one scale
    per cell of ``granularity`` ("tensor", "head", "token" or "channel"), read back with the
    scale the cache would store (fp16)."""
    import torch

    dims = {"tensor": (0, 1, 2),    # one scale for everything
            "head": (0, 2),         # one per KV head, over all tokens and dims
            "token": (2,),          # one per (token, head): what the cache stores
            "channel": (0,)}[granularity]  # one per (head, dim), over all tokens (KIVI's keys)
    amax = x.abs().amax(dim=dims, keepdim=True)       # keepdim: the scale broadcasts back
    scale = amax.clamp(min=1e-8) / 127                # float32; the floor: a cell of zeros
    codes = torch.round(x / scale).clamp(-127, 127)   # torch.round: half to even
    return codes * scale.half().float()               # the stored scale is fp16


def fake_quant_torch_reference(x: np.ndarray, granularity: str) -> np.ndarray:
    """:func:`kvlab.quant_lab.fake_quant` with int8."""
    from kvlab.quant_lab import fake_quant

    return fake_quant(x, "int8", granularity)


def _run_fake_quant_torch(fn: Callable, case: Case) -> Any:
    """NumPy in for the reference; a torch tensor in for the learner's function, and its float32
    result back as NumPy."""
    if fn is fake_quant_torch_reference:
        return fn(**copy_args(case.kwargs))
    return run_torch(fn, case.kwargs, "float32", "the result", ", x's shape: the values read "
                     "back")[0]


def _explain_fake_quant(fn: Callable, case: Case) -> None:
    """Where the scale should sit, and what the learner's values are, when a known slip gives
    them: another granularity's axes, the float32 scale read back, the floor forgotten."""
    from kvlab.quant_lab import REDUCE_AXES, fake_quant

    x, granularity = case.kwargs["x"], case.kwargs["granularity"]
    try:
        got = _run_fake_quant_torch(fn, case)
    except RuntimeError as error:
        if "must match the size" in str(error):  # torch's broadcasting error
            print("  A scale reduced without keepdim=True has lost the dims it covers, so it "
                  "cannot broadcast back over x: amax(dim=..., keepdim=True).")
        return
    except Exception:
        return
    if got.shape != x.shape:
        return
    cells = tuple(1 if axis in REDUCE_AXES[granularity] else n for axis, n in enumerate(x.shape))
    print(f"  per {granularity}: amax over dims {REDUCE_AXES[granularity]} of [T, Hkv, D] = "
          f"{list(x.shape)}, one scale per cell: scales of shape {list(cells)}")
    amax = np.abs(x).max(axis=REDUCE_AXES[granularity], keepdims=True)
    scale = np.maximum(amax, np.float32(1e-8)) / np.float32(127)
    codes = np.rint(np.clip(x / scale, -127, 127))
    slips = {f"per {other}'s scales (amax over dims {axes})": fake_quant(x, "int8", other)
             for other, axes in REDUCE_AXES.items() if other != granularity}
    stored = scale.astype(np.float16)
    slips["the float32 scale read back: the cache stores it in fp16 (scale.half().float())"] = (
        codes * scale)
    slips["the product taken in fp16 (codes.half() * scale.half()): take it in float32, codes "
          "* scale.half().float()"] = (
        codes.astype(np.float16) * stored).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        from_stored = np.rint(np.clip(x / stored.astype(np.float32), -127, 127))
    slips["codes divided by the fp16 scale: divide by the float32 one (a scale of 1e-8 / 127 is "
          "0 in fp16)"] = from_stored * stored.astype(np.float32)
    slips["round half up: torch.round rounds a tie to the even code"] = (
        np.clip(np.floor(x / scale + np.float32(0.5)), -127, 127) * stored.astype(np.float32))
    with np.errstate(divide="ignore", invalid="ignore"):
        no_floor = np.rint(np.clip(x / (amax / np.float32(127)), -127, 127)) * (
            amax / np.float32(127)).astype(np.float16).astype(np.float32)
    slips["no 1e-8 floor: a cell of zeros gives 0 / 0 = NaN"] = no_floor
    expected = fake_quant(x, "int8", granularity)
    named = [slip for slip, values in slips.items()
             if np.array_equal(got, values, equal_nan=True)
             and not np.array_equal(values, expected)]
    if named:  # two slips can give the same values on a case: name them all
        print("  Yours is what you get with " + "; or with ".join(named) + ".")


def _fake_quant_cases() -> list[Case]:
    from kvlab.quant_lab import synthetic_kv

    def case(label, x, granularity, random=False):
        return Case(label, dict(x=np.asarray(x, np.float32), granularity=granularity),
                    random=random)

    k, v = synthetic_kv(6, num_kv_heads=2, head_dim=8, outlier_channels=1, seed=3)
    zero_head = k.copy()
    zero_head[:, 1] = 0.0
    one_token, _ = synthetic_kv(1, num_kv_heads=2, head_dim=8, outlier_channels=1, seed=4)
    ties = np.array([[[127.0, 0.5, 2.5, -1.5, 3.5, -0.5, 10.0, 1.0]]], np.float32)  # scale 1
    cases = [
        case("per token (what the cache stores): keys with an outlier channel", k, "token"),
        case("per channel (KIVI's keys): one scale per (head, dim), over the 6 tokens", k,
             "channel"),
        case("per head: one scale per KV head, over all tokens and dims", v, "head"),
        case("per tensor: one scale for everything", v, "tensor"),
        case("per head, head 1 all zeros: its scale is the 1e-8 floor", zero_head, "head"),
        case("per channel with a single token: each element its own scale", one_token, "channel"),
        case("exact ties (amax 127, so a scale of 1): 0.5, 2.5, -1.5 round to the even code", ties,
             "token"),
    ]
    rng = np.random.default_rng(9)
    for i in range(4):
        k, v = synthetic_kv(int(rng.integers(2, 9)), num_kv_heads=int(rng.integers(1, 4)),
                            head_dim=16, seed=20 + i)
        cases.append(case(f"random {i}", k if i % 2 else v,
                          str(rng.choice(["tensor", "head", "token", "channel"])), random=True))
    return cases


register(Exercise(
    name="02.fake_quant_torch", notebook=NOTEBOOK, section="5.2 What granularity buys",
    signature="fake_quant_torch(x, granularity) -> x_hat  # torch float32 [T, Hkv, D]; "
              "granularity: 'tensor', 'head', 'token' or 'channel'",
    hint="amax = x.abs().amax(dim=..., keepdim=True) over the dims one scale covers (token: the "
         "last; channel: the first; head: first and last; tensor: all); scale = max(amax, 1e-8) "
         "/ 127; codes = round(x / scale) clamped to ±127; read back codes * the fp16 scale.",
    solution=fake_quant_torch_solution,
    reference=fake_quant_torch_reference,
    cases=_fake_quant_cases,
    run=_run_fake_quant_torch,
    explain=_explain_fake_quant,
    rtol=0.0, atol=0.0,  # every step is one float32 operation in the reference's order
))
