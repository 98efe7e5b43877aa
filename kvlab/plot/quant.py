"""Figures of notebooks/02_quantization: where the large values of K and V sit, how quantization
errors are distributed, and what each KV dtype costs in memory against what it costs in accuracy.
Each function takes plain arrays and numbers (the notebook computes them with kvlab.quant_lab)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes

from kvlab.plot.style import COLOR_REFERENCE, OKABE_ITO, dtype_color, new_axes

_SERIES = (OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["bluish_green"],
           OKABE_ITO["reddish_purple"], OKABE_ITO["vermillion"], OKABE_ITO["sky_blue"])


def plot_channel_magnitudes(x, ax: Axes | None = None, title: str = "|x|", max_tokens: int = 128
                            ) -> Axes:
    """Heatmap of ``|x|`` for one head, ``x`` ``[tokens, head_dim]``: tokens down, channels
    across (the first ``max_tokens`` tokens). Outlier channels show as bright columns, tokens of
    unequal size as bright rows. Returns the Axes."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"x must be a non-empty 2-D [tokens, head_dim] array, got shape {x.shape}")
    ax = new_axes(ax, (6, 3))
    image = ax.imshow(np.abs(x[:max_tokens]), aspect="auto", cmap="magma", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="|value|")
    ax.set(xlabel="channel (dim of the head)", ylabel="token", title=title)
    return ax


def plot_error_histograms(errors: Mapping[str, np.ndarray], ax: Axes | None = None,
                          bins: int = 60, xlabel: str = "|x' - x| / scale") -> Axes:
    """Step histograms of error samples, one per entry of ``errors`` (label -> array), on a log
    count axis so the tails show. Returns the Axes."""
    if not errors:
        raise ValueError("errors is empty: give at least one {label: array}")
    ax = new_axes(ax, (6, 3))
    samples = {label: np.abs(np.asarray(e, np.float64)).ravel() for label, e in errors.items()}
    top = max(float(s.max()) for s in samples.values()) or 1.0
    edges = np.linspace(0, top, bins + 1)
    for i, (label, s) in enumerate(samples.items()):
        ax.hist(s, bins=edges, histtype="step", linewidth=1.5, color=_SERIES[i % len(_SERIES)],
                label=label)
    ax.set(yscale="log", xlabel=xlabel, ylabel="elements")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: covers no bar
    return ax


def plot_memory_vs_error(names: Sequence[str], bytes_per_token: Sequence[float],
                         errors: Sequence[float], ax: Axes | None = None,
                         ylabel: str = "attention error, max|diff| / max|ref|",
                         bar: float | None = None, bar_label: str = "threshold") -> Axes:
    """One point per KV dtype: KV bytes per token (x) against an accuracy error (y, log), each
    point in its dtype's colour and labelled; ``bar`` draws a dashed horizontal threshold, named
    ``bar_label`` (e.g. "ferrum's INT8 test threshold")."""
    if not (len(names) == len(bytes_per_token) == len(errors)) or not names:
        raise ValueError("names, bytes_per_token and errors must be non-empty and equally long")
    ax = new_axes(ax, (6, 3.5))
    for i, (name, x, y) in enumerate(zip(names, bytes_per_token, errors)):
        ax.scatter([x], [y], s=60, color=dtype_color(name.split(" ")[0], i), zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points",
                    xytext=(7, 3) if i % 2 == 0 else (7, -11))  # alternate: close points stay legible
    if bar is not None:
        ax.axhline(bar, color=COLOR_REFERENCE, linestyle="--", linewidth=1)
        ax.annotate(f"{bar_label} {bar:g}", (ax.get_xlim()[0], bar), textcoords="offset points",
                    xytext=(4, 3), color=COLOR_REFERENCE)
    ax.margins(x=0.25, y=0.2)
    ax.set(yscale="log", xlabel="KV bytes per token (one layer, one model shape)", ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return ax
