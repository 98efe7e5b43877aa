"""The explorer of notebook 02: outlier size × scale granularity × KV dtype → error and bytes.

Move the outlier channels' gain, where the scale sits, and the dtype, and see the whole
distribution of the keys' reconstruction error move (on a fixed log axis, so settings compare),
beside what the setting costs in bytes per (token, KV head) vector, scales included, and the
attention error ferrum's INT8 bars judge. :func:`quant_state` computes one setting (tested without
a browser); :func:`draw_quant` draws it; :func:`quant_explorer` is what the notebook calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvlab.dtypes import get_dtype
from kvlab.quant_lab import attention, attention_error, fake_quant, relative_error, synthetic_kv

KV_DTYPES = ("int8", "fp8_e4m3", "int4")
GRANULARITIES = ("tensor", "head", "token", "group", "channel")
NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM = 256, 2, 128  # small enough to redraw in a fraction of a second
ERROR_BINS = np.logspace(-6, 2, 65)  # |K' - K| from 1e-6 to 100, the same for every setting
# ferrum's accuracy bars for its INT8 cache (kvlab.quant_lab.attention_error)
COSINE_BAR, MAX_DIFF_BAR = 0.999, 0.02


@dataclass(frozen=True)
class QuantState:
    """What one setting of the explorer shows.

    key_errors: float32 ``[T, Hkv, D]``, |K' - K| for every element of the keys.
    k_rel_error, v_rel_error: ``||x' - x|| / ||x||`` of K and V (both quantized the same way).
    cosine, rel_max_diff: the attention output's error against float32 (ferrum's two measures).
    code_bytes, scale_bytes: bytes per (token, KV head) vector of ``HEAD_DIM`` elements: the
        codes, and the fp16 scales' share (a scale shared by many vectors is counted in part).
    """

    key_errors: np.ndarray
    k_rel_error: float
    v_rel_error: float
    cosine: float
    rel_max_diff: float
    code_bytes: float
    scale_bytes: float

    @property
    def passes(self) -> bool:
        """Whether the attention output meets ferrum's INT8 bars (cosine and max diff)."""
        return self.cosine > COSINE_BAR and self.rel_max_diff < MAX_DIFF_BAR


def scales_per_vector(granularity: str, num_tokens: int = NUM_TOKENS,
                      num_kv_heads: int = NUM_KV_HEADS, head_dim: int = HEAD_DIM) -> float:
    """How many fp16 scales one (token, KV head) vector carries, on average, at ``granularity``:
    a scale per tensor is shared by every vector, per head by the head's tokens, per token is
    one, per group of 32 elements ``head_dim / 32``, per channel ``head_dim`` shared by the
    tokens."""
    shares = {"tensor": 1 / (num_tokens * num_kv_heads), "head": 1 / num_tokens, "token": 1.0,
              "group": head_dim / 32, "channel": head_dim / num_tokens}
    if granularity not in shares:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return shares[granularity]


def _check(kv_dtype: str, outlier_gain: float) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    if not outlier_gain >= 1:
        raise ValueError(f"outlier_gain must be >= 1 (1: no outliers), got {outlier_gain!r}")


def quant_state(outlier_gain: float, granularity: str, kv_dtype: str,
                seed: int = 0) -> QuantState:
    """Quantize synthetic K and V (``NUM_TOKENS`` tokens, outlier channels of gain
    ``outlier_gain``) with one scale per ``granularity`` cell in ``kv_dtype``; measure the
    damage."""
    _check(kv_dtype, outlier_gain)
    per_vector = scales_per_vector(granularity)
    k, v = synthetic_kv(NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM, outlier_gain=float(outlier_gain),
                        seed=seed)
    q = np.random.default_rng(seed + 1).standard_normal((4, 4 * NUM_KV_HEADS, HEAD_DIM)
                                                       ).astype(np.float32)
    k_hat, v_hat = fake_quant(k, kv_dtype, granularity), fake_quant(v, kv_dtype, granularity)
    measures = attention_error(attention(q, k, v), attention(q, k_hat, v_hat))
    return QuantState(key_errors=np.abs(k_hat - k), k_rel_error=relative_error(k, k_hat),
                      v_rel_error=relative_error(v, v_hat), cosine=measures["cosine"],
                      rel_max_diff=measures["rel_max_diff"],
                      code_bytes=HEAD_DIM * get_dtype(kv_dtype).bytes_per_elem,
                      scale_bytes=2 * per_vector)


