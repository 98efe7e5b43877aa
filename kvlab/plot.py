"""Every figure the kvlab notebooks draw lives here.

The rules every function in this module keeps, so that the course's figures look alike and can be
tested without a screen:

- A function takes *data* (model names or :class:`~kvlab.shapes.ModelShape`, dtype names, plain
  arrays of numbers), never a backend or a cache object, and computes nothing a notebook should
  see being computed.
- It draws on the Matplotlib ``Axes`` it is given (``ax=``), or on a new figure when ``ax`` is
  ``None``, and returns that ``Axes`` (or the ``Figure`` when it draws several panels).
- No global state: no ``rcParams`` or style changes, no ``plt.show()``. Colours come from the
  constants below (the Okabe-Ito palette, readable with the common forms of colour blindness),
  and a KV dtype keeps the same colour in every figure of the course.
- Bad input raises ``ValueError`` with a message that names the problem.

``import kvlab`` does not import Matplotlib; only ``import kvlab.plot`` does.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.container import BarContainer

from kvlab.dtypes import KvDtype, get_dtype
from kvlab.memory import GIB, bytes_per_token, tokens_that_fit
from kvlab.shapes import ModelShape, get_model

# Okabe & Ito (2008), "Color Universal Design": eight colours distinguishable by most readers.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}

# One colour per KV dtype, the same in every figure (later stages register fp8 and int4).
DTYPE_COLORS = {
    "fp16": OKABE_ITO["blue"],
    "int8": OKABE_ITO["orange"],
    "fp8_e4m3": OKABE_ITO["bluish_green"],
    "fp8_e5m2": OKABE_ITO["sky_blue"],
    "int4": OKABE_ITO["reddish_purple"],
}
_SPARE_COLORS = (OKABE_ITO["vermillion"], OKABE_ITO["yellow"], OKABE_ITO["black"])

# Roles that recur across figures.
COLOR_WITHOUT_CACHE = OKABE_ITO["vermillion"]
COLOR_WITH_CACHE = OKABE_ITO["bluish_green"]
COLOR_REFERENCE = "#6E6E6E"  # grey: reference lines and "does not fit" notes


def dtype_color(name: str, index: int = 0) -> str:
    """The colour of KV dtype ``name``; an unlisted dtype gets a spare colour by ``index``."""
    return DTYPE_COLORS.get(name, _SPARE_COLORS[index % len(_SPARE_COLORS)])


# --- helpers ---------------------------------------------------------------------------------

def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        if not isinstance(ax, Axes):
            raise ValueError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
        return ax
    import matplotlib.pyplot as plt  # only when a new figure is needed: the caller picks the backend

    _, new_ax = plt.subplots(figsize=figsize, layout="constrained")
    return new_ax


def _models(models: Iterable[str | ModelShape] | str | ModelShape) -> list[ModelShape]:
    """Resolve names to shapes, reject empty / duplicate lists, and sort by parameter count."""
    if isinstance(models, (str, ModelShape)):
        models = [models]
    resolved = []
    for m in models:
        if isinstance(m, ModelShape):
            resolved.append(m)
        elif isinstance(m, str):
            resolved.append(get_model(m))  # ValueError listing the known models
        else:
            raise ValueError(f"a model must be a name or a ModelShape, got {type(m).__name__}")
    if not resolved:
        raise ValueError("models is empty: name at least one model (see kvlab.list_models())")
    names = [m.name for m in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"models lists {', '.join(duplicates)} more than once")
    return sorted(resolved, key=lambda m: (m.num_params, m.name))


def _dtypes(dtypes: Iterable[str] | str) -> list[KvDtype]:
    if isinstance(dtypes, str):
        dtypes = [dtypes]
    resolved = [get_dtype(d) for d in dtypes]  # ValueError listing the known dtypes
    if not resolved:
        raise ValueError("dtypes is empty: name at least one KV dtype (see kvlab.dtypes.list_dtypes())")
    names = [d.name for d in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"dtypes lists a dtype more than once: {names}")
    return resolved


def _params(model: ModelShape) -> str:
    """Parameter count for a label: ``8.2B``, ``596M``."""
    n = model.num_params
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _model_label(model: ModelShape) -> str:
    return f"{model.name} ({_params(model)})"


def _kib(n_bytes: float) -> str:
    kib = n_bytes / 1024
    return f"{kib:,.0f} KiB" if kib == round(kib) else f"{kib:,.1f} KiB"


def _tokens(n: int) -> str:
    """A token count for a label: ``413k``, ``2.28M``."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.0f}k"
    return f"{n:d}"


