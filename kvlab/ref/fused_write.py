"""The fused write, NumPy reference: packed QKV -> (QK-norm) -> RoPE -> KV cache, in one op.

A decoder layer's attention starts with one matmul whose output row packs every head of a token
(docs/design.md#conventions)::

    qkv  [T, (Hq + 2 * Hkv) * D]      Q heads 0..Hq-1 | K heads 0..Hkv-1 | V heads 0..Hkv-1

Before attention, an engine must: split the row into heads, normalise Q and K per head (Qwen3's
QK-norm), rotate them by their positions (RoPE), keep Q for attention and store K and V in the
cache (quantizing them on the way, for an int8/fp8 cache). Done as separate ops, every step reads
its input from memory and writes its output back; ferrum's ``paged_write`` does it all in
one kernel. This module is the definition every fused kernel is held to: the pieces
(:func:`split_qkv`, :func:`rms_norm_heads`), their unfused composition
(:func:`split_qkv_norm_rope`), and the fused ops (:func:`paged_write`, :func:`contig_write`,
:func:`paged_write_batched`) built from them.

``qk_mode`` (ferrum's name): 0 copy; 1 RMSNorm then rotate-half RoPE (Qwen3); 2 rotate-half RoPE
only (Llama, Mistral); 3 interleaved RoPE only (GPT-J). V is never normed or rotated.

**Numerics: where each value is rounded** (the same in every backend)::

    x   = float32(qkv[t, head, :])                    one head's D values
    ss  = sum(x * x)                                  float32, in a fixed tree order (below)
    r   = 1 / sqrt(ss / D + eps)                      float32, each step correctly rounded
    n   = dtype(x * r)                                qk_mode 1: rounded to qkv's dtype, as Hugging
    y   = float32(w) * float32(n)                     Face's Qwen3RMSNorm does before `weight *`
    out = dtype(rope(y))                              RoPE on the float32 y; rounded once at the end

The unfused composition rounds at exactly these places too (``rms_norm_heads`` returns float32
``y``; ``apply_rope`` on float32 does not round), so fused and unfused are **bit-equal**, and the
int8/fp8 codes are ``write_kv_quant``'s codes of ``out`` (quantized from the rounded K, as an
unfused engine that first stores K in qkv's dtype would). One thing would still break bit-equality:
the order of the sum of squares. float32 addition is not associative, and a GPU reduction adds in
a different order than ``np.sum``; so the order is part of this definition: pad the D squares with
zeros to a power of two P, then add the upper half onto the lower half until one is left
(``s[i] += s[i + P/2]``, then ``P/4`` ...), the classic shared-memory tree every backend can do.

Depends on NumPy alone. Arguments are checked by :func:`kvlab.checks.check_fused_write` before
anything is written: an op that raises leaves the cache as it was.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvlab.checks import (
    check_array, check_fused_write, positive_int, raise_for_values, shape_of, NORM_WEIGHT_DTYPES,
    QK_MODES, QKV_DTYPES,
)
from kvlab.ref.paging import write_kv
from kvlab.ref.quant import write_kv_quant
from kvlab.ref.rope import apply_rope

INDEX_DTYPE = np.int32


# --- the pieces ---------------------------------------------------------------------------------

def split_qkv(qkv: np.ndarray, num_q_heads: int, num_kv_heads: int,
              head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split packed rows into ``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``v [T, Hkv, D]`` (views).

    qkv: ``[T, (num_q_heads + 2 * num_kv_heads) * head_dim]``: all Q heads, then K, then V.
    """
    num_q_heads = positive_int("num_q_heads", num_q_heads)
    num_kv_heads = positive_int("num_kv_heads", num_kv_heads)
    head_dim = positive_int("head_dim", head_dim)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    check_array("qkv", qkv, ("T", "(num_q_heads + 2 * num_kv_heads) * head_dim"),
                shape=[None, width], dtypes=QKV_DTYPES)
    heads = qkv.reshape(qkv.shape[0], num_q_heads + 2 * num_kv_heads, head_dim)
    k_start = num_q_heads
    v_start = num_q_heads + num_kv_heads
    return heads[:, :k_start], heads[:, k_start:v_start], heads[:, v_start:]


def tree_sum_of_squares(x: np.ndarray) -> np.ndarray:
    """``sum(x * x)`` over the last axis in float32, added in the tree order every backend uses.

    x: float32 ``[..., D]``. The D squares are padded with zeros to P, the next power of two
    (adding 0 is exact), then halved: ``s[:P/2] + s[P/2:]``, and again, until one value is left.
    Returns float32 ``[...]``.
    """
    squares = x * x
    size = squares.shape[-1]
    width = 1 << max(size - 1, 0).bit_length()  # next power of two >= D
    s = np.zeros(squares.shape[:-1] + (width,), np.float32)
    s[..., :size] = squares
    while width > 1:
        width //= 2
        s = s[..., :width] + s[..., width:]
    return s[..., 0]


