"""Exercises of notebook 03 (RoPE): the two rotations, rotate-half and interleaved, and Llama 3.1's
scaled frequencies.

Each exercise is checked against :mod:`kvlab.ref.rope`. The cases are picked so that the usual
slips fail: positions out of order (token t is not at position t), the other style's pairs, the
sine's sign, fp16 inputs (rotate in float32, round once), and Llama 3.1 configurations with pairs
in all three of its bands (kept, divided by the factor, and the smooth ramp between).
"""
from __future__ import annotations

import numpy as np

from kvlab.exercises.core import Case, Exercise, register
from kvlab.ref import rope as ref

NOTEBOOK = "03_rope"
SECTION_ROTATION = "2.2 Rotating a head: rotate-half and interleaved"


# --- 03.rope_neox and 03.rope_gptj: one rotation, two layouts ----------------------------------

def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, positions: np.ndarray,
            first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Rotate pair i = dims (first[i], second[i]) of token t by row positions[t] of the tables."""
    c = cos[positions][:, None, :]                   # [T, 1, pairs]: one row per token, all heads
    s = sin[positions][:, None, :]
    a = x[..., first].astype(np.float32)             # widen once: the arithmetic is float32
    b = x[..., second].astype(np.float32)
    out = x.copy()
    out[..., first] = (a * c - b * s).astype(x.dtype)   # round once, to x's dtype
    out[..., second] = (b * c + a * s).astype(x.dtype)
    return out


def rope_neox_solution(x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                       positions: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of the whole head: pair i is dims (i, i + head_dim/2).

    x float16/float32 ``[T, heads, head_dim]``; cos, sin float32 ``[max_positions, head_dim/2]``;
    positions int32 ``[T]``. Returns a new array, x's dtype and shape."""
    half = x.shape[-1] // 2
    i = np.arange(half)
    return _rotate(x, cos, sin, positions, i, i + half)


def rope_gptj_solution(x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                       positions: np.ndarray) -> np.ndarray:
    """Interleaved RoPE of the whole head: pair i is dims (2i, 2i + 1). Shapes as rope_neox."""
    i = np.arange(x.shape[-1] // 2)
    return _rotate(x, cos, sin, positions, 2 * i, 2 * i + 1)


def _rotation_cases() -> list[Case]:
    def case(label, positions, heads=2, head_dim=8, theta=10000.0, dtype=np.float32, seed=0,
             random=False):
        rng = np.random.default_rng(seed)
        positions = np.asarray(positions, np.int32)
        cos, sin = ref.rope_tables(int(positions.max()) + 1, head_dim, theta)
        x = (2 * rng.standard_normal((len(positions), heads, head_dim))).astype(dtype)
        return Case(label, dict(x=x, cos=cos, sin=sin, positions=positions), random=random)

    cases = [
        case("position 0 turns nothing", [0], heads=1, head_dim=4),
        case("one pair (head_dim 2) at position 1: a turn of 1 radian", [1], heads=1, head_dim=2),
        case("positions out of order: token t is not at position t", [5, 2, 9, 0]),
        case("float16 input: rotate in float32, round once", [3, 17, 40], head_dim=16,
             dtype=np.float16, seed=1),
    ]
    rng = np.random.default_rng(5)
    for i in range(3):
        positions = rng.permutation(64)[:6]
        cases.append(case(f"random {i}", positions, heads=3, head_dim=int(rng.choice([8, 16, 32])),
                          dtype=np.float32 if i % 2 else np.float16, seed=10 + i, random=True))
    return cases


register(Exercise(
    name="03.rope_neox", notebook=NOTEBOOK, section=SECTION_ROTATION,
    signature="rope_neox(x, cos, sin, positions) -> rotated  # x's dtype and shape [T, heads, D]",
    hint="pair i = dims (i, i + D/2); c, s = cos[positions], sin[positions] (one row per token); "
         "in float32: a' = a c - b s, b' = b c + a s; round once to x's dtype.",
    solution=rope_neox_solution,
    reference=lambda x, cos, sin, positions: ref.apply_rope(x, cos, sin, positions, "neox"),
    cases=_rotation_cases,
    # float32 math in another order may move a float32 result by a few ulps (an fp16 one: rarely)
    rtol=1e-6, atol=0.0,
))

register(Exercise(
    name="03.rope_gptj", notebook=NOTEBOOK, section=SECTION_ROTATION,
    signature="rope_gptj(x, cos, sin, positions) -> rotated  # x's dtype and shape [T, heads, D]",
    hint="the same rotation as rope_neox; only the pairs change: pair i = dims (2i, 2i + 1), "
         "i.e. x[..., 0::2] and x[..., 1::2].",
    solution=rope_gptj_solution,
    reference=lambda x, cos, sin, positions: ref.apply_rope(x, cos, sin, positions, "gptj"),
    cases=_rotation_cases,
    rtol=1e-6, atol=0.0,
))


# --- 03.llama3_inv_freq -----------------------------------------------------------------------

def llama3_inv_freq_solution(rotary_dim: int, theta: float, factor: float,
                             low_freq_factor: float, high_freq_factor: float,
                             original_max_position_embeddings: int) -> np.ndarray:
    """Llama 3.1's scaled speeds, float64 ``[rotary_dim // 2]`` radians per position."""
    inv_freq = theta ** (-np.arange(0, rotary_dim, 2) / rotary_dim)   # the plain speeds
    wavelength = 2 * np.pi / inv_freq                                 # positions per full turn
    long_edge = original_max_position_embeddings / low_freq_factor    # longer: divide by factor
    short_edge = original_max_position_embeddings / high_freq_factor  # shorter: keep
    # Between the edges, blend: weight 1 on the kept speed at short_edge, 0 at long_edge.
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelength < short_edge, inv_freq,
                    np.where(wavelength > long_edge, inv_freq / factor, blended))


