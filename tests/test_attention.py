"""Stage 5 (decode attention), the NumPy reference against independent oracles: torch's
``scaled_dot_product_attention`` (with ``enable_gqa`` and explicit causal masks) on the gathered
contiguous K/V, Hugging Face's sliding-window mask function, hand-worked numbers; the four softmax
formulations against each other; INT8/FP8 attention accuracy; the host layer (AttnConfig,
contig_decode_attention, KvLayer.decode_attention).

Tolerance: float32 results agree to ``1e-5 * max|ref|`` (+1e-6): every path computes the same sums
in float32 but in a different order (BLAS blocking, tiles, partitions), so they differ by a few
ulps of the largest partial sums, never more.
"""
import math

import numpy as np
import pytest
import torch

from kvlab.attention import AttnConfig, contig_decode_attention
from kvlab.cache import KvLayer
from kvlab.quant_lab import attention_error
from kvlab.ref.attention import (
    attend_max_subtracted, attend_naive, attend_online, attend_split_k, decode_attention,
    merge_partials, paged_decode_attention, partial_attention, split_bounds, visibility_mask,
    visible_range,
)
from kvlab.ref.paging import gather_kv
from kvlab.ref.quant import write_kv_quant

RTOL = 1e-5


def assert_close(got, want, rtol=RTOL):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.float32
    bound = rtol * max(1.0, float(np.abs(want).max(initial=0))) + 1e-6
    assert np.abs(got - want).max(initial=0) <= bound, np.abs(got - want).max()


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def sdpa(q, k, v, mask, scale=None):
    """torch's SDPA, float32, token-first in and out; mask bool [T, L] (True = attend)."""
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32)).transpose(0, 1)  # [H, T, D]
    out = torch.nn.functional.scaled_dot_product_attention(
        t(q), t(k), t(v), attn_mask=torch.from_numpy(mask), scale=scale, enable_gqa=True)
    return out.transpose(0, 1).numpy()


def torch_causal(num_tokens, length):
    """The causal mask built independently: row i may attend columns <= L - T + i."""
    return torch.ones(num_tokens, length, dtype=torch.bool).tril(diagonal=length - num_tokens).numpy()


# --- the contiguous op against SDPA ------------------------------------------------------------

