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
from kvlab.backends import cuda_mode  # noqa: E402
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


# --- stage 01: paging figures ----------------------------------------------------------------

def _gid_patches(ax, gid):
    return [p for p in ax.patches if p.get_gid() == gid]


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_block_table_blocks_fill_sharing_and_arrows():
    # seq 0: 20 tokens in blocks 3, 1; seq 1: 5 tokens in block 0; seq 2: 40 tokens in 3, 5, 6
    ax = kplot.plot_block_table([[3, 1, -1], [0, -1, -1], [3, 5, 6]], [20, 5, 40], 8, 16)
    assert isinstance(ax, Axes)
    assert len(_gid_patches(ax, "physical-block")) == 8
    assert len(_gid_patches(ax, "logical-block")) == 2 + 1 + 3
    assert len(_gid_patches(ax, "mapping-arrow")) == 6  # small pool: one column, arrows
    fills = _gid_patches(ax, "fill")
    assert len(fills) == 5  # blocks 0, 1, 3, 5, 6 hold tokens
    assert sum(1 for p in fills if p.get_hatch()) == 1  # block 3 is shared
    texts = _texts(ax)
    for note in ("4/16", "5/16", "16/16 s0+s2", "8/16", "→#3", "→#6"):
        assert note in texts, note
    assert texts.count("free") == 3  # blocks 2, 4, 7
    legend = _legend_texts(ax)
    assert legend[:3] == ["seq 0 (20 tokens)", "seq 1 (5 tokens)", "seq 2 (40 tokens)"]
    assert "shared block" in legend and "free" in legend
    # a partial block's fill bar is proportional to its tokens; a free block has none
    widths = sorted(p.get_width() for p in fills)
    full = max(widths)
    assert widths[0] == pytest.approx(full * 4 / 16)


def test_block_table_large_pool_grid_without_arrows_and_given_axes():
    fig, ax = plt.subplots()
    tables = [[i * 3, i * 3 + 1, i * 3 + 2] for i in range(6)]
    out = kplot.plot_block_table(tables, [40, 33, 17, 48, 5, 0], 24, 16, ax=ax,
                                 seq_labels=list("abcdef"))
    assert out is ax
    assert len(_gid_patches(ax, "physical-block")) == 24
    assert len(_gid_patches(ax, "mapping-arrow")) == 0
    assert len(_gid_patches(ax, "logical-block")) == 3 + 3 + 2 + 3 + 1 + 0
    assert "(no tokens)" in _texts(ax)
    assert _legend_texts(ax)[0] == "a (40 tokens)"
    ax2 = kplot.plot_block_table(tables, [40, 33, 17, 48, 5, 0], 24, 16, ncols=1, arrows=True)
    assert len(_gid_patches(ax2, "mapping-arrow")) == 12


@pytest.mark.parametrize("args, kwargs, match", [
    (([[3, 1]], [20], 3, 16), {}, "out of range"),
    (([[3, -1]], [20], 8, 16), {}, "block ids >= 0"),
    (([[3, 3]], [20], 8, 16), {}, "twice"),
    (([[3, 1]], [20, 5], 8, 16), {}, "one per sequence"),
    (([[3, 1]], [40], 8, 16), {}, "only 2 columns"),
    (([[3, 1]], [20], 0, 16), {}, "num_blocks"),
    (([[3, 1]], [20], 8, 0), {}, "block_size"),
    ((np.zeros((0, 2), int), [], 8, 16), {}, "empty"),
    (([[3, 1]], [20], 8, 16), {"seq_labels": ["a", "b"]}, "seq_labels"),
    (([[3, 1]], [20], 8, 16), {"ax": "axes"}, "Axes"),
])
def test_block_table_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kplot.plot_block_table(*args, **kwargs)


