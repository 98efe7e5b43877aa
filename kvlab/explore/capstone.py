"""Notebook 06's explorer: step through continuous batching and watch the paged pool.

:func:`pool_at_step` is the logic (which requests own how many blocks at a step, how many are
prefix-cached or free, who joined or left); :func:`serving_explorer` draws it under a step slider.
"""
from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from kvlab.explore import Explorer


def pool_at_step(result: Any, step: int) -> dict[str, Any]:
    """The pool after ``step`` of a :class:`kvlab.generate.ServeResult`.

    Returns ``owners``: for each block id, the requests whose block tables hold it (two or more
    when a prefix is shared), ``"cached"`` for a block nobody owns whose K/V the prefix cache
    keeps, or ``()`` when free; the ``used``/``cached``/``free`` counts; the requests that
    ``joined`` and ``finished`` at this step; the ``tokens`` its one batched forward computed.
    """
    if not 0 <= step < len(result.timeline):
        raise ValueError(f"step must be in [0, {len(result.timeline) - 1}], got {step}")
    record = result.timeline[step]
    owners: list[Any] = [()] * result.num_blocks
    for rid in result.outputs:  # the order the requests were given
        for block in record.block_ids.get(rid, ()):
            owners[block] = owners[block] + (rid,)
    for block in record.cached_ids:
        owners[block] = "cached"
    return dict(owners=owners, used=record.used, cached=record.cached, free=record.free,
                joined=record.joined, finished=record.finished, tokens=record.tokens)


def draw_step(result: Any, step: int):
    """The pool's timeline with ``step`` marked, above the pool at that step, block by block."""
    import matplotlib.pyplot as plt

    from kvlab.plot.style import COLOR_FREE, OKABE_ITO, SEQ_COLORS

    # Requests take the sequence colours that do not already mean "used" or "cached".
    request_colors = [c for c in SEQ_COLORS if c not in (OKABE_ITO["vermillion"],
                                                         OKABE_ITO["orange"])]

    state = pool_at_step(result, step)
    fig, (top, pool) = plt.subplots(2, 1, figsize=(9.5, 4.6), layout="constrained",
                                    gridspec_kw={"height_ratios": [3, 1]})
    timeline = result.timeline
    steps = [t.step for t in timeline] + [timeline[-1].step + 1]  # the last step gets its width
    parts = [[getattr(t, part) for t in timeline] + [getattr(timeline[-1], part)]
             for part in ("used", "cached", "free")]
    top.stackplot(steps, *parts, colors=[OKABE_ITO["vermillion"], OKABE_ITO["orange"], COLOR_FREE],
                  step="post")
    top.axvline(step + 0.5, color="black", linewidth=1.5)
    top.set_xlim(0, steps[-1])
    top.set_ylim(0, result.num_blocks)
    top.set_xlabel("step")
    top.set_ylabel("blocks")
    top.set_title("used (vermillion) · prefix-cached (orange) · free (grey); the line is this step")

    order = list(result.outputs)
    for block, owner in enumerate(state["owners"]):
        if owner == "cached":
            colour, label = OKABE_ITO["orange"], "c"
        elif owner:
            colour = request_colors[order.index(owner[0]) % len(request_colors)]
            label = "\n".join(map(str, owner))
        else:
            colour, label = COLOR_FREE, ""
        pool.add_patch(plt.Rectangle((block, 0), 0.92, 1, color=colour))
        pool.text(block + 0.46, 0.5, label, ha="center", va="center", fontsize=8)
    pool.set_xlim(0, result.num_blocks)
    pool.set_ylim(0, 1)
    pool.set_yticks([])
    pool.set_xlabel("block id (letters: the requests holding it; c: cached, nobody owns it)")
    events = [f"joined {', '.join(map(str, state['joined']))}" if state["joined"] else "",
              f"finished {', '.join(map(str, state['finished']))}" if state["finished"] else ""]
    pool.set_title(f"step {step}: one forward computed {state['tokens']} tokens   "
                   + "   ".join(e for e in events if e), fontsize=10)
    return fig


def serving_explorer(result: Any, step: int = 0) -> Explorer:
    """A step slider over ``result``'s timeline (a :class:`kvlab.generate.ServeResult`)."""
    slider = widgets.IntSlider(value=step, min=0, max=len(result.timeline) - 1,
                               description="step", continuous_update=False)
    return Explorer(lambda step: draw_step(result, step), {"step": slider},
                    "Move the step: requests join, grow block by block, leave; shared prefixes "
                    "stay cached.")
