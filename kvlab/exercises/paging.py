"""Exercises of notebook 01 (paging): slot mapping, ``write_kv`` with NumPy indexing, appending
a token after a fork (copy-on-write), and the ``write_kv`` kernel as a puzzle.

The array exercises are checked against :mod:`kvlab.ref.paging`; the append exercise against a
solution built from :class:`kvlab.paging.BlockAllocator` and the same reference ops. The kernel
puzzle runs in Numba's CUDA simulator under the access tracer, so a wrong index shows up as a
wrong picture.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np

from kvlab.backends import cuda_mode
from kvlab.exercises.core import (Case, Exercise, copy_args, draw_accesses, launch_both,
                                  print_slot_walk, register)
from kvlab.paging import BlockAllocator, blocks_needed
from kvlab.ref import paging as ref
from kvlab.trace import launch_traced

cuda_mode()  # decide GPU or simulator before numba is imported (kvlab.backends owns that)
from numba import cuda  # noqa: E402

NOTEBOOK = "01_paging"


# --- 01.slot_mapping ---------------------------------------------------------------------------

def slot_mapping_solution(block_table: np.ndarray, positions: np.ndarray,
                          block_size: int) -> np.ndarray:
    """int32 ``[T]``: the pool slot of each position (one sequence, no padding)."""
    blocks = block_table[positions // block_size]
    return (blocks * block_size + positions % block_size).astype(np.int32)


def _slot_mapping_cases() -> list[Case]:
    table = np.array([7, 2, 9, 4], dtype=np.int32)  # shuffled on purpose: slot != position
    cases = [
        Case("the first token", dict(block_table=table, positions=np.array([0], np.int32),
                                     block_size=4)),
        Case("a block boundary (3 → 4)", dict(block_table=table,
                                              positions=np.array([3, 4], np.int32), block_size=4)),
        Case("position 13 of a shuffled table", dict(block_table=table,
                                                     positions=np.array([13], np.int32),
                                                     block_size=4)),
        Case("block_size 1", dict(block_table=table, positions=np.arange(4, dtype=np.int32),
                                  block_size=1)),
    ]
    rng = np.random.default_rng(1)
    for i in range(4):
        block_size = int(rng.choice([2, 4, 16]))
        table = rng.permutation(64)[:8].astype(np.int32)
        positions = rng.integers(0, 8 * block_size, size=6).astype(np.int32)
        cases.append(Case(f"random {i}", dict(block_table=table, positions=positions,
                                              block_size=block_size), random=True))
    return cases


def _explain_slot_mapping(fn: Callable, case: Case) -> None:
    """Position by position: the table entry and offset it gives, and the slot."""
    table, size = case.kwargs["block_table"], case.kwargs["block_size"]
    print_slot_walk(fn, case, [f"position {p} -> block_table[{p // size}] = {table[p // size]}, "
                               f"offset {p % size}" for p in case.kwargs["positions"]],
                    ref.slot_mapping(**case.kwargs))


register(Exercise(
    name="01.slot_mapping", notebook=NOTEBOOK, section="2.2 From a position to a slot",
    signature="slot_mapping(block_table, positions, block_size) -> slots  # int32 [T]",
    hint="position p lives in the table's entry p // block_size, at offset p % block_size; "
         "number the pool's slots block by block.",
    solution=slot_mapping_solution,
    reference=ref.slot_mapping,
    cases=_slot_mapping_cases,
    explain=_explain_slot_mapping,
))


# --- 01.write_kv: the write with NumPy indexing ------------------------------------------------

def write_kv_solution(k: np.ndarray, v: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray,
                      slots: np.ndarray) -> None:
    """Store token t's K and V (``[T, num_kv_heads, head_dim]``) in slot ``slots[t]`` of the pools
    ``[num_blocks, block_size, num_kv_heads, head_dim]``, in place; a negative slot is padding."""
    real = slots >= 0                                   # padding has no place in the cache
    blocks, offsets = np.divmod(slots[real], k_pool.shape[1])
    k_pool[blocks, offsets] = k[real]
    v_pool[blocks, offsets] = v[real]


def _pools_after(fn: Callable, case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Call ``fn`` (which writes in place) on copies of the case; return the pools it left."""
    args = copy_args(case.kwargs)
    fn(**args)
    return args["k_pool"], args["v_pool"]


