"""Figures of notebooks/03_rope: how fast each pair turns (and what scaling does to it), one pair
turning with position, the dot product that depends only on distance, and the two ways of laying
out the pairs in a head. The notebook computes every number (with kvlab.ref.rope); these draw."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes

from kvlab.checks import positive_int
from kvlab.plot.style import COLOR_FREE, COLOR_REFERENCE, OKABE_ITO, new_axes

# One colour per scaling kind, the same in every RoPE figure.
SCALING_COLORS = {
    "default": OKABE_ITO["black"],
    "linear": OKABE_ITO["sky_blue"],
    "dynamic": OKABE_ITO["bluish_green"],
    "yarn": OKABE_ITO["vermillion"],
    "llama3": OKABE_ITO["blue"],
}
_SPARE = (OKABE_ITO["orange"], OKABE_ITO["reddish_purple"], OKABE_ITO["yellow"])


def _scaling_color(label: str, index: int) -> str:
    for kind, colour in SCALING_COLORS.items():
        if label.lower().startswith(kind):
            return colour
    return _SPARE[index % len(_SPARE)]


def _vector(name: str, values, length: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {list(array.shape)}")
    if length is not None and array.size != length:
        raise ValueError(f"{name} must have {length} entries, got {array.size}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite")
    return array


def plot_rope_frequencies(inv_freqs: Mapping[str, np.ndarray], context: int | None = None,
                          ax: Axes | None = None) -> Axes:
    """The wavelength of every pair, ``2 pi / inv_freq`` positions per full turn, on a log axis.

    inv_freqs: label -> ``inv_freq`` ``[rotary_dim // 2]`` (e.g. from
    :func:`kvlab.ref.rope.rope_frequencies`), one line each; a label starting with a scaling kind
    ("llama3 ...") gets that kind's colour. context: draws a dashed line at that many positions
    (the context the model was trained on): pairs above it never complete a turn within it.
    Returns the Axes; raises ValueError for an empty mapping or a non-positive frequency.
    """
    if not inv_freqs:
        raise ValueError("inv_freqs is empty: give at least one label -> inv_freq")
    ax = new_axes(ax, (7.5, 4.2))
    for index, (label, values) in enumerate(inv_freqs.items()):
        inv_freq = _vector(f"inv_freqs[{label!r}]", values)
        if (inv_freq <= 0).any():
            raise ValueError(f"inv_freqs[{label!r}] must be > 0 (radians per position)")
        ax.plot(np.arange(inv_freq.size), 2 * np.pi / inv_freq, label=label, lw=2,
                color=_scaling_color(label, index), marker="o", ms=2.5)
    if context is not None:
        context = positive_int("context", context)
        ax.axhline(context, color=COLOR_REFERENCE, ls="--", lw=1,
                   label=f"{context:,} positions (trained context)")
    ax.set_yscale("log")
    ax.set_xlabel("pair i (dims 2i, 2i+1 interleaved; i, i+d/2 rotate-half)")
    ax.set_ylabel("wavelength: positions per full turn")
    ax.set_title("RoPE: each pair turns at its own speed")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    return ax


def plot_pair_rotation(points: Mapping[str, np.ndarray], positions: Sequence[int],
                       ax: Axes | None = None) -> Axes:
    """One pair of dims, drawn as a 2-D vector at several positions: it turns, its length stays.

    points: label -> float ``[len(positions), 2]``, the pair (first, second coordinate) after RoPE
    at each position (e.g. a fast and a slow pair). Each vector is an arrow from the origin, its
    tip labelled with the position. Returns the Axes.
    """
    positions = [int(p) for p in positions]
    if not points or not positions:
        raise ValueError("points and positions must be non-empty")
    ax = new_axes(ax, (5.2, 5.2))
    colours = (OKABE_ITO["blue"], OKABE_ITO["vermillion"], OKABE_ITO["bluish_green"],
               OKABE_ITO["orange"])
    radius = 0.0
    for index, (label, values) in enumerate(points.items()):
        xy = np.asarray(values, dtype=np.float64)
        if xy.shape != (len(positions), 2):
            raise ValueError(f"points[{label!r}] must have shape [{len(positions)}, 2], "
                             f"got {list(xy.shape)}")
        colour = colours[index % len(colours)]
        for k, ((a, b), pos) in enumerate(zip(xy, positions)):
            ax.annotate("", xy=(a, b), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.4,
                                        alpha=0.35 + 0.65 * (k + 1) / len(positions)))
            ax.text(a * 1.1, b * 1.1, f"m={pos}", color=colour, fontsize=8,
                    ha="center", va="center")
        ax.plot([], [], color=colour, lw=2, label=label)  # a legend entry for the arrows
        radius = max(radius, float(np.hypot(xy[:, 0], xy[:, 1]).max()))
    circle = np.linspace(0, 2 * np.pi, 200)
    ax.plot(radius * np.cos(circle), radius * np.sin(circle), color=COLOR_FREE, lw=1, zorder=0)
    lim = 1.3 * radius
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.axhline(0, color=COLOR_FREE, lw=0.8, zorder=0)
    ax.axvline(0, color=COLOR_FREE, lw=0.8, zorder=0)
    ax.set_xlabel("first coordinate of the pair")
    ax.set_ylabel("second coordinate")
    ax.set_title("one pair at positions m: rotated by m·θᵢ")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    return ax


def plot_relative_dot(dots: np.ndarray, ax: Axes | None = None) -> Axes:
    """``dots[m, n] = <R(m) q, R(n) k>`` as a heatmap over query position m and key position n.

    RoPE makes every diagonal (``m - n`` fixed) one colour: attention sees distance, not place.
    dots: float ``[M, N]``. Returns the Axes (with a colorbar).
    """
    dots = np.asarray(dots, dtype=np.float64)
    if dots.ndim != 2 or dots.size == 0 or not np.isfinite(dots).all():
        raise ValueError(f"dots must be a finite, non-empty 2-D array [M, N], got shape "
                         f"{list(dots.shape)}")
    ax = new_axes(ax, (5.8, 4.8))
    limit = np.abs(dots).max()
    image = ax.imshow(dots, cmap="RdBu_r", vmin=-limit, vmax=limit, origin="upper",
                      interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="⟨R(m) q, R(n) k⟩")
    ax.set_xlabel("key position n")
    ax.set_ylabel("query position m")
    ax.set_title("q·k after RoPE: constant along every diagonal m − n")
    return ax


def plot_pair_layouts(head_dim: int, rotary_dim: int | None = None,
                      ax: Axes | None = None) -> Axes:
    """The dims of one head, twice: coloured by the pair each belongs to, rotate-half (neox) above,
    interleaved (gptj) below. Dims from rotary_dim on (partial rotary) are grey: they never turn.
    Each cell is labelled with its pair when the head is small enough (head_dim <= 32) for the
    numbers to be legible.

    Returns the Axes; its cells are Rectangles with gid ``"neox-dim"`` / ``"gptj-dim"``.
    """
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    head_dim = positive_int("head_dim", head_dim)
    rotary_dim = head_dim if rotary_dim is None else positive_int("rotary_dim", rotary_dim)
    if head_dim % 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"head_dim and rotary_dim must be even with rotary_dim <= head_dim, got "
                         f"{head_dim} and {rotary_dim}")
    half = rotary_dim // 2
    cmap = colormaps["viridis"]
    ax = new_axes(ax, (min(9.8, max(6.0, 0.42 * head_dim + 2)), 2.6))
    labelled = head_dim <= 32  # wider heads get cells too narrow for an 8-point number
    rows = {"neox": lambda d: d % half, "gptj": lambda d: d // 2}
    titles = {"neox": "rotate-half (neox)", "gptj": "interleaved (gptj)"}
    for row, (style, pair_of) in enumerate(rows.items()):
        y = 1 - row
        for d in range(head_dim):
            rotated = d < rotary_dim
            pair = pair_of(d) if rotated else None
            face = cmap(pair / max(half - 1, 1)) if rotated else COLOR_FREE
            ax.add_patch(Rectangle((d, y * 1.4), 0.95, 0.95, facecolor=face, edgecolor="white",
                                   gid=f"{style}-dim"))
            if labelled:
                dark = rotated and pair / max(half - 1, 1) < 0.6
                ax.text(d + 0.475, y * 1.4 + 0.475, f"{pair}" if rotated else "·", ha="center",
                        va="center", fontsize=8, color="white" if dark else "black")
        ax.text(-0.3, y * 1.4 + 0.475, titles[style], ha="right", va="center", fontsize=9)
    for d in range(0, head_dim, max(1, head_dim // 8)):
        ax.text(d + 0.475, -0.25, str(d), ha="center", va="top", fontsize=8, color="#555555")
    ax.set_xlim(-0.2, head_dim + 0.1)
    ax.set_ylim(-0.7, 2.5)
    ax.set_axis_off()
    passes = f"; dims {rotary_dim}..{head_dim - 1} pass through" if rotary_dim < head_dim else ""
    ax.set_title(f"which dims form pair i (the number in each cell), head_dim {head_dim}, "
                 f"rotary_dim {rotary_dim}{passes}", fontsize=9)
    return ax
