"""Stage 3 (RoPE), the NumPy reference: against answers worked by hand, against Hugging Face
transformers' own RoPE code (skipped cleanly without transformers), and its properties (hypothesis).

Tolerances, and why (the reference computes tables in float64, rotations in float32):

| comparison | bound | why |
|---|---|---|
| inv_freq vs HF's rope init functions | rel 1e-6 | HF computes ``base ** (2i/d)`` etc. in float32: a few roundings of 2**-24 each (measured <= 4.5e-7) |
| attention factor vs HF | rel 1e-12 | both float64 Python math |
| cos/sin vs HF's rotary embedding forward | abs ``1e-6 * af * (1 + angle)`` | HF forms the angle ``m * inv_freq`` in float32, so it is off by up to ``angle * 2**-23`` radians (0.008 rad at position 131072); measured <= 3.7e-7 * (1 + angle) |
| apply_rope vs HF's apply_rotary_pos_emb, same tables, float32 | abs ``2**-22 * (abs(a) + abs(b))`` | the same two products and one sum per coordinate; only the rounding order may differ (measured: equal) |
| the same with float16 x | 1 float16 ulp | HF is run in float32 and rounded once, like kvlab; the float32 values may straddle a float16 rounding boundary |
| properties (norms, relative positions) | stated in each test | float32 rotation of float32 table values |
"""
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.ref.rope import (
    apply_rope, gptj_to_neox_permutation, pair_dims, rope_frequencies, rope_tables,
)

LLAMA31_SCALING = {  # Llama 3.1's rope_scaling (data/README.md, from its config.json)
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def rotate_pair(a: float, b: float, angle: float) -> tuple[float, float]:
    """A 2-D rotation by ``angle``, in float64: the definition of RoPE for one pair."""
    return a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)


# --- by hand -----------------------------------------------------------------------------------

def test_tables_by_hand():
    cos, sin = rope_tables(3, 4, 10000.0)
    assert cos.dtype == sin.dtype == np.float32 and cos.shape == sin.shape == (3, 2)
    # inv_freq = [1, 10000 ** -0.5] = [1, 0.01]; row m holds cos/sin of m * inv_freq
    np.testing.assert_array_equal(cos, np.float32(np.cos([[0, 0], [1, 0.01], [2, 0.02]])))
    np.testing.assert_array_equal(sin, np.float32(np.sin([[0, 0], [1, 0.01], [2, 0.02]])))
    inv_freq, factor = rope_frequencies(8, 500000.0)
    np.testing.assert_allclose(inv_freq, 500000.0 ** -(np.arange(0, 8, 2) / 8), rtol=1e-15)
    assert factor == 1.0


@pytest.mark.parametrize("style, first, second", [("neox", 0, 2), ("gptj", 0, 1)])
def test_one_pair_by_hand(style, first, second):
    """rotary_dim 4 has inv_freq [1, 0.01]: pair 0 turns 1 rad per position. Which dims form
    pair 0 is the style: (0, 2) rotate-half, (0, 1) interleaved."""
    cos, sin = rope_tables(8, 4, 10000.0)
    x = np.zeros((1, 1, 6), np.float32)
    x[0, 0, first], x[0, 0, 5] = 1.0, 7.0  # dim 5 is past rotary_dim: it passes through
    out = apply_rope(x, cos, sin, np.array([3], np.int32), style)
    a, b = rotate_pair(1.0, 0.0, 3.0)
    np.testing.assert_allclose(out[0, 0, [first, second]], [a, b], rtol=1e-6)
    assert out[0, 0, 5] == 7.0 and np.count_nonzero(out) == 3
    assert pair_dims(4, style)[0][0] == first and pair_dims(4, style)[1][0] == second


