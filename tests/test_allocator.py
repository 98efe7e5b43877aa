"""kvlab.paging.BlockAllocator and the bookkeeping of kvlab.cache.KvCacheManager.

Three parts:
1. hand-worked unit tests of the allocator (free list, refs, copy-on-write, prefix cache);
2. regression tests for failure cases other engines have shipped (block boundaries, stale hashes,
   fully cached prompts, duplicate prompts in one step, hash collisions);
3. hypothesis state machines over the allocator and the manager, checking after every step that
   ref counts equal owners, free + cached + used = total, failed calls change nothing, every
   sequence reads back exactly the K/V of its tokens, and nothing leaks at the end.

K/V in the manager tests are a function of the token prefix (see ``kv_for``), so a prefix-cache hit
that returned the wrong block would show up as wrong bytes in ``gather``.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule)

from kvlab.cache import KvCacheManager, KvPool
from kvlab.paging import BlockAllocator, BlockKey, OutOfBlocksError, blocks_needed

# Deterministic and database-less, so CI runs the same examples every time.
STATEFUL = settings(max_examples=60, stateful_step_count=30, derandomize=True, database=None,
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers -------------------------------------------------------------------------------------

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 1, 2


def kv_for(tokens, start, stop, num_layers=NUM_LAYERS):
    """K and V per layer for positions ``start .. stop-1`` of ``tokens``: ``[T, heads, dim]`` fp16.

    Position p's values depend on ``tokens[:p+1]`` (as a real model's do) and on the layer, and are
    exact in fp16 (multiples of 1/8 below 256).
    """
    rows = [_kv_row(tuple(tokens[:p + 1])) for p in range(start, stop)]
    ks = [np.array([r[layer] for r in rows], dtype=np.float16).reshape(-1, NUM_KV_HEADS, HEAD_DIM)
          for layer in range(num_layers)]
    return ks, [-k for k in ks]


@functools.lru_cache(maxsize=None)
def _kv_row(prefix):
    """One position's K, per layer: ``[num_layers, heads * dim]`` floats, from its prefix."""
    base = hash(prefix) % 200
    return [[base + 0.5 * layer + 0.125 * i for i in range(NUM_KV_HEADS * HEAD_DIM)]
            for layer in range(NUM_LAYERS)]


def expected_kv(tokens, layer):
    """What ``gather(seq, layer)`` must return for a sequence holding ``tokens``."""
    return _expected_kv(tuple(tokens), layer)


@functools.lru_cache(maxsize=None)
def _expected_kv(tokens, layer):
    ks, vs = kv_for(tokens, 0, len(tokens))
    return ks[layer], vs[layer]


