"""The KV cache's storage dtypes, as a small registry the planner and caches share.

A dtype says how one (token, kv_head) vector of ``head_dim`` elements is stored: the bits of each
element, and the scales stored beside them. ``fp16`` and ``int8`` (the seed engine's ``KvFp16`` and
``KvInt8``) are registered here; later stages register more (FP8, INT4) with :func:`register`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KvDtype:
    """How one (token, kv_head) vector is stored.

    Attributes:
        name: the registry key (the seed's ``NAME``), e.g. ``"int8"``.
        bits: bits per element (16 for fp16, 8 for int8/fp8, 4 for packed int4).
        storage: NumPy dtype name of the pool's elements (``"float16"``, ``"int8"``, ``"uint8"``).
        scale_bytes: bytes per stored scale; 0 when the dtype stores no scales.
        group_size: elements sharing one scale; 0 means one scale per whole (token, kv_head) vector.
        description: one line for tables.
    """

    name: str
    bits: int
    storage: str
    scale_bytes: int = 0
    group_size: int = 0
    description: str = ""

    @property
    def bytes_per_elem(self) -> float:
        """The seed's ``BYTES_PER_ELEM`` (0.5 for a 4-bit dtype); scales not included."""
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
        description="symmetric int8, one fp16 scale per (token, kv_head)",
    )
)
