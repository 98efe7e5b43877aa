"""Paged KV cache, NumPy reference: where each token's K and V live, and how they move.

A paged pool cuts one layer's cache into fixed-size blocks that any sequence can own::

    k_pool, v_pool   [num_blocks, block_size, num_kv_heads, head_dim]   float16 (or float32)

A sequence's **block table** lists the blocks it owns, in order (int32, unused entries -1), so the
token at position ``pos`` lives in block ``block_table[pos // block_size]`` at offset
``pos % block_size``. Numbering every slot of the pool in order gives each token one integer::

    slot = block_table[pos // block_size] * block_size + pos % block_size
    k_pool[slot // block_size, slot % block_size]  is that token's K, [num_kv_heads, head_dim]

Four ops move bytes and do no arithmetic on K or V, so every backend must match these bit for bit:
``slot_mapping`` (positions → slots), ``write_kv`` (new tokens → slots), ``gather_kv`` (a
sequence's slots → contiguous rows) and ``copy_blocks`` (whole blocks, for copy-on-write).
Arguments are checked by :mod:`kvlab.checks` before anything is written. A fifth, ``plan_step``,
moves no K or V: it checks a batch step's index arrays once for every layer's fused write and
attention (:mod:`kvlab.step_plan`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvlab.checks import (
    check_copy_blocks,
    check_gather_kv,
    check_slot_mapping,
    check_write_kv,
)
from kvlab.step_plan import StepPlan, make_plan


def slot_mapping(block_table: np.ndarray, positions: np.ndarray, block_size: int,
                 seq_ids: np.ndarray | None = None) -> np.ndarray:
    """The pool slot of each token: int32 ``[T]``, -1 for padding.

    block_table: int32 ``[max_blocks]`` for one sequence, or ``[num_seqs, max_blocks]`` for a batch.
    positions: int32 ``[T]``, each token's position in its sequence; negative marks padding.
    block_size: slots per block.
    seq_ids: int32 ``[T]``, each token's row of a 2-D block_table (None for a 1-D table).

    Raises ValueError when a position lies beyond the table or in an entry that is -1.
    """
    table, positions, rows = check_slot_mapping(block_table, positions, block_size, seq_ids)
    return table_slots(table, positions, block_size, rows)


def table_slots(table: np.ndarray, positions: np.ndarray, block_size: int,
                rows: np.ndarray) -> np.ndarray:
    """``slot_mapping`` of checked arguments: table ``[num_seqs, max_blocks]``, positions and
    each token's table row ``rows`` ``[T]`` (any integer dtype) -> int32 slots ``[T]``."""
    slots = np.full(positions.shape, -1, dtype=np.int32)  # padding (position < 0) keeps -1
    real = positions >= 0
    pos = positions[real]
    blocks = table[rows[real], pos // block_size]
    slots[real] = blocks * block_size + pos % block_size
    return slots


def gathered_positions(context_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sequence, position)`` of each row ``gather_kv`` returns, int64 ``[sum(context_lens)]``
    each: sequence 0's positions ``0 .. context_lens[0]-1``, then sequence 1's, ..."""
    # Output row r belongs to sequence rows[r], at position r - (rows before that sequence).
    rows = np.repeat(np.arange(len(context_lens)), context_lens)
    first_row = np.cumsum(context_lens) - context_lens
    return rows, np.arange(np.sum(context_lens)) - first_row[rows]


def gathered_slots(table: np.ndarray, context_lens: np.ndarray, block_size: int) -> np.ndarray:
    """The slots ``gather_kv`` reads, in output order (:func:`gathered_positions`; table
    ``[num_seqs, max_blocks]``, checked)."""
    rows, positions = gathered_positions(context_lens)
    return table_slots(table, positions, block_size, rows)


def write_kv(k: np.ndarray, v: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray,
             slots: np.ndarray) -> None:
    """Store token t's K and V in slot ``slots[t]`` of the pools (in place).

    k, v: ``[T, num_kv_heads, head_dim]``, the pool's dtype.
    k_pool, v_pool: ``[num_blocks, block_size, num_kv_heads, head_dim]``, written in place.
    slots: int32 ``[T]`` (see :func:`slot_mapping`). A negative slot is skipped: a batched step pads
    its tokens to a fixed count, and the padding must not land in anyone's cache (vLLM's
    ``reshape_and_cache`` skips slot -1 the same way).

    Raises ValueError for a slot beyond the pool or two tokens sent to one slot.
    """
    check_write_kv(k, v, k_pool, v_pool, slots)
    block_size = k_pool.shape[1]
    real = slots >= 0
    blocks, offsets = np.divmod(slots[real], block_size)
    k_pool[blocks, offsets] = k[real]
    v_pool[blocks, offsets] = v[real]


def gather_kv(k_pool: np.ndarray, v_pool: np.ndarray, block_table: np.ndarray,
              context_len: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copy sequences' K and V out of the pools into contiguous rows, in position order.

    k_pool, v_pool: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    block_table, context_len: int32 ``[max_blocks]`` and an int (one sequence), or int32
    ``[num_seqs, max_blocks]`` and int32 ``[num_seqs]`` (a batch).

    Returns new arrays k, v ``[sum(context_len), num_kv_heads, head_dim]`` in the pool's dtype:
    sequence 0's positions ``0 .. context_len[0]-1``, then sequence 1's, and so on.
    """
    table, context_lens = check_gather_kv(k_pool, v_pool, block_table, context_len)
    block_size = k_pool.shape[1]
    slots = gathered_slots(table, context_lens, block_size)
    blocks, offsets = np.divmod(slots, block_size)
    return k_pool[blocks, offsets], v_pool[blocks, offsets]  # fancy indexing copies


def copy_blocks(k_pool: np.ndarray, v_pool: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in both pools (in place): copy-on-write.

    When two sequences share a block (a common prefix, or beam search) and one must append to it,
    the allocator gives that sequence a fresh block; this copies the shared block's contents there.
    src, dst: int32 ``[N]`` block ids; dst unique and disjoint from src, so the copies do not
    depend on their order.
    """
    check_copy_blocks(k_pool, v_pool, src, dst)
    k_pool[dst] = k_pool[src]
    v_pool[dst] = v_pool[src]


def plan_step(k_pool: np.ndarray, block_tables: Any, query_start: Any,
              context_lens: Any) -> StepPlan:
    """One batch step's index arrays, checked once for every layer's ``paged_write_batched`` and
    ``paged_decode_attention`` (:mod:`kvlab.step_plan`, as an engine builds its attention metadata once
    per step).

    k_pool: any layer's pool (what the tables index: its ``num_blocks`` and ``block_size``).
    block_tables: int32 ``[num_seqs, max_blocks]``; query_start: int32 ``[num_seqs + 1]``;
    context_lens: int32 ``[num_seqs]``, each sequence's length after the step (its new tokens
    included) — on the host (NumPy) or the backend's own arrays (then read back once).
    Returns a :class:`~kvlab.step_plan.StepPlan` whose arrays are new copies (here read-only NumPy
    int32), with ``pos_offsets = context_lens - new tokens``.
    """
    return make_plan(k_pool, block_tables, query_start, context_lens, upload=_read_only)


def _read_only(packed: np.ndarray) -> np.ndarray:
    """The plan's own buffer, read-only (its views too): the ops trust what it holds."""
    packed.setflags(write=False)
    return packed
