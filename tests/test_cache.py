"""kvlab.cache: KvPool, KvLayer (ferrum's ``KvLayer`` API, paged and contiguous) and KvCacheManager.

Hand-worked block tables and pool contents on the numpy backend, then one scripted scenario
(prefill, fork, copy-on-write, prefix hit, release) run on every backend, whose results must equal
the numpy backend's bit for bit: these classes only move bytes. The cuda backend runs in Numba's
simulator here, so shapes stay tiny.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvlab.backends import BACKENDS, get_backend
from kvlab.cache import KvCacheManager, KvLayer, KvPool
from kvlab.paging import BlockAllocator, OutOfBlocksError
from kvlab.ref.paging import slot_mapping, write_kv


def tokens_kv(num_tokens, num_kv_heads=2, head_dim=8, seed=0, dtype=np.float16):
    """Random k, v ``[num_tokens, num_kv_heads, head_dim]``."""
    rng = np.random.default_rng(seed)
    shape = (num_tokens, num_kv_heads, head_dim)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


def storage_of(layer):
    """A host copy of everything a layer could have written (its pool, or its k/v)."""
    be = layer.backend
    if layer.is_paged:
        return be.to_numpy(layer.k_pool).copy(), be.to_numpy(layer.v_pool).copy()
    return be.to_numpy(layer.k).copy(), be.to_numpy(layer.v).copy()


# --- KvPool ----------------------------------------------------------------------------------

def test_pool_shapes_and_dtypes():
    pool = KvPool(num_layers=2, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8)
    assert len(pool.k_pools) == len(pool.v_pools) == 2
    assert pool.k_pools[1].shape == (5, 4, 2, 8) and pool.k_pools[1].dtype == np.float16
    assert pool.dtype == "float16" and pool.backend.name == "numpy"
    assert pool.nbytes == 2 * 2 * (5 * 4 * 2 * 8) * 2  # K and V, 2 layers, fp16
    assert not np.shares_memory(pool.k_pools[0], pool.k_pools[1])
    assert KvPool(1, 2, 4, 1, 8, dtype="float32").k_pools[0].dtype == np.float32
    assert KvPool(1, 2, 4, 1, 8, backend=get_backend("numpy")).backend.name == "numpy"
    with pytest.raises(ValueError, match="'int4' is quantize/dequantize only"):
        KvPool(1, 2, 4, 1, 8, dtype="int4")
    with pytest.raises(ValueError, match="unknown pool dtype 'bf16'"):
        KvPool(1, 2, 4, 1, 8, dtype="bf16")
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        KvPool(1, 0, 4, 1, 8)


# --- KvLayer: ferrum's API ---------------------------------------------------------------------

def test_paged_layer_starts_empty():
    layer = KvLayer.alloc_paged(max_blocks_per_seq=4, block_size=16, num_kv_heads=2, head_dim=8)
    assert layer.is_paged and layer.len == 0
    assert (layer.capacity, layer.block_size, layer.num_kv_heads, layer.head_dim) == (64, 16, 2, 8)
    assert layer.block_table.dtype == np.int32 and layer.block_table.tolist() == [-1] * 4
    assert layer.context_lens.dtype == np.int32 and layer.context_lens.tolist() == [0]
    assert layer.paged_block_indices.dtype == np.int32 and layer.paged_block_indices.size == 0
    assert layer.k_pool.shape == (4, 16, 2, 8) and layer.k is None  # its own pool: 4 blocks
    k, v = layer.gather()
    assert k.shape == v.shape == (0, 2, 8)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_paged_write_across_a_block_boundary(backend_name):
    """14 tokens, then 5 (block 16): the second write fills block 0's last 2 slots, then opens
    block 1 for the other 3. The same on every backend (cuda: the simulator here)."""
    layer = KvLayer.alloc_paged(4, 16, 2, 8, backend=backend_name)
    be = layer.backend
    k1, v1 = tokens_kv(14, seed=1)
    k2, v2 = tokens_kv(5, seed=2)
    layer.write(be.asarray(k1), be.asarray(v1))
    assert layer.block_table.tolist() == [0, -1, -1, -1] and layer.len == 14
    layer.write(be.asarray(k2), be.asarray(v2))
    assert layer.len == 19 and layer.context_lens.tolist() == [19]
    assert layer.block_table.tolist() == [0, 1, -1, -1]
    assert layer.paged_block_indices.tolist() == [0, 1]
    k_pool, v_pool = storage_of(layer)
    np.testing.assert_array_equal(k_pool[0, :14], k1)
    np.testing.assert_array_equal(k_pool[0, 14:], k2[:2])
    np.testing.assert_array_equal(v_pool[1, :3], v2[2:])
    k, v = (be.to_numpy(x) for x in layer.gather())
    np.testing.assert_array_equal(k, np.concatenate([k1, k2]))
    np.testing.assert_array_equal(v, np.concatenate([v1, v2]))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_contiguous_layer_seed_api_and_write(backend_name):
    layer = KvLayer.alloc_contig(capacity=20, num_kv_heads=2, head_dim=8, backend=backend_name)
    be = layer.backend
    assert not layer.is_paged and layer.capacity == 20 and layer.len == 0
    assert layer.block_size is None and layer.block_table is None
    assert layer.paged_block_indices is None and layer.k_pool is None
    assert tuple(layer.k.shape) == tuple(layer.v.shape) == (20, 2, 8)
    assert be.to_numpy(layer.k).dtype == np.float16
    k1, v1 = tokens_kv(14, seed=1)
    k2, v2 = tokens_kv(5, seed=2)
    layer.write(be.asarray(k1), be.asarray(v1))
    layer.write(be.asarray(k2), be.asarray(v2))
    assert layer.len == 19 and layer.context_lens.tolist() == [19]
    k_rows = storage_of(layer)[0][:19]  # row p of the contiguous cache holds token p
    np.testing.assert_array_equal(k_rows, np.concatenate([k1, k2]))
    k, v = (be.to_numpy(x) for x in layer.gather())
    np.testing.assert_array_equal(k, np.concatenate([k1, k2]))
    np.testing.assert_array_equal(v, np.concatenate([v1, v2]))


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contig"])
def test_writing_past_capacity_changes_nothing(paged):
    layer = (KvLayer.alloc_paged(2, 4, 2, 8) if paged  # capacity 2 blocks x 4 = 8
             else KvLayer.alloc_contig(8, 2, 8))
    layer.write(*tokens_kv(6, seed=1))
    table, before = layer.block_table, storage_of(layer)
    with pytest.raises(ValueError, match="cannot hold 9 tokens: capacity is 8"):
        layer.write(*tokens_kv(3, seed=2))  # would need a third block: never wraps to block 0
    assert layer.len == 6
    if paged:
        assert layer.block_table.tolist() == table.tolist() and layer.allocator.num_used == 2
    for after, was in zip(storage_of(layer), before):
        np.testing.assert_array_equal(after, was)
    layer.write(*tokens_kv(2, seed=3))  # exactly full is fine
    assert layer.len == 8


def test_bad_token_arrays_are_refused_before_writing():
    import torch

    layer = KvLayer.alloc_paged(2, 4, 2, 8)
    k, v = tokens_kv(3)
    with pytest.raises(ValueError, match=r"k must have shape .* = \[3, 2, 8\]"):
        layer.write(k[:, :1], v)
    with pytest.raises(TypeError, match="k must have dtype float16"):
        layer.write(k.astype(np.float32), v)
    with pytest.raises(ValueError, match="v must have shape"):
        layer.write(k, v[:2])
    with pytest.raises(TypeError, match="k must be a ndarray for the numpy backend, got Tensor"):
        layer.write(torch.from_numpy(k), v)
    assert layer.len == 0 and layer.allocator.num_used == 0


def test_set_len_shrinks_and_reserve_lets_an_op_write_through_the_table():
    layer = KvLayer.alloc_paged(4, 4, 2, 8)
    k, v = tokens_kv(10)
    layer.write(k, v)
    assert layer.paged_block_indices.tolist() == [0, 1, 2]
    layer.set_len(5)  # keeps 2 blocks, gives block 2 back
    assert layer.paged_block_indices.tolist() == [0, 1] and layer.allocator.num_used == 2
    np.testing.assert_array_equal(layer.gather()[0], k[:5])
    layer.set_len(0)
    assert layer.paged_block_indices.size == 0 and layer.allocator.num_used == 0
    # ferrum's flow for a fused op: reserve, let the op write via block_table, then set_len.
    layer.reserve(6)
    assert layer.len == 0 and layer.block_table.tolist()[:2] != [-1, -1]
    slots = slot_mapping(layer.block_table, np.arange(6, dtype=np.int32), layer.block_size)
    write_kv(k[:6], v[:6], layer.k_pool, layer.v_pool, slots)
    layer.set_len(6)
    np.testing.assert_array_equal(layer.gather()[1], v[:6])
    with pytest.raises(ValueError, match="cannot hold 17 tokens: capacity is 16"):
        layer.set_len(17)
    layer.release()
    assert layer.len == 0 and layer.allocator.num_used == 0


def test_sequences_over_a_shared_pool_and_allocator():
    pool = KvPool(num_layers=1, num_blocks=4, block_size=4, num_kv_heads=1, head_dim=2)
    alloc = pool.new_allocator()
    a = KvLayer.alloc_paged(3, 4, 1, 2, pool=pool, allocator=alloc)
    b = KvLayer.alloc_paged(3, 4, 1, 2, pool=pool, allocator=alloc)
    ka, va = tokens_kv(8, 1, 2, seed=1)
    kb, vb = tokens_kv(3, 1, 2, seed=2)
    a.write(ka[:5], va[:5])  # blocks 0, 1
    b.write(kb, vb)  # block 2
    a.write(ka[5:], va[5:])  # fills block 1
    assert a.block_table.tolist() == [0, 1, -1] and b.block_table.tolist() == [2, -1, -1]
    np.testing.assert_array_equal(a.gather()[0], ka)
    np.testing.assert_array_equal(b.gather()[1], vb)
    np.testing.assert_array_equal(pool.k_pools[0][2, :3], kb)
    # The pool has one block left: b cannot grow by two, and nothing changes.
    before = alloc.snapshot()
    with pytest.raises(OutOfBlocksError, match=r"needs 2 block\(s\) but only 1"):
        b.write(*tokens_kv(6, 1, 2, seed=3))
    assert alloc.snapshot() == before and b.len == 3
    a.release()
    assert alloc.num_used == 1 and a.block_table.tolist() == [-1, -1, -1]


def test_alloc_paged_argument_errors():
    pool = KvPool(1, 4, 4, 1, 2)
    alloc = pool.new_allocator()
    with pytest.raises(ValueError, match="allocator was given without the pool"):
        KvLayer.alloc_paged(2, 4, 1, 2, allocator=alloc)
    with pytest.raises(ValueError, match="needs the BlockAllocator"):
        KvLayer.alloc_paged(2, 4, 1, 2, pool=pool)
    with pytest.raises(ValueError, match="block_size=8 does not match the pool's 4"):
        KvLayer.alloc_paged(2, 8, 1, 2, pool=pool, allocator=alloc)
    with pytest.raises(ValueError, match="the allocator manages 5 blocks of 4"):
        KvLayer.alloc_paged(2, 4, 1, 2, pool=pool, allocator=BlockAllocator(5, 4))
    two_layers = KvPool(2, 4, 4, 1, 2)  # one KvLayer per layer would each take blocks
    with pytest.raises(ValueError, match="needs a one-layer pool, got 2 layers"):
        KvLayer.alloc_paged(2, 4, 1, 2, pool=two_layers, allocator=two_layers.new_allocator())
    with pytest.raises(ValueError, match="dtype 'float32' does not match"):
        KvLayer.alloc_paged(2, 4, 1, 2, pool=pool, allocator=alloc, dtype="float32")
    with pytest.raises(ValueError, match="max_blocks_per_seq must be a positive int"):
        KvLayer.alloc_paged(0, 4, 1, 2)


# --- KvCacheManager ----------------------------------------------------------------------------

LAYERS, HEADS, DIM, BLOCK = 2, 2, 4, 4


def scenario(backend_name):
    """Prefill, fork + copy-on-write, a prefix hit, release: everything read back as NumPy.

    Hand-worked block ids (fresh pool of 8, FIFO free list):
      a: prompt of 6 tokens          -> blocks [0, 1]      (block 0 full: registered)
      b = fork(a); b decodes 1 token -> b copies block 1 to 2: b [0, 2]; a keeps [0, 1]
      a decodes 1 token              -> a is block 1's only owner now: writes in place
      c: prompt = a's first 4 tokens + 3 more -> hit on block 0; c [0, 3]
      release(a)                     -> block 1 free; block 0 still used by b, c
    """
    be = get_backend(backend_name)
    pool = KvPool(LAYERS, num_blocks=8, block_size=BLOCK, num_kv_heads=HEADS, head_dim=DIM,
                  backend=be)
    mgr = KvCacheManager(pool, max_blocks_per_seq=3)
    rng = np.random.default_rng(7)

    def append(seq, tokens):
        shape = (len(tokens), HEADS, DIM)
        ks = [be.asarray(rng.standard_normal(shape).astype(np.float16)) for _ in range(LAYERS)]
        vs = [be.asarray(rng.standard_normal(shape).astype(np.float16)) for _ in range(LAYERS)]
        mgr.append(seq, ks, vs, tokens)

    prompt = [11, 12, 13, 14, 15, 16]
    assert mgr.add_sequence("a", prompt) == 0
    append("a", prompt)
    mgr.fork("a", "b")
    append("b", [21])
    append("a", [31])
    assert mgr.add_sequence("c", prompt[:4] + [41, 42, 43]) == 4
    append("c", [41, 42, 43])
    tables = {s: mgr.block_table(s).tolist() for s in ("a", "b", "c")}
    gathered = {(s, layer): tuple(be.to_numpy(x) for x in mgr.gather(s, layer))
                for s in ("a", "b", "c") for layer in range(LAYERS)}
    mgr.release("a")
    mgr.check_invariants()
    return dict(
        tables=tables,
        batched=mgr.block_tables(["c", "b"]).tolist(),
        lens=mgr.context_lens(["c", "b"]).tolist(),
        refs=[mgr.allocator.ref_count(b) for b in range(8)],
        gathered=gathered,
        pools=[be.to_numpy(p) for p in pool.k_pools + pool.v_pools],
    )


def test_manager_scenario_by_hand():
    got = scenario("numpy")
    assert got["tables"] == {"a": [0, 1, -1], "b": [0, 2, -1], "c": [0, 3, -1]}
    assert got["batched"] == [[0, 3, -1], [0, 2, -1]] and got["lens"] == [7, 7]
    assert got["refs"] == [2, 0, 1, 1, 0, 0, 0, 0]
    k_a, _ = got["gathered"][("a", 0)]
    k_b, _ = got["gathered"][("b", 0)]
    k_c, _ = got["gathered"][("c", 0)]
    np.testing.assert_array_equal(k_b[:6], k_a[:6])  # b's copy of block 1 holds a's tokens 4, 5
    assert not np.array_equal(k_b[6], k_a[6])  # ... and their 7th tokens differ
    np.testing.assert_array_equal(k_c[:4], k_a[:4])  # the prefix hit: a's block 0


@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b != "numpy"])
def test_manager_scenario_is_the_same_on_every_backend(backend_name):
    want, got = scenario("numpy"), scenario(backend_name)
    for name in ("tables", "batched", "lens", "refs"):
        assert got[name] == want[name], name
    for key in want["gathered"]:
        for x, y in zip(got["gathered"][key], want["gathered"][key]):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(got["pools"], want["pools"]):
        np.testing.assert_array_equal(x, y)


def test_manager_without_prefix_caching():
    pool = KvPool(1, 4, 2, 1, 2)
    mgr = KvCacheManager(pool, 2, enable_prefix_caching=False)
    k = np.zeros((3, 1, 2), np.float16)
    mgr.add_sequence("a", [1, 2, 3])
    mgr.append("a", [k], [k], [1, 2, 3])
    assert mgr.add_sequence("b", [1, 2, 3]) == 0 and mgr.allocator.num_registered == 0
    mgr.release("a")
    assert mgr.allocator.num_free == 4  # nothing kept cached
    mgr.check_invariants()


def test_manager_argument_errors():
    pool = KvPool(1, 4, 2, 1, 2)
    mgr = KvCacheManager(pool, 2)
    mgr.add_sequence("a", [1])
    with pytest.raises(ValueError, match="sequence 'a' already exists"):
        mgr.add_sequence("a", [1])
    with pytest.raises(ValueError, match="5 tokens exceeds the per-sequence capacity 4"):
        mgr.add_sequence("b", [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="sequence 'a' already exists"):
        mgr.fork("a", "a")
    with pytest.raises(KeyError, match="no sequence 'x'"):
        mgr.fork("x", "y")
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\)"):
        mgr.gather("a", 1)
    with pytest.raises(ValueError, match="the allocator manages 3 blocks"):
        KvCacheManager(pool, 2, allocator=BlockAllocator(3, 2))
    with pytest.raises(TypeError, match="token ids must be ints"):
        mgr.add_sequence("c", [1.0])
    assert mgr.seq_ids == ["a"] and "a" in mgr and len(mgr) == 1


def test_manager_gather_takes_any_integer_layer_but_not_a_bool():
    pool = KvPool(2, 4, 2, 1, 2)
    mgr = KvCacheManager(pool, 2)
    mgr.add_sequence("a", [1, 2, 3])
    k, v = tokens_kv(3, 1, 2)
    mgr.append("a", [k, 2 * k], [v, 2 * v], [1, 2, 3])
    for layer in (np.int64(1), np.int32(1)):
        np.testing.assert_array_equal(mgr.gather("a", layer)[0], 2 * k)
    with pytest.raises(TypeError, match="layer must be an int, got bool"):
        mgr.gather("a", True)  # True == 1: it used to return layer 1
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
        mgr.gather("a", np.int64(2))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_failed_quantized_append_writes_no_layer(backend_name, kv_dtype):
    """A value the dtype cannot store in the *last* layer is found before the first layer's
    codes and scales are written (each backend's write_kv_quant only checks its own layer)."""
    be = get_backend(backend_name)
    pool = KvPool(2, 4, 2, 1, 8, dtype=kv_dtype, backend=be)
    mgr = KvCacheManager(pool, 2)
    mgr.add_sequence("a", [1, 2, 3])
    k, v = tokens_kv(3, 1, 8, dtype=np.float32)
    bad_k = k.copy()
    bad_k[2, 0, 5] = np.nan
    before = mgr.snapshot()
    stored = [be.to_numpy(a).copy() for a in (*pool.k_pools, *pool.v_pools, *pool.k_scales,
                                               *pool.v_scales)]
    with pytest.raises(ValueError, match=r"k_per_layer\[1\] holds 1 value.* \[2, 0, 5\]: nan"):
        mgr.append("a", [be.asarray(k), be.asarray(bad_k)], [be.asarray(v), be.asarray(v)],
                   [1, 2, 3])
    assert mgr.snapshot() == before
    after = [be.to_numpy(a) for a in (*pool.k_pools, *pool.v_pools, *pool.k_scales,
                                      *pool.v_scales)]
    for was, now in zip(stored, after):
        np.testing.assert_array_equal(now, was)
