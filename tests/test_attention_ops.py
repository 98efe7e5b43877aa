"""Stage 5 (decode attention) ops: every backend against the NumPy reference, ragged batches and
edge shapes included, split-K, quantized pools, bad inputs, and real sizes on a real GPU.

Tolerance: ``|got - ref| <= 1e-5 * max|ref| + 1e-6``. All backends compute in float32, but sum in
different orders (the CUDA kernel in tiles of keys with an online softmax, torch in BLAS blocks,
split-K in partitions), so results differ by a few ulps of the largest partial sums.
The cuda backend runs in Numba's simulator here (every thread a Python thread, every barrier tens
of ms): shapes stay small, except one 1024-position case with one tiny head.
"""
import numpy as np
import pytest

from kvlab.backends import BACKENDS, cuda_mode, get_backend
from kvlab.ref.attention import decode_attention, paged_decode_attention
from kvlab.ref.quant import write_kv_quant

RTOL = 1e-5
BLOCK = 4


# the three backends, not the root conftest's extra "torch-tiles": these torch ops take no tiles
@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == np.float32
    bound = RTOL * max(1.0, float(np.abs(want).max(initial=0))) + 1e-6
    assert np.abs(got - want).max(initial=0) <= bound, np.abs(got - want).max()


def paged_batch(lens, tokens, num_q_heads, num_kv_heads, head_dim, block_size=BLOCK, seed=0,
                kv_dtype=None):
    """A ragged batch over a shuffled pool: (q, k_pool, v_pool, tables, lens, query_start,
    k_scales, v_scales). ``kv_dtype`` "int8" / "fp8_e4m3" quantizes the pool with write_kv_quant."""
    rng = np.random.default_rng(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 2
    ids = rng.permutation(num_blocks).astype(np.int32)
    tables = np.full((len(lens), max(need) + 1), -1, np.int32)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = ids[used:used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_pool, v_pool = (rng.standard_normal(shape).astype(np.float16) for _ in range(2))
    k_scales = v_scales = None
    if kv_dtype:
        storage = np.int8 if kv_dtype == "int8" else np.uint8
        codes = [np.zeros(shape, storage) for _ in range(2)]
        k_scales, v_scales = (np.zeros(shape[:3], np.float16) for _ in range(2))
        slots = np.arange(num_blocks * block_size, dtype=np.int32)
        flat = lambda p: p.reshape(-1, num_kv_heads, head_dim)
        write_kv_quant(flat(k_pool), flat(v_pool), *codes, k_scales, v_scales, slots, kv_dtype)
        k_pool, v_pool = codes
    q = rng.standard_normal((sum(tokens), num_q_heads, head_dim)).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(tokens)]).astype(np.int32)
    return q, k_pool, v_pool, tables, np.array(lens, np.int32), starts, k_scales, v_scales


def run_paged(backend, args, **options):
    q, k_pool, v_pool, tables, lens, starts, k_scales, v_scales = args
    on = lambda a: None if a is None else backend.asarray(a)
    out = backend.attention.paged_decode_attention(
        on(q), on(k_pool), on(v_pool), on(tables), on(lens), on(starts), k_scales=on(k_scales),
        v_scales=on(v_scales), **options)
    return backend.to_numpy(out)


def reference(args, **options):
    q, k_pool, v_pool, tables, lens, starts, k_scales, v_scales = args
    return paged_decode_attention(q, k_pool, v_pool, tables, lens, starts, k_scales=k_scales,
                                  v_scales=v_scales, **options)


# (lens, tokens per sequence, num_q_heads, num_kv_heads, head_dim, options)
CASES = {
    "decode-ragged-1,bs-1,bs,bs+1-GQA": ([1, BLOCK - 1, BLOCK, BLOCK + 1], [1, 1, 1, 1], 4, 2, 64, {}),
    "MQA": ([7, 16], [1, 1], 4, 1, 32, {}),
    "MHA-prefill-chunk": ([9], [3], 2, 2, 64, {}),
    "whole-prompt-prefill": ([5, 12], [5, 4], 4, 2, 16, {}),
    "window-1": ([6, 9], [2, 1], 2, 1, 16, {"sliding_window": 1}),
    "window-5": ([13, 20], [3, 1], 2, 1, 16, {"sliding_window": 5}),
    "head_dim-128": ([5], [1], 1, 1, 128, {}),
    "head_dim-256": ([3], [2], 2, 1, 256, {}),
    "a-sequence-without-tokens": ([4, 7, 2], [1, 0, 2], 2, 1, 16, {}),
    "group-10-over-two-head-tiles": ([5], [2], 10, 1, 16, {}),
    "scale-given": ([6], [2], 2, 2, 16, {"scale": 0.7}),
}


