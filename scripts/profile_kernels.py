"""Launch kvlab's main CUDA kernels once each at the benchmark's real shape, for a profiler; or
(``--host``) time the host side of the public ops part by part.

    ncu --profile-from-start off --kernel-name regex:'attention_v|fused_write' \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python3 scripts/profile_kernels.py

Every kernel is compiled and run once first (outside the profiled range: Numba compiles on the
first launch), then ``cuda.profile_start()`` opens the range and each kernel runs exactly once:
paged decode attention v2, v5, v6, v7 and v8 at 16 splits, v8 also at the split count of its
one-wave rule (8 x 32k cached tokens, 8 kv heads, GQA 4, head_dim 128, fp16, the bench's
``--size real``) and the fused write at 1 and 16 tokens per
block, at 16 with heads in registers (v3, what the public op launches) and v4, a warp per token,
on a 4k-token prefill (qk_mode 2). What the profiler reports —
achieved occupancy, memory throughput, why warps stall — is what notebooks 04 and 05 need to say
what limits each kernel.
scripts/gpu_check.sh runs this under ncu when ncu is installed. Needs a GPU.

``--host``: on the H100 (2026-11-27) the public fused write took 1.74 ms against 0.81 ms for its
kernel alone, and the public attention op 0.32 ms more than its kernel: host time during which
the GPU waits (on the H200, data/bench/h200_2026-11-27_host_overhead.txt: ~1.1 ms of host time
around a 0.2 ms fused kernel). This times each host-side part alone with ``time.perf_counter`` (the GPU idle
before each): the argument checks (they copy index arrays back), the small host-to-device copies,
the output's allocation (Numba has no caching allocator), the bare kernel launch, and the whole
op without and with a final synchronize — so the next change goes where the time is.
"""
from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import numpy as np

from kvlab.backends import get_backend
from kvlab.bench import EPS, PRESETS, THETA
from kvlab.checks import check_fused_write, check_paged_decode_attention
from kvlab.ref.fused_write import _one_sequence
from kvlab.ref.rope import rope_tables
from kvlab.step_plan import upload_together

SPLITS = 16
ATTENTION_VERSIONS = (2, 5, 6, 7, 8)
# (tokens per block, pairs in registers, version): v4 ignores the first two
FUSED_SETTINGS = ((1, False, 3), (16, False, 3), (16, True, 3), (16, True, 4))


