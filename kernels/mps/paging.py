"""Paged KV cache as PyTorch ops: the four ops of :mod:`kvlab.ref.paging`, on MPS, CUDA or the CPU.

The idea that makes each op a line or two: a C-contiguous pool viewed as
``[num_blocks * block_size, num_kv_heads, head_dim]`` has one row per slot, so writing tokens is
``index_copy_`` into rows ``slots``, and gathering a sequence is ``index_select`` of its slots.
Only ops MPS supports are used (no float64); int32 indices become int64 where torch indexes with
them. Arguments are checked by :mod:`kvlab.checks` before anything is written; results are
tensors on the pool's device. Unverified on MPS: no machine this project is tested on has one.
"""
from __future__ import annotations

import torch

from kvlab.checks import (
    check_copy_blocks,
    check_gather_kv,
    check_slot_mapping,
    check_write_kv,
    table_shape,
)


def _rows_of_slots(pool: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, block_size, Hkv, D]`` seen as ``[num_blocks * block_size, Hkv, D]``: a view,
    so writing a row writes the pool (the checks make sure the pool is contiguous)."""
    return pool.view(-1, pool.shape[2], pool.shape[3])


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, block_size: int,
                 seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The pool slot of each token: int32 ``[T]``, -1 for padding.

    Parameters as :func:`kvlab.ref.paging.slot_mapping` (int32 tensors).
    """
    check_slot_mapping(block_table, positions, block_size, seq_ids)
    table = block_table.reshape(table_shape(block_table))  # one sequence = a table of one row
    rows = torch.zeros_like(positions) if seq_ids is None else seq_ids
    return _slots(table, positions, block_size, rows)


def _slots(table: torch.Tensor, positions: torch.Tensor, block_size: int,
           rows: torch.Tensor) -> torch.Tensor:
    """``slot_mapping`` without the checks: table ``[num_seqs, max_blocks]``, rows ``[T]``."""
    slots = torch.full_like(positions, -1, dtype=torch.int32)  # padding (position < 0) keeps -1
    real = positions >= 0
    pos = positions[real].long()
    blocks = table[rows[real].long(), pos // block_size]
    slots[real] = (blocks * block_size + pos % block_size).to(torch.int32)
    return slots


def write_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store token t's K and V in slot ``slots[t]`` of the pools, in place; slot < 0 skipped.

    Parameters as :func:`kvlab.ref.paging.write_kv` (tensors on one device).
    """
    check_write_kv(k, v, k_pool, v_pool, slots)
    real = slots >= 0  # padding tokens have no place in the cache
    rows = slots[real].long()
    _rows_of_slots(k_pool).index_copy_(0, rows, k[real])
    _rows_of_slots(v_pool).index_copy_(0, rows, v[real])


def gather_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
              context_len: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy sequences' K and V into new contiguous tensors ``[sum(context_len), Hkv, D]``.

    Parameters as :func:`kvlab.ref.paging.gather_kv`: a 1-D table and an int, or a 2-D table and
    an int32 tensor of lengths.
    """
    context_lens = check_gather_kv(k_pool, v_pool, block_table, context_len)
    device = k_pool.device
    total = int(context_lens.sum())
    lens = torch.as_tensor(context_lens, device=device)
    # Output row r belongs to sequence rows[r], at position r - (rows before that sequence).
    rows = torch.repeat_interleave(torch.arange(len(lens), device=device), lens, output_size=total)
    first_row = torch.cumsum(lens, 0) - lens
    positions = torch.arange(total, device=device) - first_row[rows]
    table = block_table.reshape(table_shape(block_table))
    slots = _slots(table, positions, k_pool.shape[1], rows).long()
    return (_rows_of_slots(k_pool).index_select(0, slots),
            _rows_of_slots(v_pool).index_select(0, slots))


def copy_blocks(k_pool: torch.Tensor, v_pool: torch.Tensor, src: torch.Tensor,
                dst: torch.Tensor) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in both pools, in place (copy-on-write).

    Parameters as :func:`kvlab.ref.paging.copy_blocks` (int32 tensors).
    """
    check_copy_blocks(k_pool, v_pool, src, dst)
    src, dst = src.long(), dst.long()
    k_pool.index_copy_(0, dst, k_pool.index_select(0, src))
    v_pool.index_copy_(0, dst, v_pool.index_select(0, src))