def make_manager(num_blocks=8, block_size=4, max_blocks_per_seq=4, hash_fn=None, **kw):
    pool = KvPool(NUM_LAYERS, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    allocator = BlockAllocator(num_blocks, block_size, hash_fn=hash_fn)
    return KvCacheManager(pool, max_blocks_per_seq, allocator=allocator, **kw)


def prefill(mgr, seq_id, prompt):
    """add_sequence + append the uncached rest of the prompt; returns the tokens reused."""
    cached = mgr.add_sequence(seq_id, prompt)
    ks, vs = kv_for(prompt, cached, len(prompt))
    mgr.append(seq_id, ks, vs, prompt[cached:])
    return cached


def decode(mgr, seq_id, token):
    tokens = mgr.token_ids(seq_id) + [token]
    ks, vs = kv_for(tokens, len(tokens) - 1, len(tokens))
    mgr.append(seq_id, ks, vs, [token])


def assert_reads_back(mgr, seq_id):
    tokens = mgr.token_ids(seq_id)
    for layer in range(NUM_LAYERS):
        k, v = mgr.gather(seq_id, layer)
        want_k, want_v = expected_kv(tokens, layer)
        np.testing.assert_array_equal(k, want_k)
        np.testing.assert_array_equal(v, want_v)


# --- 1. the allocator by hand ------------------------------------------------------------------

def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_allocate_free_and_counts():
    alloc = BlockAllocator(4, block_size=2)
    assert (alloc.num_free, alloc.num_used, alloc.num_cached) == (4, 0, 0)
    assert alloc.allocate(3) == [0, 1, 2]  # a fresh pool hands out ids in order
    assert (alloc.num_free, alloc.num_used) == (1, 3)
    assert [alloc.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    alloc.free([1])
    assert alloc.is_free(1) and alloc.num_used == 2
    assert alloc.allocate(2) == [3, 1]  # FIFO: the block freed last is handed out last
    alloc.check_invariants()
    assert alloc.allocate(0) == []


def test_double_free_is_refused_and_changes_nothing():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.free(blocks[:1])
    before = alloc.snapshot()
    with pytest.raises(ValueError, match=r"cannot free block 0 1 time\(s\): its ref count is 0"):
        alloc.free([blocks[0]])
    with pytest.raises(ValueError, match="cannot free block 1 2 time"):
        alloc.free([blocks[1], blocks[1]])  # checked as a whole: the first drop must not happen
    with pytest.raises(ValueError, match="cannot free block 3"):
        alloc.free([1, 3])  # 3 was never allocated; 1 must not be freed either
    assert alloc.snapshot() == before


def test_out_of_blocks_is_a_runtime_error_that_changes_nothing():
    alloc = BlockAllocator(4)
    alloc.allocate(3)
    before = alloc.snapshot()
    with pytest.raises(OutOfBlocksError, match=r"needs 2 block\(s\) but only 1 are free") as err:
        alloc.allocate(2)
    assert isinstance(err.value, RuntimeError) and not isinstance(err.value, ValueError)
    assert (err.value.needed, err.value.available) == (2, 1)
    assert alloc.snapshot() == before


def test_bad_arguments():
    alloc = BlockAllocator(4, block_size=2)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        BlockAllocator(0)
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        alloc.allocate(-1)
    with pytest.raises(ValueError, match=r"block id 4 is out of range \[0, 4\)"):
        alloc.ref_count(4)
    with pytest.raises(TypeError, match="a block id must be an int"):
        alloc.free([1.0])
    with pytest.raises(ValueError, match="cannot fork block 0: it is not allocated"):
        alloc.fork([0])
    with pytest.raises(ValueError, match="cannot write block 0: it is not allocated"):
        alloc.ensure_writable(0)
    (b,) = alloc.allocate(1)
    with pytest.raises(ValueError, match="a full block holds block_size=2 token ids, got 3"):
        alloc.register_full_block(b, [1, 2, 3])
    with pytest.raises(ValueError, match="cannot register block 1: it is not allocated"):
        alloc.register_full_block(1, [1, 2])
    with pytest.raises(TypeError, match="token ids must be ints"):
        alloc.register_full_block(b, [1.5, 2])
    alloc.register_full_block(b, [1, 2])
    with pytest.raises(ValueError, match="already registered"):
        alloc.register_full_block(b, [1, 2])


def test_fork_shares_and_copy_on_write_separates():
    alloc = BlockAllocator(4)
    parent = alloc.allocate(2)
    child = alloc.fork(parent)
    assert child == parent and [alloc.ref_count(b) for b in parent] == [2, 2]
    # The child writes into the shared last block: it gets a private copy of block 1.
    block, copy_from = alloc.ensure_writable(child[1])
    assert (block, copy_from) == (2, 1)
    assert [alloc.ref_count(b) for b in (0, 1, 2)] == [2, 1, 1]
    # The parent is now block 1's only owner: it writes in place.
    assert alloc.ensure_writable(parent[1]) == (1, None)
    alloc.check_invariants()


def test_copy_on_write_out_of_blocks_changes_nothing():
    alloc = BlockAllocator(2)
    shared = alloc.allocate(2)
    alloc.fork(shared)
    before = alloc.snapshot()
    with pytest.raises(OutOfBlocksError):
        alloc.ensure_writable(shared[0])
    assert alloc.snapshot() == before


def test_grow_by_hand():
    alloc = BlockAllocator(8, block_size=4)
    blocks = alloc.allocate(1)  # holds 3 tokens: positions 0..2 in block 0
    alloc.fork(blocks)  # ... shared with a forked sibling
    growth = alloc.grow(blocks, num_tokens=3, num_new_tokens=6)  # positions 3..8
    # Position 3 lands in the shared block 0: copy it to a private block 1. Positions 4..7 and 8
    # need two fresh blocks.
    assert growth.copies == [(0, 1)]
    assert growth.new_blocks == [2, 3] and growth.blocks == [1, 2, 3]
    assert alloc.ref_count(0) == 1  # the sibling's only
    # Growing from a block boundary writes no existing block: nothing to copy.
    g2 = alloc.grow(growth.blocks, num_tokens=12, num_new_tokens=1)
    assert g2.copies == [] and g2.blocks == [1, 2, 3, 4]
    alloc.undo_grow(g2)
    alloc.undo_grow(growth)
    assert [alloc.ref_count(b) for b in range(5)] == [2, 0, 0, 0, 0]
    alloc.check_invariants()


def test_grow_out_of_blocks_changes_nothing():
    alloc = BlockAllocator(3, block_size=4)
    blocks = alloc.allocate(1)
    alloc.fork(blocks)
    before = alloc.snapshot()
    with pytest.raises(OutOfBlocksError, match=r"appending 9 token\(s\) needs 3 block"):
        alloc.grow(blocks, 3, 9)  # 1 copy + 2 fresh, but 2 free
    assert alloc.snapshot() == before


@pytest.mark.parametrize("blocks, match", [
    ([0, 3], r"blocks \[3\] are not allocated"),  # 3 is free: growing into it would steal it
    ([0, 1], r"blocks \[1\] are not allocated"),  # 1 is free too (and CoW would hand it out)
    ([0, 0], "more than once"),
])
def test_grow_refuses_blocks_it_does_not_own_before_changing_anything(blocks, match):
    alloc = BlockAllocator(4, block_size=4)
    alloc.fork(alloc.allocate(1))  # block 0, ref 2: growing will copy-on-write it first
    before = alloc.snapshot()
    with pytest.raises(ValueError, match=match):
        alloc.grow(blocks, 0, 8)
    assert alloc.snapshot() == before
    alloc.check_invariants()


def test_prefix_cache_register_lookup_and_lru_eviction():
    alloc = BlockAllocator(4, block_size=2)
    a, b = alloc.allocate(2)
    key_a = alloc.register_full_block(a, [7, 8])
    key_b = alloc.register_full_block(b, [9, 9], parent=key_a)
    assert key_b.parent is key_a and alloc.num_registered == 2
    # Only whole blocks are looked up; each hit takes a reference.
    assert alloc.lookup_prefix([7, 8, 9]) == [a]
    assert alloc.lookup_prefix([7, 8, 9, 9, 1, 1]) == [a, b]
    assert alloc.lookup_prefix([9, 9]) == []  # (9, 9) is only cached *after* (7, 8)
    assert (alloc.ref_count(a), alloc.ref_count(b)) == (3, 2)
    alloc.free([b, a, b, a, a])  # tail first
    assert (alloc.num_cached, alloc.num_free) == (2, 2)  # kept for hits, not empty
    # A hit revives a cached block.
    assert alloc.lookup_prefix([7, 8]) == [a] and alloc.num_cached == 1
    alloc.free([a])  # a is now the most recently released
    # Allocation uses free blocks first, then evicts least recently released: b, then a.
    assert alloc.allocate(2) == [2, 3] and alloc.num_cached == 2
    assert alloc.allocate(1) == [b]
    assert alloc.key_of(b) is None and alloc.num_registered == 1
    assert alloc.lookup_prefix([7, 8, 9, 9]) == [a]  # b's entry is gone with it
    alloc.check_invariants()


def test_register_the_same_prefix_twice_keeps_one_entry():
    alloc = BlockAllocator(4, block_size=2)
    first, second = alloc.allocate(2)
    key = alloc.register_full_block(first, [1, 2])
    assert alloc.register_full_block(second, [1, 2]) is key  # the existing key, for chaining
    assert alloc.key_of(second) is None and alloc.num_registered == 1
    alloc.check_invariants()


def test_ensure_writable_drops_a_private_blocks_cache_entry():
    alloc = BlockAllocator(2, block_size=2)
    (block,) = alloc.allocate(1)
    alloc.register_full_block(block, [1, 2])
    assert alloc.ensure_writable(block) == (block, None)
    assert alloc.key_of(block) is None  # its bytes are about to change


def test_check_invariants_catches_corruption():
    alloc = BlockAllocator(3)
    alloc.allocate(1)
    alloc._refs[0] = 0  # a used block that is on no list
    with pytest.raises(AssertionError, match="free 2 \\+ cached 0 \\+ used 0 != 3"):
        alloc.check_invariants()


def test_block_key_same_prefix():
    root = BlockKey(1, (1, 2), None)
    twin = BlockKey(1, (1, 2), None)
    other = BlockKey(1, (3, 4), None)  # same hash, other tokens: a collision
    assert BlockKey(5, (0, 0), root).same_prefix(BlockKey(5, (0, 0), twin))
    assert not BlockKey(5, (0, 0), root).same_prefix(BlockKey(5, (0, 0), other))
    assert not root.same_prefix(None)


# --- 2. regressions: failure cases from other engines -----------------------------------------

def test_exact_block_boundary_then_one_more_token():
    """Off-by-one at a block boundary: block_size tokens fill one block exactly; the next token
    must open a second block (not overwrite slot 0, not allocate a block early)."""
    mgr = make_manager(block_size=4)
    prefill(mgr, "s", [1, 2, 3, 4])
    assert mgr.context_len("s") == 4
    assert mgr.block_table("s").tolist() == [0, -1, -1, -1]
    assert mgr.allocator.num_used == 1 and mgr.allocator.num_registered == 1  # full: registered
    decode(mgr, "s", 5)
    assert mgr.block_table("s").tolist() == [0, 1, -1, -1]
    assert mgr.context_len("s") == 5 and mgr.allocator.num_registered == 1
    assert_reads_back(mgr, "s")
    mgr.check_invariants()


def test_a_reused_block_is_never_reached_through_a_stale_hash():
    """vLLM/SGLang-style bug: a cached block is evicted and reused for other tokens, but its old
    hash entry survives, so the old prompt 'hits' the new contents."""
    mgr = make_manager(num_blocks=4, block_size=2, max_blocks_per_seq=4)
    prompt_a = [1, 1, 2, 2, 3]
    prefill(mgr, "a", prompt_a)
    mgr.release("a")  # blocks of (1,1) and (2,2) stay cached
    assert mgr.allocator.num_cached == 2
    prefill(mgr, "b", [7, 7, 8, 8, 9, 9, 6])  # needs all 4 blocks: evicts both cached ones
    assert mgr.allocator.num_cached == 0
    mgr.release("b")
    assert mgr.add_sequence("a2", prompt_a) == 0  # no hit: the entries left with the blocks
    ks, vs = kv_for(prompt_a, 0, 5)
    mgr.append("a2", ks, vs, prompt_a)
    assert_reads_back(mgr, "a2")
    mgr.check_invariants()


@pytest.mark.parametrize("prompt_len, reused", [(1, 0), (4, 0), (7, 4), (8, 4), (9, 8)])
def test_a_fully_cached_prompt_still_leaves_its_last_token_to_compute(prompt_len, reused):
    """kvlab looks up prompt[:-1]: the block holding the final prompt token is never a hit, so the
    engine always runs at least one token (it needs that token's logits)."""
    mgr = make_manager(num_blocks=8, block_size=4)
    prompt = list(range(10, 10 + prompt_len))
    prefill(mgr, "first", prompt)
    decode(mgr, "first", 99)  # the whole prompt is now cached, in full blocks where it fills them
    assert mgr.add_sequence("again", prompt) == reused
    assert mgr.context_len("again") == reused < prompt_len
    ks, vs = kv_for(prompt, reused, prompt_len)
    mgr.append("again", ks, vs, prompt[reused:])
    assert_reads_back(mgr, "again")
    mgr.check_invariants()


def test_identical_prompts_added_in_one_step_are_registered_once():
    """Two requests with one prompt arrive together: neither hits (nothing is written yet), both
    compute their blocks, and only the first to finish registers them; the second keeps private
    copies, unregistered, and a third request hits the first's blocks."""
    mgr = make_manager(num_blocks=12, block_size=4)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert mgr.add_sequence("a", prompt) == 0
    assert mgr.add_sequence("b", prompt) == 0  # same step: a has not registered anything
    for seq in ("a", "b"):
        ks, vs = kv_for(prompt, 0, len(prompt))
        mgr.append(seq, ks, vs, prompt)
    a_blocks = mgr.block_table("a")[:2].tolist()
    b_blocks = mgr.block_table("b")[:2].tolist()
    assert mgr.allocator.num_registered == 2  # a's two full blocks, not b's as well
    assert [mgr.allocator.key_of(b) for b in b_blocks] == [None, None]
    mgr.check_invariants()
    # b's next full block still chains onto the shared prefix.
    for token in (14, 15, 16):
        decode(mgr, "b", token)
    assert mgr.allocator.num_registered == 3
    assert mgr.add_sequence("c", prompt + [14, 15, 16, 0]) == 12
    assert mgr.block_table("c")[:3].tolist() == a_blocks + [mgr.block_table("b")[2]]
    assert_reads_back(mgr, "c")
    # Added after the first finished: a hit.
    assert mgr.add_sequence("d", prompt) == 8 and mgr.block_table("d")[:2].tolist() == a_blocks
    mgr.check_invariants()


def test_a_hash_collision_never_returns_the_wrong_blocks():
    """Every block hashes alike: each lookup must check the stored tokens (and the whole prefix)."""
    alloc = BlockAllocator(8, block_size=2, hash_fn=lambda parent, tokens: 42)
    (a,) = alloc.allocate(1)
    alloc.register_full_block(a, [1, 2])
    assert alloc.lookup_prefix([3, 4]) == []  # same hash, other tokens
    assert alloc.lookup_prefix([1, 2]) == [a]
    (b,) = alloc.allocate(1)
    key_b = alloc.register_full_block(b, [3, 4])  # the hash is taken: b stays unregistered
    assert alloc.key_of(b) is None and key_b.token_ids == (3, 4)
    alloc.check_invariants()


def test_a_collision_in_the_parent_chain_is_a_miss():
    """A hash that ignores the parent: (5, 5) after (1, 1) and (5, 5) after (2, 2) hash alike.
    Checking only this block's tokens would hand (2, 2)'s sequence K/V computed after (1, 1)."""
    alloc = BlockAllocator(8, block_size=2, hash_fn=lambda parent, tokens: tokens)
    p, c, q = alloc.allocate(3)
    key_p = alloc.register_full_block(p, [1, 1])
    alloc.register_full_block(c, [5, 5], parent=key_p)
    alloc.register_full_block(q, [2, 2])
    assert alloc.lookup_prefix([2, 2, 5, 5]) == [q]  # not [q, c]
    assert alloc.lookup_prefix([1, 1, 5, 5]) == [p, c]
    alloc.check_invariants()


def test_a_parent_registered_again_elsewhere_still_leads_to_its_children():
    """Hits compare prefixes by content, not by block id: when (1, 1)'s block is evicted and the
    same tokens are registered in another block, (5, 5) after (1, 1) is a valid hit again."""
    alloc = BlockAllocator(3, block_size=2)
    p, c = alloc.allocate(2)
    key_p = alloc.register_full_block(p, [1, 1])
    alloc.register_full_block(c, [5, 5], parent=key_p)
    alloc.free([p])  # c is still held (unusual, but the allocator allows it)
    alloc.allocate(1)
    assert alloc.allocate(1) == [p] and alloc.key_of(p) is None  # evicted
    assert alloc.lookup_prefix([1, 1, 5, 5]) == []  # the chain starts with a miss
    alloc.free([p])
    (p2,) = alloc.allocate(1)
    alloc.register_full_block(p2, [1, 1])  # a new key, for the same content
    assert alloc.lookup_prefix([1, 1, 5, 5]) == [p2, c]
    alloc.check_invariants()


def test_collisions_through_the_manager_keep_every_sequence_correct():
    """A parent-blind hash on two values: b's blocks each collide with one of a's."""
    mgr = make_manager(num_blocks=12, block_size=2, hash_fn=lambda parent, tokens: tokens[0] % 2)
    prefill(mgr, "a", [1, 1, 2, 2, 3])
    prefill(mgr, "b", [3, 0, 4, 0, 3])
    assert mgr.allocator.num_registered == 2  # a's blocks; b's found their hashes taken
    assert mgr.add_sequence("c", [3, 0, 4, 0, 3]) == 0
    assert mgr.add_sequence("d", [1, 1, 2, 2, 3]) == 4
    for seq, prompt in (("c", [3, 0, 4, 0, 3]), ("d", [1, 1, 2, 2, 3])):
        cached = mgr.context_len(seq)
        ks, vs = kv_for(prompt, cached, len(prompt))
        mgr.append(seq, ks, vs, prompt[cached:])
    for seq in "abcd":
        assert_reads_back(mgr, seq)
    mgr.check_invariants()


def test_manager_append_is_all_or_nothing():
    mgr = make_manager(num_blocks=3, block_size=2, max_blocks_per_seq=3)
    prefill(mgr, "a", [1, 2, 3])
    mgr.fork("a", "b")
    before = mgr.snapshot()
    pool_before = [k.copy() for k in mgr.pool.k_pools]
    ks, vs = kv_for([1, 2, 3, 4, 5, 6], 3, 6)
    with pytest.raises(OutOfBlocksError):  # a copy of the shared block + 1 fresh; 1 free
        mgr.append("b", ks, vs, [4, 5, 6])
    with pytest.raises(ValueError, match="cannot hold 7 tokens: capacity is 6"):
        mgr.append("a", *kv_for([1, 2, 3, 4, 5, 6, 7], 3, 7), [4, 5, 6, 7])
    with pytest.raises(ValueError, match="k_per_layer\\[0\\] has 3 tokens but token_ids has 2"):
        mgr.append("a", ks, vs, [4, 5])
    with pytest.raises(TypeError, match="k\\[1\\] must have dtype float16"):
        mgr.append("a", [ks[0], ks[1].astype(np.float32)], vs, [4, 5, 6])
    with pytest.raises(ValueError, match="one array per layer"):
        mgr.append("a", ks[:1], vs[:1], [4, 5, 6])
    with pytest.raises(KeyError, match="no sequence 'zz'"):
        mgr.append("zz", ks, vs, [4, 5, 6])
    assert mgr.snapshot() == before
    for k, k0 in zip(mgr.pool.k_pools, pool_before):
        np.testing.assert_array_equal(k, k0)
    mgr.check_invariants()


def test_release_everything_leaks_nothing():
    mgr = make_manager(num_blocks=8, block_size=2)
    prefill(mgr, "a", [1, 2, 3, 4, 5])
    mgr.fork("a", "b")
    decode(mgr, "b", 6)
    prefill(mgr, "c", [1, 2, 3, 4, 9])
    for seq in ("a", "b", "c"):
        mgr.release(seq)
    alloc = mgr.allocator
    assert alloc.num_used == 0 and alloc.num_free + alloc.num_cached == alloc.num_blocks
    assert all(alloc.ref_count(b) == 0 for b in range(alloc.num_blocks))
    alloc.check_invariants()


# --- 3. state machines -------------------------------------------------------------------------

def _same(a, b):
    """Two parent keys (or None) stand for the same prefix."""
    return b is None if a is None else a.same_prefix(b)


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / fork / free / copy-on-write / register / lookup on a small allocator.

    The model: ``owners``, a list of block lists (think: block tables). A block's ref count must
    equal the number of times it appears across them.
    """

    NUM_BLOCKS, BLOCK_SIZE = 6, 2

    def __init__(self):
        super().__init__()
        colliding = lambda parent, tokens: (sum(tokens) + (parent or 0)) % 5  # noqa: E731
        self.alloc = BlockAllocator(self.NUM_BLOCKS, self.BLOCK_SIZE, hash_fn=colliding)
        self.owners: list[list[int]] = []
        self.dropped: list[list[int]] = []  # freed lists, kept to try freeing them again

    def _unchanged_after(self, call, error):
        before = self.alloc.snapshot()
        with pytest.raises(error):
            call()
        assert self.alloc.snapshot() == before

    @initialize(n=st.integers(1, 3))
    def first(self, n):  # start with an owner, so every rule is enabled from step one
        self.allocate(n)

    @rule(n=st.integers(0, 4))
    def allocate(self, n):
        if n > self.alloc.num_available:
            self._unchanged_after(lambda: self.alloc.allocate(n), OutOfBlocksError)
        else:
            blocks = self.alloc.allocate(n)
            assert len(set(blocks)) == n and all(self.alloc.ref_count(b) == 1 for b in blocks)
            self.owners.append(blocks)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def fork(self, data):
        blocks = data.draw(st.sampled_from(self.owners))
        self.owners.append(self.alloc.fork(blocks))

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data):
        i = data.draw(st.integers(0, len(self.owners) - 1))
        blocks = self.owners.pop(i)
        self.alloc.free(reversed(blocks))
        self.dropped.append(blocks)

    @precondition(lambda self: any(self.dropped))
    @rule(data=st.data())
    def free_again(self, data):
        blocks = data.draw(st.sampled_from([d for d in self.dropped if d]))
        if any(blocks.count(b) > self.alloc.ref_count(b) for b in blocks):
            self._unchanged_after(lambda: self.alloc.free(blocks), ValueError)
        # else: every block was handed out again since, and freeing would steal other owners' refs

    @precondition(lambda self: any(self.owners))
    @rule(data=st.data())
    def write(self, data):
        blocks = data.draw(st.sampled_from([o for o in self.owners if o]))
        i = data.draw(st.integers(0, len(blocks) - 1))
        old = blocks[i]
        shared = self.alloc.ref_count(old) > 1
        if shared and self.alloc.num_available == 0:
            self._unchanged_after(lambda: self.alloc.ensure_writable(old), OutOfBlocksError)
            return
        block, copy_from = self.alloc.ensure_writable(old)
        if shared:
            assert copy_from == old and block != old and self.alloc.ref_count(block) == 1
        else:
            assert (block, copy_from) == (old, None) and self.alloc.key_of(old) is None
        blocks[i] = block

    @precondition(lambda self: any(self.owners))
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 2), min_size=2, max_size=2))
    def register(self, data, tokens):
        blocks = data.draw(st.sampled_from([o for o in self.owners if o]))
        block = data.draw(st.sampled_from(blocks))
        # A first block, or one that follows a registered block (a chain, as a prompt makes).
        keys = [self.alloc.key_of(b) for o in self.owners for b in o]
        parent = data.draw(st.sampled_from([None] + [k for k in keys if k is not None]))
        if self.alloc.key_of(block) is not None:
            self._unchanged_after(lambda: self.alloc.register_full_block(block, tokens, parent),
                                  ValueError)
        else:
            key = self.alloc.register_full_block(block, tokens, parent)
            assert key.token_ids == tuple(tokens) and _same(key.parent, parent)
            event("register: new entry" if self.alloc.key_of(block) is key else
                  "register: duplicate" if key.parent is parent else "register: collision")

    @rule(data=st.data(), tail=st.lists(st.integers(0, 2), max_size=4))
    def lookup(self, data, tail):
        """Look up a registered block's whole prefix (or nothing) followed by random tokens."""
        keys = [self.alloc.key_of(b) for b in range(self.NUM_BLOCKS)]
        key = data.draw(st.sampled_from([None] + [k for k in keys if k is not None]))
        spelled = []
        while key is not None:
            spelled[:0] = key.token_ids
            key = key.parent
        tokens = spelled + tail
        hits = self.alloc.lookup_prefix(tokens)
        parent = None
        for i, block in enumerate(hits):  # each hit holds exactly the tokens asked for
            key = self.alloc.key_of(block)
            assert key.token_ids == tuple(tokens[2 * i:2 * i + 2])
            assert _same(key.parent, parent)
            parent = key
        event(f"lookup: {len(hits)} hit(s)")
        self.owners.append(hits)

    @invariant()
    def bookkeeping(self):
        self.alloc.check_invariants()
        alloc = self.alloc
        assert alloc.num_free + alloc.num_cached + alloc.num_used == alloc.num_blocks
        for block in range(alloc.num_blocks):
            assert alloc.ref_count(block) == sum(o.count(block) for o in self.owners)

    def teardown(self):
        for blocks in self.owners:
            self.alloc.free(blocks)
        assert self.alloc.num_used == 0
        self.alloc.check_invariants()


class ManagerMachine(RuleBasedStateMachine):
    """Random add / append / fork / release on a small KvCacheManager (numpy backend).

    A tiny vocabulary makes prefixes repeat (prefix hits, duplicate registrations); a small pool
    makes appends run out of blocks. After every step: invariants, ref counts from the tables,
    and every sequence's gathered K/V equal to what its tokens should have produced.
    """

    NUM_BLOCKS, BLOCK_SIZE, MAX_BLOCKS = 7, 2, 4
    HASH_FN = None

    def __init__(self):
        super().__init__()
        self.mgr = make_manager(self.NUM_BLOCKS, self.BLOCK_SIZE, self.MAX_BLOCKS,
                                hash_fn=self.HASH_FN)
        self.tokens: dict[int, list[int]] = {}  # the model: each live sequence's tokens
        self.pending: dict[int, list[int]] = {}  # prompt tokens not yet appended
        self.next_id = 0

    def _new_id(self):
        self.next_id += 1
        return self.next_id

    def _unchanged_after(self, call, error):
        before = self.mgr.snapshot()
        with pytest.raises(error):
            call()
        assert self.mgr.snapshot() == before

    @initialize(prompt=st.lists(st.integers(0, 1), max_size=8))
    def first(self, prompt):  # start with a sequence, so every rule is enabled from step one
        self.add(prompt)

    @rule(prompt=st.lists(st.integers(0, 1), max_size=10))
    def add(self, prompt):
        """add_sequence, then prefill the uncached rest of the prompt (if the pool allows)."""
        seq = self._new_id()
        if len(prompt) > self.mgr.capacity:
            self._unchanged_after(lambda: self.mgr.add_sequence(seq, prompt), ValueError)
            return
        cached = self.mgr.add_sequence(seq, prompt)
        assert cached % self.BLOCK_SIZE == 0 and cached <= max(0, len(prompt) - 1)
        assert self.mgr.token_ids(seq) == prompt[:cached]
        event("add: prefix hit" if cached else "add: no hit")
        self.tokens[seq], self.pending[seq] = prompt[:cached], prompt[cached:]
        if self.pending[seq]:
            self._append(seq, self.pending[seq])

    def _append(self, seq, new):
        """Append ``new`` tokens to ``seq``, predicting whether it must fail (and then checking
        that it changed nothing)."""
        tokens = self.tokens[seq] + new
        ks, vs = kv_for(tokens, len(self.tokens[seq]), len(tokens))
        blocks = self.mgr.block_table(seq)
        used = blocks[blocks >= 0].tolist()
        need = blocks_needed(len(tokens), self.BLOCK_SIZE) - len(used)
        copy = self.mgr.context_len(seq) % self.BLOCK_SIZE and (  # writes a partial last block
            self.mgr.allocator.ref_count(used[-1]) > 1)  # ... that is shared: copy it first
        need += bool(copy)
        if len(tokens) > self.mgr.capacity:
            event("append: past capacity")
            self._unchanged_after(lambda: self.mgr.append(seq, ks, vs, new), ValueError)
        elif need > self.mgr.allocator.num_available:
            event("append: out of blocks")
            self._unchanged_after(lambda: self.mgr.append(seq, ks, vs, new), OutOfBlocksError)
        else:
            event("append: copy-on-write" if copy else "append")
            if need > self.mgr.allocator.num_free:
                event("append: evicts cached blocks")
            self.mgr.append(seq, ks, vs, new)
            self.tokens[seq], self.pending[seq] = tokens, []

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(0, 1), min_size=1, max_size=2))
    def append(self, data, new):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        # The rest of the prompt first (if its prefill failed), then "generated" tokens.
        self._append(seq, self.pending[seq] or new)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), write_child=st.booleans())
    def fork(self, data, write_child):
        """Fork (parallel sampling); often the child then decodes a token at once, writing into
        the block it shares with its parent (copy-on-write when that block is partly filled)."""
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.mgr.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.pending[child] = list(self.pending[parent])
        if write_child:
            self._append(child, self.pending[child] or [data.draw(st.integers(0, 1))])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def release(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.mgr.release(seq)
        del self.tokens[seq], self.pending[seq]
        self._unchanged_after(lambda: self.mgr.release(seq), KeyError)

    @invariant()
    def bookkeeping(self):
        mgr, alloc = self.mgr, self.mgr.allocator
        mgr.check_invariants()
        assert alloc.num_free + alloc.num_cached + alloc.num_used == alloc.num_blocks
        seqs = sorted(self.tokens)
        tables = mgr.block_tables(seqs)
        owners = np.bincount(tables[tables >= 0], minlength=alloc.num_blocks)
        assert [alloc.ref_count(b) for b in range(alloc.num_blocks)] == owners.tolist()
        reached = list(alloc._block_of_hash.values())
        assert len(reached) == len(set(reached))  # no block reachable by two hashes
        assert mgr.context_lens(seqs).tolist() == [len(self.tokens[s]) for s in seqs]

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        """One batched gather per layer (2-D block tables) reads every sequence back at once."""
        seqs = sorted(self.tokens)
        if not seqs:
            return
        paging = self.mgr.pool.backend.paging
        for layer in range(NUM_LAYERS):
            k, v = paging.gather_kv(self.mgr.pool.k_pools[layer], self.mgr.pool.v_pools[layer],
                                    self.mgr.block_tables(seqs), self.mgr.context_lens(seqs))
            want = [expected_kv(self.tokens[s], layer) for s in seqs]
            np.testing.assert_array_equal(k, np.concatenate([w[0] for w in want]))
            np.testing.assert_array_equal(v, np.concatenate([w[1] for w in want]))

    def teardown(self):
        for seq in list(self.tokens):
            self.mgr.release(seq)
        alloc = self.mgr.allocator
        assert alloc.num_used == 0 and len(self.mgr) == 0
        assert alloc.num_free + alloc.num_cached == alloc.num_blocks
        alloc.check_invariants()


class CollidingManagerMachine(ManagerMachine):
    """The same, with a hash that collides all the time (3 values): hits must stay correct."""

    HASH_FN = staticmethod(lambda parent, tokens: (sum(tokens) + (parent or 0)) % 3)


TestAllocatorMachine = AllocatorMachine.TestCase
TestManagerMachine = ManagerMachine.TestCase
TestCollidingManagerMachine = CollidingManagerMachine.TestCase
TestAllocatorMachine.settings = TestManagerMachine.settings = STATEFUL
TestCollidingManagerMachine.settings = STATEFUL
