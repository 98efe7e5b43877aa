"""Figures of notebooks/01_paging: the block table over the pool, where each layout puts each
element, and how much of the KV memory a serving policy reserves holds real tokens (kvlab.waste)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.axes import Axes

from kvlab.checks import positive_int
from kvlab.plot.style import (
    COLOR_FREE, COLOR_REFERENCE, OKABE_ITO, SEQ_COLORS, bytes_unit, new_axes, policy_color,
    seq_color,
)

_LAYOUT_TITLES = {
    "nhd": "NHD (kvlab, FlashInfer)\n[block_size, heads, head_dim]",
    "hnd": "HND (ferrum's Metal pools, FlashInfer)\n[heads, block_size, head_dim]",
    "vllm_k": "vLLM key cache\n[heads, head_dim/x, block_size, x]",
    "vllm_v": "vLLM value cache\n[heads, head_dim, block_size]",
}


def plot_block_table(
    block_tables,
    context_lens,
    num_blocks: int,
    block_size: int,
    ax: Axes | None = None,
    seq_labels: Sequence[str] | None = None,
    ncols: int | None = None,
    arrows: bool | None = None,
) -> Axes:
    """The block tables on the left, the pool's physical blocks on the right, and how they map.

    ``block_tables`` ``int [num_seqs, max_blocks]`` (-1 = unused) and ``context_lens``
    ``int [num_seqs]`` as in docs/design.md#conventions; sequence ``s`` uses its first
    ``ceil(context_lens[s] / block_size)`` entries. Left: one row per sequence, one cell per
    logical block, labelled with the physical block it maps to ("→#3"). Right: the pool's
    ``num_blocks`` blocks, each coloured by the sequence that owns it and filled in proportion to
    the tokens it holds ("12/16"); a block listed by several sequences is hatched and names its
    owners; free blocks are grey. Pools of up to 16 blocks are drawn as one column with an arrow
    per mapping; larger ones as a grid of ``ncols`` columns (default 8) without arrows.
    ``arrows`` and ``ncols`` override that choice.

    Returns the Axes. Its patches carry gids: ``"logical-block"`` (one per mapping),
    ``"physical-block"`` (``num_blocks``), ``"fill"`` (one per used block) and
    ``"mapping-arrow"``. Raises ValueError for bad tables (see
    :func:`kvlab.layouts.check_block_tables`), ids out of range, or bad sizes.
    """
    from matplotlib.patches import FancyArrowPatch, Patch, Rectangle

    from kvlab.layouts import check_block_tables

    num_blocks = positive_int("num_blocks", num_blocks)
    block_size = positive_int("block_size", block_size)
    tables, lens = check_block_tables(block_tables, context_lens, block_size, num_blocks=num_blocks)
    num_seqs = lens.size
    if num_seqs == 0:
        raise ValueError("block_tables is empty: draw at least one sequence")
    if seq_labels is None:
        seq_labels = [f"seq {s}" for s in range(num_seqs)]
    elif len(seq_labels) != num_seqs:
        raise ValueError(f"seq_labels must name each of the {num_seqs} sequences, "
                         f"got {len(seq_labels)}")
    used_blocks = [-(-int(n) // block_size) for n in lens]
    mappings = sum(used_blocks)
    if ncols is None:
        ncols = 1 if (num_blocks <= 16 and arrows is not False) else min(num_blocks, 8)
    ncols = positive_int("ncols", ncols)
    arrows = (ncols == 1 and mappings <= 48) if arrows is None else bool(arrows)
    nrows = -(-num_blocks // ncols)

    # who holds which physical block, and how full it is
    owners: dict[int, list[int]] = {}
    fill: dict[int, int] = {}
    for s, (row, n, used) in enumerate(zip(tables, lens, used_blocks)):
        for j in range(used):
            b = int(row[j])
            owners.setdefault(b, []).append(s)
            fill[b] = max(fill.get(b, 0), min(block_size, int(n) - j * block_size))

    column = ncols == 1
    gap = 0.12
    lw, lh = 1.0, 0.9                               # a logical cell
    pw, ph = (2.4, 0.62) if column else (1.0, 1.0)  # a physical cell
    width_logical = max(max(used_blocks), 1) * lw
    x0 = width_logical + (3.0 if arrows else 1.4)   # where the pool starts
    height_pool = nrows * ph
    height_logical = num_seqs * lh
    top = max(height_pool, height_logical)
    y_pool = (top - height_pool) / 2                # centre the shorter part
    y_logical = (top - height_logical) / 2
    ax = new_axes(ax, (0.8 * (x0 + ncols * pw) + 1.2, 0.8 * top + 1.7))

    def physical_xy(b: int) -> tuple[float, float]:  # top-left corner of block b
        return x0 + (b % ncols) * pw, top - y_pool - (b // ncols) * ph

    # the pool
    for b in range(num_blocks):
        x, y = physical_xy(b)
        who = owners.get(b, [])
        shared = len(who) > 1
        face = seq_color(who[0]) if who else COLOR_FREE
        box = (x + gap / 2, y - ph + gap / 2)
        ax.add_patch(Rectangle(box, pw - gap, ph - gap, facecolor="white" if who else face,
                               edgecolor="#555555", linewidth=0.8, zorder=2, gid="physical-block"))
        if who:
            ax.add_patch(Rectangle(box, (pw - gap) * fill[b] / block_size, ph - gap,
                                   facecolor=face, alpha=0.85, zorder=2.1,
                                   hatch="///" if shared else None,
                                   edgecolor="#333333" if shared else "none", linewidth=0,
                                   gid="fill"))
        note = f"{fill[b]}/{block_size}" if who else "free"
        if shared:
            note += " " + "+".join(f"s{s}" for s in who)
        plate = {"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 0.5}
        if column:
            ax.text(x + 0.08, y - ph / 2, f"#{b}", ha="left", va="center", fontsize=8,
                    fontweight="bold", zorder=3, bbox=plate if who else None)
            ax.text(x + pw - 0.1, y - ph / 2, note, ha="right", va="center", fontsize=8,
                    zorder=3, color="#333333" if who else "#777777",
                    bbox=plate if who else None)
        else:
            ax.text(x + pw / 2, y - 0.3 * ph, f"#{b}", ha="center", va="center", fontsize=8,
                    fontweight="bold", zorder=3)
            ax.text(x + pw / 2, y - 0.68 * ph, note.replace(" ", "\n"), ha="center",
                    va="center", fontsize=8, zorder=3, color="#333333" if who else "#777777",
                    bbox=plate if who else None)

    # the block tables
    dark_text = {0, 3, 5}  # sequence colours dark enough for white text
    for s, (row, used) in enumerate(zip(tables, used_blocks)):
        y = top - y_logical - s * lh
        ax.text(-0.15, y - lh / 2, seq_labels[s], ha="right", va="center", fontsize=8)
        for j in range(used):
            b = int(row[j])
            ax.add_patch(Rectangle((j * lw + gap / 2, y - lh + gap / 2), lw - gap, lh - gap,
                                   facecolor=seq_color(s), edgecolor="#555555", linewidth=0.8,
                                   zorder=2, gid="logical-block"))
            ax.text(j * lw + lw / 2, y - lh / 2, f"→#{b}", ha="center", va="center",
                    fontsize=8, zorder=3,
                    color="white" if s % len(SEQ_COLORS) in dark_text else "black")
            if arrows:  # drawn under the cells: it shows between the table and the pool
                px, py = physical_xy(b)
                ax.add_patch(FancyArrowPatch((j * lw + lw / 2, y - lh / 2),
                                             (px + gap / 2, py - ph / 2),
                                             arrowstyle="-|>", mutation_scale=9, shrinkA=0,
                                             shrinkB=0.5, color=seq_color(s), alpha=0.8,
                                             linewidth=1.0, zorder=1, gid="mapping-arrow"))
        if used == 0:
            ax.text(0.05, y - lh / 2, "(no tokens)", ha="left", va="center", fontsize=8,
                    color="#777777")

    ax.text(width_logical / 2, top + 0.25, "block tables\n(logical block → physical)",
            ha="center", va="bottom", fontsize=9)
    ax.text(x0 + ncols * pw / 2, top + 0.25, f"KV pool: {num_blocks} blocks\nof {block_size} "
            f"token slots", ha="center", va="bottom", fontsize=9)
    ax.set_xlim(-1.5, x0 + ncols * pw + 0.2)
    ax.set_ylim(-0.2, top + 1.15)
    ax.set_aspect("equal")
    ax.axis("off")
    handles = [Patch(facecolor=seq_color(s), label=f"{seq_labels[s]} ({int(n)} tokens)")
               for s, n in enumerate(lens)]
    if any(len(w) > 1 for w in owners.values()):
        handles.append(Patch(facecolor="white", edgecolor="#333333", hatch="///",
                             label="shared block"))
    handles.append(Patch(facecolor=COLOR_FREE, edgecolor="#555555", label="free"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
              ncols=min(len(handles), 3), frameon=False, fontsize=8)
    return ax


def _address_grid(num_kv_heads: int, head_dim: int, block_size: int, layout: str,
                  itemsize: int) -> np.ndarray:
    from kvlab.layouts import byte_offset

    slot, head, dim = np.meshgrid(np.arange(block_size), np.arange(num_kv_heads),
                                  np.arange(head_dim), indexing="ij")
    offsets = byte_offset(layout, np.zeros_like(slot), slot, head, dim,
                          (1, block_size, num_kv_heads, head_dim), itemsize)
    return offsets.reshape(block_size * num_kv_heads, head_dim)  # row = slot * H + head


_CELL_FONT = 8  # points: the byte offsets written in the cells


def _labels_fit(cell_inches: float, largest: int) -> bool:
    """Whether a cell ``cell_inches`` wide holds ``largest`` written at _CELL_FONT points (a digit
    is ~0.64 em wide in Matplotlib's default font), with a little room on each side."""
    return cell_inches >= len(str(largest)) * 0.64 * _CELL_FONT / 72 + 0.03


def plot_layout_addresses(
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    layout: str,
    itemsize: int = 2,
    ax: Axes | None = None,
    annotate: bool | None = None,
    colorbar: bool = True,
    cmap: str = "viridis",
) -> Axes:
    """Where each element of one block lands in memory under ``layout``, as a heatmap.

    Rows are (token slot, head) pairs, token-major (``t0 h0, t0 h1, …``), columns are the
    ``head_dim`` dims: the same logical element sits in the same cell under every layout, and its
    colour (and number, when ``annotate``) is its byte offset from the block's start
    (:func:`kvlab.layouts.byte_offset`). A smooth run of colour along a row is contiguous memory;
    a jump is a stride. ``layout`` is one of ``"nhd"``, ``"hnd"``, ``"vllm_k"``, ``"vllm_v"``;
    ``itemsize`` (bytes per element) sets vLLM's ``x = 16 // itemsize``. ``annotate`` defaults to
    True for at most 256 cells wide enough to hold their numbers.

    Returns the Axes, holding one image whose array is the offsets ``[block_size * heads,
    head_dim]``. Raises ValueError for an unknown layout, non-positive sizes, or a ``head_dim``
    that ``x`` does not divide.
    """
    from kvlab.layouts import LAYOUTS

    if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    layout = layout.lower()
    h, d, s = (positive_int(n, v) for n, v in (("num_kv_heads", num_kv_heads),
                                             ("head_dim", head_dim), ("block_size", block_size)))
    grid = _address_grid(h, d, s, layout, itemsize)  # ValueError for itemsize / x problems
    rows, cols = grid.shape
    width = min(9.8, max(4.0, 0.36 * cols + 2.2))  # 2.2 in: tick labels and the colour bar
    if annotate is None:
        annotate = rows * cols <= 256 and _labels_fit((width - 2.2) / cols, int(grid.max()))
    ax = new_axes(ax, (width, max(3.0, 0.3 * rows + 1.6)))
    image = ax.imshow(grid, cmap=cmap, aspect="auto", interpolation="nearest",
                      vmin=0, vmax=grid.max() if grid.max() > 0 else 1)
    if annotate:
        threshold = 0.55 * grid.max()
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, f"{grid[r, c]}", ha="center", va="center", fontsize=_CELL_FONT,
                        color="white" if grid[r, c] < threshold else "black")
    step = max(1, rows // 24)
    ax.set_yticks(range(0, rows, step),
                  labels=[f"t{r // h} h{r % h}" for r in range(0, rows, step)], fontsize=8)
    ax.set_xticks(range(0, cols, max(1, cols // 16)))
    ax.tick_params(labelsize=8, length=2)
    for r in range(h, rows, h):  # a line between tokens
        ax.axhline(r - 0.5, color="white", linewidth=1.2)
    if layout == "vllm_k":  # a line between 16-byte chunks of a key
        for c in range(16 // itemsize, cols, 16 // itemsize):
            ax.axvline(c - 0.5, color="white", linewidth=1.2, linestyle=":")
    ax.set_xlabel("dim")
    ax.set_ylabel("token slot, head")
    ax.set_title(_LAYOUT_TITLES[layout] + (f", x = {16 // itemsize}" if layout == "vllm_k"
                                           else ""), fontsize=9)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=f"byte offset in the block ({itemsize} B/element)",
                           shrink=0.9)
    return ax


def plot_all_layouts(
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    itemsize: int = 2,
    layouts: Sequence[str] = ("nhd", "hnd", "vllm_k", "vllm_v"),
    annotate: bool | None = None,
):
    """:func:`plot_layout_addresses` for several layouts side by side, one shared colour scale.

    Returns the Figure (one Axes per layout, plus the colorbar's). Raises ValueError as
    :func:`plot_layout_addresses`, and for an empty or repeated ``layouts``.
    """
    import matplotlib.pyplot as plt

    layouts = [layouts] if isinstance(layouts, str) else list(layouts)
    if not layouts:
        raise ValueError("layouts is empty: name at least one layout")
    if len({str(x).lower() for x in layouts}) != len(layouts):
        raise ValueError(f"layouts lists a layout more than once: {layouts}")
    rows = block_size * num_kv_heads if isinstance(block_size, int) and isinstance(
        num_kv_heads, int) else 8
    cols = head_dim if isinstance(head_dim, int) else 8
    grid_cols = 2 if len(layouts) >= 3 else len(layouts)
    grid_rows = -(-len(layouts) // grid_cols)
    # at most 9.8 in wide (JupyterLab shows ~10.5 in at 100 dpi); 1.6 in: tick labels, colour bar
    width = min(9.8, grid_cols * max(3.0, 0.34 * cols + 0.3) + 1.6)
    if annotate is None and isinstance(itemsize, int) and itemsize > 0:
        largest = rows * cols * itemsize
        annotate = rows * cols <= 256 and _labels_fit((width - 1.6) / (grid_cols * cols) - 0.01,
                                                      largest)
    fig, axes = plt.subplots(grid_rows, grid_cols, sharex=True, sharey=True, squeeze=False,
                             layout="constrained",
                             figsize=(width, grid_rows * max(2.6, 0.3 * rows + 1.2) + 0.5))
    axes = axes.ravel()
    for ax in axes[len(layouts):]:
        ax.remove()
    axes = axes[:len(layouts)]
    for i, (ax, layout) in enumerate(zip(axes, layouts)):
        plot_layout_addresses(num_kv_heads, head_dim, block_size, layout, itemsize, ax=ax,
                              annotate=annotate, colorbar=False)
        if i % grid_cols:
            ax.set_ylabel("")
        if i < len(layouts) - grid_cols:
            ax.set_xlabel("")
    fig.colorbar(axes[0].images[0], ax=list(axes), shrink=0.85,
                 label=f"byte offset in the block ({itemsize} B/element)")
    fig.suptitle(f"Where one block's elements live: {num_kv_heads} KV heads × head_dim "
                 f"{head_dim} × {block_size} token slots", fontsize=10)
    return fig


def _series(name: str, values) -> list[np.ndarray]:
    """One 1-D float array, or a list / 2-D array of them → list of 1-D float arrays."""
    if isinstance(values, np.ndarray) and values.ndim == 2:
        out = list(values)
    elif isinstance(values, np.ndarray) and values.ndim == 1:
        out = [values]
    elif isinstance(values, (list, tuple)) and values and np.ndim(values[0]) == 1:
        out = list(values)
    elif isinstance(values, (list, tuple)) and values and np.ndim(values[0]) == 0:
        out = [np.asarray(values)]
    else:
        raise ValueError(f"{name} must be a 1-D array or a list of 1-D arrays (one per policy)")
    arrays = [np.asarray(v, dtype=float) for v in out]
    for a in arrays:
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{name}: every series must be a non-empty 1-D array")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"{name} must hold finite numbers >= 0")
    return arrays


def plot_pool_occupancy(
    times,
    reserved_bytes,
    used_bytes,
    labels: Sequence[str] | None = None,
    budget_bytes: float | None = None,
    ax: Axes | None = None,
) -> Axes:
    """KV memory reserved (solid) vs holding real tokens (dashed) over time, one colour per policy.

    ``reserved_bytes`` and ``used_bytes`` are one 1-D series per policy (a list of arrays, or a
    2-D array), e.g. ``SimResult.reserved * bytes_per_token``; ``times`` is one 1-D array shared
    by all, a list with one per policy, or ``None`` (step 0, 1, …). The gap between a policy's
    two lines (shaded) is memory it reserved that held no token. ``budget_bytes`` draws the pool
    size as a grey line. The y unit (B, KiB, MiB, GiB) follows the largest value.

    Returns the Axes with two lines per policy (reserved, then used) plus one for the budget.
    Raises ValueError for mismatched lengths, negative values, used > reserved, or a bad label
    list.
    """
    reserved = _series("reserved_bytes", reserved_bytes)
    used = _series("used_bytes", used_bytes)
    if len(reserved) != len(used):
        raise ValueError(f"reserved_bytes has {len(reserved)} series but used_bytes has "
                         f"{len(used)}: one of each per policy")
    if times is None:
        xs = [np.arange(r.size) for r in reserved]
    else:
        if isinstance(times, np.ndarray) and times.ndim == 1 or (
                isinstance(times, (list, tuple)) and times and np.ndim(times[0]) == 0):
            xs = [np.asarray(times, dtype=float)] * len(reserved)
        else:
            xs = _series("times", times)
    if len(xs) != len(reserved):
        raise ValueError(f"times has {len(xs)} series but there are {len(reserved)} policies")
    for i, (x, r, u) in enumerate(zip(xs, reserved, used)):
        if not x.size == r.size == u.size:
            raise ValueError(f"policy {i}: times, reserved_bytes and used_bytes must have one "
                             f"entry per step; got lengths {x.size}, {r.size}, {u.size}")
        if np.any(u > r):
            raise ValueError(f"policy {i}: used_bytes exceeds reserved_bytes at step "
                             f"{int(np.argmax(u > r))}: memory holding tokens is reserved memory")
    if labels is None:
        labels = [f"policy {i}" for i in range(len(reserved))]
    labels = list(labels)
    if len(labels) != len(reserved):
        raise ValueError(f"labels must name each of the {len(reserved)} policies, "
                         f"got {len(labels)}")
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or
                                     not isinstance(budget_bytes, (int, float, np.number))
                                     or budget_bytes <= 0):
        raise ValueError(f"budget_bytes must be a positive number, got {budget_bytes!r}")

    from matplotlib.lines import Line2D

    largest = max(max(float(r.max()) for r in reserved), float(budget_bytes or 0), 1.0)
    scale, unit = bytes_unit(largest)
    ax = new_axes(ax, (8.0, 4.4))
    handles = []
    for i, (x, r, u, label) in enumerate(zip(xs, reserved, used, labels)):
        color = policy_color(label, i)
        ax.plot(x, r / scale, color=color, linewidth=1.4, drawstyle="steps-post")
        ax.plot(x, u / scale, color=color, linewidth=1.0, linestyle="--", drawstyle="steps-post")
        ax.fill_between(x, u / scale, r / scale, color=color, alpha=0.12, step="post",
                        linewidth=0)
        handles.append(Line2D([], [], color=color, linewidth=2.5, label=label))
    handles += [Line2D([], [], color=COLOR_REFERENCE, linewidth=1.4, label="reserved"),
                Line2D([], [], color=COLOR_REFERENCE, linewidth=1.0, linestyle="--",
                       label="holding tokens")]
    if budget_bytes is not None:
        ax.axhline(budget_bytes / scale, color=COLOR_REFERENCE, linestyle=":", linewidth=1.2,
                   zorder=5)
        handles.append(Line2D([], [], color=COLOR_REFERENCE, linestyle=":", label="KV pool"))
    ax.set_ylim(0, largest / scale * 1.05)
    ax.set_xlim(left=0)
    ax.set_xlabel("decode step")
    ax.set_ylabel(f"KV memory ({unit})")
    ax.set_title("KV memory reserved vs holding real tokens")
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13),
              ncols=min(len(handles), 5), frameon=False, fontsize=8)
    return ax


def plot_waste_summary(
    results,
    ax: Axes | None = None,
    reference: bool = True,
    xlabel: str = "share of reserved KV memory holding real tokens (%)",
) -> Axes:
    """Horizontal bars: the share of reserved KV memory that held real tokens, per policy.

    ``results`` maps policy name → a fraction in [0, 1] (e.g. ``SimResult.utilization``), or is
    a sequence of ``(name, fraction)`` pairs; bars run top to bottom in that order, each labelled
    with its percentage. ``reference`` shades what the vLLM paper reports (Kwon et al., SOSP
    2023): prior systems kept 20.4–38.2% of their KV memory in real tokens, paging wastes
    under 4% (so ≥ 96%).

    Returns the Axes with one ``BarContainer`` (one bar per policy) and, with ``reference``, two
    shaded spans. Raises ValueError for an empty or repeated list or a value outside [0, 1].
    """
    from matplotlib.patches import Patch

    items = list(results.items()) if hasattr(results, "items") else list(results)
    if not items:
        raise ValueError("results is empty: give at least one (policy, fraction)")
    try:
        names = [str(n) for n, _ in items]
        values = np.array([float(v) for _, v in items])
    except (TypeError, ValueError):
        raise ValueError("results must map policy names to fractions (numbers in [0, 1])")
    if len(set(names)) != len(names):
        raise ValueError(f"results lists a policy more than once: {names}")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
        raise ValueError(f"each result must be a fraction in [0, 1], got {values.tolist()}")
    ax = new_axes(ax, (8.0, 1.5 + 0.45 * len(items)))
    rows = np.arange(len(items))
    handles = []
    if reference:
        from kvlab.waste import VLLM_PAGED_WASTE_BELOW, VLLM_PRIOR_SYSTEMS_RANGE

        low, high = VLLM_PRIOR_SYSTEMS_RANGE
        ax.axvspan(100 * low, 100 * high, color=OKABE_ITO["vermillion"], alpha=0.12, linewidth=0)
        ax.axvspan(100 * (1 - VLLM_PAGED_WASTE_BELOW), 100, color=OKABE_ITO["bluish_green"],
                   alpha=0.15, linewidth=0)
        handles = [Patch(color=OKABE_ITO["vermillion"], alpha=0.25,
                         label=f"prior systems, vLLM paper: {100 * low:.1f}–{100 * high:.1f}%"),
                   Patch(color=OKABE_ITO["bluish_green"], alpha=0.3,
                         label=f"vLLM paper: paging wastes < {100 * VLLM_PAGED_WASTE_BELOW:.0f}%")]
    bars = ax.barh(rows, 100 * values, height=0.6,
                   color=[policy_color(n, i) for i, n in enumerate(names)],
                   edgecolor="#444444", linewidth=0.6)
    ax.bar_label(bars, labels=[f"{100 * v:.1f}%" for v in values], padding=3, fontsize=8)
    ax.set_yticks(rows, labels=names)
    ax.set_ylim(len(items) - 0.5, -0.5)
    ax.tick_params(axis="y", length=0)
    ax.set_xlim(0, 112)  # room for the value labels
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel(xlabel)
    ax.set_title("How much reserved KV memory holds real tokens")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2,
                  frameon=False, fontsize=8)
    return ax

