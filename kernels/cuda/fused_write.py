"""The fused write as one Numba CUDA kernel: :mod:`kvlab.ref.fused_write` in a single launch.

Unfused, an engine runs five kernels per layer and step (norm Q, norm K, rotate Q, rotate K, write
the cache), and each one reads its input from memory and writes its output back. Here one thread
block owns one head of one token's packed row and carries it from ``qkv`` to its destination
without leaving the chip: the packed row is read once, ``q_out`` and the cache are written once.

The grid is ``(T tokens / TOKENS_PER_BLOCK, Hq + 2 * Hkv heads)``: block ``(b, j)`` takes
columns ``j * D .. j * D + D - 1`` — a Q head (j < Hq), a K head or a V head — of rows
``t = b * TOKENS_PER_BLOCK ...``, one row after another (the first version took one row per
block: ~200k tiny blocks for a 4k-token prefill, and the GPU spent its time scheduling them).
For each row t its threads::

    1. load      thread i: buf[d] = float32(qkv[t, j*D + d])  for d = i, i + B, ...   (shared)
    2. norm      (qk_mode 1, Q and K)  sq[d] = buf[d]**2, zero-padded to P = 2**k >= D;
                 tree: sq[i] += sq[i + P/2], barrier, ... P/4 ... until sq[0] (log2 P barriers)
                 r = 1 / sqrt(sq[0] / D + eps);  buf[d] = w[d] * dtype(buf[d] * r)
    3. rotate    (qk_mode 1-3, Q and K) thread i owns pairs p = i, i + B, ...:
                 (a, b) = buf[first(p)], buf[second(p)]  ->  res = (a c - b s, b c + a s)
                 rounded to qkv's dtype; V and qk_mode 0: res[d] = buf[d]
    4. store     Q: q_out[t, j, d] = res[d]
                 K, V: slot = block_tables[seq, pos // block_size], offset pos % block_size;
                 fp16/fp32 cache: pool[block, offset, h, d] = res[d]
                 int8/fp8 cache: amax over res (shared-memory reduction, as kvlab.kernels.cuda
                 .quant), scale = max(amax, 1e-8) / qmax, thread 0 stores fp16(scale), every
                 thread encodes its d's

Steps 1-4 pass through shared memory with a barrier between them, because the norm's sum and the
amax need every thread's values. A head that needs neither — a RoPE-only Q or K head into a float
cache, any V head, qk_mode 0 — can skip all that (``pairs_in_registers``, the third version):
the block's threads stride over the (token, pair) items of all its tokens at once, each loading
its pair straight from qkv, rotating it and storing it — no barrier, and no thread idle while
another token waits (``_rope_pair`` is the one pair step both paths share).

Each step is the reference's float32 operation in the reference's order (the tree sum included),
and RoPE's products go through ``mul_rn`` (no FMA contraction on a GPU), so the simulator and a
GPU match NumPy bit for bit.

The launch wrappers have ``kvlab.ref.fused_write``'s names and parameters, check the arguments
first (:func:`kvlab.checks.check_fused_write`), and take and return Numba device arrays.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from kvlab.checks import check_fused_write
from kvlab.kernels.cuda import (MODE, cuda, error_flag, fused_write_v4, kernel, mul_rn,
                                read_and_reset_flag)
from kvlab.kernels.cuda.quant import _check_values as _check_quant_values
from kvlab.kernels.cuda.quant import _fp8_e4m3_encode, block_max
from kvlab.ref.fused_write import _one_sequence
from kvlab.step_plan import upload_together

from numba import float32  # noqa: E402,I001  (numba is configured by kvlab.kernels.cuda)
from numba.types import float16  # noqa: E402

# Threads per block, a power of two. The simulator runs each thread as a Python thread and each
# barrier costs it milliseconds, so it gets few: the strided loops then take several turns.
THREADS_PER_BLOCK = 128 if MODE == "gpu" else 16
# Tokens one block carries (of one head), one after another, and whether heads with nothing to
# share between threads (no norm, no quantized store) skip shared memory and barriers (v3, see the
# kernel). Measured on an H200 (2026-11-27, Nsight Compute, 4k-token prefill, qk_mode 2): 1 token
# through shared memory 596 us, 16 tokens 509 us, 16 tokens in registers 202 us — the public ops
# launch the last. scripts/gpu_check.sh sweeps both (the bench's "fused kernel alone" rows).
TOKENS_PER_BLOCK = 16
PAIRS_IN_REGISTERS = True
MAX_HEAD_DIM = 512  # the shared buffers' size: one head of up to 512 dims

AMAX_FLOOR = np.float32(1e-8)
QMAX = {"int8": np.float32(127.0), "fp8_e4m3": np.float32(448.0)}
ZERO, ONE = np.float32(0.0), np.float32(1.0)
CACHE_KIND = {None: 0, "int8": 1, "fp8_e4m3": 2}  # the kernel's `cache_kind` argument


def _signatures() -> tuple[str, ...]:
    """One signature per (qkv dtype, cache storage) the wrappers pass; the norm weights arrive
    as float32 (the wrapper widens fp16 weights on the device, exactly: see _weights)."""
    out = []
    for x in ("float16", "float32"):
        for pool in (x, "int8", "uint8"):
            out.append(
                f"void({x}[:, ::1], float32[::1], float32[::1], float32[:, ::1], float32[:, ::1], "
                f"{pool}[:, :, :, ::1], {pool}[:, :, :, ::1], float16[:, :, ::1], "
                f"float16[:, :, ::1], int32[:, ::1], int32[::1], int32[::1], int64, int64, "
                f"float32, int64, int64, boolean, boolean, float32, {x}[:, :, ::1], float32, "
                f"boolean, int32[::1], int64, boolean)")
    return tuple(out)


# --- device functions (inlined: see kvlab.kernels.cuda.quant) -----------------------------------
#
# RoPE's products go through ``mul_rn`` (kvlab.kernels.cuda): no FMA contraction on a GPU, so the
# fused kernel rounds exactly where the reference does.


@cuda.jit(device=True, inline="always")
def _rope_pair(src, base, p, half, qk_mode, pos, cos, sin, is_half):
    """Pair ``p`` of a head whose dims start at ``src[base]``: its dims ``(i, j)`` and their values
    after RoPE, rounded to the input's dtype once. Rotate-half pairs ``(p, p + half)``, interleaved
    ones ``(2p, 2p + 1)``; past rotary_dim (``p >= half``) neighbours pass through unrotated."""
    if p < half:
        if qk_mode == 3:  # interleaved: neighbours
            i = 2 * p
            j = i + 1
        else:  # rotate-half
            i = p
            j = p + half
        c = cos[pos, p]
        s = sin[pos, p]
        a = float32(src[base + i])
        b = float32(src[base + j])
        out_i = mul_rn(a, c) - mul_rn(b, s)
        out_j = mul_rn(b, c) + mul_rn(a, s)
    else:  # pass-through dims beyond rotary_dim
        i = 2 * half + 2 * (p - half)
        j = i + 1
        out_i = float32(src[base + i])
        out_j = float32(src[base + j])
    if is_half:
        out_i = float32(float16(out_i))
        out_j = float32(float16(out_j))
    return i, j, out_i, out_j


@cuda.jit(device=True, inline="always")
def _shared_amax(values, length, partial):
    """max |values[d]| for d < length, over the whole thread block (quant's ``block_max``)."""
    local = ZERO
    for d in range(cuda.threadIdx.x, length, cuda.blockDim.x):
        local = max(local, abs(values[d]))
    return block_max(local, partial)


@cuda.jit(device=True, inline="always")
def _store(res, head_dim, pool, scales, block, offset, head, cache_kind, qmax, partial):
    """Write one head's values into the cache: as they are, or quantized with their scale."""
    if cache_kind == 0:
        for d in range(cuda.threadIdx.x, head_dim, cuda.blockDim.x):
            pool[block, offset, head, d] = res[d]
        return
    amax = _shared_amax(res, head_dim, partial)
    scale = max(amax, AMAX_FLOOR) / qmax
    if cuda.threadIdx.x == 0:
        scales[block, offset, head] = scale
    for d in range(cuda.threadIdx.x, head_dim, cuda.blockDim.x):
        y = min(max(res[d] / scale, -qmax), qmax)
        if cache_kind == 1:
            pool[block, offset, head, d] = round(y)
        else:
            pool[block, offset, head, d] = _fp8_e4m3_encode(y)


@cuda.jit(device=True, inline="always")
def _place(token, query_start, pos_offsets, block_tables, block_size, paged):
    """Token ``token``'s position and cache slot ``(pos, block, offset)``; a contiguous cache is
    ``capacity`` blocks of one slot."""
    seq = 0  # few sequences, so a walk is simpler than a search
    while token >= query_start[seq + 1]:
        seq += 1
    pos = pos_offsets[seq] + token - query_start[seq]
    if paged:
        return pos, block_tables[seq, pos // block_size], pos % block_size
    return pos, pos, 0


# --- the kernel -----------------------------------------------------------------------------

@kernel(*_signatures())
def fused_write_kernel(qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, k_scales, v_scales,
                       block_tables, query_start, pos_offsets, num_q_heads, num_kv_heads, eps,
                       qk_mode, cache_kind, paged, is_half, qmax, q_out, max_input, check_only,
                       flag, tokens_per_block, pairs_in_registers):
    row = cuda.blockIdx.y  # which head of the packed row: Q heads, then K, then V
    tid = cuda.threadIdx.x
    step = cuda.blockDim.x
    head_dim = q_out.shape[2]
    buf = cuda.shared.array(MAX_HEAD_DIM, np.float32)
    res = cuda.shared.array(MAX_HEAD_DIM, np.float32)
    partial = cuda.shared.array(THREADS_PER_BLOCK, np.float32)
    is_v = row >= num_q_heads + num_kv_heads
    rotate = qk_mode != 0 and not is_v
    block_size = k_pool.shape[1]
    first = cuda.blockIdx.x * tokens_per_block
    last = min(first + tokens_per_block, query_start[query_start.shape[0] - 1])

    # v3: a head that needs neither the norm's sum nor a quantized store's amax (a RoPE-only Q or
    # K head into a float cache, a V head, qk_mode 0) has nothing to share between threads: the
    # block's threads stride over all its tokens' pairs (or dims) at once, each carrying its own
    # from qkv to their destination in registers — no shared memory, no barrier, no idle half.
    if pairs_in_registers and not check_only and not (qk_mode == 1 and rotate) and (
            row < num_q_heads or cache_kind == 0):
        base = row * head_dim
        dst = v_pool if is_v else k_pool
        head = row - num_q_heads - (num_kv_heads if is_v else 0)
        items = head_dim // 2 if rotate else head_dim  # per token: pairs to turn, or dims to copy
        for e in range(tid, (last - first) * items, step):
            token = first + e // items
            pos, block, offset = _place(token, query_start, pos_offsets, block_tables,
                                         block_size, paged)
            if rotate:
                i, j, out_i, out_j = _rope_pair(qkv[token], base, e % items, cos.shape[1],
                                                qk_mode, pos, cos, sin, is_half)
                if row < num_q_heads:
                    q_out[token, row, i] = out_i
                    q_out[token, row, j] = out_j
                else:
                    dst[block, offset, head, i] = out_i
                    dst[block, offset, head, j] = out_j
            elif row < num_q_heads:
                q_out[token, row, e % items] = qkv[token, base + e % items]
            else:
                dst[block, offset, head, e % items] = qkv[token, base + e % items]
        return

    # v2: a block carries `tokens_per_block` tokens of its head, one after another: a block per
    # (token, head) made the GPU schedule ~200k tiny blocks for a 4k-token prefill (v1: 1 token)
    for token in range(first, last):
        cuda.syncthreads()  # the previous token is done with buf, res and partial
        pos, block, offset = _place(token, query_start, pos_offsets, block_tables,
                                     block_size, paged)

        # 1. load one head of the packed row (each thread keeps the d's it loaded until step 3)
        for d in range(tid, head_dim, step):
            buf[d] = float32(qkv[token, row * head_dim + d])

        # 2. RMSNorm: the tree-ordered sum of squares, then scale, round (HF's cast), weight
        if qk_mode == 1 and rotate:
            width = 1
            while width < head_dim:
                width *= 2
            for d in range(tid, width, step):
                res[d] = buf[d] * buf[d] if d < head_dim else ZERO
            cuda.syncthreads()
            while width > 1:
                width //= 2
                for i in range(tid, width, step):
                    res[i] += res[i + width]
                cuda.syncthreads()
            r = ONE / math.sqrt(res[0] / float32(head_dim) + eps)
            cuda.syncthreads()  # everyone has read res[0] before step 3 overwrites it
            for d in range(tid, head_dim, step):
                n = buf[d] * r
                if is_half:
                    n = float32(float16(n))
                w = q_norm_w[d] if row < num_q_heads else k_norm_w[d]
                buf[d] = float32(w) * n
        cuda.syncthreads()

        # 3. rotate pairs (or copy), rounding to qkv's dtype once
        if rotate:
            for p in range(tid, head_dim // 2, step):
                i, j, out_i, out_j = _rope_pair(buf, 0, p, cos.shape[1], qk_mode, pos, cos, sin,
                                                is_half)
                res[i] = out_i
                res[j] = out_j
        else:
            for d in range(tid, head_dim, step):
                res[d] = buf[d]
        cuda.syncthreads()

        # 4a. a dry run before a quantized write (check_only): flag a K value the cache cannot store
        # (NaN, inf, or so large its fp16 scale overflows) and write nothing. Norm and rotation can
        # make K larger than the raw qkv the wrapper checked, so only this pass sees the real values.
        if check_only:
            if num_q_heads <= row and not is_v:
                for d in range(tid, head_dim, step):
                    if not abs(res[d]) <= max_input:  # NaN fails every comparison
                        flag[0] = 1
            continue

        # 4. store: Q to q_out, K and V to the cache
        if row < num_q_heads:
            for d in range(tid, head_dim, step):
                q_out[token, row, d] = res[d]
            continue
        if is_v:
            _store(res, head_dim, v_pool, v_scales, block, offset, row - num_q_heads - num_kv_heads,
                   cache_kind, qmax, partial)
        else:
            _store(res, head_dim, k_pool, k_scales, block, offset, row - num_q_heads, cache_kind,
                   qmax, partial)


# --- launch wrappers ---------------------------------------------------------------------------

@kernel("void(float16[::1], float32[::1])")
def cast_kernel(src, dst):
    i = cuda.grid(1)
    if i < src.shape[0]:
        dst[i] = src[i]


def _weights(w: Any) -> Any:
    """A norm weight as float32, which the kernel reads (fp16 -> fp32 is exact). A weight is
    ``head_dim`` numbers per model: an engine widens it once at load time; here one tiny launch."""
    if w.dtype == np.float32:
        return w
    out = cuda.device_array(w.shape[0], dtype=np.float32)
    cast_kernel[-(-w.shape[0] // THREADS_PER_BLOCK), THREADS_PER_BLOCK](w, out)
    return out


_DUMMIES: dict[str, Any] = {}


def _dummy(kind: str) -> Any:
    """A tiny device array standing in for an argument a mode does not read (made once)."""
    if kind not in _DUMMIES:
        shapes = {"float16": ((1,), np.float16), "float32": ((1,), np.float32),
                  "table": ((1, 1), np.float32),
                  "scales": ((1, 1, 1), np.float16), "block_tables": ((1, 1), np.int32),
                  "flag": ((1,), np.int32)}
        shape, dtype = shapes[kind]
        _DUMMIES[kind] = cuda.to_device(np.zeros(shape, dtype))
    return _DUMMIES[kind]


def launch(qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, k_scales, v_scales, block_tables,
           query_start, pos_offsets, shape, eps, qk_mode, kv_dtype, paged,
           tokens_per_block=TOKENS_PER_BLOCK, pairs_in_registers=PAIRS_IN_REGISTERS,
           version=3) -> Any:
    """The kernel on arguments **already checked** (``shape`` from
    :func:`kvlab.checks.check_fused_write`); returns q_out. Public so that the benchmark can time
    the kernel alone and compare its steps: ``tokens_per_block`` (1, the first version: a block
    per token and head) and ``pairs_in_registers`` (v3: heads with nothing to share skip shared
    memory and barriers). ``version=4``: :mod:`kvlab.kernels.cuda.fused_write_v4` (a warp per
    token) where it can lay the heads out, else this kernel with the settings above."""
    if version not in (3, 4):
        raise ValueError(f"version must be 3 or 4, got {version!r}")
    if isinstance(tokens_per_block, bool) or not isinstance(tokens_per_block, int) \
            or tokens_per_block < 1:
        raise ValueError(f"tokens_per_block must be an int >= 1, got {tokens_per_block!r}")
    if not isinstance(pairs_in_registers, bool):
        raise TypeError(f"pairs_in_registers must be a bool, got {pairs_in_registers!r}")
    if shape.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the CUDA fused write holds a head in shared memory: head_dim must be "
                         f"<= {MAX_HEAD_DIM}, got {shape.head_dim}")
    if shape.kv_dtype is not None:  # a quantized cache never holds NaN/inf (as write_kv_quant)
        heads = qkv.reshape(qkv.shape[0], qkv.shape[1] // shape.head_dim, shape.head_dim)
        k_and_v = heads[:, shape.num_q_heads:]  # K heads then V heads: one launch checks both
        _check_quant_values(["qkv's K", "qkv's V"], k_and_v, shape.kv_dtype)
    q_out = cuda.device_array((shape.num_tokens, shape.num_q_heads, shape.head_dim),
                              dtype=qkv.dtype)
    if shape.num_tokens == 0:
        return q_out
    if qk_mode != 1:
        q_norm_w = k_norm_w = _dummy("float32")
    else:
        q_norm_w, k_norm_w = _weights(q_norm_w), _weights(k_norm_w)
    if qk_mode == 0:
        cos = sin = _dummy("table")
    if kv_dtype is None:
        k_scales = v_scales = _dummy("scales")
    if not paged:
        block_tables = _dummy("block_tables")
    grid = (-(-shape.num_tokens // tokens_per_block), shape.num_q_heads + 2 * shape.num_kv_heads)
    v4 = None
    if version == 4:
        v4 = fused_write_v4.prepare(qkv, q_out, cos, k_pool, v_pool, k_scales, v_scales, shape,
                                    qk_mode)

    def run(check_only: bool, max_input: float, flag: Any) -> None:
        if v4 is not None:
            v4(q_norm_w, k_norm_w, cos, sin, block_tables, query_start, pos_offsets, eps,
               CACHE_KIND[kv_dtype], paged, QMAX.get(kv_dtype, ONE), check_only, max_input, flag)
            return
        fused_write_kernel[grid, THREADS_PER_BLOCK](
            qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, k_scales, v_scales, block_tables,
            query_start, pos_offsets, shape.num_q_heads, shape.num_kv_heads, np.float32(eps),
            qk_mode, CACHE_KIND[kv_dtype], paged, qkv.dtype == np.float16,
            QMAX.get(kv_dtype, ONE), q_out, np.float32(max_input), check_only, flag,
            tokens_per_block, pairs_in_registers)

    flag = _dummy("flag")  # read only by a dry run, which raises the process's check flag
    if shape.kv_dtype is not None:  # the dry run first: nothing is written if it flags
        flag = error_flag()
        max_input = shape.kv_dtype.max_input
        run(True, max_input, flag)
        if read_and_reset_flag(flag):
            raise ValueError(f"qkv's K after norm/RoPE holds NaN, inf or values beyond "
                             f"±{max_input:g}, which a {shape.kv_dtype.name} cache cannot store "
                             f"(nothing was written)")
    run(False, 0.0, flag)
    return q_out


def paged_write_batched(qkv: Any, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any, k_pool: Any,
                        v_pool: Any, block_tables: Any, query_start: Any, pos_offsets: Any,
                        num_q_heads: int, num_kv_heads: int, eps: float, qk_mode: int,
                        k_scales: Any = None, v_scales: Any = None,
                        kv_dtype: str | None = None, plan: Any = None) -> Any:
    """Many sequences' new tokens in one launch; as
    :func:`kvlab.ref.fused_write.paged_write_batched` (device arrays; returns q_out as a new device
    array). With a ``plan``, no index array is read back from the device."""
    shape = check_fused_write(qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, block_tables,
                              query_start, pos_offsets, num_q_heads, num_kv_heads, eps, qk_mode,
                              k_scales, v_scales, kv_dtype, plan=plan)
    return launch(qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, k_scales, v_scales,
                   block_tables, query_start, pos_offsets, shape, eps, qk_mode, kv_dtype, True)


def paged_write(qkv: Any, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any, k_pool: Any,
                v_pool: Any, block_table: Any, pos_offset: int, num_q_heads: int,
                num_kv_heads: int, eps: float, qk_mode: int, k_scales: Any = None,
                v_scales: Any = None, kv_dtype: str | None = None) -> Any:
    """One sequence; as :func:`kvlab.ref.fused_write.paged_write` (device arrays)."""
    table, starts, offsets = _one_sequence(qkv, block_table, pos_offset)
    # checked on the host copies (no read-back), then sent in one copy (H200, profile_kernels.py
    # --host: the check 264 -> 193 us, two copies 237 us -> one 191 us)
    shape = check_fused_write(qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, table, starts,
                              offsets, num_q_heads, num_kv_heads, eps, qk_mode, k_scales, v_scales,
                              kv_dtype)
    _, (starts, offsets) = upload_together([starts, offsets], cuda.to_device)
    return launch(qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, k_scales, v_scales, table,
                  starts, offsets, shape, eps, qk_mode, kv_dtype, True)


def contig_write(qkv: Any, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any, k_cache: Any,
                 v_cache: Any, pos_offset: int, num_q_heads: int, num_kv_heads: int, eps: float,
                 qk_mode: int, k_scales: Any = None, v_scales: Any = None,
                 kv_dtype: str | None = None) -> Any:
    """A contiguous cache; as :func:`kvlab.ref.fused_write.contig_write` (device arrays)."""
    _, starts, offsets = _one_sequence(qkv, None, pos_offset)
    shape = check_fused_write(qkv, q_norm_w, k_norm_w, cos, sin, k_cache, v_cache, None, starts,
                              offsets, num_q_heads, num_kv_heads, eps, qk_mode, k_scales,
                              v_scales, kv_dtype, paged=False)
    _, (starts, offsets) = upload_together([starts, offsets], cuda.to_device)
    pools = [c.reshape(c.shape[0], 1, *c.shape[1:]) if c is not None else None
             for c in (k_cache, v_cache, k_scales, v_scales)]  # capacity blocks of one slot
    return launch(qkv, q_norm_w, k_norm_w, cos, sin, pools[0], pools[1], pools[2], pools[3],
                   None, starts, offsets, shape, eps, qk_mode, kv_dtype, False)
