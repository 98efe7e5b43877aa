"""Decode attention as Numba CUDA kernels: the ops of :mod:`kvlab.ref.attention`, on a GPU.

This module is the one to read first: the public ops (:func:`paged_decode_attention`,
:func:`decode_attention`), :func:`launch` (any numbered version on checked arguments) and the
split-K choice. The kernels live beside it, one module per stage of their history:

- :mod:`~kvlab.kernels.cuda.attention_v8` — **v8**, the design for instructions per byte: read
  it second.
- :mod:`~kvlab.kernels.cuda.attention_tiles` — **v1**, the first readable design, and what every
  version shares (a row's positions, the split-K merge).
- :mod:`~kvlab.kernels.cuda.attention_warps` — **v2-v7**, the ladder between them.

Eight versions, numbered the way llm.c's ``dev/cuda`` numbers its kernels: each one change, its
reason, its measured effect (notebook 07_gpu_performance tells their story from the stored GPU runs; ``VERSIONS`` names the change;
``DEFAULT_VERSION`` is what the public ops launch). Every name below is importable from here.

- **v1, tiles** (``_attend``): simple, and slow on a GPU: each thread reads one key's whole row
  (a warp's load touches 32 rows: uncoalesced), and one thread per query head computes the
  softmax statistics of a tile while the others wait.
- **v2, warps** (``warp_attention_v2_kernel``): a group of lanes shares one key (each lane a slice
  of its dims, so a warp's loads are contiguous), the dot product is summed across the group with
  warp shuffles, and every group keeps its own online softmax and output in registers — no
  barrier inside the loop over keys. The groups' partial results are merged once at the end.
- **v3, batched loads**: v2's loads sit behind branches (the pool's kind, ``d < head_dim``), so
  each waits for the one before; v3 issues all of a key's loads first, branch-free.
- **v4, pipelined**: v3 with the next key's loads issued one step ahead.
- **v5, wide loads**: v3 reading the pools as 8-byte words (``pool.view(np.uint64)``, no copy):
  a lane holds whole words (runs of neighbouring dims), so its fp16 slice of a key is 2 loads
  instead of 8 (int8/fp8: 1 instead of 8), the lanes' loads interleaved so each instruction reads
  one contiguous run, and unpacks them with integer steps (:func:`_unpack`,
  :func:`_half_from_bits`: a Numba kernel cannot reinterpret 16 bits as a float16).
- **v6, occupancy**: v5 compiled with launch bounds of ``BLOCKS_PER_SM`` blocks per SM: v5 needs
  ~150 registers per thread, so an SM holds 3 blocks (12 warps); bounded, the compiler fits 128
  (spilling a few bytes) and an SM holds 4 — more warps to hide memory latency with.
- **v7, key chunks**: v5 taking ``KEYS_PER_STEP`` keys per stream per step: all their loads
  first, then their scores, then one rescale of the softmax state per chunk (v2-v6 rescale the
  whole accumulator at every key) and ``exp2`` on scores kept in base 2 (q scaled by log2 e):
  fewer instructions per key and more bytes in flight per warp. Launch bounds of
  ``CHUNK_BLOCKS_PER_SM``.
- **v8, instructions per byte**: 16-byte loads, every q head of a GQA group per CTA, a
  reduce-scatter of the dots so each score's softmax is computed once, compile-time shapes,
  split-K in whole blocks (:mod:`~kvlab.kernels.cuda.attention_v8` says why).

Measured on an H200 (2026-11-27, ``data/bench/h200_2026-11-27.json``, fp16, 16 splits, kernel
alone): v1 6.01 ms, v2 2.26, v3 1.72, v4 1.74, v5 1.81, v6 1.57, v7 1.60 — torch SDPA on
contiguous K/V 0.26 ms. Nsight Compute puts v6 at 17% of DRAM bandwidth and 59% "Compute (SM)
Throughput" with 23% occupancy: latency-bound, with instruction issue next (notebook 07_gpu_performance).
v8 has not run on a GPU yet; ``python -m kvlab.kernels.cuda.ptx --budget`` counts its main loop's
instructions per KV byte against v2-v7's.

In the simulator the warp shuffles of v2-v8 run as shared-memory exchanges with barriers
(:mod:`kvlab.kernels.cuda._warp`), so the tests check their lane logic against NumPy. Pools
may be float16/float32, or int8 / uint8 (fp8_e4m3) codes dequantized on read with their fp16
scales (a float pool gets a dummy scale array and ``kind`` says which). Launch wrappers have the
reference's names and parameters, check the arguments first (:mod:`kvlab.checks`) and take and
return Numba device arrays; the output is float32.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvlab.checks import check_decode_attention, check_paged_decode_attention
from kvlab.kernels.cuda import MODE, attention_v8, cuda
from kvlab.kernels.cuda.attention_tiles import (  # noqa: F401  (re-exported: notebooks, tests)
    GROUP_TILE, KIND_FLOAT, KIND_FP8, KIND_INT8, MAX_HEAD_DIM, THREADS_PER_BLOCK, _attend,
    merge_splits_kernel, paged_attention_split_kernel, widen_kernel)
from kvlab.kernels.cuda.attention_warps import (  # noqa: F401  (re-exported: notebooks, tests)
    BLOCKS_PER_SM, CHUNK_BLOCKS_PER_SM, DIM_SLOTS, HEAD_TILE, KEYS_PER_STEP, LANES, WARP_KERNELS,
    WARP_THREADS, WARPS, WIDE_KERNELS, _half_from_bits, _load_key, _load_words, _make_warp_kernel,
    _unpack, _wide_dim, lanes_per_key, warp_attention_v2_kernel, warp_attention_v3_kernel,
    warp_attention_v4_kernel)
from kvlab.kernels.cuda.attention_v8 import RESIDENT_BLOCKS as V8_RESIDENT_BLOCKS
from kvlab.step_plan import upload_together

# --- launch wrappers -----------------------------------------------------------------------------

_NO_SCALES = None  # a 1x1x1 fp16 dummy for float pools, made once per process
# Scratch reused across calls. Safe because every launch here goes to the legacy default stream of
# one context, so a launch never overlaps the previous call's; per-thread default streams
# (NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM) with several host threads would need one per stream.
_WORKSPACE: dict[str, Any] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """A device array for the launches' own scratch (a widened q, split-K partials), kept for the
    next call of the same shape: ``cuda.device_array`` is a cuMemAlloc each time (Numba has no
    caching allocator), which would cost a decode step tens of microseconds."""
    buf = _WORKSPACE.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = _WORKSPACE[name] = cuda.device_array(shape, dtype)
    return buf


def _dummy_scales() -> Any:
    global _NO_SCALES
    if _NO_SCALES is None:
        _NO_SCALES = cuda.to_device(np.zeros((1, 1, 1), np.float16))
    return _NO_SCALES


VERSIONS = {
    1: "tiles: a thread per key (uncoalesced K rows), softmax statistics by one thread per head",
    2: "warps: lanes share a key (coalesced), shuffle-summed dots, online softmax in registers",
    3: "batched loads: v2 with every K/V load of a key issued before any is used (no branches)",
    4: "pipelined: v3 with the next key's loads issued a step ahead",
    5: "wide loads: v3 reading the pools as 8-byte words (4 fp16, 8 int8/fp8), coalesced",
    6: "occupancy: v5 compiled for 4 blocks per SM (launch bounds): 128 registers, 16 warps",
    7: "key chunks: v5 taking 2 keys per stream per step, one softmax rescale per chunk, exp2",
    8: "instructions per byte: 16-byte loads, all q heads of a group per CTA, a reduce-scatter "
       "so each score's softmax runs once, compile-time shapes, split-K in whole blocks",
}
# What the public ops launch: the fastest version measured on a real GPU that passes `pytest -m gpu`
# (v6: H200, 2026-11-27, 1.57 ms at the bench shape against v2's 2.26 ms; notebook 07). v8 is
# checked in the simulator and by ptxas only: it takes over when a GPU run measures it faster.
DEFAULT_VERSION = 6


# --- split-K chosen for the device ---------------------------------------------------------------

MIN_KEYS_PER_SPLIT = 256  # a partition's fixed cost (its setup, partial row, share of the merge)
#                           is a few keys' worth; below ~256 keys it stops paying for itself


# Blocks of each version one SM holds at once, from the registers and shared memory the driver
# reported on an H200 (data/bench/h200_2026-11-27_resources.json; 65,536 registers per SM): v1 96
# registers x 128 threads and 20.6 KB shared -> 5; v2-v5 148-168 registers -> 3; v6 and v7 as
# their launch bounds promise. Another compiler may allocate differently; the rule only needs the
# order of magnitude.
# v8: from ptxas's registers (fp16; attention_v8.RESIDENT_BLOCKS_BY_ELEM per pool), not yet from
# a GPU run; its own split rule is one_wave_splits.
RESIDENT_BLOCKS = {1: 5, 2: 3, 3: 3, 4: 3, 5: 3, 6: BLOCKS_PER_SM, 7: CHUNK_BLOCKS_PER_SM,
                   8: V8_RESIDENT_BLOCKS}
WAVES = 1.5  # blocks asked for, in units of what the GPU holds at once (see auto_num_splits)


def auto_num_splits(base_blocks: int, longest_context: int, num_sms: int,
                    resident_blocks: int) -> int:
    """Split-K partitions per sequence when the caller leaves ``num_splits=None``.

    A decode launch has ``base_blocks`` thread blocks per partition (query rows x kv heads x head
    tiles): 8 sequences x 8 kv heads = 64, on 132 SMs. Splitting each sequence S ways multiplies the
    blocks by S. The rule: the smallest power of two S with
    ``base_blocks * S >= WAVES * num_sms * resident_blocks`` (``resident_blocks``: blocks of the
    kernel one SM holds at once, ``RESIDENT_BLOCKS``), no partition shorter than
    ``MIN_KEYS_PER_SPLIT`` keys. Under one wave, SMs sit idle; every extra wave adds partial rows
    to merge and partitions whose setup is not amortized. WAVES = 1.5 is fit to the two sweeps
    measured so far, and the power of two lands it at 1.9-2.6 waves there: v2 on the H100 (3
    resident blocks: picks 16 splits, the fastest; 8 splits, 1.3 waves, were 26% slower) and v6 on
    the H200 (4 resident: picks 16, 1.57 ms against the best 1.56 at 8 splits; 64 splits, 7.8
    waves, 1.66 ms). The first rule counted the thread limit's 16 slots instead and picked 64.
    Powers of two because the benchmark sweeps them. Flash-decoding (Dao et al., 2023) and
    FlashAttention-2's split heuristic reason alike: split only while the GPU is not yet full.
    """
    for name, value in (("base_blocks", base_blocks), ("num_sms", num_sms),
                        ("resident_blocks", resident_blocks)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    most = max(1, longest_context // MIN_KEYS_PER_SPLIT)
    splits = 1
    while base_blocks * splits < WAVES * num_sms * resident_blocks and splits * 2 <= most:
        splits *= 2
    return splits


def one_wave_splits(base_blocks: int, longest_context: int, num_sms: int,
                    resident_blocks: int) -> int:
    """v8's split-K partitions per sequence when the caller leaves ``num_splits=None``: as many
    as fill **one wave** — ``S = floor(num_sms * resident_blocks / base_blocks)``, at least 1, no
    partition shorter than ``MIN_KEYS_PER_SPLIT`` keys — and not rounded to a power of two.

    v2-v7 scan their partition key by key, so a block that ends early leaves its SM's slot idle
    and more, smaller blocks (``auto_num_splits``: ~2 waves) balance better. A v8 CTA streams
    whole cache blocks with its warps independent, every CTA of a decode step gets the same share
    of blocks, so one wave has no tail: each SM runs its resident CTAs once, and every extra
    partition only adds a partial row to merge. Bench shape (8 sequences x 8 kv heads = 64 CTAs per
    split, 132 SMs, 3 resident): S = 6, 384 CTAs = 0.97 waves. The rule is from the design, not
    yet from a GPU sweep (the bench sweeps v8's splits).
    """
    for name, value in (("base_blocks", base_blocks), ("num_sms", num_sms),
                        ("resident_blocks", resident_blocks)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    most = max(1, longest_context // MIN_KEYS_PER_SPLIT)
    return max(1, min(most, num_sms * resident_blocks // base_blocks))


def _head_blocks(num_q_heads: int, num_kv_heads: int, version: int) -> int:
    """The grid's second axis: kv heads x the head tiles of one GQA group."""
    tile = {1: GROUP_TILE, 8: attention_v8.heads_per_cta(num_q_heads // num_kv_heads)}.get(
        version, HEAD_TILE)
    return num_kv_heads * (-(-(num_q_heads // num_kv_heads) // tile))


def device_num_splits(num_rows: int, num_q_heads: int, num_kv_heads: int, longest_context: int,
                      version: int = DEFAULT_VERSION, elem_bytes: int = 2) -> int:
    """:func:`auto_num_splits` (v8: :func:`one_wave_splits`) for a launch of ``version`` on this
    process's device, over a pool of ``elem_bytes`` per element. The simulator gets 1: it has no
    SMs to fill, and every partition costs it real time."""
    if MODE != "gpu" or num_rows == 0:
        return 1
    base = num_rows * _head_blocks(num_q_heads, num_kv_heads, version)
    num_sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    if version == 8:
        return one_wave_splits(base, longest_context, num_sms,
                               attention_v8.RESIDENT_BLOCKS_BY_ELEM[elem_bytes])
    return auto_num_splits(base, longest_context, num_sms, RESIDENT_BLOCKS[version])


def _as_words(pool: Any) -> Any:
    """``pool`` seen as uint64 words (a view), or None when v5 cannot read it that way: rows that
    are not whole 8-byte words, a pool that is not on the device (Numba copies a host array in;
    the kernels read any CUDA array), or one whose rows do not start on an 8-byte boundary (a GPU
    faults on a misaligned 8-byte load; kvlab's pools start on 256-byte ones, a view into someone
    else's buffer might not). The simulator has no pointers to check."""
    if (pool.shape[3] * pool.dtype.itemsize) % 8:
        return None
    if MODE == "gpu":
        if not cuda.is_cuda_array(pool):
            return None
        pool = cuda.as_cuda_array(pool)
        if (pool.device_ctypes_pointer.value or 0) % 8:
            return None
    return pool.view(np.uint64)


def launch(q, k_pool, v_pool, k_scales, v_scales, kv_dtype, block_tables, context_lens,
           query_start, scale, window, causal, num_splits, version=DEFAULT_VERSION):
    """Launch kernel version ``version`` on arguments **already checked** (the public ops below
    check them first); returns float32 ``[T, Hq, D]``. Public so that the benchmark and notebook
    05 can time the kernels alone and compare versions on the same data."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {sorted(VERSIONS)}, got {version!r}")
    num_rows, num_q_heads, head_dim = q.shape
    out = cuda.device_array((num_rows, num_q_heads, head_dim), np.float32)
    if num_rows == 0:
        return out
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {MAX_HEAD_DIM}, the kernels' shared memory size")
    if num_splits > 65535:  # a CUDA grid's z dimension
        raise ValueError(f"num_splits must be <= 65535 on a GPU, got {num_splits}")
    kind = {None: KIND_FLOAT, "int8": KIND_INT8, "fp8_e4m3": KIND_FP8}[kv_dtype]
    if kv_dtype is None:
        k_scales = v_scales = _dummy_scales()
    part_out = _workspace("part_out", (num_rows, num_q_heads, num_splits, head_dim), np.float32)
    part_lse = _workspace("part_lse", (num_rows, num_q_heads, num_splits), np.float32)
    if version == 8:  # reads an fp16 q itself; pools it cannot take run v5
        if attention_v8.launch(q, k_pool, v_pool, k_scales, v_scales, kind, block_tables,
                               context_lens, query_start, scale, window, causal, part_out,
                               part_lse):
            merge_splits_kernel[(num_rows, num_q_heads), THREADS_PER_BLOCK](part_out, part_lse,
                                                                            out)
            return out
        version = 5
    if q.dtype == np.float16:
        wide = _workspace("q", q.shape, np.float32)
        rows = q.shape[0] * q.shape[1]
        widen_kernel[-(-rows // THREADS_PER_BLOCK), THREADS_PER_BLOCK](q, wide)
        q = wide
    heads = _head_blocks(num_q_heads, k_pool.shape[2], version)
    args = (q, k_pool, v_pool, k_scales, v_scales, np.int32(kind), block_tables, context_lens,
            query_start, np.float32(scale), np.int32(window), np.int32(causal))
    words = (_as_words(k_pool), _as_words(v_pool)) if version >= 5 else (None, None)
    if version >= 5 and any(w is None for w in words):
        version = 3  # pools v5 cannot read as words: v3, the same steps with narrow loads
    if version == 1:
        paged_attention_split_kernel[(num_rows, heads, num_splits), THREADS_PER_BLOCK](
            *args, part_out, part_lse)
    elif version >= 5:  # the same pools seen as 8-byte words (a view: nothing is copied)
        WIDE_KERNELS[version, k_pool.dtype.itemsize][(num_rows, heads, num_splits), WARP_THREADS](
            args[0], *words, *args[3:], np.int32(lanes_per_key(head_dim)), part_out, part_lse)
    else:
        WARP_KERNELS[version][(num_rows, heads, num_splits), WARP_THREADS](
            *args, np.int32(lanes_per_key(head_dim)), part_out, part_lse)
    merge_splits_kernel[(num_rows, num_q_heads), THREADS_PER_BLOCK](part_out, part_lse, out)
    return out


def decode_attention(q: Any, k: Any, v: Any, scale: float | None = None, causal: bool = True,
                     sliding_window: int = 0) -> Any:
    """float32 ``[T, Hq, D]`` device array; as :func:`kvlab.ref.attention.decode_attention`.

    A contiguous cache is a pool of one block of L slots: the same kernels, with a one-entry table.
    """
    scale, window = check_decode_attention(q, k, v, scale, causal, sliding_window)
    length, num_kv_heads, head_dim = k.shape
    if q.shape[0] == 0:
        return cuda.device_array(q.shape, np.float32)
    k_pool = k.reshape(1, length, num_kv_heads, head_dim)
    v_pool = v.reshape(1, length, num_kv_heads, head_dim)
    # the one-entry table [[0]], the length and query_start [0, T]: one host-to-device copy
    # (each small copy is a synchronous allocation and transfer), three views of it
    _, (table, lens, starts) = upload_together([[[0]], [length], [0, q.shape[0]]],
                                               cuda.to_device)
    return launch(q, k_pool, v_pool, None, None, None, table, lens, starts, scale, window,
                  bool(causal), 1)


def paged_decode_attention(q: Any, k_pool: Any, v_pool: Any, block_tables: Any,
                           context_lens: Any, query_start: Any, scale: float | None = None,
                           sliding_window: int = 0, k_scales: Any = None, v_scales: Any = None,
                           num_splits: int | None = None, plan: Any = None) -> Any:
    """float32 ``[T, Hq, D]`` device array; as :func:`kvlab.ref.attention.paged_decode_attention`
    (device arrays; index arrays int32). ``num_splits=None``: chosen for the device
    (:func:`device_num_splits`). With a ``plan``, no index array is read back from the device."""
    kv_dtype, lens, _, scale, window, splits = check_paged_decode_attention(
        q, k_pool, v_pool, block_tables, context_lens, query_start, scale, sliding_window,
        k_scales, v_scales, num_splits, plan)
    if splits is None:
        splits = device_num_splits(q.shape[0], q.shape[1], k_pool.shape[2],
                                   int(lens.max(initial=0)), elem_bytes=k_pool.dtype.itemsize)
    return launch(q, k_pool, v_pool, k_scales, v_scales, kv_dtype, block_tables, context_lens,
                  query_start, scale, window, True, splits)
