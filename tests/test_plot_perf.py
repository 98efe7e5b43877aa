"""kvlab.plot.perf: the figures of notebook 07 drawn from the stored GPU results (data/bench/).

What each figure shows is checked against the JSON rows it was drawn from; readability at
JupyterLab's ~1050 px is checked by rendering at the notebook's 100 dpi (width, smallest font,
legends off the data)."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from kvlab import plot as kplot  # noqa: E402
from kvlab.data import load_json  # noqa: E402
from kvlab.plot import perf  # noqa: E402

NOTEBOOK_DPI = 100
RESULTS = ["bench/h200_2026-11-27.json", "bench/h100_2026-11-27.json"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _h200():
    return load_json("bench/h200_2026-11-27.json")


def _ladder_axes():
    return kplot.plot_ladder([("first", 2e-3), ("second", 1e-3), ("third", 1.25e-3)],
                             {"reference": 2.5e-4, "other": 8e-4})


FIGURES = {
    **{f"kernel_versions {p}": (lambda p=p: kplot.plot_kernel_versions(load_json(p))) for p in RESULTS},
    **{f"measured_roofline {p}": (lambda p=p: kplot.plot_measured_roofline(load_json(p))) for p in RESULTS},
    "ladder": _ladder_axes,
}


def test_the_functions_moved_here_are_the_ones_kvlab_plot_exports():
    assert kplot.plot_kernel_versions is perf.plot_kernel_versions
    assert kplot.plot_measured_roofline is perf.plot_measured_roofline
    assert kplot.decode_flops is perf.decode_flops


@pytest.mark.parametrize("name", FIGURES)
def test_readable_at_notebook_width(name):
    ax = FIGURES[name]()
    fig = ax.figure
    fig.canvas.draw()
    width_px = fig.get_tightbbox().width * NOTEBOOK_DPI  # inches, as bbox_inches="tight" saves
    assert width_px <= 1000, f"{name}: {width_px:.0f} px wide"
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]
    assert min(sizes) >= 8, f"{name}: smallest font {min(sizes)} pt"
    legend = ax.get_legend()
    if legend is not None:  # a legend may sit outside the axes; inside, it must cover no mark
        box = legend.get_window_extent()
        for line in ax.get_lines():
            if line.get_marker() not in ("None", "", None) and line.get_linestyle() in ("None", ""):
                for xy in ax.transData.transform(line.get_xydata()):
                    assert not box.contains(*xy), f"{name}: the legend covers {line.get_label()}"


def test_kernel_versions_legend_is_outside_and_versions_have_their_own_colours():
    ax = kplot.plot_kernel_versions(_h200())
    ax.figure.canvas.draw()
    legend = ax.get_legend()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # right of the axes
    assert [t.get_text() for t in legend.get_texts()] == [f"kvlab v{v}" for v in range(1, 8)]
    colours = {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()
               if line.get_label().startswith("kvlab v")}
    assert len(set(colours.values())) == len(colours) == 7
    # the reference lines are labelled where they are drawn, with the measured time
    texts = [t.get_text() for t in ax.texts]
    assert "torch SDPA contiguous (enable_gqa): 256 us" in texts
    assert "torch gather-then-SDPA: 829 us" in texts


def test_measured_roofline_marks_every_version_and_dtype_in_its_own_colour():
    result = _h200()
    ax = kplot.plot_measured_roofline(result)
    flops = kplot.decode_flops(result["meta"]["shape"])
    marks = {line.get_label().split(":")[0]: line for line in ax.get_lines()
             if line.get_linestyle() in ("None", "")}
    for dtype in ("fp16", "int8"):
        for v in range(1 if dtype == "fp16" else 2, 8):
            fastest = min((r for r in result["rows"] if r["op"].startswith(f"kernel v{v} {dtype} ")),
                          key=lambda r: r["median_s"])
            x, y = marks[f"kernel v{v} {dtype}"].get_xydata()[0]
            assert x == pytest.approx(flops / fastest["bytes"])
            assert y == pytest.approx(flops / fastest["median_s"] / 1e12)
    fp16 = {to_hex(m.get_color()) for k, m in marks.items() if " fp16" in k}
    int8 = {to_hex(m.get_color()) for k, m in marks.items() if " int8" in k}
    assert fp16 == {to_hex(kplot.dtype_color("fp16"))} and int8 == {to_hex(kplot.dtype_color("int8"))}
    # every version is named beside its mark: v1-v7 for fp16, v2-v7 for int8
    assert sorted(t.get_text() for t in ax.texts) == sorted([f"v{v}" for v in range(1, 8)]
                                                            + [f"v{v}" for v in range(2, 8)])
    # the legend lists groups, not 17 points
    assert len(ax.get_legend().get_texts()) <= 6


def test_spread_keeps_order_and_gap():
    logs = [0.30, 0.31, 0.29, 1.0, -0.5]
    out = perf._spread(logs, 0.1)
    assert list(np.argsort(out)) == list(np.argsort(logs))
    assert np.diff(np.sort(out)).min() >= 0.1 - 1e-12
    assert np.mean(out) == pytest.approx(np.mean(logs))


@pytest.mark.parametrize("x, text", [(36.25, "36.2"), (1.6, "1.60"), (0.256, "0.256"), (201.8, "202"),
                                     (1182.0, "1,182")])
def test_three_significant_digits(x, text):
    assert perf._three_digits(x) == text


def test_ladder_draws_each_step_and_its_gain():
    ax = _ladder_axes()
    dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert [line.get_xdata()[0] for line in dots] == pytest.approx([2.0, 1.0, 1.25])  # ms
    assert [line.get_ydata()[0] for line in dots] == [0, 1, 2]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["first", "second", "third"]
    texts = [t.get_text() for t in ax.texts]
    assert "2.00 ms" in texts and "1.00 ms  (2.00x the step above)" in texts
    assert "1.25 ms  (0.80x the step above)" in texts
    assert "reference: 0.250 ms" in texts and "other: 0.800 ms" in texts
    assert len({to_hex(line.get_color()) for line in dots}) == 3


def test_ladder_in_microseconds():
    ax = kplot.plot_ladder([("a", 596e-6), ("b", 202e-6)], unit="us")
    assert "202 us  (2.95x the step above)" in [t.get_text() for t in ax.texts]


@pytest.mark.parametrize("steps, references, unit, message", [
    ([], None, "ms", "at least one step"),
    ([("a", 0.0)], None, "ms", "must be positive"),
    ([("a", 1e-3)], {"ref": -1.0}, "ms", "must be positive"),
    ([("a", 1e-3)], None, "s", "unit must be"),
])
def test_ladder_rejects_bad_input(steps, references, unit, message):
    with pytest.raises(ValueError, match=message):
        kplot.plot_ladder(steps, references, unit=unit)


def test_version_colours_are_distinct_and_ordered():
    colours = [to_hex(kplot.version_color(v, 8)) for v in range(1, 9)]
    assert len(set(colours)) == 8
