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


# --- 01.gather_kv_torch ------------------------------------------------------------------------

def _gather(k_pool, v_pool, block_tables, context_lens, restart=True, table_row=None,
            swap=False, v_from_k=False, block_axis=1):
    """A torch gather of a ragged batch, with one of the usual slips switched on."""
    import torch

    block_size, lens = k_pool.shape[block_axis], context_lens.long()
    seq = torch.repeat_interleave(torch.arange(len(lens)), lens)
    positions = torch.arange(len(seq))
    if restart:
        positions = positions - (torch.cumsum(lens, 0) - lens)[seq]
    rows = seq if table_row is None else torch.full_like(seq, table_row)
    column, offset = positions // block_size, positions % block_size
    if swap:
        column, offset = offset, column
    slots = block_tables[rows, column].long() * block_size + offset
    k_rows = k_pool.reshape(-1, *k_pool.shape[2:])
    v_rows = k_rows if v_from_k else v_pool.reshape(-1, *v_pool.shape[2:])
    return k_rows[slots], v_rows[slots]


def gather_positions_over_the_batch(k_pool, v_pool, block_tables, context_lens):
    """Numbers the rows 0 .. N-1 as positions: right for the first sequence only."""
    return _gather(k_pool, v_pool, block_tables, context_lens, restart=False)


def gather_through_the_first_table(k_pool, v_pool, block_tables, context_lens):
    """Reads every sequence through block_tables[0]."""
    return _gather(k_pool, v_pool, block_tables, context_lens, table_row=0)


def gather_block_and_offset_swapped(k_pool, v_pool, block_tables, context_lens):
    """Column p % block_size, offset p // block_size."""
    return _gather(k_pool, v_pool, block_tables, context_lens, swap=True)


def gather_v_from_k_pool(k_pool, v_pool, block_tables, context_lens):
    """Copy-paste slip: v read from k_pool."""
    return _gather(k_pool, v_pool, block_tables, context_lens, v_from_k=True)


def gather_block_size_from_the_heads_axis(k_pool, v_pool, block_tables, context_lens):
    """block_size = k_pool.shape[2], which is num_kv_heads."""
    return _gather(k_pool, v_pool, block_tables, context_lens, block_axis=2)


def gather_k_and_v_swapped(k_pool, v_pool, block_tables, context_lens):
    """Returns (v, k)."""
    k, v = _gather(k_pool, v_pool, block_tables, context_lens)
    return v, k


def gather_v_over_the_batch(k_pool, v_pool, block_tables, context_lens):
    """k right; v's positions counted over the whole batch (a slip in a copy-pasted line)."""
    return (_gather(k_pool, v_pool, block_tables, context_lens)[0],
            _gather(k_pool, v_pool, block_tables, context_lens, restart=False)[1])


def gather_clamps_the_table_in_place(k_pool, v_pool, block_tables, context_lens):
    """'Handles' the -1 entries by clamping the caller's table: right rows, a changed table."""
    block_tables.clamp_(min=0)
    return _gather(k_pool, v_pool, block_tables, context_lens)


def gather_a_view_for_one_block(k_pool, v_pool, block_tables, context_lens):
    """A shortcut for one sequence within one block: a slice of the pool, not a copy."""
    length = int(context_lens.sum())
    if len(context_lens) == 1 and 0 < length <= k_pool.shape[1]:
        block = int(block_tables[0, 0])
        return k_pool[block, :length], v_pool[block, :length]
    return _gather(k_pool, v_pool, block_tables, context_lens)


def gather_by_stacking_tokens(k_pool, v_pool, block_tables, context_lens):
    """gather_in_a_python_loop without its guard for an empty batch, where torch.stack of no
    tokens raises."""
    import torch

    if int(context_lens.sum()) == 0:
        torch.stack([])  # what the loop's stack meets when there is no token
    return gather_in_a_python_loop(k_pool, v_pool, block_tables, context_lens)


def gather_padded(k_pool, v_pool, block_tables, context_lens):
    """Returns [num_seqs, max_len, Hkv, D], each sequence padded with zeros."""
    import torch

    num_seqs, longest = len(context_lens), int(context_lens.max())
    k, v = (torch.zeros(num_seqs, longest, *pool.shape[2:], dtype=pool.dtype)
            for pool in (k_pool, v_pool))
    start = 0
    flat_k, flat_v = _gather(k_pool, v_pool, block_tables, context_lens)
    for seq, length in enumerate(context_lens.tolist()):
        k[seq, :length] = flat_k[start:start + length]
        v[seq, :length] = flat_v[start:start + length]
        start += length
    return k, v