def _write_kv_case(label: str, slots, heads: int = 2, head_dim: int = 4, num_blocks: int = 3,
                   block_size: int = 2, seed: int = 0, dtype=np.float32,
                   random: bool = False) -> Case:
    """New K/V for ``len(slots)`` tokens and zeroed pools (num_blocks != block_size on purpose:
    mixing up the two axes then fails)."""
    rng = np.random.default_rng(seed)
    tokens = len(slots)
    pool_shape = (num_blocks, block_size, heads, head_dim)
    return Case(label, dict(
        k=rng.standard_normal((tokens, heads, head_dim)).astype(dtype),
        v=rng.standard_normal((tokens, heads, head_dim)).astype(dtype),
        k_pool=np.zeros(pool_shape, dtype), v_pool=np.zeros(pool_shape, dtype),
        slots=np.asarray(slots, np.int32)), random=random)


def _write_kv_kernel_cases() -> list[Case]:
    """Few and tiny: the simulator runs every thread as Python."""
    return [
        _write_kv_case("two tokens into block 2", [4, 5]),
        _write_kv_case("a padded token (slot -1)", [1, -1, 2]),
        _write_kv_case("one head of 8 dims, slots out of order", [5, 0, 3], heads=1, head_dim=8),
        _write_kv_case("random slots", list(np.random.default_rng(7).permutation(6)[:4]), seed=3,
                       random=True),
    ]


def _write_kv_cases() -> list[Case]:
    cases = _write_kv_kernel_cases()[:3]
    rng = np.random.default_rng(11)
    for i in range(4):
        num_blocks, block_size = int(rng.integers(3, 9)), int(rng.choice([2, 4, 16]))
        tokens = int(rng.integers(1, 8))
        slots = rng.permutation(num_blocks * block_size)[:tokens]
        slots[rng.random(tokens) < 0.25] = -1  # some padding
        cases.append(_write_kv_case(f"random {i}", slots, heads=int(rng.integers(1, 4)),
                                    head_dim=8, num_blocks=num_blocks, block_size=block_size,
                                    seed=100 + i, dtype=np.float16, random=True))
    return cases


register(Exercise(
    name="01.write_kv", notebook=NOTEBOOK, section="2.4 Padding, gathering, copying",
    signature="write_kv(k, v, k_pool, v_pool, slots) -> None  # writes the pools in place",
    hint="drop the tokens whose slot is negative; the rest go to k_pool[block, offset] with "
         "block, offset = divmod(slot, block_size), and block_size is k_pool.shape[1].",
    solution=write_kv_solution,
    reference=ref.write_kv,
    cases=_write_kv_cases,
    run=_pools_after,
))


# --- 01.append_token: copy-on-write after a fork ----------------------------------------------

