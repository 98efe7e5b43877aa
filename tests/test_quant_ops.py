"""Stage 2 (quantization) ops: the NumPy reference against torch's own FP8 and hand-worked numbers,
then every backend against the reference, bit for bit, then edge values and bad inputs.

Tolerances (the one place they are stated, with the reason):
- codes, scales and dequantized values: **exact** across backends. Every step is one IEEE float32
  operation (a max, a division, a round half to even, an fp16 store), so there is nothing to drift.
- round trip, per element: ``|x - x'| <= scale / 2 + qmax * |scale - fp16(scale)|`` (+1 ulp) for
  int8/int4: half a step of rounding plus the stored scale's own fp16 rounding; for fp8 the step
  is the E4M3 spacing at |x / scale| (relative 2**-4), so ``|x - x'| <= |x| * 2**-4 + 2**-10 * scale``
  plus the same scale term.
The cuda backend runs in Numba's simulator here: shapes stay small (<= 2 heads, <= 40 tokens).
"""
from typing import Any

import numpy as np
import pytest
import torch

from kvlab.backends import BACKENDS, get_backend
from kvlab.cache import KvCacheManager, KvLayer, KvPool
from kvlab.dtypes import get_dtype
from kvlab.ref.quant import (
    dequantize, fp8_e4m3_decode, fp8_e4m3_encode, pack_int4, quantize, unpack_int4,
    write_kv_quant,
)

REFERENCE = get_backend("numpy")
DTYPES = ["int8", "fp8_e4m3", "int4"]
CACHE_DTYPES = ["int8", "fp8_e4m3"]
BLOCK_SIZE = 16


