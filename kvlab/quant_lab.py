"""The granularity lab of notebook 02: which scale layout, and which dtype, costs how much accuracy.

The cache stores one scale per (token, kv_head) (``kvlab.ref.quant``). This module asks what other
layouts would do, on the same data, with the same symmetric rule (``scale = amax / qmax``, stored
fp16, codes rounded half to even):

| granularity | one scale per              | amax taken over         | used by                         |
|-------------|----------------------------|-------------------------|---------------------------------|
| ``tensor``  | whole K (or V) tensor      | every element           | vLLM's fp8 KV cache (k_scale)   |
| ``head``    | kv head                    | all tokens and dims     |                                 |
| ``token``   | (token, kv head)           | the head's ``head_dim`` | ferrum's KvInt8, kvlab          |
| ``channel`` | (kv head, dim)             | all tokens              | KIVI's keys (Liu et al., 2024)  |

and measures the damage twice: as reconstruction error of K and V, and as error in the attention
output, which is what the model sees. Everything here is NumPy, float32 math (docs/design.md#conventions), and is
host code for experiments, not an op of the cache: a per-channel scale cannot be computed by a
cache that receives one token at a time (KIVI keeps a residual of recent tokens in fp16 for that).

**The data** (:func:`synthetic_kv`) is synthetic, with the structure measured in real models:
keys have a few *outlier channels*, the same dims in every token, 10-20x larger than the rest
(KIVI Fig. 2, KVQuant Fig. 2), plus a per-channel offset; values have no channel structure but vary
in magnitude from token to token. ``data/`` holds no real activations yet, so notebook 02 says so.
"""
from __future__ import annotations

import numpy as np

from kvlab.dtypes import get_dtype
from kvlab.ref.attention import decode_attention
from kvlab.ref.quant import decode, encode, symmetric_scale

GRANULARITIES = ("tensor", "head", "token", "channel")
# the axes of [T, Hkv, D] one scale covers, per granularity (amax over them, keepdims)
REDUCE_AXES = {"tensor": (0, 1, 2), "head": (0, 2), "token": (2,), "channel": (0,)}


# --- data ---------------------------------------------------------------------------------------

