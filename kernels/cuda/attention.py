"""Decode attention as Numba CUDA kernels: the ops of :mod:`kvlab.ref.attention`, on a GPU.

Seven versions, numbered the way llm.c's ``dev/cuda`` numbers its kernels: each one change, its
reason, its measured effect (notebook 05 times them side by side; ``VERSIONS`` names the change;
``DEFAULT_VERSION`` is what the public ops launch):

- **v1, tiles** (``_attend``): the first, readable design below. Simple, and slow on a GPU: each
  thread reads one key's whole row (a warp's load touches 32 rows: uncoalesced), and one thread per
  query head computes the softmax statistics of a tile while the others wait.
- **v2, warps** (``warp_attention_v2_kernel``): a group of lanes shares one key (each lane a slice
  of its dims, so a warp's loads are contiguous), the dot product is summed across the group with
  warp shuffles, and every group keeps its own online softmax and output in registers — no
  barrier inside the loop over keys. The groups' partial results are merged once at the end.
- **v3, batched loads**: v2's loads sit behind branches (the pool's kind, ``d < head_dim``), so
  each waits for the one before; v3 issues all of a key's loads first, branch-free.
- **v4, pipelined**: v3 with the next key's loads issued one step ahead.
- **v5, wide loads**: v3 reading the pools as 8-byte words (``pool.view(np.uint64)``, no copy):
  a lane holds whole words (runs of neighbouring dims), so its fp16 slice of a key is 2 loads
  instead of 8 (int8/fp8: 1 instead of 8), the lanes' loads interleaved so each instruction reads
  one contiguous run, and unpacks them with integer steps (:func:`_unpack`,
  :func:`_half_from_bits`: a Numba kernel cannot reinterpret 16 bits as a float16).
- **v6, occupancy**: v5 compiled with launch bounds of ``BLOCKS_PER_SM`` blocks per SM: v5 needs
  ~150 registers per thread, so an SM holds 3 blocks (12 warps); bounded, the compiler fits 128
  (spilling a few bytes) and an SM holds 4 — more warps to hide memory latency with.
- **v7, key chunks**: v5 taking ``KEYS_PER_STEP`` keys per stream per step: all their loads
  first, then their scores, then one rescale of the softmax state per chunk (v2-v6 rescale the
  whole accumulator at every key) and ``exp2`` on scores kept in base 2 (q scaled by log2 e):
  fewer instructions per key and more bytes in flight per warp. Launch bounds of
  ``CHUNK_BLOCKS_PER_SM``.

Measured on an H200 (2026-11-27, ``data/bench/h200_2026-11-27.json``, fp16, 16 splits, kernel
alone): v1 6.01 ms, v2 2.26, v3 1.72, v4 1.74, v5 1.81, v6 1.57, v7 1.60 — torch SDPA on
contiguous K/V 0.26 ms. Nsight Compute puts v6 at 17% of DRAM bandwidth and 59% "Compute (SM)
Throughput" with 23% occupancy: latency-bound, with instruction issue next (notebook 05, section 5b).

v1's kernels and the device function they share:

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

v1 is simulator-safe as written (shared-memory reductions and barriers only). v2-v7 sum over a
key's lanes with warp shuffles on a GPU; the simulator has none, so there they run one narrow
stand-in "warp" that sums through shared memory (``_sum_over_key_lanes``) — the shuffle path
itself is checked by the PTX compile and by ``pytest -m gpu``. Pools
may be float16/float32, or int8 / uint8 (fp8_e4m3) codes dequantized on read with their fp16
scales (a float pool gets a dummy scale array and ``kind`` says which). Launch wrappers have the
reference's names and parameters, check the arguments first (:mod:`kvlab.checks`) and take and
return Numba device arrays; the output is float32.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from kvlab.checks import check_decode_attention, check_paged_decode_attention
from kvlab.kernels.cuda import MODE, cuda, float_from_bits, kernel
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


# --- v2: warps ---------------------------------------------------------------------------------
#
#   One thread block = (query row, kv head, tile of <= HEAD_TILE query heads, split), WARPS warps.
#   Lanes are grouped L to a key (L = lanes_per_key: the smallest power of two with
#   L * DIM_SLOTS >= head_dim; 16 for head_dim 128), so a warp holds 32 / L keys at a time and
#   the block G = WARPS * 32 / L key "streams". Lane r of a group holds dims r, r + L, r + 2L, ...
#   of q (pre-scaled), of the key and value it reads and of its output accumulator:
#
#       key j, lanes r = 0..L-1:   K[j, r], K[j, r+L], ...   -> a warp's load is 32 neighbours
#       stream g walks keys  start + g, start + g + G, start + g + 2G, ...
#
#   Per key: partial dot over the lane's dims -> summed over the L lanes (shuffles) -> online
#   softmax update (m, l) and acc <- acc * c + p * V[j] — all in registers, no barrier. At the end
#   the G streams' (m, l, acc) are merged through shared memory exactly as split-K partitions are.

LANES = 32 if MODE == "gpu" else 8      # a warp. The simulator runs every thread as a Python thread,
WARPS = 4 if MODE == "gpu" else 1       # so it gets one narrow stand-in "warp" (shared-memory sums)
DIM_SLOTS = MAX_HEAD_DIM // LANES       # dims of a key one lane holds: 8 on a GPU
HEAD_TILE = 4                           # q heads per block: q and acc are HEAD_TILE x DIM_SLOTS
#                                         registers per lane (8 heads would double them and halve
#                                         the warps an SM can keep in flight)
WARP_THREADS = WARPS * LANES            # threads per block
KEYS_PER_STEP = 2                       # v7: keys per stream per step (a chunk) ...
CHUNK_BLOCKS_PER_SM = 3                 # ... and its launch bounds: ptxas 13 fits 2 keys' words
#                                         in 160 registers without spilling (4 keys: ~200)
BLOCKS_PER_SM = 4                       # v6's launch bounds: 4 x 128 threads x 128 registers
#                                         = an SM's 65,536
_RED = 1 if MODE == "gpu" else WARP_THREADS    # the simulator's scratch for its lane sums


def lanes_per_key(head_dim: int) -> int:
    """L: the smallest power of two with ``L * DIM_SLOTS >= head_dim`` (at most a warp)."""
    lanes = 1
    while lanes * DIM_SLOTS < head_dim:
        lanes *= 2
    return lanes


if MODE == "gpu":
    @cuda.jit(device=True, inline="always")
    def _sum_over_key_lanes(partial, lanes, scratch):
        """Sum each ``partial[g]`` over the ``lanes`` lanes sharing a key, in place: a butterfly of
        warp shuffles (every lane ends with the same sum, so all keep identical m and l)."""
        for g in range(HEAD_TILE):
            x = partial[g]
            offset = lanes // 2
            while offset > 0:
                x += cuda.shfl_xor_sync(0xFFFFFFFF, x, offset)
                offset //= 2
            partial[g] = x
else:
    @cuda.jit(device=True, inline="always")
    def _sum_over_key_lanes(partial, lanes, scratch):
        """Simulator stand-in (it has no shuffles): the sums through shared memory."""
        tid = cuda.threadIdx.x
        first = tid - tid % lanes
        for g in range(HEAD_TILE):
            scratch[g, tid] = partial[g]
        cuda.syncthreads()
        for g in range(HEAD_TILE):
            x = ZERO
            for r in range(lanes):
                x += scratch[g, first + r]
            partial[g] = x
        cuda.syncthreads()


@cuda.jit(device=True, inline="always")
def _key_dots(q_r, k_r, s, lanes, scratch):
    """``s[g]`` = q head g . the key, for the tile's heads: each lane's partial dot over the dims
    it holds, summed over the key's ``lanes`` lanes (every lane ends with the whole dot)."""
    for g in range(HEAD_TILE):
        s[g] = ZERO
        for i in range(DIM_SLOTS):
            s[g] += q_r[g, i] * k_r[i]
    _sum_over_key_lanes(s, lanes, scratch)


