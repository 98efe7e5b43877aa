"""Decode attention v1, "tiles": the first, readable design, and the pieces every version shares.

The public ops and the version table live in :mod:`kvlab.kernels.cuda.attention` (read that
first); this module holds v1's kernels, the merge of split-K partials that every version ends
with, and the device functions all versions use to find a query row's sequence and positions.

- ``_attend`` (device, inlined): one thread block's job — one query row, one kv head, a tile of
  up to ``GROUP_TILE`` query heads of its GQA group — over a range of positions, as an **online
  softmax** (running max ``m``, sum ``l``, unnormalized output ``acc``, all in shared memory).
  Each K and V element of the range is read **once for the whole tile of query heads**: that is
  what GQA saves in memory traffic, and a decode step is all memory traffic.
- ``paged_attention_split_kernel``: flash-decoding. Grid ``(rows, kv heads x head tiles, S)``;
  block (…, j) attends partition j only (``kvlab.ref.attention.split_bounds``) and writes its
  ``lse = m + log l`` and normalized output; an empty partition writes ``lse = -inf``, zeros.
  With S = 1 the one partition is everything the row sees.
- ``merge_splits_kernel``: grid ``(rows, num_q_heads)``, threads over head_dim: the log-sum-exp
  merge of the S partials (every version ends with it; for S = 1 it copies, exactly).

v1 is simulator-safe as written (shared-memory reductions and barriers only): each thread reads
one key's whole row (a warp's load touches 32 rows: uncoalesced), and one thread per query head
computes the softmax statistics of a tile while the others wait — simple, and slow on a GPU.
Pools may be float16/float32, or int8 / uint8 (fp8_e4m3) codes dequantized on read with their
fp16 scales (a float pool gets a dummy scale array and ``kind`` says which).
"""
from __future__ import annotations

import math

import numpy as np

from kvlab.kernels.cuda import MODE, cuda, kernel
from kvlab.kernels.cuda.quant import _fp8_e4m3_decode

# Threads per block. The simulator runs each thread as a Python thread and every barrier waits
# for all of them, so it gets a small block (>= GROUP_TILE: thread g < GROUP_TILE owns head g's
# softmax statistics).
THREADS_PER_BLOCK = 128 if MODE == "gpu" else 8
GROUP_TILE = 8      # query heads per thread block: K/V are read once for up to 8 heads of a group
MAX_HEAD_DIM = 256  # shared memory is sized at compile time
KIND_FLOAT, KIND_INT8, KIND_FP8 = 0, 1, 2
NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)
TWO_POW_112 = np.float32(2.0 ** 112)  # float32 exponent bias 127 - fp16's 15
LOG2E = np.float32(math.log2(math.e))  # v7 keeps scores in base 2: e^x = 2^(x log2 e)
LN2 = np.float32(math.log(2.0))

_POOLS = ("float16", "float32", "int8", "uint8")


def _signatures(template: str) -> tuple[str, ...]:
    """One signature per pool dtype; q is always float32 (an fp16 q is widened first by
    ``widen_kernel``), which halves the number of compiled variants."""
    return tuple(template.format(q="float32", pool=p) for p in _POOLS)


# --- device functions --------------------------------------------------------------------------

@cuda.jit(device=True, inline="always")
def _load(pool, scales, kind, block, offset, head, dim):
    """One K or V element as float32: widened (fp16/fp32), or dequantized ``code * scale``."""
    if kind == KIND_FP8:
        x = _fp8_e4m3_decode(pool[block, offset, head, dim])
    else:
        x = np.float32(pool[block, offset, head, dim])
    if kind != KIND_FLOAT:
        x *= np.float32(scales[block, offset, head])
    return x


@cuda.jit(device=True, inline="always")
def _row_setup(query_start, context_lens, row, causal, window):
    """``(seq, start, stop)``: the sequence of query row ``row`` and the positions it sees."""
    seq = 0
    while query_start[seq + 1] <= row:  # a walk: num_seqs is small
        seq += 1
    num_tokens = query_start[seq + 1] - query_start[seq]
    length = context_lens[seq]
    position = length - num_tokens + (row - query_start[seq])
    stop = position + 1 if causal else length
    start = 0
    if window > 0:
        start = max(0, position - window + 1)
    return seq, start, stop


