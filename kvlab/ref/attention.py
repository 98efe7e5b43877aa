"""Decode attention over the KV cache, NumPy reference: the definition every backend is held to.

One query row ``q[t, h]`` (a vector of ``head_dim``) attends to the keys and values its sequence
holds in the cache::

    s_j   = scale * q . k_j                 for each visible position j     (scale = 1/sqrt(D))
    p_j   = exp(s_j - max s) / sum_j exp(s_j - max s)                       (softmax)
    out   = sum_j p_j v_j                                                    float32 [D]

Shapes (token-first, docs/design.md#conventions)::

    q, out          [T, num_q_heads, head_dim]            q float16/float32, out float32
    k, v            [L, num_kv_heads, head_dim]           contiguous (``decode_attention``)
    k_pool, v_pool  [num_blocks, block_size, Hkv, D]      paged (``paged_decode_attention``),
                                                          fp16/fp32, or int8/fp8 codes + scales

**Which keys a query sees.** The step's T tokens are already in the cache (``context_len`` is
the length *after* the step), so token i of the step sits at position ``p = context_len - T + i``.

- GQA: query head h reads kv head ``h // (num_q_heads // num_kv_heads)``.
- causal (always, in the paged op): token i sees positions ``<= p``, i.e.
  ``< context_len - T + 1 + i``. A decode step (T = 1) sees everything.
- sliding window W > 0: a query at position p sees positions ``(p - W, p]``, the W most recent
  *including itself* — Mistral's and Hugging Face's convention (HF masks ``kv_idx <= q_idx -
  sliding_window``). W = 1 sees only itself; W = 0 means no window. ``decode_attention`` with
  ``causal=False`` still counts the window back from p.

**Four ways to compute the same softmax** (notebook 05 builds each and checks them equal):
``attend_naive`` (exp, sum, divide: overflows for large scores), ``attend_max_subtracted`` (the
standard fix), ``attend_online`` (one pass over tiles of keys keeping a running max and sum: the
FlashAttention idea, no score vector in memory) and ``attend_split_k`` (flash-decoding: the context
cut into partitions attended independently — in parallel on a GPU — then merged with the
log-sum-exp rescale). ``paged_decode_attention(..., num_splits=S)`` computes exactly that split.

Arithmetic is float32 throughout (fp16 caches are widened on read; int8/fp8 codes are dequantized
on read with their fp16 scales). Depends on NumPy alone; arguments are checked by
:mod:`kvlab.checks`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvlab.checks import check_decode_attention, check_paged_decode_attention
from kvlab.ref.paging import gather_kv
from kvlab.ref.quant import gather_kv_quant

NEG_INF = np.float32(-np.inf)


# --- which keys a query sees ------------------------------------------------------------------

def visible_range(context_len: int, num_tokens: int, token: int, causal: bool = True,
                  sliding_window: int = 0) -> tuple[int, int]:
    """``(start, stop)``: the positions ``start <= j < stop`` that token ``token`` of a step of
    ``num_tokens`` tokens sees in a cache of ``context_len`` (the length after the step)."""
    position = context_len - num_tokens + token
    stop = position + 1 if causal else context_len
    start = max(0, position - sliding_window + 1) if sliding_window > 0 else 0
    return start, stop


def visibility_mask(context_len: int, num_tokens: int, causal: bool = True,
                    sliding_window: int = 0) -> np.ndarray:
    """bool ``[num_tokens, context_len]``: ``mask[i, j]`` is True when token i sees position j."""
    j = np.arange(context_len)[None, :]
    position = (context_len - num_tokens + np.arange(num_tokens))[:, None]
    mask = j <= position if causal else np.ones((num_tokens, context_len), bool)
    if sliding_window > 0:
        mask &= j > position - sliding_window
    return mask


# --- one query vector, four formulations -------------------------------------------------------
#
# q [D], k [n, D], v [n, D], all float32, every key visible (the caller slices the visible range).

def _scores(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    return (k.astype(np.float32) @ q.astype(np.float32)) * np.float32(scale)


def attend_naive(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Softmax as written: ``exp(s) / sum(exp(s))``. Overflows to inf/NaN once a score passes
    ~88 (float32's exp limit): correct maths, wrong arithmetic."""
    e = np.exp(_scores(q, k, scale))
    return (e / e.sum()) @ v.astype(np.float32)


