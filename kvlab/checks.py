"""Argument checks that every backend's ops call first, so each error reads the same everywhere.

The three backends take different arrays (``numpy.ndarray``, Numba device arrays, ``torch.Tensor``),
so the checks are duck-typed: they read only ``.shape``, ``.dtype`` and, for index arrays, the
values themselves. This module imports NumPy alone (never numba or torch), like ``kvlab.ref``.

Every check runs before an op writes anything: an op that raises leaves every array as it was.
A wrong dtype, or something that is not an array or an int, raises ``TypeError``; a wrong shape or
an out-of-range value raises ``ValueError``. Each message names the argument and what was expected.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any, Sequence

import numpy as np

# Pools hold fp16 (ferrum's KvFp16) or fp32 (handy for teaching). Quantised (int8) pools
# belong to a later stage, whose ops bring checks of their own.
POOL_DTYPES = ("float16", "float32")
INDEX_DTYPE = "int32"  # block tables, slot mappings, positions, context lengths, block ids
MAX_SLOT = 2**31 - 1  # slots are int32: the largest slot id a pool may have


# --- one array at a time ---------------------------------------------------------------------

def dtype_name(x: Any) -> str:
    """The NumPy name of an array's dtype, or of a dtype: ``"float16"`` for ``np.float16``,
    ``np.dtype("float16")``, ``torch.float16`` or any array holding float16."""
    # an array carries a dtype; a dtype (np.dtype, a NumPy scalar type, torch.dtype, a name) is one
    dtype = x if isinstance(x, (np.dtype, type, str)) else getattr(x, "dtype", x)
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable stand-in; never cached
        pass
    text = str(dtype)
    # torch.float16 prints as "torch.float16"
    name = text[len("torch."):] if text.startswith("torch.") else np.dtype(dtype).name
    try:
        _DTYPE_NAMES[dtype] = name
    except TypeError:
        pass
    return name


# dtype -> name, filled on first use: np.dtype(...).name costs microseconds, and one decode step
# checks a dozen arrays (a measured 300 us per paged_decode_attention call before this cache).
_DTYPE_NAMES: dict[Any, str] = {}


def shape_of(x: Any) -> list[int]:
    """An array's shape as a plain list of ints (``torch.Size`` and tuples alike), for messages."""
    return [int(n) for n in x.shape]


def check_array(name: str, x: Any, dims: Sequence[str], shape: Sequence[int | None] | None = None,
                dtypes: Sequence[str] | None = None, matching: str = "") -> None:
    """Check that ``x`` is an array with ``len(dims)`` axes, the given sizes and one of ``dtypes``.

    name: the argument's name, as the caller wrote it (``"k"``).
    dims: the axes' names, e.g. ``("T", "num_kv_heads", "head_dim")``: they give the number of axes
        and the wording of the messages.
    shape: the expected size of each axis, ``None`` where any size will do.
    dtypes: the accepted dtype names (see :func:`dtype_name`).
    matching: what the expectation comes from, e.g. ``"k_pool"``, added to the messages.

    Raises TypeError (not an array, wrong dtype) or ValueError (wrong number of axes or sizes), e.g.
    ``k must have shape [T, num_kv_heads, head_dim] = [5, 2, 64] matching k_pool, got [5, 2, 32]``.
    """
    why = f" matching {matching}" if matching else ""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name} must be an array (NumPy, Numba device or torch), "
                        f"got {type(x).__name__}")
    axes = f"[{', '.join(dims)}]"
    if len(x.shape) != len(dims):
        raise ValueError(f"{name} must be {len(dims)}-D {axes}, got shape {shape_of(x)}")
    if shape is not None:
        expected = [got if want is None else want for want, got in zip(shape, shape_of(x))]
        if expected != shape_of(x):
            raise ValueError(f"{name} must have shape {axes} = {expected}{why}, got {shape_of(x)}")
    if dtypes is not None and dtype_name(x) not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(dtypes)}{why}, got {dtype_name(x)}")


def check_int(name: str, value: Any, minimum: int) -> int:
    """Check that ``value`` is a Python or NumPy integer (not a bool), ``>= minimum``; return it."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int when it is a Python/NumPy integer (not a bool) > 0, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as an int when it is a Python/NumPy integer (not a bool) >= 0, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def is_c_contiguous(x: Any) -> bool:
    """True when ``x``'s elements lie row-major with no gaps (torch's method, else NumPy's flags)."""
    if hasattr(x, "is_contiguous"):
        return bool(x.is_contiguous())
    return bool(x.flags["C_CONTIGUOUS"])


def host_ints(x: Any) -> np.ndarray:
    """An index array's values on the host, as a NumPy int64 array (one copy from the device).

    Index arrays (slots, block tables, lengths, block ids) are small: a few bytes per token or
    block, against kilobytes of K and V per token. Reading them back before a launch is how every
    backend guarantees that no kernel writes or reads outside a pool: a GPU does not bounds-check,
    so an out-of-range slot would silently corrupt another block (or crash much later).
    """
    if hasattr(x, "copy_to_host"):  # a Numba device array (the simulator's FakeCUDAArray too)
        x = x.copy_to_host()
    elif hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64)


def _name_values(values: np.ndarray, limit: int = 5) -> str:
    """A few offending values for a message: ``[40, 41, 99]`` or ``[40, 41, 99, 100, 101, ...]``."""
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _check_in_range(name: str, values: np.ndarray, stop: int, what: str) -> None:
    """ValueError naming the values of ``name`` outside ``[0, stop)``."""
    bad = values[(values < 0) | (values >= stop)]
    if bad.size:
        raise ValueError(f"{name} must be in [0, {stop}) ({what}), got {_name_values(bad)}")


def _check_unique(name: str, values: np.ndarray, what: str) -> None:
    """ValueError naming the values that appear more than once in ``values`` (a sort and one
    comparison of neighbours: faster than ``np.unique`` with counts, which the checks of every
    write pay)."""
    ordered = np.sort(values)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise ValueError(f"{name} must not repeat ({what}), got duplicates "
                         f"{_name_values(np.unique(repeated))}")


# --- the paging stage ------------------------------------------------------------------------

POOL_DIMS = ("num_blocks", "block_size", "num_kv_heads", "head_dim")
TOKEN_DIMS = ("T", "num_kv_heads", "head_dim")


