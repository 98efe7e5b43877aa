"""A step's plan: one batch step's index arrays, checked once, for every layer's ops.

A model step calls the fused write and the attention once per layer, and every call gets the same
block tables, lengths and query starts. Each op checks its index arrays before it runs — on a GPU
that means reading them back to the host, a synchronising copy per array (an H200 spent ~200 us
of every ``paged_decode_attention`` call and ~260 us of every fused write in its checks,
``data/bench/h200_2026-11-27_host_overhead.txt``): up to ~13 ms a step for a 28-layer model, of
which a plan saves the read-backs and the block-table and slot checks (the shape checks, and the
fused write's check of its positions against the RoPE table, stay per call).
Engines do this work once per step: vLLM builds its attention metadata once and hands it to every
layer; FlashInfer's wrappers split ``plan`` (host-side, once) from ``run`` (per layer).

kvlab's version: each backend's ``paging.plan_step(k_pool, block_tables, query_start,
context_lens)`` checks the host arrays of a step (:func:`check_step`: the same checks the ops run,
plus the new tokens' slots) and uploads them in **one** host-to-device copy into arrays the plan
owns. An op given ``plan=`` then takes the plan's arrays as its index arguments and reads no index
array back (a write into an int8/fp8 cache still reads back its value-check flag): it checks only
what is cheap (shapes, dtypes, that the pool is the one planned for and the arrays are the plan's
own, :func:`check_planned`). The plan's arrays are its own copies, so no later change to the
caller's arrays can reach a kernel unchecked.

This module imports NumPy alone (like :mod:`kvlab.checks`, whose checks it reuses).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from kvlab.checks import (
    POOL_DIMS,
    POOL_DTYPES,
    QUANT_POOL_KV_DTYPES,
    check_array,
    check_new_slots,
    check_step_indices,
    new_token_positions,
    shape_of,
)

ANY_POOL_DTYPES = POOL_DTYPES + tuple(QUANT_POOL_KV_DTYPES)  # float pools, int8 / fp8 codes
# Every plan make_plan has made and that is still alive: an op takes no other (a StepPlan built by
# hand, or copied with other arrays by dataclasses.replace, was never checked).
_MADE: weakref.WeakSet = weakref.WeakSet()


@dataclass(frozen=True, eq=False)
class StepPlan:
    """One step of a ragged batch over a paged pool, checked (see the module docstring).

    The backend's arrays, owned by the plan (views of one buffer on the pool's backend):
    ``block_tables`` int32 ``[num_seqs, max_blocks]``, ``query_start`` int32 ``[num_seqs + 1]``
    (sequence s's new tokens are rows ``query_start[s]:query_start[s+1]``), ``context_lens`` int32
    ``[num_seqs]`` (each sequence's length after the step) and ``pos_offsets`` int32
    ``[num_seqs]`` (its length before: ``context_lens - new tokens``). ``host_*``: the same on the
    host, int64, as checked (read-only). ``num_blocks``, ``block_size``: the pool it was checked
    against.

    The ops trust these arrays, so nothing may write to them: the NumPy ones are read-only, the
    torch ones carry the version counter they had when made (an in-place write moves it, and the
    ops then refuse the plan), and a Numba device array has neither — on the cuda backend not
    writing to a plan is the caller's promise.
    """

    block_tables: Any
    query_start: Any
    context_lens: Any
    pos_offsets: Any
    host_block_tables: np.ndarray
    host_query_start: np.ndarray
    host_context_lens: np.ndarray
    host_pos_offsets: np.ndarray
    num_blocks: int
    block_size: int
    version: int | None = None  # torch: the tensors' version counter when made (None: others)

    @property
    def num_tokens(self) -> int:
        """The step's new tokens over every sequence (rows of q, qkv)."""
        return int(self.host_query_start[-1])

    def __repr__(self) -> str:
        return (f"StepPlan({len(self.host_context_lens)} sequences, {self.num_tokens} new tokens, "
                f"pool of {self.num_blocks} blocks of {self.block_size})")


def check_step(k_pool: Any, block_tables: Any, query_start: Any,
               context_lens: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checks for ``plan_step(k_pool, block_tables, query_start, context_lens)``.

    k_pool: the ``[num_blocks, block_size, num_kv_heads, head_dim]`` pool of any layer (float16,
    float32, or int8 / uint8 codes): its first two axes are what the tables index. The index
    arrays as :func:`kvlab.checks.check_step_indices` (each sequence's new tokens at most its
    context), and the new tokens — positions ``context_lens[s] - tokens_s .. context_lens[s] - 1``
    — each in a block of the pool and no two in one slot, as the fused write requires. At least
    one sequence. Returns the host copies (int64): table, query starts, context lengths,
    pos_offsets.
    """
    check_array("k_pool", k_pool, POOL_DIMS, dtypes=ANY_POOL_DTYPES)
    num_blocks, block_size = shape_of(k_pool)[:2]
    table, lens, starts = check_step_indices(block_tables, context_lens, query_start, num_blocks,
                                             block_size, num_tokens=None)
    if len(lens) < 1:
        raise ValueError("a step needs at least one sequence: block_tables has no rows")
    offsets = lens - np.diff(starts)
    seq_of, positions = new_token_positions(starts, offsets)
    # Every new position is below its context length, whose blocks check_step_indices has found
    # in the pool: what is left to check is the fused write's own rule, one token per slot.
    check_new_slots(table, positions, seq_of, num_blocks, block_size)
    return table, starts, lens, offsets


def upload_together(arrays: Sequence[Any], upload: Callable[[np.ndarray], Any]
                    ) -> tuple[Any, list[Any]]:
    """Small host index ``arrays`` (any shapes) as int32 on a backend in **one** copy: packed into
    one buffer that ``upload`` (``cuda.to_device``, a torch ``.to(device)``, ...) puts there, then
    seen as one view per array, in its shape. Each small copy costs a synchronous allocation and
    transfer on a GPU, however few its bytes. Returns ``(buffer, views)``."""
    flat = [np.asarray(a, np.int32).ravel() for a in arrays]
    packed = upload(np.concatenate(flat))
    ends = np.cumsum([len(f) for f in flat])
    return packed, [packed[stop - len(f):stop].reshape(np.shape(a))
                    for a, f, stop in zip(arrays, flat, ends)]


def make_plan(k_pool: Any, block_tables: Any, query_start: Any, context_lens: Any,
              upload: Callable[[np.ndarray], Any]) -> StepPlan:
    """:func:`check_step`, then the four index arrays on the backend in one copy
    (:func:`upload_together` with ``upload``). What each backend's ``plan_step`` runs."""
    host = check_step(k_pool, block_tables, query_start, context_lens)
    for array in host:
        array.setflags(write=False)
    packed, views = upload_together(host, upload)
    plan = StepPlan(*views, *host, *shape_of(k_pool)[:2],
                    version=getattr(packed, "_version", None))
    _MADE.add(plan)
    return plan


def check_planned(plan: Any, num_blocks: int, block_size: int, num_tokens: int, rows_name: str,
                  **index_arrays: Any) -> StepPlan:
    """What an op given ``plan`` checks instead of reading its index arrays: ``plan`` is a
    :class:`StepPlan`, each of ``index_arrays`` (by parameter name) is the plan's own array of
    that name, the pool has the plan's ``num_blocks`` blocks of ``block_size``, and the op's rows
    (``rows_name``: q, qkv) are the plan's ``num_tokens``; and the plan is one ``plan_step``
    made, its arrays unwritten since (where the backend can tell: see :class:`StepPlan`).
    Returns the plan."""
    if not isinstance(plan, StepPlan):
        raise TypeError(f"plan must be a StepPlan (from the backend's paging.plan_step) or None, "
                        f"got {type(plan).__name__}")
    if plan not in _MADE:
        raise ValueError("plan was not made by paging.plan_step (a StepPlan built or copied by "
                         "hand was never checked)")
    if plan.version is not None and plan.block_tables._version != plan.version:
        raise ValueError("the plan's arrays were written after it was made: make a new plan")
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
