"""Figures of notebooks/06_capstone: the paged pool under continuous batching (kvlab.generate)."""
from __future__ import annotations

from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kvlab.plot.style import COLOR_FREE, OKABE_ITO


def plot_pool_timeline(result: Any, ax: Axes | None = None) -> Figure:
    """The pool's blocks step by step (used / prefix-cached / free, stacked) above each request's
    lifetime, for a :class:`kvlab.generate.ServeResult`. Step ``s`` is drawn from ``s`` to
    ``s + 1``: the pool as that step left it, the last step included. Returns the figure."""
    import matplotlib.pyplot as plt  # only when a new figure is needed: the caller picks the backend

    if ax is None:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    else:
        fig, ax2 = ax.figure, None
    timeline = list(result.timeline)
    # each record holds from its step to the next; repeat the last one so its step has a width
    steps = [t.step for t in timeline] + [timeline[-1].step + 1]
    timeline.append(timeline[-1])
    ax.stackplot(steps, [t.used for t in timeline], [t.cached for t in timeline],
                 [t.free for t in timeline], labels=["used", "cached (prefix, evictable)", "free"],
                 colors=[OKABE_ITO["vermillion"], OKABE_ITO["orange"], COLOR_FREE], step="post")
    ax.set_ylabel(f"blocks of {result.block_size} tokens")
    ax.set_ylim(0, result.num_blocks)
    ax.set_xlim(steps[0], steps[-1])
    ax.set_title(f"continuous batching: a {result.num_blocks}-block pool "
                 f"({result.num_blocks * result.bytes_per_block / 1024:.0f} KiB), step by step",
                 pad=22)  # room for the legend, which sits above the plot: inside, it would
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False,  # cover it
              fontsize=9, borderaxespad=0.2)
    if ax2 is not None:
        rids = list(result.outputs)
        for row, rid in enumerate(rids):
            alive = [(t.step, t.blocks.get(rid, 0)) for t in result.timeline
                     if rid in t.running]
            if not alive:
                continue
            first, last = alive[0][0], alive[-1][0]
            # one colour for every request (each is named on its bar): the pool's colours above
            # mean block states, and a request drawn in one of them would read as that state
            ax2.barh(row, last - first + 1, left=first, color=OKABE_ITO["sky_blue"], alpha=0.7)
            hit = result.prefix_hits.get(rid, 0)
            ax2.text(first + 0.1, row, f"{rid}" + (f" (reused {hit} tok)" if hit else ""),
                     va="center", fontsize=8)
        ax2.set_yticks([])
        ax2.set_xlabel("step")
        ax2.set_ylabel("requests")
        ax2.invert_yaxis()
    fig.tight_layout()
    return fig
