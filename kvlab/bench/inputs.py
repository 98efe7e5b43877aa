"""The data every stage times on, built once per process from a seeded generator: the decode batch
(block tables, fp16 / int8 / fp8 pools) and the prefill (packed QKV, split q/k/v, slots, RoPE
tables)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from kvlab.bench.context import Ctx
from kvlab.bench.presets import THETA


def _random_bytes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random bytes; beyond 16 MB a random chunk of odd length repeats (the values do not change
    a timing, and drawing a gigabyte would take a GPU run's budget)."""
    n = math.prod(shape)
    chunk = np.frombuffer(rng.bytes(min(n, 16 * 1024**2 + 1)), np.uint8)
    return (chunk if chunk.size == n else np.resize(chunk, n)).reshape(shape)


_LEVELS = np.linspace(-1, 1, 256).astype(np.float16)


def _rand_f16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random fp16 in [-1, 1] (256 levels: timing needs no more), fast for a gigabyte of K/V."""
    return _LEVELS[_random_bytes(rng, shape)]


def _rand_int8_codes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random int8 codes in -127..127 (the int8 KV range)."""
    return np.maximum(_random_bytes(rng, shape).view(np.int8), -127)


def _fp8_codes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random E4M3 bytes, all finite: every exponent and mantissa, NaN codes moved one down."""
    codes = _random_bytes(rng, shape).copy()
    codes[(codes & 0x7F) == 0x7F] -= 1
    return codes


def decode_batch(ctx: Ctx) -> dict[str, Any]:
    """The decode batch: shuffled block tables, fp16 pools, int8 pools (random codes + scales)."""
    s = ctx.shape
    rng = ctx.rng(1)
    b, n, h, d, bs = s["num_seqs"], s["context_len"], s["num_kv_heads"], s["head_dim"], s["block_size"]
    per_seq = -(-n // bs)
    num_blocks = b * per_seq
    pool_shape = (num_blocks, bs, h, d)
    tables = rng.permutation(num_blocks).astype(np.int32).reshape(b, per_seq)
    return dict(
        tables=tables,
        lens=np.full(b, n, np.int32),
        query_start=np.arange(b + 1, dtype=np.int32),
        q=_rand_f16(rng, (b, h * s["group"], d)),
        k_pool=_rand_f16(rng, pool_shape), v_pool=_rand_f16(rng, pool_shape),
        k_codes=_rand_int8_codes(rng, pool_shape), v_codes=_rand_int8_codes(rng, pool_shape),
        # fp8_e4m3 codes: every byte but the NaN codes 0x7f / 0xff (moved to 0x7e / 0xfe, ±448)
        k_fp8=_fp8_codes(rng, pool_shape), v_fp8=_fp8_codes(rng, pool_shape),
        k_scales=(_rand_f16(rng, pool_shape[:3]) + 1.5) / 128,   # 0.004 .. 0.02, fp16
        v_scales=(_rand_f16(rng, pool_shape[:3]) + 1.5) / 128,
    )


def prefill_batch(ctx: Ctx) -> dict[str, Any]:
    """A prefill of ``prefill`` tokens of one sequence: packed QKV, split q/k/v, a shuffled table."""
    from kvlab.ref.paging import slot_mapping
    from kvlab.ref.rope import rope_tables

    s = ctx.shape
    rng = ctx.rng(2)
    t, h, d, bs = s["prefill"], s["num_kv_heads"], s["head_dim"], s["block_size"]
    hq = h * s["group"]
    num_blocks = -(-t // bs)
    table = rng.permutation(num_blocks).astype(np.int32)
    positions = np.arange(t, dtype=np.int32)
    qkv = _rand_f16(rng, (t, (hq + 2 * h) * d))
    cos, sin = rope_tables(t, d, THETA)
    return dict(
        qkv=qkv, q=np.ascontiguousarray(qkv[:, :hq * d].reshape(t, hq, d)),
        k=np.ascontiguousarray(qkv[:, hq * d:(hq + h) * d].reshape(t, h, d)),
        v=np.ascontiguousarray(qkv[:, (hq + h) * d:].reshape(t, h, d)),
        table=table, positions=positions, slots=slot_mapping(table, positions, bs),
        pool_shape=(num_blocks, bs, h, d), cos=cos, sin=sin,
        q_norm_w=(1 + rng.random(d, dtype=np.float32) / 8), k_norm_w=(1 + rng.random(d, dtype=np.float32) / 8),
    )
