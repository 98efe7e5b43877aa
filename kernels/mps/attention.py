"""Decode attention as PyTorch ops: the ops of :mod:`kvlab.ref.attention`, on MPS, CUDA or the CPU.

The whole batch at once, one **tile** of key positions at a time (FlashAttention's online softmax,
the reference's split-K merge applied tile after tile)::

    q        [S, Hkv, G*T, D]  float32: every sequence's query rows, padded to the longest (T)
    for each tile of positions j0 .. j1 (the same positions in every sequence):
        K, V  [S, Hkv, j1-j0, D] float32: gathered from the pool through the block tables and
              widened (dequantized) in the same copy, laid out head-major for the matmuls
        s     = (q @ K^T) * scale, -inf where a query does not see a position
        m'    = max(m, max_j s);  p = exp(s - m');  l = l e^(m - m') + sum_j p
        acc   = acc e^(m - m') + p @ V
    out = acc / l

Why tiles: a sequence's keys are scattered over the pool, so they must be copied before a matmul
can read them contiguously. Copying the whole context first (and widening it to float32) writes
and re-reads twice the pool's bytes; a tile small enough to stay in the CPU's caches
(:data:`TILE_BYTES`) is read from the pool once and consumed while it is still there. On this
project's 2-core CPU, for 4 x 4096 cached tokens (32 q / 8 kv heads of 128, fp16 pool in shuffled
blocks of 16), ``python -m kvlab bench --backend torch --size medium`` times the tiles beside one
gather of the whole context followed by one softmax (exercise 05.paged_decode_torch's solution):
28-29 ms against 135-138 ms, 4.7x, in two runs (one tile of this module, 64 MiB, was 5x slower
when TILE_BYTES was chosen). Beside torch's own SDPA on the same K/V already laid out
contiguously in float32, timed in turns (``kvlab.bench.side_by_side``, notebook 05 §5; 4 x 2048
tokens): 0.43-0.47x in three runs (int8 pools 0.47-0.55x), and 0.59x at 4 x 4096. Earlier bench
runs, which time one op after the other, read 0.5-1.0x on this busy machine. Where the rest goes:
each tile is gathered (one pass), widened and laid out head-major (a second, strided one) before
its matmul, and a tile takes ~25 small ops, which SDPA on contiguous K/V does in one.

Ragged batches pad every sequence to the longest context and the most query rows; a key past a
sequence's length is masked (its V row zeroed: a stale NaN there must not reach ``0 * NaN``), a
padded query row is dropped at the end. So there is no Python loop over sequences and no read-back
from the device: the lengths the loop needs are the host copies the argument checks already made.
The cost is the padding's arithmetic, wasted when lengths differ a lot.

Float32 throughout (no float64: MPS has none); the sums run in a different order than the
reference's (tiles, BLAS blocks), within the tolerance of ``tests/test_attention_ops.py``.
Arguments are checked by :mod:`kvlab.checks`. Unverified on MPS: no machine this project is tested
on has one (``tests/test_mps_safety.py`` checks every aten op and dtype against the installed
torch's list of MPS kernels).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from kvlab.checks import check_decode_attention, check_paged_decode_attention
from kvlab.kernels.mps import require_tensors
from kvlab.kernels.mps.quant import fp8_e4m3_decode

# Bytes of one tile's float32 K (or of its scores, whichever is larger), all sequences together.
# Measured on a 2-core CPU (4 x 4096 tokens, 8 kv heads of 128, best of 5-7): 2, 4 and 8 MiB within
# noise of each other and of SDPA (~20 ms), 16 MiB 1.4x slower, 64 MiB (one tile) 5x. 2 MiB keeps a
# decode tile's scores under torch's parallel grain (32768 elements): the softmax steps then run on
# one thread, and a busy CPU makes every parallel region expensive (measured: ~1.3 ms each, when
# another process holds a core). On a GPU larger tiles would mean fewer launches; unmeasured there.
TILE_BYTES = 2 * 2**20
MIN_TILE = 16  # positions: below this the per-tile Python and launch overhead dominates

# Reads one tile: (first position, last position + 1) -> float32 [S, Hkv, positions, D]
TileReader = Callable[[int, int], torch.Tensor]


def _tile_positions(num_seqs: int, num_kv_heads: int, head_dim: int, query_rows: int) -> int:
    """Positions per tile: a tile's float32 K ``[S, Hkv, n, D]`` and scores ``[S, Hq*T, n]``
    within :data:`TILE_BYTES` (``query_rows`` = Hq * T per sequence)."""
    per_position = 4 * num_seqs * max(num_kv_heads * head_dim, query_rows)
    return max(MIN_TILE, TILE_BYTES // per_position)


def _head_major(rows: torch.Tensor, scales: torch.Tensor | None, kv_dtype: str | None
                ) -> torch.Tensor:
    """rows ``[S, n, Hkv, D]`` (a pool's dtype) -> float32 ``[S, Hkv, n, D]``, contiguous, so the
    matmuls read it without another copy. The widening happens in the same copy as the transpose;
    int8 / fp8 codes are multiplied by their fp16 scales ``[S, n, Hkv]`` afterwards."""
    num_seqs, n, num_kv_heads, head_dim = rows.shape
    if kv_dtype == "fp8_e4m3":
        rows = fp8_e4m3_decode(rows)  # a table lookup: already float32
    out = torch.empty((num_seqs, num_kv_heads, n, head_dim), dtype=torch.float32,
                      device=rows.device)
    out.copy_(rows.transpose(1, 2))
    if scales is not None:
        out.mul_(scales.transpose(1, 2).unsqueeze(-1))  # fp16 scale x float32 code: exact
    return out


def _attend_tiles(q: torch.Tensor, num_kv_heads: int, read_k: TileReader, read_v: TileReader,
                  num_keys: int, key_lens: torch.Tensor, positions: torch.Tensor, shortest: int,
                  scale: float, causal: bool, window: int) -> torch.Tensor:
    """Masked softmax attention of ``q`` float32 ``[S, T, Hq, D]`` over positions
    ``0 .. num_keys-1``, one tile at a time; returns float32 ``[S, T, Hq, D]``.

    key_lens: int64 ``[S]`` on the device, the positions each sequence holds (later ones are
    padding); shortest: their minimum, on the host. positions: int64 ``[S, T]``, each query row's
    position. A row sees position j when ``j < key_lens[s]``, ``j <= position`` (causal) and
    ``j > position - window`` (window > 0): as ``kvlab.ref.attention.visibility_mask``.
    """
    num_seqs, num_tokens, num_q_heads, head_dim = q.shape
    device = q.device
    group = num_q_heads // num_kv_heads
    rows = group * num_tokens
    # [S, Hkv, G*T, D]: the G query heads of a kv head and the T tokens are one matrix's rows
    qh = q.reshape(num_seqs, num_tokens, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    qh = qh.reshape(num_seqs, num_kv_heads, rows, head_dim)
    m = torch.full((num_seqs, num_kv_heads, rows, 1), float("-inf"), device=device)
    total = torch.zeros_like(m)
    acc = torch.zeros((num_seqs, num_kv_heads, rows, head_dim), device=device)
    neg_inf = torch.tensor(float("-inf"), device=device)
    zero = torch.tensor(0.0, device=device)
    lens = key_lens.view(num_seqs, 1, 1)
    position = positions.unsqueeze(-1)                                   # [S, T, 1]
    step = _tile_positions(num_seqs, num_kv_heads, head_dim, num_q_heads * num_tokens)
    for start in range(0, num_keys, step):
        stop = min(start + step, num_keys)
        j = torch.arange(start, stop, device=device)
        visible = j < lens                                               # [S, 1, n]
        if causal:
            visible = visible & (j <= position)                          # [S, T, n]
        if window > 0:
            visible = visible & (j > position - window)
        visible = visible.unsqueeze(1).unsqueeze(1)                      # [S, 1, 1, T|1, n]
        k = read_k(start, stop)
        s = torch.matmul(qh, k.transpose(-1, -2)).mul_(scale)            # [S, Hkv, G*T, n]
        s = torch.where(visible, s.view(num_seqs, num_kv_heads, group, num_tokens, -1), neg_inf)
        s = s.view(num_seqs, num_kv_heads, rows, -1)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isfinite(m_new), m_new, zero)  # a row that has seen nothing
        correction = torch.exp(m - m_safe)
        p = torch.exp(s - m_safe)
        total = total * correction + p.sum(-1, keepdim=True)
        v = read_v(start, stop)
        if stop > shortest:  # some sequence ends inside this tile: its padding weighs 0 * V
            v.masked_fill_((j >= lens).view(num_seqs, 1, -1, 1), 0.0)
        acc = acc * correction + torch.matmul(p, v)
        m = m_new
    out = acc / torch.where(total > 0, total, torch.ones_like(total))
    out = out.view(num_seqs, num_kv_heads, group, num_tokens, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_seqs, num_tokens, num_q_heads, head_dim)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     causal: bool = True, sliding_window: int = 0) -> torch.Tensor:
    """float32 ``[T, Hq, D]``; as :func:`kvlab.ref.attention.decode_attention`."""
    require_tensors(q=q, k=k, v=v)
    scale, window = check_decode_attention(q, k, v, scale, causal, sliding_window)
    num_tokens, length = q.shape[0], k.shape[0]
    if num_tokens == 0:
        return torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    device = q.device

    def reader(cache: torch.Tensor) -> TileReader:
        return lambda start, stop: _head_major(cache[start:stop].unsqueeze(0), None, None)

    positions = torch.arange(length - num_tokens, length, device=device).unsqueeze(0)
    lens = torch.full((1,), length, dtype=torch.int64, device=device)
    out = _attend_tiles(q.float().unsqueeze(0), k.shape[1], reader(k), reader(v), length, lens,
                        positions, length, scale, bool(causal), window)
    return out[0]


def _slot_reader(pool: torch.Tensor, scales: torch.Tensor | None, kv_dtype: str | None,
                 slots: torch.Tensor) -> TileReader:
    """Tiles of a paged pool: positions ``start .. stop-1`` of every sequence are the rows
    ``slots[:, start:stop]`` (int64 ``[S, L]``) of the pool seen as ``[slots, Hkv, D]``."""
    pool_rows = pool.view(-1, *pool.shape[2:])
    scale_rows = None if scales is None else scales.view(-1, scales.shape[2])

    def read(start: int, stop: int) -> torch.Tensor:
        tile = slots[:, start:stop]
        index = tile.reshape(-1)
        rows = pool_rows.index_select(0, index).view(*tile.shape, *pool.shape[2:])
        tile_scales = (None if scale_rows is None else
                       scale_rows.index_select(0, index).view(*tile.shape, scales.shape[2]))
        return _head_major(rows, tile_scales, kv_dtype)

    return read


def _position_slots(block_tables: torch.Tensor, rows: torch.Tensor, key_lens: torch.Tensor,
                    longest: int, block_size: int) -> torch.Tensor:
    """int64 ``[S, longest]``: the pool slot of position j of each sequence ``rows[s]`` of the
    tables. Past a sequence's length the table may hold -1 (or anything: the checks only read the
    entries a sequence uses): block 0 stands in there, and the mask hides it."""
    device = block_tables.device
    columns = -(-longest // block_size)
    table = block_tables.index_select(0, rows)[:, :columns].long()
    blocks_used = (key_lens + block_size - 1) // block_size
    table = torch.where(torch.arange(columns, device=device) < blocks_used[:, None], table, 0)
    j = torch.arange(longest, device=device)
    return table[:, j // block_size] * block_size + j % block_size


def _padded_rows(first_rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """For a batch padded to ``[S, max(tokens)]`` query rows: the row of ``q`` each padded row
    takes (sequence s's rows are ``first_rows[s] ..``; a row past its ``tokens[s]`` repeats its
    last one, and is dropped at the end)."""
    offset = np.minimum(np.arange(int(tokens.max()))[None, :], tokens[:, None] - 1)
    return (first_rows[:, None] + offset).reshape(-1)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           query_start: torch.Tensor, scale: float | None = None,
                           sliding_window: int = 0, k_scales: torch.Tensor | None = None,
                           v_scales: torch.Tensor | None = None,
                           num_splits: int | None = None, plan: Any = None) -> torch.Tensor:
    """float32 ``[T, Hq, D]``; as :func:`kvlab.ref.attention.paged_decode_attention`.

    ``num_splits`` is checked and changes nothing else: the tiles are already partitions merged
    with the log-sum-exp rescale, sized for the caches rather than counted (any S gives the same
    result up to float32 rounding, as in the reference).
    """
    require_tensors(q=q, k_pool=k_pool, v_pool=v_pool, block_tables=block_tables,
                    context_lens=context_lens, query_start=query_start, k_scales=k_scales,
                    v_scales=v_scales)
    kv_dtype, lens, starts, scale, window, _ = check_paged_decode_attention(
        q, k_pool, v_pool, block_tables, context_lens, query_start, scale, sliding_window,
        k_scales, v_scales, num_splits, plan)
    device = q.device
    tokens = np.diff(starts)
    active = np.flatnonzero(tokens > 0)  # a sequence with no query row in this step sits it out
    if active.size == 0:
        return torch.zeros(q.shape, dtype=torch.float32, device=device)
    lens, tokens = lens[active], tokens[active]
    num_seqs, rows_each = len(active), int(tokens.max())
    # a decode step (one row per sequence, every sequence in it) needs no padding: views only
    uniform = num_seqs == len(starts) - 1 and bool((tokens == rows_each).all())
    if uniform:
        q_padded = q.float()
    else:
        pick = torch.from_numpy(_padded_rows(starts[active], tokens)).to(device)
        q_padded = q.index_select(0, pick).float()
    key_lens = torch.from_numpy(lens).to(device)
    slots = _position_slots(block_tables, torch.from_numpy(active).to(device), key_lens,
                            int(lens.max()), k_pool.shape[1])
    query_pos = (key_lens - torch.from_numpy(tokens).to(device))[:, None] + torch.arange(
        rows_each, device=device)                        # token i of a step of T: len - T + i
    padded = _attend_tiles(
        q_padded.reshape(num_seqs, rows_each, *q.shape[1:]), k_pool.shape[2],
        _slot_reader(k_pool, k_scales, kv_dtype, slots),
        _slot_reader(v_pool, v_scales, kv_dtype, slots), int(lens.max()), key_lens, query_pos,
        int(lens.min()), scale, True, window).reshape(-1, *q.shape[1:])
    if uniform:
        return padded
    real = np.flatnonzero(np.arange(rows_each)[None, :] < tokens[:, None])  # q's rows, in order
    return padded.index_select(0, torch.from_numpy(real).to(device))
