"""Warp-level building blocks of the newest kernels, on a GPU and in the simulator.

Numba's CUDA simulator runs every thread as a Python thread and has no warp shuffles, and Numba has
no 16-byte load and no fp16-bits-to-float conversion. This module gives each of them one name
with two bodies, chosen once by ``kvlab.kernels.cuda.MODE``:

- **lane exchange** — ``publish(values, n, scratch)``, ``fetch(values, slot, src_lane, scratch)``,
  ``done(scratch)``. A kernel exchanges values between the lanes of a warp as::

      publish(mine, n, scratch)                 # offer mine[0 .. n-1]
      x = fetch(mine, i, lane ^ 4, scratch)     # lane (lane ^ 4)'s mine[i]
      done(scratch)                             # before mine is offered again

  On a GPU ``fetch`` is one ``shfl.sync`` (``publish`` and ``done`` are empty); in the simulator
  ``publish`` writes the values to shared memory and waits at a barrier, ``fetch`` reads another
  lane's copy and ``done`` waits again. So the simulator runs the kernel's *own* lane logic —
  which lane ends up with which partial sum — and a test against NumPy checks it, at two
  barriers per exchange (a barrier costs the simulator milliseconds, so a kernel exchanges
  whole arrays at once). Every lane of the block must make the same exchanges in the same
  order, as a full-mask shuffle requires of a warp. ``scratch`` is a float32 shared array
  ``[threads per block, SCRATCH_SLOTS]`` in the simulator (``scratch_shape``), a dummy on a GPU.
- **16-byte loads** — ``load16(words, i)``: the four uint32 ``words[i .. i+3]`` (``i`` a
  multiple of 4 of a 16-byte aligned 1-D array) in one ``ld.global.nc.v4.u32``, built with
  llvmlite inline assembly the way numba-cuda builds its cache-hint loads.
- **16-byte stores** — ``store16(words, i, a, b, c, d)``: one ``st.global.v4.u32``.
- **fp16 pairs** — ``halves(word)``: the two fp16 values a uint32 holds (low half first) as
  float32, by two ``cvt.f32.f16`` (the older kernels decode fp16 bits with integer steps);
  ``pack_halves(a, b)``: two float32 rounded to fp16 (to nearest, ties to even, as NumPy's
  ``astype``) in one uint32, ``a`` in the low half; ``bits_of(x)``: a float32's 32 bits.
- **int8 quads** — ``int8s(word)``: the four signed bytes of a uint32 (lowest first) as float32
  in ~2 instructions each: flip the sign bits of all four at once (``b ^ 0x80`` = b + 128), place
  each byte under the exponent of 2^23 with one ``prmt`` (the float 2^23 + b + 128, exactly) and
  subtract 2^23 + 128 — where a byte-by-byte sign extension and ``cvt`` take ~4.
- **fp8 quads** — ``fp8s(word)``: the four E4M3FN bytes of a uint32 (lowest first) as float32:
  two ``cvt.rn.f16x2.e4m3x2`` (two bytes to two fp16 each, the low byte to the low half) and
  four ``cvt.f32.f16``, ~1.5 instructions a byte where the bit path takes ~6. The hardware has
  it from sm_89 (Ada, Hopper) on: :func:`has_fp8_cvt` says whether a kernel may use it.
- **arrays as words** — :func:`as_words`: a device array seen as one flat uint32 array (a view),
  or None when 16-byte accesses would fault.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvlab.kernels.cuda import MODE, cuda

FULL_MASK = 0xFFFFFFFF
WARP_LANES = 32 if MODE == "gpu" else 8  # the simulator's stand-in warp: fewer Python threads
SCRATCH_SLOTS = 128                      # values one lane can offer in one simulated exchange


def scratch_shape(threads: int) -> tuple[int, int]:
    """The shape of the ``scratch`` shared array a kernel of ``threads`` threads passes around."""
    return (threads, SCRATCH_SLOTS) if MODE != "gpu" else (1, 1)


def has_fp8_cvt(cc: tuple[int, int] | None = None) -> bool:
    """Whether compute capability ``cc`` (None: this process's GPU) converts fp8 in hardware
    (``cvt.rn.f16x2.e4m3x2``: sm_89 and newer). The simulator's ``fp8s`` is NumPy: always."""
    if cc is None:
        if MODE != "gpu":
            return True
        cc = cuda.get_current_device().compute_capability
    return tuple(cc) >= (8, 9)


def as_words(array: Any) -> Any:
    """``array`` as one flat uint32 array (a view, nothing copied), or None when a kernel cannot
    load or store it 16 bytes at a time: not on the device, or not 16-byte aligned (a GPU faults
    on a misaligned vector access). The simulator has no pointers to check."""
    if MODE == "gpu":
        if not cuda.is_cuda_array(array):
            return None
        array = cuda.as_cuda_array(array)
        if (array.device_ctypes_pointer.value or 0) % 16:
            return None
    return array.view(np.uint32).reshape(array.size * array.dtype.itemsize // 4)


if MODE == "gpu":
    from llvmlite import ir
    from numba import types
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic

    @cuda.jit(device=True, inline="always")
    def publish(values, n, scratch):
        pass

    @cuda.jit(device=True, inline="always")
    def fetch(values, slot, src_lane, scratch):
        return cuda.shfl_sync(FULL_MASK, values[slot], src_lane)

    @cuda.jit(device=True, inline="always")
    def done(scratch):
        pass

    @intrinsic
    def load16(typingctx, words, index):
        """``(words[index], ..., words[index + 3])`` by one 16-byte non-coherent global load."""
        if not (isinstance(words, types.Array) and words.dtype == types.uint32
                and words.ndim == 1 and isinstance(index, types.Integer)):
            return None
        result = types.UniTuple(types.uint32, 4)

        def codegen(context, builder, sig, args):
            array = context.make_array(sig.args[0])(context, builder, value=args[0])
            offset = context.cast(builder, args[1], sig.args[1], types.intp)
            pointer = builder.gep(array.data, [offset])
            i32 = ir.IntType(32)
            asm_type = ir.FunctionType(ir.LiteralStructType([i32] * 4), [pointer.type])
            asm = ir.InlineAsm(asm_type, "ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4];",
                               "=r,=r,=r,=r,l")
            loaded = builder.call(asm, [pointer])
            return context.make_tuple(builder, result,
                                      [builder.extract_value(loaded, k) for k in range(4)])

        return result(words, index), codegen

    @cuda.jit(device=True, inline="always")
    def bits_of(x):
        return np.uint32(libdevice.float_as_int(x))

    @intrinsic
    def store16(typingctx, words, index, a, b, c, d):
        """``words[index .. index + 3] = a, b, c, d`` by one 16-byte global store."""
        if not (isinstance(words, types.Array) and words.dtype == types.uint32
                and words.ndim == 1 and isinstance(index, types.Integer)
                and all(x == types.uint32 for x in (a, b, c, d))):
            return None

        def codegen(context, builder, sig, args):
            array = context.make_array(sig.args[0])(context, builder, value=args[0])
            offset = context.cast(builder, args[1], sig.args[1], types.intp)
            pointer = builder.gep(array.data, [offset])
            i32 = ir.IntType(32)
            asm_type = ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32, i32])
            asm = ir.InlineAsm(asm_type, "st.global.v4.u32 [$0], {$1, $2, $3, $4};",
                               "l,r,r,r,r", side_effect=True)
            builder.call(asm, [pointer, *args[2:]])
            return context.get_dummy_value()

        return types.void(words, index, a, b, c, d), codegen

    @intrinsic
    def pack_halves(typingctx, a, b):
        """float32 ``a``, ``b`` -> fp16 bits in one uint32 (``a`` low)."""
        if a != types.float32 or b != types.float32:
            return None

        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            asm_type = ir.FunctionType(ir.IntType(32), [f32, f32])
            asm = ir.InlineAsm(asm_type, "{.reg .b16 lo, hi; cvt.rn.f16.f32 lo, $1; "
                                         "cvt.rn.f16.f32 hi, $2; mov.b32 $0, {lo, hi};}", "=r,f,f")
            return builder.call(asm, list(args))

        return types.uint32(a, b), codegen

    @intrinsic
    def int8s(typingctx, word):
        """The four signed bytes in a uint32 (lowest first) as float32."""
        if word != types.uint32:
            return None
        result = types.UniTuple(types.float32, 4)
        body = "{.reg .b32 x; xor.b32 x, $4, 0x80808080; "
        for k in range(4):  # 0x4B0000XX is the float 2^23 + byte k of x; minus 2^23 + 128
            body += f"prmt.b32 ${k}, x, 0x4B000000, 0x744{k}; sub.rn.f32 ${k}, ${k}, 0f4B000080; "
        body += "}"

        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            asm_type = ir.FunctionType(ir.LiteralStructType([f32] * 4), [ir.IntType(32)])
            asm = ir.InlineAsm(asm_type, body, "=f,=f,=f,=f,r")
            quad = builder.call(asm, [args[0]])
            return context.make_tuple(builder, result,
                                      [builder.extract_value(quad, k) for k in range(4)])

        return result(word), codegen

    @intrinsic
    def fp8s(typingctx, word):
        """The four E4M3FN bytes in a uint32 (lowest first) as float32 (sm_89+)."""
        if word != types.uint32:
            return None
        result = types.UniTuple(types.float32, 4)
        body = ("{.reg .b16 lo, hi, h0, h1, h2, h3; .reg .b32 a, b; mov.b32 {lo, hi}, $4; "
                "cvt.rn.f16x2.e4m3x2 a, lo; cvt.rn.f16x2.e4m3x2 b, hi; "
                "mov.b32 {h0, h1}, a; mov.b32 {h2, h3}, b; cvt.f32.f16 $0, h0; "
                "cvt.f32.f16 $1, h1; cvt.f32.f16 $2, h2; cvt.f32.f16 $3, h3;}")

        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            asm_type = ir.FunctionType(ir.LiteralStructType([f32] * 4), [ir.IntType(32)])
            quad = builder.call(ir.InlineAsm(asm_type, body, "=f,=f,=f,=f,r"), [args[0]])
            return context.make_tuple(builder, result,
                                      [builder.extract_value(quad, k) for k in range(4)])

        return result(word), codegen

    @intrinsic
    def halves(typingctx, word):
        """The two fp16 numbers in a uint32 (low 16 bits first) as float32."""
        if word != types.uint32:
            return None
        result = types.UniTuple(types.float32, 2)

        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            asm_type = ir.FunctionType(ir.LiteralStructType([f32, f32]), [ir.IntType(32)])
            asm = ir.InlineAsm(asm_type, "{.reg .b16 lo, hi; mov.b32 {lo, hi}, $2; "
                                         "cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi;}", "=f,=f,r")
            pair = builder.call(asm, [args[0]])
            return context.make_tuple(builder, result,
                                      [builder.extract_value(pair, k) for k in range(2)])

        return result(word), codegen