def synthetic_kv(num_tokens: int, num_kv_heads: int = 2, head_dim: int = 128, *,
                 outlier_channels: int = 4, outlier_gain: float = 15.0, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """K and V, float32 ``[num_tokens, num_kv_heads, head_dim]``, with realistic outliers.

    K = N(0, 1) * channel_gain + channel_offset: ``outlier_channels`` dims per head (chosen at
    random, the same for every token) get gain ``outlier_gain``, the others a gain in [0.5, 1.5];
    every channel gets a fixed offset N(0, 0.5). V = N(0, 1) * token_gain, token_gain log-normal
    (sigma 0.5): no channel outliers, but tokens of different size.
    """
    rng = np.random.default_rng(seed)
    shape = (num_tokens, num_kv_heads, head_dim)
    gain = rng.uniform(0.5, 1.5, (num_kv_heads, head_dim))
    for head in range(num_kv_heads):
        gain[head, rng.choice(head_dim, outlier_channels, replace=False)] = outlier_gain
    offset = rng.normal(0, 0.5, (num_kv_heads, head_dim))
    k = rng.standard_normal(shape) * gain + offset
    v = rng.standard_normal(shape) * np.exp(rng.normal(0, 0.5, (num_tokens, num_kv_heads, 1)))
    return k.astype(np.float32), v.astype(np.float32)


def rope_rotate_half(x: np.ndarray, positions: np.ndarray, theta: float = 1e6) -> np.ndarray:
    """Minimal rotate-half ("neox") RoPE over the whole head, float32 (docs/design.md#conventions):
    dims ``(i, i + D/2)`` of the token at position m turn by ``m * theta**(-2i/D)``.
    (``kvlab.ref.rope`` is the full version; this lab needs only the plain case.)"""
    head_dim = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angle = np.asarray(positions, np.float64)[:, None] * inv_freq          # [T, D/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]       # [T, 1, D/2]
    a, b = x[..., :head_dim // 2], x[..., head_dim // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(np.float32)


# --- quantization at any granularity --------------------------------------------------------------

def fake_quant(x: np.ndarray, kv_dtype: str, granularity: str = "token") -> np.ndarray:
    """Quantize and dequantize ``x`` ``[T, Hkv, D]`` with one scale per ``granularity`` cell.

    kv_dtype: ``"fp16"`` (a plain cast), ``"int8"``, ``"fp8_e4m3"`` or ``"int4"`` (here unpacked
    and without its groups of 32 unless ``granularity="group"``: one scale per 32 dims of a
    (token, head), the registry's int4 layout). ``"token"`` with int8 or fp8 is exactly what the
    cache stores: ``fake_quant(x, "int8") == dequantize(*quantize(x, "int8"), "int8")``.
    Returns float32, same shape.
    """
    x = np.asarray(x, np.float32)
    if kv_dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    dt = get_dtype(kv_dtype)
    if granularity == "group":
        t, h, d = x.shape
        g = x.reshape(t, h, d // 32, 32)
        scale = symmetric_scale(np.abs(g).max(axis=-1, keepdims=True), dt.qmax)
        stored = scale.astype(np.float16).astype(np.float32)
        return (decode(encode(g / scale, kv_dtype), kv_dtype) * stored).reshape(x.shape)
    if granularity not in REDUCE_AXES:
        raise ValueError(f"granularity must be one of {GRANULARITIES + ('group',)}, "
                         f"got {granularity!r}")
    amax = np.abs(x).max(axis=REDUCE_AXES[granularity], keepdims=True)
    scale = symmetric_scale(amax, dt.qmax)
    stored = scale.astype(np.float16).astype(np.float32)
    return decode(encode(x / scale, kv_dtype), kv_dtype) * stored


def relative_error(x: np.ndarray, x_hat: np.ndarray) -> float:
    """``||x_hat - x|| / ||x||`` over the whole tensor."""
    return float(np.linalg.norm(x_hat - x) / np.linalg.norm(x))


# --- attention, the error that matters ------------------------------------------------------------

def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None,
              causal: bool = True) -> np.ndarray:
    """Softmax attention in float32: :func:`kvlab.ref.attention.decode_attention` (notebook 05
    builds it) on float32 copies of any float input.

    q ``[Tq, Hq, D]``, k, v ``[L, Hkv, D]``; GQA: q head h reads kv head ``h // (Hq // Hkv)``.
    Causal when ``Tq > 1``: query i sees positions ``< L - Tq + 1 + i`` (docs/design.md#conventions).
    Returns ``[Tq, Hq, D]`` float32.
    """
    q, k, v = (np.ascontiguousarray(a, np.float32) for a in (q, k, v))
    return decode_attention(q, k, v, scale=scale, causal=causal)


def attention_error(reference: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    """The two accuracy measures ferrum's tests hold its INT8 cache to, of an attention output
    against its FP32 reference: ``cosine`` (of the flattened outputs; ferrum's threshold is
    > 0.999) and ``rel_max_diff`` (``max|diff| / max|ref|``; ferrum's threshold is < 0.02)."""
    a, b = reference.ravel().astype(np.float64), approx.ravel().astype(np.float64)
    return {"cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
            "rel_max_diff": float(np.abs(a - b).max() / np.abs(a).max())}


def granularity_table(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_dtype: str,
                      granularities=GRANULARITIES) -> list[dict]:
    """For each granularity: K and V reconstruction error and the attention output's error when
    both are quantized that way. One row (a dict) per granularity."""
    reference = attention(q, k, v)
    rows = []
    for g in granularities:
        k_hat, v_hat = fake_quant(k, kv_dtype, g), fake_quant(v, kv_dtype, g)
        rows.append({"granularity": g, "k_error": relative_error(k, k_hat),
                     "v_error": relative_error(v, v_hat),
                     **attention_error(reference, attention(q, k_hat, v_hat))})
    return rows
