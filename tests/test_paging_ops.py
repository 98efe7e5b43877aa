"""Stage 1 (paging) ops: the NumPy reference against hand-worked answers, then every backend
against the reference, bit for bit, then bad inputs on every backend.

These ops only move bytes, so there is no tolerance: a backend's pools and results must equal the
reference's exactly (compared as raw bits, so even -0.0 and NaN payloads would have to match).
The cuda backend runs in Numba's simulator here: shapes stay small (<= 4 heads, <= 40 tokens).
"""
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.backends import BACKENDS, get_backend
from kvlab.ref.paging import copy_blocks, gather_kv, slot_mapping, write_kv

REFERENCE = get_backend("numpy")
BLOCK_SIZE = 16


# the three backends, not the root conftest's extra "torch-tiles": these torch ops take no tiles
@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)


def ints(*values: int) -> np.ndarray:
    """An int32 index array, the dtype every block table, slot and length has."""
    return np.array(values, dtype=np.int32)


def random_pools(num_blocks: int, num_kv_heads: int, head_dim: int, dtype=np.float16,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pools full of noise (an earlier sequence's leftovers), so a stray write shows."""
    rng = np.random.default_rng(seed)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    return (rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype))


def random_tokens(num_tokens: int, num_kv_heads: int, head_dim: int, dtype=np.float16,
                  seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """New tokens' k, v ``[T, num_kv_heads, head_dim]``."""
    rng = np.random.default_rng(seed)
    shape = (num_tokens, num_kv_heads, head_dim)
    return (rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype))


def shuffled_table(blocks_used: int, num_blocks: int, max_blocks: int) -> np.ndarray:
    """A block table owning ``blocks_used`` of the pool's blocks in shuffled order, then -1s."""
    blocks = np.random.default_rng(2).permutation(num_blocks)[:blocks_used]  # [3, 2, 0, 1] of 4
    return np.concatenate([blocks, np.full(max_blocks - blocks_used, -1)]).astype(np.int32)


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    as_bits = f"u{expected.itemsize}"
    np.testing.assert_array_equal(actual.view(as_bits), expected.view(as_bits))


def on_backend(backend, value: Any) -> Any:
    """A NumPy array copied to ``backend``; anything else (an int, a list) as it is."""
    return backend.asarray(value) if isinstance(value, np.ndarray) else value


def run(backend, op: str, *args: Any) -> tuple[Any, list]:
    """Call ``backend.paging.<op>`` on copies of ``args`` moved to the backend.

    Returns the result and the arguments after the call (in-place ops write them), both as NumPy.
    """
    moved = [on_backend(backend, a) for a in args]
    result = getattr(backend.paging, op)(*moved)
    if isinstance(result, tuple):
        result = tuple(backend.to_numpy(r) for r in result)
    elif result is not None:
        result = backend.to_numpy(result)
    after = [backend.to_numpy(m) if isinstance(a, np.ndarray) else a for a, m in zip(args, moved)]
    return result, after


def assert_matches_reference(backend, op: str, *args: Any) -> tuple[Any, list]:
    """Run ``op`` on ``backend`` and on the reference; results and written arguments must be
    bit-identical. Returns the reference's (result, arguments after the call)."""
    got_result, got_args = run(backend, op, *args)
    want_result, want_args = run(REFERENCE, op, *args)
    got_results = got_result if isinstance(got_result, tuple) else (got_result,)
    want_results = want_result if isinstance(want_result, tuple) else (want_result,)
    for got, want in zip(got_results + tuple(got_args), want_results + tuple(want_args)):
        if isinstance(want, np.ndarray):
            assert_same_bits(got, want)
    return want_result, want_args


# --- the reference against answers worked by hand ----------------------------------------------

def test_slot_mapping_by_hand():
    # block_size 4, blocks [7, 2]: positions 0..3 are block 7 (slots 28..31), 4..5 are block 2.
    assert slot_mapping(ints(7, 2), ints(0, 1, 2, 3, 4, 5), 4).tolist() == [28, 29, 30, 31, 8, 9]
    # Padding (position -1) maps to slot -1, whatever its seq_id says.
    tables = ints(7, 2, 3, -1).reshape(2, 2)
    slots = slot_mapping(tables, ints(5, 0, -1, 3), 4, seq_ids=ints(0, 1, 9, 1))
    assert slots.tolist() == [9, 12, -1, 15] and slots.dtype == np.int32


def test_write_kv_puts_each_token_where_slot_mapping_says():
    k_pool = np.zeros((8, 4, 1, 2), np.float16)
    v_pool = np.zeros_like(k_pool)
    k = np.arange(12, dtype=np.float16).reshape(6, 1, 2)
    write_kv(k, -k, k_pool, v_pool, ints(28, 29, 30, 31, 8, 9))
    assert (k_pool[7] == k[:4]).all()  # positions 0..3: all of block 7
    assert (k_pool[2, :2] == k[4:]).all() and (v_pool[2, :2] == -k[4:]).all()
    written = np.zeros(8, bool)
    written[[2, 7]] = True
    assert (k_pool[~written] == 0).all() and (k_pool[2, 2:] == 0).all()


def test_negative_slots_are_skipped():
    k_pool = np.zeros((2, 4, 1, 2), np.float16)
    v_pool = np.zeros_like(k_pool)
    k = np.ones((3, 1, 2), np.float16)
    write_kv(k, k, k_pool, v_pool, ints(-1, 5, -7))
    assert k_pool.reshape(8, 2)[5].tolist() == [1, 1]
    assert np.count_nonzero(k_pool) == 2 and np.count_nonzero(v_pool) == 2


def test_gather_reassembles_a_sequence_written_token_by_token():
    k_pool, v_pool = np.zeros((8, 4, 2, 3), np.float16), np.zeros((8, 4, 2, 3), np.float16)
    block_table = ints(5, 0, 3)
    k, v = random_tokens(10, 2, 3)
    for pos in range(10):  # decode steps: one token at a time
        slots = slot_mapping(block_table, ints(pos), 4)
        write_kv(k[pos:pos + 1], v[pos:pos + 1], k_pool, v_pool, slots)
    got_k, got_v = gather_kv(k_pool, v_pool, block_table, 10)
    assert (got_k == k).all() and (got_v == v).all()
    # A shorter context stops inside the first block; the blocks after it are not read.
    assert (gather_kv(k_pool, v_pool, ints(5, -1, -1), 3)[0] == k[:3]).all()


def test_batched_gather_concatenates_sequences_in_order():
    k_pool, v_pool = random_pools(6, 1, 2)
    tables = ints(4, 1, 2, -1).reshape(2, 2)
    k, v = gather_kv(k_pool, v_pool, tables, ints(20, 3))
    assert k.shape == (23, 1, 2)
    assert (k[:16] == k_pool[4]).all() and (k[16:20] == k_pool[1, :4]).all()
    assert (k[20:] == k_pool[2, :3]).all() and (v[20:] == v_pool[2, :3]).all()


def test_copy_blocks_by_hand():
    k_pool, v_pool = random_pools(5, 1, 2)
    k_before, v_before = k_pool.copy(), v_pool.copy()
    copy_blocks(k_pool, v_pool, ints(1, 4), ints(3, 0))
    assert (k_pool[3] == k_before[1]).all() and (k_pool[0] == k_before[4]).all()
    assert (v_pool[3] == v_before[1]).all() and (v_pool[0] == v_before[4]).all()
    assert (k_pool[[1, 2, 4]] == k_before[[1, 2, 4]]).all()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_batched_writes_in_any_order_then_gather_round_trip(data):
    """Several sequences on shuffled blocks, written in random chunks of shuffled tokens with
    padding mixed in, gather back to exactly what was written; blocks nobody owns are untouched."""
    block_size = data.draw(st.sampled_from([1, 2, 4, 16]), label="block_size")
    lengths = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=4), label="lengths")
    blocks_needed = [-(-n // block_size) for n in lengths]
    max_blocks = max(blocks_needed) + data.draw(st.integers(0, 2))
    num_blocks = sum(blocks_needed) + data.draw(st.integers(0, 3))
    order = data.draw(st.permutations(range(num_blocks)), label="block order")
    tables = np.full((len(lengths), max_blocks), -1, np.int32)
    start = 0
    for seq, needed in enumerate(blocks_needed):
        tables[seq, :needed] = order[start:start + needed]
        start += needed

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    seq_ids = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    padding = rng.integers(0, 4)  # padded tokens: position -1, any seq_id
    seq_ids = np.concatenate([seq_ids, rng.integers(-5, 5, padding)]).astype(np.int32)
    positions = np.concatenate([positions, np.full(padding, -1)]).astype(np.int32)
    shuffle = rng.permutation(len(positions))
    seq_ids, positions = seq_ids[shuffle], positions[shuffle]
    k_new = rng.standard_normal((len(positions), 2, 4)).astype(np.float16)
    v_new = rng.standard_normal((len(positions), 2, 4)).astype(np.float16)

    k_pool = rng.standard_normal((num_blocks, block_size, 2, 4)).astype(np.float16)
    v_pool = rng.standard_normal((num_blocks, block_size, 2, 4)).astype(np.float16)
    k_before = k_pool.copy()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(positions)), max_size=3), label="cuts"))
    for chunk in np.split(np.arange(len(positions)), cuts):
        slots = slot_mapping(tables, positions[chunk], block_size, seq_ids[chunk])
        write_kv(k_new[chunk], v_new[chunk], k_pool, v_pool, slots)

    got_k, got_v = gather_kv(k_pool, v_pool, tables, np.array(lengths, np.int32))
    real = positions >= 0
    by_sequence = np.lexsort((positions[real], seq_ids[real]))  # sequence 0's tokens in order, ...
    assert (got_k == k_new[real][by_sequence]).all() and (got_v == v_new[real][by_sequence]).all()
    unowned = sorted(set(range(num_blocks)) - set(tables[tables >= 0].tolist()))
    assert (k_pool[unowned] == k_before[unowned]).all()


