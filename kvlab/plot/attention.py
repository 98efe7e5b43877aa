"""Figures of notebook 05 (decode attention): the attention weights laid over a block table, the
split-K partitions and their merge, a roofline placing each attention variant, and which lane of
a warp reads which bytes of a key (the measured kernel versions are drawn by :mod:`kvlab.plot.perf`).

Functions take plain numbers (weights, partition bounds, FLOPs and bytes already computed) and draw
them; see :mod:`kvlab.plot` for the rules.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from kvlab.plot.style import COLOR_REFERENCE, OKABE_ITO, SEQ_COLORS, new_axes

# Nominal peaks of an NVIDIA H100 SXM5 from its datasheet (not measured here): HBM3 bandwidth
# 3.35 TB/s, dense BF16 tensor-core throughput ~989 TFLOP/s (1979 with 2:4 sparsity).
H100_SXM_NOMINAL = {"name": "H100 SXM (nominal datasheet)", "bytes_per_s": 3.35e12,
                    "flops_per_s": 989e12}


def plot_scores_over_table(weights: np.ndarray, block_table: Sequence[int], block_size: int,
                           ax: Axes | None = None) -> Axes:
    """One query's attention weights over a sequence's positions, drawn along its block table.

    weights: ``[context_len]`` (one query head) or ``[heads, context_len]`` (one row per head),
    each row summing to 1; block_table: the sequence's physical block ids in order; each group of
    ``block_size`` positions is labelled with the block it lives in.
    """
    w = np.atleast_2d(np.asarray(weights, float))
    length = w.shape[1]
    table = [int(b) for b in block_table]
    if block_size <= 0 or len(table) * block_size < length:
        raise ValueError(f"{len(table)} blocks of {block_size} cannot hold {length} positions")
    ax = new_axes(ax, (9, 1.6 + 0.35 * len(w)))
    image = ax.imshow(w, aspect="auto", cmap="Blues", vmin=0, vmax=max(w.max(), 1e-12),
                      extent=(-0.5, length - 0.5, len(w) - 0.5, -0.5), interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="attention weight", pad=0.01)
    for i in range(-(-length // block_size)):
        edge = i * block_size - 0.5
        ax.axvline(edge, color=OKABE_ITO["vermillion"], lw=1.2)
        ax.text(edge + min(block_size, length - i * block_size) / 2, -0.7, f"block {table[i]}",
                ha="center", va="bottom", fontsize=8, color=OKABE_ITO["vermillion"])
    ax.set_yticks(range(len(w)), [f"head {h}" for h in range(len(w))])
    ax.set_xlabel("position in the sequence (logical); the label above is the physical block")
    ax.set_ylim(len(w) - 0.5, -1.6)
    return ax


def plot_split_k(partition_bounds: Sequence[tuple[int, int]], local_weights: Sequence[np.ndarray],
                 merge_weights: Sequence[float], ax: Axes | None = None) -> plt.Figure:
    """Flash-decoding in one picture. Left: each partition's own softmax (weights summing to 1
    inside it). Right: the merge weights ``exp(lse_j - LSE)`` (summing to 1); a partition's final
    weights are its local ones times its merge weight. Empty partitions draw nothing, weigh 0."""
    if not (len(partition_bounds) == len(local_weights) == len(merge_weights)):
        raise ValueError("partition_bounds, local_weights and merge_weights need one entry each "
                         "per partition")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3), width_ratios=(3, 1))
    for j, ((start, stop), w) in enumerate(zip(partition_bounds, local_weights)):
        color = SEQ_COLORS[j % len(SEQ_COLORS)]
        if stop > start:
            left.bar(np.arange(start, stop), w, width=0.9, color=color, label=f"partition {j}")
            left.bar(np.arange(start, stop), np.asarray(w) * merge_weights[j], width=0.5,
                     color="black", alpha=0.55)
            left.axvline(start - 0.5, color=COLOR_REFERENCE, lw=0.8, ls="--")
    left.set_xlabel("position")
    left.set_ylabel("weight")
    left.set_title("each partition's own softmax (colour) and its share of the final one (black)",
                   fontsize=9)
    parts = np.arange(len(partition_bounds))
    right.bar(parts, merge_weights, color=[SEQ_COLORS[j % len(SEQ_COLORS)] for j in parts])
    empty = [j for j, (start, stop) in enumerate(partition_bounds) if stop <= start]
    if empty:  # a cross on the axis, not a word under it: a dozen labels would overlap
        right.plot(empty, [0.0] * len(empty), "x", color=COLOR_REFERENCE, clip_on=False,
                   label="empty: weight 0")
        right.legend(loc="upper right", fontsize=8, frameon=False)
    small = {"fontsize": 8} if len(parts) > 8 else {}  # else the style's tick size
    right.set_xticks(parts, [str(j) for j in parts], **small)
    right.set_ylim(0, 1)
    right.set_title("merge weights exp(lse_j - LSE)", fontsize=9)
    right.set_xlabel("partition")
    fig.tight_layout()
    return fig


def plot_roofline(variants: Sequence[dict], device: dict = H100_SXM_NOMINAL,
                  ax: Axes | None = None) -> Axes:
    """A roofline: attainable FLOP/s ``min(peak, intensity * bandwidth)`` against arithmetic
    intensity (FLOPs per byte moved), each variant a point at its intensity on the roof.

    variants: dicts with ``name``, ``flops`` and ``bytes`` (exact counts for one call).
    device: ``name``, ``bytes_per_s``, ``flops_per_s`` (nominal peaks; say so in ``name``).
    """
    if not variants:
        raise ValueError("plot_roofline needs at least one variant")
    ax = new_axes(ax, (7, 4.2))
    bw, peak = device["bytes_per_s"], device["flops_per_s"]
    ridge = peak / bw
    x = np.logspace(-1, max(4, np.log10(ridge) + 1), 200)
    ax.loglog(x, np.minimum(peak, x * bw) / 1e12, color=COLOR_REFERENCE, lw=2)
    ax.annotate(f"ridge {ridge:.0f} FLOP/B", (ridge, peak / 1e12), textcoords="offset points",
                xytext=(-70, -16), fontsize=8, color=COLOR_REFERENCE)
    for i, var in enumerate(variants):
        if var["bytes"] <= 0 or var["flops"] <= 0:
            raise ValueError(f"variant {var.get('name')!r} needs positive flops and bytes")
        intensity = var["flops"] / var["bytes"]
        ax.plot(intensity, min(peak, intensity * bw) / 1e12, "o", ms=8,
                color=SEQ_COLORS[i % len(SEQ_COLORS)], label=f"{var['name']}  ({intensity:.2g} FLOP/B)")
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved)")
    ax.set_ylabel("attainable TFLOP/s")
    ax.set_title(f"roofline: {device['name']}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def lane_map(head_dim: int, lanes: int, dim_slots: int,
             elem_bytes: int | None = None) -> np.ndarray:
    """int ``[lanes, dim_slots]``: the dim of a key row that slot i of lane r holds in the warp
    attention kernels, -1 past ``head_dim``. v2-v4 (``elem_bytes`` None) load element by element,
    lane r taking every L-th dim: ``r + i L``. v5-v7 load 8-byte words of ``w = 8 / elem_bytes``
    dims, lane r taking every L-th word: ``((i // w) L + r) w + i % w`` (the kernels'
    ``_wide_dim``)."""
    if elem_bytes not in (None, 1, 2, 4):
        raise ValueError(f"elem_bytes must be 1, 2 or 4 (int8/fp8, fp16, float32 elements) or "
                         f"None (v2-v4's element loads), got {elem_bytes!r}")
    for name, value in (("head_dim", head_dim), ("lanes", lanes), ("dim_slots", dim_slots)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if elem_bytes is not None and dim_slots % (8 // elem_bytes):
        raise ValueError(f"dim_slots ({dim_slots}) must be whole 8-byte words of "
                         f"{8 // elem_bytes} elements")
    r = np.arange(lanes)[:, None]
    i = np.arange(dim_slots)[None, :]
    if elem_bytes is None:
        dims = r + i * lanes
    else:
        per_word = 8 // elem_bytes
        dims = ((i // per_word) * lanes + r) * per_word + i % per_word
    return np.where(dims < head_dim, dims, -1)


def plot_lane_map(head_dim: int = 128, lanes: int = 16, dim_slots: int = 8, elem_bytes: int = 2,
                  ax: Axes | None = None) -> Axes:
    """One key row of ``head_dim`` elements of ``elem_bytes`` each, as the L lanes that share the
    key read it: the colour is the lane, the brackets the load instructions (one instruction of
    all L lanes reads the stretch it spans). Top: v2-v4, one element per lane and instruction;
    bottom: v5-v7, one 8-byte word per lane and instruction. Defaults: head_dim 128, fp16, the 16
    lanes per key of a GPU launch."""
    per_word = 8 // elem_bytes
    ax = new_axes(ax, (9.6, 2.6))
    strips = [(f"v2-v4: {dim_slots} loads of {elem_bytes} B per lane",
               lane_map(head_dim, lanes, dim_slots), 1),
              (f"v5-v7: {dim_slots // per_word} loads of 8 B per lane",
               lane_map(head_dim, lanes, dim_slots, elem_bytes), per_word)]
    colors = plt.get_cmap("tab20").colors
    for row, (label, dims, per_load) in enumerate(reversed(strips)):
        y = 1.5 * row
        lane_of = np.full(head_dim, -1)
        load_of = np.full(head_dim, -1)
        for lane in range(lanes):
            for slot in range(dims.shape[1]):
                if dims[lane, slot] >= 0:
                    lane_of[dims[lane, slot]] = lane
                    load_of[dims[lane, slot]] = slot // per_load
        for d in range(head_dim):
            ax.add_patch(plt.Rectangle((d, y + 0.3), 1, 0.6, lw=0,
                                       color=colors[lane_of[d] % len(colors)]))
        for load in range(load_of.max() + 1):
            covered = np.flatnonzero(load_of == load)
            first, last = covered.min(), covered.max() + 1
            ax.plot([first + 0.3, last - 0.3], [y + 0.2, y + 0.2], color=COLOR_REFERENCE, lw=2)
            ax.text((first + last) / 2, y + 0.05, f"load {load}", ha="center", va="top",
                    fontsize=8)
        ax.text(0, y + 0.95, label, fontsize=8, va="bottom")
    ax.set_xlim(0, head_dim)
    ax.set_ylim(-0.3, 2.75)
    ax.set_yticks([])
    ax.set_xlabel(f"dim of one key row (head_dim {head_dim}, {elem_bytes}-byte elements); "
                  f"colour: which of the {lanes} lanes reads it")
    return ax