@cuda.jit(device=True, inline="always")
def _head_tile(block_y, num_q_heads, num_kv_heads, tile):
    """``(kv_head, head0, ng)``: grid column ``block_y`` takes query heads ``head0 .. head0+ng-1``
    (at most ``tile``), all of kv head ``kv_head``'s GQA group."""
    group = num_q_heads // num_kv_heads
    tiles = (group + tile - 1) // tile
    kv_head = block_y // tiles
    head0 = kv_head * group + (block_y % tiles) * tile
    return kv_head, head0, min(tile, kv_head * group + group - head0)


@cuda.jit(device=True, inline="always")
def _partition(start, stop, length, split, num_splits):
    """``[start, stop)`` clipped to partition ``split`` of ``0 .. length-1``
    (:func:`kvlab.ref.attention.split_bounds`); empty when the partition is."""
    size = (length + num_splits - 1) // num_splits
    return max(start, min(split * size, length)), min(stop, min((split + 1) * size, length))


#   One thread block, a tile of ng <= GROUP_TILE query heads sharing kv head `kv_head`,
#   B = THREADS_PER_BLOCK threads, positions [start, stop) in tiles of B keys:
#
#   1. scores    thread t takes key j = tile + t: reads K[j] once, dots it with all ng queries
#                (q in shared memory)                     -> s[g, t]        barrier
#   2. softmax   thread g < ng: tile max, m' = max(m, tile max), c = exp(m - m'),
#                s[g, :] <- exp(s[g, :] - m'), l <- l*c + sum            -> m, l, c  barrier
#   3. values    thread t owns dims d = t, t+B, ...: acc[g, d] <- acc[g, d]*c[g]
#                + sum_j s[g, j] * V[j, d]   (each V element read once for all ng heads)  barrier
#
#   At the end acc / l is the attention output and m + log(l) the partition's log-sum-exp.

