"""Exercises of notebook 01 (paging): slot mapping, ``write_kv`` with NumPy indexing, appending
a token after a fork (copy-on-write), and the ``write_kv`` kernel as a puzzle.

The array exercises are checked against :mod:`kvlab.ref.paging`; the append exercise against a
solution built from :class:`kvlab.paging.BlockAllocator` and the same reference ops. The kernel
puzzle runs in Numba's CUDA simulator under the access tracer, so a wrong index shows up as a
wrong picture.
"""
from __future__ import annotations

import ast
import copy
import inspect
import textwrap
from typing import Any, Callable

import numpy as np

from kvlab.backends import cuda_mode
from kvlab.exercises.core import (Case, Exercise, WrongResult, copy_args, draw_accesses,
                                  launch_both, print_slot_walk, read_only, register,
                                  tensor_result, torch_copies)
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
        Case("no tokens: an empty positions array", dict(block_table=table,
                                                         positions=np.zeros(0, np.int32),
                                                         block_size=4)),
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
    run=read_only("block_table", "positions"),
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
    cases = _write_kv_kernel_cases()[:3] + [
        _write_kv_case("every token is padding: nothing to write", [-1, -1])]
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
    outputs=("k_pool", "v_pool"),
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
    if blocks is not None:
        try:
            blocks = [int(b) for b in blocks]
        except (TypeError, ValueError):
            raise WrongResult(f"append_token should return the sequence's blocks, a list of block "
                              f"ids (growth.blocks, say), got {type(blocks).__name__}") from None
    return blocks, args["k_pool"], args["v_pool"], refs


def _append_case(label: str, num_tokens: int, forked: bool, block_size: int = 4,
                 num_blocks: int = 8, heads: int = 2, head_dim: int = 4, seed: int = 0,
                 spare: int = 0, random: bool = False) -> Case:
    """A sequence of ``num_tokens`` tokens (forked: its blocks shared with a parent) in a pool
    whose free list is shuffled and whose every slot holds stale values, as after real use;
    ``spare`` blocks reserved past its last token (a block list may run ahead of its tokens)."""
    rng = np.random.default_rng(seed)
    allocator = BlockAllocator(num_blocks, block_size)
    everything = allocator.allocate(num_blocks)
    allocator.free([everything[i] for i in rng.permutation(num_blocks)])  # a shuffled free list
    parent = allocator.allocate(blocks_needed(num_tokens, block_size) + spare)
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
        _append_case("a spare block reserved past the last token: the token goes before it", 5,
                     forked=False, spare=1),
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
    outputs=("blocks", "k_pool", "v_pool", "ref_counts"),  # ref_counts[b]: the allocator's count
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


# --- 01.gather_kv_torch: a ragged batch's gather, index arithmetic on the device --------------
#
# kvlab's torch gather computes its slots with NumPy on the host (§4). When the block tables
# already live on the device (a captured decode step, say), the index arithmetic must be tensor
# ops too. The learner gathers a ragged batch: each output row's sequence by repeat_interleave,
# its position by subtracting where its sequence starts, then slot_mapping's arithmetic and one
# index into a [num_slots, Hkv, D] view of each pool.

