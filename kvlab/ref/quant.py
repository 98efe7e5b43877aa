"""Quantized KV, NumPy reference: int8 and FP8 E4M3 with per-(token, kv_head) scales, and int4.

One symmetric rule serves every scaled dtype; only the largest code ``qmax`` and the encoder
change (docs/design.md#conventions; ferrum's ``KvInt8``)::

    amax  = max |x|  over the scale's elements      (one (token, kv_head) vector; int4: 32 of it)
    scale = max(amax, 1e-8) / qmax                  float32; qmax = 127 (int8), 448 (fp8), 7 (int4)
    code  = encode(clip(x / scale, -qmax, qmax))    int8/int4: round half to even; fp8: E4M3FN RNE
    store code and fp16(scale)
    x'    = decode(code) * float32(fp16(scale))     dequantization reads the *stored* fp16 scale

The codes are computed with the float32 scale and read back with its fp16 rounding, as ferrum's
CUDA path does: the 1e-8 floor then keeps ``x / scale`` finite even for an all-zero vector (whose
fp16 scale underflows to 0 and dequantizes to exact zeros). So for int8 and int4 the round-trip
error per element is at most ``scale / 2`` (rounding) plus ``qmax * |scale - fp16(scale)|`` (the
scale's own rounding); fp8 rounds to 3 mantissa bits instead, a relative error (tests state it).

Arrays (token-first, docs/design.md#conventions)::

    x                      [T, num_kv_heads, head_dim]              float16 or float32
    int8 codes / scales    [T, Hkv, head_dim] int8   / [T, Hkv] float16
    fp8  codes / scales    [T, Hkv, head_dim] uint8  / [T, Hkv] float16    (E4M3FN bit patterns)
    int4 codes / scales    [T, Hkv, head_dim/2] uint8 / [T, Hkv, head_dim/32] float16
    quantized pools        k_pool, v_pool [num_blocks, block_size, Hkv, head_dim] int8 or uint8
                           k_scales, v_scales [num_blocks, block_size, Hkv] float16 (the KvScales)

**Inputs a dtype cannot store** — NaN, ±inf, or |x| > ``qmax * 65504`` (its fp16 scale would
overflow) — raise ValueError before anything is written: a quantized cache never holds a silent NaN.
fp16 inputs (|x| <= 65504) are always in range; float32 ones may not be.

Depends on NumPy alone. Arguments are checked by :mod:`kvlab.checks` before anything is written.
"""
from __future__ import annotations

import numpy as np

from kvlab.checks import (
    check_copy_blocks_quant,
    check_dequantize,
    check_gather_kv_quant,
    check_quantize,
    check_write_kv_quant,
    raise_for_values,
)
from kvlab.ref.paging import gathered_slots

AMAX_FLOOR = np.float32(1e-8)  # ferrum's floor: an all-zero vector still gets a finite scale
FP8_MAX = 448.0                # the largest finite E4M3FN value, S.1111.110 = 1.75 * 2**8
INT4_GROUP = 32                # int4 elements per scale
# The float32 NaN an E4M3FN NaN widens to, as torch does: the byte's mantissa bits 111 move to the
# top of float32's mantissa (0x7FF00000), not numpy's default quiet NaN (0x7FC00000).
FP8_NAN = np.array(0x7FF00000, dtype=np.uint32).view(np.float32)


# --- FP8 E4M3FN, bit by bit ---------------------------------------------------------------------
#
#   bit    7   6 5 4 3   2 1 0
#          S   E E E E   M M M        bias 7, no infinities, NaN = S.1111.111 (0x7F, 0xFF)
#   E = 0:      (-1)^S * M/8 * 2**-6          subnormals, steps of 2**-9
#   E = 1..15:  (-1)^S * (1 + M/8) * 2**(E-7) normals, largest 1.75 * 2**8 = 448 (E=15, M=6)

def fp8_e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """The float32 value of each E4M3FN byte (uint8 array, any shape); 0x7F and 0xFF are NaN.

    Bit-exact (NaN payloads included) with ``torch.tensor(codes).view(torch.float8_e4m3fn).float()`` for all 256 codes.
    """
    c = np.asarray(codes, dtype=np.uint8).astype(np.int32)
    exponent, mantissa = (c >> 3) & 0xF, c & 0x7
    magnitude = np.where(exponent == 0,
                         np.ldexp(mantissa.astype(np.float32), -9),                  # subnormal
                         np.ldexp((8 + mantissa).astype(np.float32), exponent - 10))  # normal
    magnitude = np.where((c & 0x7F) == 0x7F, FP8_NAN, magnitude)  # S.1111.111
    return np.where(c >> 7, -magnitude, magnitude).astype(np.float32)  # 0xFF is NaN with sign set