@cuda.jit(device=True, inline="always")
def _attend(q, k_pool, v_pool, k_scales, v_scales, kind, block_tables, seq, row, kv_head,
            head0, ng, start, stop, scale, q_sh, s_sh, acc_sh, m_sh, l_sh, c_sh):
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    head_dim = q.shape[2]
    block_size = k_pool.shape[1]
    for e in range(tid, ng * head_dim, nthreads):
        g = e // head_dim
        d = e % head_dim
        q_sh[g, d] = np.float32(q[row, head0 + g, d])
        acc_sh[g, d] = ZERO
    if tid < ng:
        m_sh[tid] = NEG_INF
        l_sh[tid] = ZERO
    cuda.syncthreads()
    dot = cuda.local.array(GROUP_TILE, np.float32)
    for tile in range(start, stop, nthreads):
        n = min(nthreads, stop - tile)
        # 1. scores: one key per thread, K read once for the ng heads
        if tid < n:
            j = tile + tid
            block = block_tables[seq, j // block_size]
            offset = j % block_size
            for g in range(ng):
                dot[g] = ZERO
            for d in range(head_dim):
                kd = _load(k_pool, k_scales, kind, block, offset, kv_head, d)
                for g in range(ng):
                    dot[g] += q_sh[g, d] * kd
            for g in range(ng):
                s_sh[g, tid] = dot[g] * scale
        cuda.syncthreads()
        # 2. online softmax statistics, one thread per head
        if tid < ng:
            m_old = m_sh[tid]
            m_new = m_old
            for jj in range(n):
                m_new = max(m_new, s_sh[tid, jj])
            correction = math.exp(m_old - m_new)  # exp(-inf) = 0 on the first tile
            total = ZERO
            for jj in range(n):
                p = math.exp(s_sh[tid, jj] - m_new)
                s_sh[tid, jj] = p
                total += p
            l_sh[tid] = l_sh[tid] * correction + total
            m_sh[tid] = m_new
            c_sh[tid] = correction
        cuda.syncthreads()
        # 3. values: one dim per thread, V read once for the ng heads
        for d in range(tid, head_dim, nthreads):
            for g in range(ng):
                dot[g] = acc_sh[g, d] * c_sh[g]
            for jj in range(n):
                j = tile + jj
                vd = _load(v_pool, v_scales, kind, block_tables[seq, j // block_size],
                           j % block_size, kv_head, d)
                for g in range(ng):
                    dot[g] += s_sh[g, jj] * vd
            for g in range(ng):
                acc_sh[g, d] = dot[g]
        cuda.syncthreads()  # before the next tile overwrites s_sh


# --- kernels -------------------------------------------------------------------------------------

_ATTN_ARGS = ("{q}[:, :, ::1], {pool}[:, :, :, ::1], {pool}[:, :, :, ::1], float16[:, :, ::1], "
              "float16[:, :, ::1], int32, int32[:, ::1], int32[::1], int32[::1], float32, int32, "
              "int32")


@kernel(*_signatures("void(" + _ATTN_ARGS + ", float32[:, :, :, ::1], float32[:, :, ::1])"))
def paged_attention_split_kernel(q, k_pool, v_pool, k_scales, v_scales, kind, block_tables,
                                 context_lens, query_start, scale, window, causal, part_out,
                                 part_lse):
    row = cuda.blockIdx.x
    split = cuda.blockIdx.z
    num_splits = cuda.gridDim.z
    kv_head, head0, ng = _head_tile(cuda.blockIdx.y, q.shape[1], k_pool.shape[2], GROUP_TILE)
    q_sh = cuda.shared.array((GROUP_TILE, MAX_HEAD_DIM), np.float32)
    acc_sh = cuda.shared.array((GROUP_TILE, MAX_HEAD_DIM), np.float32)
    s_sh = cuda.shared.array((GROUP_TILE, THREADS_PER_BLOCK), np.float32)
    m_sh = cuda.shared.array(GROUP_TILE, np.float32)
    l_sh = cuda.shared.array(GROUP_TILE, np.float32)
    c_sh = cuda.shared.array(GROUP_TILE, np.float32)
    seq, start, stop = _row_setup(query_start, context_lens, row, causal, window)
    start, stop = _partition(start, stop, context_lens[seq], split, num_splits)
    _attend(q, k_pool, v_pool, k_scales, v_scales, kind, block_tables, seq, row, kv_head, head0,
            ng, start, stop, scale, q_sh, s_sh, acc_sh, m_sh, l_sh, c_sh)
    head_dim = q.shape[2]
    for e in range(cuda.threadIdx.x, ng * head_dim, cuda.blockDim.x):
        g = e // head_dim
        d = e % head_dim
        total = l_sh[g]
        part_out[row, head0 + g, split, d] = acc_sh[g, d] / total if total > ZERO else ZERO
        if d == 0:
            part_lse[row, head0 + g, split] = m_sh[g] + math.log(total) if total > ZERO else NEG_INF


#   merge: block (row, head), thread t owns dims t, t+B, ...; every thread reads the S lse values
#   itself (S is small), so no barrier:  out = sum_j exp(lse_j - max) o_j / sum_j exp(lse_j - max)

@kernel("void(float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1])")
def merge_splits_kernel(part_out, part_lse, out):
    row = cuda.blockIdx.x
    head = cuda.blockIdx.y
    num_splits = part_lse.shape[2]
    top = NEG_INF
    for j in range(num_splits):
        top = max(top, part_lse[row, head, j])
    total = ZERO
    for j in range(num_splits):
        total += math.exp(part_lse[row, head, j] - top)
    for d in range(cuda.threadIdx.x, out.shape[2], cuda.blockDim.x):
        acc = ZERO
        for j in range(num_splits):
            acc += math.exp(part_lse[row, head, j] - top) * part_out[row, head, j, d]
        out[row, head, d] = acc / total


@kernel("void(float16[:, :, ::1], float32[:, :, ::1])")
def widen_kernel(x, out):
    """fp16 q -> float32, one thread per (token, head); threads of the grid stride over rows."""
    num_heads = x.shape[1]
    for r in range(cuda.grid(1), x.shape[0] * num_heads, cuda.gridsize(1)):
        for d in range(x.shape[2]):
            out[r // num_heads, r % num_heads, d] = np.float32(x[r // num_heads, r % num_heads, d])