@pytest.mark.parametrize("layout", ["nhd", "hnd", "vllm_k", "vllm_v"])
def test_layout_addresses_image_is_byte_offsets(layout):
    from kvlab.layouts import byte_offset

    ax = kplot.plot_layout_addresses(2, 16, 4, layout)
    assert isinstance(ax, Axes)
    (image,) = ax.images
    grid = np.asarray(image.get_array())
    assert grid.shape == (4 * 2, 16)
    for slot, head, dim in [(0, 0, 0), (3, 1, 15), (2, 0, 9), (1, 1, 7)]:
        expected = byte_offset(layout, 0, slot, head, dim, (1, 4, 2, 16), 2)
        assert grid[slot * 2 + head, dim] == expected
    assert sorted(grid.ravel().tolist()) == list(range(0, 2 * 128, 2))  # a permutation
    assert len(ax.texts) == 128  # annotated: small enough
    assert _ytick_texts(ax)[:3] == ["t0 h0", "t0 h1", "t1 h0"]
    assert ax.get_title()
    assert len(ax.figure.axes) == 2  # the heatmap and its colorbar


def test_layout_addresses_options():
    ax = kplot.plot_layout_addresses(4, 128, 16, "vllm_k", itemsize=1, colorbar=False)
    assert len(ax.texts) == 0  # 64 x 128 cells: too many numbers to print
    assert len(ax.figure.axes) == 1
    assert "x = 16" in ax.get_title()
    assert np.asarray(ax.images[0].get_array()).max() == 64 * 128 - 1


def test_all_layouts_side_by_side():
    fig = kplot.plot_all_layouts(2, 16, 4)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 4 and len(fig.axes) == 5  # plus one shared colorbar
    assert [ax.images[0].get_clim() for ax in heatmaps] == [(0, 254)] * 4
    fig2 = kplot.plot_all_layouts(2, 8, 4, itemsize=4, layouts=("nhd", "vllm_k"))
    assert len([ax for ax in fig2.axes if ax.images]) == 2


@pytest.mark.parametrize("call, match", [
    (lambda: kplot.plot_layout_addresses(2, 16, 4, "paged"), "unknown layout"),
    (lambda: kplot.plot_layout_addresses(2, 12, 4, "vllm_k"), "not divisible"),
    (lambda: kplot.plot_layout_addresses(0, 16, 4, "nhd"), "num_kv_heads"),
    (lambda: kplot.plot_layout_addresses(2, 16, 4, "vllm_k", itemsize=3), "divide 16"),
    (lambda: kplot.plot_layout_addresses(2, 16, 4, "nhd", ax=1), "Axes"),
    (lambda: kplot.plot_all_layouts(2, 16, 4, layouts=()), "empty"),
    (lambda: kplot.plot_all_layouts(2, 16, 4, layouts=("nhd", "nhd")), "more than once"),
])
def test_layout_plots_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_pool_occupancy_lines_per_policy():
    reserved = [np.array([4, 8, 8, 4]) * 1024**2, np.array([2, 3, 5]) * 1024**2]
    used = [np.array([1, 2, 3, 1]) * 1024**2, np.array([2, 3, 4]) * 1024**2]
    ax = kplot.plot_pool_occupancy(None, reserved, used, labels=["contiguous-max", "paged-16"],
                                   budget_bytes=10 * 1024**2)
    assert isinstance(ax, Axes)
    assert len(ax.lines) == 2 * 2 + 1  # reserved + used per policy, and the pool
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [4, 8, 8, 4])  # MiB
    np.testing.assert_array_equal(ax.lines[3].get_ydata(), [2, 3, 4])
    assert ax.lines[0].get_color() == kplot.policy_color("contiguous-max")
    assert "MiB" in ax.get_ylabel()
    assert len(ax.collections) == 2  # the shaded waste of each policy
    assert _legend_texts(ax) == ["contiguous-max", "paged-16", "reserved", "holding tokens",
                                 "KV pool"]


def test_pool_occupancy_from_a_simulation():
    from kvlab.waste import Trace, simulate

    trace = Trace.from_requests([(0, 3, 2), (0, 1, 3), (1, 2, 4)])
    results = simulate(trace, ["contiguous-max", "paged-2"], budget_tokens=16, max_len=8,
                       progress=False)
    fig, ax = plt.subplots()
    out = kplot.plot_pool_occupancy([np.arange(r.steps) for r in results.values()],
                                    [r.reserved * 2048 for r in results.values()],
                                    [r.used * 2048 for r in results.values()],
                                    labels=list(results), ax=ax)
    assert out is ax and len(ax.lines) == 4
    assert "KiB" in ax.get_ylabel()
    one = kplot.plot_pool_occupancy(np.arange(3), np.array([3.0, 4, 5]), np.array([1.0, 2, 3]))
    assert len(one.lines) == 2 and _legend_texts(one)[0] == "policy 0"


