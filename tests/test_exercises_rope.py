"""Wrong answers the 03 (RoPE) checkers must reject (gathered by tests/test_exercises.py), and the
solutions checked against numbers worked out by hand."""
import re

import numpy as np
import pytest
from numba import cuda, float32

from kvlab.exercises import SOLUTIONS_ENV, get


@pytest.fixture(autouse=True)
def _learner_view(monkeypatch):
    """Check the function given, not the swapped-in solution (conftest sets the swap for nbval)."""
    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)


@pytest.fixture
def pictures(monkeypatch):
    """The figures the kernel explanation shows (plt.show recorded, not run); all closed before
    and after, so earlier tests' figures do not pile up here."""
    import matplotlib.pyplot as plt

    plt.close("all")
    shown = []
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: shown.append(plt.gcf()))
    yield shown
    plt.close("all")


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


# --- 03.rope_kernel --------------------------------------------------------------------------

@cuda.jit
def rope_kernel_interleaved_pairs(x, cos, sin, positions, out):
    """Rotates neighbours (2p, 2p + 1): the gptj style, not rotate-half."""
    token = cuda.blockIdx.x
    half = x.shape[2] // 2
    head, p = cuda.threadIdx.x // half, cuda.threadIdx.x % half
    pos = positions[token]
    c, s = cos[pos, p], sin[pos, p]
    a, b = float32(x[token, head, 2 * p]), float32(x[token, head, 2 * p + 1])
    out[token, head, 2 * p] = a * c - b * s
    out[token, head, 2 * p + 1] = b * c + a * s


@cuda.jit
def rope_kernel_turns_backwards(x, cos, sin, positions, out):
    """a c + b s, b c - a s: the sine's sign flipped, the rotation by -angle."""
    token = cuda.blockIdx.x
    half = x.shape[2] // 2
    head, p = cuda.threadIdx.x // half, cuda.threadIdx.x % half
    pos = positions[token]
    c, s = cos[pos, p], sin[pos, p]
    a, b = float32(x[token, head, p]), float32(x[token, head, p + half])
    out[token, head, p] = a * c + b * s
    out[token, head, p + half] = b * c - a * s


@cuda.jit
def rope_kernel_token_index_as_position(x, cos, sin, positions, out):
    """Reads table row blockIdx.x: right only when token t is at position t."""
    token = cuda.blockIdx.x
    half = x.shape[2] // 2
    head, p = cuda.threadIdx.x // half, cuda.threadIdx.x % half
    c, s = cos[token, p], sin[token, p]
    a, b = float32(x[token, head, p]), float32(x[token, head, p + half])
    out[token, head, p] = a * c - b * s
    out[token, head, p + half] = b * c + a * s


@cuda.jit
def rope_kernel_head_from_head_dim(x, cos, sin, positions, out):
    """head = t // head_dim: a head has head_dim / 2 threads, so head 1's threads redo head 0
    and head 1 is never written."""
    token = cuda.blockIdx.x
    half = x.shape[2] // 2
    head, p = cuda.threadIdx.x // x.shape[2], cuda.threadIdx.x % half
    pos = positions[token]
    c, s = cos[pos, p], sin[pos, p]
    a, b = float32(x[token, head, p]), float32(x[token, head, p + half])
    out[token, head, p] = a * c - b * s
    out[token, head, p + half] = b * c + a * s


@cuda.jit
def rope_kernel_writes_into_x(x, cos, sin, positions, out):
    """Rotates x in place, as a fused kernel might: out is left as it came (zeros)."""
    token = cuda.blockIdx.x
    half = x.shape[2] // 2
    head, p = cuda.threadIdx.x // half, cuda.threadIdx.x % half
    pos = positions[token]
    c, s = cos[pos, p], sin[pos, p]
    a, b = float32(x[token, head, p]), float32(x[token, head, p + half])
    x[token, head, p] = a * c - b * s
    x[token, head, p + half] = b * c + a * s