def _grouped_offsets(num_groups: int) -> tuple[np.ndarray, float]:
    """Bar centre offsets within one row and the bar height, for ``num_groups`` bars per row."""
    height = 0.8 / num_groups
    return (np.arange(num_groups) - (num_groups - 1) / 2) * height, height


def _legend_below(ax: Axes, **kwargs) -> None:
    """A one-row legend under the x label, where it cannot cover a bar or a value label."""
    handles, labels = ax.get_legend_handles_labels()
    # bars (the data) first, reference lines after
    order = sorted(range(len(handles)), key=lambda i: not isinstance(handles[i], BarContainer))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
              bbox_to_anchor=(0.5, -0.1), ncols=len(handles), frameon=False, **kwargs)


def _model_rows(ax: Axes, models: Sequence[ModelShape]) -> np.ndarray:
    rows = np.arange(len(models))
    ax.set_yticks(rows, labels=[_model_label(m) for m in models])
    ax.set_ylim(len(models) - 0.5, -0.5)  # first (smallest) model on top
    ax.tick_params(axis="y", length=0)
    return rows


# --- stage 00: the tour ----------------------------------------------------------------------

def plot_bytes_per_token(
    models: Iterable[str | ModelShape],
    dtypes: Sequence[str] = ("fp16", "int8"),
    ax: Axes | None = None,
) -> Axes:
    """Grouped horizontal bars: KV cache bytes one token costs (all layers, K and V), in KiB.

    One row per model, sorted by parameter count (smallest on top), one bar per dtype, each bar
    annotated with its value. Scales are included (int8 stores one fp16 scale per token and KV
    head). Uses :func:`kvlab.memory.bytes_per_token` with ``tp=1``.

    Returns the Axes; it holds ``len(models) * len(dtypes)`` bars, one ``BarContainer`` per dtype.
    Raises ValueError for an empty model list, an unknown model or an unknown dtype.
    """
    shapes, kv_dtypes = _models(models), _dtypes(dtypes)
    ax = _new_axes(ax, (8.0, 1.6 + 0.42 * len(shapes) * max(1, len(kv_dtypes) / 2)))
    rows = _model_rows(ax, shapes)
    offsets, height = _grouped_offsets(len(kv_dtypes))
    largest = 0
    for i, (dtype, offset) in enumerate(zip(kv_dtypes, offsets)):
        values = np.array([bytes_per_token(m, dtype) for m in shapes])
        largest = max(largest, int(values.max()))
        bars = ax.barh(rows + offset, values / 1024, height=height, label=dtype.name,
                       color=dtype_color(dtype.name, i))
        ax.bar_label(bars, labels=[_kib(v) for v in values], padding=3, fontsize=8)
    ax.set_xlim(0, largest / 1024 * 1.2)  # room for the value labels
    ax.set_xlabel("KV cache per token, all layers, K + V (KiB)")
    ax.set_title("Bytes one token costs in the KV cache")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    _legend_below(ax, title="KV dtype")
    return ax