def attend_max_subtracted(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                          scale: float) -> np.ndarray:
    """``exp(s - max s)``: the same softmax (the factor ``exp(-max)`` cancels), every exponent
    <= 0, so nothing overflows. Needs every score before the first exp: two passes."""
    s = _scores(q, k, scale)
    e = np.exp(s - s.max())
    return (e / e.sum()) @ v.astype(np.float32)


def attend_online(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                  tile: int = 16) -> np.ndarray:
    """One pass over tiles of keys, keeping a running max ``m``, sum ``l`` and unnormalized
    output ``acc``. When a tile raises the max from m to m', everything so far is rescaled by
    ``exp(m - m')``; one division at the end. No score vector is ever stored whole."""
    m, l = NEG_INF, np.float32(0)
    acc = np.zeros(q.shape[-1], np.float32)
    for start in range(0, len(k), tile):
        s = _scores(q, k[start:start + tile], scale)
        m_new = max(m, s.max())
        correction = np.exp(m - m_new)      # exp(-inf) = 0 on the first tile
        p = np.exp(s - m_new)
        l = l * correction + p.sum()
        acc = acc * correction + p @ v[start:start + tile].astype(np.float32)
        m = m_new
    return acc / l


def split_bounds(context_len: int, num_splits: int) -> list[tuple[int, int]]:
    """The ``num_splits`` partitions of positions ``0 .. context_len-1``: ``ceil(L / S)`` each,
    the last ones shorter or **empty** (L = 1, S = 4 gives one position and three empty parts)."""
    size = -(-context_len // num_splits)
    return [(min(j * size, context_len), min((j + 1) * size, context_len))
            for j in range(num_splits)]


def partial_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                      scale: float) -> tuple[np.float32, np.ndarray]:
    """One partition's ``(lse, out)``: ``lse = log sum exp(s)`` over its keys and its own
    normalized output. An empty partition gives ``(-inf, zeros)``: it weighs nothing in the merge."""
    if len(k) == 0:
        return NEG_INF, np.zeros(q.shape[-1], np.float32)
    s = _scores(q, k, scale)
    m = s.max()
    e = np.exp(s - m)
    return m + np.log(e.sum()), (e / e.sum()) @ v.astype(np.float32)