def gather_kv_torch_solution(k_pool, v_pool, block_tables, context_lens):
    """k_pool, v_pool: torch ``[num_blocks, block_size, Hkv, D]``; block_tables: int32
    ``[num_seqs, max_blocks]`` (-1 past a sequence's blocks); context_lens: int32 ``[num_seqs]``.
    Returns (k, v): the pools' dtype, ``[sum(context_lens), Hkv, D]``, sequence after sequence."""
    import torch

    block_size = k_pool.shape[1]
    num_seqs = context_lens.shape[0]
    lens = context_lens.long()
    # Each output row's sequence (repeat_interleave reads the total back once; a caller that
    # knows it passes output_size= and nothing waits).
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=lens.device), lens)
    first_row = torch.cumsum(lens, 0) - lens                # where each sequence's rows start
    positions = torch.arange(seq.shape[0], device=lens.device) - first_row[seq]  # 0, 1, ... each
    blocks = block_tables[seq, positions // block_size].long()
    slots = blocks * block_size + positions % block_size
    k_rows = k_pool.reshape(-1, *k_pool.shape[2:])          # one row per slot (a view)
    v_rows = v_pool.reshape(-1, *v_pool.shape[2:])
    return k_rows[slots], v_rows[slots]


def _gather_kv_reference(k_pool, v_pool, block_tables, context_lens):
    """:func:`kvlab.ref.paging.gather_kv` on a batch."""
    return ref.gather_kv(k_pool, v_pool, block_tables, context_lens)


def _run_gather_kv_torch(fn: Callable, case: Case) -> Any:
    """NumPy in for the reference; CPU tensors in for the learner's function, whose (k, v) must
    be two new tensors of the pools' dtype, its inputs left as they were (then compared as
    NumPy)."""
    import torch

    if fn is _gather_kv_reference:
        return fn(**copy_args(case.kwargs))
    args = torch_copies(case.kwargs)
    got = fn(**args)
    for name, tensor in args.items():
        if not np.array_equal(tensor.numpy(), case.kwargs[name]):
            raise WrongResult(f"your function changed {name}: a gather only reads its inputs "
                              f"(the pools and tables are the cache's: other steps still read "
                              f"them)")
    shape = " [sum(context_lens), Hkv, D]"
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise WrongResult(f"the result should be a pair (k, v) of torch tensors{shape}, got "
                          f"{type(got).__name__}" + (f" of {len(got)}" if isinstance(
                              got, (tuple, list)) else ""))
    for name, tensor in zip(("k", "v"), got):
        for pool in ("k_pool", "v_pool"):
            if (isinstance(tensor, torch.Tensor) and tensor.numel() and
                    tensor.untyped_storage().data_ptr() == args[pool].untyped_storage().data_ptr()):
                raise WrongResult(f"{name} is a view of {pool} (it shares the pool's memory): "
                                  f"return a copy, which the next write to the pool cannot "
                                  f"change (indexing with a tensor of slots copies)")
    dtype = str(case.kwargs["k_pool"].dtype)
    return tuple(tensor_result(tensor, dtype, name, shape)
                 for name, tensor in zip(("k", "v"), got))


def _source_slots(rows: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """For each row ``[Hkv, D]`` of ``rows``, the slot of ``pool`` holding the same bytes (the
    first one), or -1 where no slot does. The cases' pools hold random values, so a row's bytes
    name its slot."""
    slot_rows = pool.reshape(-1, pool.shape[2] * pool.shape[3]).view(np.uint8)
    wanted = rows.reshape(len(rows), -1).view(np.uint8)
    found = np.full(len(rows), -1)
    for row, data in enumerate(wanted):
        match = np.flatnonzero((slot_rows == data).all(axis=1))
        if match.size:
            found[row] = match[0]
    return found


def _gather_slips(table: np.ndarray, lens: np.ndarray,
                  pool_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The slots each usual slip reads, by the words that name it (a slip whose indices fall
    outside the table or the pool is left out: it raises instead)."""
    block_size, num_slots = pool_shape[1], pool_shape[0] * pool_shape[1]
    rows, positions = ref.gathered_positions(lens)
    # words: (each row's table row, its position, the block size used, block and offset swapped)
    tries = {
        "positions counted over the whole batch: each sequence's positions start again at 0 "
        "(the row minus where its sequence starts)": (rows, np.arange(lens.sum()), block_size,
                                                       False),
        "every sequence read through block_tables[0]: a row's sequence picks its table row": (
            np.zeros_like(rows), positions, block_size, False),
        "block and offset swapped (block_tables[s, p % block_size], offset p // block_size)": (
            rows, positions, block_size, True),
        "positions counted from 1: a sequence's first token is its position 0": (
            rows, positions + 1, block_size, False),
    }
    for axis, size in enumerate(pool_shape):
        if size not in (block_size, 0) and size not in [t[2] for t in tries.values()]:
            tries[f"block_size read from k_pool.shape[{axis}] = {size}: it is k_pool.shape[1] = "
                  f"{block_size}"] = (rows, positions, size, False)
    slips = {}
    for words, (seqs, pos, size, swapped) in tries.items():
        columns, offsets = (pos % size, pos // size) if swapped else (pos // size, pos % size)
        if len(columns) and columns.max() >= table.shape[1]:
            continue  # indexes past the table: it raises instead
        slots = table[seqs, columns].astype(np.int64) * size + offsets
        if len(slots) and (slots.min() < -num_slots or slots.max() >= num_slots):
            continue
        if len(slots) and slots.min() < 0:  # torch counts a negative index from the end
            words += "; and a -1 entry of the table (past a sequence's blocks) wrapped round to "
            words += "the pool's last block"
        slips[words] = slots % max(num_slots, 1)
    slips["positions used as slots (no block_tables lookup)"] = positions
    return slips


def _explain_gather_kv(fn: Callable, case: Case) -> None:
    """Which pool each of the learner's k and v came from, then, for the first that is wrong,
    row by row: the sequence and position it holds, the slot it should come from and the slot
    it came from (found by its bytes); then the slip that reads those slots."""
    kw = case.kwargs
    table, lens = kw["block_tables"], kw["context_lens"]
    pools = {"k": kw["k_pool"], "v": kw["v_pool"]}
    block_size = pools["k"].shape[1]
    try:
        got = dict(zip(("k", "v"), _run_gather_kv_torch(fn, case)))
    except IndexError:
        print(f"  An index ran past a tensor. block_tables is {list(table.shape)}: row s is "
              f"sequence s, column p // block_size holds the block of its position p (block_size "
              f"= k_pool.shape[1] = {block_size}); the pools hold {pools['k'].shape[0]} x "
              f"{block_size} = {pools['k'].shape[0] * block_size} slots, slot = block * "
              f"block_size + p % block_size; and p runs from 0 to context_len - 1.")
        return
    except Exception:
        return  # the verdict said what was wrong
    expected = ref.gathered_slots(table, lens, block_size)
    if any(rows.shape != (len(expected), *pools["k"].shape[2:]) for rows in got.values()):
        if any(rows.ndim == 4 for rows in got.values()):
            print("  One row per token, sequence after sequence, no padding: [sum(context_lens), "
                  "Hkv, D], not [num_seqs, max_len, Hkv, D].")
        return
    right = {name: np.array_equal(_source_slots(got[name], pools[name]), expected)
             for name in got}
    other = {"k": "v", "v": "k"}
    crossed = {name: np.array_equal(_source_slots(got[name], pools[other[name]]), expected)
               for name in got}
    if crossed["k"] and crossed["v"]:
        print("  Your k holds V and your v holds K: return them as (k, v).")
        return
    for name in ("k", "v"):
        if crossed[name]:
            first = f"Your {other[name]} is right; your" if right[other[name]] else "Your"
            print(f"  {first} {name} holds {other[name].upper()}: it came from "
                  f"{other[name]}_pool.")
            return
    name = "k" if not right["k"] else "v"
    yours = _source_slots(got[name], pools[name])
    rows, positions = ref.gathered_positions(lens)
    print(f"  row by row ({name}):")
    for row, (seq, pos, slot) in enumerate(zip(rows, positions, expected)):
        mark = "" if yours[row] == slot else (
            f"   <- yours: not a row of {name}_pool" if yours[row] < 0 else
            f"   <- yours: slot {yours[row]} (block {yours[row] // block_size}, offset "
            f"{yours[row] % block_size})")
        print(f"    {row}: sequence {seq}, position {pos} -> block_tables[{seq}, "
              f"{pos // block_size}] = {table[seq, pos // block_size]}, offset "
              f"{pos % block_size} -> slot {slot}{mark}")
    named = [words for words, slots in _gather_slips(table, lens, pools["k"].shape).items()
             if np.array_equal(slots, yours) and not np.array_equal(slots, expected)]
    if named:
        print("  Yours reads the slots of: " + "; or of ".join(named) + ".")


def _host_round_trips(fn: Callable) -> list[str]:
    """What in ``fn``'s source does host work per token or waits for the device: ``.item()``,
    ``.tolist()``, ``.numpy()``, ``.cpu()``, ``int()``/``float()`` of a tensor's element, or a
    Python loop (one over a literal tuple or list, a name bound to one, or a ``.shape`` is no
    such thing)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return []

    def shape(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "shape"

    literals = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and isinstance(node.value, (ast.Tuple, ast.List))
                for target in node.targets if isinstance(target, ast.Name)}

    def fixed(iterable: ast.AST) -> bool:  # a loop over a few things, not over tokens
        return (isinstance(iterable, (ast.Tuple, ast.List)) or shape(iterable)
                or (isinstance(iterable, ast.Name) and iterable.id in literals))

    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("item", "tolist", "numpy", "cpu")):
            found.append(f".{node.func.attr}()")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("int", "float") and node.args
              and isinstance(node.args[0], ast.Subscript) and not shape(node.args[0].value)):
            found.append(f"{node.func.id}() of an element")
        elif isinstance(node, ast.While) or (
                isinstance(node, (ast.For, ast.comprehension)) and not fixed(node.iter)):
            found.append("a Python loop")
    return sorted(set(found))


def _gather_pass_note(fn: Callable) -> str:
    """After a pass: whether the learner's gather does host work per token."""
    trips = _host_round_trips(fn)
    if not trips:
        return ""
    listed = ", ".join(trips[:-1]) + " and " + trips[-1] if len(trips) > 1 else trips[0]
    return (f"\n  It works; note that it uses {listed}: host work per token, and "
            f"on a GPU each read-back waits for the device. Try it as a few whole-tensor ops, "
            f"the same number whatever the batch: repeat_interleave, cumsum, arange and one "
            f"index per pool.")


def _gather_case(label: str, context_lens, block_size: int = 4, heads: int = 2,
                 head_dim: int = 4, dtype=np.float16, seed: int = 0,
                 random: bool = False) -> Case:
    """Pools of random values (so a row's bytes name its slot), the blocks each sequence needs
    dealt out shuffled (a slot is never its position), three spare blocks, and one -1 column past
    the longest sequence's blocks."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(context_lens, np.int32)
    needs = [-(-int(n) // block_size) for n in lens]
    num_blocks = sum(needs) + 3
    dealt = iter(rng.permutation(num_blocks))
    table = np.full((len(lens), max(needs, default=0) + 1), -1, np.int32)
    for seq, count in enumerate(needs):
        table[seq, :count] = [next(dealt) for _ in range(count)]
    shape = (num_blocks, block_size, heads, head_dim)
    k_pool, v_pool = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    return Case(label, dict(k_pool=k_pool, v_pool=v_pool, block_tables=table,
                            context_lens=lens), random=random)


def _gather_cases() -> list[Case]:
    cases = [
        _gather_case("one sequence of 6 tokens, a shuffled table", [6]),
        _gather_case("two sequences, 5 and 9 tokens: positions start at 0 in each", [5, 9]),
        _gather_case("three sequences, the middle one empty", [3, 0, 5], seed=1),
        _gather_case("block_size 1: every token a block of its own", [3, 2], block_size=1, seed=2),
        _gather_case("a float32 pool: k and v keep the pools' dtype", [4, 7], dtype=np.float32,
                     seed=3),
        _gather_case("empty sequences, one of them last (a padded batch)", [4, 0, 6, 0], seed=4),
        _gather_case("nothing to gather: every sequence empty", [0, 0], seed=5),
    ]
    rng = np.random.default_rng(12)
    for i in range(4):
        lens = rng.integers(0, 21, size=int(rng.integers(1, 5)))
        cases.append(_gather_case(f"random {i}", lens, block_size=int(rng.choice([2, 4, 8, 16])),
                                  heads=int(rng.integers(1, 4)), head_dim=8, seed=30 + i,
                                  random=True))
    return cases


register(Exercise(
    name="01.gather_kv_torch", notebook=NOTEBOOK, section="4 As MPS ops (PyTorch)",
    signature="gather_kv_torch(k_pool, v_pool, block_tables, context_lens) -> (k, v)  "
              "# torch [sum(context_lens), Hkv, D], the pools' dtype",
    hint="give every output row its sequence (torch.repeat_interleave over context_lens) and its "
         "position (the row minus the first row of its sequence: a cumsum); then the slot as in "
         "slot_mapping, and one index into a [num_slots, Hkv, D] view of each pool.",
    solution=gather_kv_torch_solution,
    reference=_gather_kv_reference,
    cases=_gather_cases,
    run=_run_gather_kv_torch,
    explain=_explain_gather_kv,
    rtol=0.0, atol=0.0,  # a gather moves bytes: bit for bit
    outputs=("k", "v"),
    pass_note=_gather_pass_note,
))
