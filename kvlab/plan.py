"""A step's plan: one batch step's index arrays, checked once, for every layer's ops.

A model step calls the fused write and the attention once per layer, and every call gets the same
block tables, lengths and query starts. Each op checks its index arrays before it runs — on a GPU
that means reading them back to the host, a synchronising copy per array (an H200 spent ~200 us
of every ``paged_decode_attention`` call and ~260 us of every fused write there,
``data/bench/h200_2026-11-27_host_overhead.txt``): for a 28-layer model, ~13 ms of checks a step.
Engines do this work once per step: vLLM builds its attention metadata once and hands it to every
layer; FlashInfer's wrappers split ``plan`` (host-side, once) from ``run`` (per layer).

kvlab's version: each backend's ``paging.plan_step(k_pool, block_tables, query_start,
context_lens)`` checks the host arrays of a step (:func:`check_step`: the same checks the ops run,
plus the new tokens' slots) and uploads them in **one** host-to-device copy into arrays the plan
owns. An op given ``plan=`` then takes the plan's arrays as its index arguments and reads nothing
back: it checks only what is cheap (shapes, dtypes, that the pool is the one planned for and the
arrays are the plan's own, :func:`check_planned`). The plan's arrays are its own copies, so no
later change to the caller's arrays can reach a kernel unchecked.

This module imports NumPy alone (like :mod:`kvlab.checks`, whose checks it reuses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kvlab.checks import (
    POOL_DIMS,
    check_array,
    check_new_slots,
    check_step_indices,
    shape_of,
)

QUANT_AND_FLOAT_POOLS = ("float16", "float32", "int8", "uint8")


@dataclass(frozen=True, eq=False)
class StepPlan:
    """One step of a ragged batch over a paged pool, checked (see the module docstring).

    The backend's arrays, owned by the plan (views of one device buffer):
    ``block_tables`` int32 ``[num_seqs, max_blocks]``, ``query_start`` int32 ``[num_seqs + 1]``
    (sequence s's new tokens are rows ``query_start[s]:query_start[s+1]``), ``context_lens`` int32
    ``[num_seqs]`` (each sequence's length after the step) and ``pos_offsets`` int32
    ``[num_seqs]`` (its length before: ``context_lens - new tokens``). ``host_*``: the same on the
    host, int64, as checked. ``num_blocks``, ``block_size``: the pool it was checked against.
    """

    block_tables: Any
    query_start: Any
    context_lens: Any
    pos_offsets: Any
    host_tables: np.ndarray
    host_starts: np.ndarray
    host_lens: np.ndarray
    host_offsets: np.ndarray
    num_blocks: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        """The step's new tokens over every sequence (rows of q, qkv)."""
        return int(self.host_starts[-1])

    def __repr__(self) -> str:
        return (f"StepPlan({len(self.host_lens)} sequences, {self.num_tokens} new tokens, pool of "
                f"{self.num_blocks} blocks of {self.block_size})")


def check_step(k_pool: Any, block_tables: Any, query_start: Any,
               context_lens: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checks for ``plan_step(k_pool, block_tables, query_start, context_lens)``.

    k_pool: the ``[num_blocks, block_size, num_kv_heads, head_dim]`` pool of any layer (float16,
    float32, or int8 / uint8 codes): its first two axes are what the tables index. The index
    arrays as :func:`kvlab.checks.check_step_indices` (each sequence's new tokens at most its
    context), and the new tokens — positions ``context_lens[s] - tokens_s .. context_lens[s] - 1``
    — each in a block of the pool and no two in one slot, as the fused write requires. Returns the
    host copies (int64): table, query starts, context lengths, pos_offsets.
    """
    check_array("k_pool", k_pool, POOL_DIMS, dtypes=QUANT_AND_FLOAT_POOLS)
    num_blocks, block_size = shape_of(k_pool)[:2]
    table, lens, starts = check_step_indices(block_tables, context_lens, query_start, num_blocks,
                                             block_size, num_tokens=None)
    tokens = np.diff(starts)
    offsets = lens - tokens
    seq_of = np.repeat(np.arange(len(lens)), tokens)
    positions = offsets[seq_of] + np.arange(int(starts[-1])) - starts[seq_of]
    check_new_slots(table, positions, seq_of, num_blocks, block_size)
    return table, starts, lens, offsets


def make_plan(k_pool: Any, block_tables: Any, query_start: Any, context_lens: Any,
              upload: Callable[[np.ndarray], Any]) -> StepPlan:
    """:func:`check_step`, then the four index arrays packed into one int32 buffer that
    ``upload`` puts on the backend (one host-to-device copy), seen as four views. What each
    backend's ``plan_step`` runs, with its own ``upload``."""
    table, starts, lens, offsets = check_step(k_pool, block_tables, query_start, context_lens)
    parts = (table.ravel(), starts, lens, offsets)
    packed = upload(np.concatenate(parts).astype(np.int32))
    ends = np.cumsum([len(p) for p in parts])
    views = [packed[stop - len(p):stop] for p, stop in zip(parts, ends)]
    num_blocks, block_size = shape_of(k_pool)[:2]
    return StepPlan(views[0].reshape(table.shape), views[1], views[2], views[3],
                    table, starts, lens, offsets, num_blocks, block_size)


def check_planned(plan: Any, num_blocks: int, block_size: int, num_tokens: int, rows_name: str,
                  **index_arrays: Any) -> StepPlan:
    """What an op given ``plan`` checks instead of reading its index arrays: ``plan`` is a
    :class:`StepPlan`, each of ``index_arrays`` (by parameter name) is the plan's own array of
    that name, the pool has the plan's ``num_blocks`` blocks of ``block_size``, and the op's rows
    (``rows_name``: q, qkv) are the plan's ``num_tokens``. Returns the plan."""
    if not isinstance(plan, StepPlan):
        raise TypeError(f"plan must be a StepPlan (from the backend's paging.plan_step) or None, "
                        f"got {type(plan).__name__}")
    for name, array in index_arrays.items():
        if array is not getattr(plan, name):
            raise ValueError(f"{name} must be plan.{name} when a plan is given (the plan checked "
                             f"its own copy of the step's indices, not this array)")
    if (num_blocks, block_size) != (plan.num_blocks, plan.block_size):
        raise ValueError(f"the pool has {num_blocks} blocks of {block_size} slots, but the plan "
                         f"was made for {plan.num_blocks} blocks of {plan.block_size}")
    if num_tokens != plan.num_tokens:
        raise ValueError(f"{rows_name} has {num_tokens} rows, but the plan's step has "
                         f"{plan.num_tokens} new tokens (query_start[-1])")
    return plan
