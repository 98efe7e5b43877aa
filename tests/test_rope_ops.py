"""Stage 3 (RoPE) ops on every backend against the NumPy reference, bad inputs on every backend,
and the CUDA kernel at real sizes on a GPU.

Tolerances (against kvlab.ref.rope, the same tables and positions):

| what | bound | why |
|---|---|---|
| rope_tables | bit for bit | every backend copies the reference's float64-computed tables |
| pass-through dims (>= rotary_dim) | bit for bit | copied, never converted |
| rotated dims, float32 x | ``2**-22 * (abs(a) + abs(b))`` per coordinate | the same two products and a sum in float32 everywhere (the CUDA kernel multiplies through ``mul_rn``, so no FMA contraction on a GPU either); the bound only leaves room for a backend that reorders. Measured on the simulator and torch on the CPU: equal |
| rotated dims, float16 x | 1 float16 ulp | float32 results that differed by an ulp could round to neighbouring float16 values; measured: equal |

The cuda backend runs in Numba's simulator here: shapes stay tiny (<= 2 heads x <= 40 tokens).
"""
from typing import Any

import numpy as np
import pytest

from kvlab.backends import get_backend
from kvlab.ref.rope import apply_rope, pair_dims, rope_tables

REFERENCE = get_backend("numpy")
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    as_bits = f"u{expected.itemsize}"
    np.testing.assert_array_equal(actual.view(as_bits), expected.view(as_bits))


def assert_rotation_close(got: np.ndarray, want: np.ndarray, x: np.ndarray, rotary_dim: int,
                          style: str) -> None:
    """The tolerances of the module docstring: bits for pass-through dims, ulps for rotated ones."""
    assert got.dtype == want.dtype == x.dtype and got.shape == want.shape == x.shape
    assert_same_bits(got[..., rotary_dim:], want[..., rotary_dim:])
    first, second = pair_dims(rotary_dim, style)
    for dims in (first, second):
        g, w = got[..., dims].astype(np.float64), want[..., dims].astype(np.float64)
        if x.dtype == np.float32:
            size = np.abs(x[..., first].astype(np.float64)) + np.abs(x[..., second])
            assert (np.abs(g - w) <= 2.0**-22 * size).all()
        else:
            ulp = np.spacing(np.abs(want[..., dims])).astype(np.float64)
            assert (np.abs(g - w) <= ulp).all()


def run_apply_rope(backend, x, cos, sin, positions, style, rotary_dim=None) -> np.ndarray:
    moved = [backend.asarray(a) for a in (x, cos, sin, positions)]
    out = backend.rope.apply_rope(*moved, style=style, rotary_dim=rotary_dim)
    assert backend.to_numpy(moved[0]).tobytes() == x.tobytes()  # x is not written
    return backend.to_numpy(out)


CASES = [  # tokens, heads, head_dim, rotary_dim, max_positions, positions
    pytest.param(40, 2, 64, 64, 64, "shuffled", id="prefill-40-shuffled-d64"),
    pytest.param(1, 2, 128, 128, 4096, "late", id="decode-1-token-d128-pos4000"),
    pytest.param(7, 1, 256, 256, 300, "gaps", id="d256-non-contiguous"),
    pytest.param(9, 2, 128, 64, 100, "shuffled", id="partial-rotary-half"),
    pytest.param(5, 2, 80, 32, 50, "repeat", id="partial-rotary-d80-repeated-positions"),
    pytest.param(0, 2, 64, 64, 8, "shuffled", id="no-tokens"),
]


def make_positions(kind: str, num_tokens: int, max_positions: int, rng) -> np.ndarray:
    if kind == "shuffled":
        values = rng.permutation(max_positions)[:num_tokens]
    elif kind == "late":
        values = np.arange(max_positions - 96, max_positions - 96 + num_tokens)
    elif kind == "gaps":
        values = np.sort(rng.choice(max_positions, num_tokens, replace=False))
    else:  # a position may appear twice (two sequences of a batch at the same position)
        values = rng.integers(0, 3, num_tokens)
    return values.astype(np.int32)


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("tokens, heads, head_dim, rotary_dim, max_positions, where", CASES)
def test_apply_rope_matches_reference(backend, style, dtype, tokens, heads, head_dim, rotary_dim,
                                      max_positions, where):
    rng = np.random.default_rng(tokens * 1000 + head_dim)
    cos, sin = rope_tables(max_positions, rotary_dim, 500000.0, LLAMA31_SCALING)
    x = (4 * rng.standard_normal((tokens, heads, head_dim))).astype(dtype)
    positions = make_positions(where, tokens, max_positions, rng)
    want = apply_rope(x, cos, sin, positions, style, rotary_dim)
    got = run_apply_rope(backend, x, cos, sin, positions, style, rotary_dim)
    assert_rotation_close(got, want, x, rotary_dim, style)


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    LLAMA31_SCALING,
], ids=["default", "linear", "dynamic", "yarn", "llama3"])
def test_rope_tables_match_reference_bit_for_bit(backend, scaling):
    want = rope_tables(64, 32, 10000.0, scaling)
    got = backend.rope.rope_tables(64, 32, 10000.0, scaling)
    for g, w in zip(got, want):
        assert_same_bits(backend.to_numpy(g), w)