def plot_tokens_that_fit(
    models: Iterable[str | ModelShape],
    dtypes: Sequence[str] = ("fp16", "int8"),
    memory_gib: float = 80,
    utilization: float = 0.9,
    ax: Axes | None = None,
    reference_tokens: int | None = 131_072,
) -> Axes:
    """Grouped horizontal bars (log x): tokens of KV cache that fit on one card after the weights.

    ``tokens = (memory_gib GiB * utilization - weight bytes) // bytes_per_token``, as
    :func:`kvlab.memory.tokens_that_fit` computes it. A model whose weights alone exceed the budget
    gets no bars and a note "weights > memory" instead. ``reference_tokens`` draws a dashed line
    (default: one 128K-token context); ``None`` leaves it out.

    Returns the Axes; it holds one bar per (model whose weights fit, dtype), one ``BarContainer``
    per dtype. Raises ValueError for an empty model list, an unknown model or dtype, or
    non-positive memory.
    """
    shapes, kv_dtypes = _models(models), _dtypes(dtypes)
    if isinstance(memory_gib, bool) or not isinstance(memory_gib, (int, float)) or memory_gib <= 0:
        raise ValueError(f"memory_gib must be a positive number, got {memory_gib!r}")
    memory_bytes = memory_gib * GIB
    fits = {m.name: tokens_that_fit(m, "fp16", memory_bytes, utilization=utilization) > 0
            for m in shapes}  # weights fit or not: the same for every dtype
    ax = _new_axes(ax, (8.0, 1.6 + 0.42 * len(shapes) * max(1, len(kv_dtypes) / 2)))
    rows = _model_rows(ax, shapes)
    offsets, height = _grouped_offsets(len(kv_dtypes))
    drawn = [r for r, m in zip(rows, shapes) if fits[m.name]]
    counts: list[int] = []
    for i, (dtype, offset) in enumerate(zip(kv_dtypes, offsets)):
        values = [tokens_that_fit(m, dtype, memory_bytes, utilization=utilization)
                  for m in shapes if fits[m.name]]
        counts += values
        bars = ax.barh(np.array(drawn, dtype=float) + offset, values, height=height,
                       label=dtype.name, color=dtype_color(dtype.name, i))
        ax.bar_label(bars, labels=[_tokens(v) for v in values], padding=3, fontsize=8)
    ax.set_xscale("log")
    low = 10 ** np.floor(np.log10(min(counts))) if counts else 1e3
    high = max(counts) * 4 if counts else 1e7  # room for the value labels
    if reference_tokens is not None:
        high = max(high, reference_tokens * 4)
    ax.set_xlim(low, high)
    budget = memory_bytes * utilization
    for row, m in zip(rows, shapes):
        if not fits[m.name]:
            ax.text(0.01, row, f"weights > memory ({m.weight_bytes / GIB:,.0f} GiB of "
                    f"{m.weight_dtype} weights > {budget / GIB:,.0f} GiB usable)",
                    transform=ax.get_yaxis_transform(), va="center", fontsize=8,
                    color=COLOR_REFERENCE, style="italic", zorder=5,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    if reference_tokens is not None:
        ax.axvline(reference_tokens, color=COLOR_REFERENCE, linestyle="--", linewidth=1,
                   label=f"one {reference_tokens:,}-token context")
    ax.set_xlabel("tokens of KV cache that fit (log scale)")
    ax.set_title(f"Tokens that fit on one {memory_gib:g} GiB card\n"
                 f"({utilization:.0%} of memory usable, model weights taken first)")
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.set_axisbelow(True)
    _legend_below(ax, fontsize=9)
    return ax


def plot_decode_cost(
    seq_lens: Sequence[int],
    flops_without_cache: Sequence[float],
    flops_with_cache: Sequence[float],
    ax: Axes | None = None,
) -> Axes:
    """FLOPs to generate one token vs the tokens in context, with and without a KV cache (log y).

    The three sequences have one entry per decode step: ``seq_lens[i]`` tokens in context (the
    new one included), and the FLOPs that step cost each way. The ratio at the last step is
    written on the figure.

    Returns the Axes with exactly two lines (without cache, then with cache). Raises ValueError
    when the sequences are empty, differ in length, or hold non-positive values.
    """
    lens = np.asarray(seq_lens, dtype=float)
    without = np.asarray(flops_without_cache, dtype=float)
    with_ = np.asarray(flops_with_cache, dtype=float)
    for name, arr in (("seq_lens", lens), ("flops_without_cache", without),
                      ("flops_with_cache", with_)):
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"{name} must hold positive finite numbers (the y axis is log)")
    if not lens.size == without.size == with_.size:
        raise ValueError(
            f"seq_lens, flops_without_cache and flops_with_cache must have one entry per step; "
            f"got lengths {lens.size}, {without.size}, {with_.size}"
        )
    ax = _new_axes(ax, (7.0, 4.2))
    marker = "o" if lens.size <= 32 else None
    ax.plot(lens, without, color=COLOR_WITHOUT_CACHE, marker=marker, markersize=3,
            label="without a KV cache: recompute the whole prefix")
    ax.plot(lens, with_, color=COLOR_WITH_CACHE, marker=marker, markersize=3,
            label="with a KV cache: only the new token's q, k, v")
    ax.set_yscale("log")
    ratio = without[-1] / with_[-1]
    ax.annotate(f"{ratio:,.0f}× fewer FLOPs\nat {lens[-1]:,.0f} tokens",
                xy=(lens[-1], np.sqrt(without[-1] * with_[-1])), xytext=(-6, 0),
                textcoords="offset points", ha="right", va="center", fontsize=9)
    ax.vlines(lens[-1], with_[-1], without[-1], color=COLOR_REFERENCE, linewidth=1,
              linestyle=":")
    ax.set_xlabel("tokens in context when the token is generated")
    ax.set_ylabel("FLOPs per generated token (log scale)")
    ax.set_title("Cost of one decode step, with and without a KV cache")
    ax.grid(which="major", alpha=0.3)
    ax.legend(loc="upper left", frameon=False, fontsize=9)
    return ax


