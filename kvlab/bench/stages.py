"""The paging, quantization and RoPE stages: each op timed as a user calls it, on this backend and
on the other one with the same data (:meth:`~kvlab.bench.context.Ctx.pair`)."""
from __future__ import annotations

import numpy as np

from kvlab.bench.context import Ctx
from kvlab.bench.inputs import decode_batch, prefill_batch
from kvlab.bench.traffic import (
    bytes_apply_rope, bytes_copy_blocks, bytes_dequantize, bytes_gather_kv, bytes_gather_kv_quant,
    bytes_quantize, bytes_slot_mapping, bytes_write_kv, bytes_write_kv_quant,
)


def bench_paging(ctx: Ctx) -> None:
    s = ctx.shape
    h, d, bs, t = s["num_kv_heads"], s["head_dim"], s["block_size"], s["prefill"]
    pre = ctx.data("prefill", lambda: prefill_batch(ctx))
    dec = ctx.data("decode", lambda: decode_batch(ctx))
    lens = [s["context_len"]] * s["num_seqs"]

    def write(be):
        k, v, slots = be.asarray(pre["k"]), be.asarray(pre["v"]), be.asarray(pre["slots"])
        kp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
        vp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
        return lambda: be.paging.write_kv(k, v, kp, vp, slots)

    ctx.pair("paging", "write_kv", f"T={t} Hkv={h} D={d} fp16", bytes_write_kv(t, h, d, 2), write)

    def slots(be):
        table, pos = be.asarray(pre["table"]), be.asarray(pre["positions"])
        return lambda: be.paging.slot_mapping(table, pos, bs)

    ctx.pair("paging", "slot_mapping", f"T={t} bs={bs}", bytes_slot_mapping(t), slots)

    def gather(be):
        kp, vp = be.asarray(dec["k_pool"]), be.asarray(dec["v_pool"])
        tables, ln = be.asarray(dec["tables"]), be.asarray(dec["lens"])
        return lambda: be.paging.gather_kv(kp, vp, tables, ln)

    ctx.pair("paging", "gather_kv", f"B={s['num_seqs']}x{s['context_len']} Hkv={h} D={d} fp16",
             bytes_gather_kv(lens, bs, h, d, 2), gather)

    n = min(s["copy_blocks"], dec["tables"].size // 2)

    def copy(be):
        kp, vp = be.asarray(dec["k_pool"]), be.asarray(dec["v_pool"])
        src = be.asarray(np.arange(n, dtype=np.int32))
        dst = be.asarray(np.arange(n, 2 * n, dtype=np.int32))
        return lambda: be.paging.copy_blocks(kp, vp, src, dst)

    ctx.pair("paging", "copy_blocks", f"N={n} bs={bs} Hkv={h} D={d} fp16",
             bytes_copy_blocks(n, bs, h, d, 2), copy)


def bench_quant(ctx: Ctx) -> None:
    s = ctx.shape
    h, d, bs, t = s["num_kv_heads"], s["head_dim"], s["block_size"], s["prefill"]
    pre = ctx.data("prefill", lambda: prefill_batch(ctx))
    dec = ctx.data("decode", lambda: decode_batch(ctx))
    codes = pre["k"].astype(np.int8)  # any codes: dequantize does no checking of values
    scales = np.full((t, h), 0.01, np.float16)
    lens = [s["context_len"]] * s["num_seqs"]

    def quantize(be):
        k = be.asarray(pre["k"])
        return lambda: be.quant.quantize(k, "int8")

    ctx.pair("quant", "quantize", f"T={t} Hkv={h} D={d} fp16->int8",
             bytes_quantize(t, h, d, 2), quantize)

    def dequantize(be):
        c, sc = be.asarray(codes), be.asarray(scales)
        return lambda: be.quant.dequantize(c, sc, "int8")

    ctx.pair("quant", "dequantize", f"T={t} Hkv={h} D={d} int8->fp32",
             bytes_dequantize(t, h, d), dequantize)

    def write(be):
        k, v, slots = be.asarray(pre["k"]), be.asarray(pre["v"]), be.asarray(pre["slots"])
        kp = be.asarray(np.zeros(pre["pool_shape"], np.int8))
        vp = be.asarray(np.zeros(pre["pool_shape"], np.int8))
        ks = be.asarray(np.zeros(pre["pool_shape"][:3], np.float16))
        vs = be.asarray(np.zeros(pre["pool_shape"][:3], np.float16))
        return lambda: be.quant.write_kv_quant(k, v, kp, vp, ks, vs, slots, "int8")

    ctx.pair("quant", "write_kv_quant", f"T={t} Hkv={h} D={d} fp16->int8",
             bytes_write_kv_quant(t, h, d, 2), write)

    def gather(be):
        arrays = [be.asarray(dec[name]) for name in ("k_codes", "v_codes", "k_scales", "v_scales",
                                                     "tables", "lens")]
        return lambda: be.quant.gather_kv_quant(*arrays, "int8")

    ctx.pair("quant", "gather_kv_quant",
             f"B={s['num_seqs']}x{s['context_len']} Hkv={h} D={d} int8->fp32",
             bytes_gather_kv_quant(lens, bs, h, d), gather)


def bench_rope(ctx: Ctx) -> None:
    s = ctx.shape
    d, t = s["head_dim"], s["prefill"]
    hq = s["num_kv_heads"] * s["group"]
    pre = ctx.data("prefill", lambda: prefill_batch(ctx))

    def rope(be):
        q, pos = be.asarray(pre["q"]), be.asarray(pre["positions"])
        cos, sin = be.asarray(pre["cos"]), be.asarray(pre["sin"])
        return lambda: be.rope.apply_rope(q, cos, sin, pos)

    ctx.pair("rope", "apply_rope", f"T={t} H={hq} D={d} fp16 neox", bytes_apply_rope(t, hq, d, 2),
             rope)
