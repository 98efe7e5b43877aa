"""The explorers of notebook 03: the pairs of a head turning with position, and what each scaling
kind does to their speeds.

- :func:`rotation_explorer`: a position slider and the style. Every pair of a small head is drawn
  as a clock hand; moving the position turns each hand by ``position * inv_freq[i]``, fast pairs
  spinning, slow ones barely moving. The style only changes which two dims form a pair.
- :func:`scaling_explorer`: a scaling kind and a factor. The wavelength of every pair of
  Llama 3.1's head, as trained and as scaled, against the trained context.

The logic is :func:`rotation_state` and :func:`scaling_state` (tested without a browser; both
computed by :mod:`kvlab.ref.rope` itself), the drawing :func:`draw_rotation` and
:func:`draw_scaling`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvlab.ref import rope as ref

ROTATION_DIM, ROTATION_THETA = 16, 10000.0  # a small head: 8 pairs, each one clock face
MAX_POSITION = 4096
# Llama 3.1 8B's RoPE: rotary_dim 128, base 500,000, trained (before scaling) on 8,192 positions.
LLAMA_DIM, LLAMA_THETA, LLAMA_CONTEXT = 128, 500000.0, 8192
SCALING_CHOICES = ("linear", "dynamic", "yarn", "llama3")
FACTORS = (1, 2, 4, 8, 16, 32)


# --- a position slider turning the pairs ----------------------------------------------------------

@dataclass(frozen=True)
class RotationState:
    """One position of the rotation explorer; arrays are ``[rotary_dim // 2]``, one per pair.

    first, second: the two dims of each pair (the style decides them).
    inv_freq: radians per position; wavelength: positions per full turn, ``2 pi / inv_freq``.
    turns: how many full turns the pair has made by ``position`` (``position / wavelength``).
    xy: ``[pairs, 2]``, the pair's (first, second) coordinates after RoPE of a unit vector whose
        every pair starts at (1, 0): the clock hand, computed by ``kvlab.ref.rope.apply_rope``.
    """

    position: int
    style: str
    first: np.ndarray
    second: np.ndarray
    inv_freq: np.ndarray
    wavelength: np.ndarray
    turns: np.ndarray
    xy: np.ndarray


def rotation_state(position: int, style: str = "neox", rotary_dim: int = ROTATION_DIM,
                   theta: float = ROTATION_THETA) -> RotationState:
    """Where every pair of a ``rotary_dim`` head points at ``position`` (:class:`RotationState`)."""
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or position < 0:
        raise ValueError(f"position must be an int >= 0, got {position!r}")
    first, second = ref.pair_dims(rotary_dim, style)
    inv_freq, _ = ref.rope_frequencies(rotary_dim, theta)
    cos, sin = ref.rope_tables(int(position) + 1, rotary_dim, theta)
    x = np.zeros((1, 1, rotary_dim), np.float32)
    x[..., first] = 1.0                              # every pair starts at (1, 0)
    out = ref.apply_rope(x, cos, sin, np.array([position], np.int32), style)[0, 0]
    wavelength = 2 * np.pi / inv_freq
    return RotationState(position=int(position), style=style, first=first, second=second,
                         inv_freq=inv_freq, wavelength=wavelength, turns=position / wavelength,
                         xy=np.stack([out[first], out[second]], axis=-1).astype(np.float64))


def draw_rotation(position: int = 3, style: str = "neox"):
    """One clock face per pair: the hand at ``position``, the dims it pairs, its wavelength."""
    import matplotlib.pyplot as plt

    from kvlab.plot.style import COLOR_FREE, OKABE_ITO

    state = rotation_state(position, style)
    pairs = len(state.first)
    fig, faces = plt.subplots(1, pairs, figsize=(9.5, 2.6),
                              gridspec_kw=dict(left=0.01, right=0.99, bottom=0.01, top=0.6,
                                               wspace=0.15))
    circle = np.linspace(0, 2 * np.pi, 90)
    for i, ax in enumerate(faces):
        ax.plot(np.cos(circle), np.sin(circle), color=COLOR_FREE, lw=1)
        ax.plot([0, 1], [0, 0], color=COLOR_FREE, lw=1)  # where every hand starts (position 0)
        a, b = state.xy[i]
        ax.annotate("", xy=(a, b), xytext=(0, 0),
                    arrowprops=dict(arrowstyle="-|>", color=OKABE_ITO["vermillion"], lw=2))
        ax.set(xlim=(-1.15, 1.15), ylim=(-1.15, 1.15), aspect="equal")
        ax.set_axis_off()
        wavelength = state.wavelength[i]
        length = f"{wavelength:.1f}" if wavelength < 100 else f"{wavelength:,.0f}"
        ax.set_title(f"pair {i}\ndims {state.first[i]}, {state.second[i]}\nλ = {length}\n"
                     f"{state.turns[i]:.3g} turns", fontsize=8.5)
    fig.suptitle(f"position {state.position}: pair i has turned position × inv_freq[i] radians "
                 f"({style}, rotary_dim {pairs * 2}, base {ROTATION_THETA:,.0f})", fontsize=10)
    return fig


def rotation_explorer():
    """The notebook's explorer: a position slider and the style."""
    import ipywidgets as widgets

    from kvlab.explore import Explorer

    controls = {
        "position": widgets.IntSlider(value=3, min=0, max=MAX_POSITION, step=1,
                                      description="position", continuous_update=False),
        "style": widgets.ToggleButtons(options=("neox", "gptj"), value="neox",
                                       description="style"),
    }
    return Explorer(draw_rotation, controls,
                    title="Step the position 0, 1, 2, 3 (arrow keys), then jump to 1000 and 4096; "
                          "switch the style")


# --- scaling kind and factor -> frequencies -------------------------------------------------------

@dataclass(frozen=True)
class ScalingState:
    """One setting of the scaling explorer, for Llama 3.1's head (``[LLAMA_DIM // 2]`` arrays).

    scaling: the Hugging Face style ``rope_scaling`` dict the setting stands for.
    plain, scaled: ``inv_freq`` as trained and as scaled (radians per position).
    attention_factor: what cos and sin are multiplied by (YaRN only; 1.0 otherwise).
    kept: pairs whose speed is unchanged; divided: pairs slowed by the whole factor.
    """

    kind: str
    factor: float
    scaling: dict
    plain: np.ndarray
    scaled: np.ndarray
    attention_factor: float
    kept: int
    divided: int


def scaling_dict(kind: str, factor: float, original: int = LLAMA_CONTEXT) -> dict:
    """The ``rope_scaling`` dict of ``kind`` stretched by ``factor`` from ``original`` positions
    (llama3 with Llama 3.1's low/high frequency factors 1 and 4; yarn with its default betas)."""
    if kind not in SCALING_CHOICES:
        raise ValueError(f"kind must be one of {SCALING_CHOICES}, got {kind!r}")
    scaling = {"rope_type": kind, "factor": float(factor)}
    if kind != "linear":
        scaling["original_max_position_embeddings"] = original
    if kind == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return scaling


def scaling_state(kind: str, factor: float) -> ScalingState:
    """Llama 3.1's speeds under ``kind`` × ``factor``; dynamic NTK at the stretched length,
    ``factor * 8192`` positions (it depends on the sequence's length)."""
    scaling = scaling_dict(kind, factor)
    plain, _ = ref.rope_frequencies(LLAMA_DIM, LLAMA_THETA)
    scaled, attention_factor = ref.rope_frequencies(LLAMA_DIM, LLAMA_THETA, scaling,
                                                    seq_len=int(factor * LLAMA_CONTEXT))
    return ScalingState(kind=kind, factor=float(factor), scaling=scaling, plain=plain,
                        scaled=scaled, attention_factor=float(attention_factor),
                        kept=int(np.isclose(scaled, plain, rtol=1e-12).sum()),
                        divided=int(np.isclose(scaled, plain / factor, rtol=1e-12).sum()))


def draw_scaling(kind: str = "llama3", factor: float = 8):
    """The wavelength of every pair as trained and as scaled, with the trained context."""
    import matplotlib.pyplot as plt

    from kvlab.plot.rope import plot_rope_frequencies

    state = scaling_state(kind, factor)
    fig, ax = plt.subplots(figsize=(9.0, 4.0), layout="constrained")
    plot_rope_frequencies({"default (as trained)": state.plain,
                           f"{kind} × {factor:g}": state.scaled}, context=LLAMA_CONTEXT, ax=ax)
    ax.set_ylim(1, 1e9)  # fixed, so moving the factor moves the line, not the axis
    pairs = len(state.plain)
    ax.set_title(f"Llama 3.1's head, {kind} × {factor:g}: {state.kept} of {pairs} pairs kept, "
                 f"{state.divided} divided by {factor:g}; attention factor "
                 f"{state.attention_factor:.4f}", fontsize=10)
    return fig


def scaling_explorer():
    """The notebook's explorer: the scaling kind and its factor."""
    import ipywidgets as widgets

    from kvlab.explore import Explorer

    controls = {
        "kind": widgets.ToggleButtons(options=SCALING_CHOICES, value="llama3",
                                      description="kind"),
        "factor": widgets.SelectionSlider(options=FACTORS, value=8, description="factor",
                                          continuous_update=False),
    }
    return Explorer(draw_scaling, controls,
                    title="Switch the kind, then slide the factor: which pairs move, and by "
                          "how much?")
