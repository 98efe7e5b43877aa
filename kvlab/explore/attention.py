"""Notebook 05's explorers: the online softmax tile by tile, and split-K's partitions and merge.

- :func:`online_softmax_steps` (logic) and :func:`online_softmax_explorer`: one query's scores
  and values, a tile size and a step -> the running max, sum and output after each tile of keys,
  against the final softmax. The update is the one the notebook's exercise asks for
  (:func:`kvlab.exercises.attention.online_update_solution`).
- :func:`split_k_state` (logic) and :func:`split_k_explorer`: a number of partitions -> each
  partition's own softmax, its log-sum-exp, its merge weight, and the merged output (equal to
  one pass over all keys).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvlab.explore import Explorer
from kvlab.ref.attention import merge_partials, split_bounds


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max())
    return e / e.sum()


def _check_scores(scores: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float32)
    values = np.asarray(values, np.float32)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"scores must be a non-empty 1-D array [n], got shape {scores.shape}")
    if values.ndim != 2 or len(values) != len(scores):
        raise ValueError(f"values must be [n, D] with n = {len(scores)}, got shape {values.shape}")
    return scores, values


# --- the online softmax, tile by tile ---------------------------------------------------------

def online_softmax_steps(scores: np.ndarray, values: np.ndarray, tile: int) -> list[dict[str, Any]]:
    """The state after each tile of ``tile`` keys. scores: float32 ``[n]`` (already scaled),
    values: float32 ``[n, D]``. Each entry: ``start``, ``stop`` (the tile's keys), ``m`` (max so
    far), ``l`` (sum of exp(s - m) so far), ``out`` (``acc / l``: the softmax output over the keys
    seen so far, float32 ``[D]``) and ``weights`` (float32 ``[stop]``: each seen key's weight now)."""
    from kvlab.exercises.attention import online_update_solution

    scores, values = _check_scores(scores, values)
    if not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile must be an int >= 1, got {tile!r}")
    m, l, acc = -np.inf, 0.0, np.zeros(values.shape[1], np.float32)
    steps = []
    for start in range(0, len(scores), tile):
        stop = min(start + tile, len(scores))
        m, l, acc = online_update_solution(m, l, acc, scores[start:stop], values[start:stop])
        steps.append({"start": start, "stop": stop, "m": float(m), "l": float(l),
                      "out": (acc / l).astype(np.float32),
                      "weights": (np.exp(scores[:stop] - m) / l).astype(np.float32)})
    return steps


def draw_online(step: int, tile: int, scores: np.ndarray, values: np.ndarray):
    """Three panels after tile ``step`` (1-based): the scores with the running max, each key's
    weight now against its final weight, the output so far against the final output."""
    import matplotlib.pyplot as plt

    from kvlab.plot.style import COLOR_REFERENCE, OKABE_ITO

    steps = online_softmax_steps(scores, values, tile)
    step = min(max(int(step), 1), len(steps))
    state = steps[step - 1]
    final = steps[-1]
    n = len(scores)
    keys = np.arange(n)
    fig, (ax_s, ax_w, ax_o) = plt.subplots(1, 3, figsize=(10, 3.2), layout="constrained",
                                           width_ratios=(1.2, 1.2, 1))
    seen = keys < state["start"]
    now = (keys >= state["start"]) & (keys < state["stop"])
    colours = np.where(seen, OKABE_ITO["blue"], np.where(now, OKABE_ITO["orange"], "#DDDDDD"))
    ax_s.bar(keys, scores, color=colours)
    ax_s.axhline(state["m"], color=OKABE_ITO["vermillion"], ls="--", lw=1.2)
    ax_s.text(n - 0.5, state["m"], f"m = {state['m']:.2f}", ha="right", va="bottom", fontsize=8,
              color=OKABE_ITO["vermillion"])
    ax_s.margins(y=0.12)
    ax_s.set_title("scores: earlier tiles (blue), this tile (orange)", fontsize=9)
    ax_s.set_xlabel("key")
    ax_w.bar(keys[:state["stop"]], state["weights"], color=OKABE_ITO["blue"], label="now")
    ax_w.step(keys, final["weights"], where="mid", color="black", lw=1, label="final")
    ax_w.set_title(f"weights exp(s - m) / l, l = {state['l']:.3f}", fontsize=9)
    ax_w.set_xlabel("key")
    ax_w.legend(fontsize=8, frameon=False, loc="upper right")
    dims = np.arange(len(state["out"]))
    ax_o.bar(dims, state["out"], color=OKABE_ITO["blue"], label="so far")
    ax_o.plot(dims, final["out"], "o", color="black", ms=5, label="final")
    ax_o.axhline(0, color=COLOR_REFERENCE, lw=0.6)
    ax_o.set_title("output acc / l", fontsize=9)
    ax_o.set_xlabel("dim")
    ax_o.legend(fontsize=8, frameon=False, loc="best")
    fig.suptitle(f"after tile {step} of {len(steps)} (keys {state['start']}–{state['stop'] - 1})",
                 fontsize=10)
    return fig


def online_softmax_explorer(scores: np.ndarray, values: np.ndarray) -> Explorer:
    """A tile-size choice and a step slider over ``online_softmax_steps(scores, values, tile)``."""
    import ipywidgets as widgets

    scores, values = _check_scores(scores, values)
    tile = widgets.Dropdown(options=[2, 4, 8], value=4, description="tile")
    step = widgets.IntSlider(value=2, min=1, max=-(-len(scores) // 4), description="tile no.",
                             continuous_update=False)

    def fit_step(change):  # a smaller tile means more steps
        step.max = -(-len(scores) // change["new"])

    tile.observe(fit_step, names="value")
    return Explorer(lambda step, tile: draw_online(step, tile, scores, values),
                    {"step": step, "tile": tile},
                    "Step through the keys: when does the max move, and what happens to the "
                    "weights already given out?")


# --- split-K -----------------------------------------------------------------------------------

def split_k_state(scores: np.ndarray, values: np.ndarray, num_splits: int) -> dict[str, Any]:
    """The ``num_splits`` partitions of ``kvlab.ref.attention.split_bounds``, each attended on its
    own, then merged. Returns ``bounds``, ``lse`` (float32 ``[S]``, -inf for an empty partition),
    ``local`` (each partition's own softmax weights), ``outputs`` (float32 ``[S, D]``),
    ``merge_weights`` (``exp(lse_j - LSE)``, summing to 1), ``merged`` (float32 ``[D]``) and
    ``one_pass`` (the softmax over all keys at once, float32 ``[D]``)."""
    scores, values = _check_scores(scores, values)
    if not isinstance(num_splits, (int, np.integer)) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    bounds = split_bounds(len(scores), num_splits)
    lse, local, outputs = [], [], []
    for start, stop in bounds:
        if stop == start:                        # an empty partition: weighs nothing
            lse.append(-np.inf)
            local.append(np.zeros(0, np.float32))
            outputs.append(np.zeros(values.shape[1], np.float32))
            continue
        s = scores[start:stop]
        m = s.max()
        lse.append(m + np.log(np.exp(s - m).sum()))
        local.append(_softmax(s))
        outputs.append(local[-1] @ values[start:stop])
    lse = np.array(lse, np.float32)
    outputs = np.array(outputs, np.float32)
    weights = np.exp(lse - lse.max())
    return {"bounds": bounds, "lse": lse, "local": local, "outputs": outputs,
            "merge_weights": weights / weights.sum(), "merged": merge_partials(lse, outputs),
            "one_pass": (_softmax(scores) @ values).astype(np.float32)}


def draw_split_k(num_splits: int, scores: np.ndarray, values: np.ndarray):
    """:func:`kvlab.plot.plot_split_k` for ``num_splits``, titled with how far the merge is from
    one pass. Returns the Figure."""
    from kvlab.plot import plot_split_k

    state = split_k_state(scores, values, num_splits)
    fig = plot_split_k(state["bounds"], state["local"], state["merge_weights"])
    gap = float(np.abs(state["merged"] - state["one_pass"]).max())
    empty = sum(stop == start for start, stop in state["bounds"])
    fig.suptitle(f"{num_splits} partitions ({empty} empty): merged output - one pass = "
                 f"{gap:.1e} at most", fontsize=10)
    fig.tight_layout()
    return fig


def split_k_explorer(scores: np.ndarray, values: np.ndarray) -> Explorer:
    """A ``num_splits`` slider over :func:`split_k_state`."""
    import ipywidgets as widgets

    scores, values = _check_scores(scores, values)
    splits = widgets.IntSlider(value=4, min=1, max=12, description="num_splits",
                               continuous_update=False)
    return Explorer(lambda num_splits: draw_split_k(num_splits, scores, values),
                    {"num_splits": splits},
                    "Cut the keys into partitions: how do the merge weights follow each "
                    "partition's scores, and when is a partition empty?")
