"""Every figure the kvlab notebooks draw lives here, one module per stage.

The rules every function in this module keeps, so that the course's figures look alike and can be
tested without a screen:

- A function takes *data* (model names or :class:`~kvlab.shapes.ModelShape`, dtype names, plain
  arrays of numbers), never a backend or a cache object, and computes nothing a notebook should
  see being computed.
- It draws on the Matplotlib ``Axes`` it is given (``ax=``), or on a new figure when ``ax`` is
  ``None``, and returns that ``Axes`` (or the ``Figure`` when it draws several panels).
- No global state: no ``rcParams`` or style changes, no ``plt.show()``. Colours come from the
  constants below (the Okabe-Ito palette, readable with the common forms of colour blindness),
  and a KV dtype keeps the same colour in every figure of the course.
- Bad input raises ``ValueError`` with a message that names the problem.

``import kvlab`` does not import Matplotlib; only ``import kvlab.plot`` does. Modules:
:mod:`~kvlab.plot.style` (palette and axes helpers), :mod:`~kvlab.plot.tour` (00),
:mod:`~kvlab.plot.paging` (01), :mod:`~kvlab.plot.quant` (02), :mod:`~kvlab.plot.rope` (03),
:mod:`~kvlab.plot.fused_write` (04), :mod:`~kvlab.plot.attention` (05),
:mod:`~kvlab.plot.capstone` (06) and :mod:`~kvlab.plot.perf` (07), re-exported here; and
:mod:`~kvlab.plot.trace`, the pictures of a traced kernel launch (:mod:`kvlab.trace`).
"""
from kvlab.plot.attention import (
    H100_SXM_NOMINAL, lane_map, plot_lane_map, plot_roofline, plot_scores_over_table, plot_split_k,
)
from kvlab.plot.perf import (
    NOMINAL_HBM_BYTES_PER_S, decode_flops, plot_ceilings, plot_kernel_versions, plot_ladder,
    plot_measured_roofline, version_color,
)
from kvlab.plot.fused_write import plot_thread_blocks, plot_write_traffic
from kvlab.plot.capstone import plot_pool_timeline
from kvlab.plot.paging import (
    plot_all_layouts, plot_block_table, plot_layout_addresses, plot_pool_occupancy,
    plot_waste_summary,
)
from kvlab.plot.rope import (
    SCALING_COLORS, plot_pair_layouts, plot_pair_rotation, plot_relative_dot,
    plot_rope_frequencies,
)
from kvlab.plot.quant import (
    plot_channel_magnitudes, plot_error_histograms, plot_memory_vs_error,
)
from kvlab.plot.style import (
    COLOR_FREE, COLOR_REFERENCE, COLOR_WITH_CACHE, COLOR_WITHOUT_CACHE, DTYPE_COLORS, OKABE_ITO,
    POLICY_COLORS, SEQ_COLORS, dtype_color, policy_color, seq_color,
)
from kvlab.plot.tour import plot_bytes_per_token, plot_decode_cost, plot_tokens_that_fit

__all__ = [
    "plot_pool_timeline",
    "COLOR_FREE", "COLOR_REFERENCE", "COLOR_WITH_CACHE", "COLOR_WITHOUT_CACHE", "DTYPE_COLORS",
    "OKABE_ITO", "POLICY_COLORS", "SCALING_COLORS", "SEQ_COLORS", "dtype_color", "plot_all_layouts",
    "plot_block_table", "plot_bytes_per_token", "plot_channel_magnitudes",
    "plot_error_histograms", "plot_memory_vs_error", "plot_decode_cost", "plot_layout_addresses",
    "plot_pool_occupancy", "plot_tokens_that_fit", "plot_waste_summary", "policy_color", "seq_color",
    # 03 rope
    "plot_pair_layouts", "plot_pair_rotation", "plot_relative_dot", "plot_rope_frequencies",
    # 04 fused write
    "plot_thread_blocks", "plot_write_traffic",
    # 05 attention
    "H100_SXM_NOMINAL", "lane_map", "plot_lane_map", "plot_roofline", "plot_scores_over_table",
    "plot_split_k",
    # 07 GPU performance (kvlab.plot.perf)
    "NOMINAL_HBM_BYTES_PER_S", "decode_flops", "plot_ceilings", "plot_kernel_versions", "plot_ladder",
    "plot_measured_roofline", "version_color",
]
