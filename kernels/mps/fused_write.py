"""The fused write as PyTorch ops: :mod:`kvlab.ref.fused_write` on MPS, CUDA or the CPU.

A framework cannot fuse by hand the way a kernel does, so this backend does the next best thing:
the fewest steps, each over Q and K together (one norm, one rotation for both), and on the CPU a
tile of tokens at a time, so that each step finds the last one's float32 result still in the
caches (what fusing buys a kernel: the intermediate never goes to memory)::

    for each tile of tokens (all of them at once on a GPU or MPS):
        qk = qkv.view(T, Hq + 2 Hkv, D)[tile, :Hq + Hkv].float()     Q and K heads, one tensor
        ss = tree sum of qk * qk (log2 D halvings)            the reference's order, exactly
        qk = w * dtype(qk / sqrt(ss / D + eps))               (qk_mode 1; w = Hq rows of
                                                              q_norm_w, then Hkv of k_norm_w)
        q_out[tile], k[tile] = rotate(qk, cos[pos], sin[pos]).to(dtype)       (qk_mode 1-3)
    index_copy_ K and V rows into the pool slots (quantized first, if so)

The stores come after every tile: a K that a quantized cache must refuse (checked before and
after the rotation) leaves the pools as they were.

Every step is one float32 operation in the reference's order, so the results equal NumPy's bit
for bit on the CPU (tested); ``torch.rsqrt`` is avoided (not correctly rounded), and so is
torch's float32 CPU ``sqrt`` (see :func:`_sqrt_rn`: one float64 value per head, except on MPS,
which has no float64). Otherwise only float16/float32/int32/int64/int8/uint8 ops MPS supports are
used. Unverified on MPS: no machine this project is tested on has one.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvlab.checks import check_fused_write, raise_for_values
from kvlab.kernels.mps import has_float64, require_tensors, token_tiles
from kvlab.kernels.mps.quant import quantize
from kvlab.kernels.mps.rope import rotate_into
from kvlab.ref.fused_write import _one_sequence

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _tree_sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """``sum(x * x)`` over the last axis, float32, in :func:`kvlab.ref.fused_write
    .tree_sum_of_squares`'s order: zero-pad to a power of two, then add halves."""
    size = x.shape[-1]
    width = 1 << max(size - 1, 0).bit_length()
    s = torch.nn.functional.pad(x * x, (0, width - size))
    while width > 1:
        width //= 2
        s = s[..., :width] + s[..., width:]
    return s[..., 0]


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """float32 sqrt, correctly rounded as IEEE (and NumPy, and CUDA's ``sqrt.rn``) require.

    torch's CPU ``sqrt`` goes through SLEEF's 0.5001-ulp routine: measured here, it is off by
    one ulp for a few inputs in a thousand, which is enough to break bit-equality. sqrt in
    float64 rounded to float32 is correctly rounded (53 >= 2 * 24 + 2 bits: the double rounding
    is innocuous). MPS has no float64, so there it stays float32 (unverified on MPS). One value
    per head: the cost is nothing.
    """
    if not has_float64(x.device):
        return torch.sqrt(x)
    return torch.sqrt(x.double()).float()


def _normed(qk: torch.Tensor, weight: torch.Tensor, eps32: torch.Tensor, dtype: torch.dtype
            ) -> torch.Tensor:
    """Qwen3's RMSNorm of every head of ``qk`` float32 ``[t, heads, D]``, in the reference's
    order: ``weight * dtype(qk / sqrt(mean(qk * qk) + eps))``, float32."""
    mean = _tree_sum_of_squares(qk) / qk.shape[-1]
    r = 1 / _sqrt_rn(mean + eps32)
    return weight * (qk * r.unsqueeze(-1)).to(dtype).float()  # Hugging Face's cast back


