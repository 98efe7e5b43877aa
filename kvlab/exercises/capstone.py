"""Exercises of notebook 06 (capstone): what a paged cache holds, what a prefix cache reuses, and
where a batch step's new tokens go.

Each is checked against kvlab's own bookkeeping, not a formula: the bytes against a
:class:`~kvlab.cache.KvCacheManager` that really took the blocks, the prefix hit against the
:class:`~kvlab.paging.BlockAllocator`'s hash-chain lookup that ``serve`` uses, the slots against
the step plan (``paging.plan_step``) every layer of ``forward_batch`` writes through.
"""
from __future__ import annotations

import numpy as np

from kvlab.cache import KvCacheManager, KvPool
from kvlab.dtypes import get_dtype
from kvlab.exercises.core import Case, Exercise, print_slot_walk, register
from kvlab.paging import BlockAllocator
from kvlab.checks import new_token_positions
from kvlab.ref.paging import plan_step

NOTEBOOK = "06_capstone"


# --- 06.paged_bytes ----------------------------------------------------------------------------

def paged_bytes_solution(num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                         block_size: int, kv_dtype: str) -> int:
    """Bytes of K and V (codes and scales) a paged cache holds for one sequence of
    ``num_tokens`` tokens: whole blocks, in every layer."""
    blocks = -(-num_tokens // block_size)                    # ceil: the last block is partly full
    dtype = get_dtype(kv_dtype)
    per_slot = num_kv_heads * dtype.bytes_per_vector(head_dim)  # codes (+ one fp16 scale per head)
    return 2 * num_layers * blocks * block_size * per_slot     # K and V


def paged_bytes_reference(num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                          block_size: int, kv_dtype: str) -> int:
    """Measured: a manager over a pool takes the blocks for the tokens; count what it owns."""
    num_blocks = -(-num_tokens // block_size) + 1
    pool = KvPool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=kv_dtype)
    manager = KvCacheManager(pool, max_blocks_per_seq=num_blocks, enable_prefix_caching=False)
    manager.add_sequence("s", list(range(num_tokens)))
    manager.reserve("s", list(range(num_tokens)))
    owned = int((manager.block_table("s") >= 0).sum())
    return owned * pool.nbytes // num_blocks


def _paged_bytes_cases() -> list[Case]:
    def case(label, num_tokens, num_layers=2, num_kv_heads=2, head_dim=32, block_size=8,
             kv_dtype="fp16", random=False):
        return Case(label, dict(num_tokens=num_tokens, num_layers=num_layers,
                                num_kv_heads=num_kv_heads, head_dim=head_dim,
                                block_size=block_size, kv_dtype=kv_dtype), random=random)

    cases = [
        case("the table above: the tiny model, 54 tokens in fp16 (7 blocks, the last not full)",
             54),
        case("48 tokens: 6 full blocks", 48),
        case("50 tokens: a partly full last block", 50),
        case("50 tokens in int8: 1-byte codes plus an fp16 scale per head", 50, kv_dtype="int8"),
        case("one token, block_size 16", 1, block_size=16),
        case("fp8_e4m3, one layer, 8 kv heads of 128", 33, num_layers=1, num_kv_heads=8,
             head_dim=128, kv_dtype="fp8_e4m3"),
    ]
    rng = np.random.default_rng(6)
    for i in range(4):
        cases.append(case(f"random {i}", int(rng.integers(1, 200)), int(rng.integers(1, 5)),
                          int(rng.choice([1, 2, 4, 8])), int(rng.choice([16, 64, 128])),
                          int(rng.choice([1, 4, 16, 32])), str(rng.choice(["fp16", "int8"])),
                          random=True))
    return cases


register(Exercise(
    name="06.paged_bytes", notebook=NOTEBOOK, section="3.1 The memory each one used",
    signature="paged_bytes(num_tokens, num_layers, num_kv_heads, head_dim, block_size, kv_dtype)"
              " -> int",
    hint="a sequence holds whole blocks (round the tokens up); each slot stores every kv head's "
         "codes, plus one fp16 scale per head for int8/fp8; K and V; every layer. "
         "kvlab.dtypes.get_dtype(kv_dtype).bytes_per_vector(head_dim) gives one head's bytes.",
    solution=paged_bytes_solution,
    reference=paged_bytes_reference,
    cases=_paged_bytes_cases,
))


# --- 06.prefix_hit -----------------------------------------------------------------------------

def prefix_hit_solution(prompt: list[int], earlier_prompts: list[list[int]],
                        block_size: int) -> int:
    """How many of ``prompt``'s tokens can reuse K/V that earlier prompts left in full blocks."""
    best = 0
    for earlier in earlier_prompts:
        # Only full blocks of the earlier prompt were registered in the prefix cache.
        full = len(earlier) // block_size * block_size
        # The new prompt's last token must be computed (its logits pick the first new token),
        # so at most len(prompt) - 1 tokens can come from the cache.
        limit = min(full, len(prompt) - 1) // block_size * block_size
        same = 0
        while same < limit and prompt[same] == earlier[same]:
            same += 1
        best = max(best, same // block_size * block_size)  # whole blocks only
    return best


def prefix_hit_reference(prompt: list[int], earlier_prompts: list[list[int]],
                         block_size: int) -> int:
    """kvlab's allocator: register the earlier prompts' full blocks (hash chain), then look the
    new prompt up the way ``KvCacheManager.add_sequence`` does (all of it but the last token)."""
    allocator = BlockAllocator(num_blocks=64, block_size=block_size)
    for earlier in earlier_prompts:
        parent = None
        for start in range(0, len(earlier) // block_size * block_size, block_size):
            (block,) = allocator.allocate(1)
            parent = allocator.register_full_block(block, earlier[start:start + block_size], parent)
    return len(allocator.lookup_prefix(prompt[:-1])) * block_size


def _prefix_hit_cases() -> list[Case]:
    def case(label, prompt, earlier, block_size=4, random=False):
        return Case(label, dict(prompt=list(prompt), earlier_prompts=[list(e) for e in earlier],
                                block_size=block_size), random=random)

    a = list(range(10, 22))                                   # 12 tokens: 3 full blocks of 4
    cases = [
        case("nothing cached yet", a, []),
        case("shares 6 tokens: one whole block, not 6", a[:6] + [99] * 6, [a]),
        case("the very same prompt: the last token is computed anyway", a, [a]),
        case("a longer earlier prompt", a[:9], [a + [1, 2, 3]]),
        case("the same block, after a different first block", [0, 0, 0, 0] + a[4:8] + [5],
             [a]),
        case("two earlier prompts: the longer match wins", a[:8] + [7, 7], [a[:5], a[:11]]),
        case("an earlier prompt shorter than one block", a, [a[:3]]),
    ]
    rng = np.random.default_rng(16)
    for i in range(4):
        base = list(rng.integers(0, 4, size=20))
        earlier = [base[:int(rng.integers(2, 20))] for _ in range(2)]
        prompt = base[:int(rng.integers(2, 20))] + list(rng.integers(0, 4, size=4))
        cases.append(case(f"random {i}", prompt, earlier, int(rng.choice([2, 4])), random=True))
    return cases


register(Exercise(
    name="06.prefix_hit", notebook=NOTEBOOK, section="5.1 Step through it yourself",
    signature="prefix_hit(prompt, earlier_prompts, block_size) -> int  # tokens reused",
    hint="only full blocks are cached, a block is reused only if every block before it matched "
         "too, and the prompt's last token is always computed (its logits give the first output).",
    solution=prefix_hit_solution,
    reference=prefix_hit_reference,
    cases=_prefix_hit_cases,
))


# --- 06.step_slots -----------------------------------------------------------------------------

def step_slots_solution(block_tables: np.ndarray, query_start: np.ndarray,
                        context_lens: np.ndarray, block_size: int) -> np.ndarray:
    """The slot of each new token of a batch step, int32 ``[T]`` in qkv's row order."""
    slots = []
    for s in range(len(context_lens)):
        new = query_start[s + 1] - query_start[s]       # this sequence's rows in this step
        # context_lens is the length *after* the step: its new tokens are the last ones
        for pos in range(context_lens[s] - new, context_lens[s]):
            block = block_tables[s, pos // block_size]
            slots.append(block * block_size + pos % block_size)
    return np.array(slots, np.int32)


def step_slots_reference(block_tables: np.ndarray, query_start: np.ndarray,
                         context_lens: np.ndarray, block_size: int) -> np.ndarray:
    """The step plan's: plan_step checks the step (one token per slot among them), and its host
    copies give each token's sequence and position."""
    num_blocks = int(block_tables.max(initial=0)) + 1
    pool = np.zeros((num_blocks, block_size, 1, 1), np.float16)
    plan = plan_step(pool, block_tables, query_start, context_lens)
    seq, pos = new_token_positions(plan.host_query_start, plan.host_pos_offsets)
    return (plan.host_block_tables[seq, pos // block_size] * block_size
            + pos % block_size).astype(np.int32)


def _step_slots_cases() -> list[Case]:
    def case(label, tables, starts, lens, block_size=4, random=False):
        return Case(label, dict(block_tables=np.array(tables, np.int32),
                                query_start=np.array(starts, np.int32),
                                context_lens=np.array(lens, np.int32), block_size=block_size),
                    random=random)

    tables = [[7, 2, 9, -1], [4, -1, -1, -1], [0, 5, -1, -1]]
    cases = [
        case("a decode step: one new token each", tables, [0, 1, 2, 3], [12, 1, 6]),
        case("a prompt of 3 arriving beside two decodes", tables, [0, 1, 4, 5], [11, 3, 6]),
        case("a sequence sitting this step out (0 rows)", tables, [0, 3, 3, 4], [12, 4, 5]),
        case("new tokens crossing into a new block", tables, [0, 3, 3, 5], [10, 1, 6]),
        case("blocks of one token", [[3, 1, 0], [2, -1, -1]], [0, 2, 3], [3, 1], block_size=1),
    ]
    rng = np.random.default_rng(26)
    for i in range(4):
        num_seqs, block_size = int(rng.integers(1, 5)), int(rng.choice([2, 4, 8]))
        lens = rng.integers(1, 4 * block_size, size=num_seqs)
        new = np.minimum(lens, rng.integers(0, 5, size=num_seqs))
        need = -(-lens // block_size)
        ids = rng.permutation(int(need.sum()) + 3).astype(np.int32)
        table = np.full((num_seqs, int(need.max()) + 1), -1, np.int32)
        used = 0
        for s in range(num_seqs):
            table[s, :need[s]] = ids[used:used + need[s]]
            used += need[s]
        cases.append(case(f"random {i}", table, np.concatenate([[0], np.cumsum(new)]), lens,
                          block_size, random=True))
    return cases


def _explain_step_slots(fn, case: Case) -> None:
    """Token by token: its sequence and position, the block and offset they give, the slot."""
    kwargs = case.kwargs
    starts = kwargs["query_start"].astype(np.int64)
    seq, pos = new_token_positions(starts, kwargs["context_lens"] - np.diff(starts))
    size, tables = kwargs["block_size"], kwargs["block_tables"]
    print_slot_walk(fn, case, [f"sequence {s}, position {p} -> block_tables[{s}, {p // size}] = "
                               f"{tables[s, p // size]}, offset {p % size}"
                               for s, p in zip(seq, pos)], step_slots_reference(**kwargs))


register(Exercise(
    name="06.step_slots", notebook=NOTEBOOK, section="5.1 Step through it yourself",
    signature="step_slots(block_tables, query_start, context_lens, block_size) -> slots  "
              "# int32 [T]",
    hint="sequence s brings query_start[s+1] - query_start[s] tokens, and context_lens[s] counts "
         "them already: they are its last positions. A position's slot is its block's id "
         "(block_tables[s, pos // block_size]) times block_size plus pos % block_size.",
    solution=step_slots_solution,
    reference=step_slots_reference,
    cases=_step_slots_cases,
    explain=_explain_step_slots,
))
