"""Paged KV cache as Numba CUDA kernels: the four ops of :mod:`kvlab.ref.paging`, on a GPU (and
``plan_step``, which checks a batch step's index arrays once: it takes host arrays too).

Each op comes in two parts. The *kernel* is device code: one thread block's view of the job, saying
which thread moves which element. The *launch wrapper* has ``kvlab.ref.paging``'s name and
parameters and runs on the host: it checks the arguments (:mod:`kvlab.checks`, before anything is
written), picks the grid and launches. Wrappers take and return Numba device arrays
(``kvlab.kernels.cuda.asarray``); pools are float16 or float32, index arrays int32.

The ops move bytes without arithmetic, so a thread's job is "read one element, write it elsewhere".
What varies is the grid: one block per token (write), per output row (gather), per (block pair,
slot) (copy), and one thread per token (slot mapping). Inside a block, the threads stride over a
token's ``num_kv_heads * head_dim`` elements, so any head count and head_dim fit any block size.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kvlab.checks import (
    POOL_DTYPES,
    check_copy_blocks,
    check_gather_kv,
    check_slot_mapping,
    check_write_kv,
    table_shape,
)
from kvlab.kernels.cuda import MODE, cuda, kernel
from kvlab.step_plan import StepPlan, make_plan

# Threads per block. The simulator runs every thread as a Python thread (a fraction of a
# millisecond each to start), so it gets a small block: the strided loops below then take several
# turns per token, the same code path a GPU takes when num_kv_heads * head_dim > 128.
THREADS_PER_BLOCK = 128 if MODE == "gpu" else 32


def _for_each_pool_dtype(signature: str) -> tuple[str, ...]:
    """One signature per pool dtype: ``"void({dtype}[:, ::1])"`` -> float16 and float32 versions."""
    return tuple(signature.format(dtype=dtype) for dtype in POOL_DTYPES)


def _launch(kernel_fn: Callable, grid: int | tuple[int, ...], *args: Any) -> None:
    """Launch ``kernel_fn`` on ``grid`` blocks of THREADS_PER_BLOCK threads; an empty grid (no
    tokens, no blocks to copy) is nothing to do, and CUDA would reject it."""
    if np.prod(grid) > 0:
        kernel_fn[grid, THREADS_PER_BLOCK](*args)


# --- slot_mapping ----------------------------------------------------------------------------
#
#   grid: one thread per token. Blocks of n = THREADS_PER_BLOCK threads tile the T tokens; the last
#   block's spare threads return at once.
#
#   token t            0      1    ...  n-1  |   n    ...  |  ...  T-1  | spare
#   (block, thread)  (0,0)  (0,1)  ... (0,n-1)| (1,0)  ...  |  ...       |
#
#   thread of token t:  pos = positions[t]                      (pos < 0, padding: slots[t] = -1)
#                       block = block_tables[seq_ids[t], pos // block_size]
#                       slots[t] = block * block_size + pos % block_size

@kernel("void(int32[:, ::1], int32[::1], int64, int32[::1], int32[::1])")
def slot_mapping_kernel(block_tables, positions, block_size, seq_ids, slots):
    token = cuda.grid(1)
    if token >= positions.shape[0]:  # the last block's spare threads
        return
    pos = positions[token]
    if pos < 0:
        slots[token] = -1
        return
    block = block_tables[seq_ids[token], pos // block_size]
    slots[token] = block * block_size + pos % block_size


def slot_mapping(block_table: Any, positions: Any, block_size: int, seq_ids: Any = None) -> Any:
    """The pool slot of each token: a new int32 device array ``[T]``, -1 for padding.

    Parameters as :func:`kvlab.ref.paging.slot_mapping` (device arrays, int32).
    """
    check_slot_mapping(block_table, positions, block_size, seq_ids)
    num_tokens = positions.shape[0]
    if seq_ids is None:  # one sequence: a table of one row, and every token reads row 0
        block_table = block_table.reshape(*table_shape(block_table))
        seq_ids = cuda.to_device(np.zeros(num_tokens, dtype=np.int32))
    slots = cuda.device_array(num_tokens, dtype=np.int32)
    thread_blocks = -(-num_tokens // THREADS_PER_BLOCK)  # ceil: enough threads for every token
    _launch(slot_mapping_kernel, thread_blocks, block_table, positions, block_size, seq_ids, slots)
    return slots


# --- write_kv --------------------------------------------------------------------------------
#
#   grid: one thread block per token t. Its n = THREADS_PER_BLOCK threads stride over the token's
#   num_kv_heads * head_dim elements; element e is (kv_head e // head_dim, dim e % head_dim):
#
#   element e   0   1   2  ...  n-1 |  n  n+1 ... 2n-1 |  2n ...
#   thread      0   1   2  ...  n-1 |  0   1  ...  n-1 |  0  ...
#               │   │   │
#               ▼   ▼   ▼
#   k[t, kv_head, dim]  ──►  k_pool[block, offset, kv_head, dim]      (v into v_pool, the same)
#
#   block, offset = divmod(slots[t], block_size). slots[t] < 0 (padding): the whole block returns.
#   No thread reads what another writes, so there is no shared memory and no barrier.

@kernel(*_for_each_pool_dtype("void({dtype}[:, :, ::1], {dtype}[:, :, ::1], "
                              "{dtype}[:, :, :, ::1], {dtype}[:, :, :, ::1], int32[::1])"))
def write_kv_kernel(k, v, k_pool, v_pool, slots):
    token = cuda.blockIdx.x
    slot = slots[token]
    if slot < 0:  # padding: this token has no place in the cache
        return
    block_size = k_pool.shape[1]
    block = slot // block_size
    offset = slot % block_size
    head_dim = k.shape[2]
    for element in range(cuda.threadIdx.x, k.shape[1] * head_dim, cuda.blockDim.x):
        head = element // head_dim
        dim = element % head_dim
        k_pool[block, offset, head, dim] = k[token, head, dim]
        v_pool[block, offset, head, dim] = v[token, head, dim]


def write_kv(k: Any, v: Any, k_pool: Any, v_pool: Any, slots: Any) -> None:
    """Store token t's K and V in slot ``slots[t]`` of the pools, in place; slot < 0 skipped.

    Parameters as :func:`kvlab.ref.paging.write_kv` (device arrays).
    """
    check_write_kv(k, v, k_pool, v_pool, slots)
    _launch(write_kv_kernel, k.shape[0], k, v, k_pool, v_pool, slots)


# --- gather_kv -------------------------------------------------------------------------------
#
#   grid: one thread block per output row r; the rows are every sequence's positions, in order:
#
#   output row r   0  1  ...  len0-1 | len0  ...  len0+len1-1 | ...
#   sequence       ─────── 0 ─────── | ────────── 1 ───────── | ...
#   position       0  1  ...  len0-1 |  0    ...  len1-1      | ...
#
#   block r walks context_lens to find its (sequence, position), looks up
#   block = block_tables[sequence, position // block_size], then its threads stride over the
#   elements as in write_kv:  k_pool[block, position % block_size, kv_head, dim] ──► k_out[r, ...]

@kernel(*_for_each_pool_dtype("void({dtype}[:, :, :, ::1], {dtype}[:, :, :, ::1], int32[:, ::1], "
                              "int32[::1], {dtype}[:, :, ::1], {dtype}[:, :, ::1])"))
def gather_kv_kernel(k_pool, v_pool, block_tables, context_lens, k_out, v_out):
    row = cuda.blockIdx.x
    seq = 0
    pos = row
    while pos >= context_lens[seq]:  # num_seqs is small: a walk is simpler than a search
        pos -= context_lens[seq]
        seq += 1
    block_size = k_pool.shape[1]
    block = block_tables[seq, pos // block_size]
    offset = pos % block_size
    head_dim = k_out.shape[2]
    for element in range(cuda.threadIdx.x, k_out.shape[1] * head_dim, cuda.blockDim.x):
        head = element // head_dim
        dim = element % head_dim
        k_out[row, head, dim] = k_pool[block, offset, head, dim]
        v_out[row, head, dim] = v_pool[block, offset, head, dim]


def gather_kv(k_pool: Any, v_pool: Any, block_table: Any, context_len: Any) -> tuple[Any, Any]:
    """Copy sequences' K and V into new contiguous device arrays ``[sum(context_len), Hkv, D]``.

    Parameters as :func:`kvlab.ref.paging.gather_kv`: a 1-D table and an int, or a 2-D table and
    an int32 device array of lengths.
    """
    _, context_lens = check_gather_kv(k_pool, v_pool, block_table, context_len)
    if len(block_table.shape) == 1:  # one sequence: a table of one row, its length on the device
        block_table = block_table.reshape(*table_shape(block_table))
        context_len = cuda.to_device(np.array([context_len], dtype=np.int32))
    _, _, num_kv_heads, head_dim = k_pool.shape
    out_shape = (int(context_lens.sum()), num_kv_heads, head_dim)
    k_out = cuda.device_array(out_shape, dtype=k_pool.dtype)
    v_out = cuda.device_array(out_shape, dtype=v_pool.dtype)
    _launch(gather_kv_kernel, out_shape[0],
            k_pool, v_pool, block_table, context_len, k_out, v_out)
    return k_out, v_out


# --- copy_blocks -----------------------------------------------------------------------------
#
#   grid: (N pairs) x (block_size slots); block (i, s) copies one slot of one block:
#
#   k_pool[src[i], s]  ──►  k_pool[dst[i], s]         threads stride over its elements (as above)
#
#   dst is disjoint from src and unique (checked), so no block reads what another block writes,
#   and the N * block_size blocks may run in any order.

@kernel(*_for_each_pool_dtype("void({dtype}[:, :, :, ::1], {dtype}[:, :, :, ::1], "
                              "int32[::1], int32[::1])"))
def copy_blocks_kernel(k_pool, v_pool, src, dst):
    pair = cuda.blockIdx.x
    offset = cuda.blockIdx.y
    from_block = src[pair]
    to_block = dst[pair]
    head_dim = k_pool.shape[3]
    for element in range(cuda.threadIdx.x, k_pool.shape[2] * head_dim, cuda.blockDim.x):
        head = element // head_dim
        dim = element % head_dim
        k_pool[to_block, offset, head, dim] = k_pool[from_block, offset, head, dim]
        v_pool[to_block, offset, head, dim] = v_pool[from_block, offset, head, dim]


def copy_blocks(k_pool: Any, v_pool: Any, src: Any, dst: Any) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in both pools, in place (copy-on-write).

    Parameters as :func:`kvlab.ref.paging.copy_blocks` (device arrays).
    """
    check_copy_blocks(k_pool, v_pool, src, dst)
    _launch(copy_blocks_kernel, (src.shape[0], k_pool.shape[1]), k_pool, v_pool, src, dst)


def plan_step(k_pool: Any, block_tables: Any, query_start: Any, context_lens: Any) -> StepPlan:
    """As :func:`kvlab.ref.paging.plan_step`: the plan's four index arrays reach the device in one
    host-to-device copy (views of one buffer); pass host (NumPy) index arrays to read none back."""
    return make_plan(k_pool, block_tables, query_start, context_lens, upload=cuda.to_device)
