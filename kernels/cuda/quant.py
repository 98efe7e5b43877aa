"""Quantized KV as Numba CUDA kernels: the ops of :mod:`kvlab.ref.quant`, on a GPU.

What is new since the paging kernels: a **reduction**. Every (token, kv_head) vector needs its
``amax = max |x|`` before any of its elements can be encoded, so the threads of a block must
cooperate: each takes a strided slice of the vector, writes its partial max to shared memory, a
tree halves the partials log2(B) times (``block_max``), and every thread reads the block's answer.
(Warp shuffles would be faster — the newest kernels use them, emulated in the simulator by
:mod:`kvlab.kernels.cuda._warp` — but this stage keeps the shared-memory tree it teaches.)

Launch wrappers have ``kvlab.ref.quant``'s names and parameters, check the arguments first
(:mod:`kvlab.checks`), and take and return Numba device arrays. Codes must equal the reference's
bit for bit, so every step is one IEEE float32 operation that rounds the same way everywhere:
``max(amax, 1e-8) / qmax`` and ``x / scale`` (``div.rn.f32``), the fp16 store of the scale
(``cvt.rn.f16.f32``) and ``round`` (``cvt.rni``: half to even). The constants are float32 globals:
a bare ``127.0`` would be a float64 in Numba and change the division.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from kvlab.checks import (
    check_copy_blocks_quant,
    check_dequantize,
    check_gather_kv_quant,
    check_quantize,
    check_write_kv_quant,
    raise_for_values,
    table_shape,
)
from kvlab.kernels.cuda import (MODE, cuda, error_flag, float_from_bits, kernel,
                                read_and_reset_flag)

# Threads per block, a power of two. The simulator runs each thread as a Python thread, so it
# gets fewer: its strided loops then take several turns per vector, as a GPU's do for D > 128.
THREADS_PER_BLOCK = 128 if MODE == "gpu" else 16

AMAX_FLOOR = np.float32(1e-8)
QMAX_INT8 = np.float32(127.0)
QMAX_FP8 = np.float32(448.0)
QMAX_INT4 = np.float32(7.0)
INT4_GROUP = 32
ZERO, ONE, TWO, SIXTEEN = np.float32(0.0), np.float32(1.0), np.float32(2.0), np.float32(16.0)
FP8_SUBNORMAL_STEP = np.float32(2.0**-9)  # E4M3 subnormals are multiples of 2**-9
FP8_FIRST_POWER = np.float32(2.0**-5)     # the smallest power of two above the subnormal range
FP8_NAN = np.float32(np.nan)
TWO_POW_120 = np.float32(2.0 ** 120)  # float32's exponent bias 127 - E4M3's 7

_INPUTS = ("float16", "float32")  # K and V arrive as either


def _signatures(template: str, **choices: tuple[str, ...]) -> tuple[str, ...]:
    """Every combination of ``choices`` substituted into ``template`` (one PTX compile each)."""
    out = [template]
    for key, values in choices.items():
        out = [s.replace("{" + key + "}", v) for s in out for v in values]
    return tuple(out)


def _launch(kernel_fn, grid: tuple[int, ...], *args: Any) -> None:
    """Launch on ``grid`` blocks of THREADS_PER_BLOCK threads; an empty grid does nothing."""
    if np.prod(grid) > 0:
        kernel_fn[grid, THREADS_PER_BLOCK](*args)


# --- device functions: the pieces every kernel shares ----------------------------------------
#
#   amax of one vector (or int4 group) of n elements, threads 0..B-1 (B = THREADS_PER_BLOCK):
#
#   element    0   1  ...  B-1 |  B  B+1 ... |  ...
#   thread     0   1  ...  B-1 |  0   1  ... |  ...      each thread: max |x| of its elements
#                                    │
#   partial[]  [m0, m1, ..., mB-1]  ◄┘  shared memory      barrier
#   tree       thread i < B/2: partial[i] = max(partial[i], partial[i + B/2])   barrier
#              ... B/4, ..., 1: log2(B) steps; everyone reads partial[0]
#
# (The first version let thread 0 walk all B partials while the others waited: B dependent
# shared-memory reads per vector. A max is exact in any order, so the tree changes no result.)
# Device functions are inlined into their kernels (inline="always"): compile_ptx can then build
# every kernel without asking a GPU which compute capability a separate device function targets.

@cuda.jit(device=True, inline="always")
def block_max(local, partial):
    """The largest ``local`` over the thread block: a tree in shared memory ``partial`` (one float32
    per thread; blockDim a power of two), log2(blockDim) + 1 barriers. Every thread must call it;
    the caller must not write ``partial`` again before a barrier (others still read partial[0])."""
    tid = cuda.threadIdx.x
    partial[tid] = local
    cuda.syncthreads()
    width = cuda.blockDim.x // 2
    while width > 0:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
        cuda.syncthreads()
        width //= 2
    return partial[0]


@cuda.jit(device=True, inline="always")
def _block_amax(x, token, head, start, length, partial):
    local = ZERO
    for i in range(cuda.threadIdx.x, length, cuda.blockDim.x):
        local = max(local, abs(np.float32(x[token, head, start + i])))
    return block_max(local, partial)


@cuda.jit(device=True, inline="always")
def _fp8_e4m3_encode(y):
    """The E4M3FN byte of a float32 y with |y| <= 448 (as kvlab.ref.quant.fp8_e4m3_encode)."""
    magnitude = abs(y)
    exponent = -6            # floor(log2 |y|), at least -6: found by doubling a power of two
    power = FP8_FIRST_POWER  # = 2**(exponent + 1)
    while exponent < 8 and magnitude >= power:
        exponent += 1
        power *= TWO
    steps = round(magnitude * (SIXTEEN / power))  # |y| / 2**(exponent - 3), exact, then RNE
    code = (exponent + 6) * 8 + steps
    if math.copysign(ONE, y) < ZERO:  # the sign bit: -0.0 is 0x80, as in the reference
        code += 128
    return code


@cuda.jit(device=True, inline="always")
def _fp8_e4m3_decode(code):
    """The float32 value of an E4M3FN byte (as kvlab.ref.quant.fp8_e4m3_decode), by bits: the
    code's 4 exponent and 3 mantissa bits shifted into float32's exponent and mantissa fields
    make a float32 worth the value x 2^-120 — exact for normal and subnormal codes alike — so one
    multiply by 2^120 finishes it. (The first decode looped once per exponent step, a cost that
    depended on the data; the second looked the power of two up in a table, which Numba puts in
    constant memory, where a warp whose lanes read different entries waits for each in turn.)"""
    c = np.int32(code)
    if (c & 127) == 127:
        magnitude = FP8_NAN
    else:
        magnitude = float_from_bits((c & 127) << 20) * TWO_POW_120
    if c >= 128:
        magnitude = -magnitude
    return magnitude


# --- write_kv_quant (and quantize, a write into a pool of T blocks of one slot) ---------------
#
#   grid: (T tokens, Hkv heads); block (t, h) owns the vector k[t, h, :]:
#     1. amax = _block_amax(...)                       (log2(B) + 1 barriers)
#     2. scale = max(amax, 1e-8) / qmax                every thread computes the same float32
#     3. thread 0: scales[block, offset, h] = scale    stored as fp16
#     4. thread i: pool[block, offset, h, d] = encode(clip(k[t, h, d] / scale)) for its d's
#   block, offset = divmod(slots[t], block_size); a negative slot returns before any barrier
#   (the whole thread block returns together, so no thread waits at a barrier alone).

_WRITE_SIG = ("void({x}[:, :, ::1], {code}[:, :, :, ::1], float16[:, :, ::1], int32[::1], "
              "boolean)")


@kernel(*_signatures(_WRITE_SIG, x=_INPUTS, code=("int8", "uint8")))
def write_quant_kernel(x, pool, scales, slots, is_fp8):
    token = cuda.blockIdx.x
    head = cuda.blockIdx.y
    slot = slots[token]
    if slot < 0:
        return
    block = slot // pool.shape[1]
    offset = slot % pool.shape[1]
    partial = cuda.shared.array(THREADS_PER_BLOCK, np.float32)
    amax = _block_amax(x, token, head, 0, x.shape[2], partial)
    qmax = QMAX_FP8 if is_fp8 else QMAX_INT8
    scale = max(amax, AMAX_FLOOR) / qmax
    if cuda.threadIdx.x == 0:
        scales[block, offset, head] = scale
    for d in range(cuda.threadIdx.x, x.shape[2], cuda.blockDim.x):
        y = min(max(np.float32(x[token, head, d]) / scale, -qmax), qmax)
        if is_fp8:
            pool[block, offset, head, d] = _fp8_e4m3_encode(y)
        else:
            pool[block, offset, head, d] = round(y)  # half to even, as the reference


# --- the value check: one flag per call --------------------------------------------------------
#
#   grid: one block per token; threads stride over its Hkv * D elements. Any element that is NaN,
#   inf or beyond `limit` sets flag[0] = 1 (every writer writes the same 1, so the race is benign).

@kernel(*_signatures("void({x}[:, :, ::1], float32, int32[::1])", x=_INPUTS))
def out_of_range_kernel(x, limit, flag):
    token = cuda.blockIdx.x
    head_dim = x.shape[2]
    for element in range(cuda.threadIdx.x, x.shape[1] * head_dim, cuda.blockDim.x):
        value = abs(np.float32(x[token, element // head_dim, element % head_dim]))
        if not (value <= limit):  # NaN compares False: caught here too
            flag[0] = 1


def _check_values(name: str | list[str], x: Any, dt) -> None:
    """ValueError (nothing written) if x holds NaN, inf or |x| > dt.max_input; reads back 4 bytes.
    ``x`` ``[T, heads, D]``; ``name`` may be a list of names, one per part of the heads axis
    (equal parts: K and V of a packed row), checked in one launch and named apart on failure."""
    flag = error_flag()
    _launch(out_of_range_kernel, (x.shape[0],), x, np.float32(dt.max_input), flag)
    if read_and_reset_flag(flag):
        host = x if isinstance(x, np.ndarray) else x.copy_to_host()  # (Numba copies a host x in)
        names = [name] if isinstance(name, str) else name
        width = host.shape[1] // len(names)
        for i, part in enumerate(names):
            raise_for_values(part, host[:, i * width:(i + 1) * width], dt)


def check_values(x: Any, kv_dtype: str, name: str = "x") -> None:
    """ValueError unless ``kv_dtype`` can store every value of ``x`` (float16/float32
    ``[T, Hkv, D]``): no NaN, no inf, no ``|x|`` past the dtype's limit (``qmax * 65504``, where
    the fp16 scale overflows). The message calls the array ``name`` and gives its first bad
    element. What quantize and write_kv_quant run first; a cache that writes several layers calls
    it on every layer before it writes any. On the device, one flag read back."""
    _check_values(name, x, check_quantize(x, kv_dtype, name))


def write_kv_quant(k: Any, v: Any, k_pool: Any, v_pool: Any, k_scales: Any, v_scales: Any,
                   slots: Any, kv_dtype: str) -> None:
    """Quantize K and V into slots ``slots[t]`` of a quantized pool, in place; slot < 0 skipped.

    Parameters as :func:`kvlab.ref.quant.write_kv_quant` (device arrays).
    """
    dt = check_write_kv_quant(k, v, k_pool, v_pool, k_scales, v_scales, slots, kv_dtype)
    _check_values("k", k, dt)
    _check_values("v", v, dt)
    grid = (k.shape[0], k.shape[1])
    is_fp8 = kv_dtype == "fp8_e4m3"
    _launch(write_quant_kernel, grid, k, k_pool, k_scales, slots, is_fp8)
    _launch(write_quant_kernel, grid, v, v_pool, v_scales, slots, is_fp8)


# --- int4: one block per (token, head, group of 32) -------------------------------------------
#
#   thread i packs pairs p = i, i + B, ...: elements 2p (low nibble) and 2p + 1 (high nibble)

@kernel(*_signatures("void({x}[:, :, ::1], uint8[:, :, ::1], float16[:, :, ::1])", x=_INPUTS))
def quantize_int4_kernel(x, codes, scales):
    token = cuda.blockIdx.x
    head = cuda.blockIdx.y
    group = cuda.blockIdx.z
    start = group * INT4_GROUP
    partial = cuda.shared.array(THREADS_PER_BLOCK, np.float32)
    amax = _block_amax(x, token, head, start, INT4_GROUP, partial)
    scale = max(amax, AMAX_FLOOR) / QMAX_INT4
    if cuda.threadIdx.x == 0:
        scales[token, head, group] = scale
    for pair in range(cuda.threadIdx.x, INT4_GROUP // 2, cuda.blockDim.x):
        d = start + 2 * pair
        low = round(min(max(np.float32(x[token, head, d]) / scale, -QMAX_INT4), QMAX_INT4))
        high = round(min(max(np.float32(x[token, head, d + 1]) / scale, -QMAX_INT4), QMAX_INT4))
        codes[token, head, d // 2] = (low & 15) | ((high & 15) << 4)


def quantize(x: Any, kv_dtype: str) -> tuple[Any, Any]:
    """``(codes, scales)`` of x as new device arrays; as :func:`kvlab.ref.quant.quantize`.

    int8 and fp8 reuse the cache-write kernel: quantizing T tokens is writing them into a pool of
    T blocks of one slot each, slot t for token t.
    """
    dt = check_quantize(x, kv_dtype)
    _check_values("x", x, dt)
    num_tokens, num_kv_heads, head_dim = x.shape
    if kv_dtype == "int4":
        codes = cuda.device_array((num_tokens, num_kv_heads, head_dim // 2), dtype=np.uint8)
        groups = head_dim // INT4_GROUP
        scales = cuda.device_array((num_tokens, num_kv_heads, groups), dtype=np.float16)
        _launch(quantize_int4_kernel, (num_tokens, num_kv_heads, groups), x, codes, scales)
        return codes, scales
    codes = cuda.device_array((num_tokens, 1, num_kv_heads, head_dim), dtype=dt.storage)
    scales = cuda.device_array((num_tokens, 1, num_kv_heads), dtype=np.float16)
    slots = cuda.to_device(np.arange(num_tokens, dtype=np.int32))
    _launch(write_quant_kernel, (num_tokens, num_kv_heads), x, codes, scales, slots,
            kv_dtype == "fp8_e4m3")
    return (codes.reshape(num_tokens, num_kv_heads, head_dim),
            scales.reshape(num_tokens, num_kv_heads))


# --- dequantize: one thread block per token, threads over its Hkv * D outputs ------------------

@kernel("void(int8[:, :, ::1], float16[:, ::1], boolean, float32[:, :, ::1])",
        "void(uint8[:, :, ::1], float16[:, ::1], boolean, float32[:, :, ::1])")
def dequantize_8bit_kernel(codes, scales, is_fp8, out):
    """int8 codes, or fp8 bytes (``is_fp8``), times their (token, head) scale."""
    token = cuda.blockIdx.x
    head_dim = out.shape[2]
    for element in range(cuda.threadIdx.x, out.shape[1] * head_dim, cuda.blockDim.x):
        head = element // head_dim
        d = element % head_dim
        code = codes[token, head, d]
        value = _fp8_e4m3_decode(code) if is_fp8 else np.float32(code)
        out[token, head, d] = value * np.float32(scales[token, head])


@kernel("void(uint8[:, :, ::1], float16[:, :, ::1], float32[:, :, ::1])")
def dequantize_int4_kernel(codes, scales, out):
    token = cuda.blockIdx.x
    head_dim = out.shape[2]
    for element in range(cuda.threadIdx.x, out.shape[1] * head_dim, cuda.blockDim.x):
        head = element // head_dim
        d = element % head_dim
        nibble = (np.int32(codes[token, head, d // 2]) >> (4 * (d % 2))) & 15
        if nibble >= 8:  # 4-bit two's complement
            nibble -= 16
        out[token, head, d] = np.float32(nibble) * np.float32(scales[token, head, d // INT4_GROUP])


def dequantize(codes: Any, scales: Any, kv_dtype: str) -> Any:
    """float32 ``[T, Hkv, D]`` as a new device array; as :func:`kvlab.ref.quant.dequantize`."""
    check_dequantize(codes, scales, kv_dtype)
    num_tokens, num_kv_heads, code_bytes = codes.shape
    head_dim = code_bytes * 2 if kv_dtype == "int4" else code_bytes
    out = cuda.device_array((num_tokens, num_kv_heads, head_dim), dtype=np.float32)
    if kv_dtype == "int4":
        _launch(dequantize_int4_kernel, (num_tokens,), codes, scales, out)
    else:
        _launch(dequantize_8bit_kernel, (num_tokens,), codes, scales, kv_dtype == "fp8_e4m3", out)
    return out


# --- gather_kv_quant: gather_kv's grid, dequantizing on the way out ----------------------------
#
#   one block per output row r (sequence, position), as kvlab.kernels.cuda.paging.gather_kv_kernel;
#   thread i: out[r, h, d] = decode(pool[block, offset, h, d]) * scales[block, offset, h]

@kernel(*_signatures("void({code}[:, :, :, ::1], float16[:, :, ::1], int32[:, ::1], int32[::1], "
                     "int32, float32[:, :, ::1])", code=("int8", "uint8")))
def gather_dequant_kernel(pool, scales, block_tables, context_lens, is_fp8, out):
    row = cuda.blockIdx.x
    seq = 0
    pos = row
    while pos >= context_lens[seq]:
        pos -= context_lens[seq]
        seq += 1
    block = block_tables[seq, pos // pool.shape[1]]
    offset = pos % pool.shape[1]
    head_dim = out.shape[2]
    for element in range(cuda.threadIdx.x, out.shape[1] * head_dim, cuda.blockDim.x):
        head = element // head_dim
        d = element % head_dim
        if is_fp8:
            value = _fp8_e4m3_decode(pool[block, offset, head, d])
        else:
            value = np.float32(pool[block, offset, head, d])
        out[row, head, d] = value * np.float32(scales[block, offset, head])


def gather_kv_quant(k_pool: Any, v_pool: Any, k_scales: Any, v_scales: Any, block_table: Any,
                    context_len: Any, kv_dtype: str) -> tuple[Any, Any]:
    """Sequences' K and V dequantized into new float32 device arrays ``[sum(len), Hkv, D]``.

    Parameters as :func:`kvlab.ref.quant.gather_kv_quant`.
    """
    _, context_lens = check_gather_kv_quant(k_pool, v_pool, k_scales, v_scales, block_table,
                                            context_len, kv_dtype)
    if len(block_table.shape) == 1:
        block_table = block_table.reshape(*table_shape(block_table))
        context_len = cuda.to_device(np.array([context_len], dtype=np.int32))
    out_shape = (int(context_lens.sum()), k_pool.shape[2], k_pool.shape[3])
    is_fp8 = np.int32(kv_dtype == "fp8_e4m3")
    outs = []
    for pool, scales in ((k_pool, k_scales), (v_pool, v_scales)):
        out = cuda.device_array(out_shape, dtype=np.float32)
        _launch(gather_dequant_kernel, (out_shape[0],), pool, scales, block_table, context_len,
                is_fp8, out)
        outs.append(out)
    return outs[0], outs[1]


# --- copy_blocks_quant: copy_blocks' grid, codes and scales -----------------------------------

@kernel(*_signatures("void({code}[:, :, :, ::1], {code}[:, :, :, ::1], float16[:, :, ::1], "
                     "float16[:, :, ::1], int32[::1], int32[::1])", code=("int8", "uint8")))
def copy_blocks_quant_kernel(k_pool, v_pool, k_scales, v_scales, src, dst):
    pair = cuda.blockIdx.x
    offset = cuda.blockIdx.y
    from_block = src[pair]
    to_block = dst[pair]
    head_dim = k_pool.shape[3]
    for element in range(cuda.threadIdx.x, k_pool.shape[2] * head_dim, cuda.blockDim.x):
        head = element // head_dim
        d = element % head_dim
        k_pool[to_block, offset, head, d] = k_pool[from_block, offset, head, d]
        v_pool[to_block, offset, head, d] = v_pool[from_block, offset, head, d]
        if d == 0:
            k_scales[to_block, offset, head] = k_scales[from_block, offset, head]
            v_scales[to_block, offset, head] = v_scales[from_block, offset, head]


def copy_blocks_quant(k_pool: Any, v_pool: Any, k_scales: Any, v_scales: Any, src: Any, dst: Any,
                      kv_dtype: str) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` of a quantized pool, codes and scales, in place.

    Parameters as :func:`kvlab.ref.quant.copy_blocks_quant` (device arrays).
    """
    check_copy_blocks_quant(k_pool, v_pool, k_scales, v_scales, src, dst, kv_dtype)
    _launch(copy_blocks_quant_kernel, (src.shape[0], k_pool.shape[1]),
            k_pool, v_pool, k_scales, v_scales, src, dst)
