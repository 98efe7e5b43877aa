"""The fused write v4: one warp per token, 16-byte loads and stores, shuffles instead of barriers.

v3 (:mod:`kvlab.kernels.cuda.fused_write`, what the public ops launch) gives each thread block
one head of a few tokens and moves it through shared memory with a barrier between steps
whenever a head needs a reduction (the norm's sum of squares, a quantized store's amax): on an
H200 it moved 98 MiB in 202 us, 12% of the card's copy bandwidth. v4 changes the work split:

- **a warp per token**, ``WARPS`` tokens per CTA. The ``R = head bytes / 16`` lanes of a head
  group each load 16 bytes of it (8 fp16 or 4 float32 numbers) and store 16 bytes of the result:
  a warp carries ``32 / R`` heads per instruction (fp16, head_dim 128: 2).
- **cos and sin of the token loaded once**, kept in registers and reused for every Q and K head;
  so are the norm weights.
- **RMSNorm reduced by shuffles in the reference's order**: the sum of squares is the tree
  ``s[i] += s[i + P/2]``, then ``P/4`` ... (:func:`kvlab.ref.fused_write.tree_sum_of_squares`).
  Lane ``r`` holds dims ``r * DPL ...``, so the wide levels pair lane ``r`` with lane
  ``r + w / DPL`` (a shuffle), and the last ``log2 DPL`` levels pair numbers inside a lane — the
  same additions of the same operands, so the result stays bit-equal to NumPy. Squares and RoPE
  products go through ``mul_rn`` (no FMA contraction).
- **rotate-half RoPE by one exchange**: dim ``d`` pairs with ``d + rotary_dim/2``, which lives in
  lane ``r ^ (rotary_dim / 2 / DPL)``; interleaved pairs sit inside a lane.
- **a quantized store**: the head's amax by a butterfly of maxima (exact in any order), its scale,
  each lane encoding its own numbers; **no shared memory** anywhere on a GPU.

Heads of a shape v4 cannot lay out (a head that is not whole 16-byte pieces or not a power of two
of them, more than a warp, a rotate-half split inside a lane's 16 bytes, arrays not 16-byte
aligned) make :func:`prepare` return None: ``fused_write.launch`` then runs v3. In the simulator
the exchanges run through shared memory and barriers (:mod:`kvlab.kernels.cuda._warp`), so the
tests check this kernel's own lane logic bit for bit. It is not what the public ops launch until a
GPU measures it faster than v3 (the fused-kernel rows of ``kvlab.bench.fused_write``).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from kvlab.kernels.cuda import MODE, cuda, float_from_bits, kernel, mul_rn
from kvlab.kernels.cuda._warp import (WARP_LANES, as_words, bits_of, done, fetch, halves,
                                      load16, pack_halves, publish, scratch_shape, store16)
from kvlab.kernels.cuda.quant import AMAX_FLOOR, ONE, ZERO, _fp8_e4m3_encode

from numba import float32  # noqa: E402,I001  (numba is configured by kvlab.kernels.cuda)
from numba.types import float16  # noqa: E402

WARPS = 4 if MODE == "gpu" else 2  # tokens per CTA (the simulator: 2 stand-in warps of 8 lanes)
LOAD_BYTES = 16
# As in attention_v8: the simulator's exchanges are barriers of the whole block, so there a warp
# past the last token keeps stepping with the others (writing nothing); on a GPU it returns.
UNIFORM_STEPS = MODE != "gpu"
# Head steps a warp's loads run ahead of its arithmetic (Little's law: a warp that waited for
# one head at a time would keep ~512 bytes in flight; written out as three tuples, so registers).
AHEAD = 3


class Layout(NamedTuple):
    dims_per_lane: int   # DPL: numbers in a lane's 16 bytes
    lanes_per_head: int  # R


def layout(elem_bytes: int, head_dim: int, qk_mode: int, rotary_half: int,
           warp_lanes: int = WARP_LANES) -> Layout | None:
    """v4's lanes for a head of ``head_dim`` numbers of ``elem_bytes``, or None (see above)."""
    per_lane = LOAD_BYTES // elem_bytes
    lanes = head_dim // per_lane
    if head_dim % per_lane or lanes > warp_lanes or lanes & (lanes - 1) or lanes < 1:
        return None
    if qk_mode in (1, 2):  # rotate-half: a pair's partner one exchange away
        if rotary_half % per_lane or (rotary_half // per_lane) & (rotary_half // per_lane - 1):
            return None
    return Layout(per_lane, lanes)


def _log2(n: int) -> int:
    return n.bit_length() - 1


def _build(elem_bytes: int, head_dim: int, warp_lanes: int = WARP_LANES) -> Any:
    """The v4 kernel for one (qkv element size, head_dim): capitals are compile-time constants.
    ``warp_lanes``: the warp it is laid out for (32 for the PTX compile)."""
    DPL, R = layout(elem_bytes, head_dim, 0, 0, warp_lanes)
    WARP = warp_lanes
    HPI = WARP // R                       # heads per warp instruction
    CROSS = _log2(R)                      # tree levels across lanes (w = R/2 * DPL ... DPL)
    INSIDE = _log2(DPL)                   # then inside a lane (w = DPL/2 ... 1)
    HEAD_WORDS = head_dim * elem_bytes // 4
    CODE_WORDS = DPL // 4                 # a lane's 8-bit codes, in uint32 words
    IS_HALF = elem_bytes == 2
    SCRATCH = scratch_shape(WARPS * WARP)
    # 1/D, exact (D is a power of two): total * (1/D) rounds to the same float32 as total / D,
    # and through mul_rn the compiler cannot fuse it with the + eps that follows
    INV_D = np.float32(1.0 / head_dim)

    def fused_write_v4(qkv, q_norm_w, k_norm_w, cos, sin, k_words, v_words, k_scales, v_scales,
                       block_tables, query_start, pos_offsets, num_q_heads, num_kv_heads,
                       block_size, eps, qk_mode, cache_kind, paged, qmax, q_out, max_input,
                       check_only, flag):
        tid = cuda.threadIdx.x
        lane = tid % WARP
        slot_in_warp = lane // R             # which of the warp's HPI heads
        r = lane % R                         # which 16 bytes of the head
        num_tokens = query_start[query_start.shape[0] - 1]
        token = cuda.blockIdx.x * WARPS + tid // WARP
        live = token < num_tokens
        if not live and not UNIFORM_STEPS:
            return
        token = min(token, num_tokens - 1)
        seq = 0  # few sequences, so a walk is simpler than a search
        while token >= query_start[seq + 1]:
            seq += 1
        pos = pos_offsets[seq] + token - query_start[seq]
        row = pos                             # a contiguous cache: capacity blocks of one slot
        if paged:
            row = block_tables[seq, pos // block_size] * block_size + pos % block_size
        heads = num_q_heads + 2 * num_kv_heads
        half = cos.shape[1]

        scratch = cuda.shared.array(SCRATCH, np.float32)
        x = cuda.local.array(DPL, np.float32)
        sq = cuda.local.array(DPL, np.float32)
        c = cuda.local.array(DPL, np.float32)
        s = cuda.local.array(DPL, np.float32)
        qw = cuda.local.array(DPL, np.float32)
        kw = cuda.local.array(DPL, np.float32)
        rotated = cuda.local.array(DPL, np.bool_)
        # the token's cos/sin (and the norm weights): loaded once, used for every Q and K head
        for e in range(DPL):
            d = r * DPL + e
            p = d // 2 if qk_mode == 3 else (d if d < half else d - half)
            rotated[e] = qk_mode != 0 and d < 2 * half
            c[e] = cos[pos, p] if rotated[e] else ONE
            s[e] = sin[pos, p] if rotated[e] else ZERO
            qw[e] = q_norm_w[d] if qk_mode == 1 else ONE
            kw[e] = k_norm_w[d] if qk_mode == 1 else ONE

        # 1. 16-byte loads, AHEAD head steps ahead of the arithmetic (tuples: registers)
        step_words = token * (heads * HEAD_WORDS) + r * 4
        ahead1 = load16(qkv, step_words + min(slot_in_warp, heads - 1) * HEAD_WORDS)
        ahead2 = load16(qkv, step_words + min(HPI + slot_in_warp, heads - 1) * HEAD_WORDS)
        ahead3 = load16(qkv, step_words + min(2 * HPI + slot_in_warp, heads - 1) * HEAD_WORDS)
        for h0 in range(0, heads, HPI):
            loaded = ahead1
            ahead1 = ahead2
            ahead2 = ahead3
            ahead3 = load16(qkv, step_words
                            + min(h0 + AHEAD * HPI + slot_in_warp, heads - 1) * HEAD_WORDS)
            h = min(h0 + slot_in_warp, heads - 1)
            active = live and h0 + slot_in_warp < heads
            is_q = h < num_q_heads
            is_v = h >= num_q_heads + num_kv_heads
            for w in range(4):
                if IS_HALF:
                    x[2 * w], x[2 * w + 1] = halves(loaded[w])
                else:
                    x[w] = float_from_bits(loaded[w])
            # 2. RMSNorm (qk_mode 1; every lane takes part, V heads discard it): the reference's
            #    tree, its wide levels across lanes, its last log2(DPL) levels inside a lane
            if qk_mode == 1:
                for e in range(DPL):
                    sq[e] = mul_rn(x[e], x[e])
                for k in range(CROSS):
                    publish(sq, DPL, scratch)
                    for e in range(DPL):
                        sq[e] = sq[e] + fetch(sq, e, lane ^ ((R // 2) >> k), scratch)
                    done(scratch)
                for k in range(INSIDE):
                    w = (DPL // 2) >> k
                    for e in range(DPL):
                        if e < w:
                            sq[e] = sq[e] + sq[e + w]
                publish(sq, 1, scratch)
                total = fetch(sq, 0, slot_in_warp * R, scratch)  # the head's first lane
                done(scratch)
                inv = ONE / math.sqrt(mul_rn(total, INV_D) + eps)
                if not is_v:
                    for e in range(DPL):
                        n = x[e] * inv
                        if IS_HALF:
                            n = float32(float16(n))
                        x[e] = (qw[e] if is_q else kw[e]) * n
            # 3. RoPE (qk_modes 1-3, Q and K heads), rounded to qkv's dtype once
            if qk_mode == 1 or qk_mode == 2:
                publish(x, DPL, scratch)
                for e in range(DPL):
                    partner = fetch(x, e, lane ^ (half // DPL), scratch)
                    if rotated[e] and not is_v:
                        if r * DPL + e < half:   # (a, b) = (mine, partner's): a c - b s
                            sq[e] = mul_rn(x[e], c[e]) - mul_rn(partner, s[e])
                        else:                    # (a, b) = (partner's, mine): b c + a s
                            sq[e] = mul_rn(x[e], c[e]) + mul_rn(partner, s[e])
                    else:
                        sq[e] = x[e]
                done(scratch)
                for e in range(DPL):
                    x[e] = sq[e]
            elif qk_mode == 3 and not is_v:
                for e in range(0, DPL, 2):
                    if rotated[e]:
                        a = x[e]
                        b = x[e + 1]
                        x[e] = mul_rn(a, c[e]) - mul_rn(b, s[e])
                        x[e + 1] = mul_rn(b, c[e]) + mul_rn(a, s[e])
            if IS_HALF and qk_mode != 0 and not is_v:
                for e in range(DPL):
                    x[e] = float32(float16(x[e]))
            # 4a. a dry run before a quantized write: flag a K value the cache cannot store
            if check_only:
                if active and not is_q and not is_v:
                    for e in range(DPL):
                        if not abs(x[e]) <= max_input:   # NaN fails every comparison
                            flag[0] = 1
                continue
            # 4. store: Q to q_out, K and V to the cache (16 bytes a lane, or its 8-bit codes)
            amax = ZERO
            if cache_kind != 0:                  # the head's amax: a butterfly of maxima
                for e in range(DPL):
                    amax = max(amax, abs(x[e]))
                sq[0] = amax
                for k in range(CROSS):
                    publish(sq, 1, scratch)
                    sq[0] = max(sq[0], fetch(sq, 0, lane ^ ((R // 2) >> k), scratch))
                    done(scratch)
                amax = sq[0]
            if not active:
                continue
            if IS_HALF:
                out = (pack_halves(x[0], x[1]), pack_halves(x[2], x[3]),
                       pack_halves(x[4], x[5]), pack_halves(x[6], x[7]))
            else:
                out = (bits_of(x[0]), bits_of(x[1]), bits_of(x[2]), bits_of(x[3]))
            if is_q:
                store16(q_out, (token * num_q_heads + h) * HEAD_WORDS + r * 4, out[0], out[1], out[2],
                        out[3])
                continue
            head = h - num_q_heads - (num_kv_heads if is_v else 0)
            dst = v_words if is_v else k_words
            at = row * num_kv_heads + head
            if cache_kind == 0:
                store16(dst, at * HEAD_WORDS + r * 4, out[0], out[1], out[2], out[3])
                continue
            scale = max(amax, AMAX_FLOOR) / qmax
            if r == 0:
                if is_v:
                    v_scales[row, head] = scale
                else:
                    k_scales[row, head] = scale
            for w in range(CODE_WORDS):
                word = np.uint32(0)
                for b in range(4):
                    y = min(max(x[4 * w + b] / scale, -qmax), qmax)
                    code = round(y) if cache_kind == 1 else _fp8_e4m3_encode(y)
                    word |= np.uint32(code & 0xFF) << np.uint32(8 * b)
                dst[at * (head_dim // 4) + r * CODE_WORDS + w] = word

    fused_write_v4.__name__ = f"fused_write_v4_{'fp16' if IS_HALF else 'fp32'}_d{head_dim}_kernel"
    fused_write_v4.__qualname__ = fused_write_v4.__name__
    return fused_write_v4


_SIGNATURE = ("void(uint32[::1], float32[::1], float32[::1], float32[:, ::1], float32[:, ::1], "
              "uint32[::1], uint32[::1], float16[:, ::1], float16[:, ::1], int32[:, ::1], "
              "int32[::1], int32[::1], int64, int64, int64, float32, int64, int64, boolean, "
              "float32, uint32[::1], float32, boolean, int32[::1])")
# Compiled to PTX by the test suite: fp16 and fp32 heads of 128 (a GPU's 32-lane warp); other
# shapes are built on first use and not registered (the registry is the same in every process).
REGISTERED_HEAD_DIM = 128
_KERNELS: dict[tuple[int, int], Any] = {}
for _elem in (2, 4):
    _registered = kernel(_SIGNATURE)(_build(_elem, REGISTERED_HEAD_DIM, warp_lanes=32))
    if MODE == "gpu":
        _KERNELS[_elem, REGISTERED_HEAD_DIM] = _registered


def get_kernel(elem_bytes: int, head_dim: int) -> Any:
    """The v4 kernel for heads of ``head_dim`` numbers of ``elem_bytes`` (built once)."""
    if (elem_bytes, head_dim) not in _KERNELS:
        _KERNELS[elem_bytes, head_dim] = cuda.jit(_build(elem_bytes, head_dim))
    return _KERNELS[elem_bytes, head_dim]


def prepare(qkv: Any, q_out: Any, cos: Any, k_pool: Any, v_pool: Any, k_scales: Any,
            v_scales: Any, shape: Any, qk_mode: int) -> Any:
    """A function that launches v4 on these (checked) arrays, or None when v4 cannot lay them
    out. ``k_pool`` etc. are ``[blocks, block_size, Hkv, D]`` (a contiguous cache as capacity
    blocks of one slot, as ``fused_write.launch`` passes it); the launcher takes the rest of
    the kernel's arguments (:func:`_build`) from ``check_only`` on."""
    half = cos.shape[1] if qk_mode else 0
    if layout(qkv.dtype.itemsize, shape.head_dim, qk_mode, half) is None:
        return None
    words = [as_words(a) for a in (qkv, q_out, k_pool, v_pool)]
    if any(w is None for w in words):
        return None
    fn = get_kernel(qkv.dtype.itemsize, shape.head_dim)
    grid = -(-shape.num_tokens // WARPS)
    scales = [a.reshape(a.shape[0] * a.shape[1], a.shape[2]) for a in (k_scales, v_scales)]

    def run(q_norm_w, k_norm_w, cos, sin, block_tables, query_start, pos_offsets, eps,
            cache_kind, paged, qmax, check_only, max_input, flag):
        fn[grid, WARPS * WARP_LANES](
            words[0], q_norm_w, k_norm_w, cos, sin, words[2], words[3], *scales, block_tables,
            query_start, pos_offsets, shape.num_q_heads, shape.num_kv_heads, k_pool.shape[1],
            np.float32(eps), qk_mode, cache_kind, paged, np.float32(qmax), words[1],
            np.float32(max_input), check_only, flag)

    return run
