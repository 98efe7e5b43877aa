"""Quantized KV as PyTorch ops: the ops of :mod:`kvlab.ref.quant`, on MPS, CUDA or the CPU.

Each op is a few whole-tensor steps: group, ``amax``, scale, divide, round, store. Only ops MPS
supports are used (float16/float32/int32/int8/uint8; no float64), which rules out two shortcuts:

- **No FP8 dtype on MPS.** ``torch.float8_e4m3fn`` exists on the CPU and CUDA, not on Apple GPUs, so
  codes are stored as ``uint8`` and encoded and decoded by hand: the encoder reads each value's
  power of two off its float32 exponent bits (exact, unlike ``log2``), the decoder looks every
  byte up in a 256-entry table. Both agree bit for bit with ``torch.float8_e4m3fn`` (tested).
- ``torch.round`` rounds half to even, as the reference's ``np.rint`` does; ``.to(torch.int8)``
  wraps instead of saturating, so every code is clamped first.

Arguments are checked by :mod:`kvlab.checks` before anything is written. Unverified on MPS: no
machine this project is tested on has one.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from kvlab.checks import (
    check_copy_blocks_quant,
    check_dequantize,
    check_gather_kv_quant,
    check_quantize,
    check_write_kv_quant,
    raise_for_values,
)
from kvlab.dtypes import KvDtype
from kvlab.kernels.mps import require_tensors
from kvlab.kernels.mps.paging import as_words, slots_to_read, without_padding

AMAX_FLOOR = 1e-8
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "int4": 7.0}
INT4_GROUP = 32


@functools.lru_cache(maxsize=None)
def _fp8_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(steps_scale, decode)``: ``2**(3 - E)`` for E = -6 .. 8, and the float32 value of each
    of the 256 bytes (built from bit patterns, so the NaNs carry torch's own payload,
    0x7FF00000). Built once per device."""
    steps_scale = torch.tensor([2.0**(3 - e) for e in range(-6, 9)], dtype=torch.float32,
                               device=device)
    bits = np.zeros(256, dtype=np.uint32)
    for code in range(256):
        sign, exponent, mantissa = code >> 7, (code >> 3) & 15, code & 7
        if code & 0x7F == 0x7F:
            bits[code] = 0x7FF00000
        else:
            value = mantissa * 2.0**-9 if exponent == 0 else (8 + mantissa) * 2.0**(exponent - 10)
            bits[code] = np.array(value, dtype=np.float32).view(np.uint32)
        bits[code] |= sign << 31
    decode = torch.from_numpy(bits.view(np.float32).copy()).to(device)
    return steps_scale, decode