WRONG_ANSWERS = {
    "03.rope_neox": [neox_with_interleaved_pairs, neox_turns_backwards,
                     neox_token_index_as_position, neox_in_fp16],
    "03.rope_gptj": [gptj_with_rotate_half_pairs, gptj_turns_backwards],
    "03.llama3_inv_freq": [llama3_divides_every_pair, llama3_wavelength_without_two_pi,
                           llama3_blends_the_wrong_way],
    "03.rope_kernel": [rope_kernel_interleaved_pairs, rope_kernel_turns_backwards,
                       rope_kernel_token_index_as_position, rope_kernel_head_from_head_dim,
                       rope_kernel_writes_into_x],
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


def test_03_has_five_exercises_in_notebook_order():
    from kvlab.exercises import EXERCISES

    names = [n for n, ex in EXERCISES.items() if ex.notebook == "03_rope"]
    assert names == ["03.rope_neox", "03.rope_gptj", "03.llama3_inv_freq", "03.rope_kernel",
                     "03.rope_partial_torch"]


def test_each_wrong_kernel_fails_on_the_case_made_for_it(capsys, pictures):
    """The hand-picked cases are ordered so that each slip meets the first case that exposes it."""
    first_failure = {
        rope_kernel_writes_into_x: "position 0 turns nothing",
        rope_kernel_interleaved_pairs: "one token, one head, at position 3",
        rope_kernel_turns_backwards: "one token, one head, at position 3",
        rope_kernel_token_index_as_position: "one token, one head, at position 3",
        rope_kernel_head_from_head_dim: "two heads of 16 dims",
    }
    for kernel, label in first_failure.items():
        assert get("03.rope_kernel").check(kernel) is False
        out = capsys.readouterr().out
        assert f"fails on case '{label}'" in out, (kernel, out)
    assert len(pictures) == len(first_failure)  # each failure drew its picture


def test_the_solution_kernel_is_bit_equal_in_the_simulator():
    """So the checker's one-fp16-ulp tolerance (for a GPU's FMA) hides nothing here."""
    from kvlab.exercises.rope import _launch_rope, _rope_reference

    exercise = get("03.rope_kernel")
    for case in exercise.cases():
        got = _launch_rope(exercise.solution, case)[0]
        want = _rope_reference(**case.kwargs)
        assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16),
                                                          want.view(np.uint16)), case.label


def test_the_kernel_cases_use_shuffled_positions_fp16_and_a_zeroed_out():
    cases = get("03.rope_kernel").cases()
    assert all(c.kwargs["x"].dtype == np.float16 and not c.kwargs["out"].any() for c in cases)
    assert any(c.kwargs["x"].shape[1] > 1 for c in cases if not c.random)
    assert any((c.kwargs["positions"] != np.arange(len(c.kwargs["positions"]))).any()
               and len(c.kwargs["positions"]) > 1 for c in cases if not c.random)
    for c in cases:  # the simulator runs every thread in Python: keep the launches small
        tokens, heads, head_dim = c.kwargs["x"].shape
        assert tokens * heads * head_dim // 2 <= 64


def test_the_kernel_explanation_lists_the_wrong_rows_and_draws_both_kernels(capsys, pictures):
    """A failing case draws which thread wrote each element of out, yours beside the solution's
    (red outlines where they differ), after a line per (token, head) row that is wrong."""
    import matplotlib.pyplot as plt

    exercise = get("03.rope_kernel")
    case = next(c for c in exercise.cases() if c.label == "two heads of 16 dims")
    exercise.explain(rope_kernel_head_from_head_dim, case)
    out = capsys.readouterr().out
    assert "token 0 (position 3), head 1: dims 0-15" in out, out
    assert not re.search(r"head 0: dims", out), out  # head 0 is right: it is written twice
    assert "the indices are right" not in out
    assert len(pictures) == 1
    yours, solution = pictures[0].axes[:2]
    assert (yours.get_title(), solution.get_title()) == ("your kernel", "the solution")
    assert "writes to out" in pictures[0].get_suptitle()
    outlined = [p for p in yours.patches if isinstance(p, plt.Rectangle)]
    assert len(outlined) == 3 * 16 * 2  # every element of head 0 (a race) and head 1 (untouched)


