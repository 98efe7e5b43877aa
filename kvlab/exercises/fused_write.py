"""Exercises of notebook 04 (the fused write): split + QK-norm, the fused write's per-token loop,
the same write as one kernel and for a whole batch in torch, and the unfused path's bytes counted
by hand.

Each is checked against :mod:`kvlab.ref.fused_write`. The NumPy exercises take float32, so the
learner's NumPy and the reference agree to float32 rounding (the reference's fixed-order sum is
the notebook's subject, not theirs). The torch exercise takes fp16 rows and an fp16 cache, as an
engine does, and is checked bit for bit: where a value is rounded is part of the answer there.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kvlab.backends import cuda_mode
from kvlab.exercises.core import (FP16_KERNEL_ATOL, FP16_KERNEL_RTOL, ROUNDING_NOTE, Case,
                                  Exercise, copy_args, draw_accesses, launch_both, read_only,
                                  register, rounding_apart, run_torch)
from kvlab.ref import fused_write as ref
from kvlab.ref.rope import rope_tables
from kvlab.trace import index_runs, launch_traced

cuda_mode()  # decide GPU or simulator before numba is imported (kvlab.backends owns that)
from numba import cuda, float32  # noqa: E402

NOTEBOOK = "04_fused_write"


# --- 04.split_and_norm -------------------------------------------------------------------------

def split_and_norm_solution(qkv: np.ndarray, q_norm_w: np.ndarray, k_norm_w: np.ndarray,
                            num_q_heads: int, num_kv_heads: int, head_dim: int,
                            eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """qkv float32 ``[T, (Hq + 2*Hkv) * D]`` -> (q ``[T, Hq, D]`` and k ``[T, Hkv, D]``
    RMSNormed per head, v ``[T, Hkv, D]`` as it is), all float32."""
    heads = qkv.reshape(len(qkv), num_q_heads + 2 * num_kv_heads, head_dim)
    q = heads[:, :num_q_heads]
    k = heads[:, num_q_heads:num_q_heads + num_kv_heads]
    v = heads[:, num_q_heads + num_kv_heads:]

    def rms_norm(x, weight):  # over each head's own D values; one weight shared by all heads
        mean_square = (x * x).mean(axis=-1, keepdims=True)
        return weight * x / np.sqrt(mean_square + eps)

    return rms_norm(q, q_norm_w), rms_norm(k, k_norm_w), v


def split_and_norm_reference(qkv, q_norm_w, k_norm_w, num_q_heads, num_kv_heads, head_dim, eps):
    """kvlab's pieces: ``split_qkv`` then ``rms_norm_heads`` on Q and K."""
    q, k, v = ref.split_qkv(qkv, num_q_heads, num_kv_heads, head_dim)
    return ref.rms_norm_heads(q, q_norm_w, eps), ref.rms_norm_heads(k, k_norm_w, eps), v


def _split_and_norm_cases() -> list[Case]:
    def case(label, rows, hq, hkv, d, eps=1e-6, seed=0, random=False):
        rng = np.random.default_rng(seed)
        qkv = np.asarray(rows, np.float32).reshape(-1, (hq + 2 * hkv) * d)
        return Case(label, dict(
            qkv=qkv, q_norm_w=(1 + 0.5 * rng.standard_normal(d)).astype(np.float32),
            k_norm_w=(1 + 0.5 * rng.standard_normal(d)).astype(np.float32),
            num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=eps), random=random)

    # heads of very different sizes: a norm over the whole row instead of each head fails here
    one_token = [1, 2, 3, 4, 10, 20, 30, 40, 0.5, -1, 0.5, 1, 7, 7, 7, 7]
    with_zero_head = [3, -1, 2, 0.5, 0, 0, 0, 0, 1, 2, 3, 4]  # K head all zeros: eps keeps it finite
    cases = [
        case("1 token, 2 Q heads, 1 KV head of 4 dims (MQA)", one_token, 2, 1, 4),
        case("a K head of zeros (0/0 without eps)", with_zero_head, 1, 1, 4),
        case("a large eps (0.5): where does it go?", one_token, 2, 1, 4, eps=0.5),
        case("2 tokens, 4 Q heads, 2 KV heads (GQA)",
             np.random.default_rng(5).standard_normal(2 * 8 * 4) * 3, 4, 2, 4, seed=5),
    ]
    rng = np.random.default_rng(4)
    for i in range(4):
        hkv = int(rng.choice([1, 2]))
        hq = hkv * int(rng.choice([1, 2, 4]))
        d = int(rng.choice([4, 8, 16]))
        t = int(rng.integers(1, 5))
        rows = rng.standard_normal(t * (hq + 2 * hkv) * d) * rng.uniform(0.1, 10)
        cases.append(case(f"random {i}", rows, hq, hkv, d, seed=10 + i, random=True))
    return cases