def test_reference_imports_neither_numba_nor_torch():
    code = "import sys, kvlab.ref.paging; print('numba' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- every backend against the reference, bit for bit ------------------------------------------

STEPS = [  # num_kv_heads, head_dim, cache_len (before the step), new tokens, pool dtype
    pytest.param(2, 64, 14, 5, np.float16, id="crosses-a-block-boundary"),
    pytest.param(2, 64, 0, 20, np.float16, id="prefill-partial-last-block"),
    pytest.param(2, 64, 37, 1, np.float16, id="decode-one-token"),
    pytest.param(1, 128, 14, 5, np.float16, id="one-kv-head-d128"),
    pytest.param(4, 64, 3, 2, np.float16, id="kv-heads-equal-q-heads-4"),
    pytest.param(1, 256, 15, 3, np.float16, id="d256"),
    pytest.param(2, 64, 0, 40, np.float32, id="40-tokens-fp32"),
]


@pytest.mark.parametrize("num_kv_heads, head_dim, cache_len, new_tokens, dtype", STEPS)
def test_one_step_matches_reference(backend, num_kv_heads, head_dim, cache_len, new_tokens, dtype):
    """slot_mapping -> write_kv -> gather_kv for one sequence on a shuffled block table."""
    context_len = cache_len + new_tokens
    k_pool, v_pool = random_pools(4, num_kv_heads, head_dim, dtype)
    k, v = random_tokens(new_tokens, num_kv_heads, head_dim, dtype)
    block_table = shuffled_table(-(-context_len // BLOCK_SIZE), num_blocks=4, max_blocks=4)
    positions = np.arange(cache_len, context_len, dtype=np.int32)

    slots, _ = assert_matches_reference(backend, "slot_mapping", block_table, positions, BLOCK_SIZE)
    _, (_, _, k_pool, v_pool, _) = assert_matches_reference(backend, "write_kv", k, v, k_pool,
                                                            v_pool, slots)
    assert_matches_reference(backend, "gather_kv", k_pool, v_pool, block_table, context_len)


def test_batched_step_matches_reference(backend):
    """Three sequences append 5, 3 and 1 tokens in one call, with padding between them; then one
    batched gather reads all three."""
    k_pool, v_pool = random_pools(6, 2, 64)
    tables = np.array([[4, 1, -1],    # sequence 0 crosses from block 4 into block 1
                       [5, -1, -1],   # sequence 1 starts in block 5
                       [0, 2, -1]],   # sequence 2 decodes its 18th token into block 2; 3 is free
                      dtype=np.int32)
    cache_lens, new_tokens = [14, 0, 17], [5, 3, 1]
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(cache_lens, new_tokens)])
    seq_ids = np.repeat([0, 1, 2], new_tokens)
    positions = np.insert(positions, [5, 8], -1).astype(np.int32)  # two padding tokens
    seq_ids = np.insert(seq_ids, [5, 8], 0).astype(np.int32)
    k, v = random_tokens(len(positions), 2, 64)

    slots, _ = assert_matches_reference(backend, "slot_mapping", tables, positions, BLOCK_SIZE,
                                        seq_ids)
    assert (slots == -1).sum() == 2
    _, (_, _, k_pool, v_pool, _) = assert_matches_reference(backend, "write_kv", k, v, k_pool,
                                                            v_pool, slots)
    context_lens = np.add(cache_lens, new_tokens).astype(np.int32)
    assert_matches_reference(backend, "gather_kv", k_pool, v_pool, tables, context_lens)