def test_a_kernel_that_does_not_widen_to_float32_by_hand_passes_too():
    """x's fp16 values times the float32 tables already compute in float32."""
    @cuda.jit
    def plain(x, cos, sin, positions, out):
        token = cuda.blockIdx.x
        half = x.shape[2] // 2
        head, p = cuda.threadIdx.x // half, cuda.threadIdx.x % half
        c, s = cos[positions[token], p], sin[positions[token], p]
        a, b = x[token, head, p], x[token, head, p + half]
        out[token, head, p] = a * c - b * s
        out[token, head, p + half] = b * c + a * s

    assert get("03.rope_kernel").check(plain, quiet=True) is True


def test_a_kernel_with_the_right_indices_is_told_to_look_at_its_values(capsys, pictures):
    """The sign slip writes every element from the right thread: the picture alone shows no red."""
    exercise = get("03.rope_kernel")
    case = next(c for c in exercise.cases() if c.label == "one token, one head, at position 3")
    exercise.explain(rope_kernel_turns_backwards, case)
    out = capsys.readouterr().out
    assert "token 0 (position 3), head 0: dims 0-7" in out
    assert "the indices are right, the values are not" in out
    assert len(pictures) == 1


# --- 03.rope_partial_torch ---
import torch  # noqa: E402


def _rope_torch(x, cos, sin, positions, *, pair_offset=None, float32=True, copy_rest=True,
                use_positions=True):
    """The solution with one step changed (each wrong answer below changes one)."""
    half = cos.shape[1]
    offset = half if pair_offset is None else pair_offset(x.shape[-1], half)
    rows = positions.long() if use_positions else torch.arange(len(positions))
    c, s = cos[rows][:, None, :], sin[rows][:, None, :]
    a, b = x[..., :half], x[..., offset:offset + half]
    if float32:
        a, b = a.float(), b.float()
    else:
        c, s = c.half(), s.half()
    out = x.clone() if copy_rest else torch.zeros_like(x)
    out[..., :half] = (a * c - b * s).half()
    out[..., offset:offset + half] = (b * c + a * s).half()
    return out


def rope_pairs_by_head_dim(**kwargs):
    """Pair i = dims (i, i + head_dim / 2): right only when the whole head turns."""
    return _rope_torch(**kwargs, pair_offset=lambda head_dim, half: head_dim // 2)


def rope_torch_in_fp16(**kwargs):
    """fp16 tables and fp16 products: rounded at every step, not once."""
    return _rope_torch(**kwargs, float32=False)


def rope_drops_the_pass_through_dims(**kwargs):
    """Starts from zeros: the dims past rotary_dim must be copied, not lost."""
    return _rope_torch(**kwargs, copy_rest=False)


def rope_torch_token_index_as_position(**kwargs):
    """cos[t] for token t: its position is positions[t]."""
    return _rope_torch(**kwargs, use_positions=False)


WRONG_ANSWERS["03.rope_partial_torch"] = [rope_pairs_by_head_dim, rope_torch_in_fp16,
                                          rope_drops_the_pass_through_dims,
                                          rope_torch_token_index_as_position]


def test_the_partial_rotary_checker_names_the_pairing_slip(monkeypatch, capsys):
    from kvlab.exercises import SOLUTIONS_ENV, check

    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)
    check("03.rope_partial_torch", rope_pairs_by_head_dim)
    out = capsys.readouterr().out
    assert "fails on case 'rotary_dim 8 of head_dim 16" in out
    assert "dims 8-15 (not turned: copied): 24 of 48 values differ" in out
    assert "Yours pairs dim i with dim i + head_dim / 2 = i + 8" in out, out
    check("03.rope_partial_torch", rope_torch_in_fp16)
    out = capsys.readouterr().out
    assert "dims 8-15 (not turned: copied): ✓" in out and "the rounding" in out, out