def test_position_zero_is_the_identity_bit_for_bit():
    cos, sin = rope_tables(4, 64, 1e6)
    x = np.random.default_rng(0).standard_normal((3, 2, 64)).astype(np.float16)
    out = apply_rope(x, cos, sin, np.zeros(3, np.int32), "gptj")
    assert out.dtype == np.float16 and (out.view(np.uint16) == x.view(np.uint16)).all()


def test_apply_rope_returns_a_new_array_and_leaves_x_alone():
    cos, sin = rope_tables(16, 8, 10000.0)
    x = np.ones((2, 1, 8), np.float32)
    out = apply_rope(x, cos, sin, np.array([5, 9], np.int32))
    assert out is not x and (x == 1).all() and not np.shares_memory(out, x)


def test_linear_scaling_is_position_interpolation():
    """Linear scaling by 4 turns position 4m exactly as far as the unscaled table turns m."""
    plain_cos, plain_sin = rope_tables(100, 16, 10000.0)
    cos, sin = rope_tables(400, 16, 10000.0, {"rope_type": "linear", "factor": 4.0})
    np.testing.assert_allclose(cos[::4], plain_cos, atol=2e-7)
    np.testing.assert_allclose(sin[::4], plain_sin, atol=2e-7)


def test_llama3_keeps_fast_pairs_and_slows_slow_ones():
    """Llama 3.1: wavelengths below 8192/4 = 2048 positions are kept, above 8192/1 divided by 8."""
    plain, _ = rope_frequencies(128, 500000.0)
    scaled, _ = rope_frequencies(128, 500000.0, LLAMA31_SCALING)
    wavelength = 2 * np.pi / plain
    fast, slow = wavelength < 2048, wavelength > 8192
    assert fast.sum() == 29 and slow.sum() == 29  # and 6 pairs in between, smoothed
    np.testing.assert_array_equal(scaled[fast], plain[fast])
    np.testing.assert_allclose(scaled[slow], plain[slow] / 8, rtol=1e-15)
    middle = ~fast & ~slow
    assert ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8)).all()


def test_dynamic_ntk_changes_nothing_within_the_original_length():
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 512}
    for got, want in zip(rope_tables(512, 32, 10000.0, scaling), rope_tables(512, 32, 10000.0)):
        np.testing.assert_array_equal(got, want)
    longer, _ = rope_tables(2048, 32, 10000.0, scaling)  # beyond it, the base grows
    assert not np.array_equal(longer[:512], rope_tables(512, 32, 10000.0)[0])


def test_yarn_folds_its_attention_factor_into_the_tables():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    cos, sin = rope_tables(64, 32, 10000.0, scaling)
    _, factor = rope_frequencies(32, 10000.0, scaling)
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1)
    np.testing.assert_allclose(np.hypot(cos, sin), factor, rtol=1e-6)
    given = rope_frequencies(32, 10000.0, {**scaling, "attention_factor": 1.0})[1]
    assert given == 1.0