@pytest.mark.parametrize("slots", [
    pytest.param(ints(-1, -1, -1), id="all-padding"),
    pytest.param(ints(40, -1, 3), id="padding-between-tokens"),
    pytest.param(ints(63, 0, 17), id="slots-out-of-order"),
    pytest.param(ints(), id="no-tokens"),
])
def test_write_kv_matches_reference(backend, slots):
    k_pool, v_pool = random_pools(4, 2, 64)
    k, v = random_tokens(len(slots), 2, 64)
    _, (_, _, k_after, _, _) = assert_matches_reference(backend, "write_kv", k, v, k_pool, v_pool,
                                                        slots)
    untouched = np.ones(4 * BLOCK_SIZE, bool)
    untouched[slots[slots >= 0]] = False
    assert_same_bits(k_after.reshape(-1, 2, 64)[untouched], k_pool.reshape(-1, 2, 64)[untouched])


def test_gather_nothing_matches_reference(backend):
    k_pool, v_pool = random_pools(2, 2, 64)
    (k, _), _ = assert_matches_reference(backend, "gather_kv", k_pool, v_pool, ints(-1), 0)
    assert k.shape == (0, 2, 64)


@pytest.mark.parametrize("src, dst", [
    pytest.param(ints(1, 4), ints(3, 0), id="two-blocks"),
    pytest.param(ints(2), ints(1), id="one-block"),
    pytest.param(ints(2, 2), ints(0, 4), id="one-source-two-copies"),  # two sequences fork off it
    pytest.param(ints(), ints(), id="none"),
])
def test_copy_blocks_matches_reference(backend, src, dst):
    k_pool, v_pool = random_pools(5, 2, 64)
    assert_matches_reference(backend, "copy_blocks", k_pool, v_pool, src, dst)