# the three backends, not the root conftest's extra "torch-tiles": these torch ops take no tiles
@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def kv_with_outliers(num_tokens: int, num_kv_heads: int = 2, head_dim: int = 64, seed: int = 0,
                     dtype=np.float16) -> np.ndarray:
    """Gaussian K/V with a per-(token, head) magnitude spread over 3 decades and two outlier
    channels 20x larger: the kind of vectors whose scales differ a lot."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
    x *= 10.0 ** rng.uniform(-2, 1, (num_tokens, num_kv_heads, 1))
    x[..., [3, head_dim - 5]] *= 20
    return x.astype(dtype)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.itemsize}")


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(bits(actual), bits(expected))


def to_np(backend, value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(to_np(backend, v) for v in value)
    return None if value is None else backend.to_numpy(value)


def on(backend, value: Any) -> Any:
    return backend.asarray(value) if isinstance(value, np.ndarray) else value


# --- FP8: the NumPy codec against torch.float8_e4m3fn ------------------------------------------

def test_fp8_decode_all_256_codes_bit_exact_with_torch():
    codes = np.arange(256, dtype=np.uint8)
    expected = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    assert_same(fp8_e4m3_decode(codes), expected)  # NaN payloads included
    assert fp8_e4m3_decode(np.uint8(0x7E)) == 448 and fp8_e4m3_decode(np.uint8(1)) == 2.0**-9


def test_dequantize_every_fp8_code_on_every_backend(backend):
    """All 256 E4M3 bytes (subnormals and -0 included) through each backend's dequantize with
    scale 1: the same bits as the reference decode. The two NaN codes (0x7f, 0xff) must decode to
    NaN of their sign; the CUDA kernels give the canonical payload (a cache never holds NaN:
    writes refuse it)."""
    codes = np.arange(256, dtype=np.uint8).reshape(2, 1, 128)
    scales = np.ones((2, 1), np.float16)
    got = backend.to_numpy(backend.quant.dequantize(backend.asarray(codes),
                                                    backend.asarray(scales), "fp8_e4m3"))
    want = fp8_e4m3_decode(codes)
    nan = (codes & 0x7F) == 0x7F
    assert np.isnan(got[nan]).all() and (np.signbit(got[nan]) == np.signbit(want[nan])).all()
    got[nan] = want[nan] = 0
    assert_same(got, want)


def fp8_sweep() -> np.ndarray:
    """Every float32 whose bits are a multiple of 251 (17M values, all exponents), every E4M3
    value, every midpoint between neighbours (the ties), their neighbours one ulp away, zeros,
    subnormals, saturation, infinities and NaNs of both signs."""
    values = fp8_e4m3_decode(np.arange(256, dtype=np.uint8))
    finite = np.sort(values[np.isfinite(values)])
    mids = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)
    near = np.concatenate([np.nextafter(mids, np.float32(np.inf)),
                           np.nextafter(mids, np.float32(-np.inf))])
    strided = (np.arange(0, 2**32, 251, dtype=np.uint64).astype(np.uint32)).view(np.float32)
    special = np.array([0.0, -0.0, 448, 449, 464, 465, 480, 1e30, np.inf, -np.inf, np.nan,
                        -np.nan, 2.0**-10, 3 * 2.0**-10, 2.0**-6, 1e-40], dtype=np.float32)
    return np.concatenate([strided, finite, mids, near, special])


def test_fp8_encode_bit_exact_with_torch_over_a_dense_sweep():
    x = fp8_sweep()
    expected = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(fp8_e4m3_encode(x), expected)


def test_torch_fp8_encode_bit_exact_with_torch_over_the_sweep():
    """The torch backend's encoder (exponent read from the float32 bits; MPS has no FP8 dtype)
    over the same sweep, where its input is allowed: finite, |x| <= 448 (zeros, subnormals and
    the rounding midpoints included)."""
    from kvlab.kernels.mps.quant import fp8_e4m3_encode as torch_encode

    x = fp8_sweep()
    x = torch.from_numpy(x[np.isfinite(x) & (np.abs(x) <= 448)])
    assert torch.equal(torch_encode(x), x.to(torch.float8_e4m3fn).view(torch.uint8))
    half = torch.tensor([1.0, 2.0, 0.3, -448.0], dtype=torch.float16)  # widened first
    assert torch.equal(torch_encode(half), half.float().to(torch.float8_e4m3fn).view(torch.uint8))


def test_fp8_encode_by_hand():
    x = np.array([448, 1000, np.inf, -np.inf, np.nan, 2.0**-10, 3 * 2.0**-10, -0.0, 17.0],
                 np.float32)
    # torch 2.13 saturates overflow and inf to +-448 (0x7E / 0xFE); 2**-10 is a tie between 0
    # and the first subnormal 2**-9 -> even (0); 3 * 2**-10 ties 1 and 2 -> 2; 17 ties 16 (0x58) and 18 -> 16.
    assert fp8_e4m3_encode(x).tolist() == [0x7E, 0x7E, 0x7E, 0xFE, 0x7F, 0, 2, 0x80, 0x58]


def test_int4_pack_round_trip():
    q = np.arange(-8, 8, dtype=np.int8)
    assert pack_int4(q)[0] == ((-8 & 0xF) | (-7 & 0xF) << 4)
    np.testing.assert_array_equal(unpack_int4(pack_int4(q)), q)


# --- the reference against hand-worked numbers --------------------------------------------------

def test_int8_by_hand():
    x = np.zeros((1, 1, 4), np.float32)
    x[0, 0] = [1.0, -0.5, 127 / 254, 0.25]  # amax 1 -> scale 1/127: codes 127, -63.5 -> -64 (even)
    codes, scales = quantize(x, "int8")
    assert codes.tolist() == [[[127, -64, 64, 32]]]  # 63.5 -> 64 (even), 31.75 -> 32
    assert scales.dtype == np.float16 and scales[0, 0] == np.float16(np.float32(1) / 127)


def test_zero_vector_has_zero_codes_and_dequantizes_to_zero():
    for kv_dtype in DTYPES:
        codes, scales = quantize(np.zeros((2, 1, 64), np.float16), kv_dtype)
        assert not codes.any() and (scales == 0).all()  # 1e-8 / qmax underflows fp16 to 0
        assert not dequantize(codes, scales, kv_dtype).any()


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_round_trip_error_within_half_a_step(kv_dtype):
    x = kv_with_outliers(40, 2, 64, dtype=np.float32)
    x[0, 0, :] = 0
    x[1, 0, 0] = 7.0
    x[1, 0, 1:] = 0  # exactly at +amax and zeros elsewhere
    x[1, 1, :] = np.linspace(-1, 1, 64)  # values exactly at +-amax
    codes, scales = quantize(x, kv_dtype)
    dt = get_dtype(kv_dtype)
    y = dequantize(codes, scales, kv_dtype)
    groups = (x.shape[2] // dt.group_size) if dt.group_size else 1
    amax = np.abs(x.reshape(40, 2, groups, -1)).max(-1)
    s32 = np.maximum(amax, np.float32(1e-8)) / np.float32(dt.qmax)
    s16 = scales.astype(np.float32).reshape(40, 2, groups)
    scale_err = dt.qmax * np.abs(s32 - s16)
    if kv_dtype == "fp8_e4m3":
        bound = np.abs(x.reshape(40, 2, groups, -1)) * 2.0**-4 + (2.0**-10 * s32 + scale_err)[..., None]
    else:
        bound = np.broadcast_to((s32 / 2 + scale_err)[..., None], (40, 2, groups, x.shape[2] // groups))
    err = np.abs(x - y).reshape(bound.shape)
    assert (err <= bound * (1 + 2**-20) + 1e-30).all(), (err - bound).max()
    assert np.abs(y[1, 1, [0, -1]]).max() <= 1.0 + scale_err.max()  # +-amax map to +-qmax


def test_ties_round_half_to_even():
    # amax 127 -> scale exactly 1.0 in float32 and fp16: x / scale = x, so halves are ties
    x = np.array([[[127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]]], np.float32)
    assert quantize(x, "int8")[0].tolist() == [[[127, 0, 2, 2, 0, -2, -2, 126]]]


def test_write_kv_quant_lands_what_quantize_returns():
    k, v = kv_with_outliers(5, seed=1), kv_with_outliers(5, seed=2)
    k_pool = np.zeros((4, BLOCK_SIZE, 2, 64), np.int8)
    v_pool = np.zeros_like(k_pool)
    k_scales = np.zeros((4, BLOCK_SIZE, 2), np.float16)
    v_scales = np.zeros_like(k_scales)
    write_kv_quant(k, v, k_pool, v_pool, k_scales, v_scales, ints(46, 47, -1, 0, 1), "int8")
    codes, scales = quantize(k, "int8")
    assert (k_pool[2, 14] == codes[0]).all() and (k_pool[0, 1] == codes[4]).all()
    assert (k_scales[2, 15] == scales[1]).all() and np.count_nonzero(k_scales.any(-1)) == 4


# --- every backend against the reference, bit for bit ------------------------------------------

@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("shape, dtype", [
    pytest.param((5, 2, 64), np.float16, id="5x2x64-fp16"),
    pytest.param((1, 1, 128), np.float32, id="decode-1x1x128-fp32"),
    pytest.param((3, 1, 256), np.float16, id="d256"),
    pytest.param((0, 2, 64), np.float16, id="no-tokens"),
])
def test_quantize_dequantize_match_reference(backend, kv_dtype, shape, dtype):
    x = kv_with_outliers(*shape, dtype=dtype) if shape[0] else np.zeros(shape, dtype)
    if shape[0]:
        x[0, 0, :8] = [0, -0.0, 0.5, -0.5, 1e-3, 2, -2, 0]  # signed zeros, small values
    want = quantize(x, kv_dtype)
    got = to_np(backend, backend.quant.quantize(backend.asarray(x), kv_dtype))
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    deq = to_np(backend, backend.quant.dequantize(*(backend.asarray(a) for a in want), kv_dtype))
    assert_same(deq, dequantize(*want, kv_dtype))


def test_fp8_dequantize_all_256_codes_on_every_backend(backend):
    codes = np.arange(256, dtype=np.uint8).reshape(4, 1, 64)
    scales = np.array([[1.0], [0.5], [3.0], [2.0**-20]], np.float16)
    want = dequantize(codes, scales, "fp8_e4m3")
    got = to_np(backend, backend.quant.dequantize(backend.asarray(codes),
                                                   backend.asarray(scales), "fp8_e4m3"))
    finite = np.isfinite(want)
    assert_same(got[finite], want[finite])
    assert np.isnan(got[~finite]).all()  # NaN codes decode to NaN (payload may differ on a GPU)


@pytest.mark.parametrize("kv_dtype", CACHE_DTYPES)
def test_write_gather_copy_match_reference(backend, kv_dtype):
    """write_kv_quant with padding and a block boundary, then a batched gather_kv_quant and a
    copy_blocks_quant, on pools full of leftovers."""
    rng = np.random.default_rng(3)
    storage = get_dtype(kv_dtype).storage
    k_pool = rng.integers(0, 120, (4, BLOCK_SIZE, 2, 64)).astype(storage)
    v_pool = rng.integers(0, 120, (4, BLOCK_SIZE, 2, 64)).astype(storage)
    k_scales = rng.uniform(0, 1, (4, BLOCK_SIZE, 2)).astype(np.float16)
    v_scales = rng.uniform(0, 1, (4, BLOCK_SIZE, 2)).astype(np.float16)
    k, v = kv_with_outliers(6, seed=4), kv_with_outliers(6, seed=5)
    slots = ints(46, 47, -1, 0, 1, 60)  # crosses from block 2 into block 0; padding; block 3
    args = [k, v, k_pool, v_pool, k_scales, v_scales, slots, kv_dtype]
    moved = [on(backend, a) for a in args]
    backend.quant.write_kv_quant(*moved)
    write_kv_quant(*args)
    for got, want in zip(moved[2:6], args[2:6]):
        assert_same(backend.to_numpy(got), want)

    tables = np.array([[2, 0, -1], [3, -1, -1]], np.int32)
    lens = ints(18, 13)
    got = to_np(backend, backend.quant.gather_kv_quant(*moved[2:6], backend.asarray(tables),
                                                        backend.asarray(lens), kv_dtype))
    want = REFERENCE.quant.gather_kv_quant(k_pool, v_pool, k_scales, v_scales, tables, lens,
                                           kv_dtype)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    got1 = to_np(backend, backend.quant.gather_kv_quant(*moved[2:6], backend.asarray(ints(2, 0)),
                                                         18, kv_dtype))
    assert_same(got1[0], want[0][:18])

    backend.quant.copy_blocks_quant(*moved[2:6], backend.asarray(ints(2, 0)),
                                    backend.asarray(ints(1, 3)), kv_dtype)
    REFERENCE.quant.copy_blocks_quant(k_pool, v_pool, k_scales, v_scales, ints(2, 0), ints(1, 3),
                                      kv_dtype)
    for got, want in zip(moved[2:6], args[2:6]):
        assert_same(backend.to_numpy(got), want)


# --- inputs a dtype cannot store, and bad arguments: a clear error, nothing written -------------

def quant_args(kv_dtype: str = "int8") -> dict[str, Any]:
    storage = get_dtype(kv_dtype).storage
    return dict(k=kv_with_outliers(3, seed=6), v=kv_with_outliers(3, seed=7),
                k_pool=np.ones((4, BLOCK_SIZE, 2, 64), storage),
                v_pool=np.ones((4, BLOCK_SIZE, 2, 64), storage),
                k_scales=np.ones((4, BLOCK_SIZE, 2), np.float16),
                v_scales=np.ones((4, BLOCK_SIZE, 2), np.float16),
                slots=ints(5, 6, 7), kv_dtype=kv_dtype)


def poisoned(value: float, dtype=np.float16) -> np.ndarray:
    x = kv_with_outliers(3, seed=8, dtype=dtype)
    x[1, 1, 7] = value
    return x


BAD = [  # {argument: bad value}, error, message (a regex)
    ({"k": poisoned(np.nan)}, ValueError, r"k holds 1 value\(s\) that int8 cannot store .*"
     r"first at \[t, head, dim\] = \[1, 1, 7\]: nan"),
    ({"v": poisoned(np.inf)}, ValueError, r"v holds 1 value\(s\) .* = \[1, 1, 7\]: inf"),
    ({"k": poisoned(-np.inf, np.float32), "v": poisoned(1, np.float32)}, ValueError,
     r"k holds 1 value\(s\)"),
    ({"k": poisoned(1e7, np.float32), "v": poisoned(1, np.float32)}, ValueError,
     r"\|x\| > 8.31901e\+06 = 127 x 65504, where the fp16 scale overflows"),
    ({"kv_dtype": "int4"}, ValueError, "kv_dtype must be one of int8, fp8_e4m3 here, got 'int4'"),
    ({"kv_dtype": "fp8_e4m3"}, TypeError, "k_pool must have dtype uint8 matching kv_dtype "
     "fp8_e4m3, got int8"),
    ({"kv_dtype": 8}, TypeError, "kv_dtype must be a dtype name"),
    ({"k_scales": np.ones((4, BLOCK_SIZE, 2), np.float32)}, TypeError,
     "k_scales must have dtype float16 matching k_pool, got float32"),
    ({"v_scales": np.ones((4, BLOCK_SIZE, 3), np.float16)}, ValueError,
     r"v_scales must have shape \[num_blocks, block_size, num_kv_heads\] = \[4, 16, 2\]"),
    ({"k": kv_with_outliers(3).astype(np.int8)}, TypeError,
     "k must have dtype float16 or float32 matching k_pool, got int8"),
    ({"v": kv_with_outliers(3, dtype=np.float32)}, TypeError,
     "v must have dtype float16 matching k, got float32"),
    ({"slots": ints(5, 5, 7)}, ValueError, r"slots must not repeat .* duplicates \[5\]"),
    ({"slots": ints(5, 64, 7)}, ValueError, r"slots must be in \[0, 64\)"),
]


@pytest.mark.parametrize("bad, error, message", BAD,
                         ids=[f"{'-'.join(b)}-{i}" for i, (b, *_) in enumerate(BAD)])
def test_write_kv_quant_bad_inputs_write_nothing(backend, bad, error, message):
    args = {**quant_args(), **bad}
    moved = {name: on(backend, a) for name, a in args.items()}
    before = {n: backend.to_numpy(moved[n]) for n in ("k_pool", "v_pool", "k_scales", "v_scales")}
    with pytest.raises(error, match=message):
        backend.quant.write_kv_quant(**moved)
    for name, was in before.items():
        assert_same(backend.to_numpy(moved[name]), was)


@pytest.mark.parametrize("call, error, message", [
    (lambda q: q.quantize(np.full((1, 1, 64), np.nan, np.float32), "fp8_e4m3"), ValueError,
     "x holds 64 value"),
    (lambda q: q.quantize(np.ones((1, 1, 48), np.float16), "int4"), ValueError,
     "head_dim 48 must be a multiple of int4's group of 32"),
    (lambda q: q.quantize(np.ones((1, 1, 64), np.float16), "fp16"), ValueError,
     "kv_dtype must be one of int8, fp8_e4m3, int4"),
    (lambda q: q.dequantize(np.ones((1, 1, 8), np.int8), np.ones((1, 2), np.float16), "int8"),
     ValueError, r"scales must have shape \[T, num_kv_heads\] = \[1, 1\] matching codes"),
    (lambda q: q.dequantize(np.ones((1, 1, 8), np.int8), np.ones((1, 1), np.float16), "fp8_e4m3"),
     TypeError, "codes must have dtype uint8, got int8"),
])
def test_quantize_dequantize_bad_inputs(backend, call, error, message):
    class Moved:  # the backend's ops, with NumPy arguments moved onto the backend first
        def __getattr__(self, op):
            return lambda *a: getattr(backend.quant, op)(*(on(backend, x) for x in a))
    with pytest.raises(error, match=message):
        call(Moved())


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_check_values_on_every_backend(backend, kv_dtype):
    backend.quant.check_values(on(backend, kv_with_outliers(3)), kv_dtype)  # storable: silent
    with pytest.raises(ValueError, match=rf"k_per_layer\[2\] holds 1 value\(s\) that {kv_dtype} "
                       r"cannot store .* \[1, 1, 7\]: nan"):
        backend.quant.check_values(on(backend, poisoned(np.nan)), kv_dtype, "k_per_layer[2]")
    with pytest.raises(ValueError, match=r"\|x\| > .* where the fp16 scale overflows"):
        backend.quant.check_values(on(backend, poisoned(1e9, np.float32)), kv_dtype)
    with pytest.raises(TypeError, match="x must have dtype float16 or float32"):
        backend.quant.check_values(on(backend, np.ones((1, 1, 8), np.int8)), kv_dtype)
    with pytest.raises(ValueError, match=r"v_per_layer\[0\] must be 3-D"):  # the shape, by name
        backend.quant.check_values(on(backend, np.ones((1, 8), np.float16)), kv_dtype,
                                   "v_per_layer[0]")


def test_a_refused_quantize_leaves_the_next_call_free(backend):
    """After bad values are refused, good ones quantize (the CUDA check flag is reset)."""
    with pytest.raises(ValueError, match="holds 1 value"):
        backend.quant.quantize(on(backend, poisoned(np.nan)), "int8")
    codes, scales = backend.quant.quantize(on(backend, kv_with_outliers(3)), "int8")
    assert backend.to_numpy(scales).all()


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_cuda_check_values_of_a_host_array(kv_dtype):
    """The CUDA backend launches on a NumPy array too (Numba copies it in): a bad value is still
    reported as a ValueError with its index, not an AttributeError."""
    from kvlab.kernels.cuda import quant

    with pytest.raises(ValueError, match=r"x holds 1 value\(s\) .* \[1, 1, 7\]: inf"):
        quant.check_values(poisoned(np.inf), kv_dtype)


def test_fp32_huge_values_under_the_limit_are_stored_not_nan():
    x = np.zeros((1, 1, 64), np.float32)
    x[0, 0, 0] = 8e6  # under 127 * 65504: the fp16 scale is finite
    codes, scales = quantize(x, "int8")
    assert np.isfinite(scales).all() and codes[0, 0, 0] == 127
    assert abs(dequantize(codes, scales, "int8")[0, 0, 0] - 8e6) < 8e6 * 2**-10


# --- caches: int8 and fp8 paged and contiguous, on every backend -------------------------------

@pytest.mark.parametrize("kv_dtype", CACHE_DTYPES)
def test_paged_and_contiguous_quantized_layers_agree(backend, kv_dtype):
    k, v = kv_with_outliers(20, seed=9), kv_with_outliers(20, seed=10)
    want = dequantize(*quantize(k, kv_dtype), kv_dtype), dequantize(*quantize(v, kv_dtype),
                                                                     kv_dtype)
    paged = KvLayer.alloc_paged(3, 8, 2, 64, dtype=kv_dtype, backend=backend)
    contig = KvLayer.alloc_contig(24, 2, 64, dtype=kv_dtype, backend=backend)
    for layer in (paged, contig):
        layer.write(backend.asarray(k[:13]), backend.asarray(v[:13]))  # prefill, then decode
        for t in range(13, 20):
            layer.write(backend.asarray(k[t:t + 1]), backend.asarray(v[t:t + 1]))
        got_k, got_v = (backend.to_numpy(a) for a in layer.gather())
        assert_same(got_k, want[0])
        assert_same(got_v, want[1])
        assert layer.k_scales is not None and layer.len == 20
    codes = backend.to_numpy(contig.k)[:20]
    assert_same(codes, quantize(k, kv_dtype)[0])


def test_quantized_pool_bytes_and_manager_copy_on_write():
    pool = KvPool(2, 4, 4, 2, 64, dtype="fp8_e4m3")
    assert pool.k_pools[0].dtype == np.uint8 and pool.k_scales[1].shape == (4, 4, 2)
    assert pool.nbytes == 2 * 2 * 4 * 4 * 2 * (64 + 2)  # K and V, layers, slots, heads, B/vector
    mgr = KvCacheManager(pool, max_blocks_per_seq=4)
    k = [kv_with_outliers(6, seed=s) for s in (11, 12)]
    mgr.add_sequence("a", list(range(6)))
    mgr.append("a", k, k, list(range(6)))
    mgr.fork("a", "b")
    mgr.append("b", [x[:1] for x in k], [x[:1] for x in k], [99])  # copies the shared block 1
    got_a, _ = mgr.gather("a", 1)
    got_b, _ = mgr.gather("b", 1)
    want = dequantize(*quantize(k[1], "fp8_e4m3"), "fp8_e4m3")
    assert_same(got_a, want)
    assert_same(got_b[:6], want)
    mgr.check_invariants()


def test_quantized_cache_rejects_nan_and_changes_nothing():
    layer = KvLayer.alloc_paged(2, 4, 2, 64, dtype="int8")
    layer.write(kv_with_outliers(3), kv_with_outliers(3))
    before = layer.k_pool.copy(), layer.k_scales.copy(), layer.block_table
    with pytest.raises(ValueError, match="v holds 1 value"):
        layer.write(kv_with_outliers(3), poisoned(np.nan))  # crosses a block: nothing allocated
    assert layer.len == 3 and (layer.block_table == before[2]).all()
    assert_same(layer.k_pool, before[0])
    assert_same(layer.k_scales, before[1])


# --- real GPU, real sizes ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.sanitize
@pytest.mark.parametrize("kv_dtype", CACHE_DTYPES)
def test_gpu_write_kv_quant_at_real_size(kv_dtype):
    """4096 tokens x 8 kv heads x 128 into a shuffled pool, on a real GPU, against NumPy."""
    gpu = get_backend("cuda", device="gpu")
    rng = np.random.default_rng(0)
    k, v = kv_with_outliers(4096, 8, 128, seed=1), kv_with_outliers(4096, 8, 128, seed=2)
    storage = get_dtype(kv_dtype).storage
    pools = [np.zeros((300, BLOCK_SIZE, 8, 128), storage) for _ in range(2)]
    scales = [np.zeros((300, BLOCK_SIZE, 8), np.float16) for _ in range(2)]
    slots = rng.permutation(300 * BLOCK_SIZE)[:4096].astype(np.int32)
    args = [k, v, *pools, *scales, slots, kv_dtype]
    moved = [on(gpu, a) for a in args]
    gpu.quant.write_kv_quant(*moved)
    write_kv_quant(*args)
    for got, want in zip(moved[2:6], args[2:6]):
        assert_same(gpu.to_numpy(got), want)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_gpu_quantize_dequantize_at_real_size(kv_dtype):
    gpu = get_backend("cuda", device="gpu")
    x = kv_with_outliers(4096, 8, 128, seed=3)
    want = quantize(x, kv_dtype)
    got = to_np(gpu, gpu.quant.quantize(gpu.asarray(x), kv_dtype))
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    deq = to_np(gpu, gpu.quant.dequantize(*(gpu.asarray(a) for a in want), kv_dtype))
    assert_same(deq, dequantize(*want, kv_dtype))
