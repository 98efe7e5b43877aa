"""Decode attention v8: designed for instructions per byte, not for one more step on v2-v7.

v2-v7 stop at ~16% of an H200's copy bandwidth because they are **instruction-bound**: per key
pair a warp spends ~400 instructions — fp16 decoded with integer steps, shuffle loops that do not
unroll, 64-bit index arithmetic with a floor-division by a runtime ``block_size``, the online
softmax repeated by every lane of a key — around 32 FMAs of real work. v8 changes the work split:

- **CTA = (query row, kv head with up to HEADS of its q heads, split)**, ``WARPS`` warps that each
  stream whole cache blocks on their own (warp w takes blocks w, w + WARPS, ...; no barrier in the
  loop). A block's table entry is read once, a block ahead. ``head_dim``, ``block_size``, the
  pool's element type and HEADS are compile-time constants (one kernel per combination, built on
  first use): offsets are products of constants, no division by a runtime value.
- **16-byte loads**: a lane loads 16 bytes of a row (8 fp16, 16 int8/fp8 codes, 4 float32), the
  ``R = row bytes / 16`` lanes of a row group cover it, a warp covers ``32 / R`` rows per load
  (fp16, head_dim 128: R = 16, 2 rows), and a lane issues all ``LOADS_PER_STEP`` K loads and as
  many V loads of a step before its first FMA (4 KiB in flight per warp at fp16/128). fp16 -> f32
  is one ``cvt`` per number (:func:`kvlab.kernels.cuda._warp.halves`).
- **Each element used for all HEADS q heads**: q, pre-scaled by ``scale * log2 e``, stays in
  registers; a lane's partial dots (its rows x HEADS) are summed over the R lanes of a row by a
  **reduce-scatter butterfly**: at each of log2 R exchanges a lane sends the half of its partials
  its partner keeps and adds the other half — P partials cost P - P/R shuffles instead of
  P log2 R, and each (row, head) score ends in exactly one lane (for P >= R), which computes its
  softmax once. Scores are base 2 (``exp2``); the running max is per warp and head, the rescale of
  the accumulator is skipped when no max moved (the same test in every lane: warp-uniform), and
  each lane then fetches the probabilities of its own rows from their owners for ``acc += p V``.
- **Split-K in whole blocks**: split ``j`` of a sequence owns cache blocks
  ``[j * per, (j + 1) * per)``; partials merge as for every version (``merge_splits_kernel``).
  Rows of a step that the row may not see (before the window, at or after its causal limit)
  re-read a row it may see (in bounds, finite) and weigh 0.

Quantized pools use the same skeleton: four int8 codes convert in ~2 instructions each
(:func:`kvlab.kernels.cuda._warp.int8s`: a byte under the exponent of 2^23, minus 2^23), four fp8
codes by the hardware's ``cvt.rn.f16x2.e4m3x2`` where the card has it (sm_89+:
:func:`kvlab.kernels.cuda._warp.fp8s`; the main loop then costs what int8's does, 1,346 PTX
instructions against 2,466 by bits), else with :func:`kvlab.kernels.cuda.quant._fp8_e4m3_decode`'s
bit path, and the per-(token, head) scales fold into the score (K) and into the probability (V). In the simulator the lane
exchanges run as shared memory + barriers (:mod:`kvlab.kernels.cuda._warp`), so the tests
execute this kernel's own lane logic against NumPy.

Shapes v8 cannot take (a row that is not whole 16-byte pieces, ``R`` over a warp, a block size
that is not a power of two of at least ``32 / R`` rows, a pool not 16-byte aligned) return
``None`` from :func:`layout` / ``_warp.as_words``; ``launch`` then runs v5. What a GPU must still
measure: the kernel alone against torch SDPA on contiguous K/V (target >= 0.7x), INT8 against
fp16 (>= 1.3x), and its registers (``python -m kvlab.kernels.cuda.ptx --resources``) — the next
step, if it is below target, is tensor-core MMA for QK and PV.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from kvlab.kernels.cuda import MODE, cuda, float_from_bits, kernel
from kvlab.kernels.cuda._warp import (WARP_LANES, as_words, done, fetch, fp8s, halves,
                                      has_fp8_cvt, int8s, load16, publish, scratch_shape)
from kvlab.kernels.cuda.attention_tiles import (KIND_FLOAT, KIND_FP8, KIND_INT8, LN2, LOG2E,
                                                NEG_INF, ONE, ZERO, _row_setup)
from kvlab.kernels.cuda.quant import _fp8_e4m3_decode

WARPS = 4 if MODE == "gpu" else 2  # warps per CTA (the simulator: 2 stand-in warps of 8 lanes)
THREADS = WARPS * WARP_LANES
LOADS_PER_STEP = 4                 # 16-byte K loads a lane issues per step (and as many of V)
MAX_HEADS = 8                      # q heads per CTA; a larger GQA group takes several CTAs
LOAD_BYTES = 16
# CTAs one SM holds, for the split-K rule, by the pool's element bytes: ptxas (13.5, sm_90) gives
# the kernels 162 (fp32), 168 (fp16) and 249-250 (int8, fp8) registers x 128 threads, so 3, 3 and 2
# CTAs fit in 65,536 registers (8.3 KB of shared memory each is no limit). Not yet from a GPU.
RESIDENT_BLOCKS_BY_ELEM = {4: 3, 2: 3, 1: 2}
RESIDENT_BLOCKS = RESIDENT_BLOCKS_BY_ELEM[2]
# The simulator's lane exchanges are barriers of the whole block, so there every warp takes the
# same number of steps (a warp past its last block reads a real one and weighs it 0); on a GPU
# each warp stops after its own blocks.
UNIFORM_STEPS = MODE != "gpu"


class Layout(NamedTuple):
    """How v8 lays a row of ``head_dim`` elements of ``elem_bytes`` over the lanes of a warp."""

    dims_per_lane: int   # elements in one lane's 16 bytes
    lanes_per_row: int   # R: lanes that share a row (a power of two)
    rows_per_load: int   # 32 / R rows per warp-wide load instruction
    loads: int           # K loads per lane per step
    rows_per_step: int   # rows_per_load * loads: a power of two dividing block_size


def layout(elem_bytes: int, head_dim: int, block_size: int,
           warp_lanes: int = WARP_LANES) -> Layout | None:
    """v8's lane layout for a pool, or None when v8 cannot read it (see the module docstring)."""
    per_lane = LOAD_BYTES // elem_bytes
    lanes = head_dim // per_lane
    if head_dim % per_lane or lanes < 1 or lanes > warp_lanes or lanes & (lanes - 1):
        return None
    rows_per_load = warp_lanes // lanes
    if block_size < rows_per_load or block_size & (block_size - 1):
        return None
    loads = min(LOADS_PER_STEP, block_size // rows_per_load)
    return Layout(per_lane, lanes, rows_per_load, loads, rows_per_load * loads)


def heads_per_cta(group: int) -> int:
    """HEADS: the GQA group rounded up to a power of two (the butterfly halves it), at most 8."""
    heads = 1
    while heads < min(group, MAX_HEADS):
        heads *= 2
    return heads


# --- device functions -----------------------------------------------------------------------

@cuda.jit(device=True, inline="always")
def _unpack16(kind, elem_bytes, fp8_cvt, words, at, out):
    """The numbers in ``words[at:at + 4]`` (16 bytes of a row) -> float32 ``out``, before scales.
    ``kind``, ``elem_bytes`` and ``fp8_cvt`` (fp8 by the hardware's cvt) are compile-time
    constants: one decode is compiled in."""
    for w in range(4):
        word = words[at + w]
        if elem_bytes == 4:
            out[w] = float_from_bits(word)
        elif elem_bytes == 2:
            out[2 * w], out[2 * w + 1] = halves(word)
        elif kind == KIND_FP8 and fp8_cvt:
            out[4 * w], out[4 * w + 1], out[4 * w + 2], out[4 * w + 3] = fp8s(word)
        elif kind == KIND_FP8:
            for b in range(4):
                out[4 * w + b] = _fp8_e4m3_decode(np.uint8((word >> np.uint32(8 * b)) & 0xFF))
        else:                                   # int8: four signed bytes at once
            out[4 * w], out[4 * w + 1], out[4 * w + 2], out[4 * w + 3] = int8s(word)


@cuda.jit(device=True, inline="always")
def _butterfly(values, n, first, count, lane, scratch, op_max):
    """``values[:n]`` summed (``op_max``: maxed) over the lanes ``lane ^ o``, o = ``first``,
    ``first / 2``, ... (``count`` distances, compile-time): every lane ends with the result."""
    for k in range(count):
        o = first >> k
        publish(values, n, scratch)
        for i in range(n):
            other = fetch(values, i, lane ^ o, scratch)
            values[i] = max(values[i], other) if op_max else values[i] + other
        done(scratch)


def _log2(n: int) -> int:
    return n.bit_length() - 1


def _build(kind: int, elem_bytes: int, head_dim: int, block_size: int, heads: int,
           warp_lanes: int = WARP_LANES, fp8_cvt: bool = True) -> Any:
    """The v8 kernel's Python function for one (pool kind, element size, head_dim, block_size,
    HEADS); every name below in capitals is a compile-time constant of it. ``warp_lanes``: the
    warp it is laid out for (32 for the PTX compile, which is always for a GPU); ``fp8_cvt``:
    decode fp8 with the hardware's cvt (sm_89+), else by bits."""
    shape = layout(elem_bytes, head_dim, block_size, warp_lanes)
    if shape is None:
        raise ValueError(f"v8 cannot read head_dim {head_dim} x {elem_bytes} bytes in blocks of "
                         f"{block_size}")
    DPL, R, RPI, LOADS, ROWS = shape
    HEADS, BS = heads, block_size
    STEPS_PER_BLOCK = BS // ROWS
    P = LOADS * HEADS              # partial dots per lane per step: its rows x the heads
    NV = max(1, P // R)            # scores a lane owns after the reduce-scatter
    DUP = max(1, R // P)           # lanes holding the same score (when P < R)
    HEAD_WORDS = head_dim * elem_bytes // 4
    # butterfly distances (xor of lane ids), as (first, count) halving from the first:
    SCATTERS = _log2(R // DUP)     # halving exchanges R/2 .. DUP, then (P < R) plain sums
    SUMS = _log2(DUP)              # over DUP/2 .. 1
    WARP = warp_lanes
    WARP_ALL = _log2(WARP)         # the whole warp: WARP/2 .. 1
    GROUPS = _log2(RPI)            # the warp's row groups (same dims, other rows): 16 .. R
    QUANT = kind != KIND_FLOAT
    FP8_CVT = fp8_cvt
    SCRATCH = scratch_shape(WARPS * WARP)  # the simulator's lane exchanges (GPU: a dummy)
    ACC, SEND, WORDS = HEADS * DPL, max(1, P // 2), LOADS * 4  # (local array sizes: constants)

    def attention_v8(q, k_words, v_words, k_scales, v_scales, block_tables, context_lens,
                     query_start, scale, window, causal, num_kv_heads, part_out, part_lse):
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        pos = lane % R                       # which 16 bytes of a row this lane loads
        group_row = lane // R                # which of a load's RPI rows
        row = cuda.blockIdx.x
        split = cuda.blockIdx.z
        group = q.shape[1] // num_kv_heads
        tiles = (group + HEADS - 1) // HEADS
        kv_head = cuda.blockIdx.y // tiles
        head0 = kv_head * group + (cuda.blockIdx.y % tiles) * HEADS
        ng = min(HEADS, kv_head * group + group - head0)
        seq, start, stop = _row_setup(query_start, context_lens, row, causal, window)
        num_blocks = (context_lens[seq] + BS - 1) // BS
        per_split = (num_blocks + cuda.gridDim.z - 1) // cuda.gridDim.z
        b_first = max(split * per_split, start // BS)
        b_stop = min((split + 1) * per_split, (stop + BS - 1) // BS)
        row_words = num_kv_heads * HEAD_WORDS
        lane_word = kv_head * HEAD_WORDS + pos * 4

        scratch = cuda.shared.array(SCRATCH, np.float32)
        m_sh = cuda.shared.array((WARPS, HEADS), np.float32)
        l_sh = cuda.shared.array((WARPS, HEADS), np.float32)
        acc_sh = cuda.shared.array((WARPS, HEADS, head_dim), np.float32)
        q_r = cuda.local.array((HEADS, DPL), np.float32)
        acc = cuda.local.array(ACC, np.float32)   # 1-D: exchanged whole at the end
        m = cuda.local.array(HEADS, np.float32)           # running max (base 2), per warp
        l = cuda.local.array(HEADS, np.float32)           # this lane's share of the sum
        top = cuda.local.array(HEADS, np.float32)         # the step's max
        s = cuda.local.array(P, np.float32)               # partial dots, then owned scores
        send = cuda.local.array(SEND, np.float32)
        p_own = cuda.local.array(NV, np.float32)
        p_all = cuda.local.array(P, np.float32)           # the probabilities of my rows
        valid_own = cuda.local.array(NV, np.bool_)
        k_w = cuda.local.array(WORDS, np.uint32)
        v_w = cuda.local.array(WORDS, np.uint32)
        x = cuda.local.array(DPL, np.float32)
        unit = np.float32(scale) * LOG2E
        for g in range(HEADS):
            m[g] = NEG_INF
            l[g] = ZERO
            for e in range(DPL):
                q_r[g, e] = np.float32(q[row, head0 + g, pos * DPL + e]) * unit if g < ng else ZERO
                acc[g * DPL + e] = ZERO

        mine = max(0, (b_stop - b_first - warp + WARPS - 1) // WARPS)
        steps = max(0, (b_stop - b_first + WARPS - 1) // WARPS) if UNIFORM_STEPS else mine
        phys_next = block_tables[seq, min(b_first + warp, b_stop - 1)] if steps > 0 else 0
        for t in range(steps):
            b = min(b_first + warp + t * WARPS, b_stop - 1)
            live = t < mine                      # False: a simulator warp past its blocks
            phys = phys_next
            phys_next = block_tables[seq, min(b + WARPS, b_stop - 1)]  # a block ahead
            lo = max(start, b * BS) - b * BS     # the block's slots the row sees: [lo, hi)
            hi = min(stop, b * BS + BS) - b * BS
            block_word = np.int64(phys) * (BS * row_words) + lane_word
            for sub in range(STEPS_PER_BLOCK):
                # 1. every K and V load of the step first (16 bytes each), rows clamped to [lo, hi)
                for i in range(LOADS):
                    slot = min(max(sub * ROWS + i * RPI + group_row, lo), hi - 1)
                    k_w[4 * i], k_w[4 * i + 1], k_w[4 * i + 2], k_w[4 * i + 3] = load16(
                        k_words, block_word + slot * row_words)
                    v_w[4 * i], v_w[4 * i + 1], v_w[4 * i + 2], v_w[4 * i + 3] = load16(
                        v_words, block_word + slot * row_words)
                # 2. partial dots: each K element used for all HEADS q heads
                for i in range(LOADS):
                    _unpack16(kind, elem_bytes, FP8_CVT, k_w, 4 * i, x)
                    for g in range(HEADS):
                        dot = ZERO
                        for e in range(DPL):
                            dot += q_r[g, e] * x[e]
                        s[i * HEADS + g] = dot
                # 3. reduce-scatter over the R lanes of a row: a lane whose bit o is clear keeps
                #    the lower half of s, its partner the upper; each sends what the other keeps
                n = P
                for k in range(SCATTERS):
                    o = (R // 2) >> k
                    n //= 2
                    upper = (lane & o) != 0
                    for i in range(n):
                        send[i] = s[i] if upper else s[i + n]
                    publish(send, n, scratch)
                    for i in range(n):
                        s[i] = (s[i + n] if upper else s[i]) + fetch(send, i, lane ^ o, scratch)
                    done(scratch)
                _butterfly(s, 1, DUP // 2, SUMS, lane, scratch, False)
                # 4. owned scores: s[v] is partial index (pos // DUP) * NV + v = row i, head g
                for g in range(HEADS):
                    top[g] = NEG_INF
                for v in range(NV):
                    idx = (pos // DUP) * NV + v
                    slot = sub * ROWS + (idx // HEADS) * RPI + group_row
                    valid_own[v] = live and lo <= slot and slot < hi
                    score = s[v]
                    if QUANT:
                        score *= np.float32(k_scales[phys, slot, kv_head])
                        p_own[v] = np.float32(v_scales[phys, slot, kv_head])
                    else:
                        p_own[v] = ONE
                    s[v] = score if valid_own[v] else NEG_INF
                    for g in range(HEADS):
                        if g == idx % HEADS:
                            top[g] = max(top[g], s[v])
                _butterfly(top, HEADS, WARP // 2, WARP_ALL, lane, scratch, True)
                # 5. rescale only when a running max moved (top is the same in every lane)
                moved = False
                for g in range(HEADS):
                    moved = moved or top[g] > m[g]
                if moved:
                    for g in range(HEADS):
                        m_new = max(m[g], top[g])
                        c = math.exp2(m[g] - m_new) if m_new > NEG_INF else ONE
                        m[g] = m_new
                        l[g] *= c
                        for e in range(DPL):
                            acc[g * DPL + e] *= c
                # 6. each owned score's probability, once; the sum counts one copy of each
                for v in range(NV):
                    idx = (pos // DUP) * NV + v
                    m_g = m[0]
                    for g in range(HEADS):
                        if g == idx % HEADS:
                            m_g = m[g]
                    p = math.exp2(s[v] - m_g) if valid_own[v] else ZERO
                    if pos % DUP == 0:
                        for g in range(HEADS):
                            if g == idx % HEADS:
                                l[g] += p
                    p_own[v] *= p                 # V's scale folded in
                # 7. every lane fetches the probabilities of its own rows from their owners
                publish(p_own, NV, scratch)
                for idx in range(P):
                    p_all[idx] = fetch(p_own, idx % NV, group_row * R + (idx // NV) * DUP,
                                       scratch)
                done(scratch)
                # 8. acc += p V, each V element used for all HEADS q heads
                for i in range(LOADS):
                    _unpack16(kind, elem_bytes, FP8_CVT, v_w, 4 * i, x)
                    for g in range(HEADS):
                        pv = p_all[i * HEADS + g]
                        for e in range(DPL):
                            acc[g * DPL + e] += pv * x[e]

        # The warp's row groups hold the same dims of different rows (same m): sum them; the
        # lanes' shares of l sum over the warp. Then the warps merge through shared memory.
        _butterfly(acc, ACC, WARP // 2, GROUPS, lane, scratch, False)
        _butterfly(l, HEADS, WARP // 2, WARP_ALL, lane, scratch, False)
        if lane < R:
            for g in range(HEADS):
                for e in range(DPL):
                    acc_sh[warp, g, pos * DPL + e] = acc[g * DPL + e]
        if lane == 0:
            for g in range(HEADS):
                m_sh[warp, g] = m[g]
                l_sh[warp, g] = l[g]
        cuda.syncthreads()
        for item in range(tid, ng * head_dim, WARPS * WARP):
            g = item // head_dim
            d = item % head_dim
            best = NEG_INF
            for w in range(WARPS):
                best = max(best, m_sh[w, g])
            total = ZERO
            out = ZERO
            for w in range(WARPS):
                if m_sh[w, g] > NEG_INF:        # a warp that saw no key adds nothing
                    weight = math.exp2(m_sh[w, g] - best)
                    total += l_sh[w, g] * weight
                    out += acc_sh[w, g, d] * weight
            part_out[row, head0 + g, split, d] = out / total if total > ZERO else ZERO
            if d == 0:
                part_lse[row, head0 + g, split] = (
                    (best + math.log2(total)) * LN2 if total > ZERO else NEG_INF)

    names = {KIND_FLOAT: {2: "fp16", 4: "fp32"}, KIND_INT8: {1: "int8"}, KIND_FP8: {1: "fp8"}}
    attention_v8.__name__ = (f"attention_v8_{names[kind][elem_bytes]}_d{head_dim}_b{block_size}"
                             f"_h{heads}_kernel")
    attention_v8.__qualname__ = attention_v8.__name__
    return attention_v8


_SIGNATURE = ("void({q}[:, :, ::1], uint32[::1], uint32[::1], float16[:, :, ::1], "
              "float16[:, :, ::1], int32[:, ::1], int32[::1], int32[::1], float32, int32, int32, "
              "int32, float32[:, :, :, ::1], float32[:, :, ::1])")
KINDS = ((KIND_FLOAT, 2), (KIND_FLOAT, 4), (KIND_INT8, 1), (KIND_FP8, 1))
# The specialisations compiled to PTX by the test suite: the bench's shape (head_dim 128, blocks
# of 16 tokens, GQA 4) for each pool, laid out for a GPU's 32-lane warp, for sm_90 (fp8 by the
# hardware's cvt). Others are built on first use and not registered (the registry is the same in
# every process: the PTX test compares).
REGISTERED_SHAPE = (128, 16, 4)
_REGISTERED = {(_kind, _elem, *REGISTERED_SHAPE): kernel(
    _SIGNATURE.format(q="float16"), _SIGNATURE.format(q="float32"),
    min_cc=(8, 9) if _kind == KIND_FP8 else None)(  # fp8 by cvt.rn.f16x2.e4m3x2
        _build(_kind, _elem, *REGISTERED_SHAPE, warp_lanes=32)) for _kind, _elem in KINDS}
_KERNELS: dict[tuple[int, int, int, int, int], Any] = {}


def get_kernel(kind: int, elem_bytes: int, head_dim: int, block_size: int, heads: int) -> Any:
    """The v8 kernel for this specialisation (``cuda.jit`` on first use, then cached). On a GPU
    the registered ones are reused, unless the card has no fp8 cvt and the pool is fp8."""
    key = (kind, elem_bytes, head_dim, block_size, heads)
    if key not in _KERNELS:
        fp8_cvt = has_fp8_cvt()
        if MODE == "gpu" and key in _REGISTERED and (kind != KIND_FP8 or fp8_cvt):
            _KERNELS[key] = _REGISTERED[key]  # the simulator's narrower warp builds its own
        else:
            _KERNELS[key] = cuda.jit(_build(*key, fp8_cvt=fp8_cvt))
    return _KERNELS[key]


def launch(q, k_pool, v_pool, k_scales, v_scales, kind, block_tables, context_lens,
           query_start, scale, window, causal, part_out, part_lse) -> bool:
    """Launch v8 into ``part_out`` / ``part_lse`` (the split count is their third axis) on
    checked arguments; q may be float16 or float32 (read directly: no widening launch). Returns
    False, launching nothing, when v8 cannot take these pools (the caller runs another
    version)."""
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    elem_bytes = k_pool.dtype.itemsize
    if layout(elem_bytes, head_dim, k_pool.shape[1]) is None:
        return False
    k_words, v_words = as_words(k_pool), as_words(v_pool)  # None: not 16-byte aligned
    if k_words is None or v_words is None:
        return False
    heads = heads_per_cta(num_q_heads // num_kv_heads)
    tiles = -(-(num_q_heads // num_kv_heads) // heads)
    fn = get_kernel(kind, elem_bytes, head_dim, k_pool.shape[1], heads)
    fn[(num_rows, num_kv_heads * tiles, part_out.shape[2]), THREADS](
        q, k_words, v_words, k_scales, v_scales, block_tables, context_lens, query_start,
        np.float32(scale), np.int32(window), np.int32(causal), np.int32(num_kv_heads), part_out,
        part_lse)
    return True
