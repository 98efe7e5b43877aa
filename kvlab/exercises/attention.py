"""Exercises of notebook 05 (decode attention): the online-softmax update, the log-sum-exp merge
of split-K partials, which positions a query may see, a decode kernel as a puzzle, and a batch's
decode step as whole-tensor torch ops.

Each is checked against :mod:`kvlab.ref.attention`. The online update is run the way a kernel runs
it, tile after tile, and the state after every tile is compared with the same quantities computed
in one go over all the keys seen so far. The kernel puzzle runs in Numba's CUDA simulator under
the access tracer, so a wrong index shows up as a wrong picture.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from kvlab.backends import cuda_mode
from kvlab.exercises.core import (Case, Exercise, copy_args, draw_accesses, launch_both,
                                  read_only, register, run_torch)
from kvlab.ref import attention as ref
from kvlab.trace import launch_traced

cuda_mode()  # decide GPU or simulator before numba is imported (kvlab.backends owns that)
from numba import cuda  # noqa: E402

NOTEBOOK = "05_attention"


# --- 05.online_softmax_update ------------------------------------------------------------------

def online_update_solution(m: float, l: float, acc: np.ndarray, scores: np.ndarray,
                           values: np.ndarray) -> tuple[float, float, np.ndarray]:
    """One tile of keys into the running state. m: the largest score so far (-inf before the
    first tile); l: sum of exp(score - m) so far; acc: float32 ``[D]``, sum of exp(score - m) *
    value so far. scores: float32 ``[n]`` (already scaled); values: float32 ``[n, D]``.
    Returns the new ``(m, l, acc)``."""
    m_new = max(m, float(scores.max()))
    correction = np.exp(m - m_new)          # what came before was measured against the old max
    p = np.exp(scores - m_new)
    return m_new, l * correction + p.sum(), acc * correction + p @ values


def tiles(scores: np.ndarray, tile: int) -> list[slice]:
    """The key tiles a kernel walks: ``tile`` keys each, the last one shorter."""
    return [slice(start, start + tile) for start in range(0, len(scores), tile)]


def _states_by_definition(scores: np.ndarray, values: np.ndarray, tile: int) -> tuple:
    """After each tile, ``m, l, acc`` over all keys seen so far, computed in one go: the max,
    the max-subtracted sum, and ``l`` times kvlab's attention output over those keys; every
    tile's three in one flat tuple (named by :data:`ONLINE_OUTPUTS`)."""
    states = []
    for part in tiles(scores, tile):
        seen = slice(0, part.stop)
        s, v = scores[seen].astype(np.float32), values[seen].astype(np.float32)
        m = float(s.max())
        l = float(np.exp(s - m).sum())
        # attend_max_subtracted(q, k, ...) with k = s as one-dimensional keys, q = 1, scale = 1
        out = ref.attend_max_subtracted(np.ones(1, np.float32), s[:, None], v, 1.0)
        states += [m, l, out * np.float32(l)]
    return tuple(states)


def _run_online(fn: Callable, case: Case) -> Any:
    """The state after every tile, ``m, l, acc`` one tile after the other in a flat tuple: ``fn``
    applied tile by tile from the empty state, or (for the reference) the same quantities by
    definition."""
    scores, values, tile = (case.kwargs[k] for k in ("scores", "values", "tile"))
    if fn is _states_by_definition:
        return _states_by_definition(scores, values, tile)
    m, l, acc = -np.inf, 0.0, np.zeros(values.shape[1], np.float32)
    states = []
    for part in tiles(scores, tile):
        m, l, acc = fn(m, l, acc.copy(), scores[part].copy(), values[part].copy())
        states += [m, l, acc]
    return tuple(states)


MAX_TILES = 64  # more than any case walks
# a verdict names what differs: "acc after tile 2[0] is ..."
ONLINE_OUTPUTS = tuple(f"{name} after tile {i}" for i in range(1, MAX_TILES + 1)
                       for name in ("m", "l", "acc"))


