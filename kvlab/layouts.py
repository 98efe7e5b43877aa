"""The same paged KV pool in four memory layouts, and the block table in FlashInfer's CSR form.

A paged pool holds, for every physical block, ``block_size`` token slots of ``num_kv_heads`` head
vectors of ``head_dim`` elements. Which of those four indices varies fastest in memory is the
*layout*. The values are the same in every layout; only their addresses differ, and with them
which elements a GPU thread can load in one wide, coalesced read.

=========  =====================================================================  ==============
name       shape (one pool: K or V)                                               used by
=========  =====================================================================  ==============
``nhd``    ``[num_blocks, block_size, num_kv_heads, head_dim]``                   kvlab,
                                                                                  FlashInfer "NHD"
``hnd``    ``[num_blocks, num_kv_heads, block_size, head_dim]``                   ferrum's Metal
                                                                                  pools,
                                                                                  FlashInfer "HND"
``vllm_k`` ``[num_blocks, num_kv_heads, head_dim // x, block_size, x]``           vLLM's key cache
``vllm_v`` ``[num_blocks, num_kv_heads, head_dim, block_size]``                   vLLM's value cache
=========  =====================================================================  ==============

``x = 16 // itemsize``: the elements in one 16-byte vector (8 for fp16, 4 for fp32, 16 for int8).
vLLM's original paged-attention kernel splits each key's ``head_dim`` into chunks of ``x`` so a
thread group loads 16 bytes of one key at a time (vLLM docs, "vLLM Paged Attention", which lists
``k_cache [num_blocks, num_kv_heads, head_size/x, block_size, x]`` and ``v_cache [num_blocks,
num_kv_heads, head_size, block_size]``; ``x = 16 // kv_cache.element_size()`` is from vLLM's
``PagedAttention.split_kv_cache``). FlashInfer's two layouts are from its "KV-Cache Layout"
tutorial (docs/tutorials/kv_layout.rst).

Every conversion is a pure permutation of elements: it returns a new C-contiguous array whose
bits equal the input's, so each pair of conversions round-trips exactly (NaN payloads included).
:func:`byte_offset` gives the address an element lands at under each layout, which is what
:func:`kvlab.plot.plot_layout_addresses` draws.

**FlashInfer's page table.** FlashInfer does not take a padded ``[num_seqs, max_blocks]`` table:
it treats the table as a block-sparse matrix in CSR form (the same tutorial, "Page Table
Layout")::

    kv_indptr        int32 [S + 1]   kv_indptr[0] = 0; sequence s owns pages
                                     kv_indices[kv_indptr[s]:kv_indptr[s + 1]]
    kv_indices       int32 [nnz]     the physical page ids, sequences concatenated
    kv_last_page_len int32 [S]       tokens in each sequence's last page, 1 <= len <= page_size

so a sequence's length is ``page_size * (pages - 1) + last_page_len``. FlashInfer requires
``last_page_len > 0``, so every sequence must hold at least one token.

NumPy only, like :mod:`kvlab.ref`. Bad input raises ``ValueError`` naming the argument.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvlab.checks import check_int

LAYOUTS = ("nhd", "hnd", "vllm_k", "vllm_v")

_AXES = {  # the axis names of each layout's array, for messages and pool_shape
    "nhd": ("num_blocks", "block_size", "num_kv_heads", "head_dim"),
    "hnd": ("num_blocks", "num_kv_heads", "block_size", "head_dim"),
    "vllm_k": ("num_blocks", "num_kv_heads", "head_dim // x", "block_size", "x"),
    "vllm_v": ("num_blocks", "num_kv_heads", "head_dim", "block_size"),
}


# --- small checks ----------------------------------------------------------------------------

def _layout(name: Any) -> str:
    if not isinstance(name, str) or name.lower() not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; known layouts: {', '.join(LAYOUTS)}")
    return name.lower()



def _pool(name: str, pool: Any, layout: str) -> np.ndarray:
    if not isinstance(pool, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(pool).__name__}")
    axes = _AXES[layout]
    if pool.ndim != len(axes):
        raise ValueError(f"{name} must be {len(axes)}-D [{', '.join(axes)}] ({layout}), "
                         f"got shape {list(pool.shape)}")
    return pool


def vllm_x(itemsize: int) -> int:
    """Elements per 16-byte vector, vLLM's ``x = 16 // itemsize`` (8 for fp16, 16 for int8)."""
    itemsize = check_int("itemsize", itemsize, 1)
    if 16 % itemsize:
        raise ValueError(f"itemsize must divide 16 (1, 2, 4, 8 or 16 bytes), got {itemsize}")
    return 16 // itemsize


def _check_split(head_dim: int, x: int) -> None:
    if head_dim % x:
        raise ValueError(f"head_dim {head_dim} is not divisible by x = {x} (16 bytes / itemsize): "
                         f"vLLM's key layout splits head_dim into 16-byte chunks")


