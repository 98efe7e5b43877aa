"""Figures of notebooks/04_fused_write: the bytes each step of the unfused write moves against
the fused kernel's, and which thread block of the fused kernel owns which heads of which rows.
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


def plot_thread_blocks(num_q_heads: int, num_kv_heads: int, num_tokens: int = 48,
                       ax: Axes | None = None, tokens_per_block: int = 16, qk_mode: int = 1,
                       quantized: bool = False) -> Axes:
    """The fused kernel's grid over packed rows: block ``(b, j)`` owns head ``j`` of the
    ``tokens_per_block`` tokens ``b * tokens_per_block ...`` and sends it to q_out, the K cache or
    the V cache. Hatched heads go through shared memory with barriers, because a thread needs
    values other threads loaded: the RMSNorm's sum of squares (Q and K, ``qk_mode`` 1) or the amax
    of a ``quantized`` store (K and V). The others keep each (first, second) pair in a thread's
    registers. Returns the Axes."""
    from matplotlib.patches import Patch

    for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads),
                        ("num_tokens", num_tokens), ("tokens_per_block", tokens_per_block)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if qk_mode not in (0, 1, 2, 3):
        raise ValueError(f"qk_mode must be 0, 1, 2 or 3, got {qk_mode!r}")
    heads = num_q_heads + 2 * num_kv_heads
    groups = -(-num_tokens // tokens_per_block)
    ax = new_axes(ax, figsize=(min(9.6, 1.6 + 0.75 * heads), 1.4 + 0.55 * groups))
    kinds = ["Q"] * num_q_heads + ["K"] * num_kv_heads + ["V"] * num_kv_heads
    index = list(range(num_q_heads)) + list(range(num_kv_heads)) * 2
    colours = {"Q": OKABE_ITO["blue"], "K": OKABE_ITO["orange"], "V": OKABE_ITO["bluish_green"]}
    shared = {"Q": qk_mode == 1, "K": qk_mode == 1 or quantized, "V": quantized}
    for b in range(groups):
        for j in range(heads):
            ax.add_patch(_rect(j, groups - 1 - b, colours[kinds[j]],
                               hatch="///" if shared[kinds[j]] else None))
            ax.text(j + 0.5, groups - 0.5 - b, f"{kinds[j]}{index[j]}\n({b},{j})", ha="center",
                    va="center", fontsize=8, color="white" if kinds[j] != "K" else "black",
                    bbox={"facecolor": colours[kinds[j]], "edgecolor": "none", "pad": 0.5})
    ax.set_xlim(0, heads)
    ax.set_ylim(0, groups)
    last = [min(num_tokens, (b + 1) * tokens_per_block) - 1 for b in range(groups)]
    ax.set_yticks(np.arange(groups) + 0.5,
                  [f"tokens {b * tokens_per_block}–{last[b]}" if last[b] > b * tokens_per_block
                   else f"token {last[b]}" for b in reversed(range(groups))])
    q_step = "norm + rope" if qk_mode == 1 else "rope" if qk_mode else "copy"
    v_step = "quantize" if quantized else "copy"
    ax.set_xticks([num_q_heads / 2, num_q_heads + num_kv_heads / 2,
                   num_q_heads + 1.5 * num_kv_heads],
                  [f"{q_step} → q_out", f"{q_step} → K cache", f"{v_step} → V cache"])
    ax.tick_params(length=0)
    ax.set_title(f"one thread block per (head, {tokens_per_block} tokens) of the packed rows; "
                 f"label: block (b, j)", fontsize=10, pad=24)  # pad: room for the legend
    handles = [Patch(facecolor="white", edgecolor="black", hatch="///",
                     label="through shared memory, with barriers"),
               Patch(facecolor="white", edgecolor="black", label="pairs in registers")]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2,
              frameon=False, fontsize=9, borderaxespad=0.2)
    return ax


def _rect(x: float, y: float, colour: str, hatch: str | None = None):
    from matplotlib.patches import Rectangle

    return Rectangle((x + 0.04, y + 0.06), 0.92, 0.88, facecolor=colour, hatch=hatch,
                     edgecolor="white" if hatch else colour, linewidth=0)
