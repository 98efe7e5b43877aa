"""Figures of notebook 07 (GPU performance): measured results of the CUDA kernels, read from a
``python -m kvlab bench --backend cuda --json`` result (``data/bench/``).

- :func:`plot_kernel_versions`: each decode-attention kernel version's time over its split counts.
- :func:`plot_ladder`: a version ladder, one row per step, each step's time and its gain over the
  step before, against reference times (torch SDPA, the time at copy bandwidth).
- :func:`plot_measured_roofline`: a roofline whose roofs are measured (copy bandwidth, an fp32
  matrix product), each kernel a point at the FLOP/s it achieved.
- :func:`plot_ceilings`: the three ceilings on a kernel's bandwidth (memory, instruction issue,
  bytes in flight; :mod:`kvlab.gpu_limits`), the one that binds marked, measured kernels beside.

Colours: a kernel version keeps one colour along a sequential colour map (light = later), a KV
dtype its colour of the whole course (:data:`~kvlab.plot.style.DTYPE_COLORS`), reference lines
grey. Lines are labelled where they are drawn or in a legend outside the axes, so no legend
covers data. See :mod:`kvlab.plot` for the rules every figure keeps.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter

from kvlab.plot.style import COLOR_REFERENCE, dtype_color, new_axes

# Datasheet HBM bandwidth by the name a GPU reports (NVIDIA's H100 SXM and H200 datasheets:
# 3.35 and 4.8 TB/s), drawn dashed beside a measured roofline for scale.
NOMINAL_HBM_BYTES_PER_S = {"NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H200": 4.8e12}

FIGSIZE = (9.0, 4.0)  # inches: 900 px wide at the notebook's 100 dpi (JupyterLab shows ~1050)
FONT = 8              # points: the smallest text these figures draw


def decode_flops(shape: dict) -> int:
    """FLOPs of one decode step of the bench's attention shape: ``4 B Hq L D`` (a multiply-add for
    ``q . k`` and one for ``p v`` per cached position, query head and dim)."""
    hq = shape["num_kv_heads"] * shape["group"]
    return 4 * shape["num_seqs"] * hq * shape["context_len"] * shape["head_dim"]


def version_color(version: int, num_versions: int) -> tuple:
    """The colour of kernel ``version`` (1-based) among ``num_versions``: dark (v1) to light."""
    return plt.get_cmap("viridis")(0.85 * (version - 1) / max(num_versions - 1, 1))


def _label(result: dict) -> str:
    meta = result["meta"]
    return f"{meta['device']}, {meta['date'][:10]}"


def _attention_rows(result: dict) -> list[dict]:
    return [r for r in result["rows"] if r["stage"] == "attention"]


def _kernel_rows(result: dict, dtype: str) -> dict[int, list[tuple[int, float]]]:
    """``{version: [(num_splits, median_s), ...]}`` of the 'kernel vN <dtype> splits=S' rows."""
    found: dict[int, list[tuple[int, float]]] = {}
    for r in _attention_rows(result):
        words = r["op"].split()
        if len(words) == 4 and words[0] == "kernel" and words[2] == dtype:
            found.setdefault(int(words[1][1:]), []).append((int(words[3].split("=")[1]), r["median_s"]))
    return {v: sorted(points) for v, points in sorted(found.items())}


def plot_kernel_versions(result: dict, ax: Axes | None = None) -> Axes:
    """Median time of each attention kernel version (fp16 pools, kernel alone) over its split
    counts, with torch SDPA on contiguous K/V and gather-then-SDPA as labelled grey lines.

    result: a ``kvlab bench --backend cuda --json`` result. The versions' legend sits outside the
    axes, on the right, so it covers no line."""
    versions = _kernel_rows(result, "fp16")
    if not versions:
        raise ValueError("the result holds no 'kernel vN fp16 splits=S' rows (run the cuda backend)")
    ax = new_axes(ax, FIGSIZE)
    last = max(versions)
    for version, points in versions.items():
        ax.plot([s for s, _ in points], [t * 1e3 for _, t in points], "o-", ms=5,
                color=version_color(version, last), label=f"kvlab v{version}")
    handles, labels = ax.get_legend_handles_labels()
    for r, style in zip([r for r in _attention_rows(result) if r["impl"].startswith("torch-sdpa")],
                        ("-", "--")):
        ms = r["median_s"] * 1e3
        ax.axhline(ms, color=COLOR_REFERENCE, ls=style, lw=1.2, label=f"{r['op']} ({ms * 1e3:.0f} us)")
        ax.annotate(f"{r['op']}: {ms * 1e3:.0f} us", (0.01, ms), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=FONT, color=COLOR_REFERENCE)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("num_splits (split-K partitions per sequence)", fontsize=9)
    ax.set_ylabel("median time per decode step (ms)", fontsize=9)
    ax.tick_params(labelsize=FONT)
    ax.set_title(f"decode attention kernels, fp16, kernel alone: {_label(result)}", fontsize=9)
    ax.legend(handles, labels, fontsize=FONT, loc="upper left", bbox_to_anchor=(1.01, 1),
              title="version", title_fontsize=FONT)
    return ax


def plot_ladder(steps: Sequence[tuple[str, float]], references: Mapping[str, float] | None = None,
                ax: Axes | None = None, title: str = "", unit: str = "ms") -> Axes:
    """A version ladder: one row per step (top to bottom), a dot at its time on a log axis, labelled
    with the time and its gain over the step above; each reference a labelled vertical line.

    steps: ``(label, seconds)`` in the order they were taken. references: ``{label: seconds}``
    (e.g. torch SDPA, the time at copy bandwidth). unit: ``"ms"`` or ``"us"`` for the labels."""
    scale = {"ms": 1e3, "us": 1e6}.get(unit)
    if scale is None:
        raise ValueError(f"unit must be 'ms' or 'us', got {unit!r}")
    if not steps:
        raise ValueError("plot_ladder needs at least one step")
    for label, seconds in [*steps, *(references or {}).items()]:
        if not seconds > 0:
            raise ValueError(f"{label!r}: a time must be positive, got {seconds}")
    ax = new_axes(ax, (FIGSIZE[0], 0.45 * len(steps) + 1.4))
    times = np.array([t for _, t in steps]) * scale
    rows = np.arange(len(steps))
    ax.plot(times, rows, "-", color=COLOR_REFERENCE, lw=0.8)  # the path from step to step
    for i, (t, row) in enumerate(zip(times, rows)):
        ax.plot(t, row, "o", ms=7, color=version_color(i + 1, len(steps)))
        gain = "" if i == 0 else f"  ({times[i - 1] / t:.2f}x the step above)"
        ax.annotate(f"{_three_digits(t)} {unit}{gain}", (t, row), xytext=(8, -3),
                    textcoords="offset points", fontsize=FONT)
    for i, ((label, seconds), style) in enumerate(zip((references or {}).items(), ("--", ":", "-."))):
        ax.axvline(seconds * scale, color=COLOR_REFERENCE, ls=style, lw=1.2)
        ax.annotate(f"{label}: {_three_digits(seconds * scale)} {unit}", (seconds * scale, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(3, -4 - 11 * i),  # a line each
                    textcoords="offset points", fontsize=FONT, color=COLOR_REFERENCE, va="top",
                    bbox={"fc": "white", "ec": "none", "pad": 0.5})  # over a line it crosses
    ax.set_xscale("log")
    low = min([*times, *(t * scale for t in (references or {}).values())])
    ax.set_xlim(low / 1.6, times.max() * 4)  # room on the right for the labels
    ax.set_ylim(len(steps) - 0.5, -0.6 - 0.3 * len(references or {}))  # first step on top, a
    #                                                                     strip above for references
    ax.set_yticks(rows, [label for label, _ in steps], fontsize=FONT)
    ax.tick_params(axis="x", labelsize=FONT)
    ax.set_xlabel(f"time ({unit}, log scale)", fontsize=9)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def _three_digits(x: float) -> str:
    """``x`` to three significant digits, trailing zeros kept: 36.3, 1.60, 0.256, 202."""
    return f"{x:,.{max(0, 2 - int(np.floor(np.log10(x))))}f}"


def _spread(logs: Sequence[float], gap: float) -> np.ndarray:
    """Positions near ``logs`` (sorted order kept) at least ``gap`` apart, centred on the group:
    where the labels of points that nearly coincide go."""
    order = np.argsort(logs)
    placed = np.array(logs, float)[order]
    for i in range(1, len(placed)):
        placed[i] = max(placed[i], placed[i - 1] + gap)
    placed -= (placed.mean() - np.mean(logs))  # as much above the points as below
    out = np.empty_like(placed)
    out[order] = placed
    return out


def plot_measured_roofline(result: dict, ax: Axes | None = None) -> Axes:
    """A roofline from measurements: the memory roof is the device-to-device copy bandwidth the
    bench measured, the compute roof its float32 matrix product (TF32 off); the card's datasheet HBM
    peak (``NOMINAL_HBM_BYTES_PER_S``, when the card is known) is drawn dashed for scale.

    Each kernel version is a point at its fastest split count: its arithmetic intensity (FLOPs from
    :func:`decode_flops`, bytes as the bench counts them) and the FLOP/s it achieved; fp16 pools
    in fp16's colour with the version named on the left, int8 pools in int8's with the version on
    the right; torch SDPA and gather-then-SDPA as the two grey marks."""
    meta = result["meta"]
    bw = (meta.get("copy_bandwidth_gb_per_s") or 0) * 1e9
    peak = (meta.get("fp32_matmul_tflops") or 0) * 1e12
    if bw <= 0 or peak <= 0:
        raise ValueError("the result has no measured copy bandwidth / fp32 matmul rate (a GPU run)")
    flops = decode_flops(meta["shape"])
    ax = new_axes(ax, FIGSIZE)
    x = np.logspace(0, 2.5, 200)
    roof = ax.loglog(x, np.minimum(peak, x * bw) / 1e12, color=COLOR_REFERENCE, lw=2,
                     label=f"measured roof: copy {bw / 1e9:,.0f} GB/s, fp32 matmul {peak / 1e12:.1f} TFLOP/s")
    handles = [roof[0]]
    card = next((k for k in NOMINAL_HBM_BYTES_PER_S  # "NVIDIA H200" but not "NVIDIA GH200 ..."
                 if meta["device"] == k or meta["device"].startswith(k + " ")), None)
    if card is not None:  # an unknown card gets no datasheet line rather than a wrong one
        nominal = NOMINAL_HBM_BYTES_PER_S[card]
        handles += ax.loglog(x, np.minimum(peak, x * nominal) / 1e12, color=COLOR_REFERENCE, lw=1,
                             ls="--", label=f"{nominal / 1e12:.2f} TB/s ({card} datasheet HBM)")
    rows = {r["op"]: r for r in _attention_rows(result)}

    def point(r: dict, label: str, **style):
        line, = ax.plot(flops / r["bytes"], flops / r["median_s"] / 1e12, ls="none",
                        label=f"{label}: {r['median_s'] * 1e6:,.0f} us, {r['gb_per_s']:,.0f} GB/s",
                        **style)
        return line

    # one decade of y is ~1/3.5 of the axes' height; a label needs ~1.4 font heights
    gap = 1.4 * FONT / (ax.get_position().height * ax.figure.get_figheight() * 72 / 3.5)
    legend_labels = [h.get_label() for h in handles]
    for dtype, marker, side in (("fp16", "o", -1), ("int8", "s", 1)):
        best = {v: min(points, key=lambda p: p[1]) for v, points in _kernel_rows(result, dtype).items()}
        if not best:
            continue
        lines = [point(rows[f"kernel v{v} {dtype} splits={s}"], f"kernel v{v} {dtype}", marker=marker,
                       ms=7, color=dtype_color(dtype), mfc="white" if dtype == "int8" else None)
                 for v, (s, _) in best.items()]
        ys = [line.get_ydata()[0] for line in lines]
        for v, line, y_label in zip(best, lines, 10 ** _spread(np.log10(ys), gap)):
            x0, y0 = line.get_xydata()[0]
            ax.annotate(f"v{v}", (x0, y0), xytext=(x0 * 1.45 ** side, y_label), fontsize=FONT,
                        ha="right" if side < 0 else "left", va="center", color=dtype_color(dtype),
                        arrowprops={"arrowstyle": "-", "color": dtype_color(dtype), "lw": 0.6})
        handles.append(lines[0])
        span = f"v{min(best)}" + (f"-v{max(best)}" if len(best) > 1 else "")
        legend_labels.append(f"kvlab kernel, {dtype} pools ({span}, fastest split each)")
    for op, marker, colour in (("torch SDPA contiguous (enable_gqa)", "D", "black"),
                               ("torch gather-then-SDPA", "^", COLOR_REFERENCE)):
        if op in rows:
            handles.append(point(rows[op], op, marker=marker, ms=7, color=colour))
            legend_labels.append(handles[-1].get_label())
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(0.1, max(200, 3 * peak / 1e12))
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved)", fontsize=9)
    ax.set_ylabel("achieved TFLOP/s", fontsize=9)
    ax.tick_params(labelsize=FONT)
    ax.set_title(f"decode attention on a measured roofline: {_label(result)}", fontsize=9)
    ax.legend(handles, legend_labels, fontsize=FONT, loc="lower right")
    return ax


def plot_ceilings(bounds: Mapping[str, float], labels: Mapping[str, str] | None = None,
                  measured: Mapping[str, float] | None = None, ax: Axes | None = None,
                  title: str = "") -> Axes:
    """The ceilings on a kernel's bandwidth as bars (TB/s, log axis), the smallest — the one that
    binds — in vermillion, the others sky blue; each ``measured`` bandwidth a labelled grey line.

    bounds: ``{name: bytes per second}`` (e.g. :func:`kvlab.gpu_limits.bandwidth_bounds`); labels:
    ``{name: the bar's label}`` (default: the name); measured: ``{label: bytes per second}``."""
    from kvlab.plot.style import OKABE_ITO

    if not bounds:
        raise ValueError("plot_ceilings needs at least one bound")
    if len(measured or {}) > 3:
        raise ValueError(f"plot_ceilings draws at most 3 measured lines, got {len(measured)}")
    for name, value in [*bounds.items(), *(measured or {}).items()]:
        if not value > 0:
            raise ValueError(f"{name!r}: a bandwidth must be positive, got {value}")
    ax = new_axes(ax, (FIGSIZE[0], 3.4))
    binding = min(bounds, key=bounds.get)
    tb_s = np.array(list(bounds.values())) / 1e12
    rows = np.arange(len(bounds))
    ax.barh(rows, tb_s, color=[OKABE_ITO["vermillion"] if name == binding else OKABE_ITO["sky_blue"]
                               for name in bounds])
    for row, value in zip(rows, tb_s):
        ax.annotate(f"{_three_digits(value)} TB/s", (value, row), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=FONT)
    every = [*tb_s, *(b / 1e12 for b in (measured or {}).values())]
    low, high = min(every) / 2, max(every) * 6  # room on the right for the value labels
    for i, ((label, bandwidth), style) in enumerate(zip((measured or {}).items(), ("--", ":", "-."))):
        x = bandwidth / 1e12
        ax.axvline(x, color=COLOR_REFERENCE, ls=style, lw=1.2)
        # a label reads away from the nearer edge, so it never runs out of the axes
        right_half = np.log(x / low) > np.log(high / x)
        ax.annotate(f"{label}: {_three_digits(x)} TB/s", (x, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(-3 if right_half else 3, -4 - 11 * i),
                    textcoords="offset points", fontsize=FONT, color=COLOR_REFERENCE, va="top",
                    ha="right" if right_half else "left",
                    bbox={"fc": "white", "ec": "none", "pad": 0.5})  # a line each
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))  # 0.1, 1, 10: not 10^k
    # first bound on top, a strip above the bars for the measured lines' labels
    ax.set_ylim(len(bounds) - 0.5, -0.6 - 0.35 * len(measured or {}))
    ax.set_yticks(rows, [(labels or {}).get(name, name) for name in bounds], fontsize=FONT)
    ax.tick_params(axis="x", labelsize=FONT)
    ax.set_xlabel("bandwidth (TB/s, log scale)", fontsize=9)
    if title:
        ax.set_title(title, fontsize=9)
    return ax