# --- bad inputs: a clear error naming the argument, and nothing written ------------------------

def valid_args(op: str) -> dict[str, Any]:
    """Arguments that work: 4 blocks of 16 slots, 2 kv heads of 64; a sequence on blocks 2, 0
    with 14 tokens cached and 5 new ones (positions 14..18, slots 46, 47, 0, 1, 2)."""
    k_pool, v_pool = random_pools(4, 2, 64)
    k, v = random_tokens(5, 2, 64)
    block_table = ints(2, 0, -1, -1)
    return {
        "slot_mapping": dict(block_table=block_table, positions=np.arange(14, 19, dtype=np.int32),
                             block_size=BLOCK_SIZE),
        "write_kv": dict(k=k, v=v, k_pool=k_pool, v_pool=v_pool, slots=ints(46, 47, 0, 1, 2)),
        "gather_kv": dict(k_pool=k_pool, v_pool=v_pool, block_table=block_table, context_len=19),
        "copy_blocks": dict(k_pool=k_pool, v_pool=v_pool, src=ints(2), dst=ints(3)),
    }[op]


BAD_INPUTS = [  # op, {argument: bad value}, error, message (a regex)
    # 2**27 * 16 = 2**31: its slots would wrap to negative int32 and be skipped as padding
    ("slot_mapping", {"block_table": ints(2**27, 2**27 - 1)}, ValueError,
     r"block_table entries \[134217728\] times block_size 16 overflow an int32 slot"),
    ("write_kv", {"k": np.zeros((5, 2, 64), np.float32)}, TypeError,
     "k must have dtype float16 matching k_pool, got float32"),
    ("write_kv", {"slots": np.arange(5, dtype=np.int64)}, TypeError,
     "slots must have dtype int32, got int64"),
    ("write_kv", {"k": np.zeros((5, 2, 32), np.float16)}, ValueError,
     r"k must have shape \[T, num_kv_heads, head_dim\] = \[5, 2, 64\] matching k_pool, "
     r"got \[5, 2, 32\]"),
    ("write_kv", {"k": np.zeros((5, 128), np.float16)}, ValueError,
     r"k must be 3-D \[T, num_kv_heads, head_dim\], got shape \[5, 128\]"),
    ("write_kv", {"v": np.zeros((4, 2, 64), np.float16)}, ValueError,
     r"v must have shape .* = \[5, 2, 64\] matching k, got \[4, 2, 64\]"),
    ("write_kv", {"slots": ints(0, 1, 2, 3)}, ValueError,
     r"slots must have shape \[T\] = \[5\] matching k, got \[4\]"),
    ("write_kv", {"slots": ints(0, 1, 64, 3, 4)}, ValueError,
     r"slots must be in \[0, 64\) \(4 blocks of 16 slots; negative = skip\), got \[64\]"),
    ("write_kv", {"slots": ints(7, 1, 7, -1, -1)}, ValueError,
     r"slots must not repeat .* got duplicates \[7\]"),
    ("write_kv", {"v_pool": np.zeros((4, 16, 2, 32), np.float16)}, ValueError,
     r"v_pool must have shape \[num_blocks, block_size, num_kv_heads, head_dim\] = "
     r"\[4, 16, 2, 64\] matching k_pool"),
    ("write_kv", {"v_pool": np.zeros((4, 16, 2, 64), np.float32)}, TypeError,
     "v_pool must have dtype float16 matching k_pool, got float32"),
    ("write_kv", {"k_pool": np.zeros((4, 16, 2, 64), np.int8)}, TypeError,
     "k_pool must have dtype float16 or float32, got int8"),
    ("write_kv", {"k": [[0.0]]}, TypeError, "k must be an array .* got list"),
    ("slot_mapping", {"positions": ints(63, 64)}, ValueError,
     r"positions \[64\] are beyond the block table: 4 blocks of 16 hold positions < 64"),
    ("slot_mapping", {"positions": ints(31, 32, 40)}, ValueError,
     r"positions \[32, 40\] fall in block_table entries that are -1"),
    ("slot_mapping", {"positions": np.arange(3, dtype=np.int64)}, TypeError,
     "positions must have dtype int32, got int64"),
    ("slot_mapping", {"block_size": 0}, ValueError, "block_size must be >= 1, got 0"),
    ("slot_mapping", {"block_size": 16.0}, TypeError, "block_size must be an int, got float"),
    ("slot_mapping", {"block_table": ints(2, 0, 1, 3).reshape(2, 2)}, ValueError,
     "seq_ids .* is required when block_table is 2-D"),
    ("slot_mapping", {"seq_ids": ints(0, 0, 0, 0, 0)}, ValueError,
     "seq_ids must be None when block_table is 1-D"),
    ("slot_mapping", {"block_table": ints(2, 0, 1, 3).reshape(2, 2),
                      "seq_ids": ints(0, 1, 2, 0, 0)}, ValueError, r"seq_ids must be in \[0, 2\) \(rows of block_table\), got \[2\]"),
    ("slot_mapping", {"block_table": np.zeros((1, 1, 4), np.int32)}, ValueError,
     r"block_table must be 1-D \[max_blocks\] or 2-D \[num_seqs, max_blocks\]"),
    ("gather_kv", {"context_len": 65}, ValueError,
     r"context_len must be in \[0, 64\] \(4 blocks of 16 in the block table\), got 65"),
    ("gather_kv", {"context_len": -1}, ValueError, "context_len must be >= 0, got -1"),
    ("gather_kv", {"context_len": 40}, ValueError,
     r"block_table entries read by context_len=40 must be in \[0, 4\) .* got \[-1\]"),
    ("gather_kv", {"block_table": ints(2, 9, -1, -1)}, ValueError,
     r"block_table entries read by context_len=19 must be in \[0, 4\) .* got \[9\]"),
    ("gather_kv", {"block_table": ints(2, 0, 1, 3).reshape(2, 2)}, TypeError,
     "context_len must be an int32 array .num_seqs. when block_table is 2-D, got int"),
    ("gather_kv", {"block_table": ints(2, 0, 1, 3).reshape(2, 2), "context_len": ints(19)},
     ValueError, r"context_len must have shape \[num_seqs\] = \[2\] matching block_table"),
    ("gather_kv", {"block_table": ints(2, 0, 1, 3).reshape(2, 2), "context_len": ints(19, 33)},
     ValueError, r"context_len\[1\] must be in \[0, 32\]"),
    ("gather_kv", {"context_len": ints(19)}, TypeError, "context_len must be an int, got "),
    ("copy_blocks", {"dst": ints(2)}, ValueError,
     r"dst must not share blocks with src .* got \[2\] in both"),
    ("copy_blocks", {"dst": ints(4)}, ValueError, r"dst must be in \[0, 4\) .* got \[4\]"),
    ("copy_blocks", {"src": ints(-1)}, ValueError, r"src must be in \[0, 4\) .* got \[-1\]"),
    ("copy_blocks", {"src": ints(0, 2), "dst": ints(3, 3)}, ValueError,
     r"dst must not repeat .* got duplicates \[3\]"),
    ("copy_blocks", {"dst": ints(3, 1)}, ValueError,
     r"dst must have shape \[N\] = \[1\] matching src, got \[2\]"),
    ("copy_blocks", {"src": np.array([2], np.int64)}, TypeError,
     "src must have dtype int32, got int64"),
]


