"""Decode attention v2-v7, "warps": the ladder of single changes between v1 and v8.

The public ops and the version table live in :mod:`kvlab.kernels.cuda.attention` (read that
first, and :mod:`kvlab.kernels.cuda.attention_v8` for the design these steps led to). All six
versions share one source, :func:`_make_warp_kernel`; each ``if version ...`` block is one step.

v2-v7 sum over a key's lanes with a butterfly of warp shuffles (``_sum_over_key_lanes``); the
simulator has no shuffles, so there they run one narrow stand-in "warp" of 8 lanes whose
exchanges go through shared memory and barriers (:mod:`kvlab.kernels.cuda._warp`): the same
butterfly, so the tests check the lane logic itself.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from kvlab.kernels.cuda import MODE, cuda, float_from_bits, kernel
from kvlab.kernels.cuda._warp import WARP_LANES, done, fetch, publish, scratch_shape
from kvlab.kernels.cuda.attention_tiles import (_ATTN_ARGS, KIND_FLOAT, KIND_FP8, LN2, LOG2E,
                                                MAX_HEAD_DIM, NEG_INF, ONE, TWO_POW_112, ZERO,
                                                _head_tile, _partition, _row_setup, _signatures)
from kvlab.kernels.cuda.quant import _fp8_e4m3_decode

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

LANES = WARP_LANES                      # a warp. The simulator runs every thread as a Python thread,
WARPS = 4 if MODE == "gpu" else 1       # so it gets one narrow stand-in "warp" (emulated shuffles)
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
_SCRATCH = scratch_shape(WARP_THREADS)  # the simulator's lane exchanges (a GPU: a dummy)


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
        warp shuffles — lane r adds lane r ^ o's value for o = L/2, ..., 1 — after which every
        lane holds the same sum, so all keep identical m and l."""
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
        """The simulator's run of the same butterfly, each exchange emulated with shared memory and
        barriers (:mod:`kvlab.kernels.cuda._warp`): the same additions in the same lanes, only
        the heads' exchanges at one distance batched, so a key costs 2 log2(L) barriers, not
        8 log2(L). (On a GPU, a loop over distances outside the heads' loop made ptxas spill 24
        more bytes in v6.)"""
        lane = cuda.threadIdx.x % LANES
        offset = lanes // 2
        while offset > 0:
            publish(partial, HEAD_TILE, scratch)
            for g in range(HEAD_TILE):
                partial[g] += fetch(partial, g, lane ^ offset, scratch)
            done(scratch)
            offset //= 2


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

        scratch = cuda.shared.array(_SCRATCH, np.float32)
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
