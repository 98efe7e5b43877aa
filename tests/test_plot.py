"""kvlab.plot: each figure has the bars, lines and labels its data calls for, and rejects bad input.

Drawn with the Agg backend (no screen). The numbers on the figures are checked against
kvlab.memory, which tests/test_memory.py checks against hand-worked values.
"""
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from kvlab import get_model, list_models  # noqa: E402
from kvlab import plot as kplot  # noqa: E402
from kvlab.memory import GIB, bytes_per_token, tokens_that_fit  # noqa: E402

FITTING = ["qwen3-8b", "llama-3.2-1b", "gemma-3-27b"]  # weights fit on one 80 GiB card
TOO_BIG = ["llama-3.1-70b", "llama-3.1-405b"]  # bf16 weights alone exceed 72 GiB


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _bars(ax):
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def _ytick_texts(ax):
    return [t.get_text() for t in ax.get_yticklabels()]


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _bar_label_texts(ax):
    """Texts bar_label placed (Annotations), in drawing order."""
    return [c.get_text() for c in ax.texts if isinstance(c, matplotlib.text.Annotation)]


# --- plot_bytes_per_token --------------------------------------------------------------------

def test_bytes_per_token_bars_labels_and_values():
    ax = kplot.plot_bytes_per_token(FITTING)
    assert isinstance(ax, Axes)
    containers = _bars(ax)
    assert [c.get_label() for c in containers] == ["fp16", "int8"]
    assert sum(len(c) for c in containers) == len(FITTING) * 2
    # rows sorted by parameter count, smallest first, each label naming the model
    expected_order = sorted(FITTING, key=lambda n: get_model(n).num_params)
    labels = _ytick_texts(ax)
    assert [label.split(" ")[0] for label in labels] == expected_order
    # bar widths are KiB from kvlab.memory
    for container in containers:
        widths = [patch.get_width() for patch in container]
        assert widths == [bytes_per_token(n, container.get_label()) / 1024 for n in expected_order]
    assert _legend_texts(ax) == ["fp16", "int8"]
    assert "KiB" in ax.get_xlabel()
    assert ax.get_title()
    # qwen3-8b fp16: 2 * 36 * 8 * 128 * 2 = 147,456 B = 144 KiB, written on its bar
    assert "144 KiB" in _bar_label_texts(ax)


def test_bytes_per_token_all_models_one_dtype_and_given_axes():
    fig, ax = plt.subplots()
    out = kplot.plot_bytes_per_token(list_models(), dtypes=("int8",), ax=ax)
    assert out is ax
    assert sum(len(c) for c in _bars(ax)) == len(list_models())
    assert len(_ytick_texts(ax)) == len(list_models())


def test_bytes_per_token_accepts_model_shapes():
    ax = kplot.plot_bytes_per_token([get_model("qwen3-8b")], dtypes="fp16")
    assert sum(len(c) for c in _bars(ax)) == 1


def test_same_dtype_same_colour_across_figures():
    a = kplot.plot_bytes_per_token(["qwen3-8b"])
    b = kplot.plot_tokens_that_fit(["qwen3-8b"])
    colour = lambda ax: {c.get_label(): c.patches[0].get_facecolor() for c in _bars(ax)}  # noqa: E731
    assert colour(a) == colour(b)
    assert colour(a)["fp16"] != colour(a)["int8"]


# --- plot_tokens_that_fit --------------------------------------------------------------------

def test_tokens_that_fit_bars_log_scale_and_too_big_note():
    models = FITTING + TOO_BIG
    ax = kplot.plot_tokens_that_fit(models)
    assert isinstance(ax, Axes)
    assert ax.get_xscale() == "log"
    containers = _bars(ax)
    # one bar per (model whose weights fit, dtype): the 70B and 405B get a note instead
    assert sum(len(c) for c in containers) == len(FITTING) * 2
    assert len(_ytick_texts(ax)) == len(models)
    notes = [t.get_text() for t in ax.texts if "weights > memory" in t.get_text()]
    assert len(notes) == len(TOO_BIG)
    for container in containers:
        widths = sorted(patch.get_width() for patch in container)
        expected = sorted(tokens_that_fit(n, container.get_label(), 80 * GIB) for n in FITTING)
        assert widths == expected
    assert _legend_texts(ax)[:2] == ["fp16", "int8"]
    assert "80 GiB" in ax.get_title()
    assert len(ax.lines) == 1  # the 128K reference line


def test_tokens_that_fit_without_reference_and_other_memory():
    ax = kplot.plot_tokens_that_fit(["qwen3-8b"], memory_gib=24, reference_tokens=None)
    assert len(ax.lines) == 0
    assert "24 GiB" in ax.get_title()
    assert [p.get_width() for c in _bars(ax) for p in c] == [
        tokens_that_fit("qwen3-8b", d, 24 * GIB) for d in ("fp16", "int8")
    ]


def test_tokens_that_fit_when_nothing_fits():
    ax = kplot.plot_tokens_that_fit(TOO_BIG)
    assert sum(len(c) for c in _bars(ax)) == 0
    assert len([t for t in ax.texts if "weights > memory" in t.get_text()]) == 2


# --- plot_decode_cost ------------------------------------------------------------------------

def test_decode_cost_two_lines_log_y():
    lens = np.arange(1, 65)
    d, v = 64, 50
    without = 8 * lens * d * d + 4 * lens**2 * d + 2 * d * v
    with_ = 8 * d * d + 4 * lens * d + 2 * d * v
    ax = kplot.plot_decode_cost(lens, without, with_)
    assert isinstance(ax, Axes)
    assert len(ax.lines) == 2
    assert ax.get_yscale() == "log"
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), without)
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), with_)
    texts = _legend_texts(ax)
    assert "without" in texts[0] and "with a KV cache" in texts[1]
    assert "FLOPs" in ax.get_ylabel() and ax.get_xlabel()
    ratio = without[-1] / with_[-1]
    assert any(f"{ratio:,.0f}×" in t.get_text() for t in ax.texts)


@pytest.mark.parametrize(
    "args, match",
    [
        (([], [], []), "non-empty"),
        (([1, 2], [10, 20], [5]), "one entry per step"),
        (([1, 2], [10, 0], [5, 6]), "positive"),
        (([1, 2], [[10, 20]], [5, 6]), "1-D"),
    ],
)
def test_decode_cost_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        kplot.plot_decode_cost(*args)


# --- bad input shared by the model plots -----------------------------------------------------

@pytest.mark.parametrize("func", [kplot.plot_bytes_per_token, kplot.plot_tokens_that_fit])
def test_model_plots_reject_bad_input(func):
    with pytest.raises(ValueError, match="empty"):
        func([])
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        func(["qwen3-8b", "gpt-5"])
    with pytest.raises(ValueError, match="unknown KV dtype 'fp4'"):
        func(["qwen3-8b"], dtypes=("fp4",))
    with pytest.raises(ValueError, match="empty"):
        func(["qwen3-8b"], dtypes=())
    with pytest.raises(ValueError, match="more than once"):
        func(["qwen3-8b", "qwen3-8b"])
    with pytest.raises(ValueError, match="Axes"):
        func(["qwen3-8b"], ax="not an axes")


def test_tokens_that_fit_rejects_bad_memory():
    with pytest.raises(ValueError, match="memory_gib"):
        kplot.plot_tokens_that_fit(["qwen3-8b"], memory_gib=0)


def test_import_kvlab_does_not_import_matplotlib():
    code = "import sys, kvlab; assert 'matplotlib' not in sys.modules, 'kvlab imported matplotlib'"
    subprocess.run([sys.executable, "-c", code], check=True)
