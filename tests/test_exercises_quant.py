"""Wrong answers the 02 (quantization) checkers must reject (gathered by tests/test_exercises.py),
and the hand-picked cases checked against numbers worked out by hand."""
import numpy as np

from kvlab.exercises import get


def one_scale_per_tensor(x):
    """Takes amax over the whole tensor: small vectors lose every bit."""
    scale = np.maximum(np.abs(x).max(), np.float32(1e-8)) / np.float32(127)
    codes = np.rint(np.clip(x / scale, -127, 127)).astype(np.int8)
    return codes, np.full(x.shape[:2], scale, np.float16)


def rounds_half_away_from_zero(x):
    """Rounds 0.5 to 1 and 2.5 to 3 (school rounding), not half to even."""
    scale = np.maximum(np.abs(x).max(-1), np.float32(1e-8)) / np.float32(127)
    y = np.clip(x / scale[..., None], -127, 127)
    return np.trunc(y + np.copysign(0.5, y)).astype(np.int8), scale.astype(np.float16)


def codes_from_the_fp16_scale(x):
    """Divides by the stored fp16 scale: the codes the rule asks for come from the float32 one."""
    scale16 = (np.maximum(np.abs(x).max(-1), np.float32(1e-8)) / np.float32(127)).astype(np.float16)
    y = x / scale16.astype(np.float32)[..., None]
    return np.rint(np.clip(y, -127, 127)).astype(np.int8), scale16


def drops_the_floor(x):
    """scale = amax / 127 with no 1e-8 floor: a vector under the floor gets codes up to 127 (and an
    all-zero one divides 0 by 0); both store an fp16 scale of 0, so only the codes tell."""
    scale = np.abs(x).max(-1) / np.float32(127)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.nan_to_num(x / scale[..., None])
    return np.rint(np.clip(y, -127, 127)).astype(np.int8), scale.astype(np.float16)


def keeps_float32_scales(x):
    """Returns the float32 scales: the cache stores them as fp16."""
    scale = np.maximum(np.abs(x).max(-1), np.float32(1e-8)) / np.float32(127)
    return np.rint(np.clip(x / scale[..., None], -127, 127)).astype(np.int8), scale


def dequantizes_in_fp16(codes, scales):
    """Multiplies in float16: the product is rounded to 11 bits."""
    return (codes.astype(np.float16) * scales[..., None]).astype(np.float32)


def forgets_to_broadcast(codes, scales):
    """code * scale without [..., None]: right only when there is one (token, head)."""
    return codes.astype(np.float32) * scales.astype(np.float32)


def _fp8(value, *, bias=7, largest=448.0, subnormals=True, saturate=True, rounding=round):
    """An E4M3 encoder with one rule changeable at a time."""
    sign = 0x80 if value < 0 else 0
    magnitude = min(abs(value), largest) if saturate else abs(value)
    lowest = 1 - bias
    if magnitude < 2.0 ** lowest and not subnormals:
        return sign
    exponent = lowest
    while magnitude >= 2.0 ** (exponent + 1):
        exponent += 1
    return (sign | ((exponent - lowest) * 8 + rounding(magnitude / 2.0 ** (exponent - 3)))) & 0xFF


def fp8_flushes_subnormals(value):
    """Sends everything below 2**-6 to zero."""
    return _fp8(value, subnormals=False)


def fp8_rounds_half_up(value):
    """Rounds a mantissa tie up (17 -> 18), not to even."""
    return _fp8(value, rounding=lambda q: int(np.floor(q + 0.5)))


def fp8_does_not_saturate(value):
    """Lets 1000 run past the largest exponent (the byte wraps)."""
    return _fp8(value, saturate=False)


def fp8_uses_the_fnuz_bias(value):
    """AMD's float8_e4m3fnuz: bias 8, largest 240."""
    return _fp8(value, bias=8, largest=240.0)


WRONG_ANSWERS = {
    "02.quantize_int8": [one_scale_per_tensor, rounds_half_away_from_zero,
                         codes_from_the_fp16_scale, keeps_float32_scales, drops_the_floor],
    "02.dequantize_int8": [dequantizes_in_fp16, forgets_to_broadcast],
    "02.fp8_e4m3_encode": [fp8_flushes_subnormals, fp8_rounds_half_up, fp8_does_not_saturate,
                           fp8_uses_the_fnuz_bias],
}


def test_the_notebook_examples_by_hand():
    ex = get("02.quantize_int8")
    codes, scales = ex.solution(np.array([[[0.9, -2.54, 0.01, 1.27, -0.635, 0.0, 2.54, 0.3175]]],
                                         np.float32))
    assert codes.tolist() == [[[45, -127, 0, 64, -32, 0, 127, 16]]]
    assert scales.dtype == np.float16 and scales[0, 0] == np.float16(0.02)
    ties, _ = ex.solution(np.array([[[127, 0.5, 1.5, 2.5, -2.5, -0.5]]], np.float32))
    assert ties.tolist() == [[[127, 0, 2, 2, -2, 0]]]
    assert ex.solution(np.array([[[3.0, 1.0, -1.5, 0.0]]], np.float32))[0][0, 0, 1] == 42


def test_fp8_bytes_by_hand():
    encode = get("02.fp8_e4m3_encode").solution
    by_hand = {1.0: 0x38, -2.0: 0xC0, 17.0: 0x58, 15.9: 0x58, 448.0: 0x7E, 1000.0: 0x7E,
               -465.0: 0xFE, 2.0 ** -6: 0x08, 2.0 ** -9: 0x01, 2.0 ** -10: 0x00, 0.0155: 0x08,
               0.0: 0x00}
    assert {v: encode(v) for v in by_hand} == by_hand


def test_every_fp8_code_round_trips_through_the_solution():
    from kvlab.ref.quant import fp8_e4m3_decode

    encode = get("02.fp8_e4m3_encode").solution
    for byte in range(256):
        if byte & 0x7F == 0x7F or byte == 0x80:  # NaN, and -0.0 (its sign: not asked for)
            continue
        assert encode(float(fp8_e4m3_decode(np.uint8(byte)))) == byte