def rms_norm_heads(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Per-head RMSNorm: every head of every token scaled to unit root-mean-square, then weighted.

    x: float16/float32 ``[T, heads, D]``. weight: float16/float32 ``[D]``, one weight shared by
    every head (Qwen3's ``q_norm`` / ``k_norm``). Returns **float32** ``[T, heads, D]``::

        r = 1 / sqrt(sum(x*x) / D + eps)        float32, tree-ordered sum (tree_sum_of_squares)
        y = float32(weight) * float32(x.dtype(x * r))

    The middle rounding to x's dtype is Hugging Face's (``Qwen3RMSNorm`` returns
    ``weight * hidden.to(input_dtype)``). Hugging Face then rounds ``y`` to the weight's dtype
    too; kvlab keeps it in float32 for RoPE and rounds once at the end (see the module notes).
    """
    check_array("x", x, ("T", "heads", "head_dim"), dtypes=QKV_DTYPES)
    check_array("weight", weight, ("head_dim",), shape=shape_of(x)[2:], dtypes=NORM_WEIGHT_DTYPES,
                matching="x")
    x32 = x.astype(np.float32)
    mean = tree_sum_of_squares(x32) / np.float32(x.shape[-1])
    r = np.float32(1) / np.sqrt(mean + np.float32(eps))
    normed = (x32 * r[..., None]).astype(x.dtype).astype(np.float32)
    return weight.astype(np.float32) * normed


def split_qkv_norm_rope(qkv: np.ndarray, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any,
                        positions: np.ndarray, num_q_heads: int, num_kv_heads: int,
                        head_dim: int, eps: float, qk_mode: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unfused path: split, (norm), rotate. Returns new ``q, k, v`` in qkv's dtype.

    positions: int32 ``[T]``, token t's position (``pos_offset + t`` for one sequence).
    qk_mode: 0 copy · 1 :func:`rms_norm_heads` then rotate-half RoPE · 2 rotate-half RoPE ·
    3 interleaved RoPE (``kvlab.ref.rope.apply_rope`` on the float32 values). V is copied.
    q_norm_w, k_norm_w are read only in mode 1, cos and sin only in modes 1-3.
    """
    if isinstance(qk_mode, bool) or qk_mode not in QK_MODES:
        raise ValueError(f"qk_mode must be one of {QK_MODES}, got {qk_mode!r}")
    q, k, v = split_qkv(qkv, num_q_heads, num_kv_heads, head_dim)
    if qk_mode == 0:
        return q.copy(), k.copy(), v.copy()
    style = "gptj" if qk_mode == 3 else "neox"
    rotated = []
    for x, weight in ((q, q_norm_w), (k, k_norm_w)):
        y = rms_norm_heads(x, weight, eps) if qk_mode == 1 else x.astype(np.float32)
        rotated.append(apply_rope(y, cos, sin, positions, style).astype(qkv.dtype))
    return rotated[0], rotated[1], v.copy()


# --- the fused ops --------------------------------------------------------------------------

def token_positions(query_start: np.ndarray, pos_offsets: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each token's ``(sequence, position)``, int64 ``[T]`` each: row t of sequence s (rows
    ``query_start[s]:query_start[s+1]``) is at ``pos_offsets[s] + t - query_start[s]``."""
    starts = np.asarray(query_start, np.int64)
    seq = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    positions = np.asarray(pos_offsets, np.int64)[seq] + np.arange(starts[-1]) - starts[seq]
    return seq, positions


def _check_cache_values(qkv: np.ndarray, shape) -> None:
    """A quantized cache cannot hold NaN/inf: refuse K/V inputs that are not finite (or too big)."""
    if shape.kv_dtype is None:
        return
    heads = qkv.reshape(qkv.shape[0], shape.num_q_heads + 2 * shape.num_kv_heads, shape.head_dim)
    for name, part in (("qkv's K", heads[:, shape.num_q_heads:shape.num_q_heads
                                         + shape.num_kv_heads]),
                       ("qkv's V", heads[:, shape.num_q_heads + shape.num_kv_heads:])):
        if not (np.abs(part.astype(np.float32)) <= shape.kv_dtype.max_input).all():
            raise_for_values(name, part, shape.kv_dtype)


def paged_write_batched(qkv: np.ndarray, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any,
                        k_pool: np.ndarray, v_pool: np.ndarray, block_tables: np.ndarray,
                        query_start: np.ndarray, pos_offsets: np.ndarray, num_q_heads: int,
                        num_kv_heads: int, eps: float, qk_mode: int, k_scales: Any = None,
                        v_scales: Any = None, kv_dtype: str | None = None,
                        plan: Any = None) -> np.ndarray:
    """Many sequences' new tokens in one call: returns ``q_out [T, Hq, D]`` (qkv's dtype) and
    writes each token's K and V into its sequence's blocks.

    block_tables: int32 ``[num_seqs, max_blocks]``; query_start: int32 ``[num_seqs + 1]``
    (sequence s owns qkv rows ``query_start[s]:query_start[s+1]``); pos_offsets: int32
    ``[num_seqs]``, each sequence's cache length before this step. plan: a
    :class:`~kvlab.step_plan.StepPlan` of this step (``paging.plan_step``), whose own arrays
    block_tables, query_start and pos_offsets must then be (checked when it was made: nothing is
    read back). Other arguments as :func:`paged_write`.
    """
    shape = check_fused_write(qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, block_tables,
                              query_start, pos_offsets, num_q_heads, num_kv_heads, eps, qk_mode,
                              k_scales, v_scales, kv_dtype, plan=plan)
    _check_cache_values(qkv, shape)
    seq, positions = token_positions(shape.query_start, shape.pos_offsets)
    block_size = k_pool.shape[1]
    slots = (block_tables[seq, positions // block_size].astype(np.int64) * block_size
             + positions % block_size).astype(INDEX_DTYPE)
    return _write(qkv, q_norm_w, k_norm_w, cos, sin, positions.astype(INDEX_DTYPE), k_pool,
                  v_pool, slots, shape, eps, qk_mode, k_scales, v_scales, kv_dtype)


def _write(qkv, q_norm_w, k_norm_w, cos, sin, positions, k_pool, v_pool, slots, shape, eps,
           qk_mode, k_scales, v_scales, kv_dtype) -> np.ndarray:
    """The composition itself (arguments already checked): rotate, then store K and V."""
    q, k, v = split_qkv_norm_rope(qkv, q_norm_w, k_norm_w, cos, sin, positions,
                                  shape.num_q_heads, shape.num_kv_heads, shape.head_dim, eps,
                                  qk_mode)
    if kv_dtype is None:
        write_kv(k, v, k_pool, v_pool, slots)
    else:
        write_kv_quant(k, v, k_pool, v_pool, k_scales, v_scales, slots, kv_dtype)
    return q


def paged_write(qkv: np.ndarray, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any,
                k_pool: np.ndarray, v_pool: np.ndarray, block_table: np.ndarray, pos_offset: int,
                num_q_heads: int, num_kv_heads: int, eps: float, qk_mode: int,
                k_scales: Any = None, v_scales: Any = None,
                kv_dtype: str | None = None) -> np.ndarray:
    """One sequence's new tokens: ``q_out [T, Hq, D]`` returned, K/V written into the paged pool.

    qkv: float16/float32 ``[T, (Hq + 2 * Hkv) * D]``. q_norm_w, k_norm_w: ``[D]`` (qk_mode 1).
    cos, sin: float32 ``[max_positions, rotary_dim // 2]`` (qk_mode 1-3). k_pool, v_pool:
    ``[num_blocks, block_size, Hkv, D]``, qkv's dtype, or int8/uint8 codes with fp16 ``k_scales``,
    ``v_scales`` ``[num_blocks, block_size, Hkv]`` and ``kv_dtype`` ``"int8"``/``"fp8_e4m3"``.
    block_table: int32 ``[max_blocks]``, which must reach every new position. pos_offset: the
    cache length before the step; token t is at position ``pos_offset + t``.

    Equal, bit for bit, to ``split_qkv_norm_rope`` then ``write_kv`` (``write_kv_quant``) at
    ``slot_mapping(block_table, pos_offset + arange(T), block_size)``.
    """
    table, starts, offsets = _one_sequence(qkv, block_table, pos_offset)
    return paged_write_batched(qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, table, starts,
                               offsets, num_q_heads, num_kv_heads, eps, qk_mode, k_scales,
                               v_scales, kv_dtype)


def contig_write(qkv: np.ndarray, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any,
                 k_cache: np.ndarray, v_cache: np.ndarray, pos_offset: int, num_q_heads: int,
                 num_kv_heads: int, eps: float, qk_mode: int, k_scales: Any = None,
                 v_scales: Any = None, kv_dtype: str | None = None) -> np.ndarray:
    """:func:`paged_write` for a contiguous cache: token t's K/V go to row ``pos_offset + t`` of
    ``k_cache``, ``v_cache`` ``[capacity, Hkv, D]`` (scales ``[capacity, Hkv]`` when quantized)."""
    _, starts, offsets = _one_sequence(qkv, None, pos_offset)
    shape = check_fused_write(qkv, q_norm_w, k_norm_w, cos, sin, k_cache, v_cache, None, starts,
                              offsets, num_q_heads, num_kv_heads, eps, qk_mode, k_scales,
                              v_scales, kv_dtype, paged=False)
    _check_cache_values(qkv, shape)
    positions = (pos_offset + np.arange(qkv.shape[0])).astype(INDEX_DTYPE)
    pools = [c.reshape(c.shape[0], 1, *c.shape[1:]) if c is not None else None
             for c in (k_cache, v_cache, k_scales, v_scales)]  # capacity blocks of one slot
    return _write(qkv, q_norm_w, k_norm_w, cos, sin, positions, pools[0], pools[1], positions,
                  shape, eps, qk_mode, pools[2], pools[3], kv_dtype)


def _one_sequence(qkv: Any, block_table: Any, pos_offset: Any):
    """A single sequence as the batched op's arguments: a one-row table, ``[0, T]``,
    ``[pos_offset]`` (NumPy; each backend moves them to its device)."""
    if isinstance(pos_offset, bool) or not isinstance(pos_offset, (int, np.integer)):
        raise TypeError(f"pos_offset must be an int, got {type(pos_offset).__name__}")
    if pos_offset < 0 or pos_offset > 2**31 - 1:
        raise ValueError(f"pos_offset must be in [0, 2**31), got {pos_offset}")
    num_tokens = qkv.shape[0] if hasattr(qkv, "shape") and len(qkv.shape) else 0
    starts = np.array([0, num_tokens], INDEX_DTYPE)
    offsets = np.array([pos_offset], INDEX_DTYPE)
    if block_table is not None and not hasattr(block_table, "shape"):
        raise TypeError(f"block_table must be an int32 array [max_blocks], got "
                        f"{type(block_table).__name__}")
    if block_table is not None and len(block_table.shape) != 1:
        raise ValueError(f"block_table must be 1-D [max_blocks] (one sequence; use "
                         f"paged_write_batched for many), got shape {shape_of(block_table)}")
    table = block_table.reshape(1, block_table.shape[0]) if block_table is not None else None
    return table, starts, offsets


# --- bytes moved ---------------------------------------------------------------------------------

def write_traffic(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                  qk_mode: int = 1, dtype: str = "float16", kv_dtype: str | None = None,
                  rotary_dim: int | None = None) -> dict[str, dict[str, int]]:
    """Bytes each step reads and writes, unfused vs fused: ``{step: {"read": n, "write": n}}``.

    Exact counts from the shapes, for one layer and one step of ``num_tokens`` tokens. The unfused
    sequence is what an engine runs without fusion, one kernel per step, each reading its inputs
    from memory and writing its outputs back (split views cost nothing; each kernel reads the part
    of the packed row it needs)::

        q_norm, k_norm    read Q (K) + weight, write the normed Q (K)              (qk_mode 1)
        rope_q, rope_k    read Q (K) + one cos and one sin row per token, write it  (modes 1-3)
        copy_q            read Q, write q_out                                      (mode 0)
        slot_mapping      read one table entry and write one int32 slot per token
        cache_write       read K, V and the slots; write K, V (codes + fp16 scales) to the cache

    The fused kernel reads the packed rows, the weights, the table rows and its tables once, and
    writes q_out and the cache. Index traffic counts int32 per token (4 bytes).
    """
    b = np.dtype(dtype).itemsize
    cache_b = 1 if kv_dtype else b
    scale_b = 2 if kv_dtype else 0
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    q = num_tokens * num_q_heads * head_dim * b
    kv_head = num_tokens * num_kv_heads * head_dim * b
    weight = head_dim * 4
    tables = num_tokens * rotary_dim * 4 if qk_mode else 0  # cos row + sin row, rotary_dim/2 each
    cache = 2 * (num_tokens * num_kv_heads * (head_dim * cache_b + scale_b))
    index = num_tokens * 4
    steps: dict[str, dict[str, int]] = {}
    if qk_mode == 1:
        steps["q_norm"] = {"read": q + weight, "write": q}
        steps["k_norm"] = {"read": kv_head + weight, "write": kv_head}
    if qk_mode:
        steps["rope_q"] = {"read": q + tables, "write": q}
        steps["rope_k"] = {"read": kv_head + tables, "write": kv_head}
    else:
        steps["copy_q"] = {"read": q, "write": q}
    steps["slot_mapping"] = {"read": index, "write": index}
    steps["cache_write"] = {"read": 2 * kv_head + index, "write": cache}
    steps["unfused"] = {"read": sum(s["read"] for s in steps.values()),
                        "write": sum(s["write"] for s in steps.values())}
    steps["fused"] = {"read": q + 2 * kv_head + (2 * weight if qk_mode == 1 else 0) + tables
                      + index, "write": q + cache}
    return steps