def check_pools(k_pool: Any, v_pool: Any) -> tuple[int, int, int, int]:
    """Check a K/V pool pair; return its shape ``(num_blocks, block_size, num_kv_heads, head_dim)``.

    Both pools must be C-contiguous: every backend addresses a slot as a row of the pool seen as
    ``[num_blocks * block_size, num_kv_heads, head_dim]``, a view that only exists without gaps.
    """
    check_array("k_pool", k_pool, POOL_DIMS, dtypes=POOL_DTYPES)
    check_array("v_pool", v_pool, POOL_DIMS, shape=k_pool.shape, dtypes=[dtype_name(k_pool)],
                matching="k_pool")
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        if not is_c_contiguous(pool):
            raise ValueError(f"{name} must be C-contiguous (a slot is a row of the flattened "
                             f"pool); pass a contiguous copy")
    num_blocks, block_size, num_kv_heads, head_dim = shape_of(k_pool)
    if num_blocks * block_size > MAX_SLOT + 1:
        raise ValueError(f"k_pool has {num_blocks} blocks x {block_size} slots, more than int32 "
                         f"slot ids can address ({MAX_SLOT + 1})")
    return num_blocks, block_size, num_kv_heads, head_dim


def check_block_table(block_table: Any) -> None:
    """A block table is int32 ``[max_blocks]`` (one sequence) or ``[num_seqs, max_blocks]``."""
    ndim = len(block_table.shape) if hasattr(block_table, "shape") else None
    if ndim not in (None, 1, 2):
        raise ValueError(f"block_table must be 1-D [max_blocks] or 2-D [num_seqs, max_blocks], "
                         f"got shape {shape_of(block_table)}")
    dims = ("num_seqs", "max_blocks") if ndim == 2 else ("max_blocks",)
    check_array("block_table", block_table, dims, dtypes=[INDEX_DTYPE])


def table_shape(block_table: Any) -> tuple[int, int]:
    """``(num_seqs, max_blocks)`` of a block table; a 1-D table is a table of one row. Every
    backend reshapes a 1-D table to this, so one code path serves one sequence and a batch."""
    if len(block_table.shape) == 1:
        return 1, int(block_table.shape[0])
    num_seqs, max_blocks = shape_of(block_table)
    return num_seqs, max_blocks