else:
    from kvlab.ref.quant import fp8_e4m3_decode

    @cuda.jit(device=True, inline="always")
    def publish(values, n, scratch):
        tid = cuda.threadIdx.x
        for i in range(n):
            scratch[tid, i] = values[i]
        cuda.syncthreads()

    @cuda.jit(device=True, inline="always")
    def fetch(values, slot, src_lane, scratch):
        tid = cuda.threadIdx.x
        return np.float32(scratch[tid - tid % WARP_LANES + src_lane, slot])

    @cuda.jit(device=True, inline="always")
    def done(scratch):
        cuda.syncthreads()

    @cuda.jit(device=True, inline="always")
    def load16(words, index):
        return words[index], words[index + 1], words[index + 2], words[index + 3]

    @cuda.jit(device=True, inline="always")
    def bits_of(x):
        return np.float32(x).view(np.uint32)

    @cuda.jit(device=True, inline="always")
    def store16(words, index, a, b, c, d):
        words[index], words[index + 1], words[index + 2], words[index + 3] = a, b, c, d

    @cuda.jit(device=True, inline="always")
    def halves(word):
        pair = np.array([word], np.uint32).view(np.float16).astype(np.float32)
        return pair[0], pair[1]

    @cuda.jit(device=True, inline="always")
    def int8s(word):
        quad = np.array([word], np.uint32).view(np.int8).astype(np.float32)
        return quad[0], quad[1], quad[2], quad[3]

    @cuda.jit(device=True, inline="always")
    def fp8s(word):
        quad = fp8_e4m3_decode(np.array([word], np.uint32).view(np.uint8))
        return quad[0], quad[1], quad[2], quad[3]

    @cuda.jit(device=True, inline="always")
    def pack_halves(a, b):
        return np.array([a, b], np.float32).astype(np.float16).view(np.uint32)[0]