def fp8_e4m3_encode(x: np.ndarray) -> np.ndarray:
    """The nearest E4M3FN byte of each float (uint8, same shape), rounding half to even.

    Matches ``torch.Tensor.to(torch.float8_e4m3fn)`` (torch 2.13) bit for bit: |x| beyond 448,
    and ±inf, **saturate** to ±448 (0x7E / 0xFE); NaN encodes as 0x7F with x's sign bit.

    How: write ``|x| = q * 2**(E-3)`` with E = floor(log2|x|) (at least -6, the subnormal
    exponent), so q in [8, 16) holds the implicit 1 and the 3 mantissa bits. Then the byte is
    ``(E + 6) * 8 + round(q)``: a q that rounds up to 16 carries into the exponent field by itself,
    and for E = -6 the same sum gives the subnormal codes 0..8.
    """
    x = np.asarray(x, dtype=np.float32)
    nan = np.isnan(x)
    magnitude = np.minimum(np.abs(np.where(nan, 0, x)), np.float32(FP8_MAX))  # saturate
    _, exp2 = np.frexp(magnitude)                          # magnitude = m * 2**exp2, m in [0.5, 1)
    exponent = np.where(magnitude < 2.0**-6, -6, exp2 - 1)  # floor(log2), at least -6
    steps = np.rint(np.ldexp(magnitude, 3 - exponent))     # q: exact scaling, then RNE
    code = np.where(nan, 0x7F, (exponent + 6) * 8 + steps)
    return (code.astype(np.int32) | (np.signbit(x).astype(np.int32) << 7)).astype(np.uint8)


# --- int4: two codes per byte -------------------------------------------------------------------