def _llama3_reference(rotary_dim, theta, factor, low_freq_factor, high_freq_factor,
                      original_max_position_embeddings) -> np.ndarray:
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
               "high_freq_factor": high_freq_factor,
               "original_max_position_embeddings": original_max_position_embeddings}
    return ref.rope_frequencies(rotary_dim, theta, scaling)[0]


def _llama3_cases() -> list[Case]:
    def case(label, rotary_dim, theta, factor, low, high, original, random=False):
        return Case(label, dict(rotary_dim=rotary_dim, theta=theta, factor=factor,
                                low_freq_factor=low, high_freq_factor=high,
                                original_max_position_embeddings=original), random=random)

    cases = [
        case("Llama 3.1's own config", 128, 500000.0, 8.0, 1.0, 4.0, 8192),
        case("a small head, every band present", 16, 10000.0, 4.0, 1.0, 4.0, 256),
        case("a context so long that every pair is kept", 16, 10000.0, 8.0, 1.0, 4.0,
             10 ** 9),
        case("low 2, high 8: the edges move", 32, 10000.0, 16.0, 2.0, 8.0, 4096),
    ]
    rng = np.random.default_rng(6)
    for i in range(4):
        low = float(rng.uniform(0.5, 2.0))
        cases.append(case(f"random {i}", int(rng.choice([16, 64, 128])),
                          float(10 ** rng.uniform(4, 6)), float(rng.choice([2.0, 4.0, 8.0, 32.0])),
                          low, low * float(rng.uniform(1.5, 8.0)), int(rng.choice([512, 8192])),
                          random=True))
    return cases


register(Exercise(
    name="03.llama3_inv_freq", notebook=NOTEBOOK,
    section="2.5 Scaling: stretching RoPE past the trained context",
    signature="llama3_inv_freq(rotary_dim, theta, factor, low_freq_factor, high_freq_factor, "
              "original_max_position_embeddings) -> inv_freq  # float64 [rotary_dim // 2]",
    hint="wavelength = 2 pi / inv_freq; below L/high_freq_factor keep, above L/low_freq_factor "
         "divide by factor, between blend with smooth = (L / wavelength - low) / (high - low).",
    solution=llama3_inv_freq_solution,
    reference=_llama3_reference,
    cases=_llama3_cases,
    rtol=1e-9, atol=0.0,
))