@pytest.mark.parametrize("args, kwargs, match", [
    ((None, [np.ones(3)], [np.ones(3), np.ones(3)]), {}, "one of each per policy"),
    ((np.arange(4), [np.ones(3)], [np.ones(3)]), {}, "one entry per step"),
    ((None, [np.ones(3)], [np.full(3, 2.0)]), {}, "exceeds reserved"),
    ((None, [np.array([1.0, -1, 1])], [np.zeros(3)]), {}, ">= 0"),
    ((None, [np.ones(3)], [np.ones(3)]), {"labels": ["a", "b"]}, "labels"),
    ((None, [np.ones(3)], [np.ones(3)]), {"budget_bytes": 0}, "budget_bytes"),
    ((None, "abc", [np.ones(3)]), {}, "1-D array or a list"),
    ((None, [np.ones(0)], [np.ones(0)]), {}, "non-empty"),
])
def test_pool_occupancy_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kplot.plot_pool_occupancy(*args, **kwargs)


def test_waste_summary_bars_and_reference_ranges():
    results = {"contiguous-max": 0.252, "contiguous-oracle": 0.597, "paged-16": 0.986}
    ax = kplot.plot_waste_summary(results)
    assert isinstance(ax, Axes)
    (bars,) = _bars(ax)
    assert [p.get_width() for p in bars] == pytest.approx([25.2, 59.7, 98.6])
    assert _ytick_texts(ax) == list(results)
    assert _bar_label_texts(ax) == ["25.2%", "59.7%", "98.6%"]
    paged_16 = matplotlib.colors.to_rgba(kplot.policy_color("paged-16"))
    assert bars.patches[2].get_facecolor() == paged_16
    spans = [p for p in ax.patches if p not in bars.patches]
    assert len(spans) == 2  # 20.4–38.2% and 96–100%
    xs = sorted((round(s.get_x(), 1), round(s.get_x() + s.get_width(), 1)) for s in spans)
    assert xs == [(20.4, 38.2), (96.0, 100.0)]
    legend = _legend_texts(ax)
    assert "20.4–38.2%" in legend[0] and "< 4%" in legend[1]


def test_waste_summary_pairs_without_reference():
    fig, ax = plt.subplots()
    out = kplot.plot_waste_summary([("a", 0.5), ("b", 1.0)], ax=ax, reference=False)
    assert out is ax
    assert len(ax.patches) == 2 and ax.get_legend() is None


@pytest.mark.parametrize("results, match", [
    ({}, "empty"),
    ({"a": 1.2}, r"\[0, 1\]"),
    ({"a": -0.1}, r"\[0, 1\]"),
    ({"a": float("nan")}, r"\[0, 1\]"),
    ([("a", 0.5), ("a", 0.6)], "more than once"),
    ({"a": "high"}, "fractions"),
])
def test_waste_summary_rejects_bad_input(results, match):
    with pytest.raises(ValueError, match=match):
        kplot.plot_waste_summary(results)


def test_paging_figures_keep_global_state():
    before = dict(matplotlib.rcParams)
    kplot.plot_block_table([[0]], [3], 2, 4)
    kplot.plot_all_layouts(1, 8, 2)
    kplot.plot_waste_summary({"paged-16": 0.98})
    assert dict(matplotlib.rcParams) == before


# --- notebook 05: which lane reads which dims ----------------------------------------------------

@pytest.mark.parametrize("head_dim, lanes, dim_slots, elem_bytes", [
    (128, 16, 8, 2), (128, 16, 8, 1), (256, 32, 8, 4), (80, 16, 8, 2), (64, 8, 8, None)])
def test_lane_map_reads_every_dim_once(head_dim, lanes, dim_slots, elem_bytes):
    dims = kplot.lane_map(head_dim, lanes, dim_slots, elem_bytes)
    assert dims.shape == (lanes, dim_slots)
    assert sorted(dims[dims >= 0]) == list(range(head_dim))
    assert (dims >= 0).sum() == head_dim  # padding past head_dim is -1


@pytest.mark.parametrize("args, message", [
    ((128, 16, 8, 3), "elem_bytes must be 1, 2 or 4"), ((128, 0, 8, 2), "lanes must be an int"),
    ((0, 16, 8, None), "head_dim must be an int"), ((128, 16, 6, 2), "whole 8-byte words")])