def _rotated(qkv: torch.Tensor, q_norm_w, k_norm_w, cos, sin, positions: torch.Tensor,
             num_q_heads: int, num_kv_heads: int, head_dim: int, eps: float, qk_mode: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)`` in qkv's dtype, as :func:`kvlab.ref.fused_write.split_qkv_norm_rope`.

    Q and K are normed and rotated a tile of tokens at a time on the CPU
    (:func:`kvlab.kernels.mps.token_tiles`), so that every step reads the last one's float32
    result from the caches rather than from memory; q and k are new tensors, v a view of qkv.
    """
    num_tokens = qkv.shape[0]
    heads = qkv.view(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim)
    split = num_q_heads + num_kv_heads
    v = heads[:, split:]
    if qk_mode == 0:
        return heads[:, :num_q_heads].clone(), heads[:, num_q_heads:split], v
    if qk_mode == 1:
        eps32 = torch.tensor(np.float32(eps), device=qkv.device)
        weight = torch.cat([q_norm_w.float().expand(num_q_heads, head_dim),
                            k_norm_w.float().expand(num_kv_heads, head_dim)])
    style, rotary_dim = "gptj" if qk_mode == 3 else "neox", 2 * cos.shape[1]
    q = torch.empty((num_tokens, num_q_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    for tile in token_tiles(num_tokens, 4 * split * head_dim, qkv.device):
        qk = heads[tile, :split].float()
        if qk_mode == 1:
            qk = _normed(qk, weight, eps32, qkv.dtype)
        c = cos[positions[tile]].unsqueeze(1)  # [t, 1, rotary_dim / 2]
        s = sin[positions[tile]].unsqueeze(1)
        for out, part in ((q[tile], qk[:, :num_q_heads]), (k[tile], qk[:, num_q_heads:])):
            out[..., rotary_dim:].copy_(part[..., rotary_dim:])  # dims past rotary_dim: as is
            rotate_into(out, part, c, s, style, rotary_dim)
    return q, k, v


def _rows(pool: torch.Tensor) -> torch.Tensor:
    """A pool ``[num_blocks, block_size, ...]`` as one row per slot (a view)."""
    return pool.view(-1, *pool.shape[2:])


def _write(qkv, q_norm_w, k_norm_w, cos, sin, positions, slots, k_pool, v_pool, k_scales,
           v_scales, shape, eps, qk_mode, kv_dtype) -> torch.Tensor:
    """Check the values a quantized cache must refuse, rotate, store; return q_out."""
    hq, hkv, d = shape.num_q_heads, shape.num_kv_heads, shape.head_dim
    if shape.kv_dtype is not None:
        heads = qkv.view(qkv.shape[0], hq + 2 * hkv, d)
        for name, part in (("qkv's K", heads[:, hq:hq + hkv]), ("qkv's V", heads[:, hq + hkv:])):
            if not bool((part.float().abs() <= shape.kv_dtype.max_input).all()):
                raise_for_values(name, part.detach().cpu().numpy(), shape.kv_dtype)
    q, k, v = _rotated(qkv, q_norm_w, k_norm_w, cos, sin, positions, hq, hkv, d, eps, qk_mode)
    if kv_dtype is None:
        _rows(k_pool).index_copy_(0, slots, k)
        _rows(v_pool).index_copy_(0, slots, v)
    else:
        for x, pool, scale_pool in ((k, k_pool, k_scales), (v, v_pool, v_scales)):
            codes, scales = quantize(x.contiguous(), kv_dtype)  # checks K again, rotated
            _rows(pool).index_copy_(0, slots, codes)
            _rows(scale_pool).index_copy_(0, slots, scales)
    return q


def paged_write_batched(qkv: torch.Tensor, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any,
                        k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                        query_start: torch.Tensor, pos_offsets: torch.Tensor, num_q_heads: int,
                        num_kv_heads: int, eps: float, qk_mode: int, k_scales: Any = None,
                        v_scales: Any = None, kv_dtype: str | None = None,
                        plan: Any = None) -> torch.Tensor:
    """Many sequences' new tokens; as :func:`kvlab.ref.fused_write.paged_write_batched`
    (tensors on one device; returns q_out)."""
    require_tensors(qkv=qkv, q_norm_w=q_norm_w, k_norm_w=k_norm_w, cos=cos, sin=sin,
                    k_pool=k_pool, v_pool=v_pool, block_tables=block_tables,
                    query_start=query_start, pos_offsets=pos_offsets, k_scales=k_scales,
                    v_scales=v_scales)
    shape = check_fused_write(qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, block_tables,
                              query_start, pos_offsets, num_q_heads, num_kv_heads, eps, qk_mode,
                              k_scales, v_scales, kv_dtype, plan=plan)
    device = qkv.device
    starts = query_start.long()
    counts = starts[1:] - starts[:-1]
    seq = torch.repeat_interleave(torch.arange(len(counts), device=device), counts,
                                  output_size=shape.num_tokens)
    positions = pos_offsets.long()[seq] + torch.arange(shape.num_tokens, device=device) - starts[seq]
    block_size = k_pool.shape[1]
    slots = block_tables.long()[seq, positions // block_size] * block_size + positions % block_size
    return _write(qkv, q_norm_w, k_norm_w, cos, sin, positions, slots, k_pool, v_pool, k_scales,
                  v_scales, shape, eps, qk_mode, kv_dtype)


def paged_write(qkv: torch.Tensor, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any,
                k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                pos_offset: int, num_q_heads: int, num_kv_heads: int, eps: float, qk_mode: int,
                k_scales: Any = None, v_scales: Any = None,
                kv_dtype: str | None = None) -> torch.Tensor:
    """One sequence; as :func:`kvlab.ref.fused_write.paged_write` (tensors on one device)."""
    require_tensors(qkv=qkv, block_table=block_table)  # the rest: paged_write_batched
    table, starts, offsets = _one_sequence(qkv, block_table, pos_offset)
    return paged_write_batched(qkv, q_norm_w, k_norm_w, cos, sin, k_pool, v_pool, table,
                               torch.from_numpy(starts).to(qkv.device),
                               torch.from_numpy(offsets).to(qkv.device), num_q_heads,
                               num_kv_heads, eps, qk_mode, k_scales, v_scales, kv_dtype)


def contig_write(qkv: torch.Tensor, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, pos_offset: int, num_q_heads: int,
                 num_kv_heads: int, eps: float, qk_mode: int, k_scales: Any = None,
                 v_scales: Any = None, kv_dtype: str | None = None) -> torch.Tensor:
    """A contiguous cache; as :func:`kvlab.ref.fused_write.contig_write` (tensors)."""
    require_tensors(qkv=qkv, q_norm_w=q_norm_w, k_norm_w=k_norm_w, cos=cos, sin=sin,
                    k_cache=k_cache, v_cache=v_cache, k_scales=k_scales, v_scales=v_scales)
    _, starts, offsets = _one_sequence(qkv, None, pos_offset)
    shape = check_fused_write(qkv, q_norm_w, k_norm_w, cos, sin, k_cache, v_cache, None, starts,
                              offsets, num_q_heads, num_kv_heads, eps, qk_mode, k_scales,
                              v_scales, kv_dtype, paged=False)
    positions = torch.arange(pos_offset, pos_offset + shape.num_tokens, device=qkv.device)
    pools = [c.view(c.shape[0], 1, *c.shape[1:]) if c is not None else None
             for c in (k_cache, v_cache, k_scales, v_scales)]  # capacity blocks of one slot
    return _write(qkv, q_norm_w, k_norm_w, cos, sin, positions, positions, pools[0], pools[1],
                  pools[2], pools[3], shape, eps, qk_mode, kv_dtype)
