"""How much memory a KV cache needs, and how much of it a serving engine wastes.

Every figure here is exact arithmetic on a :class:`~kvlab.shapes.ModelShape` and a
:class:`~kvlab.dtypes.KvDtype`; nothing is estimated except where a docstring says so.

One token of one layer stores a K vector and a V vector for each KV head::

    bytes_per_token_per_layer = 2 * kv_heads_per_rank * dtype.bytes_per_vector(head_dim)

Tensor parallelism (TP) splits the KV heads across ranks. When TP exceeds the number of KV heads,
each rank still needs one whole head, so heads are *replicated* (vLLM does the same): Llama-3.1-70B
has 8 KV heads, so at TP 16 every head is stored twice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from numbers import Real
from typing import Sequence

from kvlab.checks import positive_int
from kvlab.dtypes import KvDtype, get_dtype
from kvlab.shapes import ModelShape, get_model

GIB = 1024**3



def _as_model(model: ModelShape | str) -> ModelShape:
    return get_model(model) if isinstance(model, str) else model


def _as_dtype(dtype: KvDtype | str) -> KvDtype:
    return get_dtype(dtype) if isinstance(dtype, str) else dtype


def kv_heads_per_rank(model: ModelShape | str, tp: int = 1) -> int:
    """KV heads each of ``tp`` ranks stores: ``num_kv_heads / tp``, or 1 (replicated) when tp is larger.

    Raises ValueError when the heads cannot be split evenly (tp must divide num_kv_heads, or be a
    multiple of it).
    """
    model, tp = _as_model(model), positive_int("tp", tp)
    heads = model.num_kv_heads
    if tp <= heads:
        if heads % tp:
            raise ValueError(f"tp={tp} must divide {model.name}'s num_kv_heads={heads}")
        return heads // tp
    if tp % heads:
        raise ValueError(f"tp={tp} > num_kv_heads={heads} must be a multiple of it ({model.name})")
    return 1


def kv_replication(model: ModelShape | str, tp: int = 1) -> int:
    """How many ranks hold a copy of each KV head (1 unless tp > num_kv_heads)."""
    model = _as_model(model)
    return tp * kv_heads_per_rank(model, tp) // model.num_kv_heads


def bytes_per_token_per_layer(model: ModelShape | str, dtype: KvDtype | str, tp: int = 1) -> int:
    """K + V bytes one token costs in one layer on one rank, scales included."""
    model, dtype = _as_model(model), _as_dtype(dtype)
    return 2 * kv_heads_per_rank(model, tp) * dtype.bytes_per_vector(model.head_dim)


def bytes_per_token(model: ModelShape | str, dtype: KvDtype | str, tp: int = 1) -> int:
    """K + V bytes one token costs across all layers on one rank (sliding-window layers included:
    while a sequence is shorter than the window, every layer keeps every token)."""
    model = _as_model(model)
    return model.num_layers * bytes_per_token_per_layer(model, dtype, tp)


def _slots_held(seq_len: int, window: int, block_size: int) -> int:
    """Token slots one layer holds for a sequence of ``seq_len``: the tokens it keeps (all, or the
    last ``window``), rounded out to the whole blocks they touch. A window that does not start on a
    block boundary touches one block more than ``ceil(window / block_size)``."""
    first = max(0, seq_len - window) if window else 0
    if block_size == 1:
        return seq_len - first
    return (((seq_len - 1) // block_size) - (first // block_size) + 1) * block_size


def kv_bytes_for_sequence(
    model: ModelShape | str, dtype: KvDtype | str, seq_len: int, tp: int = 1, block_size: int = 1
) -> int:
    """Bytes one sequence of ``seq_len`` tokens holds on one rank, across all layers.

    Full-attention layers keep every token; sliding-window layers keep the last ``sliding_window``
    (and, paged, only the blocks those touch: an engine frees blocks that slide out of the window).
    With ``block_size > 1`` each layer holds whole blocks of ``block_size`` token slots.
    """
    model, seq_len = _as_model(model), positive_int("seq_len", seq_len)
    block_size = positive_int("block_size", block_size)
    per_layer = bytes_per_token_per_layer(model, dtype, tp)
    num_full = model.num_layers - model.num_sliding_layers
    full = _slots_held(seq_len, 0, block_size)
    sliding = _slots_held(seq_len, model.sliding_window, block_size) if model.sliding_window else 0
    return per_layer * (num_full * full + model.num_sliding_layers * sliding)


def tokens_that_fit(
    model: ModelShape | str,
    dtype: KvDtype | str,
    memory_bytes: Real,
    tp: int = 1,
    utilization: float = 0.9,
) -> int:
    """Tokens of KV cache that fit on each rank after the weights.

    ``budget = memory_bytes * utilization - weight_bytes / tp``, the way vLLM sizes its pool
    (``gpu_memory_utilization``, default 0.9), then ``budget // bytes_per_token``. The weights are
    taken as split evenly across ranks. vLLM also takes the peak activation memory of a profiling
    run (and CUDA graphs, the non-torch allocations) out of the same ``utilization`` share, so this
    is an upper bound on the tokens an engine really gets. Every layer is charged for every token, as an engine that gives all
    layers one pool must; sliding-window layers make a long single sequence cheaper than this.
    Returns 0 when the weights alone do not fit.
    """
    model, dtype = _as_model(model), _as_dtype(dtype)
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, Real) or memory_bytes <= 0:
        raise ValueError(f"memory_bytes must be a positive number, got {memory_bytes!r}")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization!r}")
    budget = memory_bytes * utilization - model.weight_bytes / positive_int("tp", tp)
    return max(0, int(budget // bytes_per_token(model, dtype, tp)))


@dataclass(frozen=True)
class Reservation:
    """KV bytes a batch holds under two policies, and the bytes its tokens actually fill."""

    used_bytes: int         # the tokens themselves, no rounding
    contiguous_bytes: int   # every sequence reserves max_len up front
    paged_bytes: int        # every sequence holds whole blocks of block_size tokens

    @property
    def contiguous_utilization(self) -> float:
        return self.used_bytes / self.contiguous_bytes

    @property
    def paged_utilization(self) -> float:
        return self.used_bytes / self.paged_bytes


def reservation(
    model: ModelShape | str,
    dtype: KvDtype | str,
    seq_lens: Sequence[int],
    max_len: int,
    block_size: int = 16,
    tp: int = 1,
) -> Reservation:
    """Compare max-length contiguous reservation with paging for a batch of ``seq_lens``."""
    model = _as_model(model)
    max_len = positive_int("max_len", max_len)
    if max_len > model.max_positions:
        raise ValueError(f"max_len {max_len} exceeds {model.name}'s max_positions {model.max_positions}")
    if len(seq_lens) == 0:
        raise ValueError("seq_lens must name at least one sequence")
    for n in seq_lens:
        if positive_int("every seq_len", n) > max_len:
            raise ValueError(f"seq_len {n} exceeds max_len {max_len}")
    per_seq = lambda n, bs=1: kv_bytes_for_sequence(model, dtype, n, tp, bs)  # noqa: E731
    return Reservation(
        used_bytes=sum(per_seq(n) for n in seq_lens),
        contiguous_bytes=len(seq_lens) * per_seq(max_len),
        paged_bytes=sum(per_seq(n, block_size) for n in seq_lens),
    )


@dataclass(frozen=True)
class PlanRow:
    """One row of ``python -m kvlab plan``: one model × one KV dtype on one rank."""

    model: str
    dtype: str
    tp: int
    kv_heads_per_rank: int
    kv_replication: int
    bytes_per_token_per_layer: int
    bytes_per_token: int
    weight_bytes_per_rank: float
    tokens_that_fit: int
    max_len_sequences_that_fit: int
    reservation: dict


def plan(
    model: ModelShape | str,
    dtypes: Sequence[str],
    memory_bytes: Real,
    tp: int = 1,
    utilization: float = 0.9,
    seq_lens: Sequence[int] = (),
    max_len: int | None = None,
    block_size: int = 16,
) -> list[PlanRow]:
    """The planner's rows: bytes per token, tokens that fit, and (given seq_lens) reservation waste.

    ``max_len_sequences_that_fit`` is ``tokens_that_fit // max_len``: the same one-pool model as
    :func:`tokens_that_fit`, where every layer is charged for every token.
    """
    model = _as_model(model)
    max_len = model.max_positions if max_len is None else max_len
    rows = []
    for name in dtypes:
        fit = tokens_that_fit(model, name, memory_bytes, tp, utilization)
        res = reservation(model, name, seq_lens, max_len, block_size, tp) if seq_lens else None
        rows.append(
            PlanRow(
                model=model.name,
                dtype=name,
                tp=tp,
                kv_heads_per_rank=kv_heads_per_rank(model, tp),
                kv_replication=kv_replication(model, tp),
                bytes_per_token_per_layer=bytes_per_token_per_layer(model, name, tp),
                bytes_per_token=bytes_per_token(model, name, tp),
                weight_bytes_per_rank=model.weight_bytes / tp,
                tokens_that_fit=fit,
                max_len_sequences_that_fit=fit // max_len,
                reservation={} if res is None else {
                    **asdict(res),
                    "contiguous_utilization": res.contiguous_utilization,
                    "paged_utilization": res.paged_utilization,
                },
            )
        )
    return rows
