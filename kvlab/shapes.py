"""Attention shapes of real models: what decides how many bytes a KV cache costs.

``ModelShape`` holds the numbers of a model's config that the KV cache depends on; the real ones
live in ``data/models.json`` (sources in ``data/README.md``) and load by name::

    >>> from kvlab.shapes import get_model
    >>> get_model("qwen3-8b").num_kv_heads
    8
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

from kvlab.data import load_json

_WEIGHT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder's attention, as its config states it.

    Attributes:
        name: kvlab's key, e.g. ``"qwen3-8b"``; ``hf_id`` is where the config comes from.
        num_layers: decoder layers, each with its own K and V cache.
        num_q_heads, num_kv_heads: query heads and key/value heads (GQA when fewer KV heads;
            ``num_q_heads % num_kv_heads == 0``).
        head_dim: elements per head vector.
        hidden_size: model width (for reference; the cache does not depend on it).
        rope_theta, rotary_dim: RoPE base and how many dims of each head rotate.
        qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3).
        max_positions: the longest context the config allows.
        sliding_window, num_sliding_layers: layers that attend only to the last ``sliding_window``
            tokens (0 and 0 when every layer attends to everything).
        num_params, weight_dtype: parameter count and dtype of the released weights.
    """

    name: str
    hf_id: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rope_theta: float
    rotary_dim: int
    qk_norm: bool
    max_positions: int
    sliding_window: int
    num_sliding_layers: int
    num_params: int
    weight_dtype: str

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{self.name}: {name} must be a positive int, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_q_heads ({self.num_q_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"{self.name}: rotary_dim must be even and in (0, head_dim]")
        if not 0 <= self.num_sliding_layers <= self.num_layers:
            raise ValueError(f"{self.name}: num_sliding_layers must be in [0, num_layers]")
        if (self.sliding_window == 0) != (self.num_sliding_layers == 0):
            raise ValueError(f"{self.name}: sliding_window and num_sliding_layers go together")
        if self.weight_dtype not in _WEIGHT_BYTES:
            raise ValueError(f"{self.name}: weight_dtype must be one of {sorted(_WEIGHT_BYTES)}")

    @property
    def gqa_group(self) -> int:
        """Query heads that share one KV head (1 = MHA, num_q_heads = MQA)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def weight_bytes(self) -> int:
        """Bytes the released weights occupy in their own dtype."""
        return self.num_params * _WEIGHT_BYTES[self.weight_dtype]

    @classmethod
    def from_dict(cls, entry: dict) -> "ModelShape":
        """Build from one ``data/models.json`` entry; unknown or missing keys are errors."""
        names = {f.name for f in fields(cls)}
        unknown, missing = set(entry) - names, names - set(entry)
        if unknown or missing:
            raise ValueError(
                f"model entry {entry.get('name', '?')!r}: unknown keys {sorted(unknown)}, "
                f"missing keys {sorted(missing)}"
            )
        return cls(**entry)


@lru_cache(maxsize=1)
def _models() -> dict[str, ModelShape]:
    return {e["name"]: ModelShape.from_dict(e) for e in load_json("models.json")["models"]}


def list_models() -> list[str]:
    """Names of the models in ``data/models.json``."""
    return list(_models())


def get_model(name: str) -> ModelShape:
    """The :class:`ModelShape` called ``name``; an unknown name lists the known ones."""
    models = _models()
    if name not in models:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(models)}")
    return models[name]