def pack_int4(q: np.ndarray) -> np.ndarray:
    """int codes in [-8, 7], ``[..., 2n]`` -> uint8 ``[..., n]``: element 2j in the low nibble,
    2j+1 in the high one, each as a 4-bit two's complement number."""
    nibbles = np.asarray(q).astype(np.int32) & 0xF
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[..., n]`` -> int8 codes ``[..., 2n]`` (the inverse of :func:`pack_int4`)."""
    p = np.asarray(packed).astype(np.int32)
    nibbles = np.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)  # sign-extend


# --- the one rule, on already-grouped data ----------------------------------------------------

def symmetric_scale(amax: np.ndarray, qmax: float) -> np.ndarray:
    """``max(amax, 1e-8) / qmax`` in float32: the scale that maps ``amax`` to the largest code."""
    return np.maximum(np.asarray(amax, np.float32), AMAX_FLOOR) / np.float32(qmax)


def encode(y: np.ndarray, kv_dtype: str) -> np.ndarray:
    """Codes of already-scaled values ``y = x / scale`` (float32): clip to ±qmax, then round.
    int8 -> int8; int4 -> int8 in [-7, 7] (unpacked); fp8_e4m3 -> uint8 E4M3FN bytes."""
    if kv_dtype == "fp8_e4m3":
        return fp8_e4m3_encode(np.clip(y, -FP8_MAX, FP8_MAX))
    qmax = 127 if kv_dtype == "int8" else 7
    return np.rint(np.clip(y, -qmax, qmax)).astype(np.int8)  # np.rint: round half to even


def decode(codes: np.ndarray, kv_dtype: str) -> np.ndarray:
    """float32 values of codes from :func:`encode` (not yet multiplied by the scale)."""
    if kv_dtype == "fp8_e4m3":
        return fp8_e4m3_decode(codes)
    return np.asarray(codes).astype(np.float32)


def _qmax(kv_dtype: str) -> float:
    return {"int8": 127.0, "fp8_e4m3": FP8_MAX, "int4": 7.0}[kv_dtype]


def _grouped(x: np.ndarray, group: int) -> np.ndarray:
    """``[T, H, D]`` -> ``[T, H, D // group, group]`` (group 0: the whole vector is one group)."""
    num_tokens, num_kv_heads, head_dim = x.shape
    group = group or head_dim
    return x.reshape(num_tokens, num_kv_heads, head_dim // group, group)


def _check_values(name: str, x: np.ndarray, dt) -> None:
    """ValueError if x holds NaN, inf or a value whose fp16 scale would overflow."""
    if not (np.abs(x.astype(np.float32)) <= dt.max_input).all():
        raise_for_values(name, x, dt)


def check_values(x: np.ndarray, kv_dtype: str, name: str = "x") -> None:
    """ValueError unless ``kv_dtype`` can store every value of ``x`` (float16/float32
    ``[T, Hkv, D]``): no NaN, no inf, no ``|x|`` past the dtype's limit (``qmax * 65504``, where
    the fp16 scale overflows). The message calls the array ``name`` and gives its first bad
    element. What quantize and write_kv_quant run first; a cache that writes several layers calls
    it on every layer before it writes any."""
    _check_values(name, x, check_quantize(x, kv_dtype, name))


# --- the ops ------------------------------------------------------------------------------------

def quantize(x: np.ndarray, kv_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``x`` ``[T, num_kv_heads, head_dim]`` (float16/float32) to ``(codes, scales)``.

    kv_dtype ``"int8"``: codes int8 ``[T, Hkv, D]``, scales fp16 ``[T, Hkv]``;
    ``"fp8_e4m3"``: codes uint8 E4M3FN ``[T, Hkv, D]``, scales fp16 ``[T, Hkv]``;
    ``"int4"``: codes uint8 ``[T, Hkv, D/2]`` (two per byte), scales fp16 ``[T, Hkv, D/32]``.
    Raises ValueError for NaN/inf or too-large values (see the module notes).
    """
    dt = check_quantize(x, kv_dtype)
    _check_values("x", x, dt)
    groups = _grouped(x.astype(np.float32), dt.group_size)      # [T, H, G, group]
    scale = symmetric_scale(np.abs(groups).max(axis=-1, initial=0), dt.qmax)  # [T, H, G]
    codes = encode(groups / scale[..., None], kv_dtype).reshape(x.shape)
    scales = scale.astype(np.float16)
    if kv_dtype == "int4":
        return pack_int4(codes), scales
    return codes, scales[..., 0]  # one group per vector: [T, H]


def dequantize(codes: np.ndarray, scales: np.ndarray, kv_dtype: str) -> np.ndarray:
    """float32 ``[T, Hkv, D]`` from ``(codes, scales)`` as :func:`quantize` returns them:
    ``decode(code) * float32(scale)``, the stored fp16 scale (an exact product in float32)."""
    dt = check_dequantize(codes, scales, kv_dtype)
    if kv_dtype == "int4":
        values = unpack_int4(codes).astype(np.float32)
        grouped = _grouped(values, dt.group_size) * scales.astype(np.float32)[..., None]
        return grouped.reshape(values.shape)
    return decode(codes, kv_dtype) * scales.astype(np.float32)[..., None]


def write_kv_quant(k: np.ndarray, v: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray,
                   k_scales: np.ndarray, v_scales: np.ndarray, slots: np.ndarray,
                   kv_dtype: str) -> None:
    """Quantize token t's K and V and store them in slot ``slots[t]`` (in place), the codes in
    the pools and their scales in the scale pools; a negative slot is skipped.

    k, v: ``[T, Hkv, D]`` float16/float32. k_pool, v_pool: ``[num_blocks, block_size, Hkv, D]``
    int8 (kv_dtype ``"int8"``) or uint8 (``"fp8_e4m3"``). k_scales, v_scales: fp16
    ``[num_blocks, block_size, Hkv]``. slots: int32 ``[T]`` (see ``kvlab.ref.paging``).
    What lands in a slot is exactly ``quantize(k[t:t+1], kv_dtype)``.
    """
    dt = check_write_kv_quant(k, v, k_pool, v_pool, k_scales, v_scales, slots, kv_dtype)
    _check_values("k", k, dt)
    _check_values("v", v, dt)
    real = slots >= 0
    blocks, offsets = np.divmod(slots[real], k_pool.shape[1])
    for x, pool, scale_pool in ((k, k_pool, k_scales), (v, v_pool, v_scales)):
        codes, scales = quantize(x[real], kv_dtype)
        pool[blocks, offsets] = codes
        scale_pool[blocks, offsets] = scales


def gather_kv_quant(k_pool: np.ndarray, v_pool: np.ndarray, k_scales: np.ndarray,
                    v_scales: np.ndarray, block_table: np.ndarray, context_len: int | np.ndarray,
                    kv_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Sequences' K and V, dequantized to float32 ``[sum(context_len), Hkv, D]``, in position
    order: ``kvlab.ref.paging.gather_kv`` over a quantized pool (same table/length arguments)."""
    table, context_lens = check_gather_kv_quant(k_pool, v_pool, k_scales, v_scales, block_table,
                                                context_len, kv_dtype)
    block_size = k_pool.shape[1]
    slots = gathered_slots(table, context_lens, block_size)
    blocks, offsets = np.divmod(slots, block_size)
    return (dequantize(k_pool[blocks, offsets], k_scales[blocks, offsets], kv_dtype),
            dequantize(v_pool[blocks, offsets], v_scales[blocks, offsets], kv_dtype))


def copy_blocks_quant(k_pool: np.ndarray, v_pool: np.ndarray, k_scales: np.ndarray,
                      v_scales: np.ndarray, src: np.ndarray, dst: np.ndarray,
                      kv_dtype: str) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` of a quantized pool, codes and scales (in place):
    copy-on-write, as ``kvlab.ref.paging.copy_blocks``."""
    check_copy_blocks_quant(k_pool, v_pool, k_scales, v_scales, src, dst, kv_dtype)
    for pool in (k_pool, v_pool, k_scales, v_scales):
        pool[dst] = pool[src]
