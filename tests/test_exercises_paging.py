"""Wrong answers the 01 (paging) checkers must reject (gathered by tests/test_exercises.py), and
checks that the cases of 01's exercises can tell the right ideas from the wrong ones."""
import numpy as np
from numba import cuda

from kvlab.exercises import EXERCISES
from kvlab.ref import paging as ref


# --- 01.slot_mapping -------------------------------------------------------------------------

def slot_is_position(block_table, positions, block_size):
    """Forgets the block table: right only for a table 0, 1, 2, …"""
    return positions.astype(np.int32)


def block_index_not_block(block_table, positions, block_size):
    """Uses the table's index instead of the block it holds."""
    return ((positions // block_size) * block_size + positions % block_size).astype(np.int32)


# --- 01.write_kv -----------------------------------------------------------------------------

def write_kv_writes_padding(k, v, k_pool, v_pool, slots):
    """Forgets padding: slot -1 wraps around to the pool's last slot (Python indexing)."""
    blocks, offsets = np.divmod(slots, k_pool.shape[1])
    k_pool[blocks, offsets] = k
    v_pool[blocks, offsets] = v


def write_kv_block_size_from_wrong_axis(k, v, k_pool, v_pool, slots):
    """Takes block_size from k_pool.shape[0], which is num_blocks."""
    real = slots >= 0
    blocks, offsets = np.divmod(slots[real], k_pool.shape[0])
    k_pool[blocks, offsets] = k[real]
    v_pool[blocks, offsets] = v[real]


def write_kv_k_into_both_pools(k, v, k_pool, v_pool, slots):
    """Copy-paste slip: writes K into the V pool too."""
    real = slots >= 0
    blocks, offsets = np.divmod(slots[real], k_pool.shape[1])
    k_pool[blocks, offsets] = k[real]
    v_pool[blocks, offsets] = k[real]


# --- 01.append_token -------------------------------------------------------------------------

def append_without_copy_on_write(allocator, blocks, num_tokens, k_pool, v_pool, k, v):
    """Writes into the last block even when a fork shares it: the parent's cache changes."""
    block_size = allocator.block_size
    if num_tokens // block_size == len(blocks):  # a new block only when the last one is full
        blocks = blocks + allocator.allocate(1)
    block = blocks[num_tokens // block_size]
    k_pool[block, num_tokens % block_size] = k
    v_pool[block, num_tokens % block_size] = v
    return blocks


def append_forgets_the_copy(allocator, blocks, num_tokens, k_pool, v_pool, k, v):
    """Takes the private block grow() hands out but never copies the shared one into it: the
    earlier tokens of that block are lost (the new block holds stale values)."""
    growth = allocator.grow(blocks, num_tokens=num_tokens, num_new_tokens=1)
    block = growth.blocks[num_tokens // allocator.block_size]
    k_pool[block, num_tokens % allocator.block_size] = k
    v_pool[block, num_tokens % allocator.block_size] = v
    return growth.blocks


def append_writes_before_copying(allocator, blocks, num_tokens, k_pool, v_pool, k, v):
    """Writes the token first, then runs the copy: the copy overwrites the new token."""
    growth = allocator.grow(blocks, num_tokens=num_tokens, num_new_tokens=1)
    block = growth.blocks[num_tokens // allocator.block_size]
    k_pool[block, num_tokens % allocator.block_size] = k
    v_pool[block, num_tokens % allocator.block_size] = v
    for src, dst in growth.copies:
        ref.copy_blocks(k_pool, v_pool, np.array([src], np.int32), np.array([dst], np.int32))
    return growth.blocks


# --- 01.write_kv_kernel ----------------------------------------------------------------------

@cuda.jit
def write_kv_ignores_padding(k, v, k_pool, v_pool, slots):
    """Writes a padded token (slot -1) into the pool's last slot: Python-style wrap-around."""
    token = cuda.blockIdx.x
    slot = slots[token]
    head_dim = k.shape[2]
    head, dim = cuda.threadIdx.x // head_dim, cuda.threadIdx.x % head_dim
    block, offset = slot // k_pool.shape[1], slot % k_pool.shape[1]
    k_pool[block, offset, head, dim] = k[token, head, dim]
    v_pool[block, offset, head, dim] = v[token, head, dim]


@cuda.jit
def write_kv_swaps_block_and_offset(k, v, k_pool, v_pool, slots):
    """Takes divmod's two halves the wrong way round: block = slot % block_size."""
    token = cuda.blockIdx.x
    slot = slots[token]
    if slot < 0:
        return
    head_dim = k.shape[2]
    head, dim = cuda.threadIdx.x // head_dim, cuda.threadIdx.x % head_dim
    block, offset = slot % k_pool.shape[1], slot // k_pool.shape[1]
    k_pool[block, offset, head, dim] = k[token, head, dim]
    v_pool[block, offset, head, dim] = v[token, head, dim]


WRONG_ANSWERS = {
    "01.slot_mapping": [slot_is_position, block_index_not_block],
    "01.write_kv": [write_kv_writes_padding, write_kv_block_size_from_wrong_axis,
                    write_kv_k_into_both_pools],
    "01.append_token": [append_without_copy_on_write, append_forgets_the_copy,
                        append_writes_before_copying],
    "01.write_kv_kernel": [write_kv_ignores_padding, write_kv_swaps_block_and_offset],
}


def test_01_has_four_exercises_in_notebook_order():
    names = [n for n, ex in EXERCISES.items() if ex.notebook == "01_paging"]
    assert names == ["01.slot_mapping", "01.write_kv", "01.append_token", "01.write_kv_kernel"]


def test_append_cases_need_a_copy_a_new_block_and_neither():
    """The hand-picked cases cover the three things an append can need, so each wrong idea about
    copy-on-write meets the case that exposes it."""
    exercise = EXERCISES["01.append_token"]
    copies, new_blocks = [], []
    for case in exercise.cases():
        if case.random:
            continue
        kw = case.kwargs
        growth = kw["allocator"].grow(list(kw["blocks"]), kw["num_tokens"], 1)
        copies.append(bool(growth.copies))
        new_blocks.append(bool(growth.new_blocks))
    assert copies == [False, False, True, False]
    assert new_blocks == [False, True, False, True]


def test_append_checker_leaves_the_case_unchanged(capsys):
    """Each run works on a deep copy: the case's allocator is the same before and after."""
    exercise = EXERCISES["01.append_token"]
    cases = exercise.cases()
    before = [c.kwargs["allocator"].snapshot() for c in cases]
    for case in cases:
        exercise.run(exercise.solution, case)
    assert [c.kwargs["allocator"].snapshot() for c in cases] == before


def test_write_kv_cases_include_padding_and_shuffled_slots():
    cases = EXERCISES["01.write_kv"].cases()
    assert any((c.kwargs["slots"] < 0).any() for c in cases)
    assert any(c.kwargs["k_pool"].dtype == np.float16 for c in cases)
    assert all(c.kwargs["k_pool"].shape[0] != c.kwargs["k_pool"].shape[1] for c in cases
               if not c.random)