def fp8_e4m3_encode(y: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3FN bytes of ``y`` (float16 or float32, finite, |y| <= 448): as the
    reference's."""
    steps_scale, _ = _fp8_tables(y.device)
    magnitude = y.float().abs()  # float32: the exponent is read from its bits below
    # floor(log2) + 6, at least 0: read off the float32's exponent field (bits 23-30, bias 127),
    # exact for every float32; a zero or a subnormal reads -127 and is raised to -6
    exponent_index = ((magnitude.view(torch.int32) >> 23) - 127).clamp(-6, 8) + 6
    steps = torch.round(magnitude * steps_scale[exponent_index]).to(torch.int32)
    code = exponent_index * 8 + steps + 128 * torch.signbit(y).to(torch.int32)
    return code.to(torch.uint8)


def fp8_e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 value of each uint8 E4M3FN byte: a table lookup."""
    _, decode = _fp8_tables(codes.device)
    return decode[codes.long()]


def _check_values(name: str, x: torch.Tensor, dt) -> None:
    """ValueError (nothing written) if x holds NaN, inf or |x| > dt.max_input; reads back 1 bool."""
    if not bool((x.float().abs() <= dt.max_input).all()):
        raise_for_values(name, x.detach().cpu().numpy(), dt)


def check_values(x: torch.Tensor, kv_dtype: str, name: str = "x") -> None:
    """ValueError unless ``kv_dtype`` can store every value of ``x`` (float16/float32
    ``[T, Hkv, D]``): no NaN, no inf, no ``|x|`` past the dtype's limit (``qmax * 65504``, where
    the fp16 scale overflows). The message calls the array ``name`` and gives its first bad
    element. What quantize and write_kv_quant run first; a cache that writes several layers calls
    it on every layer before it writes any. On x's device, one bool read back."""
    require_tensors(x=x)
    _check_values(name, x, check_quantize(x, kv_dtype, name))


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    num_tokens, num_kv_heads, head_dim = x.shape
    group = group or head_dim
    return x.reshape(num_tokens, num_kv_heads, head_dim // group, group)


def quantize(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of x; as :func:`kvlab.ref.quant.quantize` (tensors on x's device)."""
    require_tensors(x=x)
    dt = check_quantize(x, kv_dtype)
    _check_values("x", x, dt)
    return quantize_checked(x, dt)


def quantize_checked(x: torch.Tensor, dt: KvDtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` of an x whose shape and values are already checked (a write's K and V:
    their values are checked once, before anything is written, not again per step)."""
    kv_dtype = dt.name
    groups = _grouped(x.float(), dt.group_size)                     # [T, H, G, group]
    floor = torch.tensor(AMAX_FLOOR, dtype=torch.float32, device=x.device)
    scale = torch.maximum(groups.abs().amax(-1), floor) / QMAX[kv_dtype]  # [T, H, G] float32
    y = torch.clamp(groups / scale.unsqueeze(-1), -QMAX[kv_dtype], QMAX[kv_dtype])
    if kv_dtype == "fp8_e4m3":
        codes = fp8_e4m3_encode(y).reshape(x.shape)
    else:
        codes = torch.round(y).to(torch.int8).reshape(x.shape)
    scales = scale.to(torch.float16)
    if kv_dtype == "int4":
        nibbles = codes.to(torch.int32) & 0xF
        return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8), scales
    return codes, scales[..., 0]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """float32 ``[T, Hkv, D]``; as :func:`kvlab.ref.quant.dequantize`."""
    require_tensors(codes=codes, scales=scales)
    dt = check_dequantize(codes, scales, kv_dtype)
    if kv_dtype == "int4":
        packed = codes.to(torch.int32)
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)
        values = torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.float32)
        grouped = _grouped(values, dt.group_size) * scales.float().unsqueeze(-1)
        return grouped.reshape(values.shape)
    values = fp8_e4m3_decode(codes) if kv_dtype == "fp8_e4m3" else codes.to(torch.float32)
    return values * scales.float().unsqueeze(-1)


def _rows(pool: torch.Tensor) -> torch.Tensor:
    """A pool ``[num_blocks, block_size, ...]`` as one row per slot (a view)."""
    return pool.view(-1, *pool.shape[2:])


def write_kv_quant(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   k_scales: torch.Tensor, v_scales: torch.Tensor, slots: torch.Tensor,
                   kv_dtype: str) -> None:
    """Quantize K and V into slots ``slots[t]`` of a quantized pool, in place; slot < 0 skipped.

    Parameters as :func:`kvlab.ref.quant.write_kv_quant` (tensors on one device).
    """
    require_tensors(k=k, v=v, k_pool=k_pool, v_pool=v_pool, k_scales=k_scales, v_scales=v_scales,
                    slots=slots)
    dt = check_write_kv_quant(k, v, k_pool, v_pool, k_scales, v_scales, slots, kv_dtype)
    _check_values("k", k, dt)
    _check_values("v", v, dt)
    rows, k, v = without_padding(slots, k, v)
    for x, pool, scale_pool in ((k, k_pool, k_scales), (v, v_pool, v_scales)):
        codes, scales = quantize_checked(x, dt)
        _rows(pool).index_copy_(0, rows, codes)
        _rows(scale_pool).index_copy_(0, rows, scales)


def gather_kv_quant(k_pool: torch.Tensor, v_pool: torch.Tensor, k_scales: torch.Tensor,
                    v_scales: torch.Tensor, block_table: torch.Tensor,
                    context_len: int | torch.Tensor, kv_dtype: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences' K and V dequantized to float32 ``[sum(len), Hkv, D]``; as
    :func:`kvlab.ref.quant.gather_kv_quant`."""
    require_tensors(k_pool=k_pool, v_pool=v_pool, k_scales=k_scales, v_scales=v_scales,
                    block_table=block_table, context_len=context_len)
    table, context_lens = check_gather_kv_quant(k_pool, v_pool, k_scales, v_scales, block_table,
                                                context_len, kv_dtype)
    slots = slots_to_read(table, context_lens, k_pool.shape[1], k_pool.device)
    return tuple(dequantize(_rows(pool).index_select(0, slots),
                            _rows(scales).index_select(0, slots), kv_dtype)
                 for pool, scales in ((k_pool, k_scales), (v_pool, v_scales)))


def copy_blocks_quant(k_pool: torch.Tensor, v_pool: torch.Tensor, k_scales: torch.Tensor,
                      v_scales: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                      kv_dtype: str) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` of a quantized pool, codes and scales, in place."""
    require_tensors(k_pool=k_pool, v_pool=v_pool, k_scales=k_scales, v_scales=v_scales, src=src,
                    dst=dst)
    check_copy_blocks_quant(k_pool, v_pool, k_scales, v_scales, src, dst, kv_dtype)
    src, dst = src.long(), dst.long()
    for pool in map(as_words, (k_pool, v_pool, k_scales, v_scales)):
        pool.index_copy_(0, dst, pool.index_select(0, src))