def test_lane_map_refuses_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        kplot.lane_map(*args)


def test_lane_map_by_hand():
    # v2-v4, 4 lanes: lane 1 holds dims 1, 5, 9; v5 with 2-byte elements (4 per word): lane 1
    # holds word 1 (dims 4-7), then word 5 (dims 20-23)
    assert kplot.lane_map(12, 4, 3)[1].tolist() == [1, 5, 9]
    assert kplot.lane_map(32, 4, 8, elem_bytes=2)[1].tolist() == [4, 5, 6, 7, 20, 21, 22, 23]


@pytest.mark.skipif(cuda_mode() != "simulator", reason="calls a device function from Python")
def test_lane_map_is_the_kernels_own_index():
    from kvlab.kernels.cuda.attention import _wide_dim

    for head_dim, lanes, elem_bytes in ((128, 16, 2), (128, 16, 1), (256, 32, 4)):
        per_word = 8 // elem_bytes
        want = np.array([[_wide_dim(i, r, lanes, per_word) for i in range(8)]
                         for r in range(lanes)])
        assert np.array_equal(kplot.lane_map(head_dim, lanes, 8, elem_bytes), want)


def test_plot_lane_map_brackets_each_load():
    ax = kplot.plot_lane_map(head_dim=128, lanes=16, dim_slots=8, elem_bytes=2)
    loads = [t.get_text() for t in ax.texts if t.get_text().startswith("load ")]
    assert len(loads) == 8 + 2  # v2-v4: 8 loads of 2 B per lane; v5: 2 loads of 8 B
    assert len(ax.patches) == 2 * 128
    plt.close(ax.figure)


# --- notebook 05: GPU results (data/bench/) --------------------------------------------------------

def _h100():
    from kvlab.data import load_json

    return load_json("bench/h100_2026-11-27.json")


def test_decode_flops_by_hand():
    # 4 * B * Hq * L * D = 4 * 8 * 32 * 32768 * 128
    assert kplot.decode_flops(_h100()["meta"]["shape"]) == 4 * 8 * 32 * 32768 * 128 == 4_294_967_296


def test_kernel_versions_one_line_per_version_and_sdpa_lines():
    result = _h100()
    ax = kplot.plot_kernel_versions(result)
    lines = {line.get_label(): line for line in ax.get_lines()}
    v2 = lines["kvlab v2"]
    assert list(v2.get_xdata()) == [1, 8, 16, 32, 64, 128]
    times = {r["op"]: r["median_s"] * 1e3 for r in result["rows"] if r["impl"] == "cuda"}
    assert v2.get_ydata()[2] == pytest.approx(times["kernel v2 fp16 splits=16"])
    assert list(lines["kvlab v1"].get_xdata()) == [1, 16]
    assert any(label.startswith("torch SDPA contiguous") for label in lines)
    assert "NVIDIA H100" in ax.get_title() and "2026-11-27" in ax.get_title()
    plt.close("all")


def test_measured_roofline_points_at_intensity_and_achieved_rate():
    result = _h100()
    ax = kplot.plot_measured_roofline(result)
    points = {line.get_label().split(":")[0]: line for line in ax.get_lines()
              if line.get_marker() in ("o", "s", "^", "D")}
    sdpa = next(r for r in result["rows"] if r["op"].startswith("torch SDPA"))
    flops = kplot.decode_flops(result["meta"]["shape"])
    x, y = points["torch SDPA contiguous (enable_gqa)"].get_xydata()[0]
    assert x == pytest.approx(flops / sdpa["bytes"]) and y == pytest.approx(flops / sdpa["median_s"] / 1e12)
    # the fastest split count stands for each version
    v2 = min((r for r in result["rows"] if r["op"].startswith("kernel v2 fp16")),
             key=lambda r: r["median_s"])
    assert points["kernel v2 fp16"].get_xydata()[0][1] == pytest.approx(flops / v2["median_s"] / 1e12)
    assert "NVIDIA H100" in ax.get_title()
    plt.close("all")


@pytest.mark.parametrize("path, dashed", [
    ("bench/h100_2026-11-27.json", "3.35 TB/s (NVIDIA H100 80GB HBM3"),
    ("bench/h200_2026-11-27.json", "4.80 TB/s (NVIDIA H200 ")])