@pytest.mark.parametrize("op, bad, error, message", BAD_INPUTS,
                         ids=[f"{op}-{'-'.join(bad)}-{i}" for i, (op, bad, *_) in
                              enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_before_anything_is_written(backend, op, bad, error, message):
    args = {**valid_args(op), **bad}
    moved = {name: on_backend(backend, a) for name, a in args.items()}
    before = {name: backend.to_numpy(moved[name]) for name, a in args.items()
              if isinstance(a, np.ndarray)}
    with pytest.raises(error, match=message):
        getattr(backend.paging, op)(**moved)
    for name, was in before.items():
        assert_same_bits(backend.to_numpy(moved[name]), was)


@pytest.mark.parametrize("op", ["write_kv", "gather_kv", "copy_blocks"])
def test_pools_must_be_contiguous(backend, op):
    """A strided pool has no flat [slots, Hkv, D] view, so every backend refuses it up front."""
    moved = {name: on_backend(backend, a) for name, a in valid_args(op).items()}
    wide = backend.asarray(np.zeros((4, BLOCK_SIZE, 2, 128), np.float16))
    moved["k_pool"] = wide[:, :, :, ::2]  # [4, 16, 2, 64], every other element of a wider pool
    with pytest.raises(ValueError, match="k_pool must be C-contiguous"):
        getattr(backend.paging, op)(**moved)
    assert not backend.to_numpy(wide).any()


# --- real sizes, real GPU (skipped without one; scripts/gpu_check.sh runs them) ---------------

@pytest.mark.gpu
@pytest.mark.sanitize
def test_cuda_paging_at_real_size_equals_numpy():
    """A prefill-sized batch: 8 sequences x 512 tokens, 8 kv heads, head_dim 128, shuffled tables,
    padding mixed in; write, gather and copy-on-write on the GPU equal NumPy bit for bit."""
    cuda = get_backend("cuda")
    num_seqs, seq_len, heads, head_dim = 8, 512, 8, 128
    max_blocks = seq_len // BLOCK_SIZE
    num_blocks = num_seqs * max_blocks + 16
    k_pool, v_pool = random_pools(num_blocks, heads, head_dim)
    tables = np.random.default_rng(3).permutation(num_blocks)[: num_seqs * max_blocks]
    tables = tables.reshape(num_seqs, max_blocks).astype(np.int32)
    positions = np.tile(np.arange(seq_len, dtype=np.int32), num_seqs)
    seq_ids = np.repeat(np.arange(num_seqs, dtype=np.int32), seq_len)
    positions[::97] = -1  # padding tokens scattered through the batch
    k, v = random_tokens(len(positions), heads, head_dim)
    lens = np.full(num_seqs, seq_len, dtype=np.int32)
    free = np.setdiff1d(np.arange(num_blocks), tables).astype(np.int32)
    src, dst = tables[0, : len(free)].copy(), free

    slots = slot_mapping(tables, positions, BLOCK_SIZE, seq_ids)
    write_kv(k, v, k_pool, v_pool, slots)
    k_ref, v_ref = gather_kv(k_pool, v_pool, tables, lens)

    k_pool_d, v_pool_d = (cuda.asarray(p) for p in random_pools(num_blocks, heads, head_dim))
    slots_d = cuda.paging.slot_mapping(cuda.asarray(tables), cuda.asarray(positions), BLOCK_SIZE,
                                       cuda.asarray(seq_ids))
    assert_same_bits(cuda.to_numpy(slots_d), slots)
    cuda.paging.write_kv(cuda.asarray(k), cuda.asarray(v), k_pool_d, v_pool_d, slots_d)
    k_out, v_out = cuda.paging.gather_kv(k_pool_d, v_pool_d, cuda.asarray(tables), cuda.asarray(lens))
    assert_same_bits(cuda.to_numpy(k_out), k_ref)
    assert_same_bits(cuda.to_numpy(v_out), v_ref)

    copy_blocks(k_pool, v_pool, src, dst)
    cuda.paging.copy_blocks(k_pool_d, v_pool_d, cuda.asarray(src), cuda.asarray(dst))
    assert_same_bits(cuda.to_numpy(k_pool_d), k_pool)
    assert_same_bits(cuda.to_numpy(v_pool_d), v_pool)