def _online_cases() -> list[Case]:
    def case(label, scores, tile, dims=3, seed=0, random=False):
        rng = np.random.default_rng(seed)
        scores = np.asarray(scores, np.float32)
        return Case(label, dict(scores=scores, tile=tile,
                                values=rng.standard_normal((len(scores), dims)).astype(np.float32)),
                    random=random)

    cases = [
        case("one tile holds every key", [0.5, -1.0, 2.0], tile=4),
        case("the max rises in later tiles", [0.0, 1.0, 5.0, 2.0, 9.0, 3.0], tile=2, seed=1),
        case("the first tile holds the max", [9.0, 1.0, 2.0, 3.0, -4.0], tile=2, seed=2),
        case("scores near 200 (exp(200) overflows float32)", [200.0, 150.0, 210.0, 190.0],
             tile=2, seed=3),
        case("a tile of one key", [1.0, 3.0, 2.0], tile=1, seed=4),
    ]
    rng = np.random.default_rng(9)
    for i in range(4):
        n = int(rng.integers(5, 40))
        cases.append(case(f"random {i}", 3 * rng.standard_normal(n), int(rng.choice([1, 3, 4, 8])),
                          dims=int(rng.choice([2, 4, 8])), seed=30 + i, random=True))
    return cases


register(Exercise(
    name="05.online_softmax_update", notebook=NOTEBOOK, section="2.1 Softmax three ways",
    signature="online_update(m, l, acc, scores, values) -> (m, l, acc)",
    hint="new max m' = max(m, max(scores)); multiply the old l and acc by exp(m - m'); then add "
         "p = exp(scores - m'): l += sum(p), acc += p @ values.",
    solution=online_update_solution,
    reference=_states_by_definition,
    cases=_online_cases,
    run=_run_online,
    outputs=ONLINE_OUTPUTS,
    rtol=1e-5, atol=1e-5,
))


# --- 05.merge_partials -------------------------------------------------------------------------

def merge_solution(lse: np.ndarray, out: np.ndarray) -> np.ndarray:
    """lse float32 ``[S]`` (log-sum-exp of each partition's scores; -inf: empty), out float32
    ``[S, D]`` (each partition's own normalized output) -> the merged output, float32 ``[D]``."""
    weights = np.exp(lse - lse.max())       # exp(lse_j) / exp(max): no overflow; empty -> 0
    return (weights @ out) / weights.sum()


def _merge_cases() -> list[Case]:
    def case(label, lse, out, random=False):
        return Case(label, dict(lse=np.asarray(lse, np.float32),
                                out=np.asarray(out, np.float32).reshape(len(lse), -1)),
                    random=random)

    cases = [
        case("lse (ln 3, ln 1), outputs 2 and 6", np.log([3.0, 1.0]), [2.0, 6.0]),
        case("one partition: the merge changes nothing", [0.7], [1.0, -2.0, 3.0]),
        case("an empty partition (lse = -inf) weighs nothing", [1.0, -np.inf, 0.0],
             [[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]]),
        case("large lse (1000, 998): exp overflows float32", [1000.0, 998.0],
             [[1.0, 0.0], [0.0, 1.0]]),
        case("lse (0, -200) far apart: a shift by anything but the max overflows", [0.0, -200.0],
             [[1.0, 2.0], [3.0, 4.0]]),
        case("the first partition empty (lse -inf first)", [-np.inf, 1.0, 0.5],
             [[0.0, 0.0], [1.0, -1.0], [2.0, 0.0]]),
    ]
    rng = np.random.default_rng(11)
    for i in range(4):
        splits = int(rng.integers(2, 8))
        lse = 5 * rng.standard_normal(splits)
        lse[rng.random(splits) < 0.2] = -np.inf
        lse[rng.integers(splits)] = rng.uniform(-3, 3)  # at least one partition is not empty
        out = np.where(np.isfinite(lse)[:, None],
                       rng.standard_normal((splits, int(rng.choice([2, 4, 8])))), 0.0)
        cases.append(case(f"random {i}", lse, out, random=True))
    return cases


