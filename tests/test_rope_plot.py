"""kvlab.plot's RoPE figures (notebooks/03_rope): what each draws, and bad input rejected."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from kvlab import plot as kplot  # noqa: E402
from kvlab.ref.rope import rope_frequencies  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_frequencies_one_line_per_kind_log_wavelengths():
    plain = rope_frequencies(16, 10000.0)[0]
    scaled = rope_frequencies(16, 10000.0, {"rope_type": "linear", "factor": 4.0})[0]
    ax = kplot.plot_rope_frequencies({"default": plain, "linear x4": scaled}, context=4096)
    assert isinstance(ax, Axes) and ax.get_yscale() == "log"
    assert len(ax.lines) == 3  # two kinds and the context line
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 2 * np.pi / plain)
    assert ax.lines[1].get_color() == kplot.SCALING_COLORS["linear"]
    assert ax.lines[2].get_ydata()[0] == 4096


def test_pair_rotation_arrows_and_given_axes():
    fig, ax = plt.subplots()
    points = {"fast": np.array([[1.0, 0.0], [0.0, 1.0]]), "slow": np.array([[0.5, 0], [0.4, 0.3]])}
    assert kplot.plot_pair_rotation(points, [0, 1], ax=ax) is ax
    assert len([t for t in ax.texts if t.get_text().startswith("m=")]) == 4
    assert ax.get_aspect() == 1.0


def test_relative_dot_heatmap():
    dots = np.add.outer(np.arange(4.0), -np.arange(4.0))
    ax = kplot.plot_relative_dot(dots)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), dots)
    assert len(ax.figure.axes) == 2  # and its colorbar


def test_pair_layouts_cells_and_pairs():
    ax = kplot.plot_pair_layouts(8, rotary_dim=4)
    for style in ("neox", "gptj"):
        assert len([p for p in ax.patches if p.get_gid() == f"{style}-dim"]) == 8
    texts = [t.get_text() for t in ax.texts]
    assert texts[:8] == ["0", "1", "0", "1", "·", "·", "·", "·"]  # rotate-half row
    assert texts[9:17] == ["0", "0", "1", "1", "·", "·", "·", "·"]  # interleaved row


@pytest.mark.parametrize("call, match", [
    (lambda: kplot.plot_rope_frequencies({}), "empty"),
    (lambda: kplot.plot_rope_frequencies({"a": [1.0, 0.0]}), "> 0"),
    (lambda: kplot.plot_rope_frequencies({"a": [1.0]}, context=0), "context"),
    (lambda: kplot.plot_pair_rotation({"a": np.zeros((3, 2))}, [0, 1]), r"shape \[2, 2\]"),
    (lambda: kplot.plot_pair_rotation({}, [0]), "non-empty"),
    (lambda: kplot.plot_relative_dot(np.zeros(3)), "2-D"),
    (lambda: kplot.plot_pair_layouts(7), "even"),
    (lambda: kplot.plot_pair_layouts(8, rotary_dim=10), "rotary_dim <= head_dim"),
    (lambda: kplot.plot_pair_layouts(8, ax="axes"), "Axes"),
])
def test_rope_plots_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_rope_figures_keep_global_state():
    before = dict(matplotlib.rcParams)
    kplot.plot_pair_layouts(8)
    kplot.plot_relative_dot(np.eye(3))
    assert dict(matplotlib.rcParams) == before