def pool_shape(layout: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
               itemsize: int = 2) -> tuple[int, ...]:
    """The array shape one pool (K or V) has under ``layout``; ``itemsize`` matters for vllm_k."""
    layout = _layout(layout)
    n, s = check_int("num_blocks", num_blocks, 1), check_int("block_size", block_size, 1)
    h, d = check_int("num_kv_heads", num_kv_heads, 1), check_int("head_dim", head_dim, 1)
    if layout == "nhd":
        return (n, s, h, d)
    if layout == "hnd":
        return (n, h, s, d)
    if layout == "vllm_v":
        return (n, h, d, s)
    x = vllm_x(itemsize)
    _check_split(d, x)
    return (n, h, d // x, s, x)


# --- conversions (all through NHD) -----------------------------------------------------------

def nhd_to_hnd(pool: np.ndarray) -> np.ndarray:
    """``[N, S, H, D]`` → ``[N, H, S, D]``: each head's block becomes one contiguous run."""
    return np.ascontiguousarray(_pool("pool", pool, "nhd").transpose(0, 2, 1, 3))


def hnd_to_nhd(pool: np.ndarray) -> np.ndarray:
    """``[N, H, S, D]`` → ``[N, S, H, D]``."""
    return np.ascontiguousarray(_pool("pool", pool, "hnd").transpose(0, 2, 1, 3))


def nhd_to_vllm_k(k_pool: np.ndarray) -> np.ndarray:
    """``[N, S, H, D]`` → vLLM's key layout ``[N, H, D // x, S, x]``, ``x = 16 // itemsize``.

    Element ``(n, s, h, d)`` goes to ``[n, h, d // x, s, d % x]``: the 16-byte chunk ``d // x``
    of every token in the block lies side by side.
    """
    k_pool = _pool("k_pool", k_pool, "nhd")
    n, s, h, d = k_pool.shape
    x = vllm_x(k_pool.itemsize)
    _check_split(d, x)
    return np.ascontiguousarray(k_pool.reshape(n, s, h, d // x, x).transpose(0, 2, 3, 1, 4))


def vllm_k_to_nhd(k_cache: np.ndarray) -> np.ndarray:
    """vLLM's key layout ``[N, H, D // x, S, x]`` → ``[N, S, H, D]``."""
    k_cache = _pool("k_cache", k_cache, "vllm_k")
    n, h, chunks, s, x = k_cache.shape
    if x != vllm_x(k_cache.itemsize):
        raise ValueError(f"k_cache's last axis must be x = 16 // itemsize = "
                         f"{vllm_x(k_cache.itemsize)} for {k_cache.dtype}, got {x}")
    return np.ascontiguousarray(k_cache.transpose(0, 3, 1, 2, 4)).reshape(n, s, h, chunks * x)


def nhd_to_vllm_v(v_pool: np.ndarray) -> np.ndarray:
    """``[N, S, H, D]`` → vLLM's value layout ``[N, H, D, S]`` (tokens fastest)."""
    return np.ascontiguousarray(_pool("v_pool", v_pool, "nhd").transpose(0, 2, 3, 1))


def vllm_v_to_nhd(v_cache: np.ndarray) -> np.ndarray:
    """vLLM's value layout ``[N, H, D, S]`` → ``[N, S, H, D]``."""
    return np.ascontiguousarray(_pool("v_cache", v_cache, "vllm_v").transpose(0, 3, 1, 2))


def nhd_to_vllm(k_pool: np.ndarray, v_pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both of kvlab's pools → vLLM's ``(key_cache, value_cache)``."""
    if isinstance(k_pool, np.ndarray) and isinstance(v_pool, np.ndarray) and (
            k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype):
        raise ValueError(f"k_pool and v_pool must have the same shape and dtype, got "
                         f"{list(k_pool.shape)} {k_pool.dtype} and "
                         f"{list(v_pool.shape)} {v_pool.dtype}")
    return nhd_to_vllm_k(k_pool), nhd_to_vllm_v(v_pool)


def vllm_to_nhd(k_cache: np.ndarray, v_cache: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's ``(key_cache, value_cache)`` → kvlab's ``(k_pool, v_pool)``."""
    k_pool, v_pool = vllm_k_to_nhd(k_cache), vllm_v_to_nhd(v_cache)
    if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype:
        raise ValueError(f"k_cache and v_cache describe different pools: "
                         f"{list(k_pool.shape)} {k_pool.dtype} vs "
                         f"{list(v_pool.shape)} {v_pool.dtype}")
    return k_pool, v_pool


_TO_NHD = {"nhd": lambda a: np.ascontiguousarray(_pool("pool", a, "nhd")), "hnd": hnd_to_nhd,
           "vllm_k": vllm_k_to_nhd, "vllm_v": vllm_v_to_nhd}
_FROM_NHD = {"nhd": lambda a: a, "hnd": nhd_to_hnd, "vllm_k": nhd_to_vllm_k,
             "vllm_v": nhd_to_vllm_v}


def convert(pool: np.ndarray, src: str, dst: str) -> np.ndarray:
    """One pool from layout ``src`` to layout ``dst`` (any of :data:`LAYOUTS`), as a new array.

    Any pair is allowed, K or V alike: a layout is only an order of addresses.
    ``convert(convert(p, a, b), b, a)`` equals ``p`` bit for bit.
    """
    src, dst = _layout(src), _layout(dst)
    out = _FROM_NHD[dst](_TO_NHD[src](pool))
    return out.copy() if out is pool else out  # nhd → nhd: still a new array


# --- addresses -------------------------------------------------------------------------------

def byte_offset(layout: str, block: Any, slot: Any, head: Any, dim: Any,
                shape: tuple[int, int, int, int], itemsize: int = 2) -> Any:
    """Byte address of element (``block``, token ``slot``, ``head``, ``dim``) from the pool's start.

    ``shape`` is the pool's *logical* shape ``(num_blocks, block_size, num_kv_heads, head_dim)``
    (kvlab's NHD shape), the same for every layout, so one call compares layouts. The indices may
    be ints or integer arrays (broadcast together); the answer is an int or an int64 array::

        nhd     ((block * S + slot) * H + head) * D + dim
        hnd     ((block * H + head) * S + slot) * D + dim
        vllm_k  (((block * H + head) * (D // x) + dim // x) * S + slot) * x + dim % x
        vllm_v  ((block * H + head) * D + dim) * S + slot

    each times ``itemsize``. Equals ``np.ravel_multi_index`` on the converted array, times itemsize.
    """
    layout = _layout(layout)
    if not (isinstance(shape, (tuple, list)) and len(shape) == 4):
        raise ValueError(f"shape must be (num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got {shape!r}")
    n, s, h, d = (check_int(f"shape[{i}] ({a})", v, 1) for i, (a, v) in
                  enumerate(zip(_AXES["nhd"], shape)))
    itemsize = check_int("itemsize", itemsize, 1)
    idx = []
    for name, value, size in (("block", block, n), ("slot", slot, s), ("head", head, h),
                              ("dim", dim, d)):
        arr = np.asarray(value)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be an int or an integer array, got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= size):
            raise ValueError(f"{name} must be in [0, {size}), got {value!r}")
        idx.append(arr.astype(np.int64))
    b, t, hh, dd = idx
    if layout == "nhd":
        elem = ((b * s + t) * h + hh) * d + dd
    elif layout == "hnd":
        elem = ((b * h + hh) * s + t) * d + dd
    elif layout == "vllm_v":
        elem = ((b * h + hh) * d + dd) * s + t
    else:
        x = vllm_x(itemsize)
        _check_split(d, x)
        elem = (((b * h + hh) * (d // x) + dd // x) * s + t) * x + dd % x
    out = elem * itemsize
    return int(out) if out.ndim == 0 else out


# --- block tables and FlashInfer's CSR page table --------------------------------------------

def _int_array(name: str, value: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {list(arr.shape)}")
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def check_block_tables(block_tables: Any, context_lens: Any, block_size: int,
                       num_blocks: int | None = None,
                       min_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Validate a batched block table and its lengths; return them as int64 arrays.

    ``block_tables`` ``[num_seqs, max_blocks]`` (unused entries -1, docs/design.md#conventions), ``context_lens``
    ``[num_seqs]``. Sequence ``s`` uses its first ``ceil(context_lens[s] / block_size)`` entries:
    those must be valid block ids (``< num_blocks`` when given) and distinct within the sequence;
    entries past them are ignored. Raises ValueError naming the first problem.
    """
    block_size = check_int("block_size", block_size, 1)
    tables = _int_array("block_tables", block_tables, 2)
    lens = _int_array("context_lens", context_lens, 1)
    if tables.shape[0] != lens.shape[0]:
        raise ValueError(f"block_tables has {tables.shape[0]} rows but context_lens has "
                         f"{lens.shape[0]} entries: one per sequence")
    if lens.size and lens.min() < min_len:
        s = int(np.argmin(lens))
        raise ValueError(f"context_lens must be >= {min_len}, got {int(lens[s])} for sequence {s}")
    for s, (row, length) in enumerate(zip(tables, lens)):
        used = -(-int(length) // block_size)
        if used > row.size:
            raise ValueError(f"sequence {s} holds {int(length)} tokens = {used} blocks of "
                             f"{block_size}, but block_tables has only {row.size} columns")
        ids = row[:used]
        if ids.size and ids.min() < 0:
            raise ValueError(f"sequence {s}: block_tables[{s}, :{used}] must be block ids >= 0 "
                             f"(its {int(length)} tokens need {used} blocks), got {ids.tolist()}")
        if num_blocks is not None and ids.size and ids.max() >= num_blocks:
            raise ValueError(f"sequence {s}: block id {int(ids.max())} is out of range for a pool "
                             f"of {num_blocks} blocks")
        if np.unique(ids).size != ids.size:
            raise ValueError(f"sequence {s} lists a block twice: {ids.tolist()}")
    return tables, lens


def block_tables_to_flashinfer(block_tables: Any, context_lens: Any,
                               block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kvlab's padded block tables → FlashInfer's ``(kv_indptr, kv_indices, kv_last_page_len)``.

    Example: tables ``[[3, 1, -1], [0, -1, -1]]``, lens ``[20, 5]``, block 16 →
    indptr ``[0, 2, 3]``, indices ``[3, 1, 0]``, last_page_len ``[4, 5]``. All int32. Every
    sequence must hold at least one token (FlashInfer's ``last_page_len >= 1``).
    """
    tables, lens = check_block_tables(block_tables, context_lens, block_size, min_len=1)
    pages = -(-lens // block_size)
    indptr = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(pages, out=indptr[1:])
    indices = (np.concatenate([row[:p] for row, p in zip(tables, pages)]) if lens.size
               else np.zeros(0, dtype=np.int64))
    last = lens - (pages - 1) * block_size
    return indptr.astype(np.int32), indices.astype(np.int32), last.astype(np.int32)


def flashinfer_to_block_tables(
    kv_indptr: Any, kv_indices: Any, kv_last_page_len: Any, block_size: int,
    max_blocks_per_seq: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FlashInfer's CSR page table → kvlab's ``(block_tables, context_lens)``, both int32.

    ``block_tables`` is ``[num_seqs, max_blocks_per_seq]`` padded with -1; ``max_blocks_per_seq``
    defaults to the most pages any sequence uses. The inverse of
    :func:`block_tables_to_flashinfer` for tables whose unused entries are -1.
    """
    block_size = check_int("block_size", block_size, 1)
    indptr = _int_array("kv_indptr", kv_indptr, 1)
    indices = _int_array("kv_indices", kv_indices, 1)
    last = _int_array("kv_last_page_len", kv_last_page_len, 1)
    if indptr.size != last.size + 1:
        raise ValueError(f"kv_indptr must have num_seqs + 1 = {last.size + 1} entries "
                         f"(kv_last_page_len has {last.size}), got {indptr.size}")
    if indptr[0] != 0:
        raise ValueError(f"kv_indptr[0] must be 0, got {int(indptr[0])}")
    pages = np.diff(indptr)
    if pages.size and pages.min() < 1:
        s = int(np.argmin(pages))
        raise ValueError(f"kv_indptr must increase strictly: sequence {s} has {int(pages[s])} "
                         f"pages, and every sequence needs at least one")
    if indptr[-1] != indices.size:
        raise ValueError(f"kv_indptr[-1] = {int(indptr[-1])} must equal len(kv_indices) = "
                         f"{indices.size}")
    if indices.size and indices.min() < 0:
        raise ValueError(f"kv_indices must be page ids >= 0, got {int(indices.min())}")
    if last.size and (last.min() < 1 or last.max() > block_size):
        raise ValueError(f"kv_last_page_len must be in [1, block_size = {block_size}], got "
                         f"{last.tolist()}")
    width = int(pages.max()) if pages.size else 0
    if max_blocks_per_seq is not None:
        max_blocks_per_seq = check_int("max_blocks_per_seq", max_blocks_per_seq, 0)
        if max_blocks_per_seq < width:
            raise ValueError(f"max_blocks_per_seq = {max_blocks_per_seq} is too small: a sequence "
                             f"uses {width} pages")
        width = max_blocks_per_seq
    tables = np.full((last.size, width), -1, dtype=np.int32)
    for s in range(last.size):
        row = indices[indptr[s]:indptr[s + 1]]
        if np.unique(row).size != row.size:
            raise ValueError(f"sequence {s} lists a page twice: {row.tolist()}")
        tables[s, :row.size] = row
    lens = (pages - 1) * block_size + last
    return tables, lens.astype(np.int32)


__all__ = [
    "LAYOUTS", "block_tables_to_flashinfer", "byte_offset", "check_block_tables", "convert",
    "flashinfer_to_block_tables", "hnd_to_nhd", "nhd_to_hnd", "nhd_to_vllm", "nhd_to_vllm_k",
    "nhd_to_vllm_v", "pool_shape", "vllm_k_to_nhd", "vllm_to_nhd", "vllm_v_to_nhd", "vllm_x",
]