def test_partial_rotary_equals_full_rope_on_the_rotated_dims():
    """rotary_dim < head_dim: the first rotary_dim dims are exactly a head of rotary_dim rotated
    with the same tables, and the rest are copied bit for bit."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3, 80)).astype(np.float16)
    cos, sin = rope_tables(50, 32, 10000.0)
    positions = rng.integers(0, 50, 5).astype(np.int32)
    for style in ("neox", "gptj"):
        out = apply_rope(x, cos, sin, positions, style, rotary_dim=32)
        sliced = apply_rope(np.ascontiguousarray(x[..., :32]), cos, sin, positions, style)
        np.testing.assert_array_equal(out[..., :32], sliced)
        assert (out[..., 32:].view(np.uint16) == x[..., 32:].view(np.uint16)).all()


def test_reference_imports_neither_numba_nor_torch():
    code = "import sys, kvlab.ref.rope; print('numba' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- properties ---------------------------------------------------------------------------------

TABLES = {d: rope_tables(4096, d, 10000.0) for d in (2, 8, 64)}


@st.composite
def heads(draw, max_tokens=6):
    """x float32 [T, heads, head_dim], with its rotary_dim, style and positions < 4096."""
    rotary_dim = draw(st.sampled_from(sorted(TABLES)), label="rotary_dim")
    head_dim = rotary_dim + 2 * draw(st.integers(0, 4), label="pass-through pairs")
    num_tokens = draw(st.integers(1, max_tokens))
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, draw(st.integers(1, 3)), head_dim)).astype(np.float32)
    positions = rng.integers(0, 4096, num_tokens).astype(np.int32)
    style = draw(st.sampled_from(["neox", "gptj"]), label="style")
    return x, rotary_dim, style, positions


@settings(max_examples=80, deadline=None)
@given(heads())
def test_rotation_preserves_norms(case):
    """A rotation keeps every pair's length, so every head's norm: up to float32 rounding of the
    table (cos^2 + sin^2 = 1 within ~2**-23) and of the products."""
    x, rotary_dim, style, positions = case
    out = apply_rope(x, *TABLES[rotary_dim], positions, style)
    first, second = pair_dims(rotary_dim, style)
    pair_norm = lambda y: np.hypot(y[..., first].astype(np.float64), y[..., second])  # noqa: E731
    np.testing.assert_allclose(pair_norm(out), pair_norm(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-6)


@settings(max_examples=80, deadline=None)
@given(heads(max_tokens=2), st.integers(0, 2000), st.integers(0, 2000), st.integers(0, 2000))
def test_dot_product_depends_only_on_distance(case, m, n, shift):
    """<R(m) q, R(n) k> = <R(m + s) q, R(n + s) k>: attention sees only m - n. The tables are
    float32, so each side is off by ~2**-23 per term: bound 1e-5 * |q| |k|."""
    x, rotary_dim, style, _ = case
    q, k = x[:1], x[-1:]
    cos, sin = TABLES[rotary_dim]

    def dot(mq: int, nk: int) -> np.ndarray:  # one dot product per head, in float64
        rq = apply_rope(q, cos, sin, np.array([mq], np.int32), style).astype(np.float64)
        rk = apply_rope(k, cos, sin, np.array([nk], np.int32), style).astype(np.float64)
        return (rq * rk).sum(-1)

    scale = np.linalg.norm(q, axis=-1) * np.linalg.norm(k, axis=-1)  # [1, heads]
    assert (np.abs(dot(m, n) - dot(m + shift, n + shift)) <= 1e-5 * scale + 1e-7).all()


@settings(max_examples=60, deadline=None)
@given(heads())
def test_interleaved_is_rotate_half_on_permuted_dims(case):
    """Reorder dims (0, 2, 4, ..., 1, 3, 5, ...) and the interleaved pairs become rotate-half pairs:
    the same pairs, rotated by the same angles, so the same float32 results, bit for bit."""
    x, rotary_dim, _, positions = case
    cos, sin = TABLES[rotary_dim]
    perm = gptj_to_neox_permutation(x.shape[-1], rotary_dim)
    assert sorted(perm) == list(range(x.shape[-1]))
    gptj = apply_rope(x, cos, sin, positions, "gptj")
    neox = apply_rope(np.ascontiguousarray(x[..., perm]), cos, sin, positions, "neox")
    np.testing.assert_array_equal(neox, gptj[..., perm])


@settings(max_examples=40, deadline=None)
@given(heads())
def test_rotary_dim_equal_to_head_dim_is_full_rope(case):
    """rotary_dim = head_dim rotates every dim, like the plain (None) call and float64 math."""
    x, rotary_dim, style, positions = case
    x = np.ascontiguousarray(x[..., :rotary_dim])
    cos, sin = TABLES[rotary_dim]
    out = apply_rope(x, cos, sin, positions, style, rotary_dim=rotary_dim)
    np.testing.assert_array_equal(out, apply_rope(x, cos, sin, positions, style))
    first, second = pair_dims(rotary_dim, style)
    inv_freq, _ = rope_frequencies(rotary_dim, 10000.0)
    angle = positions[:, None, None] * inv_freq  # float64
    a, b = x[..., first].astype(np.float64), x[..., second].astype(np.float64)
    exact = np.empty(x.shape)
    exact[..., first] = a * np.cos(angle) - b * np.sin(angle)
    exact[..., second] = b * np.cos(angle) + a * np.sin(angle)
    np.testing.assert_allclose(out, exact, rtol=0, atol=4e-7 * np.abs(x).max() + 1e-7)


# --- against Hugging Face transformers -----------------------------------------------------------

# kind: (scaling as a Hugging Face config names it, the config's max_position_embeddings)
SCALINGS = {
    "default": (None, 4096),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 4096),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, 2048),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, 16384),
    "yarn-deepseek": ({"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                       "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
                      163840),
    "llama3": (LLAMA31_SCALING, 131072),
}


def hf_rotary(kind: str, theta: float, head_dim: int, partial: float = 1.0):
    """Hugging Face's LlamaRotaryEmbedding for ``SCALINGS[kind]`` and kvlab's scaling dict.

    kvlab names dynamic NTK's original length like the other kinds do; Hugging Face reads it from
    the config's max_position_embeddings."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling, max_positions = SCALINGS[kind]
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    params.pop("type", None)
    params["rope_type"] = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    transformers.logging.set_verbosity_error()  # yarn-deepseek's factor warning is expected
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=1, head_dim=head_dim,
                                      max_position_embeddings=max_positions,
                                      partial_rotary_factor=partial, rope_parameters=params)
    ours = None if scaling is None else dict(scaling)
    if kind == "dynamic":
        ours["original_max_position_embeddings"] = max_positions
    return LlamaRotaryEmbedding(config), ours, max_positions


