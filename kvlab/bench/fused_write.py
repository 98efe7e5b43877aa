"""The fused-write stage: the fused QKV -> cache write against the unfused ops (RoPE on Q, RoPE on
K, slot mapping, write), and on the cuda backend the fused kernel alone over TOKENS_SWEEP against
the unfused sequence's four kernels alone."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kvlab.bench.context import Ctx
from kvlab.bench.inputs import prefill_batch
from kvlab.bench.presets import EPS, TOKENS_SWEEP


def bench_fused_write(ctx: Ctx) -> None:
    from kvlab.ref.fused_write import write_traffic

    s = ctx.shape
    h, d, bs, t = s["num_kv_heads"], s["head_dim"], s["block_size"], s["prefill"]
    hq = h * s["group"]
    pre = ctx.data("prefill", lambda: prefill_batch(ctx))
    shape = f"T={t} Hq={hq} Hkv={h} D={d} fp16"

    def traffic(mode: int, step: str) -> int:
        steps = write_traffic(t, hq, h, d, qk_mode=mode)
        return steps[step]["read"] + steps[step]["write"]

    def fused(mode: int):
        def make(be):
            qkv, table = be.asarray(pre["qkv"]), be.asarray(pre["table"])
            cos, sin = be.asarray(pre["cos"]), be.asarray(pre["sin"])
            qw = be.asarray(pre["q_norm_w"]) if mode == 1 else None
            kw = be.asarray(pre["k_norm_w"]) if mode == 1 else None
            kp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
            vp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
            return lambda: be.fused_write.paged_write(qkv, qw, kw, cos, sin, kp, vp, table, 0, hq,
                                                      h, EPS, mode)
        return make

    def unfused(be):
        """RoPE on Q, RoPE on K, slot mapping, write K and V: the same result as qk_mode 2,
        one op (one launch or more) per step, from q, k, v already split (views cost nothing)."""
        q, k, v = be.asarray(pre["q"]), be.asarray(pre["k"]), be.asarray(pre["v"])
        cos, sin = be.asarray(pre["cos"]), be.asarray(pre["sin"])
        table, pos = be.asarray(pre["table"]), be.asarray(pre["positions"])
        kp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
        vp = be.asarray(np.zeros(pre["pool_shape"], np.float16))

        def run():
            q_out = be.rope.apply_rope(q, cos, sin, pos)
            k_rot = be.rope.apply_rope(k, cos, sin, pos)
            slots = be.paging.slot_mapping(table, pos, bs)
            be.paging.write_kv(k_rot, v, kp, vp, slots)
            return q_out
        return run

    base = ctx.run("fused_write", "unfused rope+write (qk_mode 2)", ctx.impl, ctx.timer,
                   unfused(ctx.backend), shape, traffic(2, "unfused"))
    mine = ctx.pair("fused_write", "fused paged_write (qk_mode 2)", shape, traffic(2, "fused"),
                    fused(2))
    ctx.compare(mine, base)
    ctx.pair("fused_write", "fused paged_write (qk_mode 1, Qwen3 norm)", shape,
             traffic(1, "fused"), fused(1))
    if ctx.backend.name == "cuda":
        from kvlab.kernels.cuda.fused_write import PAIRS_IN_REGISTERS, TOKENS_PER_BLOCK

        # kernels against kernels: the public ops above each check their arguments on the host
        unfused_alone = ctx.run("fused_write", "unfused kernels alone (qk_mode 2)", ctx.impl,
                                ctx.timer, _unfused_kernels_only(ctx, pre), shape,
                                traffic(2, "unfused"), baseline=base)
        for registers in (False, True):  # v3: heads carried in registers (no shared memory)
            for tokens in TOKENS_SWEEP[ctx.preset]:
                name = f"fused kernel alone (qk_mode 2) tokens/block={tokens}" + (
                    " in registers" if registers else "")
                kernel = ctx.run("fused_write", name, ctx.impl, ctx.timer,
                                 _fused_kernel_only(ctx, pre, hq, h, tokens, registers), shape,
                                 traffic(2, "fused"), baseline=unfused_alone)
                if (tokens, registers) == (TOKENS_PER_BLOCK, PAIRS_IN_REGISTERS):
                    ctx.compare(mine, kernel)  # < 1: what the op's checks and small copies cost
        ctx.run("fused_write", "fused kernel v4 alone (qk_mode 2) a warp per token", ctx.impl,
                ctx.timer, _fused_kernel_only(ctx, pre, hq, h, TOKENS_PER_BLOCK,
                                              PAIRS_IN_REGISTERS, version=4),
                shape, traffic(2, "fused"), baseline=unfused_alone)


def _unfused_kernels_only(ctx: Ctx, pre: dict[str, Any]) -> Callable[[], Any]:
    """The unfused sequence's four CUDA kernels (RoPE on Q, RoPE on K, slot mapping, write) launched
    directly, without the public ops' host-side checks: the fair baseline for the fused kernel
    alone. Outputs are allocated per call, as the ops (and the fused kernel) do."""
    from numba import cuda

    from kvlab.kernels.cuda import paging, rope

    be = ctx.backend
    q, k, v = be.asarray(pre["q"]), be.asarray(pre["k"]), be.asarray(pre["v"])
    cos, sin, pos = be.asarray(pre["cos"]), be.asarray(pre["sin"]), be.asarray(pre["positions"])
    table = be.asarray(pre["table"].reshape(1, -1))
    seq_ids = be.asarray(np.zeros(len(pre["positions"]), np.int32))
    kp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
    vp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
    num_tokens, block_size, rotary_dim = q.shape[0], pre["pool_shape"][1], q.shape[2]

    def rotate(x: Any) -> Any:
        out = cuda.device_array(x.shape, x.dtype)
        blocks = -(-(x.shape[0] * x.shape[1] * rotary_dim // 2) // rope.THREADS_PER_BLOCK)
        rope.apply_rope_kernel[blocks, rope.THREADS_PER_BLOCK](x, cos, sin, pos, rotary_dim,
                                                                False, out)
        return out

    def run() -> Any:
        q_out, k_rot = rotate(q), rotate(k)
        slots = cuda.device_array(num_tokens, np.int32)
        paging.slot_mapping_kernel[-(-num_tokens // paging.THREADS_PER_BLOCK),
                                   paging.THREADS_PER_BLOCK](table, pos, block_size, seq_ids,
                                                             slots)
        paging.write_kv_kernel[num_tokens, paging.THREADS_PER_BLOCK](k_rot, v, kp, vp, slots)
        return q_out
    return run


def _fused_kernel_only(ctx: Ctx, pre: dict[str, Any], hq: int, h: int,
                       tokens_per_block: int, registers: bool, version: int = 3
                       ) -> Callable[[], Any]:
    """kvlab.kernels.cuda.fused_write.launch on arguments checked once, outside the timing."""
    from kvlab.checks import check_fused_write
    from kvlab.kernels.cuda import fused_write
    from kvlab.ref.fused_write import _one_sequence

    be = ctx.backend
    qkv, cos, sin = be.asarray(pre["qkv"]), be.asarray(pre["cos"]), be.asarray(pre["sin"])
    kp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
    vp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
    table, starts, offsets = (be.asarray(a) for a in _one_sequence(pre["qkv"], pre["table"], 0))
    shape = check_fused_write(qkv, None, None, cos, sin, kp, vp, table, starts, offsets, hq, h,
                              EPS, 2, None, None, None)
    return lambda: fused_write.launch(qkv, None, None, cos, sin, kp, vp, None, None, table,
                                      starts, offsets, shape, EPS, 2, None, True,
                                      tokens_per_block, registers, version=version)
