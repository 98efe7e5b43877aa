"""Figures of notebooks/04_fused_write: the bytes each step of the unfused write moves against
the fused kernel's, and which thread block of the fused kernel owns which head of a packed row.
The numbers come from :func:`kvlab.ref.fused_write.write_traffic`; these only draw."""
from __future__ import annotations

from typing import Mapping

import numpy as np
from matplotlib.axes import Axes

from kvlab.plot.style import OKABE_ITO, new_axes


def plot_write_traffic(traffic: Mapping[str, Mapping[str, int]], title: str = "",
                       ax: Axes | None = None) -> Axes:
    """Stacked bars, MiB read and written: one bar per unfused step, then the unfused total and
    the fused kernel. traffic: ``write_traffic(...)``'s dict."""
    if "fused" not in traffic or "unfused" not in traffic:
        raise ValueError("traffic must be write_traffic()'s dict (with 'unfused' and 'fused')")
    ax = new_axes(ax, figsize=(8, 3.6))
    names = [n for n in traffic if n not in ("unfused", "fused")] + ["unfused", "fused"]
    reads = np.array([traffic[n]["read"] for n in names]) / 2**20
    writes = np.array([traffic[n]["write"] for n in names]) / 2**20
    x = np.arange(len(names)) + np.array([0] * (len(names) - 2) + [0.6, 0.6])
    ax.bar(x, reads, color=OKABE_ITO["sky_blue"], label="read")
    ax.bar(x, writes, bottom=reads, color=OKABE_ITO["vermillion"], label="written")
    for xi, total in zip(x, reads + writes):
        ax.text(xi, total, f"{total:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("MiB moved")
    saved = 1 - (reads[-1] + writes[-1]) / (reads[-2] + writes[-2])
    ax.set_title(title or f"fused moves {saved:.0%} fewer bytes")
    ax.legend(frameon=False, loc="upper left")
    return ax


def plot_thread_blocks(num_q_heads: int, num_kv_heads: int, num_tokens: int = 3,
                       ax: Axes | None = None) -> Axes:
    """The fused kernel's grid over packed rows: block (t, j) owns head j of token t, and where
    its result goes (q_out, the K cache, the V cache)."""
    if min(num_q_heads, num_kv_heads, num_tokens) < 1:
        raise ValueError("head and token counts must be >= 1")
    ax = new_axes(ax, figsize=(8, 0.8 + 0.5 * num_tokens))
    heads = num_q_heads + 2 * num_kv_heads
    colours = ([OKABE_ITO["blue"]] * num_q_heads + [OKABE_ITO["orange"]] * num_kv_heads
               + [OKABE_ITO["bluish_green"]] * num_kv_heads)
    labels = ([f"Q{i}" for i in range(num_q_heads)] + [f"K{i}" for i in range(num_kv_heads)]
              + [f"V{i}" for i in range(num_kv_heads)])
    for t in range(num_tokens):
        for j in range(heads):
            ax.add_patch(_rect(j, num_tokens - 1 - t, colours[j]))
            ax.text(j + 0.5, num_tokens - 0.5 - t, f"{labels[j]}\n({t},{j})", ha="center",
                    va="center", fontsize=7, color="white")
    ax.set_xlim(0, heads)
    ax.set_ylim(0, num_tokens)
    ax.set_yticks(np.arange(num_tokens) + 0.5, [f"token {t}" for t in reversed(range(num_tokens))])
    ax.set_xticks([num_q_heads / 2, num_q_heads + num_kv_heads / 2,
                   num_q_heads + 1.5 * num_kv_heads],
                  ["norm + rope -> q_out", "norm + rope -> K cache", "-> V cache"])
    ax.set_title("one thread block per (token, head) of the packed row")
    return ax


def _rect(x: float, y: float, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x + 0.04, y + 0.06), 0.92, 0.88, color=colour)