@cuda.jit(device=True, inline="always")
def _code(pool, kind, block, offset, head, dim):
    """v2's load: one K or V element as float32 before its scale (widened float, int8 code, or fp8
    decoded) — the branch on ``kind`` sits between each load and the next."""
    if kind == KIND_FP8:
        return _fp8_e4m3_decode(pool[block, offset, head, dim])
    return np.float32(pool[block, offset, head, dim])


@cuda.jit(device=True, inline="always")
def _load_key(k_pool, v_pool, k_scales, v_scales, kind, block_tables, seq, j, kv_head, lane,
              lanes, k_r, v_r):
    """v3+: a lane's slice of key ``j``'s K and V rows into ``k_r``, ``v_r`` as plain widening
    loads (an fp8 byte arrives as its integer value; :func:`_decode` turns it into the number),
    with no branch between them, so all 2 x DIM_SLOTS are in flight at once. Slots past head_dim
    re-read the last dim (in bounds; q is 0 there and those outputs are never written).
    Returns the key's ``(k_scale, v_scale)`` (1 for a float pool)."""
    block_size = k_pool.shape[1]
    last = k_pool.shape[3] - 1
    block = block_tables[seq, j // block_size]
    offset = j % block_size
    for i in range(DIM_SLOTS):
        d = min(lane + i * lanes, last)
        k_r[i] = np.float32(k_pool[block, offset, kv_head, d])
        v_r[i] = np.float32(v_pool[block, offset, kv_head, d])
    return _key_scales(k_scales, v_scales, kind, block, offset, kv_head)


@cuda.jit(device=True, inline="always")
def _key_scales(k_scales, v_scales, kind, block, offset, kv_head):
    """A key's ``(k_scale, v_scale)``: one fp16 each per (token, kv head); 1 for a float pool."""
    if kind == KIND_FLOAT:
        return ONE, ONE
    return np.float32(k_scales[block, offset, kv_head]), np.float32(v_scales[block, offset, kv_head])


@cuda.jit(device=True, inline="always")
def _load_words(k_words, v_words, k_scales, v_scales, kind, block_tables, seq, j, kv_head, lane,
                lanes, words, k_w, v_w, at):
    """v5: a lane's ``words`` 8-byte words of key ``j``'s K and V rows (the pools seen as uint64:
    4 fp16, 8 int8/fp8 codes or 2 float32 per word) — one load instruction where v3 issues 4 or
    8. Lane r takes words r, r + L, r + 2L, ...: the L lanes' t-th loads are one contiguous run of
    8L bytes (fully coalesced). Words past the row re-read its last word (in bounds;
    :func:`_unpack` zeroes what they hold). They land in ``k_w[at:at + words]`` (v7 keeps several
    keys' words)."""
    block_size = k_words.shape[1]
    last = k_words.shape[3] - 1
    block = block_tables[seq, j // block_size]
    offset = j % block_size
    for t in range(words):
        w = min(t * lanes + lane, last)
        k_w[at + t] = k_words[block, offset, kv_head, w]
        v_w[at + t] = v_words[block, offset, kv_head, w]
    return _key_scales(k_scales, v_scales, kind, block, offset, kv_head)


@cuda.jit(device=True, inline="always")
def _half_from_bits(h):
    """The float32 value of fp16 bits ``h`` (0..65535), with integer steps and one multiply (a
    Numba kernel cannot reinterpret 16 bits as a float16). Shift sign and exponent+mantissa into
    float32 position: a float32 whose exponent field is fp16's, i.e. the value x 2^-112 — exact for
    normal and subnormal halves alike — so multiply by 2^112. Exponent 31 (inf, NaN) is float32's
    255 instead."""
    bits = ((h & np.uint64(0x7FFF)) << np.uint64(13)) | ((h & np.uint64(0x8000)) << np.uint64(16))
    if (h & np.uint64(0x7C00)) == np.uint64(0x7C00):
        return float_from_bits(bits | np.uint64(0x7F800000))
    return float_from_bits(bits) * TWO_POW_112


@cuda.jit(device=True, inline="always")
def _wide_dim(i, lane, lanes, per_word):
    """v5: the dim that slot ``i`` of lane ``lane`` holds — element ``i % per_word`` of the
    lane's word ``i // per_word``, which is word ``(i // per_word) * L + lane`` of the row."""
    return ((i // per_word) * lanes + lane) * per_word + i % per_word


@cuda.jit(device=True, inline="always")
def _unpack(kind, elem_bytes, words, at, out, lane, lanes, head_dim):
    """v5: the ``DIM_SLOTS`` elements a lane's words ``words[at:]`` hold -> float32 in ``out``
    (before scales).
    ``elem_bytes`` is a compile-time constant, so only one of the decodes is compiled in;
    elements past ``head_dim`` become 0 (a select, not a branch around a load)."""
    per_word = 8 // elem_bytes
    mask = np.uint64((1 << (8 * elem_bytes)) - 1)
    for i in range(DIM_SLOTS):
        bits = (words[at + i // per_word] >> np.uint64(8 * elem_bytes * (i % per_word))) & mask
        if elem_bytes == 4:
            x = float_from_bits(bits)
        elif elem_bytes == 2:
            x = _half_from_bits(bits)
        elif kind == KIND_FP8:
            x = _fp8_e4m3_decode(np.uint8(bits))
        else:                                   # int8: the byte read as a signed one
            x = np.float32(np.int8(bits))
        out[i] = x if _wide_dim(i, lane, lanes, per_word) < head_dim else ZERO


@cuda.jit(device=True, inline="always")
def _decode(kind, k_r, v_r):
    """fp8 pools: the bytes :func:`_load_key` widened -> their E4M3 values (exact: 0..255 fit)."""
    if kind == KIND_FP8:
        for i in range(DIM_SLOTS):
            k_r[i] = _fp8_e4m3_decode(np.uint8(k_r[i]))
            v_r[i] = _fp8_e4m3_decode(np.uint8(v_r[i]))


def _make_warp_kernel(version: int, elem_bytes: int = 0, keys_per_step: int = 0,
                      blocks_per_sm: int | None = None) -> Any:
    """v2-v7 share one source; ``version`` (and v5's ``elem_bytes``) are compile-time constants
    in it, so each kernel holds only its own steps (a learner diffs the ``if version ...`` blocks):

    - v2: loads through :func:`_code`, each behind a branch (kind, and d < head_dim);
    - v3: branch-free loads, all issued before the arithmetic (:func:`_load_key`);
    - v4: v3 with the next key's loads issued one step ahead (software pipelining): a stream
      waits for memory once, at the start, instead of at every key.
    - v5: v3 with 8-byte loads: the pools arrive as uint64 words; a lane holds
      ``DIM_SLOTS * elem_bytes / 8`` words, every L-th of the row (v2-v4: every L-th dim), so its
      dims come in runs of one word (:func:`_load_words`, :func:`_unpack`, :func:`_wide_dim`).
      One kernel per element size.
    - v6: v5's source, compiled for ``BLOCKS_PER_SM`` blocks per SM (launch bounds).
    - v7: v5's loads and unpacking, ``keys_per_step`` keys per stream per step (default
      ``KEYS_PER_STEP``), one softmax rescale per step, exp2; compiled for ``blocks_per_sm``
      (None: ``CHUNK_BLOCKS_PER_SM``; 0: no launch bounds). scripts/sweep_v7.py builds
      other (keys, blocks) pairs to time them.
    """
    wide = version >= 5
    words = DIM_SLOTS * elem_bytes // 8 if wide else 1  # v5-v7: 8-byte words per lane
    per_word = 8 // elem_bytes if wide else 1            # ... and elements per word
    chunked = version == 7
    keys = (keys_per_step or KEYS_PER_STEP) if chunked else 1  # v7: keys per stream per step
    q_unit = LOG2E if chunked else ONE                   # v7: scores in base 2 (exp2)
    chunk_words = words * keys                           # (a local array's size is a constant)

    def warp_attention(q, k_pool, v_pool, k_scales, v_scales, kind, block_tables, context_lens,
                       query_start, scale, window, causal, lanes, part_out, part_lse):
        tid = cuda.threadIdx.x
        lane = tid % lanes                   # r: which slice of the dims
        stream = tid // lanes                # which key stream of the block
        num_streams = cuda.blockDim.x // lanes
        row = cuda.blockIdx.x
        split = cuda.blockIdx.z
        head_dim = q.shape[2]
        block_size = k_pool.shape[1]
        kv_head, head0, ng = _head_tile(cuda.blockIdx.y, q.shape[1], k_pool.shape[2], HEAD_TILE)
        seq, start, stop = _row_setup(query_start, context_lens, row, causal, window)
        start, stop = _partition(start, stop, context_lens[seq], split, cuda.gridDim.z)

        scratch = cuda.shared.array((HEAD_TILE, _RED), np.float32)
        m_sh = cuda.shared.array((HEAD_TILE, WARP_THREADS), np.float32)
        l_sh = cuda.shared.array((HEAD_TILE, WARP_THREADS), np.float32)
        acc_sh = cuda.shared.array((HEAD_TILE, WARP_THREADS, DIM_SLOTS), np.float32)
        q_r = cuda.local.array((HEAD_TILE, DIM_SLOTS), np.float32)  # registers: constant-size
        acc = cuda.local.array((HEAD_TILE, DIM_SLOTS), np.float32)  # loops index them, so the
        m = cuda.local.array(HEAD_TILE, np.float32)                 # compiler unrolls them
        l = cuda.local.array(HEAD_TILE, np.float32)
        s = cuda.local.array(HEAD_TILE, np.float32)
        k_r = cuda.local.array(DIM_SLOTS, np.float32)
        v_r = cuda.local.array(DIM_SLOTS, np.float32)
        k_next = cuda.local.array(DIM_SLOTS, np.float32)            # v4's loads in flight
        v_next = cuda.local.array(DIM_SLOTS, np.float32)
        k_w = cuda.local.array(chunk_words, np.uint64)              # v5's words (v7: a chunk's)
        v_w = cuda.local.array(chunk_words, np.uint64)
        prob = cuda.local.array((keys, HEAD_TILE), np.float32)      # v7: a chunk's scores, then
        k_sc = cuda.local.array(keys, np.float32)                   # its probabilities
        v_sc = cuda.local.array(keys, np.float32)
        for g in range(HEAD_TILE):
            m[g] = NEG_INF
            l[g] = ZERO
            for i in range(DIM_SLOTS):
                d = _wide_dim(i, lane, lanes, per_word) if wide else lane + i * lanes
                use = g < ng and d < head_dim    # heads past the tile and dims past head_dim: 0
                q_r[g, i] = q[row, head0 + g, d] * (scale * q_unit) if use else ZERO
                acc[g, i] = ZERO

        # v7: chunks of KEYS_PER_STEP keys per stream — all their loads first, then their scores,
        # then ONE rescale of (l, acc) per chunk (v2-v6 rescale at every key) and exp2 on scores
        # already in base 2 (q was scaled by log2 e): fewer instructions per key, more bytes in
        # flight per warp. Key c of a step is first + c * num_streams + stream, so a warp's loads
        # at each c are still neighbouring keys.
        if chunked:
            for first in range(start, stop, num_streams * keys):
                for c in range(keys):
                    j = first + c * num_streams + stream
                    k_sc[c], v_sc[c] = _load_words(k_pool, v_pool, k_scales, v_scales, kind,
                                                   block_tables, seq, j if j < stop else start,
                                                   kv_head, lane, lanes, words, k_w, v_w, c * words)
                for c in range(keys):
                    _unpack(kind, elem_bytes, k_w, c * words, k_r, lane, lanes, head_dim)
                    _key_dots(q_r, k_r, s, lanes, scratch)
                    valid = first + c * num_streams + stream < stop
                    for g in range(HEAD_TILE):
                        prob[c, g] = s[g] * k_sc[c] if valid else NEG_INF
                for g in range(HEAD_TILE):
                    m_new = m[g]
                    for c in range(keys):
                        m_new = max(m_new, prob[c, g])
                    if m_new > NEG_INF:                # else: no key of this stream yet, p stays 0
                        correction = math.exp2(m[g] - m_new)
                        m[g] = m_new
                        l[g] *= correction
                        for i in range(DIM_SLOTS):
                            acc[g, i] *= correction
                    for c in range(keys):
                        # masked slots (-inf) weigh 0; a NaN score stays NaN, as in v2-v6
                        x = prob[c, g]
                        prob[c, g] = math.exp2(x - m_new) if x != NEG_INF else ZERO
                        l[g] += prob[c, g]
                for c in range(keys):
                    _unpack(kind, elem_bytes, v_w, c * words, v_r, lane, lanes, head_dim)
                    for g in range(HEAD_TILE):
                        pv = prob[c, g] * v_sc[c]
                        for i in range(DIM_SLOTS):
                            acc[g, i] += pv * v_r[i]
        else:                                    # v2-v6: one key per stream per step
            scales_next = (ONE, ONE)
            if version == 4 and start < stop:        # v4: the first key's loads before the loop
                scales_next = _load_key(k_pool, v_pool, k_scales, v_scales, kind, block_tables, seq,
                                        min(start + stream, stop - 1), kv_head, lane, lanes, k_next,
                                        v_next)
            # Every thread runs the same number of steps (the shuffles need the whole warp); a stream
            # whose key is past the partition reads a real key and discards it.
            for first in range(start, stop, num_streams):
                j = first + stream
                valid = j < stop
                jj = j if valid else start
                k_scale = ONE
                v_scale = ONE
                if version == 2:
                    block = block_tables[seq, jj // block_size]
                    offset = jj % block_size
                    for i in range(DIM_SLOTS):
                        d = lane + i * lanes
                        k_r[i] = _code(k_pool, kind, block, offset, kv_head, d) if d < head_dim else ZERO
                        v_r[i] = _code(v_pool, kind, block, offset, kv_head, d) if d < head_dim else ZERO
                    if kind != KIND_FLOAT:           # one scale per (token, kv head): once per key
                        k_scale = np.float32(k_scales[block, offset, kv_head])
                        v_scale = np.float32(v_scales[block, offset, kv_head])
                elif version == 3:
                    k_scale, v_scale = _load_key(k_pool, v_pool, k_scales, v_scales, kind,
                                                 block_tables, seq, jj, kv_head, lane, lanes, k_r, v_r)
                elif wide:
                    k_scale, v_scale = _load_words(k_pool, v_pool, k_scales, v_scales, kind,
                                                   block_tables, seq, jj, kv_head, lane, lanes, words,
                                                   k_w, v_w, 0)
                    _unpack(kind, elem_bytes, k_w, 0, k_r, lane, lanes, head_dim)
                    _unpack(kind, elem_bytes, v_w, 0, v_r, lane, lanes, head_dim)
                else:                                # v4: take the loads issued a step ago ...
                    k_scale, v_scale = scales_next
                    for i in range(DIM_SLOTS):
                        k_r[i] = k_next[i]
                        v_r[i] = v_next[i]
                    # ... and issue the next step's now, to land while this step computes
                    scales_next = _load_key(k_pool, v_pool, k_scales, v_scales, kind, block_tables,
                                            seq, min(j + num_streams, stop - 1), kv_head, lane, lanes,
                                            k_next, v_next)
                if version == 3 or version == 4:
                    _decode(kind, k_r, v_r)
                _key_dots(q_r, k_r, s, lanes, scratch)
                if valid:
                    for g in range(HEAD_TILE):
                        score = s[g] * k_scale
                        m_new = max(m[g], score)
                        correction = math.exp(m[g] - m_new)  # exp(-inf) = 0 on the stream's first key
                        p = math.exp(score - m_new)
                        l[g] = l[g] * correction + p
                        m[g] = m_new
                        pv = p * v_scale
                        for i in range(DIM_SLOTS):
                            acc[g, i] = acc[g, i] * correction + pv * v_r[i]

        # Merge the streams: out = sum_k e^(m_k - M) acc_k / sum_k e^(m_k - M) l_k, M = max m_k.
        for g in range(HEAD_TILE):
            if lane == 0:
                m_sh[g, stream] = m[g]
                l_sh[g, stream] = l[g]
            for i in range(DIM_SLOTS):
                acc_sh[g, tid, i] = acc[g, i]
        cuda.syncthreads()
        for e in range(tid, ng * head_dim, cuda.blockDim.x):
            g = e // head_dim
            d = e % head_dim
            top = NEG_INF
            for k in range(num_streams):
                top = max(top, m_sh[g, k])
            total = ZERO
            out = ZERO
            for k in range(num_streams):
                if m_sh[g, k] > NEG_INF:        # a stream that saw no key adds nothing
                    w = math.exp2(m_sh[g, k] - top) if chunked else math.exp(m_sh[g, k] - top)
                    total += l_sh[g, k] * w
                    if wide:                     # word d // per_word: lane (word % L), slot
                        word = d // per_word     # (word // L) * per_word + d % per_word
                        out += acc_sh[g, k * lanes + word % lanes,
                                      (word // lanes) * per_word + d % per_word] * w
                    else:                        # lane d % L holds dim d
                        out += acc_sh[g, k * lanes + d % lanes, d // lanes] * w
            part_out[row, head0 + g, split, d] = out / total if total > ZERO else ZERO
            if d == 0:
                lse = NEG_INF                    # v7's m is in base 2: lse = (m + log2 l) ln 2
                if total > ZERO:
                    lse = (top + math.log2(total)) * LN2 if chunked else top + math.log(total)
                part_lse[row, head0 + g, split] = lse

    template = "void(" + _ATTN_ARGS + ", int32, float32[:, :, :, ::1], float32[:, :, ::1])"
    if wide:  # one signature: the pools are uint64 words whatever they hold
        warp_attention.__name__ = f"warp_attention_v{version}_{elem_bytes}byte_kernel"
        signatures = (template.format(q="float32", pool="uint64"),)
    else:
        warp_attention.__name__ = f"warp_attention_v{version}_kernel"
        signatures = _signatures(template)
    warp_attention.__qualname__ = warp_attention.__name__
    chunk_bounds = CHUNK_BLOCKS_PER_SM if blocks_per_sm is None else blocks_per_sm
    resident = {6: BLOCKS_PER_SM, 7: chunk_bounds}.get(version, 0)
    bounds = (WARP_THREADS, resident) if resident else None
    return kernel(*signatures, launch_bounds=bounds)(warp_attention)


warp_attention_v2_kernel = _make_warp_kernel(2)
warp_attention_v3_kernel = _make_warp_kernel(3)
warp_attention_v4_kernel = _make_warp_kernel(4)
# v5-v7, by the bytes of one pool element: float32, float16, int8 / fp8 codes
WIDE_KERNELS = {(version, size): _make_warp_kernel(version, size)
                for version in (5, 6, 7) for size in (4, 2, 1)}
WARP_KERNELS = {2: warp_attention_v2_kernel, 3: warp_attention_v3_kernel,
                4: warp_attention_v4_kernel}

# --- launch wrappers -----------------------------------------------------------------------------

_NO_SCALES = None  # a 1x1x1 fp16 dummy for float pools, made once per process
# Scratch reused across calls. Safe because every launch here goes to the legacy default stream of
# one context, so a launch never overlaps the previous call's; per-thread default streams
# (NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM) with several host threads would need one per stream.
_WORKSPACE: dict[str, Any] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """A device array for the launches' own scratch (a widened q, split-K partials), kept for the
    next call of the same shape: ``cuda.device_array`` is a cuMemAlloc each time (Numba has no
    caching allocator), which would cost a decode step tens of microseconds."""
    buf = _WORKSPACE.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = _WORKSPACE[name] = cuda.device_array(shape, dtype)
    return buf


def _dummy_scales() -> Any:
    global _NO_SCALES
    if _NO_SCALES is None:
        _NO_SCALES = cuda.to_device(np.zeros((1, 1, 1), np.float16))
    return _NO_SCALES


VERSIONS = {
    1: "tiles: a thread per key (uncoalesced K rows), softmax statistics by one thread per head",
    2: "warps: lanes share a key (coalesced), shuffle-summed dots, online softmax in registers",
    3: "batched loads: v2 with every K/V load of a key issued before any is used (no branches)",
    4: "pipelined: v3 with the next key's loads issued a step ahead",
    5: "wide loads: v3 reading the pools as 8-byte words (4 fp16, 8 int8/fp8), coalesced",
    6: "occupancy: v5 compiled for 4 blocks per SM (launch bounds): 128 registers, 16 warps",
    7: "key chunks: v5 taking 2 keys per stream per step, one softmax rescale per chunk, exp2",
}
# What the public ops launch: the fastest version measured on a real GPU that passes `pytest -m gpu`
# (v6: H200, 2026-11-27, 1.57 ms at the bench shape against v2's 2.26 ms; notebook 05).
DEFAULT_VERSION = 6


# --- split-K chosen for the device ---------------------------------------------------------------

MIN_KEYS_PER_SPLIT = 256  # a partition's fixed cost (its setup, partial row, share of the merge)
#                           is a few keys' worth; below ~256 keys it stops paying for itself


# Blocks of each version one SM holds at once, from the registers and shared memory the driver
# reported on an H200 (data/bench/h200_2026-11-27_resources.json; 65,536 registers per SM): v1 96
# registers x 128 threads and 20.6 KB shared -> 5; v2-v5 148-168 registers -> 3; v6 and v7 as
# their launch bounds promise. Another compiler may allocate differently; the rule only needs the
# order of magnitude.
RESIDENT_BLOCKS = {1: 5, 2: 3, 3: 3, 4: 3, 5: 3, 6: BLOCKS_PER_SM, 7: CHUNK_BLOCKS_PER_SM}
WAVES = 1.5  # blocks asked for, in units of what the GPU holds at once (see auto_num_splits)


def auto_num_splits(base_blocks: int, longest_context: int, num_sms: int,
                    resident_blocks: int) -> int:
    """Split-K partitions per sequence when the caller leaves ``num_splits=None``.

    A decode launch has ``base_blocks`` thread blocks per partition (query rows x kv heads x head
    tiles): 8 sequences x 8 kv heads = 64, on 132 SMs. Splitting each sequence S ways multiplies the
    blocks by S. The rule: the smallest power of two S with
    ``base_blocks * S >= WAVES * num_sms * resident_blocks`` (``resident_blocks``: blocks of the
    kernel one SM holds at once, ``RESIDENT_BLOCKS``), no partition shorter than
    ``MIN_KEYS_PER_SPLIT`` keys. Under one wave, SMs sit idle; every extra wave adds partial rows
    to merge and partitions whose setup is not amortized. WAVES = 1.5 is fit to the two sweeps
    measured so far, and the power of two lands it at 1.9-2.6 waves there: v2 on the H100 (3
    resident blocks: picks 16 splits, the fastest; 8 splits, 1.3 waves, were 26% slower) and v6 on
    the H200 (4 resident: picks 16, 1.57 ms against the best 1.56 at 8 splits; 64 splits, 7.8
    waves, 1.66 ms). The first rule counted the thread limit's 16 slots instead and picked 64.
    Powers of two because the benchmark sweeps them. Flash-decoding (Dao et al., 2023) and
    FlashAttention-2's split heuristic reason alike: split only while the GPU is not yet full.
    """
    for name, value in (("base_blocks", base_blocks), ("num_sms", num_sms),
                        ("resident_blocks", resident_blocks)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    most = max(1, longest_context // MIN_KEYS_PER_SPLIT)
    splits = 1
    while base_blocks * splits < WAVES * num_sms * resident_blocks and splits * 2 <= most:
        splits *= 2
    return splits


def _head_blocks(num_q_heads: int, num_kv_heads: int, version: int) -> int:
    """The grid's second axis: kv heads x the head tiles of one GQA group."""
    tile = GROUP_TILE if version == 1 else HEAD_TILE
    return num_kv_heads * (-(-(num_q_heads // num_kv_heads) // tile))


def device_num_splits(num_rows: int, num_q_heads: int, num_kv_heads: int, longest_context: int,
                      version: int = DEFAULT_VERSION) -> int:
    """:func:`auto_num_splits` for a launch of ``version`` on this process's device. The simulator
    gets 1: it has no SMs to fill, and every partition costs it real time."""
    if MODE != "gpu" or num_rows == 0:
        return 1
    return auto_num_splits(num_rows * _head_blocks(num_q_heads, num_kv_heads, version),
                           longest_context, cuda.get_current_device().MULTIPROCESSOR_COUNT,
                           RESIDENT_BLOCKS[version])


def _as_words(pool: Any) -> Any:
    """``pool`` seen as uint64 words (a view), or None when v5 cannot read it that way: rows that
    are not whole 8-byte words, a pool that is not on the device (Numba copies a host array in;
    the kernels read any CUDA array), or one whose rows do not start on an 8-byte boundary (a GPU
    faults on a misaligned 8-byte load; kvlab's pools start on 256-byte ones, a view into someone
    else's buffer might not). The simulator has no pointers to check."""
    if (pool.shape[3] * pool.dtype.itemsize) % 8:
        return None
    if MODE == "gpu":
        if not cuda.is_cuda_array(pool):
            return None
        pool = cuda.as_cuda_array(pool)
        if (pool.device_ctypes_pointer.value or 0) % 8:
            return None
    return pool.view(np.uint64)


def launch(q, k_pool, v_pool, k_scales, v_scales, kv_dtype, block_tables, context_lens,
           query_start, scale, window, causal, num_splits, version=DEFAULT_VERSION):
    """Launch kernel version ``version`` on arguments **already checked** (the public ops below
    check them first); returns float32 ``[T, Hq, D]``. Public so that the benchmark and notebook
    05 can time the kernels alone and compare versions on the same data."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {sorted(VERSIONS)}, got {version!r}")
    num_rows, num_q_heads, head_dim = q.shape
    out = cuda.device_array((num_rows, num_q_heads, head_dim), np.float32)
    if num_rows == 0:
        return out
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {MAX_HEAD_DIM}, the kernels' shared memory size")
    if num_splits > 65535:  # a CUDA grid's z dimension
        raise ValueError(f"num_splits must be <= 65535 on a GPU, got {num_splits}")
    if q.dtype == np.float16:
        wide = _workspace("q", q.shape, np.float32)
        rows = q.shape[0] * q.shape[1]
        widen_kernel[-(-rows // THREADS_PER_BLOCK), THREADS_PER_BLOCK](q, wide)
        q = wide
    kind = {None: KIND_FLOAT, "int8": KIND_INT8, "fp8_e4m3": KIND_FP8}[kv_dtype]
    if kv_dtype is None:
        k_scales = v_scales = _dummy_scales()
    heads = _head_blocks(num_q_heads, k_pool.shape[2], version)
    args = (q, k_pool, v_pool, k_scales, v_scales, np.int32(kind), block_tables, context_lens,
            query_start, np.float32(scale), np.int32(window), np.int32(causal))
    part_out = _workspace("part_out", (num_rows, num_q_heads, num_splits, head_dim), np.float32)
    part_lse = _workspace("part_lse", (num_rows, num_q_heads, num_splits), np.float32)
    words = (_as_words(k_pool), _as_words(v_pool)) if version >= 5 else (None, None)
    if version >= 5 and any(w is None for w in words):
        version = 3  # pools v5 cannot read as words: v3, the same steps with narrow loads
    if version == 1:
        paged_attention_split_kernel[(num_rows, heads, num_splits), THREADS_PER_BLOCK](
            *args, part_out, part_lse)
    elif version >= 5:  # the same pools seen as 8-byte words (a view: nothing is copied)
        WIDE_KERNELS[version, k_pool.dtype.itemsize][(num_rows, heads, num_splits), WARP_THREADS](
            args[0], *words, *args[3:], np.int32(lanes_per_key(head_dim)), part_out, part_lse)
    else:
        WARP_KERNELS[version][(num_rows, heads, num_splits), WARP_THREADS](
            *args, np.int32(lanes_per_key(head_dim)), part_out, part_lse)
    merge_splits_kernel[(num_rows, num_q_heads), THREADS_PER_BLOCK](part_out, part_lse, out)
    return out


def decode_attention(q: Any, k: Any, v: Any, scale: float | None = None, causal: bool = True,
                     sliding_window: int = 0) -> Any:
    """float32 ``[T, Hq, D]`` device array; as :func:`kvlab.ref.attention.decode_attention`.

    A contiguous cache is a pool of one block of L slots: the same kernels, with a one-entry table.
    """
    scale, window = check_decode_attention(q, k, v, scale, causal, sliding_window)
    length, num_kv_heads, head_dim = k.shape
    if q.shape[0] == 0:
        return cuda.device_array(q.shape, np.float32)
    k_pool = k.reshape(1, length, num_kv_heads, head_dim)
    v_pool = v.reshape(1, length, num_kv_heads, head_dim)
    table = cuda.to_device(np.zeros((1, 1), np.int32))
    lens = cuda.to_device(np.array([length], np.int32))
    starts = cuda.to_device(np.array([0, q.shape[0]], np.int32))
    return launch(q, k_pool, v_pool, None, None, None, table, lens, starts, scale, window,
                  bool(causal), 1)


def paged_decode_attention(q: Any, k_pool: Any, v_pool: Any, block_tables: Any,
                           context_lens: Any, query_start: Any, scale: float | None = None,
                           sliding_window: int = 0, k_scales: Any = None, v_scales: Any = None,
                           num_splits: int | None = None) -> Any:
    """float32 ``[T, Hq, D]`` device array; as :func:`kvlab.ref.attention.paged_decode_attention`
    (device arrays; index arrays int32). ``num_splits=None``: chosen for the device
    (:func:`device_num_splits`)."""
    kv_dtype, lens, _, scale, window, splits = check_paged_decode_attention(
        q, k_pool, v_pool, block_tables, context_lens, query_start, scale, sliding_window,
        k_scales, v_scales, num_splits)
    if splits is None:
        splits = device_num_splits(q.shape[0], q.shape[1], k_pool.shape[2], int(lens.max(initial=0)))
    return launch(q, k_pool, v_pool, k_scales, v_scales, kv_dtype, block_tables, context_lens,
                  query_start, scale, window, True, splits)
