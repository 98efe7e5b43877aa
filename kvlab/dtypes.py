"""The KV cache's storage dtypes, as a small registry the planner and caches share.

A dtype says how one (token, kv_head) vector of ``head_dim`` elements is stored: the bits of each
element, and the scales stored beside them. Four are registered here (notebook 02 builds them):

| name       | element                          | scales (fp16)                  | B per vector of 128 |
|------------|----------------------------------|--------------------------------|---------------------|
| ``fp16``     | IEEE half                        | none                           | 256                 |
| ``int8``     | symmetric int8, codes -127..127  | one per (token, kv_head)       | 130                 |
| ``fp8_e4m3`` | OCP E4M3FN byte (max 448)        | one per (token, kv_head)       | 130                 |
| ``int4``     | symmetric int4, -7..7, two a byte | one per group of 32 elements   | 64 + 8 = 72         |

``fp16`` and ``int8`` are ferrum's ``KvFp16`` and ``KvInt8`` (its ``KvScales`` are the int8
scale pools, ``[num_blocks, block_size, num_kv_heads]`` fp16). Every scaled dtype uses the same
symmetric rule with its own largest code ``qmax`` (127, 448, 7)::

    scale = max(amax, 1e-8) / qmax        (float32; amax = max |x| over the scale's elements)
    code  = encode(clip(x / scale, -qmax, qmax))      round half to even (int8, int4; fp8 RNE)
    store fp16(scale);   x' = decode(code) * float32(fp16(scale))

**FP8 is scaled too** (a decision, see docs/ops.md): an unscaled E4M3 byte would flush every
|x| <= 2^-10 to zero and keep only 3 mantissa bits, so kvlab stores the same per-(token, kv_head) fp16
scale as int8 (``scale = amax / 448``), in the same scale pools. vLLM's ``fp8_e4m3`` KV cache uses a
per-tensor scale instead; notebook 02 measures both granularities.

**Two FP8 E4M3 formats trip people.** OCP "E4M3FN" (``torch.float8_e4m3fn``, NVIDIA Hopper/Ada,
what kvlab uses) has exponent bias 7, no infinities, NaN = ``S.1111.111`` and max 448. AMD MI300's
"E4M3FNUZ" (``torch.float8_e4m3fnuz``) has bias 8, a single NaN at ``0x80`` (no negative zero) and
max **240**: the same byte means half the value, and a scale computed for 448 overflows it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KvDtype:
    """How one (token, kv_head) vector is stored.

    Attributes:
        name: the registry key (ferrum's ``NAME``), e.g. ``"int8"``.
        bits: bits per element (16 for fp16, 8 for int8/fp8, 4 for packed int4).
        storage: NumPy dtype name of the pool's elements (``"float16"``, ``"int8"``, ``"uint8"``).
        scale_bytes: bytes per stored scale; 0 when the dtype stores no scales.
        group_size: elements sharing one scale; 0 means one scale per whole (token, kv_head) vector.
        description: one line for tables.
        qmax: the largest code magnitude of a scaled dtype (``scale = amax / qmax``): 127 (int8),
            448 (fp8_e4m3), 7 (int4); 0 for unscaled dtypes.
    """

    name: str
    bits: int
    storage: str
    scale_bytes: int = 0
    group_size: int = 0
    description: str = ""
    qmax: float = 0

    @property
    def is_scaled(self) -> bool:
        """True when codes are stored with fp16 scales (int8, fp8_e4m3, int4)."""
        return self.scale_bytes > 0

    @property
    def max_input(self) -> float:
        """The largest |x| a scaled dtype accepts: ``qmax * 65504``. Beyond it the scale
        ``amax / qmax`` would overflow fp16 (max 65504) and be stored as inf. Unscaled fp16: 65504.
        (fp16 inputs never reach it; float32 inputs can, and are rejected with a ValueError.)"""
        return float(self.qmax * 65504 if self.is_scaled else 65504)

    @property
    def bytes_per_elem(self) -> float:
        """ferrum's ``BYTES_PER_ELEM`` (0.5 for a 4-bit dtype); scales not included."""
        return self.bits / 8

    def scales_per_vector(self, head_dim: int) -> int:
        """Scales stored per (token, kv_head) vector of ``head_dim`` elements."""
        if self.scale_bytes == 0:
            return 0
        return 1 if self.group_size == 0 else math.ceil(head_dim / self.group_size)

    def bytes_per_vector(self, head_dim: int) -> int:
        """Bytes one (token, kv_head) vector costs, scales included."""
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        data_bits = head_dim * self.bits
        if data_bits % 8:
            raise ValueError(f"{self.name}: head_dim {head_dim} does not fill whole bytes")
        return data_bits // 8 + self.scales_per_vector(head_dim) * self.scale_bytes


_REGISTRY: dict[str, KvDtype] = {}


def register(dtype: KvDtype) -> KvDtype:
    """Add ``dtype`` to the registry (a name may be registered once)."""
    if dtype.name in _REGISTRY and _REGISTRY[dtype.name] != dtype:
        raise ValueError(f"a different KV dtype is already registered as {dtype.name!r}")
    _REGISTRY[dtype.name] = dtype
    return dtype


def get_dtype(name: str) -> KvDtype:
    """The registered :class:`KvDtype` called ``name``; an unknown name lists the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown KV dtype {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def list_dtypes() -> list[str]:
    return list(_REGISTRY)


FP16 = register(KvDtype("fp16", bits=16, storage="float16", description="IEEE half, no scales"))
INT8 = register(
    KvDtype(
        "int8", bits=8, storage="int8", scale_bytes=2, group_size=0,
        description="symmetric int8, one fp16 scale per (token, kv_head)", qmax=127,
    )
)
FP8_E4M3 = register(
    KvDtype(
        "fp8_e4m3", bits=8, storage="uint8", scale_bytes=2, group_size=0,
        description="OCP E4M3FN byte (max 448), one fp16 scale per (token, kv_head)", qmax=448,
    )
)
INT4 = register(
    KvDtype(
        "int4", bits=4, storage="uint8", scale_bytes=2, group_size=32,
        description="symmetric int4 packed two per byte, one fp16 scale per 32 elements", qmax=7,
    )
)
