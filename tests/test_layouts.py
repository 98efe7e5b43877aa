"""kvlab.layouts: every pair of pool layouts round-trips bit for bit, byte_offset agrees with
np.ravel_multi_index on the converted arrays, FlashInfer's CSR page table matches a hand-worked
example and inverts, and bad input is rejected with a message that names the problem.

Oracles: the axis orders stated in vLLM's "Paged Attention" design doc and FlashInfer's
"KV-Cache Layout" tutorial, written out here as explicit loops (test_vllm_layout_by_hand).
"""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab import layouts as L

PAIRS = list(itertools.product(L.LAYOUTS, repeat=2))


def _random_pool(shape, dtype, seed=0):
    """Random bits, NaNs and infinities included for float dtypes, so 'equal' means bit-equal."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


# --- conversions -----------------------------------------------------------------------------

@pytest.mark.parametrize("src, dst", PAIRS)
def test_every_pair_round_trips_bit_for_bit(src, dst):
    nhd = _random_pool((3, 16, 2, 32), np.float16)
    a = L.convert(nhd, "nhd", src)
    b = L.convert(a, src, dst)
    back = L.convert(b, dst, src)
    assert back.shape == a.shape and back.dtype == a.dtype
    np.testing.assert_array_equal(_bits(back), _bits(a))
    np.testing.assert_array_equal(_bits(L.convert(b, dst, "nhd")), _bits(nhd))
    assert b.flags.c_contiguous and b is not a


@st.composite
def _pools(draw):
    dtype = draw(st.sampled_from([np.float16, np.float32, np.int8, np.uint16, np.float64]))
    x = 16 // np.dtype(dtype).itemsize
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 4)),
             x * draw(st.integers(1, 3)))
    return _random_pool(shape, dtype, seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None)
@given(pool=_pools(), src=st.sampled_from(L.LAYOUTS), dst=st.sampled_from(L.LAYOUTS))
def test_round_trip_property(pool, src, dst):
    a = L.convert(pool, "nhd", src)
    assert a.shape == L.pool_shape(src, *pool.shape, itemsize=pool.itemsize)
    b = L.convert(a, src, dst)
    assert b.shape == L.pool_shape(dst, *pool.shape, itemsize=pool.itemsize)
    np.testing.assert_array_equal(_bits(L.convert(b, dst, src)), _bits(a))


def test_named_converters_match_convert_and_each_other():
    k = _random_pool((2, 8, 3, 16), np.float16, seed=1)
    v = _random_pool((2, 8, 3, 16), np.float16, seed=2)
    kc, vc = L.nhd_to_vllm(k, v)
    assert kc.shape == (2, 3, 2, 8, 8) and vc.shape == (2, 3, 16, 8)
    np.testing.assert_array_equal(_bits(kc), _bits(L.convert(k, "nhd", "vllm_k")))
    np.testing.assert_array_equal(_bits(vc), _bits(L.convert(v, "nhd", "vllm_v")))
    k2, v2 = L.vllm_to_nhd(kc, vc)
    np.testing.assert_array_equal(_bits(k2), _bits(k))
    np.testing.assert_array_equal(_bits(v2), _bits(v))
    np.testing.assert_array_equal(_bits(L.hnd_to_nhd(L.nhd_to_hnd(k))), _bits(k))


def test_vllm_layout_by_hand():
    """Element (n, s, h, d) sits at k[n, h, d // x, s, d % x] and v[n, h, d, s] (x = 8 for fp16)."""
    pool = np.arange(2 * 4 * 3 * 16, dtype=np.float16).reshape(2, 4, 3, 16)
    k, v, hnd = L.nhd_to_vllm_k(pool), L.nhd_to_vllm_v(pool), L.nhd_to_hnd(pool)
    for n, s, h, d in itertools.product(range(2), range(4), range(3), range(16)):
        assert k[n, h, d // 8, s, d % 8] == pool[n, s, h, d]
        assert v[n, h, d, s] == pool[n, s, h, d]
        assert hnd[n, h, s, d] == pool[n, s, h, d]


@pytest.mark.parametrize("dtype, x", [(np.int8, 16), (np.float16, 8), (np.float32, 4)])
def test_x_is_sixteen_bytes(dtype, x):
    assert L.vllm_x(np.dtype(dtype).itemsize) == x
    k = L.nhd_to_vllm_k(np.zeros((1, 2, 1, 32), dtype))
    assert k.shape[-1] == x and k.shape[-1] * k.itemsize == 16


# --- byte offsets ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int8])
def test_byte_offset_matches_ravel_multi_index(layout, dtype):
    shape = (3, 5, 2, 32)
    nhd = np.arange(np.prod(shape)).reshape(shape).astype(np.int64)  # each element's NHD index
    itemsize = np.dtype(dtype).itemsize
    # the converted array of element *ids* (int64 layout, but x taken from the real dtype)
    x = 16 // itemsize
    converted = {
        "nhd": nhd,
        "hnd": nhd.transpose(0, 2, 1, 3),
        "vllm_k": nhd.reshape(3, 5, 2, 32 // x, x).transpose(0, 2, 3, 1, 4),
        "vllm_v": nhd.transpose(0, 2, 3, 1),
    }[layout]
    np.testing.assert_array_equal(converted.shape, L.pool_shape(layout, *shape, itemsize=itemsize))
    if layout != "vllm_k":  # the int64 stand-in has the right x only through itemsize
        typed = L.convert(nhd.astype(dtype), "nhd", layout)
        assert typed.shape == converted.shape
    where = np.argwhere(np.ones(converted.shape, bool))  # every index of the converted array
    ids = converted[tuple(where.T)]
    b, s, h, d = np.unravel_index(ids, shape)
    expected = np.ravel_multi_index(tuple(where.T), converted.shape) * itemsize
    got = L.byte_offset(layout, b, s, h, d, shape, itemsize)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("layout", L.LAYOUTS)
def test_byte_offset_reads_the_element_from_the_converted_buffer(layout):
    pool = _random_pool((2, 4, 3, 16), np.float16, seed=3)
    flat = L.convert(pool, "nhd", layout).reshape(-1).view(np.uint16)
    for idx in [(0, 0, 0, 0), (1, 3, 2, 15), (1, 2, 0, 9), (0, 1, 1, 7)]:
        off = L.byte_offset(layout, *idx, shape=pool.shape, itemsize=2)
        assert isinstance(off, int) and off % 2 == 0
        assert flat[off // 2] == pool.view(np.uint16)[idx]


def test_byte_offset_hand_worked():
    shape = (4, 16, 8, 128)  # block 2, slot 5, head 3, dim 70, fp16
    assert L.byte_offset("nhd", 2, 5, 3, 70, shape, 2) == (((2 * 16 + 5) * 8 + 3) * 128 + 70) * 2
    assert L.byte_offset("hnd", 2, 5, 3, 70, shape, 2) == (((2 * 8 + 3) * 16 + 5) * 128 + 70) * 2
    assert L.byte_offset("vllm_k", 2, 5, 3, 70, shape, 2) == \
        ((((2 * 8 + 3) * 16 + 70 // 8) * 16 + 5) * 8 + 70 % 8) * 2
    assert L.byte_offset("vllm_v", 2, 5, 3, 70, shape, 2) == (((2 * 8 + 3) * 128 + 70) * 16 + 5) * 2
    # neighbours in dim are adjacent in NHD, HND and (within 16 bytes) vLLM keys; a block apart in V
    step = {lay: L.byte_offset(lay, 0, 0, 0, 1, shape, 2) - L.byte_offset(lay, 0, 0, 0, 0, shape, 2)
            for lay in L.LAYOUTS}
    assert step == {"nhd": 2, "hnd": 2, "vllm_k": 2, "vllm_v": 32}


# --- FlashInfer CSR --------------------------------------------------------------------------

def test_flashinfer_csr_hand_worked_example():
    indptr, indices, last = L.block_tables_to_flashinfer([[3, 1, -1], [0, -1, -1]], [20, 5], 16)
    assert indptr.tolist() == [0, 2, 3]
    assert indices.tolist() == [3, 1, 0]
    assert last.tolist() == [4, 5]
    assert indptr.dtype == indices.dtype == last.dtype == np.int32
    tables, lens = L.flashinfer_to_block_tables(indptr, indices, last, 16, max_blocks_per_seq=3)
    assert tables.tolist() == [[3, 1, -1], [0, -1, -1]] and lens.tolist() == [20, 5]
    assert tables.dtype == lens.dtype == np.int32
    # a full last page has last_page_len == page_size, not 0
    _, _, last = L.block_tables_to_flashinfer([[7, 2]], [32], 16)
    assert last.tolist() == [16]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_flashinfer_round_trip_property(data):
    block_size = data.draw(st.integers(1, 16))
    num_seqs = data.draw(st.integers(1, 5))
    width = data.draw(st.integers(1, 6))
    lens = [data.draw(st.integers(1, width * block_size)) for _ in range(num_seqs)]
    ids = data.draw(st.permutations(range(num_seqs * width)))  # distinct blocks everywhere
    tables = np.full((num_seqs, width), -1)
    for s, n in enumerate(lens):
        used = -(-n // block_size)
        tables[s, :used] = ids[s * width:s * width + used]
    csr = L.block_tables_to_flashinfer(tables, lens, block_size)
    assert csr[0][-1] == len(csr[1]) and np.all((1 <= csr[2]) & (csr[2] <= block_size))
    back, back_lens = L.flashinfer_to_block_tables(*csr, block_size, max_blocks_per_seq=width)
    np.testing.assert_array_equal(back, tables)
    np.testing.assert_array_equal(back_lens, lens)
    # FlashInfer's length rule: page_size * (pages - 1) + last_page_len
    np.testing.assert_array_equal(block_size * (np.diff(csr[0]) - 1) + csr[2], lens)


def test_flashinfer_ignores_stale_entries_past_the_used_blocks():
    indptr, indices, last = L.block_tables_to_flashinfer([[4, 9, 2]], [10], 16)
    assert indptr.tolist() == [0, 1] and indices.tolist() == [4] and last.tolist() == [10]


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: L.convert(np.zeros((1, 2, 3, 8), np.float16), "nhd", "paged"), "unknown layout"),
    (lambda: L.convert(np.zeros((1, 2, 3, 8), np.float16), "NHD ", "hnd"), "unknown layout"),
    (lambda: L.nhd_to_hnd(np.zeros((2, 3, 8), np.float16)), r"4-D \[num_blocks, block_size"),
    (lambda: L.nhd_to_hnd([[[[0.0]]]]), "numpy.ndarray"),
    (lambda: L.nhd_to_vllm_k(np.zeros((1, 2, 3, 12), np.float16)), "not divisible by x = 8"),
    (lambda: L.nhd_to_vllm_k(np.zeros((1, 2, 3, 8), np.int8)), "not divisible by x = 16"),
    (lambda: L.vllm_k_to_nhd(np.zeros((1, 3, 2, 4, 4), np.float16)), "x = 16 // itemsize = 8"),
    (lambda: L.vllm_v_to_nhd(np.zeros((1, 3, 2, 4, 4), np.float16)), "4-D"),
    (lambda: L.nhd_to_vllm(np.zeros((1, 2, 3, 8), np.float16), np.zeros((1, 2, 3, 8), np.float32)),
     "same shape and dtype"),
    (lambda: L.vllm_x(3), "divide 16"),
    (lambda: L.vllm_x(0), ">= 1"),
    (lambda: L.pool_shape("vllm_k", 1, 16, 2, 100), "not divisible"),
    (lambda: L.pool_shape("hnd", 0, 16, 2, 64), "num_blocks must be >= 1"),
    (lambda: L.byte_offset("nhd", 0, 16, 0, 0, (1, 16, 2, 64)), r"slot must be in \[0, 16\)"),
    (lambda: L.byte_offset("nhd", 0, 0, -1, 0, (1, 16, 2, 64)), "head must be in"),
    (lambda: L.byte_offset("nhd", 0, 0, 0, 0.5, (1, 16, 2, 64)), "dim must be an int"),
    (lambda: L.byte_offset("nhd", 0, 0, 0, 0, (16, 2, 64)), "shape must be"),
    (lambda: L.byte_offset("vllm_k", 0, 0, 0, 0, (1, 16, 2, 60), 2), "not divisible"),
    (lambda: L.block_tables_to_flashinfer([[3, 1]], [20, 5], 16), "one per sequence"),
    (lambda: L.block_tables_to_flashinfer([[3, -1]], [20], 16), "block ids >= 0"),
    (lambda: L.block_tables_to_flashinfer([[3]], [20], 16), "only 1 columns"),
    (lambda: L.block_tables_to_flashinfer([[3, 3]], [20], 16), "lists a block twice"),
    (lambda: L.block_tables_to_flashinfer([[3, 1]], [0], 16), "context_lens must be >= 1"),
    (lambda: L.block_tables_to_flashinfer([[3.0, 1.0]], [20], 16), "must hold integers"),
    (lambda: L.block_tables_to_flashinfer([3, 1], [20], 16), "2-D"),
    (lambda: L.block_tables_to_flashinfer([[3, 1]], [20], 0), "block_size must be >= 1"),
    (lambda: L.check_block_tables([[3, 1]], [20], 16, num_blocks=3), "out of range"),
    (lambda: L.flashinfer_to_block_tables([0, 2], [3, 1], [4, 5], 16), "num_seqs \\+ 1"),
    (lambda: L.flashinfer_to_block_tables([1, 2], [3, 1], [4], 16), r"kv_indptr\[0\] must be 0"),
    (lambda: L.flashinfer_to_block_tables([0, 2, 2], [3, 1], [4, 5], 16), "at least one"),
    (lambda: L.flashinfer_to_block_tables([0, 3], [3, 1], [4], 16), "must equal len"),
    (lambda: L.flashinfer_to_block_tables([0, 2], [3, 1], [0], 16), r"in \[1, block_size"),
    (lambda: L.flashinfer_to_block_tables([0, 2], [3, 1], [17], 16), r"in \[1, block_size"),
    (lambda: L.flashinfer_to_block_tables([0, 2], [3, -1], [4], 16), "page ids >= 0"),
    (lambda: L.flashinfer_to_block_tables([0, 2], [3, 3], [4], 16), "lists a page twice"),
    (lambda: L.flashinfer_to_block_tables([0, 2], [3, 1], [4], 16, max_blocks_per_seq=1),
     "too small"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
