"""Rotary position embeddings (RoPE), NumPy reference: the tables, and the rotation itself.

RoPE (Su et al., 2021, "RoFormer") gives attention a sense of position by *rotating* each query and
key before the dot product. The ``rotary_dim`` leading dims of a head are cut into
``rotary_dim // 2`` pairs; pair ``i`` of the token at position ``m`` turns by the angle
``m * inv_freq[i]``::

    inv_freq[i] = theta ** (-2i / rotary_dim)          i = 0 .. rotary_dim/2 - 1
    (a, b)  ->  (a cos(m f) - b sin(m f),  b cos(m f) + a sin(m f))        f = inv_freq[i]

Rotating q by ``m f`` and k by ``n f`` leaves ``q . k`` depending on ``m - n`` only: attention
sees relative positions, and a key rotated once, when it is written to the cache, never changes.

**Tables.** :func:`rope_tables` computes ``cos`` and ``sin`` once per model, float32
``[max_positions, rotary_dim // 2]`` (docs/design.md#conventions), in float64 and then rounded, so every backend
rotates by the same numbers. (Hugging Face computes them in float32, where the angle ``m f`` itself
loses ``m * 2**-24`` radians: about 0.008 rad at position 131072.)

**Styles.** Which two dims form pair ``i`` is the only difference between the two layouts in use:

    "neox"  (rotate-half; GPT-NeoX, and Llama, Qwen, Mistral in HF):  (i, i + rotary_dim/2)
    "gptj"  (interleaved; GPT-J, RoFormer, Meta's original Llama code):  (2i, 2i + 1)

**Partial rotary.** Only the first ``rotary_dim <= head_dim`` dims rotate; the rest pass through
unchanged (GPT-NeoX, Phi-2, ChatGLM: ``partial_rotary_factor`` in Hugging Face configs).

**Scaling** stretches a model to contexts longer than it was trained on, by changing ``inv_freq``
(see :func:`rope_frequencies`): none, ``linear``, ``dynamic`` (NTK), ``yarn`` and ``llama3``, each
with the parameters Hugging Face's ``rope_scaling`` / ``rope_parameters`` use.

Arithmetic is float32 (x may be float16: it is widened, rotated and rounded once, docs/design.md#conventions).
Arguments are checked by :mod:`kvlab.checks` before anything is computed.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Mapping

import numpy as np

from kvlab.checks import ROPE_STYLES, check_apply_rope, check_rope_tables

SCALING_KINDS = ("default", "linear", "dynamic", "yarn", "llama3")

# The keys each kind reads, named as in Hugging Face's rope_scaling / rope_parameters (transformers
# modeling_rope_utils.py). Any kind also accepts "rope_type" (or the older "type"), "rope_theta"
# (which must then equal theta) and "partial_rotary_factor" (ignored: rotary_dim says it already).
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"),
}
_OPTIONAL = {
    "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
             "truncate"),
}
_ANY_KIND = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def scaling_kind(scaling: Mapping[str, Any] | None) -> str:
    """The kind of a scaling dict: its ``"rope_type"`` (or legacy ``"type"``); ``"default"`` for
    None. Raises ValueError for a kind this module does not implement (e.g. ``"longrope"``)."""
    if scaling is None:
        return "default"
    if not isinstance(scaling, Mapping):
        raise TypeError(f"scaling must be a dict like Hugging Face's rope_scaling or None, "
                        f"got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SCALING_KINDS:
        raise ValueError(f"scaling rope_type must be one of {SCALING_KINDS}, got {kind!r}")
    return kind


def _check_scaling(scaling: Mapping[str, Any] | None, theta: float) -> tuple[str, dict[str, Any]]:
    """The kind and the parameters of ``scaling``, checked: no unknown key, every required key,
    numbers where numbers go. Returns ``(kind, params)`` with params a plain dict."""
    kind = scaling_kind(scaling)
    params = dict(scaling or {})
    known = set(_REQUIRED[kind]) | set(_OPTIONAL.get(kind, ())) | set(_ANY_KIND)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"scaling {kind!r} does not use {unknown}; it reads "
                         f"{sorted(set(_REQUIRED[kind]) | set(_OPTIONAL.get(kind, ())))}")
    missing = [key for key in _REQUIRED[kind] if params.get(key) is None]
    if missing:
        raise ValueError(f"scaling {kind!r} needs {missing}")
    if "rope_theta" in params and params["rope_theta"] != theta:
        raise ValueError(f"scaling has rope_theta {params['rope_theta']} but theta is {theta}")
    for key, value in params.items():
        if key in ("rope_type", "type", "truncate", "rope_theta", "partial_rotary_factor"):
            continue
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise TypeError(f"scaling[{key!r}] must be a finite number, got {value!r}")
        if value <= 0 and key not in ("beta_fast", "beta_slow"):
            raise ValueError(f"scaling[{key!r}] must be > 0, got {value}")
    if "factor" in _REQUIRED[kind] and params["factor"] < 1:
        raise ValueError(f"scaling['factor'] must be >= 1 (it stretches the context), "
                         f"got {params['factor']}")
    if kind == "llama3" and not params["low_freq_factor"] < params["high_freq_factor"]:
        raise ValueError("scaling llama3 needs low_freq_factor < high_freq_factor, got "
                         f"{params['low_freq_factor']} and {params['high_freq_factor']}")
    return kind, params


def rope_frequencies(rotary_dim: int, theta: float, scaling: Mapping[str, Any] | None = None,
                     seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """The rotation speed of each pair and the attention factor: ``(inv_freq, attention_factor)``.

    inv_freq: float64 ``[rotary_dim // 2]``, radians per position; attention_factor: a float that
    multiplies cos and sin (1.0 except for YaRN). This is Hugging Face's ``ROPE_INIT_FUNCTIONS``
    (``transformers.modeling_rope_utils``), kind for kind, computed in float64:

    - none (``scaling=None`` or ``rope_type "default"``): ``theta ** (-2i / rotary_dim)``.
    - ``linear`` (Chen et al., 2023, "position interpolation"; keys ``factor``): every inv_freq
      divided by ``factor``, i.e. positions squeezed ``factor`` times.
    - ``dynamic`` (NTK-aware, "dynamic NTK" on Reddit, 2023; keys ``factor``,
      ``original_max_position_embeddings``): for a sequence of ``seq_len`` tokens longer than the
      original length ``L``, the base grows to
      ``theta * (factor * seq_len / L - (factor - 1)) ** (d / (d - 2))``; not longer, nothing
      changes. Hugging Face reads ``L`` from the config's ``max_position_embeddings`` (its dynamic
      dict has no such key); here it is named like the other kinds' key.
    - ``yarn`` (Peng et al., 2023; keys ``factor``, ``original_max_position_embeddings``, optional
      ``beta_fast`` 32, ``beta_slow`` 1, ``attention_factor``, ``mscale``, ``mscale_all_dim``,
      ``truncate`` True): fast pairs (more than ``beta_fast`` turns over ``L`` positions) keep
      their frequency, slow ones (fewer than ``beta_slow``) are divided by ``factor``, a linear ramp
      between. attention_factor defaults to ``0.1 ln(factor) + 1`` (with mscale/mscale_all_dim: the
      ratio of two such terms, as DeepSeek's configs use).
    - ``llama3`` (Meta's Llama 3.1; keys ``factor``, ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``): wavelengths ``2 pi / inv_freq`` shorter than
      ``L / high_freq_factor`` are kept, longer than ``L / low_freq_factor`` divided by ``factor``,
      smoothly interpolated between.

    seq_len: only ``dynamic`` reads it (the sequence length the table is for); None = L.
    """
    kind, p = _check_scaling(scaling, float(theta))
    d = rotary_dim
    exponents = np.arange(0, d, 2, dtype=np.float64) / d  # 2i / d
    inv_freq = 1.0 / theta ** exponents
    if kind == "linear":
        return inv_freq / p["factor"], 1.0
    if kind == "dynamic":
        if d <= 2:
            raise ValueError("dynamic NTK scaling needs rotary_dim > 2 "
                             "(its exponent is d / (d - 2))")
        original, factor = p["original_max_position_embeddings"], p["factor"]
        length = original if seq_len is None else max(seq_len, original)
        base = theta * (factor * length / original - (factor - 1)) ** (d / (d - 2))
        return 1.0 / base ** exponents, 1.0
    if kind == "yarn":
        return _yarn(inv_freq, d, float(theta), p)
    if kind == "llama3":
        return _llama3(inv_freq, p), 1.0
    return inv_freq, 1.0


def _yarn(inv_freq: np.ndarray, d: int, theta: float, p: dict) -> tuple[np.ndarray, float]:
    """YaRN's "NTK-by-parts" frequencies and its attention factor (see rope_frequencies)."""
    factor, original = p["factor"], p["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = p.get("beta_fast") or 32  # Hugging Face's `or`: None and 0 mean the default
    beta_slow = p.get("beta_slow") or 1

    def pair_making(turns: float) -> float:
        """The (fractional) dim whose pair turns ``turns`` times over the original length."""
        return d * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_making(beta_fast), pair_making(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # Hugging Face's guard against dividing by zero
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return inv_freq / factor * (1.0 - keep) + inv_freq * keep, float(attention_factor)


def _llama3(inv_freq: np.ndarray, p: dict) -> np.ndarray:
    """Llama 3.1's frequencies (see rope_frequencies)."""
    factor, original = p["factor"], p["original_max_position_embeddings"]
    low, high = p["low_freq_factor"], p["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)  # 0 at L/low, 1 at L/high
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def rope_tables(max_positions: int, rotary_dim: int, theta: float,
                scaling: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``cos`` and ``sin`` of every position's angles: float32 ``[max_positions, rotary_dim // 2]``.

    ``cos[m, i] = attention_factor * cos(m * inv_freq[i])`` (``sin`` alike), with inv_freq and
    attention_factor from :func:`rope_frequencies`; computed in float64, rounded once to float32.

    scaling: None, or a dict named as a Hugging Face config's ``rope_scaling``, e.g. Llama 3.1's
    ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}``.

    - **YaRN** folds its attention factor into the tables, exactly as Hugging Face does
      (``cos = emb.cos() * self.attention_scaling``): a YaRN "rotation" scales q and k by that
      factor each, so their dot products grow by its square (softmax gets sharper at long range).
    - **Dynamic NTK** depends on the sequence's length. The table returned is the one for a
      sequence of ``max_positions`` tokens (Hugging Face's ``inv_freq`` once a sequence has grown
      to ``max_positions``; vLLM likewise builds one table for its longest length). For
      ``max_positions <= original_max_position_embeddings`` it equals the unscaled table. Hugging
      Face rebuilds it as a sequence grows, so its rows for short sequences differ: a cached key
      rotated under one table is not re-rotated when the base changes.
    """
    max_positions, rotary_dim, theta = check_rope_tables(max_positions, rotary_dim, theta)
    inv_freq, attention_factor = rope_frequencies(rotary_dim, theta, scaling,
                                                  seq_len=max_positions)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)  # m * inv_freq[i]
    cos = (np.cos(angles) * attention_factor).astype(np.float32)
    sin = (np.sin(angles) * attention_factor).astype(np.float32)
    return cos, sin


def pair_dims(rotary_dim: int, style: str = "neox") -> tuple[np.ndarray, np.ndarray]:
    """Which two dims of a head form each pair: int64 ``first``, ``second``, ``[rotary_dim // 2]``.

    neox (rotate-half): pair i is dims ``(i, i + rotary_dim // 2)``: the first half of the
    rotated dims holds every pair's first coordinate, the second half the second.
    gptj (interleaved): pair i is dims ``(2i, 2i + 1)``: neighbours.
    """
    if style not in ROPE_STYLES:
        raise ValueError(f"style must be 'neox' (rotate-half) or 'gptj' (interleaved), "
                         f"got {style!r}")
    half = rotary_dim // 2
    i = np.arange(half)
    return (i, i + half) if style == "neox" else (2 * i, 2 * i + 1)


def gptj_to_neox_permutation(head_dim: int, rotary_dim: int | None = None) -> np.ndarray:
    """The order of dims that turns an interleaved head into a rotate-half one: ``[head_dim]``.

    ``perm[i] = 2i`` and ``perm[i + rotary_dim/2] = 2i + 1`` for the rotated dims, identity after.
    For any x: ``apply_rope(x[..., perm], style="neox") == apply_rope(x, style="gptj")[..., perm]``.
    Converters permute the rows of W_q and W_k this way when they turn Meta's interleaved Llama
    checkpoints into Hugging Face's rotate-half ones.
    """
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    first, second = pair_dims(rotary_dim, "gptj")
    return np.concatenate([first, second, np.arange(rotary_dim, head_dim)])


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, positions: np.ndarray,
               style: str = "neox", rotary_dim: int | None = None) -> np.ndarray:
    """Rotate every head of every token by its position's angles: a new array, x's dtype and shape.

    x: float16 or float32 ``[T, heads, head_dim]`` (q or k, token-first), head_dim even.
    cos, sin: float32 ``[max_positions, rotary_dim // 2]`` from :func:`rope_tables`.
    positions: int32 ``[T]``, token t's position, each in ``[0, max_positions)``; any order.
    style: ``"neox"`` (rotate-half) or ``"gptj"`` (interleaved); see :func:`pair_dims`.
    rotary_dim: the dims that rotate (the first ones), ``2 * cos.shape[1]`` when None; given, it
        must equal that (the frequencies were built for it). Dims from rotary_dim on are copied.

    For pair i of token t (``c, s = cos[positions[t], i], sin[positions[t], i]``), in float32::

        out[first]  = x[first] * c - x[second] * s
        out[second] = x[second] * c + x[first] * s

    then rounded once to x's dtype. Hugging Face's ``q * cos + rotate_half(q) * sin`` is the
    same arithmetic written for the whole head at once.
    """
    rotary_dim = check_apply_rope(x, cos, sin, positions, style, rotary_dim)
    first, second = pair_dims(rotary_dim, style)
    c = cos[positions][:, None, :]  # [T, 1, rotary_dim // 2]: one row per token, every head
    s = sin[positions][:, None, :]
    a = x[..., first].astype(np.float32)  # [T, heads, rotary_dim // 2]
    b = x[..., second].astype(np.float32)
    out = x.copy()  # the pass-through dims (rotary_dim..head_dim) stay as they are
    out[..., first] = (a * c - b * s).astype(x.dtype)
    out[..., second] = (b * c + a * s).astype(x.dtype)
    return out