def append_token_solution(allocator: BlockAllocator, blocks: list[int], num_tokens: int,
                          k_pool: np.ndarray, v_pool: np.ndarray, k: np.ndarray,
                          v: np.ndarray) -> list[int]:
    """Append one token (K and V ``[num_kv_heads, head_dim]``) to a sequence that holds
    ``num_tokens`` tokens in ``blocks`` (some may be shared with a fork); return its new blocks."""
    growth = allocator.grow(blocks, num_tokens=num_tokens, num_new_tokens=1)
    if growth.copies:  # copy the shared block into the private one *before* writing there
        src, dst = (np.array(side, dtype=np.int32) for side in zip(*growth.copies))
        ref.copy_blocks(k_pool, v_pool, src, dst)
    block_size = allocator.block_size
    block = growth.blocks[num_tokens // block_size]
    k_pool[block, num_tokens % block_size] = k
    v_pool[block, num_tokens % block_size] = v
    return growth.blocks


def _run_append(fn: Callable, case: Case) -> Any:
    """``(blocks returned, k_pool, v_pool, every block's ref count)`` after ``fn`` ran on a deep
    copy of the case (the allocator is state: each run gets its own)."""
    args = copy.deepcopy(case.kwargs)
    blocks = fn(**args)
    allocator = args["allocator"]
    refs = [allocator.ref_count(b) for b in range(allocator.num_blocks)]
    return (None if blocks is None else [int(b) for b in blocks], args["k_pool"], args["v_pool"],
            refs)


def _append_case(label: str, num_tokens: int, forked: bool, block_size: int = 4,
                 num_blocks: int = 8, heads: int = 2, head_dim: int = 4, seed: int = 0,
                 random: bool = False) -> Case:
    """A sequence of ``num_tokens`` tokens (forked: its blocks shared with a parent) in a pool
    whose free list is shuffled and whose every slot holds stale values, as after real use."""
    rng = np.random.default_rng(seed)
    allocator = BlockAllocator(num_blocks, block_size)
    everything = allocator.allocate(num_blocks)
    allocator.free([everything[i] for i in rng.permutation(num_blocks)])  # a shuffled free list
    parent = allocator.allocate(blocks_needed(num_tokens, block_size))
    blocks = allocator.fork(parent) if forked else parent
    pool_shape = (num_blocks, block_size, heads, head_dim)
    return Case(label, dict(
        allocator=allocator, blocks=blocks, num_tokens=num_tokens,
        k_pool=rng.standard_normal(pool_shape).astype(np.float32),
        v_pool=rng.standard_normal(pool_shape).astype(np.float32),
        k=rng.standard_normal((heads, head_dim)).astype(np.float32),
        v=rng.standard_normal((heads, head_dim)).astype(np.float32)), random=random)


def _append_cases() -> list[Case]:
    cases = [
        _append_case("not shared, room left in the last block", 6, forked=False),
        _append_case("not shared, the last block is full", 8, forked=False),
        _append_case("forked, the shared last block is half full", 6, forked=True),
        _append_case("forked, every shared block is full", 8, forked=True),
    ]
    rng = np.random.default_rng(5)
    for i in range(4):
        block_size = int(rng.choice([2, 4, 16]))
        num_tokens = int(rng.integers(1, 4 * block_size))
        cases.append(_append_case(f"random {i}", num_tokens, forked=bool(i % 2 == 0),
                                  block_size=block_size, seed=50 + i, random=True))
    return cases


register(Exercise(
    name="01.append_token", notebook=NOTEBOOK, section="2.6 Fork and copy-on-write",
    signature="append_token(allocator, blocks, num_tokens, k_pool, v_pool, k, v) -> new blocks"
              "  # checked: (blocks, k_pool, v_pool, ref counts)",
    hint="allocator.grow(...) makes the target block writable and may return copies (src, dst): "
         "copy_blocks them first, then write the token at position num_tokens.",
    solution=append_token_solution,
    reference=append_token_solution,
    cases=_append_cases,
    run=_run_append,
))


# --- 01.write_kv_kernel: a kernel puzzle -------------------------------------------------------
#
# The learner writes a Numba CUDA kernel ``write_kv_kernel(k, v, k_pool, v_pool, slots)``, launched
# with one block per token and one thread per (kv head, dim) element of that token. It runs in the
# simulator under the access tracer; a failure draws which thread wrote where, beside the solution.

@cuda.jit
def write_kv_kernel_solution(k, v, k_pool, v_pool, slots):
    token = cuda.blockIdx.x                     # one block per token
    slot = slots[token]
    if slot < 0:                                # padding: this token has no place in the cache
        return
    head_dim = k.shape[2]
    head = cuda.threadIdx.x // head_dim         # one thread per (head, dim) element
    dim = cuda.threadIdx.x % head_dim
    block_size = k_pool.shape[1]
    block = slot // block_size
    offset = slot % block_size
    k_pool[block, offset, head, dim] = k[token, head, dim]
    v_pool[block, offset, head, dim] = v[token, head, dim]


def _launch_write_kv(kernel: Callable, case: Case):
    """Launch ``kernel`` on the case in the simulator, traced: grid = tokens, block = heads × dims.
    Returns ``((k_pool, v_pool) after the launch, the AccessLog)``."""
    tokens, heads, head_dim = case.kwargs["k"].shape
    after, log = launch_traced(kernel, tokens, heads * head_dim, **copy_args(case.kwargs))
    return (after["k_pool"], after["v_pool"]), log


def _run_write_kv(fn: Callable, case: Case) -> Any:
    """The pools after ``fn`` ran: the NumPy reference is called, a kernel is launched."""
    if fn is ref.write_kv:
        return _pools_after(fn, case)
    return _launch_write_kv(fn, case)[0]


def _explain_write_kv(fn: Callable, case: Case) -> None:
    """Draw which thread wrote each element of ``k_pool``: yours beside the solution's."""
    runs = launch_both(fn, write_kv_kernel_solution, lambda kernel: _launch_write_kv(kernel, case))
    if all(log is not None for _, log in runs):
        yours, reference = (log.owner_map("k_pool", "write") for _, log in runs)
        draw_accesses(yours, reference, "writes to k_pool")


register(Exercise(
    name="01.write_kv_kernel", notebook=NOTEBOOK, section="3.2 write_kv on a GPU",
    signature="@cuda.jit\ndef write_kv_kernel(k, v, k_pool, v_pool, slots): ...  "
              "# grid = tokens, block = num_kv_heads * head_dim threads",
    hint="token = blockIdx.x; thread t handles head t // head_dim, dim t % head_dim; the slot "
         "gives block = slot // block_size, offset = slot % block_size; skip slot < 0.",
    solution=write_kv_kernel_solution,
    reference=ref.write_kv,
    cases=_write_kv_kernel_cases,
    run=_run_write_kv,
    explain=_explain_write_kv,
    kernel=True,
    trace=_launch_write_kv,
))
