"""Decode attention as PyTorch ops: the ops of :mod:`kvlab.ref.attention`, on MPS, CUDA or the CPU.

Whole-tensor steps per sequence: gather its K/V rows out of the pool through the block table
(dequantizing int8/fp8 codes with their scales), one batched matmul for the scores of every
(kv head, query head of its group, token), the visibility mask, a max-subtracted softmax, one
matmul with V. ``num_splits > 1`` runs the same steps on each partition and merges them with the
log-sum-exp rescale, as the reference does. Float32 throughout (no float64: MPS has none).
Arguments are checked by :mod:`kvlab.checks`. Unverified on MPS: no machine this project is tested
on has one.
"""
from __future__ import annotations

import torch

from kvlab.checks import check_decode_attention, check_paged_decode_attention
from kvlab.kernels.mps.quant import fp8_e4m3_decode


def _split_bounds(context_len: int, num_splits: int) -> list[tuple[int, int]]:
    size = -(-context_len // num_splits)
    return [(min(j * size, context_len), min((j + 1) * size, context_len))
            for j in range(num_splits)]


def _mask(context_len: int, num_tokens: int, causal: bool, window: int,
          device: torch.device) -> torch.Tensor:
    """bool ``[T, L]``: token i sees position j (as ``kvlab.ref.attention.visibility_mask``)."""
    j = torch.arange(context_len, device=device)[None, :]
    position = (context_len - num_tokens + torch.arange(num_tokens, device=device))[:, None]
    mask = j <= position if causal else torch.ones(num_tokens, context_len, dtype=torch.bool,
                                                   device=device)
    if window > 0:
        mask = mask & (j > position - window)
    return mask


def _attend_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     causal: bool, window: int, num_splits: int = 1) -> torch.Tensor:
    """q ``[T, Hq, D]``, k, v float32 ``[L, Hkv, D]`` -> float32 ``[T, Hq, D]``."""
    num_tokens, num_q_heads, head_dim = q.shape
    length, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    qg = q.float().reshape(num_tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    mask = _mask(length, num_tokens, causal, window, q.device)
    neg_inf = torch.tensor(float("-inf"), device=q.device)
    lses, outs = [], []
    for start, stop in _split_bounds(length, num_splits):
        kk = k[start:stop].permute(1, 0, 2)[:, None]                  # [Hkv, 1, n, D]
        vv = v[start:stop].permute(1, 0, 2)[:, None]
        s = torch.where(mask[:, start:stop], (qg @ kk.transpose(-1, -2)) * scale, neg_inf)
        m = s.amax(-1, keepdim=True) if stop > start else torch.full(
            (*s.shape[:-1], 1), float("-inf"), device=q.device)
        safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - safe_m)                                     # [Hkv, G, T, n]
        total = e.sum(-1, keepdim=True)
        lses.append(torch.where(total > 0, safe_m + torch.log(total.clamp_min(1e-30)), neg_inf))
        outs.append((e @ vv) / torch.where(total > 0, total, torch.ones_like(total)))
    lse = torch.stack(lses)                                           # [S, Hkv, G, T, 1]
    w = torch.exp(lse - lse.amax(0))
    out = (w * torch.stack(outs)).sum(0) / w.sum(0)                   # [Hkv, G, T, D]
    return out.permute(2, 0, 1, 3).reshape(num_tokens, num_q_heads, head_dim)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     causal: bool = True, sliding_window: int = 0) -> torch.Tensor:
    """float32 ``[T, Hq, D]``; as :func:`kvlab.ref.attention.decode_attention`."""
    scale, window = check_decode_attention(q, k, v, scale, causal, sliding_window)
    if q.shape[0] == 0:
        return torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    return _attend_sequence(q, k.float(), v.float(), scale, bool(causal), window)


def _gather(pool: torch.Tensor, scales: torch.Tensor | None, kv_dtype: str | None,
            table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's ``[length, Hkv, D]`` float32 rows of a pool (dequantized when scaled)."""
    block_size = pool.shape[1]
    positions = torch.arange(length, device=pool.device)
    slots = table.long()[positions // block_size] * block_size + positions % block_size
    rows = pool.view(-1, *pool.shape[2:]).index_select(0, slots)
    if kv_dtype is None:
        return rows.float()
    values = fp8_e4m3_decode(rows) if kv_dtype == "fp8_e4m3" else rows.float()
    return values * scales.view(-1, scales.shape[2]).index_select(0, slots).float()[..., None]


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           query_start: torch.Tensor, scale: float | None = None,
                           sliding_window: int = 0, k_scales: torch.Tensor | None = None,
                           v_scales: torch.Tensor | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """float32 ``[T, Hq, D]``; as :func:`kvlab.ref.attention.paged_decode_attention`
    (``num_splits=None``: one partition; torch's batched matmuls already use the whole device)."""
    kv_dtype, lens, starts, scale, window, splits = check_paged_decode_attention(
        q, k_pool, v_pool, block_tables, context_lens, query_start, scale, sliding_window,
        k_scales, v_scales, num_splits)
    splits = splits or 1
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for seq, length in enumerate(lens.tolist()):
        first, last = int(starts[seq]), int(starts[seq + 1])
        if last == first:
            continue
        k = _gather(k_pool, k_scales, kv_dtype, block_tables[seq], length)
        v = _gather(v_pool, v_scales, kv_dtype, block_tables[seq], length)
        out[first:last] = _attend_sequence(q[first:last], k, v, scale, True, window, splits)
    return out
