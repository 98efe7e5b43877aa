"""Figures of notebooks/00_tour: what a KV cache saves (FLOPs) and what it costs (bytes, tokens
that fit) for real models."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from matplotlib.axes import Axes

from kvlab.dtypes import KvDtype, get_dtype
from kvlab.memory import GIB, bytes_per_token, tokens_that_fit
from kvlab.plot.style import (
    COLOR_REFERENCE, COLOR_WITH_CACHE, COLOR_WITHOUT_CACHE, dtype_color, legend_below,
    new_axes,
)
from kvlab.shapes import ModelShape, get_model


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
    ax = new_axes(ax, (8.0, 1.6 + 0.42 * len(shapes) * max(1, len(kv_dtypes) / 2)))
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
    legend_below(ax, title="KV dtype")
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
    ax = new_axes(ax, (8.0, 1.6 + 0.42 * len(shapes) * max(1, len(kv_dtypes) / 2)))
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
    legend_below(ax, fontsize=9)
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
    ax = new_axes(ax, (7.0, 4.2))
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
