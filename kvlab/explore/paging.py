"""Notebook 01's explorers: the block allocator step by step, and block size against waste.

- :func:`allocator_steps` replays a short script of allocator calls (allocate, append, fork,
  copy-on-write, free) and returns the state after each; :func:`allocator_explorer` draws one
  step at a time under a slider: the block tables, the pool, the reference counts.
- :func:`block_size_waste` runs the serving simulation of :mod:`kvlab.waste` at one block size;
  :func:`block_size_explorer` puts a block-size slider on it: reserved vs used memory over time,
  and the share held by real tokens at every block size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import ipywidgets as widgets
import numpy as np

from kvlab.explore import Explorer
from kvlab.paging import BlockAllocator, blocks_needed
from kvlab.waste import load_trace, simulate

# --- the allocator, step by step ---------------------------------------------------------------

# (operation, sequence, argument): allocate a prompt of n tokens, append n tokens, fork a child
# from a parent, free a sequence. Chosen so that every kind of event happens once on a small pool:
# a block filling up, a new block, a fork, a copy-on-write, a private append, frees, and a freed
# block taken again.
ALLOCATOR_SCRIPT: tuple[tuple[str, str, object], ...] = (
    ("allocate", "a", 6),
    ("append", "a", 1),
    ("fork", "b", "a"),
    ("append", "b", 1),
    ("append", "a", 2),
    ("allocate", "c", 9),
    ("free", "a", None),
    ("free", "b", None),
    ("append", "c", 8),
)


@dataclass(frozen=True)
class AllocatorStep:
    """The allocator after one call of the script.

    event: one sentence saying what the call did and why.
    tables: each live sequence's block list, in the order the sequences were created.
    lens: each live sequence's token count.
    refs: every block's reference count (how many tables list it).
    copies: ``(src, dst)`` block copies the call asked for (copy-on-write).
    new_blocks: blocks the call took from the free list.
    num_free: blocks left on the free list.
    """

    event: str
    tables: dict[str, list[int]]
    lens: dict[str, int]
    refs: tuple[int, ...]
    copies: tuple[tuple[int, int], ...]
    new_blocks: tuple[int, ...]
    num_free: int


def allocator_steps(num_blocks: int = 8, block_size: int = 4,
                    script=ALLOCATOR_SCRIPT) -> list[AllocatorStep]:
    """Run ``script`` on a fresh :class:`~kvlab.paging.BlockAllocator`; the state after each call.

    Raises ValueError for an unknown operation, or one on a sequence that does not exist (or, for
    allocate and fork, one that does).
    """
    allocator = BlockAllocator(num_blocks, block_size)
    tables: dict[str, list[int]] = {}
    lens: dict[str, int] = {}
    steps = []
    for op, seq, arg in script:
        if (op in ("allocate", "fork")) == (seq in tables):
            raise ValueError(f"{op} {seq!r}: sequence {'exists' if seq in tables else 'unknown'}")
        copies, new = [], []
        if op == "allocate":
            new = allocator.allocate(blocks_needed(arg, block_size))
            tables[seq], lens[seq] = list(new), arg
            event = f"{seq}: a {arg}-token prompt takes {len(new)} block(s) {new}"
        elif op == "append":
            growth = allocator.grow(tables[seq], num_tokens=lens[seq], num_new_tokens=arg)
            copies, new = growth.copies, growth.new_blocks
            first, last = lens[seq], lens[seq] + arg - 1
            where = f"position {first}" if arg == 1 else f"positions {first}–{last}"
            event = f"{seq} appends {where}: " + _append_story(copies, new, seq)
            tables[seq], lens[seq] = growth.blocks, lens[seq] + arg
        elif op == "fork":
            tables[seq], lens[seq] = allocator.fork(tables[arg]), lens[arg]
            event = f"{seq} = fork of {arg}: shares its blocks {tables[seq]}, no byte moves"
        elif op == "free":
            blocks = tables.pop(seq)
            del lens[seq]
            allocator.free(reversed(blocks))  # last block first, as kvlab.paging advises
            gone = [b for b in blocks if allocator.ref_count(b) == 0]
            kept = [b for b in blocks if allocator.ref_count(b) > 0]
            event = f"{seq} finishes: " + "; ".join(part for part in (
                f"blocks {gone} go back to the free list" if gone else "",
                f"block(s) {kept}, still shared, just lose a reference" if kept else "") if part)
        else:
            raise ValueError(f"unknown operation {op!r}: use allocate, append, fork or free")
        steps.append(AllocatorStep(
            event=event, tables={s: list(t) for s, t in tables.items()}, lens=dict(lens),
            refs=tuple(allocator.ref_count(b) for b in range(num_blocks)),
            copies=tuple(copies), new_blocks=tuple(new), num_free=allocator.num_free))
    return steps


def _append_story(copies, new_blocks, seq: str) -> str:
    """Why an append did what it did, in words."""
    parts = [f"block {src} is shared, so {seq} gets block {dst}, a copy of it (copy-on-write)"
             for src, dst in copies]
    if new_blocks:
        parts.append(f"crosses into new block(s) {list(new_blocks)}")
    return "; ".join(parts) if parts else "fits in a block it alone owns: nothing to allocate"


def draw_allocator_step(step: int, steps: list[AllocatorStep] | None = None, num_blocks: int = 8,
                        block_size: int = 4):
    """The block tables and the pool after call number ``step`` (counted from 1, as the figure
    and the slider count) of :func:`allocator_steps` (its default script unless ``steps`` is
    given), with what the call did and every block's ref count."""
    import matplotlib.pyplot as plt

    from kvlab.plot import plot_block_table

    steps = allocator_steps(num_blocks, block_size) if steps is None else steps
    if not 1 <= step <= len(steps):
        raise ValueError(f"step must be in [1, {len(steps)}], got {step}")
    state = steps[step - 1]
    names = list(state.tables)
    tables = np.full((len(names), max(len(t) for t in state.tables.values())), -1, np.int32)
    for row, name in zip(tables, names):
        row[:len(state.tables[name])] = state.tables[name]
    # Fixed margins, not a layout engine: it would triple the redraw time.
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    fig.subplots_adjust(left=0.02, right=0.98, top=0.86, bottom=0.1)
    # The pool names a shared block's owners by row (s0, s1, ...): the labels say which is which.
    plot_block_table(tables, [state.lens[n] for n in names], num_blocks, block_size, ax=ax,
                     seq_labels=[f"{name} (s{i})" for i, name in enumerate(names)])
    refs = " ".join(f"#{b}:{r}" for b, r in enumerate(state.refs))
    ax.set_title(f"ref counts  {refs}    ({state.num_free} free)", fontsize=9)
    fig.suptitle(f"step {step} of {len(steps)}: {state.event}", fontsize=10, wrap=True)
    return fig


