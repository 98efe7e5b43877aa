"""The attention stage: paged decode attention (fp16, int8) as the public op, against the other
backend, torch SDPA on contiguous K/V and gather-then-SDPA; on the cuda backend every numbered
kernel version alone over SPLIT_SWEEP."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kvlab.bench.context import Ctx, Row
from kvlab.bench.inputs import decode_batch
from kvlab.bench.presets import SPLIT_SWEEP
from kvlab.bench.timers import BACK_TO_BACK_MIN_BYTES
from kvlab.bench.traffic import bytes_gather_then_sdpa, bytes_paged_decode, bytes_sdpa


def bench_attention(ctx: Ctx) -> None:
    s = ctx.shape
    b, n, h, d, bs = s["num_seqs"], s["context_len"], s["num_kv_heads"], s["head_dim"], s["block_size"]
    hq, splits = h * s["group"], s["num_splits"]
    dec = ctx.data("decode", lambda: decode_batch(ctx))
    shape = f"B={b}x{n} Hq={hq} Hkv={h} D={d}"
    be = ctx.backend
    on_device: dict[tuple[str, str], Any] = {}  # one device copy per (backend, array), read only

    def arrays(backend: Any, *names: str) -> list[Any]:
        for name in names:
            if (backend.name, name) not in on_device:
                on_device[backend.name, name] = backend.asarray(dec[name])
        return [on_device[backend.name, name] for name in names]

    def paged(kv_dtype: str | None, num_splits: int | None, backend: Any = None):
        backend = backend or be
        qq, tt, ll, ss = arrays(backend, "q", "tables", "lens", "query_start")
        if kv_dtype is None:
            kp, vp = arrays(backend, "k_pool", "v_pool")
            ks = vs = None
        else:
            kp, vp, ks, vs = arrays(backend, "k_codes", "v_codes", "k_scales", "v_scales")
        return lambda: backend.attention.paged_decode_attention(
            qq, kp, vp, tt, ll, ss, k_scales=ks, v_scales=vs, num_splits=num_splits)

    fp16 = {}
    for num_splits in sorted({1, splits}):
        name = f"paged decode fp16 splits={num_splits}"
        fp16[num_splits] = ctx.run("attention", name, ctx.impl, ctx.timer, paged(None, num_splits),
                                   shape + " fp16", bytes_paged_decode(b, n, bs, hq, h, d))
        ctx.run("attention", f"paged decode int8 splits={num_splits}", ctx.impl, ctx.timer,
                paged("int8", num_splits), shape + " int8",
                bytes_paged_decode(b, n, bs, hq, h, d, kv_dtype="int8"),
                baseline=fp16[num_splits])
    # A model step plans once (paging.plan_step, outside the timing) and every layer's call then
    # reads no index array back: > 1 against "paged decode fp16 splits=1" is what that saves.
    plan = be.paging.plan_step(arrays(be, "k_pool")[0], dec["tables"], dec["query_start"],
                               dec["lens"])
    qq, kp, vp = arrays(be, "q", "k_pool", "v_pool")
    ctx.run("attention", "paged decode fp16 splits=1, planned", ctx.impl, ctx.timer,
            lambda: be.attention.paged_decode_attention(
                qq, kp, vp, plan.block_tables, plan.context_lens, plan.query_start, num_splits=1,
                plan=plan),
            shape + " fp16", bytes_paged_decode(b, n, bs, hq, h, d), baseline=fp16[1],
            note="the step's index arrays checked once by plan_step, outside the timing")
    if be.name == "torch":  # what the torch op's tiles replace: one gather of the whole context
        from kvlab.exercises.attention import paged_decode_torch_solution

        tt, ll = arrays(be, "tables", "lens")
        ctx.run("attention", "paged decode fp16, whole context at once", ctx.impl, ctx.timer,
                lambda: paged_decode_torch_solution(qq.float(), kp, vp, tt, ll, d ** -0.5),
                shape + " fp16", bytes_paged_decode(b, n, bs, hq, h, d), baseline=fp16[1],
                note="exercise 05.paged_decode_torch's solution: gather, then one softmax")
    if be.name == "cuda":  # num_splits=None: the op picks S for the device (the simulator: 1)
        from kvlab.kernels.cuda.attention import device_num_splits

        auto = device_num_splits(b, hq, h, n)
        fp16["auto"] = ctx.run("attention", f"paged decode fp16 splits=auto ({auto})", ctx.impl,
                               ctx.timer, paged(None, None), shape + " fp16",
                               bytes_paged_decode(b, n, bs, hq, h, d))
    if ctx.other is not None:
        theirs = ctx.run("attention", "paged decode fp16 splits=1", ctx.other_impl,
                         ctx.other_timer, paged(None, 1, ctx.other), shape + " fp16",
                         bytes_paged_decode(b, n, bs, hq, h, d))
        ctx.compare(fp16[1], theirs)

    baselines = _sdpa_rows(ctx, dec, shape, lambda: paged(None, 1)())
    # the kernels alone come last: a kernel that faults leaves the CUDA context unusable, and the
    # baselines above are then already measured
    kernels = _attention_kernel_rows(ctx, arrays, shape, fp16) if be.name == "cuda" else []
    for row in [*fp16.values(), *kernels]:
        for baseline in baselines:
            ctx.compare(row, baseline)


def _sdpa_rows(ctx: Ctx, dec: dict[str, Any], shape: str,
               paged_fp16: Callable[[], Any]) -> list[Row]:
    """torch SDPA on contiguous K/V (enable_gqa) and gather-then-SDPA on the same data, after a
    check that the paged op computes what SDPA computes; [] without torch."""
    s = ctx.shape
    b, n, h, d, bs = s["num_seqs"], s["context_len"], s["num_kv_heads"], s["head_dim"], s["block_size"]
    hq = h * s["group"]
    torch = ctx.torch
    if torch is None:
        return []
    dev = ctx.torch_device
    F = torch.nn.functional
    tq = torch.from_numpy(dec["q"]).to(dev).unsqueeze(2)                       # [B, Hq, 1, D]
    contiguous = {name: torch.from_numpy(dec[name][dec["tables"]].reshape(b, -1, h, d)[:, :n])
                  .to(dev).transpose(1, 2).contiguous() for name in ("k_pool", "v_pool")}
    k_pool_t, v_pool_t = (torch.from_numpy(dec[x]).to(dev) for x in ("k_pool", "v_pool"))
    table_t = torch.from_numpy(dec["tables"]).to(dev).long()

    def sdpa():
        return F.scaled_dot_product_attention(tq, contiguous["k_pool"], contiguous["v_pool"],
                                              enable_gqa=True)

    def gather_then_sdpa():
        k = k_pool_t[table_t].reshape(b, -1, h, d)[:, :n].transpose(1, 2)      # [B, Hkv, L, D]
        v = v_pool_t[table_t].reshape(b, -1, h, d)[:, :n].transpose(1, 2)
        return F.scaled_dot_product_attention(tq, k, v, enable_gqa=True)

    # Same data: check the paged result against SDPA once before timing anything against it.
    want = sdpa().squeeze(2).float().cpu().numpy()
    got = ctx.backend.to_numpy(paged_fp16())
    err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
    note = f"max|paged - sdpa| / max|sdpa| = {err:.1e}"
    if not err <= 2e-2:  # fp16 SDPA output vs float32 paged: ~1e-3; wrong data gives ~1
        ctx.notes.append(f"attention: paged decode differs from torch SDPA ({note}): NOT the "
                         "same computation, ratios against SDPA are suspect")
    ref = ctx.run("attention", "torch SDPA contiguous (enable_gqa)", f"torch-sdpa-{dev}",
                  ctx.torch_timer, sdpa, shape + " fp16", bytes_sdpa(b, n, hq, h, d), note=note)
    gts = ctx.run("attention", "torch gather-then-SDPA", f"torch-sdpa-{dev}", ctx.torch_timer,
                  gather_then_sdpa, shape + " fp16", bytes_gather_then_sdpa(b, n, bs, hq, h, d))
    if dev != "cpu":
        return [ref, gts]
    # torch has no fast float16 SDPA on a CPU (measured ~5x slower than float32 at --size medium):
    # there the fair baseline is SDPA on the contiguous K/V widened to float32 beforehand
    tq32, k32, v32 = (x.float() for x in (tq, contiguous["k_pool"], contiguous["v_pool"]))
    fp32 = ctx.run("attention", "torch SDPA contiguous fp32 (enable_gqa)", f"torch-sdpa-{dev}",
                   ctx.torch_timer,
                   lambda: F.scaled_dot_product_attention(tq32, k32, v32, enable_gqa=True),
                   shape + " fp32", bytes_sdpa(b, n, hq, h, d, elem=4))
    return [ref, gts, fp32]


def _attention_kernel_rows(ctx: Ctx, arrays: Callable[..., list[Any]], shape: str,
                           public: dict[int, Row]) -> list[Row]:
    """The CUDA attention kernels alone (``kvlab.kernels.cuda.attention.launch`` on arguments
    checked once, outside the timing): every numbered version over SPLIT_SWEEP, and v2-v7 on int8 and
    fp8 pools. Returns the fp16 rows (for the SDPA comparisons)."""
    from kvlab.checks import check_paged_decode_attention
    from kvlab.kernels.cuda import attention

    s = ctx.shape
    b, n, h, d, bs = s["num_seqs"], s["context_len"], s["num_kv_heads"], s["head_dim"], s["block_size"]
    hq = h * s["group"]
    be = ctx.backend
    q, tables, lens, starts = arrays(be, "q", "tables", "lens", "query_start")
    pools = {None: arrays(be, "k_pool", "v_pool") + [None, None],
             "int8": arrays(be, "k_codes", "v_codes", "k_scales", "v_scales"),
             "fp8_e4m3": arrays(be, "k_fp8", "v_fp8", "k_scales", "v_scales")}

    def launch(version: int, kv_dtype: str | None, num_splits: int):
        kp, vp, ks, vs = pools[kv_dtype]
        _, _, _, scale, window, splits = check_paged_decode_attention(
            q, kp, vp, tables, lens, starts, None, 0, ks, vs, num_splits)
        return lambda: attention.launch(q, kp, vp, ks, vs, kv_dtype, tables, lens, starts, scale,
                                        window, True, splits, version=version)

    rows: list[Row] = []

    def timer_for(nbytes: int) -> Any:
        big = ctx.kernel_timer is not None and nbytes >= BACK_TO_BACK_MIN_BYTES
        return ctx.kernel_timer if big else ctx.timer
    for version, sweep in SPLIT_SWEEP[ctx.preset].items():
        if version == 8:  # and the split count v8's own rule picks for this GPU (one wave)
            sweep = tuple(sorted({*sweep, attention.device_num_splits(b, hq, h, n, version=8)}))
        for num_splits in sweep:
            nbytes = bytes_paged_decode(b, n, bs, hq, h, d)
            try:
                row = ctx.run("attention", f"kernel v{version} fp16 splits={num_splits}", ctx.impl,
                              timer_for(nbytes), launch(version, None, num_splits), shape + " fp16",
                              nbytes, note=attention.VERSIONS[version].split(":")[0])
            except Exception as exc:  # noqa: BLE001  (one failing version must not end a GPU run)
                ctx.notes.append(f"attention kernel v{version} splits={num_splits} failed: "
                                 f"{type(exc).__name__}: {exc}")
                continue
            if num_splits in public and version == attention.DEFAULT_VERSION:
                # < 1: what the op's checks, host copies and launches cost on top of the kernel
                ctx.compare(public[num_splits], row)
            rows.append(row)
    for version in sorted(set(attention.VERSIONS) - {1}):  # int8 / fp8 at each one's best split
        best = min((r for r in rows if r.op.startswith(f"kernel v{version} ")),
                   key=lambda r: r.median_s, default=None)
        if best is None:
            continue
        num_splits = int(best.op.rsplit("=", 1)[1])
        for kv_dtype in ("int8", "fp8_e4m3"):
            nbytes = bytes_paged_decode(b, n, bs, hq, h, d, kv_dtype=kv_dtype)
            try:
                ctx.run("attention", f"kernel v{version} {kv_dtype} splits={num_splits}", ctx.impl,
                        timer_for(nbytes), launch(version, kv_dtype, num_splits),
                        shape + f" {kv_dtype}", nbytes, baseline=best)
            except Exception as exc:  # noqa: BLE001
                ctx.notes.append(f"attention kernel v{version} {kv_dtype} failed: "
                                 f"{type(exc).__name__}: {exc}")
    return rows