def test_backend_tables_feed_backend_rotation(backend):
    """The tables a backend builds are the backend's own arrays, ready for its apply_rope."""
    cos, sin = backend.rope.rope_tables(16, 8, 10000.0)
    x = np.ones((3, 1, 8), np.float32)
    positions = np.array([0, 5, 15], np.int32)
    out = backend.rope.apply_rope(backend.asarray(x), cos, sin, backend.asarray(positions))
    want = apply_rope(x, *rope_tables(16, 8, 10000.0), positions)
    assert_rotation_close(backend.to_numpy(out), want, x, 8, "neox")


# --- bad inputs: a clear error naming the argument, and x left as it was ------------------------

def holds_float64(backend) -> bool:
    """False for a backend that cannot hold float64 arrays at all (torch on MPS)."""
    try:
        backend.asarray(np.zeros(1, np.float64))
    except TypeError:
        return False
    return True


def valid_apply_args() -> dict[str, Any]:
    """5 tokens, 2 heads of 64, tables for 32 positions and rotary_dim 64."""
    cos, sin = rope_tables(32, 64, 10000.0)
    x = np.random.default_rng(0).standard_normal((5, 2, 64)).astype(np.float16)
    return dict(x=x, cos=cos, sin=sin, positions=np.arange(3, 8, dtype=np.int32), style="neox")


APPLY_BAD_INPUTS = [  # {argument: bad value}, error, message (a regex)
    ({"x": np.zeros((5, 2, 64), np.float64)}, TypeError,
     "x must have dtype float16 or float32, got float64"),
    ({"x": np.zeros((5, 2, 64), np.int32)}, TypeError, "x must have dtype float16 or float32"),
    ({"x": np.zeros((5, 128), np.float16)}, ValueError,
     r"x must be 3-D \[T, heads, head_dim\], got shape \[5, 128\]"),
    ({"x": np.zeros((5, 2, 65), np.float16)}, ValueError, "x's head_dim must be even.*got 65"),
    ({"x": np.zeros((5, 2, 32), np.float16)}, ValueError,
     r"rotary_dim \(64\) must be <= x's head_dim \(32\)"),
    ({"cos": np.zeros((32, 32), np.float16)}, TypeError,
     "cos must have dtype float32, got float16"),
    ({"sin": np.zeros((32, 32), np.float64)}, TypeError, "sin must have dtype float32"),
    ({"sin": np.zeros((32, 16), np.float32)}, ValueError,
     r"sin must have shape .* = \[32, 32\] matching cos, got \[32, 16\]"),
    ({"cos": np.zeros(32, np.float32)}, ValueError, r"cos must be 2-D \[max_positions"),
    ({"positions": np.arange(3, 8, dtype=np.int64)}, TypeError,
     "positions must have dtype int32, got int64"),
    ({"positions": np.arange(4, dtype=np.int32)}, ValueError,
     r"positions must have shape \[T\] = \[5\] matching x, got \[4\]"),
    ({"positions": np.array([0, 31, 32, 40, 1], np.int32)}, ValueError,
     r"positions \[32, 40\] are outside the RoPE table: cos and sin have 32 rows"),
    ({"positions": np.array([0, -1, 2, 3, 4], np.int32)}, ValueError,
     r"positions \[-1\] are outside the RoPE table"),
    ({"style": "llama"}, ValueError, "style must be 'neox' .rotate-half. or 'gptj' .interleaved."),
    ({"rotary_dim": 32}, ValueError,
     "rotary_dim must match the tables: cos has 32 columns, so it was built for rotary_dim 64"),
    ({"rotary_dim": 63}, ValueError, "rotary_dim must be even"),
    ({"rotary_dim": 64.0}, TypeError, "rotary_dim must be an int, got float"),
    ({"x": [[[0.0, 1.0]]]}, TypeError, "x must be an array .* got list"),
]


@pytest.mark.parametrize("bad, error, message", APPLY_BAD_INPUTS,
                         ids=[f"{'-'.join(bad)}-{i}" for i, (bad, *_) in
                              enumerate(APPLY_BAD_INPUTS)])
def test_apply_rope_rejects_bad_inputs(backend, bad, error, message):
    args = {**valid_apply_args(), **bad}
    if not holds_float64(backend) and any(getattr(a, "dtype", None) == np.float64
                                          for a in bad.values()):
        # MPS has no float64: the bad array cannot be made there, and asarray says so
        with pytest.raises(TypeError, match="has no float64"):
            [backend.asarray(a) for a in bad.values()]
        return
    moved = {name: backend.asarray(a) if isinstance(a, np.ndarray) else a
             for name, a in args.items()}
    before = {name: backend.to_numpy(moved[name]) for name, a in args.items()
              if isinstance(a, np.ndarray)}
    with pytest.raises(error, match=message):
        backend.rope.apply_rope(**moved)
    for name, was in before.items():
        assert_same_bits(backend.to_numpy(moved[name]), was)