@pytest.mark.parametrize("kind", SCALINGS)
@pytest.mark.parametrize("theta", [10000.0, 500000.0, 1e6])
@pytest.mark.parametrize("head_dim, partial", [(128, 1.0), (64, 1.0), (128, 0.5)])
def test_frequencies_match_hugging_face(kind, theta, head_dim, partial):
    rotary, ours, max_positions = hf_rotary(kind, theta, head_dim, partial)
    rotary_dim = int(head_dim * partial)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind == "default":  # Llama's default init rotates the whole head (no partial factor)
        want = rope_frequencies(head_dim, theta)[0]
        np.testing.assert_allclose(rotary.inv_freq.double().numpy(), want, rtol=1e-6)
        return
    seq_len = 3 * max_positions if kind == "dynamic" else None
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[rotary.rope_type](rotary.config, None, seq_len=seq_len)
    inv_freq, factor = rope_frequencies(rotary_dim, theta, ours, seq_len=seq_len)
    assert hf_inv.shape == (rotary_dim // 2,)
    np.testing.assert_allclose(inv_freq, hf_inv.double().numpy(), rtol=1e-6)
    assert factor == pytest.approx(hf_factor, rel=1e-12)


@pytest.mark.parametrize("kind", SCALINGS)
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_tables_match_hugging_face_rotary_embedding(kind, theta):
    """cos/sin for every position vs LlamaRotaryEmbedding.forward (float32 angles, see the table
    of tolerances). For dynamic NTK, positions 0..P-1 make HF rebuild inv_freq at seq_len P."""
    import torch

    rotary, ours, max_positions = hf_rotary(kind, theta, 128)
    length = 3 * max_positions if kind == "dynamic" else min(max_positions, 32768)
    hf_cos, hf_sin = rotary(torch.zeros(1, length, 128), torch.arange(length)[None])
    cos, sin = rope_tables(length, 128, theta, ours)
    inv_freq, factor = rope_frequencies(128, theta, ours, seq_len=length)
    bound = 1e-6 * factor * (1 + np.outer(np.arange(length), inv_freq))
    for got, hf in ((cos, hf_cos), (sin, hf_sin)):
        hf = hf[0].numpy()
        np.testing.assert_array_equal(hf[:, :64], hf[:, 64:])  # HF repeats the half for rotate-half
        assert (np.abs(got - hf[:, :64]) <= bound).all(), np.abs(got - hf[:, :64]).max()


def hf_apply(style: str, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, positions: np.ndarray,
             rotary_dim: int) -> np.ndarray:
    """Hugging Face's own rotation of x [T, H, D] (float32) by kvlab's tables: Llama's
    apply_rotary_pos_emb (rotate-half, full), GPT-NeoX's (rotate-half, partial) or GPT-J's
    (interleaved; GPT-J's attention slices the rotated dims off itself, as here)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.gpt_neox import modeling_gpt_neox
    from transformers.models.gptj import modeling_gptj
    from transformers.models.llama import modeling_llama

    q = torch.from_numpy(x)[None]  # [1, T, H, D]: batch, tokens, heads, dims
    c, s = torch.from_numpy(cos[positions])[None], torch.from_numpy(sin[positions])[None]
    if style == "gptj":
        rotated = modeling_gptj.apply_rotary_pos_emb(q[..., :rotary_dim], s, c)
        return torch.cat([rotated, q[..., rotary_dim:]], -1)[0].numpy()
    c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)  # HF's [.., rotary_dim] layout
    if rotary_dim == x.shape[-1]:
        return modeling_llama.apply_rotary_pos_emb(q, q, c, s, unsqueeze_dim=2)[0][0].numpy()
    return modeling_gpt_neox.apply_rotary_pos_emb(q, q, c, s, unsqueeze_dim=2)[0][0].numpy()


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("kind", SCALINGS)
@pytest.mark.parametrize("head_dim, rotary_dim", [(128, 128), (64, 64), (256, 64), (80, 32)])
def test_apply_rope_matches_hugging_face(style, kind, head_dim, rotary_dim):
    rng = np.random.default_rng(head_dim + rotary_dim)
    _, ours, _ = hf_rotary(kind, 500000.0, head_dim)
    cos, sin = rope_tables(9000, rotary_dim, 500000.0, ours)
    x = rng.standard_normal((33, 2, head_dim)).astype(np.float32)
    positions = rng.permutation(9000)[:33].astype(np.int32)  # shuffled, beyond 8192 too

    want = hf_apply(style, x, cos, sin, positions, rotary_dim)
    got = apply_rope(x, cos, sin, positions, style, rotary_dim)
    first, second = pair_dims(rotary_dim, style)
    pair_size = np.abs(x[..., first]) + np.abs(x[..., second])
    for dims in (first, second):
        assert (np.abs(got[..., dims] - want[..., dims]) <= 2.0**-22 * pair_size).all()
    np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])

    half = x.astype(np.float16)  # float16: HF in float32 on the same values, rounded once
    got16 = apply_rope(half, cos, sin, positions, style, rotary_dim)
    want16 = hf_apply(style, half.astype(np.float32), cos, sin, positions, rotary_dim)
    want16 = want16.astype(np.float16)
    ulps = np.abs(got16.astype(np.float32) - want16) / np.spacing(np.abs(want16)).astype(np.float32)
    assert ulps.max() <= 1


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_gptj_sinusoidal_table_is_the_default_table(style):
    """GPT-J builds its own table (create_sinusoidal_positions, theta 10000): kvlab's equals it to
    float32 angle rounding."""
    pytest.importorskip("transformers")
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    sincos = create_sinusoidal_positions(2048, 64).numpy()
    cos, sin = rope_tables(2048, 64, 10000.0)
    angle = np.outer(np.arange(2048), rope_frequencies(64, 10000.0)[0])
    assert (np.abs(sincos[:, :32] - sin) <= 1e-6 * (1 + angle)).all()
    assert (np.abs(sincos[:, 32:] - cos) <= 1e-6 * (1 + angle)).all()