SPLIT_ON_THE_SIMULATOR = {"window-5", "whole-prompt-prefill", "a-sequence-without-tokens"}


@pytest.mark.parametrize("name", CASES)
def test_paged_decode_attention_matches_reference(backend, name):
    lens, tokens, hq, hkv, d, options = CASES[name]
    args = paged_batch(lens, tokens, hq, hkv, d)
    want = reference(args, **options)
    # one split, and three (a split-K launch + merge); the simulator splits a few cases only
    simulated = backend.name == "cuda" and backend.device == "simulator"
    splits = (1, 3) if not simulated or name in SPLIT_ON_THE_SIMULATOR else (1,)
    for num_splits in splits:
        assert_close(run_paged(backend, args, num_splits=num_splits, **options), want)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_gpu_paged_decode_attention_every_case_and_split(name):
    """The whole parity table with split-K on a real GPU (the simulator splits a few cases)."""
    test_paged_decode_attention_matches_reference(get_backend("cuda"), name)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_quantized_pools_match_reference(backend, kv_dtype, num_splits):
    args = paged_batch([3, 9], [1, 2], 4, 2, 32, kv_dtype=kv_dtype, seed=1)
    want = reference(args)
    assert_close(run_paged(backend, args, num_splits=num_splits, sliding_window=6),
                 reference(args, sliding_window=6))
    assert_close(run_paged(backend, args, num_splits=num_splits), want)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, 8, 13, None])
def test_split_k_equal_for_any_number_of_splits(backend, num_splits):
    # 13 splits of 9 positions: ceil(9/13) = 1 each, so four partitions are empty; None: the
    # backend's own choice
    args = paged_batch([1, 9], [1, 2], 2, 1, 16, seed=2)
    assert_close(run_paged(backend, args, num_splits=num_splits), reference(args))


@pytest.mark.parametrize("name", ["numpy", "torch", "cuda"])
def test_context_1024(name):
    # a length that has broken other engines' split kernels (partition boundaries at powers of
    # two); one tiny head, and one sequence in the simulator (about 13 s a launch there).
    backend = get_backend(name)
    lens, tokens = ([1024], [1]) if name == "cuda" else ([1024, 1023], [1, 2])
    args = paged_batch(lens, tokens, 1, 1, 8, block_size=16, seed=3)
    for splits in (1, 4) if name == "cuda" else (1, 4, 7):
        assert_close(run_paged(backend, args, num_splits=splits), reference(args))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [0, 3])
def test_decode_attention_matches_reference(backend, causal, window):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 4, 16)).astype(np.float16)
    k, v = (rng.standard_normal((10, 2, 16)).astype(np.float32) for _ in range(2))
    want = decode_attention(q, k, v, causal=causal, sliding_window=window)
    got = backend.attention.decode_attention(*(backend.asarray(a) for a in (q, k, v)),
                                             causal=causal, sliding_window=window)
    assert_close(backend.to_numpy(got), want)


def test_empty_query(backend):
    args = paged_batch([3], [0], 2, 1, 16)
    assert run_paged(backend, args).shape == (0, 2, 16)


# --- bad inputs: the same clear error on every backend, before anything is computed ---------------

def bad(backend, args, error, match, **options):
    with pytest.raises(error, match=match):
        run_paged(backend, args, **options)