TABLE_BAD_INPUTS = [  # (max_positions, rotary_dim, theta, scaling), error, message
    ((32, 63, 1e4, None), ValueError, "rotary_dim must be even .*got 63"),
    ((32, 0, 1e4, None), ValueError, "rotary_dim must be >= 2, got 0"),
    ((0, 64, 1e4, None), ValueError, "max_positions must be >= 1, got 0"),
    ((32.0, 64, 1e4, None), TypeError, "max_positions must be an int, got float"),
    ((32, 64, 1.0, None), ValueError, "theta must be a finite number > 1"),
    ((32, 64, float("inf"), None), ValueError, "theta must be a finite number > 1"),
    ((32, 64, "1e4", None), TypeError, "theta must be a number, got str"),
    ((32, 64, 1e4, {"rope_type": "longrope"}), ValueError,
     "scaling rope_type must be one of .* got 'longrope'"),
    ((32, 64, 1e4, {"rope_type": "linear"}), ValueError, r"scaling 'linear' needs \['factor'\]"),
    ((32, 64, 1e4, {"rope_type": "linear", "factor": 0.5}), ValueError,
     r"scaling\['factor'\] must be >= 1"),
    ((32, 64, 1e4, {"rope_type": "linear", "factor": "2"}), TypeError,
     r"scaling\['factor'\] must be a finite number, got '2'"),
    ((32, 64, 1e4, {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}), ValueError,
     r"scaling 'linear' does not use \['beta_fast'\]"),
    ((32, 64, 1e4, {"rope_type": "yarn", "factor": 4.0}), ValueError,
     r"scaling 'yarn' needs \['original_max_position_embeddings'\]"),
    ((32, 64, 1e4, {"type": "dynamic", "factor": 2.0}), ValueError,
     r"scaling 'dynamic' needs \['original_max_position_embeddings'\]"),
    ((32, 64, 1e4, {**LLAMA31_SCALING, "low_freq_factor": 4.0}), ValueError,
     "llama3 needs low_freq_factor < high_freq_factor"),
    ((32, 64, 1e4, {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}), ValueError,
     "scaling has rope_theta 500000.0 but theta is 10000.0"),
    ((32, 64, 1e4, [("rope_type", "linear")]), TypeError, "scaling must be a dict"),
    ((32, 2, 1e4, {"rope_type": "dynamic", "factor": 2.0,
                   "original_max_position_embeddings": 8}), ValueError,
     "dynamic NTK scaling needs rotary_dim > 2"),
]


@pytest.mark.parametrize("args, error, message", TABLE_BAD_INPUTS,
                         ids=[str(i) for i in range(len(TABLE_BAD_INPUTS))])
def test_rope_tables_rejects_bad_inputs(backend, args, error, message):
    with pytest.raises(error, match=message):
        backend.rope.rope_tables(*args)


def test_hugging_face_rope_parameters_are_accepted_as_they_are():
    """A v5 config's rope_parameters (rope_theta and partial_rotary_factor inside) works as is."""
    params = {**LLAMA31_SCALING, "rope_theta": 500000.0, "partial_rotary_factor": 1.0}
    for got, want in zip(rope_tables(64, 16, 500000.0, params),
                         rope_tables(64, 16, 500000.0, LLAMA31_SCALING)):
        assert_same_bits(got, want)


# --- a real GPU, real sizes ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("style, rotary_dim", [("neox", 128), ("gptj", 128), ("neox", 64)])
def test_cuda_kernel_at_llama_size_matches_reference(style, rotary_dim, dtype):
    """4096 tokens x 32 heads x 128 dims (a Llama 3.1 8B prefill's q) on the GPU."""
    gpu = get_backend("cuda")
    rng = np.random.default_rng(7)
    cos, sin = rope_tables(131072, rotary_dim, 500000.0, LLAMA31_SCALING)
    x = (4 * rng.standard_normal((4096, 32, 128))).astype(dtype)
    positions = rng.permutation(131072)[:4096].astype(np.int32)
    got = run_apply_rope(gpu, x, cos, sin, positions, style, rotary_dim)
    want = apply_rope(x, cos, sin, positions, style, rotary_dim)
    assert_same_bits(got, want)  # mul_rn: no FMA on the GPU, so the very same roundings


@pytest.mark.gpu
@pytest.mark.sanitize
def test_cuda_kernel_partial_last_block_under_memcheck():
    """A thread count that is not a multiple of the block (3 x 5 x 40 pairs): the spare threads
    of the last block must not touch memory (compute-sanitizer memcheck runs this one)."""
    gpu = get_backend("cuda")
    cos, sin = rope_tables(64, 48, 10000.0)
    x = np.random.default_rng(1).standard_normal((3, 5, 80)).astype(np.float16)
    positions = np.array([63, 0, 17], np.int32)
    for style in ("neox", "gptj"):
        got = run_apply_rope(gpu, x, cos, sin, positions, style, 48)
        assert_rotation_close(got, apply_rope(x, cos, sin, positions, style, 48), x, 48, style)
