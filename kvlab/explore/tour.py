"""Notebook 00's explorer: what one GPU holds for a model, a KV dtype, a card and a TP degree.

:func:`card_plan` is the logic (the planner behind ``python -m kvlab plan``,
:func:`kvlab.memory.plan`, for one setting, plus how the card's memory divides up);
:func:`draw_card_plan` draws it; :func:`card_explorer` puts four controls on it: model, KV dtype,
card memory, tensor-parallel degree.
"""
from __future__ import annotations

from dataclasses import dataclass

import ipywidgets as widgets

from kvlab.dtypes import list_dtypes
from kvlab.explore import Explorer
from kvlab.memory import GIB, plan
from kvlab.shapes import get_model, list_models

# Memory per card (GiB): 16 to 48 (consumer and workstation cards), 80 (A100 / H100),
# 96 (H100 NVL), 141 (H200), 192 (B200).
CARD_MEMORY_GIB = (16, 24, 40, 48, 80, 96, 141, 192)
TP_DEGREES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class CardPlan:
    """One setting of the planner, per rank (one GPU of a tensor-parallel group).

    ``tokens_that_fit`` is 0 when the weights do not fit. ``weights_gib`` is the weights' share
    of one card (``weight bytes / tp``). When they fit, ``weights_gib + kv_gib + spare_gib ==
    memory_gib``, where ``spare_gib`` is the ``1 - utilization`` share the engine leaves alone
    plus less than one token's bytes of rounding; ``overflow_gib`` is how far the weights exceed
    the budget (0 when they fit). Activations are not modelled: an engine takes them out of the
    budget too, so ``kv_gib`` is an upper bound.
    """

    model: str
    dtype: str
    memory_gib: float
    tp: int
    utilization: float
    kv_heads_per_rank: int
    kv_replication: int
    bytes_per_token: int
    tokens_that_fit: int
    weights_gib: float
    kv_gib: float
    spare_gib: float
    overflow_gib: float


def card_plan(model: str, dtype: str, memory_gib: float, tp: int = 1,
              utilization: float = 0.9) -> CardPlan:
    """The planner's numbers for one model × KV dtype on ``tp`` cards of ``memory_gib`` GiB each.

    Bytes per token and tokens that fit come from :func:`kvlab.memory.plan`; the KV part of the
    card is what those tokens occupy (``tokens × bytes per token``), the rest of the budget
    ``memory × utilization - weights / tp`` is less than one token. Raises the planner's
    ValueError for an unknown model or dtype, or a ``tp`` that cannot split the KV heads (every
    degree in :data:`TP_DEGREES` splits those of every model in ``data/models.json``).
    """
    (row,) = plan(model, [dtype], memory_gib * GIB, tp=tp, utilization=utilization)
    weights = row.weight_bytes_per_rank / GIB
    budget = memory_gib * utilization
    kv = row.tokens_that_fit * row.bytes_per_token / GIB
    return CardPlan(
        model, dtype, memory_gib, tp, utilization,
        kv_heads_per_rank=row.kv_heads_per_rank, kv_replication=row.kv_replication,
        bytes_per_token=row.bytes_per_token, tokens_that_fit=row.tokens_that_fit,
        weights_gib=weights, kv_gib=kv, spare_gib=max(0.0, memory_gib - weights - kv),
        overflow_gib=max(0.0, weights - budget))