register(Exercise(
    name="05.merge_partials", notebook=NOTEBOOK, section="2.2 Split-K",
    signature="merge(lse, out) -> merged  # lse [S], out [S, D] -> [D]",
    hint="partition j weighs exp(lse_j) / sum_i exp(lse_i); subtract max(lse) inside the exp "
         "first (it cancels) so nothing overflows.",
    solution=merge_solution,
    reference=ref.merge_partials,
    cases=_merge_cases,
    run=read_only("lse", "out"),
    # float32 lse near 1000 has an ulp of 6e-5, and e^(lse_j - LSE) inherits it: a right float32
    # answer by the log-sum-exp form is off by up to ~3e-5 relative on the (1000, 998) case
    rtol=1e-4,
))


# --- 05.visible_range --------------------------------------------------------------------------

def visible_range_solution(context_len: int, num_tokens: int, token: int,
                           sliding_window: int) -> tuple[int, int]:
    """``(start, stop)``: the positions ``start <= j < stop`` that token ``token`` of this step's
    ``num_tokens`` tokens may see (causal), in a cache of ``context_len`` positions (the length
    *after* the step). sliding_window W > 0: only the W most recent positions, its own included."""
    position = context_len - num_tokens + token    # the step's tokens are the last ones written
    stop = position + 1                            # causal: itself and everything before
    start = max(0, position + 1 - sliding_window) if sliding_window > 0 else 0
    return start, stop


def visible_range_reference(context_len, num_tokens, token, sliding_window):
    """``kvlab.ref.attention.visible_range``, causal."""
    return ref.visible_range(context_len, num_tokens, token, True, sliding_window)


def _visible_cases() -> list[Case]:
    def case(label, context_len, num_tokens, token, sliding_window=0, random=False):
        return Case(label, dict(context_len=context_len, num_tokens=num_tokens, token=token,
                                sliding_window=sliding_window), random=random)

    cases = [
        case("a decode step: 1 token, context_len 22 with it (21 cached before)", 22, 1, 0),
        case("the first of a 3-token chunk, context_len 13 with them (10 before)", 13, 3, 0),
        case("the last of a 3-token chunk, context_len 13 with them (10 before)", 13, 3, 2),
        case("a window of 8 at position 21", 22, 1, 0, sliding_window=8),
        case("a window of 1: only itself", 10, 2, 0, sliding_window=1),
        case("a window longer than the sequence", 5, 1, 0, sliding_window=100),
    ]
    rng = np.random.default_rng(12)
    for i in range(6):
        tokens = int(rng.integers(1, 6))
        length = tokens + int(rng.integers(0, 40))
        cases.append(case(f"random {i}", length, tokens, int(rng.integers(0, tokens)),
                          int(rng.choice([0, 1, 4, 16])), random=True))
    return cases


register(Exercise(
    name="05.visible_range", notebook=NOTEBOOK, section="2.3 A batch",
    signature="visible_range(context_len, num_tokens, token, sliding_window) -> (start, stop)",
    hint="token i of the step sits at p = context_len - num_tokens + i and sees positions up to "
         "p itself; a window W keeps the W positions ending at p (0: no window).",
    solution=visible_range_solution,
    reference=visible_range_reference,
    cases=_visible_cases,
))


# --- 05.decode_kernel: a kernel puzzle -----------------------------------------------------------
#
# The learner writes ``decode_kernel(q, k_pool, v_pool, block_table, context_len, scale, out)``:
# one decode step of one sequence, launched with one thread block per query head and MAX_KEYS
# threads, thread t owning key t. It runs in the simulator under the access tracer; a failure draws
# which thread of query head 0's block read each element of k_pool, beside the solution's.

MAX_KEYS = 16  # threads per block, one per key: sequences of up to 16 positions


