"""A result as text: the per-stage table ``python -m kvlab bench`` prints, and the Markdown table
the README, docs/perf.md and notebook 05 quote; and what two results of the same code say about
their own noise (:func:`noise_band`)."""
from __future__ import annotations

from typing import Any, Mapping


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"kvlab bench — {meta['device']} — backend {meta['backend_description']} — "
        f"size {meta['size']} — {meta['date']}",
        f"timer: {meta['timer']}" + (f"; baselines: {meta['baseline_timer']}"
                                     if meta["baseline_timer"] and meta["baseline_timer"] != meta["timer"] else ""),
    ]
    if meta["copy_bandwidth_gb_per_s"]:
        lines.append(f"device copy bandwidth (D2D, read + write): {meta['copy_bandwidth_gb_per_s']:,.0f} GB/s")
    if meta.get("fp32_matmul_tflops"):
        lines.append(f"float32 matrix product (torch, TF32 off): {meta['fp32_matmul_tflops']:.1f} TFLOP/s")
    lines.append("speedup = baseline median / this median (> 1: faster than the baseline); "
                 f"times are medians on {meta['device']}")
    gpu = meta["copy_bandwidth_gb_per_s"] is not None
    for stage in meta["stages"]:
        rows = [r for r in result["rows"] if r["stage"] == stage]
        lines.append("")
        if not rows:
            lines.append(f"== {stage}: not built yet" if stage in meta["not_built"] else f"== {stage}: no rows")
            continue
        lines.append(f"== {stage}")
        op_w = max(len(r["op"]) for r in rows)
        impl_w = max(4, *(len(r["impl"]) for r in rows))
        shape_w = max(5, *(len(r["shape"]) for r in rows))
        lines.append(f"{'op':<{op_w}}  {'impl':<{impl_w}}  {'shape':<{shape_w}}  {'bytes':>10}  "
                     f"{'median':>9}  {'min':>9}  {'GB/s':>8}" + ("  %copy" if gpu else "")
                     + "  speedup vs")
        for r in rows:
            ratio = "; ".join(f"{x:.2f}x vs {k}" for k, x in r["speedups"].items())
            line = (f"{r['op']:<{op_w}}  {r['impl']:<{impl_w}}  {r['shape']:<{shape_w}}  "
                    f"{format_bytes(r['bytes']):>10}  {format_time(r['median_s']):>9}  "
                    f"{format_time(r['min_s']):>9}  {r['gb_per_s']:>8.2f}")
            if gpu:
                line += f"  {100 * r['copy_bw_fraction']:>4.0f}%"
            lines.append((line + "  " + ratio + ("  " + r["note"] if r["note"] else "")).rstrip())
    if result["notes"]:
        lines += ["", *(f"note: {n}" for n in result["notes"])]
    return "\n".join(lines)


def markdown_summary(result: dict[str, Any], stages: tuple[str, ...] = ("attention", "fused_write"),
                     ) -> str:
    """A Markdown table of a result's rows for ``stages`` (README and notebook 05 quote it; a test
    keeps the README's copy equal to this function's output on the stored result)."""
    meta = result["meta"]
    copy = meta["copy_bandwidth_gb_per_s"]
    lines = [f"Measured on {meta['device']}, {meta['date'][:10]}, `python -m kvlab bench --backend "
             f"{meta['backend']} --size {meta['size']}` (medians"
             + (f"; copy bandwidth {copy:,.0f} GB/s" if copy else "") + "):", "",
             "| stage | op | impl | median | GB/s | % of copy |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if r["stage"] in stages:
            copy = "" if r["copy_bw_fraction"] is None else f"{100 * r['copy_bw_fraction']:.0f}%"
            lines.append(f"| {r['stage']} | {r['op']} | {r['impl']} | "
                         f"{format_time(r['median_s'])} | {r['gb_per_s']:,.0f} | {copy} |")
    return "\n".join(lines)


def kernel_medians(result: dict[str, Any]) -> dict[str, float]:
    """A bench result's decode-kernel rows (``kernel v…``, timed alone on the cuda backend) as
    ``{row name: median seconds}``: what :func:`noise_band` compares between two runs."""
    return {r["op"]: r["median_s"] for r in result["rows"]
            if r["impl"] == "cuda" and r["op"].startswith("kernel v")}


def noise_band(run_a: Mapping[str, float], run_b: Mapping[str, float]) -> tuple[float, float]:
    """How far two runs of the same code disagree: over the rows both timed, the lowest and the
    highest ratio ``run_a[row] / run_b[row]`` (times in seconds, keyed by row name).

    Two runs of one binary on one card should give ratios of 1; what they give instead is the
    noise of the measurement (clocks, temperature, the other processes, which SM got which block).
    A speedup between two rows of one run that falls inside the band cannot be told from it.
    Raises ValueError when the runs share no row.
    """
    shared = [row for row in run_a if row in run_b]
    if not shared:
        raise ValueError("run_a and run_b share no row: the band needs rows both runs timed")
    ratios = [run_a[row] / run_b[row] for row in shared]
    return min(ratios), max(ratios)