def test_rejects_bad_inputs(backend):
    good = paged_batch([5, 3], [1, 2], 4, 2, 16)
    q, k_pool, v_pool, tables, lens, starts, _, _ = good
    bad(backend, (q[:, :3], *good[1:]), ValueError, "multiple of k_pool's num_kv_heads")
    bad(backend, (q[..., :8].copy(), *good[1:]), ValueError, "head_dim")
    over = lens.copy()
    over[1] = tables.shape[1] * BLOCK + 1
    bad(backend, (*good[:4], over, *good[5:]), ValueError, r"context_len\[1\] must be in")
    short = np.array([5, 1], np.int32)  # sequence 1 has 2 query tokens but a context of 1
    bad(backend, (*good[:4], short, *good[5:]), ValueError, "tokens <= context")
    bad(backend, (*good[:5], np.array([0, 1], np.int32), *good[6:]), ValueError, "query_start")
    bad(backend, (*good[:5], np.array([0, 2, 1], np.int32), *good[6:]), ValueError, "query_start")
    bad(backend, good, ValueError, "num_splits", num_splits=0)
    bad(backend, good, ValueError, "scale", scale=-1.0)
    bad(backend, good, ValueError, "sliding_window", sliding_window=-2)
    codes = np.zeros(k_pool.shape, np.int8)
    bad(backend, (q, codes, codes, *good[3:]), ValueError, "pass its k_scales")
    scales = np.zeros(k_pool.shape[:3], np.float16)
    bad(backend, (*good[:6], scales, None), ValueError, "go together")
    bad(backend, (*good[:6], scales, scales), TypeError, "int8 .* or uint8")
    bad(backend, (q.astype(np.int32), *good[1:]), TypeError, "q must have dtype")
    bad(backend, (q, k_pool, v_pool, tables[0], *good[4:]), ValueError, "2-D")


def test_decode_attention_rejects_bad_inputs(backend):
    q = backend.asarray(np.zeros((4, 4, 8), np.float32))
    k = backend.asarray(np.zeros((3, 2, 8), np.float32))
    with pytest.raises(ValueError, match="tokens <= context"):
        backend.attention.decode_attention(q, k, k)
    k3 = backend.asarray(np.zeros((5, 3, 8), np.float32))
    with pytest.raises(ValueError, match="multiple"):
        backend.attention.decode_attention(q, k3, k3)


VERSION_CASES = ["decode-ragged-1,bs-1,bs,bs+1-GQA", "window-5", "head_dim-256",
                 "group-10-over-two-head-tiles", "a-sequence-without-tokens"]


def run_version(version, args, num_splits, **options):
    """kvlab.kernels.cuda.attention.launch (a numbered kernel version) on checked arguments."""
    from kvlab.checks import check_paged_decode_attention
    from kvlab.kernels.cuda import attention

    cuda_be = get_backend("cuda")
    q, k_pool, v_pool, tables, lens, starts, k_scales, v_scales = (
        None if a is None else cuda_be.asarray(a) for a in args)
    kv_dtype, _, _, scale, window, splits = check_paged_decode_attention(
        q, k_pool, v_pool, tables, lens, starts, options.get("scale"),
        options.get("sliding_window", 0), k_scales, v_scales, num_splits)
    out = attention.launch(q, k_pool, v_pool, k_scales, v_scales, kv_dtype, tables, lens, starts,
                           scale, window, True, splits, version=version)
    return cuda_be.to_numpy(out)


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("name", VERSION_CASES)
def test_cuda_kernel_versions_match_reference(version, name):
    """Notebook 05's numbered kernels: each version, not only the one the public op launches."""
    lens, tokens, hq, hkv, d, options = CASES[name]
    args = paged_batch(lens, tokens, hq, hkv, d, seed=3)
    want = reference(args, **options)
    for num_splits in (1, 2):
        assert_close(run_version(version, args, num_splits, **options), want)


