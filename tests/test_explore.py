"""The explorer core (kvlab.explore): controls redraw the figure in place, and the saved output
carries a PNG of the default state for readers without a kernel."""
import base64

import ipywidgets as widgets
import matplotlib
import pytest

from kvlab.explore import Explorer, figure_png

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _draw(n):
    fig, ax = plt.subplots(figsize=(3, 2), layout="constrained")
    ax.bar(range(n), range(n))
    return fig


def test_moving_a_control_redraws_the_figure():
    explorer = Explorer(_draw, {"n": widgets.IntSlider(value=2, min=1, max=5)}, "try n")
    before = explorer.figure.value
    explorer.controls["n"].value = 4
    assert explorer.values() == {"n": 4}
    assert explorer.figure.value != before
    explorer.controls["n"].value = 2
    assert explorer.figure.value == before            # the same setting draws the same picture


def test_the_saved_output_has_the_widget_and_a_png_of_the_current_figure():
    explorer = Explorer(_draw, {"n": widgets.IntSlider(value=3, min=1, max=5)})
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == explorer.figure.value
    assert bundle["image/png"] and "explorer" in bundle["text/plain"]
    assert "kvlab-explorer" in explorer._dom_classes
    assert "kvlab-explorer-figure" in explorer.figure._dom_classes


def test_figures_are_closed_after_drawing():
    before = len(plt.get_fignums())
    figure_png(_draw(2))
    assert len(plt.get_fignums()) == before


def test_an_explorer_needs_a_control():
    with pytest.raises(ValueError, match="at least one control"):
        Explorer(_draw, {})