__all__ = [
    "COLOR_WITHOUT_CACHE", "COLOR_WITH_CACHE", "COLOR_REFERENCE", "DTYPE_COLORS", "OKABE_ITO",
    "dtype_color", "plot_bytes_per_token", "plot_decode_cost", "plot_tokens_that_fit",
]


# --- stage 01: paging ------------------------------------------------------------------------
# Figures for notebooks/01_paging: the block table, where a layout puts each element, and how
# much of the KV memory a serving policy reserves holds real tokens (kvlab.waste).

# One colour per sequence in a block-table figure (black is left out: text sits on these).
SEQ_COLORS = (OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["bluish_green"],
              OKABE_ITO["reddish_purple"], OKABE_ITO["sky_blue"], OKABE_ITO["vermillion"],
              OKABE_ITO["yellow"])
COLOR_FREE = "#DDDDDD"  # light grey: a free block

# One colour per memory policy of kvlab.waste, the same in every waste figure.
POLICY_COLORS = {
    "contiguous-max": OKABE_ITO["vermillion"],
    "contiguous-pow2": OKABE_ITO["orange"],
    "contiguous-oracle": OKABE_ITO["reddish_purple"],
    "paged-256": OKABE_ITO["sky_blue"],
    "paged-16": OKABE_ITO["bluish_green"],
    "paged-1": OKABE_ITO["blue"],
    "paged-16-shared": OKABE_ITO["black"],
}
_POLICY_SPARE = (OKABE_ITO["yellow"], COLOR_REFERENCE, OKABE_ITO["black"])

_LAYOUT_TITLES = {
    "nhd": "NHD (kvlab, FlashInfer)\n[block_size, heads, head_dim]",
    "hnd": "HND (seed engine Metal, FlashInfer)\n[heads, block_size, head_dim]",
    "vllm_k": "vLLM key cache\n[heads, head_dim/x, block_size, x]",
    "vllm_v": "vLLM value cache\n[heads, head_dim, block_size]",
}


def seq_color(index: int) -> str:
    """The colour of sequence ``index`` in a block-table figure (cycles after seven)."""
    return SEQ_COLORS[index % len(SEQ_COLORS)]


def policy_color(name: str, index: int = 0) -> str:
    """The colour of a :mod:`kvlab.waste` policy; an unlisted one gets a spare by ``index``."""
    return POLICY_COLORS.get(name, _POLICY_SPARE[index % len(_POLICY_SPARE)])