def merge_partials(lse: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Merge partitions ``lse [S]``, ``out [S, D]``: partition j's share of the softmax is
    ``exp(lse_j - LSE)`` with ``LSE = log sum_j exp(lse_j)``, computed from ``max_j lse_j`` so no
    exp overflows. Empty partitions (lse = -inf) get weight 0. At least one must be non-empty."""
    lse = np.asarray(lse, np.float32)
    w = np.exp(lse - lse.max())
    return (w @ np.asarray(out, np.float32)) / w.sum()


def attend_split_k(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                   num_splits: int) -> np.ndarray:
    """Flash-decoding: attend each of :func:`split_bounds`' partitions on its own (on a GPU, in
    parallel: one thread block each), then :func:`merge_partials`."""
    parts = [partial_attention(q, k[a:b], v[a:b], scale) for a, b in split_bounds(len(k), num_splits)]
    return merge_partials(np.array([p[0] for p in parts]), np.array([p[1] for p in parts]))


# --- the ops ----------------------------------------------------------------------------------

def _attend_sequence(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool,
                     sliding_window: int, num_splits: int = 1) -> np.ndarray:
    """One sequence, checked arguments: q ``[T, Hq, D]``, k, v float32 ``[L, Hkv, D]`` ->
    float32 ``[T, Hq, D]``. Masked, max-subtracted softmax over each partition, then the merge
    (one partition: the merge is the identity)."""
    num_tokens, num_q_heads, head_dim = q.shape
    length, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    qg = q.astype(np.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    mask = visibility_mask(length, num_tokens, causal, sliding_window)       # [T, L]
    lse_parts, out_parts = [], []
    for start, stop in split_bounds(length, num_splits):
        # scores [Hkv, G, T, n]: each K row serves the `group` query heads that share it.
        # optimize=True lets einsum hand the contraction to BLAS (a batched matmul): ~5x faster
        # than its own loops at 4k keys; the sums run in another order, so results may differ
        # in the last float32 bits.
        s = np.einsum("tkgd,nkd->kgtn", qg, k[start:stop], optimize=True) * np.float32(scale)
        s = np.where(mask[:, start:stop], s, NEG_INF)
        m = s.max(axis=-1, keepdims=True, initial=NEG_INF)
        safe_m = np.where(np.isfinite(m), m, np.float32(0))  # a query that sees nothing here
        e = np.exp(s - safe_m)
        total = e.sum(axis=-1, keepdims=True)
        lse_parts.append(np.where(total > 0, safe_m + np.log(np.maximum(total, 1e-30)), NEG_INF))
        o = np.einsum("kgtn,nkd->kgtd", e, v[start:stop], optimize=True) / np.where(total > 0,
                                                                                 total, 1)
        out_parts.append(o)
    lse = np.stack(lse_parts)[..., 0]                                         # [S, Hkv, G, T]
    w = np.exp(lse - lse.max(axis=0))
    out = np.einsum("skgt,skgtd->kgtd", w, np.stack(out_parts)) / w.sum(axis=0)[..., None]
    return out.transpose(2, 0, 1, 3).reshape(num_tokens, num_q_heads, head_dim).astype(np.float32)


def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None,
                     causal: bool = True, sliding_window: int = 0) -> np.ndarray:
    """Attention of a step's T tokens over a contiguous cache of L positions (T <= L).

    q: float16/float32 ``[T, num_q_heads, head_dim]``; k, v: float16/float32
    ``[L, num_kv_heads, head_dim]`` with the step's own tokens as the last T rows.
    scale: None = ``1/sqrt(head_dim)``. causal: token i sees positions ``< L - T + 1 + i`` (no
    effect when T = 1). sliding_window: W > 0 keeps positions ``(p - W, p]`` (see the module notes).
    Returns float32 ``[T, num_q_heads, head_dim]``.
    """
    scale, window = check_decode_attention(q, k, v, scale, causal, sliding_window)
    if q.shape[0] == 0:
        return np.zeros(q.shape, np.float32)
    return _attend_sequence(q, k.astype(np.float32), v.astype(np.float32), scale, bool(causal),
                            window)


def paged_decode_attention(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray,
                           block_tables: np.ndarray, context_lens: np.ndarray,
                           query_start: np.ndarray, scale: float | None = None,
                           sliding_window: int = 0, k_scales: np.ndarray | None = None,
                           v_scales: np.ndarray | None = None,
                           num_splits: int | None = None, plan: Any = None) -> np.ndarray:
    """Attention of a ragged batch over a paged cache; causal for every sequence.

    q: float16/float32 ``[T, num_q_heads, head_dim]``: sequence s owns rows
    ``query_start[s] : query_start[s+1]`` (one row each in a decode batch; more in a prefill or
    speculative step). k_pool, v_pool: ``[num_blocks, block_size, num_kv_heads, head_dim]``,
    float16/float32, or int8 / uint8 (fp8_e4m3) codes with fp16 ``k_scales``, ``v_scales``
    ``[num_blocks, block_size, num_kv_heads]`` (dequantized on read). block_tables: int32
    ``[num_seqs, max_blocks]``; context_lens: int32 ``[num_seqs]``, lengths after the step;
    query_start: int32 ``[num_seqs + 1]``. num_splits: S >= 1 partitions per sequence
    (:func:`split_bounds`), attended separately and merged (flash-decoding); the result equals
    S = 1 up to float32 rounding. None (the default) lets the backend choose: here one partition;
    the CUDA kernels pick S to fill the GPU's SMs.
    plan: a :class:`~kvlab.step_plan.StepPlan` of this step (``paging.plan_step``), whose own arrays
    block_tables, context_lens and query_start must then be: they were checked when it was made,
    so the call reads none of them back (one plan serves every layer of a step).
    Returns float32 ``[T, num_q_heads, head_dim]``.
    """
    kv_dtype, lens, starts, scale, window, splits = check_paged_decode_attention(
        q, k_pool, v_pool, block_tables, context_lens, query_start, scale, sliding_window,
        k_scales, v_scales, num_splits, plan)
    splits = splits or 1
    out = np.zeros(q.shape, np.float32)
    for seq, length in enumerate(lens):
        rows = slice(int(starts[seq]), int(starts[seq + 1]))
        if rows.stop == rows.start:
            continue  # no query tokens for this sequence in this step
        table = block_tables[seq]
        if kv_dtype is None:
            k, v = gather_kv(k_pool, v_pool, table, int(length))
        else:
            k, v = gather_kv_quant(k_pool, v_pool, k_scales, v_scales, table, int(length),
                                   kv_dtype)
        out[rows] = _attend_sequence(q[rows], k.astype(np.float32), v.astype(np.float32), scale,
                                     True, window, splits)
    return out
