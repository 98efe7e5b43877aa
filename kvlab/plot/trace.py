"""Pictures of a traced kernel launch: which thread read or wrote each element of an array.

Draws the owner maps of :class:`kvlab.trace.AccessLog` (kernel puzzles in the exercises, and the
real kernels' accesses in the stage notebooks). An array of any rank is drawn as a grid of rows ×
its last axis (every leading axis folded into rows, row-major, as the bytes lie in memory).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from kvlab.plot.style import SEQ_COLORS

NO_ACCESS, RACE = -1, -2
_UNTOUCHED, _RACE_COLOR = "#f2f2f2", "#000000"


def _as_grid(owners: np.ndarray) -> np.ndarray:
    """Fold every axis but the last into rows: ``[prod(leading), last]`` (a 1-D array is one row)."""
    return owners.reshape(1, -1) if owners.ndim < 2 else owners.reshape(-1, owners.shape[-1])


def plot_accesses(owners: np.ndarray, title: str = "", ax=None, max_label_cells: int = 400):
    """Draw an owner map: each element coloured by the thread that touched it.

    owners: int array (any rank), the global thread id per element, ``-1`` untouched, ``-2`` two
        threads (a race, drawn black), as :meth:`kvlab.trace.AccessLog.owner_map` returns.
    Threads cycle through the 7 sequence colours of :mod:`kvlab.plot.style`, and each cell is labelled with its thread id
    when the array has at most ``max_label_cells`` elements. Returns the Axes.
    """
    owners = np.asarray(owners)
    if owners.dtype.kind not in "iu" or owners.size == 0:
        raise ValueError(f"owners must be a non-empty integer array, got {owners.dtype} "
                         f"of shape {owners.shape}")
    grid = _as_grid(owners)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(9.5, 1.2 + 0.45 * grid.shape[1]),
                                      min(6.0, 1.0 + 0.35 * grid.shape[0])))
    palette = list(SEQ_COLORS)
    colour_index = np.where(grid >= 0, 2 + grid % len(palette), np.where(grid == RACE, 1, 0))
    cmap = ListedColormap([_UNTOUCHED, _RACE_COLOR] + palette)
    ax.imshow(colour_index, cmap=cmap, vmin=0, vmax=len(palette) + 1, aspect="auto",
              interpolation="nearest")
    if grid.size <= max_label_cells:
        for (r, c), tid in np.ndenumerate(grid):
            if tid >= 0:
                ax.text(c, r, str(tid), ha="center", va="center", fontsize=8)
            elif tid == RACE:
                ax.text(c, r, "race", ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(grid.shape[1]) if grid.shape[1] <= 32 else [])
    if grid.shape[0] <= 32:
        ax.set_yticks(range(grid.shape[0]))
        if owners.ndim > 2:  # label each row with its index on the leading axes, e.g. (1, 0, 1)
            leading = np.ndindex(*owners.shape[:-1])
            ax.set_yticklabels([str(tuple(int(i) for i in idx)).replace(" ", "") for idx in leading])
    else:
        ax.set_yticks([])
    ax.set_xlabel("last axis (e.g. head_dim)")
    ax.set_ylabel("index on the leading axes" if owners.ndim > 2 else "row")
    ax.set_title(title or "thread id per element (grey: untouched)")
    return ax


def plot_access_comparison(yours: np.ndarray, reference: np.ndarray, what: str = "writes"):
    """Your kernel's owner map beside the reference kernel's, same colours; cells that differ are
    outlined in red. Returns the Figure."""
    yours, reference = np.asarray(yours), np.asarray(reference)
    if yours.shape != reference.shape:
        raise ValueError(f"owner maps differ in shape: {yours.shape} vs {reference.shape}")
    rows, cols = _as_grid(yours).shape
    fig, axes = plt.subplots(1, 2, figsize=(min(9.8, 2.6 + 0.9 * cols), min(6.0, 1.4 + 0.35 * rows)),
                             layout="constrained")
    plot_accesses(yours, "your kernel", axes[0])
    plot_accesses(reference, "the solution", axes[1])
    fig.suptitle(f"{what}: the thread that made each one (red outline: differs)")
    for r, c in np.argwhere(_as_grid(yours) != _as_grid(reference)):
        axes[0].add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red",
                                        linewidth=2))
    return fig
