"""Explorers: a figure with controls that redraws in place as the learner moves them.

An explorer is a drawing function ``draw(**values) -> matplotlib Figure`` and one ipywidgets
control per keyword. :class:`Explorer` shows the controls above the figure; moving a control calls
``draw`` again and swaps the picture (a PNG in an ``ipywidgets.Image``, so nothing flickers and no
plotting backend is involved). The logic behind each explorer (the state a setting produces) lives
in a plain function of the stage's module here, tested without a browser; ``draw`` only draws it.

A notebook saved with outputs is what a reader of the repository sees, without a live kernel. So
an explorer publishes one output with two forms: the live widget, for JupyterLab with a kernel,
and a PNG of its default state, which any viewer without a kernel shows instead.

In the page, the explorer's box has the CSS class ``kvlab-explorer`` and its picture the class
``kvlab-explorer-figure``: the browser test finds them by these names.

One module per notebook (``tour`` for 00, ``paging`` for 01, …) builds that notebook's explorers.
"""
from __future__ import annotations

import base64
import io
from typing import Any, Callable

import ipywidgets as widgets

DPI = 100  # the notebooks' figure resolution: a 9.5-inch figure is 950 px, inside JupyterLab's


def figure_png(fig) -> bytes:
    """The PNG bytes of a Matplotlib figure, at the notebooks' :data:`DPI`; the figure is closed
    (an explorer draws a new one on every move, and open figures would pile up). Draw figures
    with ``layout="constrained"`` so nothing is cut at the edges."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)  # no bbox "tight": a second full draw
    plt.close(fig)
    return buffer.getvalue()


class Explorer(widgets.VBox):
    """Controls above a figure that ``draw(**values)`` redraws whenever one of them moves.

    draw: ``(**values) -> Figure``; called with every control's current value by its keyword.
    controls: keyword -> an ipywidgets control (``IntSlider``, ``Dropdown``, ``ToggleButtons``…).
    title: one line above the controls saying what to try.
    """

    def __init__(self, draw: Callable[..., Any], controls: dict[str, widgets.ValueWidget],
                 title: str = ""):
        if not controls:
            raise ValueError("an explorer needs at least one control")
        self._draw, self.controls = draw, dict(controls)
        self.figure = widgets.Image(format="png", value=figure_png(draw(**self.values())))
        self.figure.add_class("kvlab-explorer-figure")
        header = [widgets.HTML(f"<b>{title}</b>")] if title else []
        super().__init__(header + [widgets.HBox(list(self.controls.values()),
                                                layout=widgets.Layout(flex_flow="row wrap")),
                                   self.figure])
        self.add_class("kvlab-explorer")
        for control in self.controls.values():
            control.observe(self._redraw, names="value")

    def values(self) -> dict[str, Any]:
        """Every control's current value, by keyword."""
        return {name: control.value for name, control in self.controls.items()}

    def _redraw(self, _change=None) -> None:
        self.figure.value = figure_png(self._draw(**self.values()))

    def _repr_mimebundle_(self, **kwargs):
        """The live widget, plus a PNG of the current figure for viewers without a kernel."""
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["image/png"] = base64.b64encode(self.figure.value).decode("ascii")
        bundle["text/plain"] = "kvlab explorer (its controls need a live kernel in JupyterLab)"
        return bundle
