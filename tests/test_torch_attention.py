"""The torch backend's tiled decode attention (``kvlab.kernels.mps.attention``) where the shared
parity tests cannot reach: every case walked in many tiles, padding that holds NaN, and the
host round trips the op makes.

The shared tests (``tests/test_attention_ops.py``) use contexts of at most 1024 positions, which
the torch op covers in one tile. Here the tile shrinks to 3 positions (not a multiple of any
block size), so every case crosses tiles, blocks and sequences' ends; same tolerance as there.
"""
import numpy as np
import pytest
import torch

from kvlab.backends import get_backend
from kvlab.kernels.mps import attention as torch_attention
from kvlab.ref.attention import decode_attention
from test_attention_ops import CASES, assert_close, paged_batch, reference, run_paged

TORCH = get_backend("torch", "cpu")


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Tiles of 3 positions."""
    monkeypatch.setattr(torch_attention, "TILE_BYTES", 0)
    monkeypatch.setattr(torch_attention, "MIN_TILE", 3)


@pytest.mark.parametrize("name", CASES)
def test_every_case_in_tiles_of_three(tiny_tiles, name):
    lens, tokens, hq, hkv, d, options = CASES[name]
    args = paged_batch(lens, tokens, hq, hkv, d)
    assert_close(run_paged(TORCH, args, **options), reference(args, **options))


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_quantized_pools_in_tiles_of_three(tiny_tiles, kv_dtype):
    args = paged_batch([3, 9, 14], [1, 2, 1], 4, 2, 32, kv_dtype=kv_dtype, seed=1)
    for window in (0, 4):
        assert_close(run_paged(TORCH, args, sliding_window=window),
                     reference(args, sliding_window=window))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [0, 4])
def test_contiguous_decode_attention_in_tiles_of_three(tiny_tiles, causal, window):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 4, 16)).astype(np.float16)
    k, v = (rng.standard_normal((10, 2, 16)).astype(np.float16) for _ in range(2))
    want = decode_attention(q, k, v, causal=causal, sliding_window=window)
    got = TORCH.attention.decode_attention(*(TORCH.asarray(a) for a in (q, k, v)), causal=causal,
                                           sliding_window=window)
    assert_close(TORCH.to_numpy(got), want)


def test_tile_size_follows_the_budget():
    # 4 x 4096 tokens, 8 kv heads of 128: 16 KiB of float32 K per position -> 128 positions
    assert torch_attention._tile_positions(4, 8, 128, 32) == 128
    # a long prefill's scores outgrow K: 1 x 32 q heads x 4096 rows -> the floor
    assert torch_attention._tile_positions(1, 8, 128, 32 * 4096) == torch_attention.MIN_TILE


def test_stale_nan_past_a_sequences_end_is_not_read(tiny_tiles):
    """A ragged batch pads every sequence to the longest; what lies past a sequence's length (the
    rest of its last block, blocks its table lists past its length) may hold anything, NaN
    included, and must weigh nothing (0 * NaN would be NaN)."""
    args = paged_batch([5, 13], [1, 1], 2, 1, 16, seed=4)
    q, k_pool, v_pool, tables, lens = args[:5]
    block_size = k_pool.shape[1]
    spare = sorted(set(range(len(k_pool))) - set(tables[tables >= 0].tolist()))  # two blocks
    for pool in (k_pool, v_pool):
        pool[tables[0, 1], lens[0] % block_size:] = np.nan  # the rest of sequence 0's last block
        pool[spare] = np.nan
    tables[0, 2:4] = spare                                  # listed, but past sequence 0's end
    got = run_paged(TORCH, args)
    assert np.isfinite(got).all()
    assert_close(got, reference(args))


def test_a_nan_key_in_view_stays_nan():
    """The other side: a NaN the reference reads (inside the context) gives NaN, as there."""
    args = list(paged_batch([6], [1], 2, 1, 16, seed=6))
    k_pool, tables = args[1], args[3]
    k_pool[tables[0, 0], 2, 0, 3] = np.nan
    assert np.isnan(reference(args)).all() and np.isnan(run_paged(TORCH, args)).all()


def test_reads_nothing_back_per_tile_or_sequence(monkeypatch):
    """The only device-to-host copies are the checks' reads of the index arrays (a fixed number,
    whatever the batch): none per sequence, none per tile."""
    from kvlab import checks

    reads = []
    real_host_ints = checks.host_ints
    monkeypatch.setattr(checks, "host_ints", lambda x: reads.append(x) or real_host_ints(x))
    monkeypatch.setattr(torch_attention, "TILE_BYTES", 0)  # many tiles
    counts = []
    for num_seqs in (1, 5):
        args = paged_batch([9] * num_seqs, [1] * num_seqs, 2, 1, 16)
        moved = [None if a is None else TORCH.asarray(a) for a in args]
        reads.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            TORCH.attention.paged_decode_attention(*moved[:6])
        names = [e.name for e in prof.events()]
        assert not any(n in ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")
                       for n in names), sorted(set(names))
        counts.append(len(reads))
    assert counts[0] == counts[1] == 3  # block_tables, context_lens, query_start


def test_a_non_contiguous_q():
    args = paged_batch([7, 9], [1, 1], 4, 2, 16, seed=8)
    q = args[0]
    wide = TORCH.asarray(np.concatenate([q, q], axis=-1))[..., :16]  # rows with gaps
    assert not wide.is_contiguous()
    moved = [TORCH.asarray(a) for a in args[1:6]]
    got = TORCH.attention.paged_decode_attention(wide, *moved)
    assert_close(TORCH.to_numpy(got), reference(args))