@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(4, 4), (8, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_decode_attention_matches_sdpa(num_q_heads, num_kv_heads, head_dim, num_tokens):
    rng = np.random.default_rng(head_dim + num_tokens)
    length = 37
    q = randn(rng, num_tokens, num_q_heads, head_dim)
    k, v = (randn(rng, length, num_kv_heads, head_dim, dtype=np.float16) for _ in range(2))
    want = sdpa(q, k, v, torch_causal(num_tokens, length))
    assert_close(decode_attention(q, k, v), want)
    assert_close(decode_attention(q, k, v, causal=False),
                 sdpa(q, k, v, np.ones((num_tokens, length), bool)))
    assert_close(decode_attention(q, k, v, scale=0.3), sdpa(q, k, v, torch_causal(num_tokens, length), 0.3))


@pytest.mark.parametrize("window", [1, 2, 5, 100])
def test_sliding_window_matches_hugging_face_mask(window):
    from transformers.masking_utils import sliding_window_causal_mask_function

    rng = np.random.default_rng(window)
    num_tokens, length = 4, 12
    q, k, v = randn(rng, num_tokens, 4, 16), randn(rng, length, 2, 16), randn(rng, length, 2, 16)
    hf = sliding_window_causal_mask_function(window)
    # HF indexes queries by absolute position: token i is at L - T + i
    mask = np.array([[bool(hf(torch.tensor(0), torch.tensor(0), torch.tensor(length - num_tokens + i),
                                torch.tensor(j))) for j in range(length)] for i in range(num_tokens)])
    np.testing.assert_array_equal(visibility_mask(length, num_tokens, True, window), mask)
    assert_close(decode_attention(q, k, v, sliding_window=window), sdpa(q, k, v, mask))


def test_window_of_one_returns_each_tokens_own_value():
    rng = np.random.default_rng(0)
    q, k, v = randn(rng, 3, 2, 8), randn(rng, 6, 1, 8), randn(rng, 6, 1, 8)
    out = decode_attention(q, k, v, sliding_window=1)
    np.testing.assert_array_equal(out, np.repeat(v[3:], 2, axis=1))  # positions 3, 4, 5


def test_hand_worked_two_keys():
    # equal scores -> the plain average of the two values; a huge score -> that key's value alone
    q = np.zeros((1, 1, 2), np.float32)
    k = np.array([[[1, 0]], [[0, 1]]], np.float32)
    v = np.array([[[2, 0]], [[0, 4]]], np.float32)
    assert decode_attention(q, k, v).tolist() == [[[1.0, 2.0]]]
    q[0, 0] = [0, 1000]
    assert decode_attention(q, k, v, scale=1.0).tolist() == [[[0.0, 4.0]]]


def test_visible_range_convention():
    # context 10 after a 3-token step: tokens sit at 7, 8, 9 and see < 8, < 9, < 10
    assert [visible_range(10, 3, i) for i in range(3)] == [(0, 8), (0, 9), (0, 10)]
    assert visible_range(10, 3, 0, sliding_window=4) == (4, 8)   # (7 - 4, 7]
    assert visible_range(10, 1, 0, causal=False, sliding_window=2) == (8, 10)


# --- the paged op against SDPA on the gathered K/V ---------------------------------------------

def paged_batch(rng, lens, tokens, num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                dtype=np.float16):
    """Pools with each sequence's blocks scattered over a shuffled pool; returns
    (q, k_pool, v_pool, block_tables, context_lens, query_start)."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    ids = rng.permutation(num_blocks).astype(np.int32)
    tables = np.full((len(lens), max(need + [1]) + 1), -1, np.int32)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = ids[used:used + n]
        used += n
    k_pool = randn(rng, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_pool = randn(rng, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    q = randn(rng, sum(tokens), num_q_heads, head_dim)
    starts = np.concatenate([[0], np.cumsum(tokens)]).astype(np.int32)
    return q, k_pool, v_pool, tables, np.array(lens, np.int32), starts


@pytest.mark.parametrize("window", [0, 1, 6])
def test_paged_matches_sdpa_per_sequence(window):
    rng = np.random.default_rng(window)
    lens, tokens = [1, 3, 4, 5, 1024, 17], [1, 2, 1, 5, 3, 0]
    q, k_pool, v_pool, tables, context_lens, starts = paged_batch(rng, lens, tokens, 8, 2, 64, 16)
    out = paged_decode_attention(q, k_pool, v_pool, tables, context_lens, starts,
                                 sliding_window=window)
    for s, (n, t) in enumerate(zip(lens, tokens)):
        k, v = gather_kv(k_pool, v_pool, tables[s], n)
        mask = torch_causal(t, n)
        if window:
            mask &= visibility_mask(n, t, True, window)
        rows = slice(starts[s], starts[s + 1])
        if t:
            assert_close(out[rows], sdpa(q[rows], k, v, mask))


# --- four formulations of one softmax -----------------------------------------------------------

def test_formulations_agree_and_naive_overflows():
    rng = np.random.default_rng(1)
    q, k, v = randn(rng, 64), randn(rng, 50, 64), randn(rng, 50, 64)
    want = attend_max_subtracted(q, k, v, 0.125)
    assert_close(attend_naive(q, k, v, 0.125), want)
    for tile in (1, 3, 16, 64):
        assert_close(attend_online(q, k, v, 0.125, tile), want)
    for splits in range(1, 60):  # more splits than keys: empty partitions
        assert_close(attend_split_k(q, k, v, 0.125, splits), want)
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.isnan(attend_naive(q * 100, k, v, 1.0)).any()      # exp(> 88) = inf, inf/inf
    assert np.isfinite(attend_online(q * 100, k, v, 1.0)).all()
    assert np.isfinite(attend_split_k(q * 100, k, v, 1.0, 4)).all()


def test_split_bounds_and_empty_partitions():
    assert split_bounds(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert split_bounds(1, 4) == [(0, 1), (1, 1), (1, 1), (1, 1)]
    lse, out = partial_attention(np.ones(4, np.float32), np.zeros((0, 4), np.float32),
                                 np.zeros((0, 4), np.float32), 1.0)
    assert lse == -np.inf and not out.any()
    merged = merge_partials(np.array([-np.inf, 0.0, -np.inf]), np.array([[9.0], [2.0], [7.0]]))
    assert merged.tolist() == [2.0]
    # two equal partitions weigh the same
    assert merge_partials(np.array([1.0, 1.0]), np.array([[0.0], [4.0]])).tolist() == [2.0]


@pytest.mark.parametrize("num_splits", range(1, 9))
def test_paged_split_k_equals_one_split(num_splits):
    rng = np.random.default_rng(2)
    args = paged_batch(rng, [1, 7, 8, 9, 40], [1, 3, 1, 2, 1])
    want = paged_decode_attention(*args)
    assert_close(paged_decode_attention(*args, num_splits=num_splits), want)
    assert_close(paged_decode_attention(*args, sliding_window=3, num_splits=num_splits),
                 paged_decode_attention(*args, sliding_window=3))


# --- quantized caches: INT8 / FP8 attention against FP32 ----------------------------------------

def quantized_attention_error(kv_dtype, outlier=1.0, seed=3):
    """Attention of 4 query tokens (8 q heads, GQA 4) over 300 positions written to a quantized
    paged pool, against float32 attention over the unquantized K/V (ferrum's two measures: the
    Rust engine whose KvInt8 kvlab mirrors).
    ``outlier`` multiplies two K channels (real K caches have a few large channels)."""
    rng = np.random.default_rng(seed)
    length, block_size, hkv, hq, d = 300, 16, 2, 8, 128
    k, v = randn(rng, length, hkv, d), randn(rng, length, hkv, d)
    k[..., [1, 17]] *= outlier
    q = randn(rng, 4, hq, d)
    num_blocks = -(-length // block_size)
    storage = np.int8 if kv_dtype == "int8" else np.uint8
    pools = [np.zeros((num_blocks, block_size, hkv, d), storage) for _ in range(2)]
    scales = [np.zeros((num_blocks, block_size, hkv), np.float16) for _ in range(2)]
    table = rng.permutation(num_blocks).astype(np.int32)
    slots = (table[np.arange(length) // block_size] * block_size
             + np.arange(length) % block_size).astype(np.int32)
    write_kv_quant(k, v, *pools, *scales, slots, kv_dtype)
    got = paged_decode_attention(q, *pools, table[None], np.array([length], np.int32),
                                 np.array([0, 4], np.int32), k_scales=scales[0], v_scales=scales[1])
    return attention_error(decode_attention(q, k, v), got)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_int8_attention_meets_ferrums_bar(seed):
    # measured: cosine 0.99996, rel_max_diff 0.008 - 0.009
    err = quantized_attention_error("int8", seed=seed)
    assert err["cosine"] > 0.999 and err["rel_max_diff"] < 0.02, err


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_fp8_attention_accuracy(seed):
    # E4M3 keeps 3 mantissa bits (relative step 2**-4, against int8's 1/127 of the amax), so it
    # meets the cosine bar but not int8's max-diff bar: measured cosine 0.9993, rel_max_diff 0.04 - 0.07
    err = quantized_attention_error("fp8_e4m3", seed=seed)
    assert err["cosine"] > 0.999 and err["rel_max_diff"] < 0.1, err


def test_int8_with_outlier_channels_misses_the_max_diff_bar():
    # A known limit of one scale per (token, kv head): two K channels 8x larger stretch every
    # scale, and max|diff|/max|ref| rises to ~0.03 - 0.04 (cosine still > 0.999). Notebook 02
    # measures the per-channel K scales that fix it.
    err = quantized_attention_error("int8", outlier=8.0)
    assert err["cosine"] > 0.999 and 0.02 < err["rel_max_diff"] < 0.06, err


# --- the host layer: AttnConfig and the cache classes --------------------------------------------

def test_attn_config():
    cfg = AttnConfig(scale=0.5, sliding_window=4)
    with pytest.raises(Exception):
        cfg.scale = 1.0  # frozen
    with pytest.raises(ValueError, match="sliding_window"):
        AttnConfig(sliding_window=-1)
    with pytest.raises(ValueError, match="scale"):
        AttnConfig(scale=-1.0)
    with pytest.raises(TypeError, match="causal"):
        AttnConfig(causal=1)


@pytest.mark.parametrize("dtype", ["fp16", "int8", "fp8_e4m3"])
def test_contig_and_paged_layers_agree_with_the_op(dtype):
    rng = np.random.default_rng(4)
    k, v = (randn(rng, 11, 2, 32, dtype=np.float16) for _ in range(2))
    q = randn(rng, 3, 4, 32)
    contig = KvLayer.alloc_contig(16, 2, 32, dtype=dtype)
    paged = KvLayer.alloc_paged(4, 4, 2, 32, dtype=dtype)
    for layer in (contig, paged):
        layer.write(k, v)
    want = decode_attention(q, *contig.gather(), sliding_window=5)
    cfg = AttnConfig(sliding_window=5, kv_stride=64)
    assert_close(contig_decode_attention(q, contig, cfg), want)
    assert_close(contig.decode_attention(q, cfg), want)
    assert_close(paged.decode_attention(q, cfg, num_splits=3), want)
    if dtype == "fp16":
        np.testing.assert_array_equal(want, decode_attention(q, k, v, sliding_window=5))
    with pytest.raises(ValueError, match="kv_stride"):
        contig_decode_attention(q, contig, AttnConfig(kv_stride=32))
    with pytest.raises(ValueError, match="paged"):
        contig_decode_attention(q, paged)
    with pytest.raises(ValueError, match="always causal"):
        paged.decode_attention(q, AttnConfig(causal=False))
    assert math.isclose(AttnConfig().causal, True)
