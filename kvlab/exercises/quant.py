"""Exercises of notebook 02 (quantization): the INT8 cache's scale rule, and one FP8 byte by hand.

Each exercise is checked against :mod:`kvlab.ref.quant`, on edge cases (an all-zero vector, whose
scale is the 1e-8 floor, and a vector under the floor, whose codes stay small) and on cases picked so that the usual slips fail: exact ties (round half to
even), vectors of very different size (one scale per (token, KV head), not per tensor), codes from
the fp16 scale instead of the float32 one, fp16 arithmetic where float32 is meant, and FP8 values in
the subnormal range, on a mantissa tie, and past 448 (saturation).
"""
from __future__ import annotations

import numpy as np

from kvlab.exercises.core import Case, Exercise, register
from kvlab.ref import quant as ref

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
    rtol=0.0, atol=0.0,  # code * fp16(scale) is exact in float32
))


# --- 02.fp8_e4m3_encode ---------------------------------------------------------------------------

def fp8_e4m3_encode_solution(value: float) -> int:
    """The E4M3FN byte (an int 0..255) nearest to ``value``, rounding half to even; |value| > 448
    saturates to ±448. ``value`` is a finite float."""
    sign = 0x80 if value < 0 else 0
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