@cuda.jit
def decode_kernel_solution(q, k_pool, v_pool, block_table, context_len, scale, out):
    head = cuda.blockIdx.x                           # one block per query head
    t = cuda.threadIdx.x                             # thread t owns key t
    kv_head = head // (q.shape[0] // k_pool.shape[2])   # GQA: the K/V head this query head reads
    block_size = k_pool.shape[1]
    head_dim = q.shape[1]
    p = cuda.shared.array(MAX_KEYS, np.float32)      # the scores, then the softmax weights
    if t < context_len:
        block = block_table[t // block_size]         # key t's place in the paged pool
        offset = t % block_size
        s = np.float32(0)
        for d in range(head_dim):
            s += q[head, d] * k_pool[block, offset, kv_head, d]
        p[t] = s * scale
    cuda.syncthreads()                               # every score is in p
    if t == 0:                                       # 16 keys: one thread does the softmax
        m = p[0]
        for j in range(1, context_len):
            m = max(m, p[j])
        total = np.float32(0)
        for j in range(context_len):
            p[j] = math.exp(p[j] - m)                # exponents <= 0: nothing overflows
            total += p[j]
        for j in range(context_len):
            p[j] /= total
    cuda.syncthreads()                               # the weights are ready for every thread
    for d in range(t, head_dim, cuda.blockDim.x):    # now thread t owns dims t, t + 16, ...
        acc = np.float32(0)
        for j in range(context_len):
            acc += p[j] * v_pool[block_table[j // block_size], j % block_size, kv_head, d]
        out[head, d] = acc


def decode_reference(q, k_pool, v_pool, block_table, context_len, scale, out):
    """``kvlab.ref.attention.paged_decode_attention`` for one sequence's one decode row."""
    return ref.paged_decode_attention(q[None], k_pool, v_pool, block_table[None],
                                      np.array([context_len], np.int32),
                                      np.array([0, 1], np.int32), scale=scale)[0]


def _launch_decode(kernel: Callable, case: Case):
    """Launch ``kernel`` traced: grid = query heads, block = MAX_KEYS threads.
    Returns ``(out after the launch, the AccessLog)``."""
    after, log = launch_traced(kernel, case.kwargs["q"].shape[0], MAX_KEYS,
                               **copy_args(case.kwargs))
    return after["out"], log


def _run_decode(fn: Callable, case: Case) -> Any:
    if fn is decode_reference:
        return decode_reference(**copy_args(case.kwargs))
    return _launch_decode(fn, case)[0]


def _first_block_reads(log) -> np.ndarray:
    """int ``k_pool``'s shape: the thread of query head 0's block that read each element (-1:
    none, -2: two threads)."""
    owners = np.full(log.shapes["k_pool"], -1, dtype=np.int64)
    for block, thread, element in log.accesses("k_pool", "read"):
        if block[0] == 0:
            owners[element] = thread[0] if owners[element] in (-1, thread[0]) else -2
    return owners


def _explain_decode(fn: Callable, case: Case) -> None:
    """Draw which thread of head 0's block read each element of k_pool: yours, the solution's."""
    runs = launch_both(fn, decode_kernel_solution, lambda kernel: _launch_decode(kernel, case))
    if all(log is not None for _, log in runs):
        yours, reference = (_first_block_reads(log) for _, log in runs)
        draw_accesses(yours, reference, "query head 0's reads of k_pool")


def _decode_cases() -> list[Case]:
    def case(label, table, context_len, hq=2, hkv=2, d=8, block_size=4, num_blocks=5, q_gain=1.0,
             seed=0, random=False):
        rng = np.random.default_rng(seed)
        return Case(label, dict(
            q=(q_gain * rng.standard_normal((hq, d))).astype(np.float32),
            k_pool=rng.standard_normal((num_blocks, block_size, hkv, d)).astype(np.float32),
            v_pool=rng.standard_normal((num_blocks, block_size, hkv, d)).astype(np.float32),
            block_table=np.asarray(table, np.int32), context_len=context_len,
            scale=np.float32(1 / np.sqrt(d)), out=np.zeros((hq, d), np.float32)), random=random)

    return [
        case("5 keys in two blocks of a shuffled table", [3, 1, 4], 5),
        case("GQA: 4 query heads share 2 K/V heads", [2, 0], 7, hq=4, hkv=2, seed=1),
        case("one key: its weight is 1", [4], 1, seed=2),
        case("16 keys, every thread busy; 1 K/V head", [1, 4, 0, 2], 16, hkv=1, seed=3),
        case("large scores (q x 200): exp overflows without the max", [0, 2], 6, q_gain=200.0,
             seed=4),
        case("random", list(np.random.default_rng(5).permutation(5)[:3]), 11, hq=4, hkv=1,
             d=4, seed=6, random=True),
    ]


register(Exercise(
    name="05.decode_kernel", notebook=NOTEBOOK, section="3 As a Numba CUDA kernel",
    signature="@cuda.jit\ndef decode_kernel(q, k_pool, v_pool, block_table, context_len, scale, "
              "out): ...  # grid = num_q_heads, block = MAX_KEYS threads",
    hint="head = blockIdx.x reads kv head head // (Hq // Hkv); thread t scores key t (its block "
         "from the table) into shared memory; barrier; one thread turns scores into weights "
         "(subtract the max); barrier; threads stride over dims: out = sum_j p_j V_j.",
    solution=decode_kernel_solution,
    reference=decode_reference,
    cases=_decode_cases,
    run=_run_decode,
    explain=_explain_decode,
    kernel=True,
    trace=_launch_decode,
    rtol=1e-5, atol=1e-5,
))


# --- 05.paged_decode_torch: the batch at once, in torch -----------------------------------------
#
# The learner writes one decode step of a whole batch as whole-tensor torch ops: no thread mapping
# and no Python loop over sequences. Every sequence is padded to the longest context and the
# positions past its own length are masked, the way kvlab's torch op works (without its tiles).

def paged_decode_torch_solution(q, k_pool, v_pool, block_tables, context_lens, scale):
    """float32 ``[S, Hq, D]``: one decode row per sequence. q: float32 ``[S, Hq, D]``; pools:
    float16 ``[num_blocks, block_size, Hkv, D]``; block_tables: int32 ``[S, max_blocks]`` (-1
    past a sequence's blocks); context_lens: int32 ``[S]``; scale: float. All torch tensors."""
    import torch

    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = num_q_heads // num_kv_heads
    j = torch.arange(int(context_lens.max()), device=q.device)     # every position, padded
    visible = j < context_lens[:, None].long()                     # [S, L]
    slots = block_tables[:, j // block_size].long() * block_size + j % block_size
    slots = torch.where(visible, slots, 0)                         # never a -1 (padding) entry
    k = k_pool.view(-1, num_kv_heads, head_dim)[slots].float()     # [S, L, Hkv, D]
    v = v_pool.view(-1, num_kv_heads, head_dim)[slots].float()
    v = torch.where(visible[:, :, None, None], v, 0.0)             # 0 x a stale NaN is NaN
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)           # query head h reads h // group
    scores = torch.einsum("skgd,slkd->skgl", qg, k) * scale        # [S, Hkv, G, L]
    scores = torch.where(visible[:, None, None, :], scores, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.einsum("skgl,slkd->skgd", weights, v)
    return out.reshape(num_seqs, num_q_heads, head_dim)


def paged_decode_torch_reference(q, k_pool, v_pool, block_tables, context_lens, scale):
    """``kvlab.ref.attention.paged_decode_attention`` for a decode batch (one row a sequence)."""
    starts = np.arange(len(context_lens) + 1, dtype=np.int32)
    return ref.paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, starts,
                                      scale=scale)


def _run_paged_decode_torch(fn: Callable, case: Case) -> Any:
    """NumPy arrays in for the reference; torch tensors (CPU) in for the learner's function, and
    its result back as NumPy."""
    if fn is paged_decode_torch_reference:
        return fn(**copy_args(case.kwargs))
    return run_torch(fn, case.kwargs, "float32", "out", " [S, Hq, D]")[0]


def _explain_paged_decode_torch(fn: Callable, case: Case) -> None:
    """Sequence by sequence: what it may see, and how far the answer is off there."""
    kwargs = case.kwargs
    try:
        got = np.asarray(_run_paged_decode_torch(fn, case), dtype=np.float64)
    except Exception:
        return
    expected = _run_paged_decode_torch(paged_decode_torch_reference, case)
    if got.shape != expected.shape:
        return
    block_size = kwargs["k_pool"].shape[1]
    print("  sequence by sequence:")
    for seq, length in enumerate(kwargs["context_lens"]):
        blocks = kwargs["block_tables"][seq][:-(-int(length) // block_size)].tolist()
        diff = np.abs(got[seq] - expected[seq])
        verdict = ("NaN in yours" if np.isnan(got[seq]).any()
                   else f"largest |yours - expected| = {np.nanmax(diff):.2g}")
        positions = f"{length} position{'s' if length != 1 else ''}"
        print(f"    {seq}: {positions} in blocks {blocks} -> {verdict}")
    if not np.isfinite(got).all():
        if np.isnan(kwargs["k_pool"]).any() or np.isnan(kwargs["v_pool"]).any():
            print("  A position a sequence does not see can still reach its result: a weight of 0 "
                  "times a stale NaN in V is NaN, and so is a NaN score plus -inf.")
        else:
            print("  No pool holds a NaN here: an exp overflowed? softmax must subtract each "
                  "row's max first (torch.softmax does).")


def _paged_decode_torch_cases() -> list[Case]:
    def case(label, tables, lens, hq=2, hkv=2, d=8, block_size=4, num_blocks=8, q_gain=1.0,
             seed=0, stale_nan=False, scale=None, random=False):
        rng = np.random.default_rng(seed)
        width = max(len(t) for t in tables)
        block_tables = np.full((len(tables), width), -1, np.int32)  # -1: no block there
        for seq, table in enumerate(tables):
            block_tables[seq, :len(table)] = table
        k_pool = rng.standard_normal((num_blocks, block_size, hkv, d)).astype(np.float16)
        v_pool = rng.standard_normal((num_blocks, block_size, hkv, d)).astype(np.float16)
        if stale_nan:  # what a freed sequence left: in the free blocks, and past each end
            stale = np.ones((num_blocks, block_size), bool)
            for table, length in zip(tables, lens):
                stale[table] = False
                stale[table[-1], length % block_size or block_size:] = True
            k_pool[stale] = v_pool[stale] = np.nan
        return Case(label, dict(
            q=(q_gain * rng.standard_normal((len(tables), hq, d))).astype(np.float32),
            k_pool=k_pool, v_pool=v_pool, block_tables=block_tables,
            context_lens=np.asarray(lens, np.int32),
            scale=float(1 / np.sqrt(d)) if scale is None else scale), random=random)

    cases = [
        case("one sequence, 6 positions in two blocks of a shuffled table", [[5, 2]], [6]),
        case("a ragged batch: 3, 9 and 1 positions", [[1], [4, 0, 6], [3]], [3, 9, 1], seed=1),
        case("GQA: 4 query heads share 2 K/V heads", [[2, 7]], [7], hq=4, seed=2),
        case("stale NaN in the free blocks and past each sequence's end", [[6, 1], [3]], [5, 2],
             seed=3, stale_nan=True),
        case("large scores (q x 100): softmax must subtract the max", [[0, 4]], [8], q_gain=100.0,
             seed=4),
        case("head_dim 16 and the model's own scale 0.3 (not 1 / sqrt(head_dim))", [[3]], [4],
             d=16, scale=0.3, seed=5),
    ]
    rng = np.random.default_rng(5)
    for i in range(3):  # sequences may share blocks (a shared prefix): reading is all they do
        lens = rng.integers(1, 13, size=3)
        tables = [rng.choice(8, size=-(-int(n) // 4), replace=False).tolist() for n in lens]
        cases.append(case(f"random {i}", tables, lens.tolist(), hq=4, hkv=int(rng.choice([1, 2])),
                          seed=10 + i, random=True))
    return cases


register(Exercise(
    name="05.paged_decode_torch", notebook=NOTEBOOK, section="4 As MPS ops",
    signature="paged_decode_torch(q, k_pool, v_pool, block_tables, context_lens, scale) -> out  "
              "# torch tensors; out float32 [S, Hq, D]",
    hint="positions j = arange(max length); slot = block_tables[:, j // block_size] * block_size "
         "+ j % block_size, and a mask j < context_len (send masked slots to 0); index the pools "
         "seen as [slots, Hkv, D]; query head h reads K/V head h // (Hq // Hkv); -inf where "
         "masked, softmax, and zero V's masked rows too.",
    solution=paged_decode_torch_solution,
    reference=paged_decode_torch_reference,
    cases=_paged_decode_torch_cases,
    run=_run_paged_decode_torch,
    explain=_explain_paged_decode_torch,
    rtol=1e-4, atol=1e-5,
))
