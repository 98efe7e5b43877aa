"""The look every kvlab figure shares: the palette, the colour of each dtype / sequence / policy,
and the two axes helpers every plotting function uses (see :mod:`kvlab.plot` for the rules)."""
from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.container import BarContainer

from kvlab.memory import GIB

# Okabe & Ito (2008), "Color Universal Design": eight colours distinguishable by most readers.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}

# One colour per KV dtype, the same in every figure (later stages register fp8 and int4).
DTYPE_COLORS = {
    "fp16": OKABE_ITO["blue"],
    "int8": OKABE_ITO["orange"],
    "fp8_e4m3": OKABE_ITO["bluish_green"],
    "fp8_e5m2": OKABE_ITO["sky_blue"],
    "int4": OKABE_ITO["reddish_purple"],
}
_SPARE_COLORS = (OKABE_ITO["vermillion"], OKABE_ITO["yellow"], OKABE_ITO["black"])

# Roles that recur across figures.
COLOR_WITHOUT_CACHE = OKABE_ITO["vermillion"]
COLOR_WITH_CACHE = OKABE_ITO["bluish_green"]
COLOR_REFERENCE = "#6E6E6E"  # grey: reference lines and "does not fit" notes


def dtype_color(name: str, index: int = 0) -> str:
    """The colour of KV dtype ``name``; an unlisted dtype gets a spare colour by ``index``."""
    return DTYPE_COLORS.get(name, _SPARE_COLORS[index % len(_SPARE_COLORS)])


# One colour per sequence in a block-table figure (black is left out: text sits on these).
SEQ_COLORS = (OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["bluish_green"],
              OKABE_ITO["reddish_purple"], OKABE_ITO["sky_blue"], OKABE_ITO["vermillion"],
              OKABE_ITO["yellow"])
COLOR_FREE = "#DDDDDD"  # light grey: a free block

# One colour per memory policy of kvlab.waste, the same in every waste figure.
POLICY_COLORS = {
    "contiguous-max": OKABE_ITO["vermillion"],
    "contiguous-pow2": OKABE_ITO["orange"],
    "contiguous-oracle": OKABE_ITO["reddish_purple"],
    "paged-256": OKABE_ITO["sky_blue"],
    "paged-16": OKABE_ITO["bluish_green"],
    "paged-1": OKABE_ITO["blue"],
    "paged-16-shared": OKABE_ITO["black"],
}
_POLICY_SPARE = (OKABE_ITO["yellow"], COLOR_REFERENCE, OKABE_ITO["black"])

def seq_color(index: int) -> str:
    """The colour of sequence ``index`` in a block-table figure (cycles after seven)."""
    return SEQ_COLORS[index % len(SEQ_COLORS)]


def policy_color(name: str, index: int = 0) -> str:
    """The colour of a :mod:`kvlab.waste` policy; an unlisted one gets a spare by ``index``."""
    return POLICY_COLORS.get(name, _POLICY_SPARE[index % len(_POLICY_SPARE)])


def bytes_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((GIB, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if largest >= scale:
            return scale, unit
    return 1, "B"



def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        if not isinstance(ax, Axes):
            raise ValueError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
        return ax
    import matplotlib.pyplot as plt  # only when a new figure is needed: the caller picks the backend

    _, new_ax = plt.subplots(figsize=figsize, layout="constrained")
    return new_ax


def legend_below(ax: Axes, **kwargs) -> None:
    """A one-row legend under the x label, where it cannot cover a bar or a value label."""
    handles, labels = ax.get_legend_handles_labels()
    # bars (the data) first, reference lines after
    order = sorted(range(len(handles)), key=lambda i: not isinstance(handles[i], BarContainer))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
              bbox_to_anchor=(0.5, -0.1), ncols=len(handles), frameon=False, **kwargs)