@pytest.mark.parametrize("version", [5, 6, 7])
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_cuda_kernel_versions_over_many_steps(version, kv_dtype):
    """Long enough that each key stream takes several steps (v7: several chunks of keys) at one
    split, so the rescale of the running softmax state between steps is exercised too."""
    args = paged_batch([70, 33], [1, 2], 4, 2, 32, kv_dtype=kv_dtype, seed=6)
    assert_close(run_version(version, args, 1), reference(args))


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6, 7, 8])
def test_cuda_kernel_versions_keep_a_nan_key(version):
    """A NaN in a key the row attends makes its output NaN, as in the reference: no version may
    quietly drop the key (v7's first draft weighed NaN scores 0, like its masked slots)."""
    args = paged_batch([20], [1], 2, 1, 16, seed=5)
    k_pool, tables = args[1], args[3]
    k_pool[tables[0, 5 // BLOCK], 5 % BLOCK, 0, 3] = np.nan
    want = reference(args)
    assert np.isnan(want).all()
    assert np.isnan(run_version(version, args, 1)).all()


# --- v8: its own lane logic in the simulator (emulated shuffles), against NumPy ------------------

def _v8_runs(args):
    """The shape is one v8 takes in this process (else launch would quietly run v5)."""
    from kvlab.kernels.cuda import attention_v8

    k_pool = args[1]
    return attention_v8.layout(k_pool.dtype.itemsize, k_pool.shape[3], k_pool.shape[1]) is not None


# (pool, q heads, kv heads): every cache dtype, and lane layouts where a lane owns several scores
# (fp16, int8) and where several lanes hold the same score (fp32 and fp8 with one q head per kv
# head: fewer partial dots than lanes per row), a GQA group of 3 padded to 4 heads (int8)
V8_POOLS = [("float16", 4, 2), ("float32", 2, 2), ("int8", 6, 2), ("fp8_e4m3", 2, 2)]


@pytest.mark.parametrize("pool, hq, hkv", V8_POOLS)
def test_cuda_v8_ragged_batch_with_empty_splits(pool, hq, hkv):
    """Decode rows and causal prefill rows of different sequences in one launch, contexts that
    end mid-block, and 3 splits of whole blocks: the 3-token sequence has one block, so two of
    its splits are empty (lse -inf, merged away)."""
    kv_dtype = pool if pool in ("int8", "fp8_e4m3") else None
    args = paged_batch([9, 3, 14], [1, 2, 3], hq, hkv, 32, seed=21, kv_dtype=kv_dtype)
    if pool == "float32":
        args = (args[0], args[1].astype(np.float32), args[2].astype(np.float32), *args[3:])
    assert _v8_runs(args)
    assert_close(run_version(8, args, 3), reference(args))


def test_cuda_v8_fp8_by_bits_where_a_card_has_no_fp8_cvt(monkeypatch):
    """Cards before sm_89 have no fp8 cvt: v8 then decodes fp8 by bits (the simulator otherwise
    runs the NumPy stand-in of the hardware conversion)."""
    from kvlab.kernels.cuda import attention_v8

    monkeypatch.setattr(attention_v8, "has_fp8_cvt", lambda: False)
    monkeypatch.setattr(attention_v8, "_KERNELS", {})
    args = paged_batch([9, 3], [1, 2], 2, 2, 32, seed=23, kv_dtype="fp8_e4m3")
    assert _v8_runs(args)
    assert_close(run_version(8, args, 2), reference(args))
    assert attention_v8._KERNELS  # built here, with the bit path


def test_has_fp8_cvt_from_the_compute_capability():
    from kvlab.kernels.cuda._warp import has_fp8_cvt

    assert not has_fp8_cvt((8, 0)) and not has_fp8_cvt((8, 6))
    assert has_fp8_cvt((8, 9)) and has_fp8_cvt((9, 0)) and has_fp8_cvt((10, 0))


def test_cuda_v8_window_fp16_q_and_several_steps():
    """A sliding window that starts mid-block, an fp16 q (v8 reads it without a widening
    launch), 8-token blocks of two steps each, and one split: each warp streams several
    blocks, so the running max moves between steps and the rescale is exercised."""
    args = paged_batch([37, 20], [1, 4], 4, 2, 32, block_size=8, seed=22)
    args = (args[0].astype(np.float16), *args[1:])
    assert _v8_runs(args)
    want = reference(args, sliding_window=11)
    assert_close(run_version(8, args, 1, sliding_window=11), want)


def test_cuda_v8_layout():
    """Which pools v8 lays over a warp (else launch runs v5), on a GPU's 32 lanes."""
    from kvlab.kernels.cuda.attention_v8 import heads_per_cta, layout

    fp16 = layout(2, 128, 16, warp_lanes=32)
    assert fp16 == (8, 16, 2, 4, 8)          # 8 dims a lane, 16 lanes a row, 2 rows a load
    assert layout(1, 128, 16, warp_lanes=32) == (16, 8, 4, 4, 16)
    assert layout(4, 256, 16, warp_lanes=32) is None      # a row of 64 lanes
    assert layout(2, 20, 16, warp_lanes=32) is None       # not whole 16-byte pieces
    assert layout(2, 128, 1, warp_lanes=32) is None       # a block smaller than a load's rows
    assert layout(2, 128, 24, warp_lanes=32) is None      # not a power of two
    assert [heads_per_cta(g) for g in (1, 2, 3, 4, 5, 8, 10)] == [1, 2, 4, 4, 8, 8, 8]


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_cuda_kernel_versions_quantized(version, kv_dtype):
    args = paged_batch([3, 9], [1, 2], 4, 2, 32, kv_dtype=kv_dtype, seed=4)
    assert_close(run_version(version, args, 2), reference(args))


@pytest.mark.parametrize("pool, head_dim", [
    ("float32", 64), ("float16", 20), ("float16", 6), ("int8", 12), ("fp8_e4m3", 24)])
def test_cuda_v5_wide_loads_every_element_size(pool, head_dim):
    """v5 reads the pools as 8-byte words: float32 (2 per word), float16 (4), int8/fp8 codes (8);
    a row that is not whole words (6 fp16 = 12 bytes, 12 int8 codes) runs v3's narrow loads."""
    kv_dtype = pool if pool in ("int8", "fp8_e4m3") else None
    args = paged_batch([5, 11], [1, 2], 4, 2, head_dim, seed=11, kv_dtype=kv_dtype)
    if pool == "float32":
        args = (args[0], args[1].astype(np.float32), args[2].astype(np.float32), *args[3:])
    assert_close(run_version(5, args, 2), reference(args))


@pytest.mark.skipif(cuda_mode() != "simulator", reason="calls a device function from Python")
def test_half_from_bits_every_code():
    """v5's fp16 decode (integer steps, one multiply) against NumPy for all 65,536 bit patterns:
    normals, subnormals, zeros, infinities and NaNs."""
    from kvlab.kernels.cuda.attention import _half_from_bits

    codes = np.arange(1 << 16, dtype=np.uint64)
    got = np.array([_half_from_bits(c) for c in codes], np.float32)
    want = codes.astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # -0.0 too


@pytest.mark.gpu
def test_gpu_half_from_bits_every_code():
    from numba import cuda

    from kvlab.kernels.cuda.attention import _half_from_bits

    @cuda.jit
    def decode_all(codes, out):
        i = cuda.grid(1)
        if i < codes.size:
            out[i] = _half_from_bits(codes[i])

    codes = np.arange(1 << 16, dtype=np.uint64)
    out = cuda.device_array(codes.size, np.float32)
    decode_all[256, 256](cuda.to_device(codes), out)
    got = out.copy_to_host()
    want = codes.astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_int8s_trick_every_code():
    """The bit trick behind _warp.int8s (the GPU's inline assembly), replayed with NumPy for all
    256 codes: flip the sign bit, put the byte under 2^23's exponent (0x4B0000XX), subtract
    2^23 + 128. (The assembly itself runs on a GPU: test_gpu_warp_conversions_every_code.)"""
    codes = np.arange(256, dtype=np.uint32)
    placed = np.uint32(0x4B000000) | (codes ^ np.uint32(0x80))
    got = placed.view(np.float32) - np.float32(2.0 ** 23 + 128)
    assert np.array_equal(got, codes.astype(np.uint8).view(np.int8).astype(np.float32))


@pytest.mark.gpu
def test_gpu_fp8s_every_code_in_every_byte():
    """_warp.fp8s (two cvt.rn.f16x2.e4m3x2) against the NumPy decode for all 256 codes in each
    byte position, on a card that has the instruction."""
    from numba import cuda

    from kvlab.kernels.cuda._warp import fp8s, has_fp8_cvt
    from kvlab.ref.quant import fp8_e4m3_decode

    if not has_fp8_cvt():
        pytest.skip("this card has no fp8 cvt (sm_89+); v8 decodes fp8 by bits there")

    @cuda.jit
    def convert(words, quads):
        i = cuda.grid(1)
        if i < words.size:
            quads[i, 0], quads[i, 1], quads[i, 2], quads[i, 3] = fp8s(words[i])

    codes = np.arange(256, dtype=np.uint32)
    words = np.concatenate([codes << np.uint32(8 * b) for b in range(4)]
                           + [codes * np.uint32(0x01010101)])
    quads = cuda.device_array((words.size, 4), np.float32)
    convert[-(-words.size // 256), 256](cuda.to_device(words), quads)
    want = fp8_e4m3_decode(words.view(np.uint8)).reshape(-1, 4)
    np.testing.assert_array_equal(quads.copy_to_host(), want)  # NaN where want has NaN


@pytest.mark.gpu
def test_gpu_warp_conversions_every_code():
    """_warp's inline-assembly conversions on a GPU: int8s for all 256 codes in every byte
    position, halves for all 65,536 fp16 patterns, pack_halves rounding as NumPy does."""
    from numba import cuda

    from kvlab.kernels.cuda._warp import halves, int8s, pack_halves

    @cuda.jit
    def convert(words, quads, pairs, packed):
        i = cuda.grid(1)
        if i < words.size:
            quads[i, 0], quads[i, 1], quads[i, 2], quads[i, 3] = int8s(words[i])
            pairs[i, 0], pairs[i, 1] = halves(words[i])
            packed[i] = pack_halves(pairs[i, 0] * np.float32(1.001), pairs[i, 1])

    rng = np.random.default_rng(15)
    words = np.concatenate([np.arange(256, dtype=np.uint32) * np.uint32(0x01010101),
                            (np.arange(1 << 16, dtype=np.uint32) << np.uint32(16))
                            | rng.integers(0, 1 << 16, 1 << 16).astype(np.uint32)])
    quads, pairs = (cuda.device_array((words.size, n), np.float32) for n in (4, 2))
    packed = cuda.device_array(words.size, np.uint32)
    convert[-(-words.size // 256), 256](cuda.to_device(words), quads, pairs, packed)
    want_quads = words.view(np.int8).reshape(-1, 4).astype(np.float32)
    assert np.array_equal(quads.copy_to_host(), want_quads)
    want_pairs = words.view(np.float16).reshape(-1, 2).astype(np.float32)
    got_pairs = pairs.copy_to_host()
    nan = np.isnan(want_pairs)
    assert np.array_equal(np.isnan(got_pairs), nan)
    assert np.array_equal(got_pairs[~nan].view(np.uint32), want_pairs[~nan].view(np.uint32))
    want_packed = np.stack([want_pairs[:, 0] * np.float32(1.001), want_pairs[:, 1]], 1)
    want_packed = want_packed.astype(np.float16).view(np.uint32).ravel()
    ok = ~np.isnan(want_pairs).any(1)
    assert np.array_equal(packed.copy_to_host()[ok], want_packed[ok])


def test_cuda_launch_rejects_unknown_version():
    args = paged_batch([3], [1], 2, 1, 16)
    with pytest.raises(ValueError, match="version must be one of"):
        run_version(9, args, 1)


# --- num_splits=None: split-K chosen for the device ----------------------------------------------

def test_v7_blocks_per_sm_zero_means_no_launch_bounds():
    """scripts/sweep_v7.py builds v7 variants; 0 must mean "no bounds", None the default."""
    from kvlab.kernels import cuda as kcuda
    from kvlab.kernels.cuda import attention

    try:
        attention._make_warp_kernel(7, 2, 2, 0)
        assert kcuda.REGISTRY[-1].launch_bounds is None
        attention._make_warp_kernel(7, 2, 2, None)
        assert kcuda.REGISTRY[-1].launch_bounds == (attention.WARP_THREADS,
                                                    attention.CHUNK_BLOCKS_PER_SM)
    finally:  # the registry lists the modules' own kernels (the PTX test compiles every one)
        del kcuda.REGISTRY[-2:]


def test_auto_num_splits_fills_the_gpu_without_short_partitions():
    from kvlab.kernels.cuda.attention import (MIN_KEYS_PER_SPLIT, RESIDENT_BLOCKS, VERSIONS,
                                              auto_num_splits)

    assert set(RESIDENT_BLOCKS) == set(VERSIONS)  # device_num_splits looks every version up

    v2_on_132_sms = dict(num_sms=132, resident_blocks=3)       # 1.5 waves = 594 blocks
    # 8 rows x 8 kv heads (one head tile each) = 64 blocks: 594 / 64 = 9.3 -> 16
    assert auto_num_splits(64, 32768, **v2_on_132_sms) == 16
    assert auto_num_splits(64 * 10, 32768, **v2_on_132_sms) == 1    # 640 >= 594 already
    assert auto_num_splits(64 * 9, 32768, **v2_on_132_sms) == 2     # 576: one short
    assert auto_num_splits(64, 32768, num_sms=132, resident_blocks=4) == 16  # v6: 792 -> 1,024
    # one sequence: 8 blocks want 75 partitions -> 128, but 8,192 keys allow 32 of 256
    assert auto_num_splits(8, 8192, **v2_on_132_sms) == 8192 // MIN_KEYS_PER_SPLIT
    assert auto_num_splits(8, 300, **v2_on_132_sms) == 1             # too short to split
    assert auto_num_splits(8, 1024, **v2_on_132_sms) == 4            # 4 partitions of 256 keys
    with pytest.raises(ValueError, match="num_sms must be >= 1"):
        auto_num_splits(8, 1024, num_sms=0, resident_blocks=3)
    with pytest.raises(ValueError, match="resident_blocks must be >= 1"):
        auto_num_splits(8, 1024, num_sms=132, resident_blocks=0)


def test_one_wave_splits_for_v8():
    from kvlab.kernels.cuda.attention import MIN_KEYS_PER_SPLIT, one_wave_splits
    from kvlab.kernels.cuda.attention_v8 import RESIDENT_BLOCKS_BY_ELEM

    h200 = dict(num_sms=132, resident_blocks=RESIDENT_BLOCKS_BY_ELEM[2])
    assert one_wave_splits(64, 32768, **h200) == 6          # 384 CTAs of 396: 0.97 waves
    assert 64 * 6 <= 132 * 3 < 64 * 7                      # the most that fit in one wave
    assert one_wave_splits(64, 32768, num_sms=132, resident_blocks=2) == 4  # int8: 2 resident
    assert one_wave_splits(400, 32768, **h200) == 1         # the batch fills the GPU alone
    assert one_wave_splits(8, 1024, **h200) == 1024 // MIN_KEYS_PER_SPLIT  # no short partition
    assert one_wave_splits(8, 100, **h200) == 1
    with pytest.raises(ValueError, match="resident_blocks must be >= 1"):
        one_wave_splits(8, 1024, num_sms=132, resident_blocks=0)


@pytest.mark.parametrize("path, version", [("bench/h100_2026-11-27.json", 2),
                                           ("bench/h200_2026-11-27.json", 6),
                                           ("bench/h200_2026-11-27.json", 7)])
def test_auto_num_splits_picks_a_measured_best(path, version):
    """The rule against the split sweeps measured on GPUs (data/bench; both cards have 132 SMs):
    at the bench's shape it must pick a split count whose measured time is within 5% of the
    fastest one of that version. (WAVES was fit to these sweeps: this keeps it honest to them.)"""
    from kvlab.data import load_json
    from kvlab.kernels.cuda.attention import HEAD_TILE, RESIDENT_BLOCKS, auto_num_splits

    run = load_json(path)
    shape = run["meta"]["shape"]
    timed = {int(r["op"].rsplit("=", 1)[1]): r["median_s"] for r in run["rows"]
             if r["op"].startswith(f"kernel v{version} fp16 splits=")}
    assert len(timed) >= 5, sorted(timed)
    base = shape["num_seqs"] * shape["num_kv_heads"] * -(-shape["group"] // HEAD_TILE)
    pick = auto_num_splits(base, shape["context_len"], num_sms=132,
                           resident_blocks=RESIDENT_BLOCKS[version])
    assert pick in timed, (pick, sorted(timed))
    assert timed[pick] <= 1.05 * min(timed.values()), (pick, timed)


@pytest.mark.gpu
def test_gpu_auto_num_splits_at_real_size():
    from kvlab.kernels.cuda.attention import device_num_splits

    lens = [32768, 20000, 513, 8191]
    args = paged_batch(lens, [1] * 4, 32, 8, 128, block_size=16, seed=10)
    splits = device_num_splits(4, 32, 8, max(lens))
    assert splits > 1 and splits & (splits - 1) == 0, splits  # 32 blocks cannot fill a GPU
    assert_close(run_paged(get_backend("cuda", device="gpu"), args), reference(args))


# --- real sizes, real GPU (skipped without one; scripts/gpu_check.sh runs them) ----------------

@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8_e4m3"])
@pytest.mark.parametrize("num_splits", [1, 8])
def test_gpu_at_real_size(kv_dtype, num_splits):
    # batch 8 x up to 4k context, 8 kv heads, GQA 4, head_dim 128
    lens = [4096, 4000, 3000, 1024, 513, 17, 2048, 4095]
    args = paged_batch(lens, [1] * 8, 32, 8, 128, block_size=16, seed=7, kv_dtype=kv_dtype)
    gpu = get_backend("cuda", device="gpu")
    assert_close(run_paged(gpu, args, num_splits=num_splits), reference(args))


@pytest.mark.gpu
@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6, 7, 8])
def test_gpu_versions_at_real_size_ragged(version):
    # the bench's shape family (GQA 4, head_dim 128, 16-token blocks), ragged and not block-aligned
    lens = [8191, 33, 2048, 5000]
    args = paged_batch(lens, [1] * 4, 32, 8, 128, block_size=16, seed=9)
    want = reference(args)
    for num_splits in (1, 16, 64):
        assert_close(run_version(version, args, num_splits), want)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [5, 6, 7, 8])
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3", "float32"])
def test_gpu_wide_loads_every_element_size_at_real_size(version, kv_dtype):
    args = paged_batch([8191, 33, 2048, 5000], [1] * 4, 32, 8, 128, block_size=16, seed=12,
                       kv_dtype=None if kv_dtype == "float32" else kv_dtype)
    if kv_dtype == "float32":
        args = (args[0], args[1].astype(np.float32), args[2].astype(np.float32), *args[3:])
    for num_splits in (1, 16):
        assert_close(run_version(version, args, num_splits), reference(args))


@pytest.mark.gpu
def test_gpu_wide_loads_fall_back_on_a_misaligned_pool():
    """A pool that starts 2 bytes past an 8-byte boundary (a view into a larger buffer): v5-v7
    must run v3's narrow loads instead of faulting, and v8 (16-byte loads) v5's, hence v3's."""
    from numba import cuda

    from kvlab.checks import check_paged_decode_attention
    from kvlab.kernels.cuda import attention

    args = paged_batch([40, 17], [1, 1], 8, 2, 64, block_size=16, seed=13)
    gpu = get_backend("cuda", device="gpu")
    q, tables, lens, starts = (gpu.asarray(a) for a in (args[0], *args[3:6]))
    pools = []
    for pool in args[1:3]:
        buf = cuda.to_device(np.concatenate([np.zeros(1, np.float16), pool.ravel()]))
        pools.append(buf[1:].reshape(pool.shape))
    assert pools[0].device_ctypes_pointer.value % 8 == 2
    _, _, _, scale, window, splits = check_paged_decode_attention(
        q, *pools, tables, lens, starts, None, 0, None, None, 2)
    for version in (5, 6, 7, 8):
        out = attention.launch(q, *pools, None, None, None, tables, lens, starts, scale, window,
                               True, splits, version=version)
        assert_close(gpu.to_numpy(out), reference(args))


@pytest.mark.gpu
@pytest.mark.sanitize
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_gpu_every_version_under_sanitizer(kv_dtype):
    # memcheck/racecheck/initcheck reach each numbered kernel, not only the one the public op runs
    from kvlab.checks import check_paged_decode_attention
    from kvlab.kernels.cuda import attention

    args = paged_batch([300, 77], [16, 5], 8, 2, 64, block_size=16, seed=9, kv_dtype=kv_dtype)
    gpu = get_backend("cuda", device="gpu")
    q, k_pool, v_pool, tables, lens, starts, k_scales, v_scales = (
        None if a is None else gpu.asarray(a) for a in args)
    want = reference(args, sliding_window=40)
    for version in attention.VERSIONS:
        _, _, _, scale, window, splits = check_paged_decode_attention(
            q, k_pool, v_pool, tables, lens, starts, None, 40, k_scales, v_scales, 3)
        out = attention.launch(q, k_pool, v_pool, k_scales, v_scales, kv_dtype, tables, lens,
                               starts, scale, window, True, splits, version=version)
        assert_close(gpu.to_numpy(out), want)


@pytest.mark.gpu
@pytest.mark.sanitize
def test_gpu_prefill_chunk_with_window_under_sanitizer():
    args = paged_batch([300, 77], [16, 5], 8, 2, 64, block_size=16, seed=8, kv_dtype="int8")
    gpu = get_backend("cuda", device="gpu")
    for splits in (1, 5):
        assert_close(run_paged(gpu, args, num_splits=splits, sliding_window=40),
                     reference(args, sliding_window=40))


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8_e4m3"])
def test_gpu_v8_fp16_q_window_and_prefill_at_real_size(kv_dtype):
    """v8 on a GPU at the bench's head shape: an fp16 q (read by the kernel itself), causal
    prefill rows, a window that starts mid-block, and split counts that leave splits empty."""
    lens = [8191, 33, 2048, 5000]
    args = paged_batch(lens, [1, 3, 1, 16], 32, 8, 128, block_size=16, seed=14, kv_dtype=kv_dtype)
    args = (args[0].astype(np.float16), *args[1:])
    want = reference(args, sliding_window=1000)
    for num_splits in (1, 16, 200):
        assert_close(run_version(8, args, num_splits, sliding_window=1000), want)