def _bytes_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((GIB, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if largest >= scale:
            return scale, unit
    return 1, "B"


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


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
    ``int [num_seqs]`` as in DESIGN §4; sequence ``s`` uses its first
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

    num_blocks = _positive("num_blocks", num_blocks)
    block_size = _positive("block_size", block_size)
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
    ncols = _positive("ncols", ncols)
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
    ax = _new_axes(ax, (0.8 * (x0 + ncols * pw) + 1.2, 0.8 * top + 1.7))

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
            ax.text(x + pw - 0.1, y - ph / 2, note, ha="right", va="center", fontsize=7.5,
                    zorder=3, color="#333333" if who else "#777777",
                    bbox=plate if who else None)
        else:
            ax.text(x + pw / 2, y - 0.3 * ph, f"#{b}", ha="center", va="center", fontsize=8,
                    fontweight="bold", zorder=3)
            ax.text(x + pw / 2, y - 0.68 * ph, note.replace(" ", "\n"), ha="center",
                    va="center", fontsize=6.5, zorder=3, color="#333333" if who else "#777777",
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
                    fontsize=7.5, zorder=3,
                    color="white" if s % len(SEQ_COLORS) in dark_text else "black")
            if arrows:  # drawn under the cells: it shows between the table and the pool
                px, py = physical_xy(b)
                ax.add_patch(FancyArrowPatch((j * lw + lw / 2, y - lh / 2),
                                             (px + gap / 2, py - ph / 2),
                                             arrowstyle="-|>", mutation_scale=9, shrinkA=0,
                                             shrinkB=0.5, color=seq_color(s), alpha=0.8,
                                             linewidth=1.0, zorder=1, gid="mapping-arrow"))
        if used == 0:
            ax.text(0.05, y - lh / 2, "(no tokens)", ha="left", va="center", fontsize=7.5,
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
    True for at most 256 cells.

    Returns the Axes, holding one image whose array is the offsets ``[block_size * heads,
    head_dim]``. Raises ValueError for an unknown layout, non-positive sizes, or a ``head_dim``
    that ``x`` does not divide.
    """
    from kvlab.layouts import LAYOUTS

    if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    layout = layout.lower()
    h, d, s = (_positive(n, v) for n, v in (("num_kv_heads", num_kv_heads),
                                             ("head_dim", head_dim), ("block_size", block_size)))
    grid = _address_grid(h, d, s, layout, itemsize)  # ValueError for itemsize / x problems
    rows, cols = grid.shape
    annotate = rows * cols <= 256 if annotate is None else bool(annotate)
    ax = _new_axes(ax, (max(4.0, 0.36 * cols + 2.2), max(3.0, 0.3 * rows + 1.6)))
    image = ax.imshow(grid, cmap=cmap, aspect="auto", interpolation="nearest",
                      vmin=0, vmax=grid.max() if grid.max() > 0 else 1)
    if annotate:
        threshold = 0.55 * grid.max()
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, f"{grid[r, c]}", ha="center", va="center", fontsize=6,
                        color="white" if grid[r, c] < threshold else "black")
    step = max(1, rows // 24)
    ax.set_yticks(range(0, rows, step),
                  labels=[f"t{r // h} h{r % h}" for r in range(0, rows, step)], fontsize=7)
    ax.set_xticks(range(0, cols, max(1, cols // 16)))
    ax.tick_params(labelsize=7, length=2)
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
    fig, axes = plt.subplots(grid_rows, grid_cols, sharex=True, sharey=True, squeeze=False,
                             layout="constrained",
                             figsize=(grid_cols * max(3.0, 0.34 * cols + 0.9) + 1.0,
                                      grid_rows * max(2.6, 0.3 * rows + 1.2) + 0.5))
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
    scale, unit = _bytes_unit(largest)
    ax = _new_axes(ax, (8.0, 4.4))
    handles = []
    for i, (x, r, u, label) in enumerate(zip(xs, reserved, used, labels)):
        color = policy_color(label, i)
        ax.plot(x, r / scale, color=color, linewidth=1.4, drawstyle="steps-post")
        ax.plot(x, u / scale, color=color, linewidth=1.0, linestyle="--", drawstyle="steps-post")
        ax.fill_between(x, u / scale, r / scale, color=color, alpha=0.12, step="post",
                        linewidth=0)
        handles.append(Line2D([], [], color=color, linewidth=2.5, label=label))
    handles += [Line2D([], [], color="black", linewidth=1.4, label="reserved"),
                Line2D([], [], color="black", linewidth=1.0, linestyle="--",
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
    ax = _new_axes(ax, (8.0, 1.5 + 0.45 * len(items)))
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


__all__ += [
    "COLOR_FREE", "POLICY_COLORS", "SEQ_COLORS", "plot_all_layouts", "plot_block_table",
    "plot_layout_addresses", "plot_pool_occupancy", "plot_waste_summary", "policy_color",
    "seq_color",
]