register(Exercise(
    name="04.split_and_norm", notebook=NOTEBOOK, section="2 Build it in NumPy",
    signature="split_and_norm(qkv, q_norm_w, k_norm_w, num_q_heads, num_kv_heads, head_dim, eps)"
              " -> (q, k, v)",
    hint="reshape each row to [heads, head_dim]: Q heads first, then K, then V; RMSNorm each Q "
         "and K head over its own head_dim values: weight * x / sqrt(mean(x*x) + eps).",
    solution=split_and_norm_solution,
    reference=split_and_norm_reference,
    cases=_split_and_norm_cases,
    run=read_only("qkv"),
    outputs=("q", "k", "v"),
))


# --- 04.fused_write_loop -----------------------------------------------------------------------

def fused_write_solution(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, k_pool: np.ndarray,
                         v_pool: np.ndarray, block_table: np.ndarray, pos_offset: int,
                         num_q_heads: int, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """qk_mode 2 (rotate-half RoPE, no norm), float32: returns ``q_out [T, Hq, D]`` and writes
    each token's K and V heads into ``k_pool``, ``v_pool`` ``[num_blocks, block_size, Hkv, D]``."""
    block_size = k_pool.shape[1]
    half = head_dim // 2
    q_out = np.empty((len(qkv), num_q_heads, head_dim), qkv.dtype)
    for t, row in enumerate(qkv):
        heads = row.reshape(num_q_heads + 2 * num_kv_heads, head_dim)
        pos = pos_offset + t                               # the cache already holds pos_offset
        c, s = cos[pos], sin[pos]                          # [head_dim // 2], one angle per pair
        qk = heads[:num_q_heads + num_kv_heads]            # Q and K rotate; V never does
        a, b = qk[:, :half], qk[:, half:]                  # rotate-half pairs: (i, i + half)
        rotated = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
        block, offset = block_table[pos // block_size], pos % block_size
        q_out[t] = rotated[:num_q_heads]
        k_pool[block, offset] = rotated[num_q_heads:]
        v_pool[block, offset] = heads[num_q_heads + num_kv_heads:]
    return q_out


def fused_write_reference(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, num_q_heads,
                          num_kv_heads, head_dim):
    """``kvlab.ref.fused_write.paged_write`` with qk_mode 2 (no norm weights needed)."""
    return ref.paged_write(qkv, None, None, cos, sin, k_pool, v_pool, block_table, pos_offset,
                           num_q_heads, num_kv_heads, 1e-6, 2)


def _run_fused_write(fn: Callable, case: Case) -> Any:
    """``(q_out, k_pool, v_pool)`` after ``fn`` ran on copies of the case's arrays."""
    args = copy_args(case.kwargs)
    q_out = fn(**args)
    return q_out, args["k_pool"], args["v_pool"]


def _fused_write_cases() -> list[Case]:
    def case(label, tokens, pos_offset, table, hq=2, hkv=1, d=8, block_size=4, num_blocks=6,
             seed=0, random=False):
        rng = np.random.default_rng(seed)
        cos, sin = rope_tables(64, d, 10_000.0)
        return Case(label, dict(
            qkv=rng.standard_normal((tokens, (hq + 2 * hkv) * d)).astype(np.float32),
            cos=cos, sin=sin,
            k_pool=np.zeros((num_blocks, block_size, hkv, d), np.float32),
            v_pool=np.zeros((num_blocks, block_size, hkv, d), np.float32),
            block_table=np.asarray(table, np.int32), pos_offset=pos_offset, num_q_heads=hq,
            num_kv_heads=hkv, head_dim=d), random=random)

    cases = [
        case("1 token at position 0 (no turn yet)", 1, 0, [3, 1]),
        case("3 tokens after 2 cached, a shuffled table", 3, 2, [5, 0, 2], seed=1),
        case("5 tokens after 6 cached: crosses into the next block", 5, 6, [4, 2, 0, 1], seed=2),
        case("GQA: 4 Q heads, 2 KV heads, head_dim 4", 2, 9, [1, 3, 5], hq=4, hkv=2, d=4, seed=3),
    ]
    rng = np.random.default_rng(6)
    for i in range(3):
        hkv = int(rng.choice([1, 2]))
        block_size = int(rng.choice([2, 4, 8]))
        tokens, offset = int(rng.integers(1, 6)), int(rng.integers(0, 12))
        needed = -(-(offset + tokens) // block_size)
        table = rng.permutation(16)[:needed]
        cases.append(case(f"random {i}", tokens, offset, table, hq=hkv * int(rng.choice([1, 2])),
                          hkv=hkv, d=int(rng.choice([4, 8])), block_size=block_size,
                          num_blocks=16, seed=20 + i, random=True))
    return cases


register(Exercise(
    name="04.fused_write_loop", notebook=NOTEBOOK, section="2 Build it in NumPy",
    signature="fused_write(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, num_q_heads, "
              "num_kv_heads, head_dim) -> q_out",
    hint="for token t at position pos_offset + t: rotate its Q and K heads with cos[pos], "
         "sin[pos] (pairs i, i + head_dim/2); K and V go to block_table[pos // block_size], "
         "offset pos % block_size.",
    solution=fused_write_solution,
    reference=fused_write_reference,
    cases=_fused_write_cases,
    run=_run_fused_write,
    outputs=("q_out", "k_pool", "v_pool"),
))


# --- 04.fused_write_kernel: a kernel puzzle -----------------------------------------------------
#
# The loop above as one kernel, qk_mode 2, fp16 as a cache holds it: one block per token, one
# thread per (head, pair) of the token's packed row, Q, K and V heads alike. Each thread carries
# its pair from qkv to where it belongs (q_out, or the token's slot in a pool), turning it on the
# way unless it is V: nothing is written back and read again, which is what fusing buys.

@cuda.jit
def fused_write_kernel_solution(qkv, cos, sin, block_table, pos_offset, q_out, k_pool, v_pool):
    token = cuda.blockIdx.x                       # one block per token
    num_q_heads, head_dim = q_out.shape[1], q_out.shape[2]
    num_kv_heads = k_pool.shape[2]
    half = head_dim // 2
    head = cuda.threadIdx.x // half               # one thread per (head, pair) of the row:
    p = cuda.threadIdx.x % half                   # Q heads, then K heads, then V heads
    a = qkv[token, head * head_dim + p]           # rotate-half: the pair is dims (p, p + half)
    b = qkv[token, head * head_dim + p + half]
    pos = pos_offset + token                      # the cache held pos_offset tokens before
    block = block_table[pos // k_pool.shape[1]]   # the token's slot: through the block table
    offset = pos % k_pool.shape[1]
    if head >= num_q_heads + num_kv_heads:        # a V head: stored as it is, never turned
        v_head = head - num_q_heads - num_kv_heads
        v_pool[block, offset, v_head, p] = a
        v_pool[block, offset, v_head, p + half] = b
        return
    c = cos[pos, p]
    s = sin[pos, p]
    a = float32(a)                                # widen fp16 once: the arithmetic is float32
    b = float32(b)
    if head < num_q_heads:                        # the store rounds once, to fp16
        q_out[token, head, p] = a * c - b * s
        q_out[token, head, p + half] = b * c + a * s
    else:
        k_head = head - num_q_heads
        k_pool[block, offset, k_head, p] = a * c - b * s
        k_pool[block, offset, k_head, p + half] = b * c + a * s




def _fused_write_kernel_reference(qkv, cos, sin, block_table, pos_offset, q_out, k_pool, v_pool):
    """``(q_out, k_pool, v_pool)`` from ``kvlab.ref.fused_write.paged_write`` (qk_mode 2) on
    copies (``q_out`` is the kernel's output buffer: the reference makes its own)."""
    k_pool, v_pool = k_pool.copy(), v_pool.copy()
    q = ref.paged_write(qkv, None, None, cos, sin, k_pool, v_pool, block_table, pos_offset,
                        q_out.shape[1], k_pool.shape[2], 1e-6, 2)
    return q, k_pool, v_pool


def _launch_fused_write(kernel: Callable, case: Case):
    """Launch ``kernel`` on the case in the simulator, traced: grid = tokens, block = (Hq + 2 Hkv)
    × head_dim / 2 threads. Returns ``((q_out, k_pool, v_pool) after the launch, its AccessLog)``.
    """
    tokens, width = case.kwargs["qkv"].shape
    threads = width // 2
    after, log = launch_traced(kernel, tokens, threads, **copy_args(case.kwargs))
    return (after["q_out"], after["k_pool"], after["v_pool"]), log


def _run_fused_write_kernel(fn: Callable, case: Case) -> Any:
    """The three outputs after ``fn`` ran: the NumPy reference is called, a kernel is launched."""
    if fn is _fused_write_kernel_reference:
        return fn(**case.kwargs)
    return _launch_fused_write(fn, case)[0]


def _explain_fused_write_kernel(fn: Callable, case: Case) -> None:
    """Which rows of q_out and of the pools are wrong, then a picture of which thread wrote each
    element of the first output that is: yours beside the solution's."""
    runs = launch_both(fn, fused_write_kernel_solution,
                       lambda kernel: _launch_fused_write(kernel, case))
    got = runs[0][0]
    first_wrong = None
    if got is not None:
        expected = _run_fused_write_kernel(_fused_write_kernel_reference, case)
        for name, yours, want in zip(("q_out", "k_pool", "v_pool"), got, expected):
            wrong = ~np.isclose(yours.astype(np.float64), want.astype(np.float64),
                                rtol=FP16_KERNEL_RTOL, atol=FP16_KERNEL_ATOL, equal_nan=True)
            rows = wrong.reshape(-1, wrong.shape[-1])       # one row per (token or slot, head)
            bad = np.flatnonzero(rows.any(axis=1))
            if len(bad) == 0:
                continue
            first_wrong = first_wrong or name
            heads = want.shape[-2]
            where = [f"{'token' if name == 'q_out' else 'slot'} {r // heads}, head {r % heads}: "
                     f"dims {index_runs(np.flatnonzero(rows[r]))}" for r in bad[:4]]
            more = f"; ... {len(bad) - 4} more" if len(bad) > 4 else ""
            print(f"  {name} differs at " + "; ".join(where) + more)
    if first_wrong is None or any(log is None for _, log in runs):
        return
    yours, reference = (log.owner_map(first_wrong, "write") for _, log in runs)
    if np.array_equal(yours, reference):
        print(f"  Each element of {first_wrong} was written by the thread that should write it: "
              f"the indices are right, the values are not (V turned? the sign, or the table row? "
              f"arithmetic in fp16? Widen a and b to float32 and let the store round once).")
    draw_accesses(yours, reference, f"writes to {first_wrong}")


def _fused_write_kernel_case(label: str, tokens: int, pos_offset: int, table, hq: int = 2,
                             hkv: int = 1, d: int = 8, block_size: int = 4, num_blocks: int = 6,
                             theta: float = 10_000.0, seed: int = 0, random: bool = False) -> Case:
    """fp16 rows and pools (the pools full of stale values, as after real use), float32 tables,
    a zeroed fp16 ``q_out``."""
    rng = np.random.default_rng(seed)
    cos, sin = rope_tables(64, d, theta)
    pool_shape = (num_blocks, block_size, hkv, d)
    return Case(label, dict(
        qkv=(2 * rng.standard_normal((tokens, (hq + 2 * hkv) * d))).astype(np.float16),
        cos=cos, sin=sin, block_table=np.asarray(table, np.int32), pos_offset=pos_offset,
        q_out=np.zeros((tokens, hq, d), np.float16),
        k_pool=rng.standard_normal(pool_shape).astype(np.float16),
        v_pool=rng.standard_normal(pool_shape).astype(np.float16)), random=random)


def _fused_write_kernel_cases() -> list[Case]:
    """Few and tiny: the simulator runs every thread as Python (at most 3 tokens × 32 threads)."""
    cases = [
        _fused_write_kernel_case("1 token at position 0: nothing turns, every head to its place",
                                 1, 0, [3, 1]),
        _fused_write_kernel_case("3 tokens after 2 cached, a shuffled table: they cross into "
                                 "the next block", 3, 2, [5, 0, 2], seed=1),
        _fused_write_kernel_case("GQA: 4 Q heads, 2 K/V heads, head_dim 4", 2, 9, [1, 3, 5],
                                 hq=4, hkv=2, d=4, seed=2),
        _fused_write_kernel_case("head_dim 16 at positions 40 and 41, theta 1,000,000: read "
                                 "the tables, do not recompute the angles", 2, 40,
                                 [4, 2, 0, 1, 5, 3], d=16, block_size=8, theta=1e6, seed=3),
    ]
    rng = np.random.default_rng(12)
    for i in range(2):
        hkv = int(rng.choice([1, 2]))
        block_size = int(rng.choice([2, 4]))
        tokens, offset = int(rng.integers(1, 4)), int(rng.integers(0, 9))
        table = rng.permutation(8)[:-(-(offset + tokens) // block_size)]
        cases.append(_fused_write_kernel_case(
            f"random {i}", tokens, offset, table, hq=hkv * int(rng.choice([1, 2])), hkv=hkv,
            d=int(rng.choice([4, 8])), block_size=block_size, num_blocks=8, seed=40 + i,
            random=True))
    return cases


register(Exercise(
    name="04.fused_write_kernel", notebook=NOTEBOOK, section="3 As a Numba CUDA kernel",
    signature="@cuda.jit\ndef fused_write_kernel(qkv, cos, sin, block_table, pos_offset, q_out, "
              "k_pool, v_pool): ...  # grid = tokens, block = (Hq + 2*Hkv) * (head_dim // 2)",
    hint="token = blockIdx.x; thread t takes head t // (D/2) of the packed row (Q heads, then K, "
         "then V) and its pair p = t % (D/2), dims p and p + D/2; pos = pos_offset + token; the "
         "slot through block_table; turn Q and K pairs in float32 with cos[pos, p], sin[pos, p] "
         "(V is copied); Q to q_out, K and V to their slot.",
    solution=fused_write_kernel_solution,
    reference=_fused_write_kernel_reference,
    cases=_fused_write_kernel_cases,
    run=_run_fused_write_kernel,
    outputs=("q_out", "k_pool", "v_pool"),
    rtol=FP16_KERNEL_RTOL, atol=FP16_KERNEL_ATOL,  # one fp16 ulp: a GPU may fuse an FMA
    explain=_explain_fused_write_kernel,
    kernel=True,
    trace=_launch_fused_write,
))


# --- 04.fused_write_torch: a ragged batch, fp16, in torch --------------------------------------
#
# The loop above for a whole batch at once, and with the dtypes a cache really holds: fp16 rows in,
# fp16 pools. Whole-tensor torch ops: each token's sequence and position without a loop over
# tokens, Q and K turned together in float32 and rounded to fp16 once, K and V stored into the
# pools' slot rows in place.

def fused_write_torch_solution(qkv, cos, sin, k_pool, v_pool, block_tables, query_start,
                               pos_offsets, num_q_heads, num_kv_heads):
    """qk_mode 2 for many sequences at once; returns q_out float16 ``[T, Hq, D]``.

    qkv: float16 ``[T, (Hq + 2*Hkv) * D]``; cos, sin: float32 ``[max_positions, D // 2]``;
    k_pool, v_pool: float16 ``[num_blocks, block_size, Hkv, D]``, written in place;
    block_tables: int32 ``[S, max_blocks]``; query_start: int32 ``[S + 1]`` (sequence s owns rows
    ``query_start[s]:query_start[s + 1]``); pos_offsets: int32 ``[S]`` (each sequence's cache
    length before this step). All torch tensors.
    """
    import torch

    num_tokens, device = qkv.shape[0], qkv.device
    block_size, head_dim = k_pool.shape[1], k_pool.shape[3]
    half = head_dim // 2
    starts = query_start.long()
    seq = torch.repeat_interleave(torch.arange(len(starts) - 1, device=device),
                                  starts[1:] - starts[:-1])            # [T]: each row's sequence
    positions = pos_offsets.long()[seq] + torch.arange(num_tokens, device=device) - starts[seq]
    slots = (block_tables.long()[seq, positions // block_size] * block_size
             + positions % block_size)
    heads = qkv.view(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim)
    qk = heads[:, :num_q_heads + num_kv_heads].float()               # Q and K turn; V never does
    a, b = qk[..., :half], qk[..., half:]                            # rotate-half: (i, i + D/2)
    c, s = cos[positions][:, None], sin[positions][:, None]          # [T, 1, D/2]: every head
    rotated = torch.cat([a * c - b * s, b * c + a * s], dim=-1).to(qkv.dtype)  # rounded once
    k_pool.view(-1, num_kv_heads, head_dim)[slots] = rotated[:, num_q_heads:]  # views: in place
    v_pool.view(-1, num_kv_heads, head_dim)[slots] = heads[:, num_q_heads + num_kv_heads:]
    return rotated[:, :num_q_heads]


def fused_write_torch_reference(qkv, cos, sin, k_pool, v_pool, block_tables, query_start,
                                pos_offsets, num_q_heads, num_kv_heads):
    """``kvlab.ref.fused_write.paged_write_batched`` with qk_mode 2 (no norm weights needed)."""
    return ref.paged_write_batched(qkv, None, None, cos, sin, k_pool, v_pool, block_tables,
                                   query_start, pos_offsets, num_q_heads, num_kv_heads, 1e-6, 2)


def _run_fused_write_torch(fn: Callable, case: Case) -> Any:
    """``(q_out, k_pool, v_pool)`` as NumPy after ``fn`` ran: NumPy copies in for the reference,
    torch tensors (CPU, copies) in for the learner's function."""
    if fn is fused_write_torch_reference:
        return _run_fused_write(fn, case)
    q_out, args = run_torch(fn, case.kwargs, "float16", "q_out",
                            " [T, Hq, D]; return it alone: the pools are written in place")
    return q_out, args["k_pool"].numpy(), args["v_pool"].numpy()


def _explain_fused_write_torch(fn: Callable, case: Case) -> None:
    """Token by token: its sequence, position and slot, and which of its q, k, v rows are off
    (not written, or how far); then the slots that changed though no token writes there."""
    kw = case.kwargs
    try:
        got = _run_fused_write_torch(fn, case)
    except Exception:
        return
    expected = _run_fused_write_torch(fused_write_torch_reference, case)
    if any(np.shape(g) != e.shape for g, e in zip(got, expected)):
        return  # the verdict already said the shape is wrong
    got_q, got_k, got_v = (np.asarray(g, np.float16) for g in got)
    seq, positions = ref.token_positions(kw["query_start"], kw["pos_offsets"])
    block_size, num_kv_heads, head_dim = kw["k_pool"].shape[1:]
    old_k, old_v = (kw[name].reshape(-1, num_kv_heads, head_dim) for name in ("k_pool", "v_pool"))
    rows = [(g.reshape(-1, num_kv_heads, head_dim), e.reshape(-1, num_kv_heads, head_dim), old)
            for g, e, old in ((got_k, expected[1], old_k), (got_v, expected[2], old_v))]
    rounding_only = True

    def verdict(name, yours, want, old=None):
        nonlocal rounding_only
        if np.array_equal(yours, want, equal_nan=True):
            return f"{name} ✓"
        if old is not None and np.array_equal(yours, old, equal_nan=True):
            rounding_only = False
            return f"{name}: not written"
        rounding_only &= rounding_apart(yours, want)
        return f"{name}: {int((yours != want).sum())} of {want.size} values differ"

    blocks = kw["block_tables"][seq, positions // block_size]
    slots = blocks * block_size + positions % block_size
    lines, wrong_rows = [], set()
    for t, (s, pos, block, slot) in enumerate(zip(seq, positions, blocks, slots)):
        checks = [verdict("q", got_q[t], expected[0][t])]
        checks += [verdict(name, g[slot], e[slot], old[slot])
                   for name, (g, e, old) in zip("kv", rows)]
        wrong_rows |= {check[0] for check in checks if not check.endswith("✓")}
        lines.append((checks != ["q ✓", "k ✓", "v ✓"],
                      f"    {t}: sequence {s}, position {pos} -> block_tables[{s}]"
                      f"[{pos // block_size}] = {block}, offset {pos % block_size} -> slot {slot}: "
                      + ", ".join(checks)))
    if len(lines) > 8:  # a large case: the tokens that are off, the first 8 of them
        off = [line for bad, line in lines if bad]
        if off:
            print(f"  token by token ({len(off)} of {len(lines)} tokens off; the first of them):")
            print("\n".join(off[:8]))
    else:
        print("  token by token:")
        print("\n".join(line for _, line in lines))
    written = {int(slot) for slot in slots}
    stray = sorted({int(slot) for yours, _, old in rows for slot in range(len(old))
                    if not np.array_equal(yours[slot], old[slot], equal_nan=True)} - written)
    if stray:
        print(f"  Slots {stray} changed, though no token of this step writes there: the other "
              f"slots of a pool belong to other sequences (or are free) and must stay as they are.")
    elif wrong_rows == {"v"}:
        print("  Only V is off: V is stored as it comes in the row (never normed, never turned).")
    elif rounding_only and wrong_rows:
        print(ROUNDING_NOTE)


def _fused_write_torch_cases() -> list[Case]:
    def case(label, counts, pos_offsets, tables, hq=2, hkv=1, d=8, block_size=4, num_blocks=8,
             seed=0, stale_nan=False, random=False):
        rng = np.random.default_rng(seed)
        width = max(len(t) for t in tables)
        block_tables = np.full((len(tables), width), -1, np.int32)  # -1: no block there
        for s, table in enumerate(tables):
            block_tables[s, :len(table)] = table
        pool_shape = (num_blocks, block_size, hkv, d)
        k_pool, v_pool = (rng.standard_normal(pool_shape).astype(np.float16) for _ in "kv")
        if stale_nan:  # what a freed sequence left behind
            k_pool[::2] = v_pool[::2] = np.nan
        cos, sin = rope_tables(256, d, 10_000.0)
        tokens = int(sum(counts))
        return Case(label, dict(
            qkv=(3 * rng.standard_normal((tokens, (hq + 2 * hkv) * d))).astype(np.float16),
            cos=cos, sin=sin, k_pool=k_pool, v_pool=v_pool, block_tables=block_tables,
            query_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
            pos_offsets=np.asarray(pos_offsets, np.int32), num_q_heads=hq, num_kv_heads=hkv),
            random=random)

    cases = [
        case("one sequence: 3 tokens after 5 cached, a shuffled table", [3], [5], [[4, 1, 6]]),
        case("a decode token after 6 and a 4-token prefill: each counts its own positions",
             [1, 4], [6, 0], [[2, 5], [0, 7]], seed=1),
        case("three sequences, the middle one with no new token this step", [2, 0, 1],
             [3, 4, 9], [[6, 3], [1, 4], [5, 0, 2]], seed=2),
        case("GQA: 4 Q heads share 2 K/V heads, head_dim 16", [2, 3], [7, 2], [[3, 1, 6], [5, 0]],
             hq=4, hkv=2, d=16, seed=3),
        case("stale NaN in every other block: only this step's slots may change", [2, 2],
             [1, 10], [[1], [6, 7, 3]], seed=4, stale_nan=True),
    ]
    rng = np.random.default_rng(9)
    for i in range(3):
        block_size = int(rng.choice([2, 4, 8]))
        counts = rng.integers(0, 5, size=int(rng.integers(1, 4)))
        offsets = rng.integers(0, 3 * block_size, size=len(counts))
        blocks = rng.permutation(32)
        tables, used = [], 0
        for n, offset in zip(counts, offsets):  # each sequence its own blocks
            needed = max(-(-int(offset + n) // block_size), 1)
            tables.append(blocks[used:used + needed].tolist())
            used += needed
        hkv = int(rng.choice([1, 2]))
        cases.append(case(f"random {i}", counts.tolist(), offsets.tolist(), tables,
                          hq=hkv * int(rng.choice([1, 2, 4])), hkv=hkv,
                          d=int(rng.choice([4, 8, 16])), block_size=block_size, num_blocks=32,
                          seed=30 + i, random=True))
    # ~160,000 values: a different rounding (float64, an FMA) shows in a few dozen of them
    cases.append(case("random, large: 384 tokens of 3 sequences, 8 Q and 2 KV heads of 64",
                      [200, 120, 64], [7, 0, 30], [list(range(0, 13)), list(range(13, 21)),
                                                   list(range(21, 28))],
                      hq=8, hkv=2, d=64, block_size=16, num_blocks=28, seed=33, random=True))
    return cases


register(Exercise(
    name="04.fused_write_torch", notebook=NOTEBOOK, section="4 As MPS ops",
    signature="fused_write_torch(qkv, cos, sin, k_pool, v_pool, block_tables, query_start, "
              "pos_offsets, num_q_heads, num_kv_heads) -> q_out  # torch tensors, fp16",
    hint="each row's sequence: repeat_interleave(arange(S), counts); its position: "
         "pos_offsets[seq] + row - query_start[seq]; its slot through block_tables[seq]; turn Q "
         "and K (pairs i, i + D/2) as one float32 tensor, round to fp16 once; V is copied as it "
         "is; store into k_pool.view(-1, Hkv, D)[slots] (a view, so the pool itself changes).",
    solution=fused_write_torch_solution,
    reference=fused_write_torch_reference,
    cases=_fused_write_torch_cases,
    run=_run_fused_write_torch,
    outputs=("q_out", "k_pool", "v_pool"),
    explain=_explain_fused_write_torch,
    rtol=0.0, atol=0.0,
))


# --- 04.unfused_bytes --------------------------------------------------------------------------

def unfused_bytes_solution(num_q_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """``(read, written)``: bytes the unfused path moves for one token, qk_mode 2, fp16 qkv and
    cache, RoPE on all of head_dim (cos and sin rows: float32, head_dim / 2 each)."""
    q = num_q_heads * head_dim * 2               # fp16
    k = v = num_kv_heads * head_dim * 2
    angles = 2 * (head_dim // 2) * 4             # one cos row + one sin row, float32
    index = 4                                    # one int32: a table entry, or a slot
    rope_q = (q + angles, q)
    rope_k = (k + angles, k)
    slot_mapping = (index, index)
    cache_write = (k + v + index, k + v)
    steps = (rope_q, rope_k, slot_mapping, cache_write)
    return sum(r for r, _ in steps), sum(w for _, w in steps)


def unfused_bytes_reference(num_q_heads, num_kv_heads, head_dim):
    """``write_traffic`` for one token, qk_mode 2: its unfused totals."""
    total = ref.write_traffic(1, num_q_heads, num_kv_heads, head_dim, qk_mode=2)["unfused"]
    return total["read"], total["write"]


def _unfused_bytes_cases() -> list[Case]:
    cases = [Case(label, dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d))
             for label, hq, hkv, d in (("Qwen3-8B: 32 Q heads, 8 KV heads, head_dim 128", 32, 8, 128),
                                       ("MHA: 4 and 4 heads of 64", 4, 4, 64),
                                       ("MQA: 8 Q heads, 1 KV head of 256", 8, 1, 256))]
    rng = np.random.default_rng(8)
    for i in range(3):
        hkv = int(rng.choice([1, 2, 4, 8]))
        cases.append(Case(f"random {i}", dict(num_q_heads=hkv * int(rng.choice([1, 4, 8])),
                                              num_kv_heads=hkv,
                                              head_dim=int(rng.choice([64, 96, 128]))),
                          random=True))
    return cases


register(Exercise(
    name="04.unfused_bytes", notebook=NOTEBOOK, section="5 Measure",
    signature="unfused_bytes(num_q_heads, num_kv_heads, head_dim) -> (read, written)",
    hint="four kernels: rope_q and rope_k each read their heads + a cos and a sin row (float32) "
         "and write the heads; slot_mapping reads and writes one int32; cache_write reads K, V "
         "and the slot and writes K, V.",
    solution=unfused_bytes_solution,
    reference=unfused_bytes_reference,
    cases=_unfused_bytes_cases,
))
