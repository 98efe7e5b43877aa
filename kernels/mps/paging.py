"""Paged KV cache as PyTorch ops: the four ops of :mod:`kvlab.ref.paging`, on MPS, CUDA or the CPU
(and ``plan_step``, which checks a batch step's index arrays once: it takes NumPy arrays too).

The idea that makes each op a line or two: a C-contiguous pool viewed as
``[num_blocks * block_size, num_kv_heads, head_dim]`` has one row per slot, so writing tokens is
``index_copy_`` into rows ``slots``, and gathering a sequence is ``index_select`` of its slots.
Only ops MPS supports are used (no float64); int32 indices become int64 where torch indexes with
them. Arguments are checked by :mod:`kvlab.checks` before anything is written; results are
tensors on the pool's device. Unverified on MPS: no machine this project is tested on has one.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from kvlab.checks import (
    check_copy_blocks,
    check_gather_kv,
    check_slot_mapping,
    check_write_kv,
)
from kvlab.kernels.mps import require_tensors
from kvlab.step_plan import StepPlan, make_plan
from kvlab.ref.paging import gathered_slots, table_slots


def _rows_of_slots(pool: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, block_size, Hkv, D]`` seen as ``[num_blocks * block_size, Hkv, D]``: a view,
    so writing a row writes the pool (the checks make sure the pool is contiguous)."""
    return pool.view(-1, pool.shape[2], pool.shape[3])


def as_words(rows: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` (contiguous) seen as ``[N, words]`` of the widest integer type whose size
    divides a row's bytes: a view, for copying rows. A copy moves bytes, not numbers, and torch's
    ``index_copy_`` costs per element: a float16 K row of 8 heads x 128 is 2048 elements but 256
    int64 words (measured ~1.4x faster for copy_blocks on the CPU)."""
    flat = rows.view(rows.shape[0], math.prod(rows.shape[1:]))  # -1 is ambiguous for 0 rows
    row_bytes = flat.shape[1] * flat.element_size()
    for word in (torch.int64, torch.int32, torch.int16):
        if row_bytes % word.itemsize == 0 and flat.element_size() <= word.itemsize:
            return flat.view(word)
    return flat


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, block_size: int,
                 seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The pool slot of each token: int32 ``[T]`` on the table's device, -1 for padding.

    Parameters as :func:`kvlab.ref.paging.slot_mapping` (int32 tensors).

    Computed on the host, from the copies the checks have just read there, then copied to the
    device once: a few bytes of index arithmetic per token, where a dozen tiny device ops would
    cost more than the work (~100 us on a CPU; on a GPU, a launch each). vLLM's GPU model runner
    prepares its slot mapping the same way (NumPy on the host, one copy up).
    """
    require_tensors(block_table=block_table, positions=positions, seq_ids=seq_ids)
    table, host_positions, rows = check_slot_mapping(block_table, positions, block_size, seq_ids)
    slots = table_slots(table, host_positions, block_size, rows)
    return torch.from_numpy(slots).to(block_table.device)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store token t's K and V in slot ``slots[t]`` of the pools, in place; slot < 0 skipped.

    Parameters as :func:`kvlab.ref.paging.write_kv` (tensors on one device).
    """
    require_tensors(k=k, v=v, k_pool=k_pool, v_pool=v_pool, slots=slots)
    check_write_kv(k, v, k_pool, v_pool, slots)
    rows, k, v = without_padding(slots, k, v)
    as_words(_rows_of_slots(k_pool)).index_copy_(0, rows, as_words(k.contiguous()))
    as_words(_rows_of_slots(v_pool)).index_copy_(0, rows, as_words(v.contiguous()))


def without_padding(slots: torch.Tensor, *arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(rows, *arrays)`` without the tokens whose slot is negative (padding has no place in the
    cache): rows int64, the slots kept. One read-back (``nonzero``'s count); without padding, the
    arrays are passed on as they are, not copied."""
    real = torch.nonzero(slots >= 0).squeeze(1)
    if len(real) == len(slots):
        return (slots.long(), *arrays)
    return (slots.index_select(0, real).long(), *(a.index_select(0, real) for a in arrays))


def gather_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
              context_len: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy sequences' K and V into new contiguous tensors ``[sum(context_len), Hkv, D]``.

    Parameters as :func:`kvlab.ref.paging.gather_kv`: a 1-D table and an int, or a 2-D table and
    an int32 tensor of lengths.
    """
    require_tensors(k_pool=k_pool, v_pool=v_pool, block_table=block_table,
                    context_len=context_len)
    table, context_lens = check_gather_kv(k_pool, v_pool, block_table, context_len)
    slots = slots_to_read(table, context_lens, k_pool.shape[1], k_pool.device)
    return (_rows_of_slots(k_pool).index_select(0, slots),
            _rows_of_slots(v_pool).index_select(0, slots))


def slots_to_read(table: np.ndarray, context_lens: np.ndarray, block_size: int,
                  device: torch.device) -> torch.Tensor:
    """The slots a gather reads (:func:`kvlab.ref.paging.gathered_slots`), int64 on ``device``.

    Index arithmetic on the host copies of the table ``[num_seqs, max_blocks]`` and lengths the
    checks made, as in :func:`slot_mapping`; the bytes then move on the device, in one
    ``index_select`` per pool.
    """
    slots = gathered_slots(table, context_lens, block_size)
    return torch.from_numpy(slots.astype(np.int64)).to(device)


def copy_blocks(k_pool: torch.Tensor, v_pool: torch.Tensor, src: torch.Tensor,
                dst: torch.Tensor) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in both pools, in place (copy-on-write).

    Parameters as :func:`kvlab.ref.paging.copy_blocks` (int32 tensors).
    """
    require_tensors(k_pool=k_pool, v_pool=v_pool, src=src, dst=dst)
    check_copy_blocks(k_pool, v_pool, src, dst)
    src, dst = src.long(), dst.long()
    for pool in (as_words(k_pool), as_words(v_pool)):
        pool.index_copy_(0, dst, pool.index_select(0, src))


def plan_step(k_pool: torch.Tensor, block_tables: Any, query_start: Any,
              context_lens: Any) -> StepPlan:
    """As :func:`kvlab.ref.paging.plan_step`: the plan's four index arrays reach k_pool's device
    in one copy (views of one tensor). The index arrays may be NumPy arrays (the host's, read
    for free) or tensors."""
    require_tensors(k_pool=k_pool)
    return make_plan(k_pool, block_tables, query_start, context_lens,
                     upload=lambda packed: torch.from_numpy(packed).to(k_pool.device))
