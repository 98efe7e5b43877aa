"""Wrong answers the 03 (RoPE) checkers must reject (gathered by tests/test_exercises.py), and the
solutions checked against numbers worked out by hand."""
import numpy as np

from kvlab.exercises import get


def _rotate(x, cos, sin, rows, first, second, sign=1.0, math_dtype=np.float32):
    c, s = cos[rows][:, None, :], sign * sin[rows][:, None, :]
    a, b = x[..., first].astype(math_dtype), x[..., second].astype(math_dtype)
    out = x.copy()
    out[..., first] = (a * c - b * s).astype(x.dtype)
    out[..., second] = (b * c + a * s).astype(x.dtype)
    return out


def _neox(x):
    i = np.arange(x.shape[-1] // 2)
    return i, i + x.shape[-1] // 2


def _gptj(x):
    i = np.arange(x.shape[-1] // 2)
    return 2 * i, 2 * i + 1


def neox_with_interleaved_pairs(x, cos, sin, positions):
    """Rotates neighbours (2i, 2i+1): the other style."""
    return _rotate(x, cos, sin, positions, *_gptj(x))


def neox_turns_backwards(x, cos, sin, positions):
    """a c + b s, b c - a s: the rotation by -angle."""
    return _rotate(x, cos, sin, positions, *_neox(x), sign=-1.0)


def neox_token_index_as_position(x, cos, sin, positions):
    """Reads table row t for token t: right only when positions are 0, 1, 2, …"""
    return _rotate(x, cos, sin, np.arange(len(positions)), *_neox(x))


def neox_in_fp16(x, cos, sin, positions):
    """Rotates in x's own dtype: fp16 products round before the sum."""
    return _rotate(x, cos.astype(x.dtype), sin.astype(x.dtype), positions, *_neox(x),
                   math_dtype=x.dtype)


def gptj_with_rotate_half_pairs(x, cos, sin, positions):
    """Rotates (i, i + D/2): the other style."""
    return _rotate(x, cos, sin, positions, *_neox(x))


def gptj_turns_backwards(x, cos, sin, positions):
    return _rotate(x, cos, sin, positions, *_gptj(x), sign=-1.0)


def _llama3(rotary_dim, theta, factor, low, high, original, *, wavelength_scale=2 * np.pi,
            swap_blend=False, divide_all=False):
    inv_freq = theta ** (-np.arange(0, rotary_dim, 2) / rotary_dim)
    if divide_all:
        return inv_freq / factor
    wavelength = wavelength_scale / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    if swap_blend:
        smooth = 1 - smooth
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelength < original / high, inv_freq,
                    np.where(wavelength > original / low, inv_freq / factor, blended))


def llama3_divides_every_pair(rotary_dim, theta, factor, low_freq_factor, high_freq_factor,
                              original_max_position_embeddings):
    """Linear scaling: slows the fast pairs too."""
    return _llama3(rotary_dim, theta, factor, low_freq_factor, high_freq_factor,
                   original_max_position_embeddings, divide_all=True)


def llama3_wavelength_without_two_pi(rotary_dim, theta, factor, low_freq_factor,
                                     high_freq_factor, original_max_position_embeddings):
    """Takes 1 / inv_freq as the wavelength: radians per position is not turns per position."""
    return _llama3(rotary_dim, theta, factor, low_freq_factor, high_freq_factor,
                   original_max_position_embeddings, wavelength_scale=1.0)


def llama3_blends_the_wrong_way(rotary_dim, theta, factor, low_freq_factor, high_freq_factor,
                                original_max_position_embeddings):
    """Weights the kept speed most at the long edge: the ramp runs backwards."""
    return _llama3(rotary_dim, theta, factor, low_freq_factor, high_freq_factor,
                   original_max_position_embeddings, swap_blend=True)


WRONG_ANSWERS = {
    "03.rope_neox": [neox_with_interleaved_pairs, neox_turns_backwards,
                     neox_token_index_as_position, neox_in_fp16],
    "03.rope_gptj": [gptj_with_rotate_half_pairs, gptj_turns_backwards],
    "03.llama3_inv_freq": [llama3_divides_every_pair, llama3_wavelength_without_two_pi,
                           llama3_blends_the_wrong_way],
}


def test_one_pair_by_hand():
    """head_dim 2, position 1: (1, 0) turns by one radian to (cos 1, sin 1)."""
    from kvlab.ref.rope import rope_tables

    cos, sin = rope_tables(2, 2, 10000.0)
    x = np.array([[[1.0, 0.0]]], np.float32)
    for name in ("03.rope_neox", "03.rope_gptj"):
        out = get(name).solution(x, cos, sin, np.array([1], np.int32))
        np.testing.assert_allclose(out[0, 0], [np.cos(1.0), np.sin(1.0)], rtol=1e-6)


def test_the_two_styles_pair_different_dims():
    from kvlab.ref.rope import rope_tables

    cos, sin = rope_tables(4, 4, 10000.0)
    x = np.array([[[1.0, 0.0, 0.0, 0.0]]], np.float32)  # only dim 0 is set
    neox = get("03.rope_neox").solution(x, cos, sin, np.array([1], np.int32))[0, 0]
    gptj = get("03.rope_gptj").solution(x, cos, sin, np.array([1], np.int32))[0, 0]
    assert neox[2] != 0 and neox[1] == 0   # rotate-half: dim 0 pairs with dim 2
    assert gptj[1] != 0 and gptj[2] == 0   # interleaved: dim 0 pairs with dim 1


def test_llama31_keeps_29_pairs_and_divides_the_slowest_by_8():
    speeds = get("03.llama3_inv_freq").solution(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    plain = 500000.0 ** (-np.arange(0, 128, 2) / 128)
    assert int((speeds == plain).sum()) == 29   # wavelength < 8192 / 4 = 2048 positions
    assert speeds[-1] == plain[-1] / 8           # wavelength > 8192: divided by the factor
