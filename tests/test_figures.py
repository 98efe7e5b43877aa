"""Every kvlab.plot figure is readable as a learner sees it: in JupyterLab, at its default size.

JupyterLab shows a notebook's PNG at its own pixel width, scaled down to fit the output area
(about 1050 px wide) when it is wider. The inline backend saves figures at ``figure.dpi`` (its
``rc`` sets none, so Matplotlib's default) with ``bbox_inches="tight"``. So, for each public
plotting function, drawn at its default size with small valid data:

- the saved figure is at most ``MAX_WIDTH_PX`` wide (it is then shown unscaled);
- no text (titles, labels, tick labels, legend entries, annotations) is smaller than
  ``MIN_FONT_PT`` once scaled to the shown width;
- a legend inside an axes covers no data: no point of a line, bar, image or filled area lies
  under it;
- tick labels along one axis do not overlap;
- a heat map (an image) has a colour bar and sits on integer ticks;
- within one figure, two legend entries that mean different things do not share a colour (grey,
  ``COLOR_REFERENCE``, marks reference lines; those differ by line style instead).
"""
from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import struct

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import ListedColormap, to_hex  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.text import Text  # noqa: E402

import kvlab  # noqa: E402
import kvlab.plot as kplot  # noqa: E402
from kvlab.plot.style import COLOR_REFERENCE  # noqa: E402

SHOWN_WIDTH_PX = 1050  # JupyterLab's output area at a common window width
MAX_WIDTH_PX = 1000
MIN_FONT_PT = 8.0


def notebook_dpi() -> float:
    """The dpi the notebooks' inline backend renders at."""
    from matplotlib_inline.backend_inline import InlineBackend

    return float(InlineBackend.instance().rc.get("figure.dpi",
                                                 matplotlib.rcParamsDefault["figure.dpi"]))


# --- small valid data for every public plotting function ------------------------------------------

def _rng():
    return np.random.default_rng(0)


def _bench():
    from kvlab.data import load_json

    return load_json("bench/h200_2026-11-27.json")


def _serve_result():
    from kvlab.generate import Request, serve
    from kvlab.model import CharTokenizer, Qwen3Model

    tok = CharTokenizer()
    model = Qwen3Model.pretrained_tiny()
    requests = [Request("A", tok.encode("The old man sees. The"), 6, arrival=0),
                Request("B", tok.encode("Tom"), 8, arrival=1),
                Request("C", tok.encode("The old man sees. A"), 4, arrival=3)]
    return serve(model, requests, num_blocks=12, block_size=4, dtype="fp16")


def _inv_freq(rotary_dim=64, theta=1e4, scaling=None):
    from kvlab.ref.rope import rope_frequencies

    return rope_frequencies(rotary_dim, theta, scaling)[0]


def _owners():
    owners = np.arange(24).reshape(4, 6) % 5
    owners[0, 0] = -1
    return owners