def draw_card_plan(model: str, dtype: str, memory_gib: float, tp: int, utilization: float = 0.9):
    """Left: one card's memory as a bar (weights, KV cache, the part the engine leaves alone).
    Right: tokens that fit per KV dtype at this setting, the chosen one outlined."""
    import matplotlib.pyplot as plt

    from kvlab.plot.style import COLOR_FREE, COLOR_REFERENCE, OKABE_ITO, dtype_color

    state = card_plan(model, dtype, memory_gib, tp, utilization)
    # Fixed margins, not a layout engine: constrained layout would triple the redraw time.
    fig, (card, fits) = plt.subplots(1, 2, figsize=(9.5, 3.4),
                                     gridspec_kw={"width_ratios": [1.5, 1]})
    fig.subplots_adjust(left=0.03, right=0.97, top=0.8, bottom=0.3, wspace=0.25)
    parts = [("weights", min(state.weights_gib, memory_gib), COLOR_REFERENCE),
             (f"KV cache ({dtype})", state.kv_gib, dtype_color(dtype)),
             (f"left alone ({1 - utilization:.0%}) + rounding", state.spare_gib, COLOR_FREE)]
    left = 0.0
    for label, gib, colour in parts:
        card.barh(0, gib, left=left, color=colour, edgecolor="white", height=0.5, label=label)
        if gib > 0.12 * memory_gib:
            card.text(left + gib / 2, 0, f"{gib:.1f} GiB", ha="center", va="center", fontsize=9,
                      color="white" if colour != COLOR_FREE else "black")
        left += gib
    card.axvline(memory_gib * utilization, color="black", linestyle="--", linewidth=1)
    card.text(memory_gib * utilization, 0.3, f"{utilization:.0%} budget", ha="center",
              va="bottom", fontsize=8)
    if state.overflow_gib:
        card.text(memory_gib / 2, -0.42, f"{state.weights_gib:.1f} GiB of weights: "
                  f"{state.overflow_gib:.1f} GiB over the budget (raise TP)", ha="center",
                  fontsize=9,
                  color=OKABE_ITO["vermillion"])
    card.set_xlim(0, memory_gib)
    card.set_ylim(-0.6, 0.6)
    card.set_yticks([])
    card.set_xlabel("GiB on one card")
    card.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncols=3, frameon=False,
                fontsize=8)
    heads = f"{state.kv_heads_per_rank} KV head{'s' if state.kv_heads_per_rank > 1 else ''}"
    copies = f", every head stored {state.kv_replication}×" if state.kv_replication > 1 else ""
    card.set_title((f"1 card: {heads}" if tp == 1 else f"each of {tp} cards: {heads}{copies}"),
                   fontsize=10)

    names = list_dtypes()
    counts = [card_plan(model, name, memory_gib, tp, utilization).tokens_that_fit
              for name in names]
    bars = fits.barh(range(len(names)), counts, color=[dtype_color(n, i)
                                                       for i, n in enumerate(names)])
    bars[names.index(dtype)].set_edgecolor("black")
    bars[names.index(dtype)].set_linewidth(2)
    for i, count in enumerate(counts):
        fits.text(count, i, f" {count:,}", va="center", fontsize=8)
    fits.set_yticks(range(len(names)), labels=names, fontsize=9)
    fits.invert_yaxis()
    fits.set_xlim(0, max(max(counts), 1) * 1.45)
    fits.set_xticks([])  # the bars carry their numbers
    fits.set_xlabel("tokens of KV cache that fit")
    fits.set_title("every KV dtype at this setting", fontsize=10)
    fig.suptitle(f"{model} · {dtype}: {state.bytes_per_token:,} B per token per card → "
                 f"{state.tokens_that_fit:,} tokens fit", fontsize=11)
    return fig


def card_explorer(model: str = "qwen3-8b", dtype: str = "fp16", memory_gib: float = 80,
                  tp: int = 1) -> Explorer:
    """Model, KV dtype, card memory and TP degree → bytes per token and tokens that fit."""
    models = sorted(list_models(), key=lambda name: get_model(name).num_params)
    controls = {
        "model": widgets.Dropdown(options=models, value=model, description="model"),
        "dtype": widgets.ToggleButtons(options=list_dtypes(), value=dtype, description="KV dtype"),
        "memory_gib": widgets.Dropdown(options=CARD_MEMORY_GIB, value=memory_gib,
                                       description="GiB/card"),
        "tp": widgets.ToggleButtons(options=TP_DEGREES, value=tp, description="TP"),
    }
    return Explorer(draw_card_plan, controls,
                    "Pick a model, a KV dtype, a card and a TP degree: where do the card's "
                    "bytes go?")