def gather_in_float32(k_pool, v_pool, block_tables, context_lens):
    """Widens the pools first: the values are right, the dtype is not the pools'."""
    return _gather(k_pool.float(), v_pool.float(), block_tables, context_lens)


def gather_in_a_python_loop(k_pool, v_pool, block_tables, context_lens):
    """Right, one token at a time on the host: passes, with a note."""
    import torch

    block_size, k_rows, v_rows = k_pool.shape[1], [], []
    for seq, length in enumerate(context_lens.tolist()):
        for pos in range(length):
            block = block_tables[seq, pos // block_size].item()
            k_rows.append(k_pool[block, pos % block_size])
            v_rows.append(v_pool[block, pos % block_size])
    empty = k_pool.new_zeros(0, *k_pool.shape[2:])
    return (torch.stack(k_rows) if k_rows else empty), (torch.stack(v_rows) if v_rows else empty)


WRONG_ANSWERS = {
    "01.slot_mapping": [slot_is_position, block_index_not_block],
    "01.write_kv": [write_kv_writes_padding, write_kv_block_size_from_wrong_axis,
                    write_kv_k_into_both_pools],
    "01.append_token": [append_without_copy_on_write, append_forgets_the_copy,
                        append_writes_before_copying],
    "01.write_kv_kernel": [write_kv_ignores_padding, write_kv_swaps_block_and_offset],
    "01.gather_kv_torch": [gather_positions_over_the_batch, gather_through_the_first_table,
                           gather_block_and_offset_swapped, gather_v_from_k_pool, gather_padded,
                           gather_in_float32, gather_block_size_from_the_heads_axis,
                           gather_k_and_v_swapped, gather_v_over_the_batch,
                           gather_clamps_the_table_in_place, gather_a_view_for_one_block,
                           gather_by_stacking_tokens],
}


def test_01_has_five_exercises_in_notebook_order():
    names = [n for n, ex in EXERCISES.items() if ex.notebook == "01_paging"]
    assert names == ["01.slot_mapping", "01.write_kv", "01.append_token", "01.write_kv_kernel",
                     "01.gather_kv_torch"]


def test_the_gather_checker_names_the_slip(learner_view, capsys):
    """Each slip is found from the bytes of the learner's rows: the walk marks the rows read from
    the wrong slot, and the slip that reads exactly those slots is named."""
    exercise = EXERCISES["01.gather_kv_torch"]
    exercise.check(gather_positions_over_the_batch)
    out = capsys.readouterr().out
    assert "fails on case 'two sequences, 5 and 9 tokens" in out
    assert "    5: sequence 1, position 0 -> block_tables[1, 0] = 3, offset 0 -> slot 12   " \
        "<- yours: slot 25 (block 6, offset 1)" in out
    assert "    4: sequence 0, position 4 -> block_tables[0, 1] = 4, offset 0 -> slot 16\n" in out
    assert "Yours reads the slots of: positions counted over the whole batch" in out
    assert "a -1 entry of the table (past a sequence's blocks) wrapped round" in out
    exercise.check(gather_through_the_first_table)
    assert "Yours reads the slots of: every sequence read through block_tables[0]" in \
        capsys.readouterr().out
    exercise.check(gather_v_from_k_pool)
    assert "Your k is right; your v holds K: it came from k_pool." in capsys.readouterr().out
    exercise.check(gather_block_and_offset_swapped)
    assert "An index ran past a tensor. block_tables is [1, 3]: row s is sequence s, column " \
        "p // block_size holds the block of its position p" in capsys.readouterr().out
    exercise.check(gather_block_size_from_the_heads_axis)
    assert "block_size read from k_pool.shape[2] = 2: it is k_pool.shape[1] = 4" in \
        capsys.readouterr().out
    exercise.check(gather_k_and_v_swapped)
    assert "Your k holds V and your v holds K: return them as (k, v)." in capsys.readouterr().out
    exercise.check(gather_v_over_the_batch)
    out = capsys.readouterr().out
    assert "row by row (v):" in out and "Yours reads the slots of: positions counted over" in out
    exercise.check(gather_clamps_the_table_in_place)
    assert "your function changed block_tables: a gather only reads its inputs" in \
        capsys.readouterr().out
    exercise.check(gather_a_view_for_one_block)
    assert "k is a view of k_pool (it shares the pool's memory): return a copy" in \
        capsys.readouterr().out
    exercise.check(gather_by_stacking_tokens)
    out = capsys.readouterr().out
    assert "fails on case 'nothing to gather: every sequence empty'" in out
    assert "your function raised RuntimeError: stack expects a non-empty TensorList" in out
    exercise.check(gather_padded)
    assert "not [num_seqs, max_len, Hkv, D]" in capsys.readouterr().out
    exercise.check(gather_in_float32)
    assert "  k should be float16, got torch.float32" in capsys.readouterr().out
    exercise.check(lambda k_pool, v_pool, block_tables, context_lens: k_pool)
    assert "the result should be a pair (k, v) of torch tensors" in capsys.readouterr().out


def test_a_gather_that_leaves_the_device_passes_with_a_note(learner_view, capsys):
    exercise = EXERCISES["01.gather_kv_torch"]
    assert exercise.check(gather_in_a_python_loop) is True
    out = capsys.readouterr().out
    assert out.startswith("✓ 01.gather_kv_torch")
    assert "it uses .item(), .tolist() and a Python loop" in out
    assert exercise.check(lambda k_pool, v_pool, block_tables, context_lens: _gather(
        k_pool, v_pool, block_tables, context_lens)) is True
    assert "It works; note" not in capsys.readouterr().out
    assert exercise.check(gather_over_literal_pools) is True
    assert "It works; note" not in capsys.readouterr().out
    assert exercise.check(gather_in_a_while_loop) is True
    assert "it uses a Python loop and int() of an element" in capsys.readouterr().out


def gather_over_literal_pools(k_pool, v_pool, block_tables, context_lens):
    """Whole-tensor ops; the loops run over a shape and over a name bound to a tuple of the two
    pools' rows, not over tokens."""
    import torch

    num_blocks, block_size, heads, dim = [int(n) for n in k_pool.shape]
    lens = context_lens.long()
    seq = torch.repeat_interleave(torch.arange(len(lens)), lens)
    positions = torch.arange(len(seq)) - (torch.cumsum(lens, 0) - lens)[seq]
    slots = block_tables[seq, positions // block_size].long() * block_size + positions % block_size
    rows = (k_pool.reshape(-1, heads, dim), v_pool.reshape(-1, heads, dim))
    return tuple(pool_rows[slots] for pool_rows in rows)


def gather_in_a_while_loop(k_pool, v_pool, block_tables, context_lens):
    """Right, token by token in a while loop, each block read back with int()."""
    import torch

    block_size, slots, seq = k_pool.shape[1], [], 0
    while seq < len(context_lens):
        for pos in range(int(context_lens[seq])):
            slots.append(int(block_tables[seq, pos // block_size]) * block_size + pos % block_size)
        seq += 1
    slots = torch.tensor(slots, dtype=torch.long)
    return (k_pool.reshape(-1, *k_pool.shape[2:])[slots],
            v_pool.reshape(-1, *v_pool.shape[2:])[slots])


def test_gather_cases_are_ragged_shuffled_and_padded_with_minus_one():
    """The cases tell the slips apart: ragged batches (an empty sequence too), tables whose
    blocks are not in order, a -1 column past every sequence's blocks, pools whose rows differ."""
    cases = EXERCISES["01.gather_kv_torch"].cases()
    lens = [c.kwargs["context_lens"] for c in cases]
    assert any(len(n) > 1 and len(set(n)) > 1 for n in lens)
    assert any(0 in n and len(n) > 2 for n in lens)
    assert any(len(n) > 1 and n[-1] == 0 for n in lens) and any(n.sum() == 0 for n in lens)
    assert any(c.kwargs["k_pool"].shape[1] == 1 for c in cases)
    for case in cases:
        table = case.kwargs["block_tables"]
        assert (table[:, -1] == -1).all()
        held = table[table >= 0]
        assert len(set(held)) == len(held)  # no block in two sequences
        pool = case.kwargs["k_pool"]
        rows = pool.reshape(-1, pool.shape[2] * pool.shape[3])
        assert len(np.unique(rows, axis=0)) == len(rows)  # a row's bytes name its slot


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
    assert copies == [False, False, True, False, False]
    assert new_blocks == [False, True, False, True, False]  # the last: a spare block, not used


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


@cuda.jit
def write_kv_loops_for_ever(k, v, k_pool, v_pool, slots):
    """`dim` never changes inside its loop."""
    token, dim = cuda.blockIdx.x, cuda.threadIdx.x
    while dim < k.shape[2]:
        k_pool[0, 0, 0, dim] = k[token, 0, dim]


def test_a_kernel_that_never_ends_is_stopped_and_told_so(learner_view, monkeypatch, capsys):
    from kvlab import trace

    monkeypatch.setattr(trace, "TIME_LIMIT_S", 0.5)
    assert EXERCISES["01.write_kv_kernel"].check(write_kv_loops_for_ever) is False
    out = capsys.readouterr().out
    assert "the tracer stopped your kernel: still running after 0.5 s" in out
    assert "of write_kv_loops_for_ever (k_pool[0, 0, 0, dim] = k[token, 0, dim])" in out
    assert "A loop that never ends?" in out