CASES = {
    # the notebooks' own arguments where they are small enough to build here
    "plot_bytes_per_token": lambda: kplot.plot_bytes_per_token(kvlab.list_models()),
    "plot_tokens_that_fit": lambda: kplot.plot_tokens_that_fit(kvlab.list_models()),
    "plot_decode_cost": lambda: kplot.plot_decode_cost(
        np.arange(1, 65), 1e9 * np.arange(1, 65), np.full(64, 1e9)),
    "plot_block_table": lambda: kplot.plot_block_table(
        np.array([[3, 0, 5], [1, 6, -1], [3, 2, -1], [4, 7, -1]]), np.array([10, 7, 6, 8]),
        num_blocks=8, block_size=4),
    "plot_layout_addresses": lambda: kplot.plot_layout_addresses(2, 16, 4, "vllm_k"),
    "plot_all_layouts": lambda: kplot.plot_all_layouts(2, 16, 4),
    "plot_pool_occupancy": lambda: kplot.plot_pool_occupancy(
        None, [np.full(20, 4096.0), np.linspace(1024, 3072, 20)],
        [np.linspace(512, 2048, 20), np.linspace(512, 2048, 20)],
        labels=["contiguous-max", "paged-16"], budget_bytes=4096),
    "plot_waste_summary": lambda: kplot.plot_waste_summary(
        {"contiguous-max": 0.27, "contiguous-pow2": 0.55, "paged-16": 0.97}),
    "plot_channel_magnitudes": lambda: kplot.plot_channel_magnitudes(
        _rng().standard_normal((64, 32))),
    "plot_error_histograms": lambda: kplot.plot_error_histograms(
        {"int8": _rng().uniform(0, 0.5, 500), "fp8_e4m3": _rng().uniform(0, 1, 500)}),
    "plot_memory_vs_error": lambda: kplot.plot_memory_vs_error(
        ["fp16", "int8", "fp8_e4m3", "int4"], [512, 260, 260, 144], [1e-4, 1e-2, 5e-2, 2e-1],
        bar=0.02),
    "plot_rope_frequencies": lambda: kplot.plot_rope_frequencies(
        {"default (theta 10000)": _inv_freq(),
         "llama3 x8": _inv_freq(scaling={"rope_type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192})},
        context=8192),
    "plot_pair_rotation": lambda: kplot.plot_pair_rotation(
        {"fast pair (i = 0)": np.c_[np.cos(np.arange(5)), np.sin(np.arange(5))],
         "slow pair (i = 31)": np.c_[np.cos(0.1 * np.arange(5)), np.sin(0.1 * np.arange(5))]},
        list(range(5))),
    "plot_relative_dot": lambda: kplot.plot_relative_dot(
        np.cos(0.3 * np.subtract.outer(np.arange(16), np.arange(16)))),
    "plot_pair_layouts": lambda: kplot.plot_pair_layouts(16, 8),
    "plot_thread_blocks": lambda: kplot.plot_thread_blocks(4, 2),
    "plot_write_traffic": lambda: kplot.plot_write_traffic(
        __import__("kvlab.ref.fused_write", fromlist=["write_traffic"]).write_traffic(
            4096, 32, 8, 128, qk_mode=1)),
    "plot_scores_over_table": lambda: kplot.plot_scores_over_table(
        _rng().dirichlet(np.ones(40), size=2), [3, 0, 5], 16),
    # notebook 05's explorer at its slider's end: 12 partitions of 40 keys, the last 2 empty
    "plot_split_k": lambda: kplot.plot_split_k(
        [(min(4 * j, 40), min(4 * j + 4, 40)) for j in range(12)],
        [np.full(4, 0.25) if j < 10 else np.zeros(0) for j in range(12)],
        [0.1] * 10 + [0.0, 0.0]),
    "plot_roofline": lambda: kplot.plot_roofline(
        [{"name": "decode, fp16 KV", "flops": 4e9, "bytes": 4e9},
         {"name": "decode, int8 KV", "flops": 4e9, "bytes": 2e9},
         {"name": "prefill 4k tokens", "flops": 4e13, "bytes": 4e9}]),
    "plot_lane_map": lambda: kplot.plot_lane_map(head_dim=128, lanes=16, dim_slots=8, elem_bytes=2),
    "plot_kernel_versions": lambda: kplot.plot_kernel_versions(_bench()),
    "plot_measured_roofline": lambda: kplot.plot_measured_roofline(_bench()),
    "plot_ladder": lambda: kplot.plot_ladder(
        [("v1", 6.0e-3), ("v2", 2.26e-3), ("v3", 1.72e-3), ("v6", 1.57e-3)],
        {"torch SDPA": 2.56e-4}),
    "plot_ceilings": lambda: kplot.plot_ceilings(
        {"memory": 4.2e12, "issue": 0.85e12, "latency": 3.6e12},
        {"issue": "issue: 2.43 / cycle ÷ 0.75 / byte"},
        {"torch SDPA, measured": 4.19e12, "v6, measured": 0.69e12}),
    "plot_pool_timeline": lambda: kplot.plot_pool_timeline(_serve_result()),
    "plot_accesses": lambda: importlib.import_module("kvlab.plot.trace").plot_accesses(_owners()),
    "plot_access_comparison": lambda: importlib.import_module(
        "kvlab.plot.trace").plot_access_comparison(_owners(), np.arange(24).reshape(4, 6) % 5),
}


def public_plot_functions() -> set[str]:
    """Every ``plot_*`` function that kvlab.plot or one of its modules defines."""
    names = {n for n in dir(kplot) if n.startswith("plot_") and callable(getattr(kplot, n))}
    for info in pkgutil.iter_modules(kplot.__path__):
        module = importlib.import_module(f"kvlab.plot.{info.name}")
        names |= {n for n, f in inspect.getmembers(module, inspect.isfunction)
                  if n.startswith("plot_") and f.__module__ == module.__name__}
    return names


def test_every_plot_function_has_a_case():
    assert public_plot_functions() <= set(CASES), sorted(public_plot_functions() - set(CASES))


# --- what a figure is checked for -------------------------------------------------------------

def _figure(drawn):
    return drawn if isinstance(drawn, matplotlib.figure.Figure) else drawn.figure


def saved_width_px(fig, dpi: float) -> int:
    """The width of the PNG the inline backend would save (bbox_inches='tight')."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return struct.unpack(">II", buf.getvalue()[16:24])[0]


def visible_texts(fig) -> list[Text]:
    renderer = fig.canvas.get_renderer()
    figure_box = fig.get_tightbbox(renderer)
    texts = []
    for t in fig.findobj(Text):
        if not (t.get_visible() and t.get_text().strip()):
            continue
        parent = t.axes
        if parent is not None and not parent.get_visible():
            continue
        box = t.get_window_extent(renderer)
        if box.width <= 0 or not box.overlaps(figure_box.transformed(fig.dpi_scale_trans)):
            continue  # e.g. a tick label matplotlib keeps for a tick outside the view
        texts.append(t)
    return texts


def _inside(box, points) -> np.ndarray:
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    return ((points[:, 0] > box.x0) & (points[:, 0] < box.x1)
            & (points[:, 1] > box.y0) & (points[:, 1] < box.y1))


def _line_points(line, n=60):
    xy = line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2:
        return xy
    t = np.linspace(0, 1, n)[:, None]  # densify each segment: a line may cross without a vertex
    return np.concatenate([a + t * (b - a) for a, b in zip(xy[:-1], xy[1:])])


def covered_by_legend(ax) -> list[str]:
    """What data of ``ax`` lies under its legend (empty when the legend sits outside the axes)."""
    legend = ax.get_legend()
    if legend is None or not legend.get_visible():
        return []
    renderer = ax.figure.canvas.get_renderer()
    box = legend.get_window_extent(renderer).padded(-1)
    area = ax.get_window_extent(renderer)
    if not box.overlaps(area):
        return []
    problems = []
    for line in ax.lines:
        if line.get_visible() and line.get_label() and len(line.get_xdata()):
            pts = _line_points(line)
            if len(pts) and _inside(box, pts).any():
                problems.append(f"line {line.get_label()!r}")
    for patch in ax.patches:
        if patch.get_visible() and patch.get_window_extent(renderer).overlaps(box):
            problems.append(f"patch {patch.get_label() or type(patch).__name__}")
    for coll in ax.collections:
        if not coll.get_visible():
            continue
        corners = np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x0, box.y1],
                            [box.x1, box.y1], [(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2]])
        for path in coll.get_paths():
            shown = path.transformed(coll.get_transform())
            if (len(shown.vertices) and _inside(box, shown.vertices).any()) or \
                    shown.contains_points(corners).any():
                problems.append(f"filled area {coll.get_label() or type(coll).__name__}")
                break
        offsets = coll.get_offsets()
        if len(offsets) and len(coll.get_paths()) and _inside(
                box, coll.get_offset_transform().transform(offsets)).any():
            problems.append(f"markers {coll.get_label()}")
    for image in ax.images:
        if image.get_window_extent(renderer).overlaps(box):
            problems.append("image")
    return problems


def is_heat_map(image) -> bool:
    """An image of a continuous value. A few-colour map (each colour a category, e.g. the thread
    that touched a cell, named on the cell) is not one and needs no colour bar."""
    cmap = image.get_cmap()
    return not (isinstance(cmap, ListedColormap) and cmap.N <= 16)


def heat_map_problems(fig) -> list[str]:
    problems = []
    images = [im for ax in fig.axes for im in ax.images
              if isinstance(im, AxesImage) and is_heat_map(im)]
    with_bar = [im for im in images if getattr(im, "colorbar", None) is not None]
    for im in images:
        # one colour bar may serve several images drawn on the same scale
        if not any(im.norm.vmin == b.norm.vmin and im.norm.vmax == b.norm.vmax
                   and im.get_cmap().name == b.get_cmap().name for b in with_bar):
            problems.append(f"{im.axes.get_title() or 'an image'}: no colour bar")
        ax = im.axes
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            low, high = sorted(limits)
            locs = np.array([v for v in axis.get_ticklocs() if low <= v <= high])
            if len(locs) and not np.allclose(locs, np.round(locs)):
                problems.append(f"{ax.get_title() or 'an image'}: non-integer ticks {locs}")
    return problems


def repeated_colours(fig) -> list[str]:
    """Pairs of legend entries, anywhere in the figure, with different labels and one colour.
    Grey (``COLOR_REFERENCE``) and white are neutral: entries in them are keys to a line style or
    a hatch (e.g. "reserved" solid, "holding tokens" dashed), so they must differ in style."""
    seen: dict[tuple, str] = {}
    problems = []
    neutral = {to_hex(COLOR_REFERENCE), "#ffffff"}
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            label = text.get_text()
            colour = _handle_colour(handle)
            if colour is None:
                continue
            key = (colour,) if colour not in neutral else (colour, *_handle_style(handle))
            if seen.setdefault(key, label) != label:
                problems.append(f"{seen[key]!r} and {label!r} are both {colour}")
    return problems


def overlapping_ticks(fig) -> list[str]:
    """Pairs of neighbouring tick labels, along one axis of one axes, that overlap. Upright labels,
    and labels whose lines run along their axis (turned 90 degrees on y), overlap when their boxes
    meet; labels turned by another angle are parallel lines of text, which overlap when closer than
    one line height measured across the lines: the ticks' spacing times sin(angle) on the x axis,
    times cos(angle) on the y axis."""
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        for axis, along, across in ((ax.xaxis, 0, np.sin), (ax.yaxis, 1, np.cos)):
            labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            for a, b in zip(labels, labels[1:]):
                factor = abs(across(np.radians(a.get_rotation())))
                if factor < 1e-3 or a.get_rotation() % 180 == 0:
                    clash = a.get_window_extent(renderer).overlaps(b.get_window_extent(renderer))
                else:
                    anchor_a, anchor_b = (t.get_transform().transform(t.get_position())
                                          for t in (a, b))
                    step = abs(anchor_b[along] - anchor_a[along])
                    clash = step * factor < a.get_fontsize() * fig.dpi / 72
                if clash:
                    found.append(f"{a.get_text()!r}/{b.get_text()!r}")
    return found


def _handle_style(handle) -> tuple:
    style = []
    for getter in ("get_hatch", "get_linestyle", "get_marker"):
        value = getattr(handle, getter, lambda: None)()
        style.append(str(value))
    return tuple(style)


def _handle_colour(handle) -> str | None:
    """The colour a legend handle shows: a line's colour, else a patch's or a collection's face."""
    if isinstance(handle, Line2D):
        return to_hex(handle.get_color())
    face = np.atleast_2d(handle.get_facecolor()) if hasattr(handle, "get_facecolor") else ()
    return to_hex(face[0]) if len(face) else None


@pytest.fixture(scope="module")
def dpi():
    return notebook_dpi()


@pytest.mark.parametrize("name", sorted(CASES))
def test_figure_is_readable_in_jupyterlab(name, dpi):
    if name not in public_plot_functions():
        pytest.skip(f"{name} is not a kvlab.plot function in this tree")
    with plt.rc_context({"figure.dpi": dpi}):
        fig = _figure(CASES[name]())
        try:
            width = saved_width_px(fig, dpi)
            scale = min(1.0, SHOWN_WIDTH_PX / width)
            problems = []
            if width > MAX_WIDTH_PX:
                problems.append(f"{width} px wide at {dpi:g} dpi (at most {MAX_WIDTH_PX})")
            small = sorted({(round(t.get_fontsize() * scale, 1), t.get_text()[:30])
                            for t in visible_texts(fig) if t.get_fontsize() * scale < MIN_FONT_PT})
            if small:
                problems.append(f"text below {MIN_FONT_PT} pt as shown: {small[:6]}")
            for ax in fig.axes:
                covered = covered_by_legend(ax)
                if covered:
                    problems.append(f"legend of {ax.get_title()!r} covers {covered[:4]}")
            overlapping = overlapping_ticks(fig)
            if overlapping:
                problems.append(f"tick labels overlap: {overlapping[:4]}")
            problems += heat_map_problems(fig)
            problems += repeated_colours(fig)
            assert not problems, f"{name}: " + "; ".join(problems)
        finally:
            plt.close(fig)


def test_the_checks_catch_what_they_look_for(dpi):
    """A figure that breaks each rule is caught (so a pass above means something)."""
    with plt.rc_context({"figure.dpi": dpi}):
        fig, ax = plt.subplots(figsize=(14, 3))
        ax.plot([0, 1], [0, 1], color="C0", label="a")
        ax.plot([0, 1], [1, 0], color="C0", label="b")
        ax.text(0.5, 0.5, "tiny", fontsize=5)
        ax.legend(loc="center")
        ax.set_xticks(np.linspace(0, 1, 40), [f"partition {j}" for j in range(40)])
        fig2, ax2 = plt.subplots()
        ax2.imshow(np.arange(6).reshape(2, 3) / 5.0)
        ax2.set_xticks([0, 0.5, 1])
        try:
            assert saved_width_px(fig, dpi) > MAX_WIDTH_PX
            assert any(t.get_fontsize() < MIN_FONT_PT for t in visible_texts(fig))
            assert covered_by_legend(ax)
            assert repeated_colours(fig)
            fig.canvas.draw()
            assert overlapping_ticks(fig)
            problems = heat_map_problems(fig2)
            assert any("colour bar" in p for p in problems)
            assert any("non-integer" in p for p in problems)
        finally:
            plt.close(fig)
            plt.close(fig2)


@pytest.mark.parametrize("axis, rotation, ticks, overlap", [
    ("x", 45, 40, True), ("x", 45, 5, False), ("x", 90, 60, True), ("x", 90, 8, False),
    ("y", 30, 40, True), ("y", 30, 5, False), ("y", 0, 40, True), ("y", 0, 5, False),
])
def test_turned_tick_labels_are_measured_across_their_lines(dpi, axis, rotation, ticks, overlap):
    """Turned labels on either axis: crowded ones are caught, spaced ones are not."""
    with plt.rc_context({"figure.dpi": dpi}):
        fig, ax = plt.subplots(figsize=(6, 4))
        set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
        set_ticks(np.linspace(0, 1, ticks), [f"label {j}" for j in range(ticks)], rotation=rotation)
        try:
            fig.canvas.draw()
            assert bool(overlapping_ticks(fig)) == overlap
        finally:
            plt.close(fig)