def test_measured_roofline_draws_the_cards_own_datasheet_peak(path, dashed):
    from kvlab.data import load_json

    ax = kplot.plot_measured_roofline(load_json(path))
    assert [line.get_label() for line in ax.get_lines() if line.get_linestyle() == "--"] \
        == [next(line.get_label() for line in ax.get_lines() if line.get_label().startswith(dashed))]
    for other in ("Some Future GPU", "NVIDIA GH200 480GB"):  # unknown, or only a name's tail
        unknown = load_json(path)
        unknown["meta"]["device"] = other
        ax = kplot.plot_measured_roofline(unknown)
        assert not [line for line in ax.get_lines() if line.get_linestyle() == "--"], other
    plt.close("all")


def test_gpu_result_plots_reject_cpu_results():
    cpu = {"meta": {"device": "CPU", "date": "2026-11-27", "size": "smoke",
                    "copy_bandwidth_gb_per_s": None, "fp32_matmul_tflops": None,
                    "shape": _h100()["meta"]["shape"]}, "rows": []}
    with pytest.raises(ValueError, match="copy bandwidth"):
        kplot.plot_measured_roofline(cpu)
    with pytest.raises(ValueError, match="kernel vN"):
        kplot.plot_kernel_versions(cpu)


# --- 04: the fused kernel's grid --------------------------------------------------------------

def test_thread_blocks_one_cell_per_head_and_token_group():
    from matplotlib.patches import Rectangle

    ax = kplot.plot_thread_blocks(4, 2, num_tokens=40, tokens_per_block=16, qk_mode=2)
    cells = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(cells) == 3 * (4 + 2 * 2)  # ceil(40 / 16) token groups x (Hq + 2 Hkv) heads
    assert [t.get_text() for t in ax.get_yticklabels()] == ["tokens 32–39", "tokens 16–31",
                                                            "tokens 0–15"]
    assert not [c for c in cells if c.get_hatch()]  # RoPE only, float cache: all in registers
    # QK-norm: Q and K heads need the sum of squares, so they go through shared memory; an int8
    # cache's amax does the same to K and V
    normed = kplot.plot_thread_blocks(4, 2, num_tokens=16, qk_mode=1)
    assert sum(bool(c.get_hatch()) for c in normed.patches if isinstance(c, Rectangle)) == 4 + 2
    quantized = kplot.plot_thread_blocks(4, 2, num_tokens=16, qk_mode=2, quantized=True)
    assert sum(bool(c.get_hatch()) for c in quantized.patches if isinstance(c, Rectangle)) == 2 + 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_q_heads=0, num_kv_heads=1), "num_q_heads"),
    (dict(num_q_heads=2, num_kv_heads=1, tokens_per_block=0), "tokens_per_block"),
    (dict(num_q_heads=2, num_kv_heads=1, num_tokens=2.5), "num_tokens"),
    (dict(num_q_heads=2, num_kv_heads=1, qk_mode=4), "qk_mode"),
])
def test_thread_blocks_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kplot.plot_thread_blocks(**kwargs)


# --- 06: the pool under continuous batching ---------------------------------------------------

def test_pool_timeline_draws_the_last_step_with_a_width():
    """Step s is drawn from s to s + 1, the last one too: a pool that ends empty is seen empty."""
    from types import SimpleNamespace

    def record(step, used, cached, running):
        return SimpleNamespace(step=step, used=used, cached=cached, free=8 - used - cached,
                               running=running, blocks={r: used for r in running})

    result = SimpleNamespace(
        timeline=[record(0, 3, 0, ("A",)), record(1, 5, 0, ("A",)), record(2, 0, 2, ())],
        outputs={"A": [1, 2]}, prefix_hits={}, num_blocks=8, block_size=4, bytes_per_block=64)
    fig = kplot.plot_pool_timeline(result)
    top = fig.axes[0]
    assert top.get_xlim() == (0, 3)
    used = top.collections[0].get_paths()[0]  # the "used" band of the stack, in data units
    assert used.contains_point((1.5, 4.5)) and used.contains_point((0.5, 2.5))
    assert not used.contains_point((2.5, 0.5))  # the last step: nothing used, drawn as such
    assert top.get_legend() is not None