def check_slot_mapping(block_table: Any, positions: Any, block_size: Any, seq_ids: Any = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks for ``slot_mapping(block_table, positions, block_size, seq_ids=None)``; returns the
    host copies it checked, int64: the table ``[num_seqs, max_blocks]`` (one row for a 1-D
    table), the positions ``[T]`` and each token's table row ``[T]`` (zeros for a 1-D table).

    A negative position is padding (its slot is -1) and its seq_id is not read. Every other token
    needs a table row (``0 <= seq_id < num_seqs``), a column (``pos // block_size < max_blocks``)
    and a block there (entry ``>= 0``): the table must reach the position.
    """
    check_block_table(block_table)
    check_array("positions", positions, ("T",), dtypes=[INDEX_DTYPE])
    block_size = check_int("block_size", block_size, minimum=1)
    num_tokens = shape_of(positions)[0]
    batched = len(block_table.shape) == 2
    if batched and seq_ids is None:
        raise ValueError("seq_ids (int32 [T]) is required when block_table is 2-D "
                         "[num_seqs, max_blocks]: it names each token's row")
    if not batched and seq_ids is not None:
        raise ValueError("seq_ids must be None when block_table is 1-D (one sequence)")

    num_seqs, max_blocks = table_shape(block_table)
    table = host_ints(block_table).reshape(num_seqs, max_blocks)
    pos = host_ints(positions)
    real = pos >= 0
    rows = np.zeros(num_tokens, dtype=np.int64)
    if batched:
        check_array("seq_ids", seq_ids, ("T",), shape=[num_tokens], dtypes=[INDEX_DTYPE],
                    matching="positions")
        rows = host_ints(seq_ids)
        _check_in_range("seq_ids", rows[real], num_seqs, "rows of block_table")
    columns = pos[real] // block_size
    beyond = columns >= max_blocks
    if beyond.any():
        raise ValueError(f"positions {_name_values(pos[real][beyond])} are beyond the block table: "
                         f"{max_blocks} blocks of {block_size} hold positions < "
                         f"{max_blocks * block_size}")
    entries = table[rows[real], columns]
    unassigned = entries < 0
    if unassigned.any():
        raise ValueError(f"positions {_name_values(pos[real][unassigned])} fall in block_table "
                         f"entries that are -1 (no block allocated there yet)")
    # Slots are int32: a block id whose slots pass 2**31 - 1 would wrap to a negative slot, which
    # write_kv would then skip as padding. Refuse it here, where the block id is still visible.
    too_big = entries > (MAX_SLOT + 1) // block_size - 1  # last slot of the block <= MAX_SLOT
    if too_big.any():
        raise ValueError(f"block_table entries {_name_values(np.unique(entries[too_big]))} times "
                         f"block_size {block_size} overflow an int32 slot (max {MAX_SLOT})")
    return table, pos, rows


def check_slots(slots: Any, num_tokens: int, num_blocks: int, block_size: int) -> None:
    """int32 ``[T]`` slots of a write into ``num_blocks`` blocks of ``block_size``: each in range,
    no two tokens in one slot; negative slots (padding) are skipped and may repeat."""
    check_array("slots", slots, ("T",), dtypes=[INDEX_DTYPE])  # the dtype is slots' own
    check_array("slots", slots, ("T",), shape=[num_tokens], matching="k")  # its length is k's
    written = host_ints(slots)
    written = written[written >= 0]
    _check_in_range("slots", written, num_blocks * block_size,
                    f"{num_blocks} blocks of {block_size} slots; negative = skip")
    _check_unique("slots", written, "each slot holds one token")


def check_write_kv(k: Any, v: Any, k_pool: Any, v_pool: Any, slots: Any) -> None:
    """Checks for ``write_kv(k, v, k_pool, v_pool, slots)``.

    k, v: ``[T, num_kv_heads, head_dim]`` in the pool's dtype; slots: int32 ``[T]``, each
    ``< num_blocks * block_size``; negative slots are skipped, the others must not repeat (two
    tokens in one slot would race on a GPU: which one lands is undefined).
    """
    num_blocks, block_size, num_kv_heads, head_dim = check_pools(k_pool, v_pool)
    pool_dtype = [dtype_name(k_pool)]
    check_array("k", k, TOKEN_DIMS, shape=[None, num_kv_heads, head_dim], dtypes=pool_dtype,
                matching="k_pool")
    check_array("v", v, TOKEN_DIMS, shape=shape_of(k), dtypes=pool_dtype, matching="k")
    check_slots(slots, shape_of(k)[0], num_blocks, block_size)


def check_gather_kv(k_pool: Any, v_pool: Any, block_table: Any,
                    context_len: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checks for ``gather_kv(k_pool, v_pool, block_table, context_len)``; returns the table and
    the context lengths as the checks read them to the host (:func:`check_table_and_lens`).

    One sequence: block_table int32 ``[max_blocks]`` and an int context_len. A batch: block_table
    int32 ``[num_seqs, max_blocks]`` and context_len int32 ``[num_seqs]``. Every block a sequence
    reads (the first ``ceil(context_len / block_size)`` entries of its row) must be a block of the
    pool; entries after them may be -1.
    """
    num_blocks, block_size, _, _ = check_pools(k_pool, v_pool)
    return check_table_and_lens(block_table, context_len, num_blocks, block_size)


def check_table_and_lens(block_table: Any, context_len: Any, num_blocks: int,
                         block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The block table and context lengths of a read (gather, attention) from a pool of
    ``num_blocks`` blocks of ``block_size``. Returns both as read to the host to check them: the
    table int64 ``[num_seqs, max_blocks]`` (one row for a 1-D table) and the lengths int64
    ``[num_seqs]`` (``[context_len]`` for one sequence), so a backend that needs them on the host
    does not read them back again."""
    check_block_table(block_table)
    if len(block_table.shape) == 1:
        context_lens = np.array([check_int("context_len", context_len, minimum=0)])
    else:
        if not hasattr(context_len, "shape"):
            raise TypeError(f"context_len must be an int32 array [num_seqs] when block_table is "
                            f"2-D, got {type(context_len).__name__}")
        check_array("context_len", context_len, ("num_seqs",), shape=shape_of(block_table)[:1],
                    dtypes=[INDEX_DTYPE], matching="block_table")
        context_lens = host_ints(context_len)
    table = host_ints(block_table).reshape(table_shape(block_table))
    capacity = table.shape[1] * block_size
    blocks_read = -(-context_lens // block_size)  # ceil: a partly filled last block is read too
    # Whole-array tests, so a batch of hundreds of sequences costs what one does; the loop below
    # runs only to name the first bad sequence.
    read = np.arange(table.shape[1]) < blocks_read[:, None]          # [num_seqs, max_blocks]
    bad_len = (context_lens < 0) | (context_lens > capacity)
    bad_entry = (read & ((table < 0) | (table >= num_blocks))).any(axis=1)
    for seq in np.flatnonzero(bad_len | bad_entry)[:1]:
        length = context_lens[seq]
        where = "context_len" if len(block_table.shape) == 1 else f"context_len[{seq}]"
        if bad_len[seq]:
            raise ValueError(f"{where} must be in [0, {capacity}] ({table.shape[1]} blocks of "
                             f"{block_size} in the block table), got {length}")
        _check_in_range(f"block_table entries read by {where}={length}",
                        table[seq, :blocks_read[seq]], num_blocks, "blocks of the pool")
    return table, context_lens


def check_copy_blocks(k_pool: Any, v_pool: Any, src: Any, dst: Any) -> None:
    """Checks for ``copy_blocks(k_pool, v_pool, src, dst)``: src, dst int32 ``[N]`` block ids in
    range; dst unique (one source per block) and disjoint from src (so the copies may run in any
    order, all at once, and read no block that is being written)."""
    num_blocks, _, _, _ = check_pools(k_pool, v_pool)
    check_block_copies(src, dst, num_blocks)


def check_block_copies(src: Any, dst: Any, num_blocks: int) -> None:
    """src, dst of a block copy in a pool of ``num_blocks`` (see :func:`check_copy_blocks`)."""
    check_array("src", src, ("N",), dtypes=[INDEX_DTYPE])
    check_array("dst", dst, ("N",), shape=shape_of(src), dtypes=[INDEX_DTYPE], matching="src")
    sources, targets = host_ints(src), host_ints(dst)
    _check_in_range("src", sources, num_blocks, "blocks of the pool")
    _check_in_range("dst", targets, num_blocks, "blocks of the pool")
    _check_unique("dst", targets, "each block is written once")
    overlap = np.intersect1d(sources, targets)
    if overlap.size:
        raise ValueError(f"dst must not share blocks with src (a copy would read a block another "
                         f"copy writes), got {_name_values(overlap)} in both")


# --- the RoPE stage --------------------------------------------------------------------------

ROPE_STYLES = ("neox", "gptj")  # rotate-half pairs (i, i + rotary_dim/2); interleaved (2i, 2i+1)
ROPE_X_DTYPES = ("float16", "float32")  # what apply_rope rotates; tables are always float32
ROPE_TABLE_DTYPE = "float32"


def check_rope_tables(max_positions: Any, rotary_dim: Any, theta: Any) -> tuple[int, int, float]:
    """Checks for ``rope_tables(max_positions, rotary_dim, theta, scaling=None)``; returns the
    three as ``(int, int, float)``. ``scaling`` is checked by :mod:`kvlab.ref.rope`, which defines
    what each of its keys means.

    max_positions >= 1; rotary_dim even and >= 2 (RoPE rotates *pairs* of dims); theta a real
    number > 1 (the base; 10000 in the RoPE paper, 500000 for Llama 3, 1e6 for Qwen3).
    """
    max_positions = check_int("max_positions", max_positions, minimum=1)
    rotary_dim = check_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even (RoPE rotates pairs of dims), got {rotary_dim}")
    if isinstance(theta, bool) or not isinstance(theta, (Integral, float, np.floating)):
        raise TypeError(f"theta must be a number, got {type(theta).__name__}")
    if not (np.isfinite(theta) and theta > 1):
        raise ValueError(f"theta must be a finite number > 1 (the RoPE base, e.g. 10000), "
                         f"got {theta}")
    return max_positions, rotary_dim, float(theta)


def check_apply_rope(x: Any, cos: Any, sin: Any, positions: Any, style: Any,
                     rotary_dim: Any) -> int:
    """Checks for ``apply_rope(x, cos, sin, positions, style="neox", rotary_dim=None)``; returns
    rotary_dim (``2 * cos.shape[1]`` when None).

    x: float16 or float32 ``[T, heads, head_dim]``, head_dim even. cos, sin: float32
    ``[max_positions, rotary_dim // 2]``, the same shape. positions: int32 ``[T]``, each in
    ``[0, max_positions)``. style: ``"neox"`` or ``"gptj"``. rotary_dim, when given, must be the
    one the tables were built for (``2 * cos.shape[1]``: the frequencies depend on it) and at most
    head_dim.
    """
    check_array("x", x, ("T", "heads", "head_dim"), dtypes=ROPE_X_DTYPES)
    check_array("cos", cos, ("max_positions", "rotary_dim // 2"), dtypes=[ROPE_TABLE_DTYPE])
    check_array("sin", sin, ("max_positions", "rotary_dim // 2"), shape=shape_of(cos),
                dtypes=[ROPE_TABLE_DTYPE], matching="cos")
    check_array("positions", positions, ("T",), dtypes=[INDEX_DTYPE])
    check_array("positions", positions, ("T",), shape=shape_of(x)[:1], matching="x")
    if not isinstance(style, str) or style not in ROPE_STYLES:
        raise ValueError(f"style must be 'neox' (rotate-half) or 'gptj' (interleaved), "
                         f"got {style!r}")
    max_positions, half = shape_of(cos)
    head_dim = shape_of(x)[2]
    if head_dim % 2:
        raise ValueError(f"x's head_dim must be even (RoPE rotates pairs of dims), got {head_dim}")
    if half == 0:
        raise ValueError("cos and sin must have at least one column (rotary_dim >= 2)")
    if rotary_dim is None:
        rotary_dim = 2 * half
    rotary_dim = check_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even (RoPE rotates pairs of dims), got {rotary_dim}")
    if rotary_dim != 2 * half:
        raise ValueError(f"rotary_dim must match the tables: cos has {half} columns, so it was "
                         f"built for rotary_dim {2 * half}, got {rotary_dim}")
    if rotary_dim > head_dim:
        raise ValueError(f"rotary_dim ({rotary_dim}) must be <= x's head_dim ({head_dim})")
    where = host_ints(positions)
    beyond = where[(where < 0) | (where >= max_positions)]
    if beyond.size:
        raise ValueError(f"positions {_name_values(beyond)} are outside the RoPE table: cos and "
                         f"sin have {max_positions} rows (positions 0..{max_positions - 1})")
    return rotary_dim


# --- the quantization stage ------------------------------------------------------------------

QUANT_DTYPES = ("int8", "fp8_e4m3", "int4")  # kv_dtype names quantize/dequantize take
CACHE_QUANT_DTYPES = ("int8", "fp8_e4m3")     # kv_dtype names the quantized cache ops take
QUANT_INPUT_DTYPES = ("float16", "float32")   # what K and V arrive as
SCALE_DTYPE = "float16"                      # every stored scale (ferrum's KvScales)
SCALE_POOL_DIMS = ("num_blocks", "block_size", "num_kv_heads")


def check_kv_dtype(kv_dtype: Any, allowed: Sequence[str] = QUANT_DTYPES) -> Any:
    """The registered :class:`~kvlab.dtypes.KvDtype` named ``kv_dtype``, if ``allowed`` here."""
    from kvlab.dtypes import get_dtype

    if not isinstance(kv_dtype, str):
        raise TypeError(f"kv_dtype must be a dtype name (str), got {type(kv_dtype).__name__}")
    if kv_dtype not in allowed:
        raise ValueError(f"kv_dtype must be one of {', '.join(allowed)} here, got {kv_dtype!r}")
    return get_dtype(kv_dtype)


def code_dims(kv_dtype: Any, head_dim: int) -> tuple[int, int]:
    """``(bytes of codes, scales)`` per (token, kv_head) vector of ``head_dim`` elements."""
    return head_dim * kv_dtype.bits // 8, kv_dtype.scales_per_vector(head_dim)


def check_quantize(x: Any, kv_dtype: Any, name: str = "x") -> Any:
    """Checks for ``quantize(x, kv_dtype)``: x float16/float32 ``[T, num_kv_heads, head_dim]``
    (int4: head_dim a multiple of its group, 32), called ``name`` in the messages. Returns the
    KvDtype. The *values* of x (finite, small enough for an fp16 scale) are checked by each backend
    on its device: see :func:`raise_for_values`."""
    dt = check_kv_dtype(kv_dtype)
    check_array(name, x, TOKEN_DIMS, dtypes=QUANT_INPUT_DTYPES)
    head_dim = shape_of(x)[2]
    if dt.group_size and head_dim % dt.group_size:
        raise ValueError(f"{name}: head_dim {head_dim} must be a multiple of {dt.name}'s group of "
                         f"{dt.group_size} elements")
    return dt


def check_dequantize(codes: Any, scales: Any, kv_dtype: Any) -> Any:
    """Checks for ``dequantize(codes, scales, kv_dtype)``: codes ``[T, Hkv, bytes per vector]`` in
    the dtype's storage (int8 / uint8), scales float16 ``[T, Hkv]`` (int4: ``[T, Hkv, groups]``)."""
    dt = check_kv_dtype(kv_dtype)
    check_array("codes", codes, ("T", "num_kv_heads", "code_bytes"), dtypes=[dt.storage])
    num_tokens, num_kv_heads, code_bytes = shape_of(codes)
    if dt.group_size:
        groups = code_bytes * 2 // dt.group_size
        if groups * dt.group_size != code_bytes * 2:
            raise ValueError(f"codes: {code_bytes} bytes hold {code_bytes * 2} int4 elements, "
                             f"not a multiple of the group of {dt.group_size}")
        check_array("scales", scales, ("T", "num_kv_heads", "groups"),
                    shape=[num_tokens, num_kv_heads, groups], dtypes=[SCALE_DTYPE],
                    matching="codes")
    else:
        check_array("scales", scales, ("T", "num_kv_heads"), shape=[num_tokens, num_kv_heads],
                    dtypes=[SCALE_DTYPE], matching="codes")
    return dt


def check_quant_pools(k_pool: Any, v_pool: Any, k_scales: Any, v_scales: Any,
                      kv_dtype: Any) -> tuple[Any, tuple[int, int, int, int]]:
    """Check a quantized pool: codes ``[num_blocks, block_size, Hkv, head_dim]`` (int8 for int8,
    uint8 for fp8_e4m3) and fp16 scales ``[num_blocks, block_size, Hkv]``, all C-contiguous.
    Returns ``(KvDtype, (num_blocks, block_size, num_kv_heads, head_dim))``."""
    dt = check_kv_dtype(kv_dtype, CACHE_QUANT_DTYPES)
    check_array("k_pool", k_pool, POOL_DIMS, dtypes=[dt.storage], matching=f"kv_dtype {dt.name}")
    check_array("v_pool", v_pool, POOL_DIMS, shape=k_pool.shape, dtypes=[dt.storage],
                matching="k_pool")
    shape = shape_of(k_pool)
    check_array("k_scales", k_scales, SCALE_POOL_DIMS, shape=shape[:3], dtypes=[SCALE_DTYPE],
                matching="k_pool")
    check_array("v_scales", v_scales, SCALE_POOL_DIMS, shape=shape[:3], dtypes=[SCALE_DTYPE],
                matching="k_pool")
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool), ("k_scales", k_scales),
                       ("v_scales", v_scales)):
        if not is_c_contiguous(pool):
            raise ValueError(f"{name} must be C-contiguous (a slot is a row of the flattened "
                             f"pool); pass a contiguous copy")
    num_blocks, block_size, num_kv_heads, head_dim = shape
    return dt, (num_blocks, block_size, num_kv_heads, head_dim)


def check_write_kv_quant(k: Any, v: Any, k_pool: Any, v_pool: Any, k_scales: Any, v_scales: Any,
                         slots: Any, kv_dtype: Any) -> Any:
    """Checks for ``write_kv_quant``: as :func:`check_write_kv`, but k, v are float16/float32 (they
    are quantized on the way in) and the pools are a quantized pool (:func:`check_quant_pools`)."""
    dt, (num_blocks, block_size, num_kv_heads, head_dim) = check_quant_pools(
        k_pool, v_pool, k_scales, v_scales, kv_dtype)
    check_array("k", k, TOKEN_DIMS, shape=[None, num_kv_heads, head_dim],
                dtypes=QUANT_INPUT_DTYPES, matching="k_pool")
    check_array("v", v, TOKEN_DIMS, shape=shape_of(k), dtypes=[dtype_name(k)], matching="k")
    check_slots(slots, shape_of(k)[0], num_blocks, block_size)
    return dt


def check_gather_kv_quant(k_pool: Any, v_pool: Any, k_scales: Any, v_scales: Any,
                          block_table: Any, context_len: Any,
                          kv_dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checks for ``gather_kv_quant``: a quantized pool, then the table and lengths exactly as
    :func:`check_gather_kv`, whose host copies it returns."""
    _, (num_blocks, block_size, _, _) = check_quant_pools(k_pool, v_pool, k_scales, v_scales,
                                                          kv_dtype)
    return check_table_and_lens(block_table, context_len, num_blocks, block_size)


def check_copy_blocks_quant(k_pool: Any, v_pool: Any, k_scales: Any, v_scales: Any, src: Any,
                            dst: Any, kv_dtype: Any) -> None:
    """Checks for ``copy_blocks_quant``: a quantized pool, then src/dst as :func:`check_copy_blocks`."""
    _, (num_blocks, _, _, _) = check_quant_pools(k_pool, v_pool, k_scales, v_scales, kv_dtype)
    check_block_copies(src, dst, num_blocks)


def raise_for_values(name: str, x: np.ndarray, kv_dtype: Any) -> None:
    """Raise ValueError describing the values of ``x`` (a host copy) that ``kv_dtype`` cannot
    store: NaN, ±inf, or |x| > ``kv_dtype.max_input`` (``qmax * 65504``: the fp16 scale
    ``amax / qmax`` would overflow to inf). Every backend tests ``|x| <= max_input`` on its own
    device (one flag read back) and, only when that fails, copies ``x`` here for the message.
    Quantizing such a vector would otherwise leave NaN or inf in the cache without a word."""
    host = np.asarray(x, dtype=np.float32)
    bad = ~(np.abs(host) <= kv_dtype.max_input)  # NaN compares False, so it is bad too
    where = np.argwhere(bad)
    if not where.size:
        return
    first = tuple(int(i) for i in where[0])
    raise ValueError(f"{name} holds {len(where)} value(s) that {kv_dtype.name} cannot store "
                     f"(NaN, inf, or |x| > {kv_dtype.max_input:g} = {kv_dtype.qmax:g} x 65504, "
                     f"where the fp16 scale overflows); first at [t, head, dim] = {list(first)}: "
                     f"{host[first]}")


# --- the attention stage ---------------------------------------------------------------------

ATTN_Q_DTYPES = ("float16", "float32")  # what queries arrive as; the output is always float32
QUANT_POOL_KV_DTYPES = {"int8": "int8", "uint8": "fp8_e4m3"}  # a quantized pool's storage -> kv_dtype


def check_attention_options(scale: Any, sliding_window: Any, head_dim: int) -> tuple[float, int]:
    """``scale`` (None -> ``1/sqrt(head_dim)``; else a finite number > 0) and ``sliding_window``
    (an int >= 0; 0 = no window). Returns ``(scale as float32-representable float, window)``."""
    if scale is None:
        scale = 1.0 / float(np.sqrt(head_dim))
    elif isinstance(scale, bool) or not isinstance(scale, (Integral, float, np.floating)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 (None = 1/sqrt(head_dim)), "
                         f"got {scale}")
    window = check_int("sliding_window", sliding_window, minimum=0)
    return float(np.float32(scale)), window


def _check_gqa(num_q_heads: int, num_kv_heads: int, q_head_dim: int, kv_head_dim: int,
               kv_name: str) -> None:
    """GQA (docs/design.md): every KV head serves ``num_q_heads // num_kv_heads`` query heads."""
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"q's num_q_heads ({num_q_heads}) must be a multiple of {kv_name}'s "
                         f"num_kv_heads ({num_kv_heads}) (GQA: q head h reads kv head "
                         f"h // (num_q_heads // num_kv_heads))")
    if q_head_dim != kv_head_dim:
        raise ValueError(f"q's head_dim ({q_head_dim}) must equal {kv_name}'s head_dim "
                         f"({kv_head_dim})")


def check_decode_attention(q: Any, k: Any, v: Any, scale: Any, causal: Any,
                           sliding_window: Any) -> tuple[float, int]:
    """Checks for ``decode_attention(q, k, v, scale=None, causal=True, sliding_window=0)``.

    q: float16/float32 ``[T, num_q_heads, head_dim]``; k, v: float16/float32 ``[L, num_kv_heads,
    head_dim]`` (one dtype), ``T <= L`` (the step's tokens are already in the cache). Returns
    ``(scale, sliding_window)`` as :func:`check_attention_options`.
    """
    check_array("q", q, ("T", "num_q_heads", "head_dim"), dtypes=ATTN_Q_DTYPES)
    check_array("k", k, ("L", "num_kv_heads", "head_dim"), dtypes=POOL_DTYPES)
    check_array("v", v, ("L", "num_kv_heads", "head_dim"), shape=shape_of(k),
                dtypes=[dtype_name(k)], matching="k")
    num_tokens, num_q_heads, head_dim = shape_of(q)
    length, num_kv_heads, kv_head_dim = shape_of(k)
    _check_gqa(num_q_heads, num_kv_heads, head_dim, kv_head_dim, "k")
    if num_tokens > length:
        raise ValueError(f"q has {num_tokens} tokens but k holds only {length} positions: the "
                         f"step's tokens must already be in the cache (tokens <= context)")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return check_attention_options(scale, sliding_window, head_dim)


def check_step_indices(block_tables: Any, context_lens: Any, query_start: Any, num_blocks: int,
                       block_size: int, num_tokens: int | None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The index arrays of a ragged batch step over a pool of ``num_blocks`` blocks of
    ``block_size``: block_tables int32 ``[num_seqs, max_blocks]``, context_lens int32
    ``[num_seqs]`` (every block they read in the pool), query_start int32 ``[num_seqs + 1]`` from 0
    to ``num_tokens`` (None: to wherever it ends), non-decreasing, no sequence with more new
    tokens than its context. Returns the three on the host (int64): table, lengths, starts."""
    if not (hasattr(block_tables, "shape") and len(block_tables.shape) == 2):
        raise ValueError(f"block_tables must be 2-D int32 [num_seqs, max_blocks] (one row per "
                         f"sequence), got "
                         f"{shape_of(block_tables) if hasattr(block_tables, 'shape') else type(block_tables).__name__}")
    table, lens = check_table_and_lens(block_tables, context_lens, num_blocks, block_size)
    num_seqs = len(lens)
    check_array("query_start", query_start, ("num_seqs + 1",), shape=[num_seqs + 1],
                dtypes=[INDEX_DTYPE], matching="block_tables")
    starts = host_ints(query_start)
    if starts[0] != 0 or (num_tokens is not None and starts[-1] != num_tokens):
        end = "" if num_tokens is None else f" and end at q's {num_tokens} tokens"
        raise ValueError(f"query_start must begin at 0{end}, got {starts[0]} .. {starts[-1]}")
    tokens = np.diff(starts)
    if (tokens < 0).any():
        raise ValueError(f"query_start must not decrease, got {_name_values(starts)}")
    over = np.flatnonzero(tokens > lens)
    if over.size:
        s = int(over[0])
        raise ValueError(f"sequence {s} has {tokens[s]} query tokens but context_lens[{s}] = "
                         f"{lens[s]}: the step's tokens must already be in the cache "
                         f"(tokens <= context)")
    return table, lens, starts


def check_paged_decode_attention(q: Any, k_pool: Any, v_pool: Any, block_tables: Any,
                                 context_lens: Any, query_start: Any, scale: Any,
                                 sliding_window: Any, k_scales: Any, v_scales: Any,
                                 num_splits: Any, plan: Any = None
                                 ) -> tuple[str | None, np.ndarray, np.ndarray, float, int,
                                            int | None]:
    """Checks for ``paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens,
    query_start, scale=None, sliding_window=0, k_scales=None, v_scales=None, num_splits=None,
    plan=None)``.

    q: float16/float32 ``[T, num_q_heads, head_dim]``, every sequence's rows one after another.
    Pools: float16/float32 without scales, or int8 (kv_dtype ``int8``) / uint8 (``fp8_e4m3``) with
    fp16 ``k_scales``, ``v_scales`` ``[num_blocks, block_size, num_kv_heads]``.
    block_tables: int32 ``[num_seqs, max_blocks]``; context_lens: int32 ``[num_seqs]`` (each within
    its table, every block read in the pool). query_start: int32 ``[num_seqs + 1]``, 0 first, T
    last, non-decreasing; sequence s's ``query_start[s+1] - query_start[s]`` tokens must be at most
    its context length. num_splits: int >= 1, or None (the backend's choice; returned as None).
    plan: a :class:`~kvlab.step_plan.StepPlan` for this pool whose own arrays the three index
    arguments are; they were checked when it was made, so none is read back
    (:func:`kvlab.step_plan.check_planned`).

    Returns ``(kv_dtype or None, context_lens, query_start, scale, sliding_window, num_splits)``,
    the index arrays on the host (int64).
    """
    check_array("q", q, ("T", "num_q_heads", "head_dim"), dtypes=ATTN_Q_DTYPES)
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales go together: pass both (a quantized pool) or "
                         "neither (a float16/float32 pool)")
    kv_dtype = None
    if k_scales is None:
        pool_dtype = dtype_name(k_pool) if hasattr(k_pool, "dtype") else None
        if pool_dtype in QUANT_POOL_KV_DTYPES:
            raise ValueError(f"k_pool holds {pool_dtype} codes ({QUANT_POOL_KV_DTYPES[pool_dtype]}"
                             f"): pass its k_scales and v_scales")
        num_blocks, block_size, num_kv_heads, head_dim = check_pools(k_pool, v_pool)
    else:
        pool_dtype = dtype_name(k_pool) if hasattr(k_pool, "dtype") else None
        if pool_dtype not in QUANT_POOL_KV_DTYPES:
            raise TypeError(f"k_pool must be int8 (int8 codes) or uint8 (fp8_e4m3 codes) when "
                            f"scales are given, got {pool_dtype}")
        kv_dtype = QUANT_POOL_KV_DTYPES[pool_dtype]
        _, (num_blocks, block_size, num_kv_heads, head_dim) = check_quant_pools(
            k_pool, v_pool, k_scales, v_scales, kv_dtype)
    num_tokens, num_q_heads, q_head_dim = shape_of(q)
    _check_gqa(num_q_heads, num_kv_heads, q_head_dim, head_dim, "k_pool")
    if plan is None:
        _, lens, starts = check_step_indices(block_tables, context_lens, query_start, num_blocks,
                                             block_size, num_tokens)
    else:
        from kvlab.step_plan import check_planned  # (kvlab.step_plan builds on this module)

        plan = check_planned(plan, num_blocks, block_size, num_tokens, "q",
                             block_tables=block_tables, context_lens=context_lens,
                             query_start=query_start)
        lens, starts = plan.host_context_lens, plan.host_query_start
    scale, window = check_attention_options(scale, sliding_window, head_dim)
    if num_splits is None:  # the backend chooses (the CUDA kernels: from the device's SMs)
        return kv_dtype, lens, starts, scale, window, None
    splits = check_int("num_splits", num_splits, minimum=1)
    # Partitions past the longest context are empty: fewer splits give the same partitions (each
    # a single token), so the result is unchanged and no backend launches empty work.
    splits = min(splits, max(1, int(lens.max()) if lens.size else 1))
    return kv_dtype, lens, starts, scale, window, splits


# --- the fused-write stage -------------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402  (this stage's section keeps its own imports)
from numbers import Real  # noqa: E402

QK_MODES = (0, 1, 2, 3)  # 0 copy · 1 RMSNorm + rotate-half · 2 rotate-half · 3 interleaved
QKV_DTYPES = ("float16", "float32")   # the packed projection output; also q_out's dtype
NORM_WEIGHT_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class FusedWriteShape:
    """What :func:`check_fused_write` learned: the sizes every backend's fused write launches with.

    num_tokens, num_q_heads, num_kv_heads, head_dim; rotary_dim (0 for qk_mode 0); kv_dtype
    (a :class:`~kvlab.dtypes.KvDtype` for a quantized cache, else None); query_start and
    pos_offsets on the host (int64 ``[num_seqs + 1]``, ``[num_seqs]``).
    """

    num_tokens: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    kv_dtype: Any
    query_start: np.ndarray
    pos_offsets: np.ndarray


def check_fused_write(qkv: Any, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any, k_pool: Any,
                      v_pool: Any, block_tables: Any, query_start: Any, pos_offsets: Any,
                      num_q_heads: Any, num_kv_heads: Any, eps: Any, qk_mode: Any,
                      k_scales: Any = None, v_scales: Any = None, kv_dtype: Any = None,
                      paged: bool = True, plan: Any = None) -> FusedWriteShape:
    """Checks for ``paged_write_batched`` (and so for ``paged_write`` / ``contig_write``, which
    call it with a one-row table; ``paged=False``: a contiguous cache ``[capacity, Hkv, D]`` seen
    as ``capacity`` blocks of one slot, block_tables unused).

    qkv: float16/float32 ``[T, (num_q_heads + 2 * num_kv_heads) * head_dim]``, C-contiguous;
    head_dim is the pool's. q_norm_w, k_norm_w: ``[head_dim]`` float16/float32 when qk_mode is 1
    (ignored otherwise, may be None). cos, sin: float32 ``[max_positions, rotary_dim // 2]``,
    rotary_dim <= head_dim, when qk_mode is 1..3 (ignored for 0). Pools: an fp16/fp32 pool of
    qkv's dtype (kv_dtype None), or a quantized one (:func:`check_quant_pools`). query_start int32
    ``[num_seqs + 1]`` from 0 to T, non-decreasing; pos_offsets int32 ``[num_seqs]`` >= 0.
    Every new token's position (``pos_offsets[s] + i``) must have a row in the RoPE tables and a
    block in its sequence's table (an entry in ``[0, num_blocks)``), and no two tokens may land
    in one slot. plan: a :class:`~kvlab.step_plan.StepPlan` for this pool whose own arrays
    block_tables, query_start and pos_offsets are; it checked them (the tables and slots) when it
    was made, so none of them is read back.
    """
    # what kind of op: mode, heads, eps
    if isinstance(qk_mode, bool) or not isinstance(qk_mode, Integral) or qk_mode not in QK_MODES:
        raise ValueError(f"qk_mode must be 0 (copy), 1 (RMSNorm + rotate-half RoPE), "
                         f"2 (rotate-half RoPE) or 3 (interleaved RoPE), got {qk_mode!r}")
    num_q_heads = positive_int("num_q_heads", num_q_heads)
    num_kv_heads = positive_int("num_kv_heads", num_kv_heads)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads}): each kv head serves a whole group of q heads")
    if isinstance(eps, bool) or not isinstance(eps, Real) or not 0 <= float(eps) < 1:
        raise ValueError(f"eps must be a float in [0, 1) (RMSNorm's epsilon), got {eps!r}")

    # the cache
    if kv_dtype is None:
        if k_scales is not None or v_scales is not None:
            raise ValueError("k_scales/v_scales are only for a quantized cache: pass kv_dtype "
                             "('int8' or 'fp8_e4m3') too")
        if paged:
            _, block_size, pool_heads, head_dim = check_pools(k_pool, v_pool)
        else:
            check_array("k_cache", k_pool, ("capacity",) + TOKEN_DIMS[1:], dtypes=POOL_DTYPES)
            check_array("v_cache", v_pool, ("capacity",) + TOKEN_DIMS[1:], shape=k_pool.shape,
                        dtypes=[dtype_name(k_pool)], matching="k_cache")
            block_size, pool_heads, head_dim = 1, *shape_of(k_pool)[1:]
        dt = None
    else:
        if not paged:
            for name, arr in (("k_cache", k_pool), ("v_cache", v_pool)):
                check_array(name, arr, ("capacity",) + TOKEN_DIMS[1:])
            for name, arr in (("k_scales", k_scales), ("v_scales", v_scales)):
                check_array(name, arr, ("capacity", "num_kv_heads"))
            k_pool, v_pool = _as_slots(k_pool), _as_slots(v_pool)
            k_scales, v_scales = _as_slots(k_scales), _as_slots(v_scales)
        dt, (_, block_size, pool_heads, head_dim) = check_quant_pools(
            k_pool, v_pool, k_scales, v_scales, kv_dtype)
    num_blocks = shape_of(k_pool)[0]
    cache = "k_pool" if paged else "k_cache"
    if pool_heads != num_kv_heads:
        raise ValueError(f"{cache} has {pool_heads} kv heads, but num_kv_heads is {num_kv_heads}")

    # the packed rows
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    check_array("qkv", qkv, ("T", "(num_q_heads + 2 * num_kv_heads) * head_dim"),
                dtypes=QKV_DTYPES)
    if shape_of(qkv)[1] != width:
        raise ValueError(f"qkv must have {width} columns per token ((num_q_heads {num_q_heads} + "
                         f"2 x num_kv_heads {num_kv_heads}) x head_dim {head_dim}: Q heads, then K, "
                         f"then V), got {shape_of(qkv)[1]}")
    if not is_c_contiguous(qkv):
        raise ValueError("qkv must be C-contiguous (each token's row is read as one run)")
    if dt is None and dtype_name(qkv) != dtype_name(k_pool):
        raise TypeError(f"qkv must have the cache's dtype {dtype_name(k_pool)} (K and V are "
                        f"stored as they arrive), got {dtype_name(qkv)}")
    num_tokens = shape_of(qkv)[0]

    # norm weights and RoPE tables
    if qk_mode == 1:
        for name, w in (("q_norm_w", q_norm_w), ("k_norm_w", k_norm_w)):
            check_array(name, w, ("head_dim",), shape=[head_dim], dtypes=NORM_WEIGHT_DTYPES,
                        matching=cache)
    rotary_dim, max_positions = 0, None
    if qk_mode != 0:
        check_array("cos", cos, ("max_positions", "rotary_dim // 2"), dtypes=[ROPE_TABLE_DTYPE])
        check_array("sin", sin, ("max_positions", "rotary_dim // 2"), shape=shape_of(cos),
                    dtypes=[ROPE_TABLE_DTYPE], matching="cos")
        max_positions, half = shape_of(cos)
        rotary_dim = 2 * half
        if head_dim % 2 or not 2 <= rotary_dim <= head_dim:
            raise ValueError(f"cos/sin have {half} columns (rotary_dim {rotary_dim}); RoPE needs "
                             f"an even head_dim and 2 <= rotary_dim <= head_dim ({head_dim})")
        for name, t in (("cos", cos), ("sin", sin)):
            if not is_c_contiguous(t):
                raise ValueError(f"{name} must be C-contiguous")

    # where the tokens go
    if plan is not None:
        from kvlab.step_plan import check_planned  # (kvlab.step_plan builds on this module)

        if not paged:
            raise ValueError("a plan is for a paged pool, not a contiguous cache")
        plan = check_planned(plan, num_blocks, block_size, num_tokens, "qkv",
                             block_tables=block_tables, query_start=query_start,
                             pos_offsets=pos_offsets)
        starts, offsets = plan.host_query_start, plan.host_pos_offsets
        num_seqs = len(offsets)
    else:
        check_array("query_start", query_start, ("num_seqs + 1",), dtypes=[INDEX_DTYPE])
        starts = host_ints(query_start)
        num_seqs = len(starts) - 1
        if num_seqs < 1 or starts[0] != 0 or starts[-1] != num_tokens or \
                (np.diff(starts) < 0).any():
            raise ValueError(f"query_start must run from 0 to T = {num_tokens} without "
                             f"decreasing (sequence s owns rows query_start[s]:query_start[s+1]), "
                             f"got {_name_values(starts, 8)}")
        check_array("pos_offsets", pos_offsets, ("num_seqs",), shape=[num_seqs],
                    dtypes=[INDEX_DTYPE], matching="query_start")
        offsets = host_ints(pos_offsets)
        if (offsets < 0).any():
            raise ValueError(f"pos_offsets must be >= 0 (each sequence's cache length before this "
                             f"step), got {_name_values(offsets)}")
    seq_of, positions = new_token_positions(starts, offsets)
    if max_positions is not None and num_tokens and positions.max() >= max_positions:
        raise ValueError(f"positions up to {positions.max()} are outside the RoPE table: cos and "
                         f"sin have {max_positions} rows")
    if plan is None:  # (a plan checked every new token's block and slot when it was made)
        if paged:
            check_block_table(block_tables)
            if len(block_tables.shape) != 2 or shape_of(block_tables)[0] != num_seqs:
                raise ValueError(f"block_tables must be 2-D [num_seqs, max_blocks] with num_seqs "
                                 f"= {num_seqs} rows (one per query_start segment), got shape "
                                 f"{shape_of(block_tables)}")
            check_new_slots(host_ints(block_tables), positions, seq_of, num_blocks, block_size,
                            cache)
        elif num_tokens and positions.max() >= num_blocks:
            raise ValueError(f"positions up to {positions.max()} do not fit k_cache's capacity "
                             f"{num_blocks}")
        else:
            _check_unique("slots", positions, "each slot holds one token")
    return FusedWriteShape(num_tokens, num_q_heads, num_kv_heads, head_dim, rotary_dim, dt,
                           starts, offsets)


def new_token_positions(starts: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each new token's sequence and position, int64 ``[T]``: token ``starts[s] + i`` of sequence
    s sits at ``offsets[s] + i`` (host arrays: query starts ``[num_seqs + 1]``, pos_offsets
    ``[num_seqs]``)."""
    seq_of = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    return seq_of, offsets[seq_of] + np.arange(len(seq_of)) - starts[seq_of]


def check_new_slots(table: np.ndarray, positions: np.ndarray, seq_of: np.ndarray,
                    num_blocks: int, block_size: int, cache: str = "k_pool") -> np.ndarray:
    """The slots of a step's new tokens: token t of sequence ``seq_of[t]`` at ``positions[t]``
    through the host ``table`` ``[num_seqs, max_blocks]``. ValueError unless every token has a
    block of the pool (an entry in ``[0, num_blocks)``) and no two share a slot. Returns the
    slots (int64 ``[T]``)."""
    columns = positions // block_size
    short = columns >= table.shape[1]
    if short.any():
        raise ValueError(f"the block table is too short: positions "
                         f"{_name_values(positions[short])} need block column "
                         f"{int(columns[short].max())}, but a row has {table.shape[1]} "
                         f"entries ({table.shape[1] * block_size} positions)")
    entries = table[seq_of, columns]
    _check_in_range("block table entries", entries, num_blocks,
                    f"blocks of {cache}; -1 = no block allocated yet")
    slots = entries * block_size + positions % block_size
    _check_unique("slots", slots, "each slot holds one token")
    return slots


def _as_slots(cache: Any) -> Any:
    """A contiguous cache ``[capacity, ...]`` as ``capacity`` blocks of one slot (a view)."""
    return cache.reshape(cache.shape[0], 1, *cache.shape[1:])