def draw_quant(outlier_gain: float = 15, granularity: str = "token", kv_dtype: str = "int8"):
    """The figure of one setting: the histogram of |K' - K| (left), the bytes (right)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullLocator

    from kvlab.plot.style import COLOR_REFERENCE, OKABE_ITO, dtype_color

    state = quant_state(outlier_gain, granularity, kv_dtype)
    cache_rule = quant_state(outlier_gain, "token", "int8")  # what kvlab's INT8 cache stores
    # Fixed margins instead of a layout engine, and no minor ticks: a redraw stays quick.
    fig, (hist, cost) = plt.subplots(1, 2, figsize=(9.5, 3.4), width_ratios=(2.2, 1),
                                     gridspec_kw=dict(left=0.08, right=0.98, bottom=0.15,
                                                      top=0.84, wspace=0.3))
    # Counts drawn as one outline each (stairs): far fewer artists than a bar per bin.
    shown = ((state, dict(fill=True, color=dtype_color(kv_dtype), alpha=0.85,
                          label=f"{kv_dtype} per {granularity}")),
             (cache_rule, dict(color=COLOR_REFERENCE, lw=1.2,
                               label="the cache's rule: int8 per token")))
    for setting, style in shown:
        errors = np.maximum(setting.key_errors, ERROR_BINS[0])  # exact zeros go in the first bin
        counts, _ = np.histogram(errors, bins=ERROR_BINS)
        hist.stairs(np.maximum(counts, 0.5), ERROR_BINS, baseline=0.5, **style)
    verdict = "meets" if state.passes else "misses"
    hist.set(xscale="log", yscale="log", xlabel="|K' − K| per element", ylabel="elements",
             title=f"keys, {kv_dtype} per {granularity}, outlier gain {outlier_gain:g}: K rel err "
                   f"{state.k_rel_error:.4f}\nattention: cosine {state.cosine:.5f}, max diff "
                   f"{state.rel_max_diff:.4f}: {verdict} ferrum's INT8 bars",
             ylim=(0.8, 300 * state.key_errors.size))  # room above the bars for the legend
    hist.title.set_fontsize(10)
    hist.xaxis.set_major_locator(LogLocator(base=100))
    hist.yaxis.set_major_locator(LogLocator(base=100))
    for axis in (hist.xaxis, hist.yaxis):
        axis.set_minor_locator(NullLocator())
    hist.legend(loc="upper left", frameon=False, fontsize=9, ncols=2)
    bars = cost.bar(["codes", "scales"], [state.code_bytes, state.scale_bytes],
                    color=[dtype_color(kv_dtype), OKABE_ITO["sky_blue"]])
    cost.bar_label(bars, fmt="%.3g B", fontsize=9)
    cost.axhline(2 * HEAD_DIM, color=COLOR_REFERENCE, ls="--", lw=1)
    cost.text(1.45, 2 * HEAD_DIM, "fp16", va="bottom", ha="right", color=COLOR_REFERENCE,
              fontsize=9)
    cost.set(ylim=(0, 2.25 * HEAD_DIM), ylabel=f"bytes per vector of {HEAD_DIM}",
             title=f"{state.code_bytes + state.scale_bytes:.4g} B per vector\n(scales included)")
    cost.title.set_fontsize(10)
    return fig


def quant_explorer():
    """The notebook's explorer: outlier gain slider, granularity and dtype buttons."""
    import ipywidgets as widgets

    from kvlab.explore import Explorer

    controls = {
        "outlier_gain": widgets.IntSlider(value=15, min=1, max=40, step=1,
                                          description="outlier gain", continuous_update=False),
        "granularity": widgets.ToggleButtons(options=GRANULARITIES, value="token",
                                             description="scale per"),
        "kv_dtype": widgets.ToggleButtons(options=KV_DTYPES, value="int8", description="dtype"),
    }
    return Explorer(draw_quant, controls,
                    title="Make the outliers larger, then move the scale from per token to per "
                          "channel; try int4 and fp8")