def allocator_explorer(step: int = 4) -> Explorer:
    """A step slider (1 to the script's length) over :data:`ALLOCATOR_SCRIPT` on an 8-block pool
    of 4-token blocks."""
    steps = allocator_steps()
    slider = widgets.IntSlider(value=step, min=1, max=len(steps), description="step",
                               continuous_update=False)
    return Explorer(lambda step: draw_allocator_step(step, steps), {"step": slider},
                    "Step through allocate, append, fork, copy-on-write and free: watch the "
                    "tables, the pool and the reference counts.")


# --- block size against waste ----------------------------------------------------------------

BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WASTE_TRACE, WASTE_REQUESTS = "sharegpt", 200  # the first 200 requests: enough to fill the pool


@lru_cache(maxsize=None)
def _simulated(block_size: int):
    """The :class:`kvlab.waste.SimResult` of ``paged-<block_size>`` on the explorer's trace
    (cached: a slider position is simulated once)."""
    policy = f"paged-{block_size}"
    trace = load_trace(WASTE_TRACE).head(WASTE_REQUESTS)
    return simulate(trace, [policy], progress=False)[policy]


def block_size_waste(block_size: int) -> dict:
    """What ``block_size`` costs on the explorer's trace (the first :data:`WASTE_REQUESTS`
    requests of ``data/trace_sharegpt.csv``, the 16,384-slot pool of :mod:`kvlab.waste`).

    Returns ``utilization`` (Σ used / Σ reserved slots), ``mean_tail`` (reserved but empty slots
    per running request per step: the unfilled end of each request's last block, about
    ``(block_size - 1) / 2``), ``steps``, ``peak_batch``, ``preemptions`` and the ``result``.
    """
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    result = _simulated(block_size)
    empty = int((result.reserved - result.used).sum())
    return dict(utilization=result.utilization, mean_tail=empty / int(result.running.sum()),
                steps=result.steps, peak_batch=result.peak_batch,
                preemptions=result.preemptions, result=result)


def draw_block_size_waste(block_size: int):
    """Left: reserved vs used slots over the run at ``block_size``. Right: the share of reserved
    slots holding tokens at every block size, this one marked."""
    import matplotlib.pyplot as plt

    from kvlab.plot import plot_pool_occupancy
    from kvlab.plot.style import OKABE_ITO

    state = block_size_waste(block_size)
    result = state["result"]
    fig, (time_ax, size_ax) = plt.subplots(1, 2, figsize=(9.5, 3.8),
                                           gridspec_kw={"width_ratios": [1.6, 1]})
    fig.subplots_adjust(left=0.08, right=0.98, top=0.78, bottom=0.3, wspace=0.3)
    plot_pool_occupancy(None, [result.reserved], [result.used], labels=[result.policy],
                        budget_bytes=result.pool_tokens, ax=time_ax)
    time_ax.set_ylabel("token slots (× 1,024)")  # the helper scales by 1,024 as it does bytes
    time_ax.get_legend().set_bbox_to_anchor((0.5, -0.22))   # below the x label
    time_ax.set_title(f"{result.policy}: {state['steps']:,} steps, up to "
                      f"{state['peak_batch']} requests at once", fontsize=10)
    utilizations = [100 * block_size_waste(b)["utilization"] for b in BLOCK_SIZES]
    size_ax.plot(BLOCK_SIZES, utilizations, marker="o", color=OKABE_ITO["blue"])
    size_ax.plot([block_size], [100 * state["utilization"]], marker="o", markersize=12,
                 markerfacecolor="none", markeredgecolor="black", markeredgewidth=2)
    size_ax.set_xscale("log", base=2)
    size_ax.set_xticks(BLOCK_SIZES, labels=[str(b) for b in BLOCK_SIZES], fontsize=8)
    size_ax.set_xlabel("block size (token slots)")
    size_ax.set_ylabel("reserved slots holding tokens (%)")
    size_ax.grid(alpha=0.3)
    size_ax.set_title("every block size (circle: this one)", fontsize=10)
    fig.suptitle(f"block size {block_size}: {state['utilization']:.1%} of reserved slots hold "
                 f"tokens; a request's last block has {state['mean_tail']:.1f} empty slots on "
                 f"average", fontsize=10)
    return fig


def block_size_explorer(block_size: int = 16) -> Explorer:
    """A block-size slider on the serving simulation of :mod:`kvlab.waste`."""
    slider = widgets.SelectionSlider(options=BLOCK_SIZES, value=block_size,
                                     description="block size", continuous_update=False)
    return Explorer(draw_block_size_waste, {"block_size": slider},
                    "Slide the block size: how much reserved memory holds tokens, and how many "
                    "requests run at once?")