def attention_arrays(be, rng: np.random.Generator, shape: dict) -> tuple:
    """The decode batch on the device: ``(q, k_pool, v_pool, tables, lens, query_start)``."""
    b, n, h, d, bs = (shape[k] for k in ("num_seqs", "context_len", "num_kv_heads", "head_dim",
                                          "block_size"))
    per_seq = -(-n // bs)
    pool_shape = (b * per_seq, bs, h, d)
    q = be.asarray(rng.standard_normal((b, h * shape["group"], d)).astype(np.float16))
    # float32 draws: 2 x 268M float64 ones would cost seconds and 4 GiB before the copy
    k_pool, v_pool = (be.asarray(rng.standard_normal(pool_shape, np.float32).astype(np.float16))
                      for _ in range(2))
    tables = be.asarray(rng.permutation(pool_shape[0]).astype(np.int32).reshape(b, per_seq))
    lens = be.asarray(np.full(b, n, np.int32))
    starts = be.asarray(np.arange(b + 1, dtype=np.int32))
    return q, k_pool, v_pool, tables, lens, starts


def attention_launches(be, rng: np.random.Generator, shape: dict, num_splits: int = SPLITS,
                       arrays: tuple | None = None) -> list:
    """One launch per version in ATTENTION_VERSIONS (arguments checked once, here)."""
    from kvlab.kernels.cuda import attention

    q, k_pool, v_pool, tables, lens, starts = arrays or attention_arrays(be, rng, shape)
    _, _, _, scale, window, splits = check_paged_decode_attention(
        q, k_pool, v_pool, tables, lens, starts, None, 0, None, None, num_splits)
    return [lambda v=v: attention.launch(q, k_pool, v_pool, None, None, None, tables, lens, starts,
                                         scale, window, True, splits, version=v)
            for v in ATTENTION_VERSIONS]


def fused_write_setup(be, rng: np.random.Generator, shape: dict) -> SimpleNamespace:
    """A one-sequence prefill of ``shape["prefill"]`` tokens on the device (qk_mode 2): qkv,
    cos/sin, empty pools, the sequence's block table (1-D, and as the one-row 2-D table),
    query_start/pos_offsets (host and device) and check_fused_write's result."""
    t, h, d, bs = shape["prefill"], shape["num_kv_heads"], shape["head_dim"], shape["block_size"]
    hq = h * shape["group"]
    qkv_host = rng.standard_normal((t, (hq + 2 * h) * d)).astype(np.float16)
    qkv = be.asarray(qkv_host)
    cos, sin = (be.asarray(x) for x in rope_tables(t, d, THETA))
    pool_shape = (-(-t // bs), bs, h, d)
    k_pool, v_pool = (be.asarray(np.zeros(pool_shape, np.float16)) for _ in range(2))
    table_1d = be.asarray(rng.permutation(pool_shape[0]).astype(np.int32))
    table_2d, starts_np, offsets_np = _one_sequence(qkv_host, table_1d, 0)
    starts, offsets = be.asarray(starts_np), be.asarray(offsets_np)
    checked = check_fused_write(qkv, None, None, cos, sin, k_pool, v_pool, table_2d, starts,
                                offsets, hq, h, EPS, 2, None, None, None)
    plan = be.paging.plan_step(k_pool, be.to_numpy(table_2d), starts_np,
                               (offsets_np + t).astype(np.int32))
    return SimpleNamespace(t=t, hq=hq, h=h, d=d, qkv=qkv, cos=cos, sin=sin, k_pool=k_pool,
                           v_pool=v_pool, table_1d=table_1d, table_2d=table_2d,
                           starts_np=starts_np, offsets_np=offsets_np, starts=starts,
                           offsets=offsets, checked=checked, plan=plan)


def fused_write_launches(be, rng: np.random.Generator, shape: dict) -> list:
    """One launch of the fused-write kernel per FUSED_SETTINGS (arguments checked once)."""
    from kvlab.kernels.cuda import fused_write

    f = fused_write_setup(be, rng, shape)
    return [lambda n=n, r=r, v=v: fused_write.launch(f.qkv, None, None, f.cos, f.sin, f.k_pool,
                                                     f.v_pool, None, None, f.table_2d, f.starts,
                                                     f.offsets, f.checked, EPS, 2, None, True, n,
                                                     r, version=v)
            for n, r, v in FUSED_SETTINGS]


def _host_us(fn, repeats: int) -> float:
    """Median host microseconds of ``fn()`` over ``repeats`` calls, the GPU idle before each."""
    from numba import cuda

    times = []
    for _ in range(repeats):
        cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def host_overhead(be, rng: np.random.Generator, shape: dict, num_splits: int = SPLITS,
                  repeats: int = 30) -> list[tuple[str, float]]:
    """``[(part, microseconds)]`` for the public fused write (one sequence, ``prefill`` tokens,
    qk_mode 2) and the public decode attention, each part timed alone (after one warm-up call)."""
    from numba import cuda

    from kvlab.kernels.cuda import attention, fused_write

    f = fused_write_setup(be, rng, shape)
    kept = []  # outputs kept alive while timing, so no deferred free lands inside a timed call
    parts = [
        ("fused write: check_fused_write (reads table, starts, offsets back)",
         lambda: check_fused_write(f.qkv, None, None, f.cos, f.sin, f.k_pool, f.v_pool,
                                   f.table_2d, f.starts, f.offsets, f.hq, f.h, EPS, 2, None,
                                   None, None)),
        ("fused write: check_fused_write on host starts, offsets (paged_write's way)",
         lambda: check_fused_write(f.qkv, None, None, f.cos, f.sin, f.k_pool, f.v_pool,
                                   f.table_2d, f.starts_np, f.offsets_np, f.hq, f.h, EPS, 2, None,
                                   None, None)),
        ("fused write: 2 x cuda.to_device (starts, offsets)",
         lambda: (cuda.to_device(f.starts_np), cuda.to_device(f.offsets_np))),
        ("fused write: 1 x cuda.to_device (starts + offsets, paged_write's way)",
         lambda: upload_together([f.starts_np, f.offsets_np], cuda.to_device)),
        ("fused write: cuda.device_array for q_out (T x Hq x D fp16)",
         lambda: kept.append(cuda.device_array((f.t, f.hq, f.d), np.float16))),
        ("fused write: launch() alone (kernel launch, no sync)",
         lambda: kept.append(fused_write.launch(f.qkv, None, None, f.cos, f.sin, f.k_pool,
                                                f.v_pool, None, None, f.table_2d, f.starts,
                                                f.offsets, f.checked, EPS, 2, None, True))),
        ("fused write: launch(version=4) alone (a warp per token, no sync)",
         lambda: kept.append(fused_write.launch(f.qkv, None, None, f.cos, f.sin, f.k_pool,
                                                f.v_pool, None, None, f.table_2d, f.starts,
                                                f.offsets, f.checked, EPS, 2, None, True,
                                                version=4))),
        ("fused write: public paged_write, no sync",
         lambda: kept.append(be.fused_write.paged_write(f.qkv, None, None, f.cos, f.sin,
                                                        f.k_pool, f.v_pool, f.table_1d, 0, f.hq,
                                                        f.h, EPS, 2))),
        ("fused write: paged_write_batched given a step plan (no read-back), no sync",
         lambda: kept.append(be.fused_write.paged_write_batched(
             f.qkv, None, None, f.cos, f.sin, f.k_pool, f.v_pool, f.plan.block_tables,
             f.plan.query_start, f.plan.pos_offsets, f.hq, f.h, EPS, 2, plan=f.plan))),
    ]
    q, k_p, v_p, tables, lens, qs = arrays = attention_arrays(be, rng, shape)
    host_indices = [be.to_numpy(a) for a in (tables, qs, lens)]
    plan = be.paging.plan_step(k_p, *host_indices)
    launches = attention_launches(be, rng, shape, num_splits, arrays)
    launch_default = launches[ATTENTION_VERSIONS.index(attention.DEFAULT_VERSION)]
    parts += [
        ("attention: check_paged_decode_attention",
         lambda: check_paged_decode_attention(q, k_p, v_p, tables, lens, qs, None, 0, None, None,
                                              num_splits)),
        ("attention: launch() alone (widen q, kernel, merge; no sync)", launch_default),
        ("attention: launch(version=8) alone (kernel reads fp16 q, merge; no sync)",
         launches[ATTENTION_VERSIONS.index(8)]),
        ("attention: public paged_decode_attention, no sync",
         lambda: kept.append(be.attention.paged_decode_attention(q, k_p, v_p, tables, lens, qs,
                                                                 num_splits=num_splits))),
        ("attention: plan_step from host arrays (once per step: checks, one upload)",
         lambda: kept.append(be.paging.plan_step(k_p, *host_indices))),
        ("attention: paged_decode_attention given the plan (no read-back), no sync",
         lambda: kept.append(be.attention.paged_decode_attention(
             q, k_p, v_p, plan.block_tables, plan.context_lens, plan.query_start,
             num_splits=num_splits, plan=plan))),
    ]
    out = []
    for name, fn in parts:
        fn()  # compile / warm up
        out.append((name, _host_us(fn, repeats)))
        kept.clear()
    cuda.synchronize()
    out.append(("attention: public op + synchronize (kernel included)", _host_us(
        lambda: (be.attention.paged_decode_attention(q, k_p, v_p, tables, lens, qs,
                                                      num_splits=num_splits), cuda.synchronize()),
        repeats)))
    return out


def main() -> None:
    be = get_backend("cuda", device="gpu")
    from numba import cuda

    if "--host" in sys.argv[1:]:
        rows = host_overhead(be, np.random.default_rng(0), PRESETS["real"])
        print(f"host microseconds per call, median of 30 ({cuda.get_current_device().name})")
        for name, us in rows:
            print(f"{us:10.1f}  {name}")
        return

    from kvlab.kernels.cuda.attention import device_num_splits

    rng = np.random.default_rng(0)
    shape = PRESETS["real"]
    arrays = attention_arrays(be, rng, shape)
    launches = attention_launches(be, rng, shape, arrays=arrays)
    # v8 also at the split count its own rule picks for this GPU (one wave of resident blocks)
    one_wave = device_num_splits(shape["num_seqs"], shape["num_kv_heads"] * shape["group"],
                                 shape["num_kv_heads"], shape["context_len"], version=8)
    if one_wave != SPLITS:
        launches.append(attention_launches(be, rng, shape, one_wave, arrays)[
            ATTENTION_VERSIONS.index(8)])
    launches += fused_write_launches(be, rng, shape)
    for run in launches:  # compile and warm up, outside the profiled range
        run()
    cuda.synchronize()
    cuda.profile_start()
    for run in launches:
        run()
    cuda.synchronize()
    cuda.profile_stop()
    print(f"profiled attention v{ATTENTION_VERSIONS} at {SPLITS} splits (v8 also at "
          f"{one_wave}: one wave) and the fused write at (tokens per block, in registers, "
          f"version) {FUSED_SETTINGS}, shape {shape}")


if __name__ == "__main__":
    main()
