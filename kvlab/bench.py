"""``python -m kvlab bench``: time every stage's ops, count their bytes, compare against baselines.

For each stage (paging, quant, rope, fused_write, attention) and each op, on the chosen backend:
the shapes, the **bytes moved** (exact, from the shapes: formulas below), the median and min time
over repeated runs after a warm-up, the achieved GB/s and — the numbers that carry meaning — the
**speedup against a baseline run in the same process on the same data** (baseline median / this
median; > 1 means faster than the baseline). Baselines:

- every op against the same op on the "other" backend: numpy <-> torch on the CPU, and on a GPU the
  Numba kernels (``--backend cuda``) against kvlab's torch ops on the same GPU;
- paged decode attention against torch SDPA on contiguous K/V (``enable_gqa=True``) and against
  gather-then-SDPA; INT8 paged decode against FP16 paged decode;
- the fused QKV -> cache write against the unfused ops (RoPE on Q, RoPE on K, slot mapping, write).

Timing (:class:`CpuTimer`, :class:`TorchCudaTimer`, :class:`NumbaCudaTimer`): warm-up calls (JIT
compiles included) are not timed; on a GPU each run is bracketed by CUDA events and the L2 cache is
flushed before it by writing a 256 MiB buffer; the device's copy bandwidth is measured once (a large
device-to-device copy, bytes read + written) and each row reports the fraction of it it reached.
What is timed is the **public op** as a user calls it: argument checks (kvlab reads index arrays
back to the host to check them, docs/ops.md), output allocation and launches. On the cuda backend
the kernels are also timed **alone** (arguments checked once, outside the timing): every numbered
attention kernel version over a split-K sweep (SPLIT_SWEEP; on a GPU, where one call reads over
256 MiB, five launches back to back per run, :class:`BackToBackTimer`, so Numba's host launch path
is not counted as kernel time), the fused-write kernel over
TOKENS_SWEEP against the unfused sequence's four kernels alone. Those come after the baselines, and
a stage that raises (on a GPU: a faulting kernel leaves the context unusable) ends with a note
while the rows measured so far are kept.

Bytes moved count the compulsory traffic of one call: every input the op must read once, every
output it writes once (int32 indices 4 B each; fp16 2 B; int8 codes 1 B + one fp16 scale per
(token, kv head)). Intermediate buffers an implementation makes for itself (split-K partials, a
widened q) are not counted; a baseline that materialises a gathered copy counts that copy. The
formula of each op is written next to it below and checked by hand in ``tests/test_bench.py``.

On the CPU absolute times describe this machine only: the ratios are what is meaningful. In Numba's
CUDA simulator times mean nothing at all (it runs each thread as Python); the simulator only ever
runs the ``smoke`` shapes, to check the code path.

Adding a stage = one ``bench_<stage>(ctx)`` function returning rows, and an entry in ``STAGES``.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import math
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from kvlab.backends import BACKENDS, cuda_mode, get_backend

SIZES = ("smoke", "medium", "real")
L2_FLUSH_BYTES = 256 * 1024**2       # > any current GPU's L2 (H100: 50 MB, H200: 50 MB)
COPY_BW_BYTES = 512 * 1024**2        # each of src and dst for the copy-bandwidth measurement
SECONDS_PER_MEASUREMENT = 1.5        # repeats are cut so one measurement takes about this long
MIN_REPEATS = 3

# Shapes. "real" is the GPU target: a decode batch of 8 x 32k cached tokens (256k), 8 kv heads,
# GQA 4 (32 q heads), head_dim 128, 16-token blocks; writes/RoPE/quantization at a 4k-token prefill.
# "medium" is the same model shape at a size a CPU runs in seconds (4 x 4k cached tokens, a 2k-token
# prefill), large enough that a CPU's ratios mean something (the torch backend's CPU targets).
# "smoke" is small enough for Numba's CUDA simulator (~2 heads x ~64 tokens) and for CI.
PRESETS: dict[str, dict[str, int]] = {
    "smoke": dict(num_seqs=2, context_len=64, num_kv_heads=2, group=2, head_dim=64, block_size=16,
                  prefill=32, copy_blocks=4, num_splits=2),
    "medium": dict(num_seqs=4, context_len=4096, num_kv_heads=8, group=4, head_dim=128,
                   block_size=16, prefill=2048, copy_blocks=256, num_splits=4),
    "real": dict(num_seqs=8, context_len=32768, num_kv_heads=8, group=4, head_dim=128,
                 block_size=16, prefill=4096, copy_blocks=1024, num_splits=16),
}
# cuda backend only: notebook 05's numbered attention kernels timed alone (arguments checked once,
# outside the timing), {version: split counts} per size.
SPLIT_SWEEP = {"smoke": {1: (1, 2), 2: (2,), 3: (2,), 4: (1, 2), 5: (1, 2), 6: (2,), 7: (1, 2),
                         8: (1, 2)},
               "medium": {1: (1, 4), 2: (4,), 3: (4,), 4: (4,), 5: (4,), 6: (1, 4, 16),
                          7: (1, 4, 16), 8: (1, 4, 16)},
               "real": {1: (1, 16), 2: (16,), 3: (16,), 4: (16,), 5: (16,),
                        6: (1, 8, 16, 32, 64, 128), 7: (1, 8, 16, 32, 64, 128),
                        8: (1, 8, 16, 32, 64, 128)}}
# cuda backend only: the fused-write kernel alone, tokens carried per thread block (1: the first
# version, a block per token and head)
TOKENS_SWEEP = {"smoke": (1, 8), "medium": (1, 8, 32), "real": (1, 4, 8, 16, 32)}
EPS = 1e-6
THETA = 1e6


# --- bytes moved: exact formulas ---------------------------------------------------------------

def bytes_write_kv(tokens: int, heads: int, head_dim: int, elem: int) -> int:
    """write_kv: read k, v ``[T, H, D]`` and the int32 slots; write the same K/V bytes into the pool."""
    kv = 2 * tokens * heads * head_dim * elem
    return kv + 4 * tokens + kv


def bytes_gather_kv(context_lens: list[int], block_size: int, heads: int, head_dim: int,
                    elem: int) -> int:
    """gather_kv: read the table entries in use (one int32 per block touched) and the lengths,
    the K/V rows of every cached token; write them contiguous."""
    rows = sum(context_lens)
    kv = 2 * rows * heads * head_dim * elem
    table = 4 * sum(-(-n // block_size) for n in context_lens)
    return table + 4 * len(context_lens) + kv + kv


def bytes_copy_blocks(num_blocks: int, block_size: int, heads: int, head_dim: int,
                      elem: int) -> int:
    """copy_blocks: read src and dst ids (int32) and N whole K and V blocks; write N blocks each."""
    blocks = 2 * num_blocks * block_size * heads * head_dim * elem
    return 2 * 4 * num_blocks + blocks + blocks


def bytes_slot_mapping(tokens: int) -> int:
    """slot_mapping: read positions and one table entry per token; write one int32 slot each."""
    return 3 * 4 * tokens


def bytes_quantize(tokens: int, heads: int, head_dim: int, elem: int) -> int:
    """quantize (int8): read x; write int8 codes and one fp16 scale per (token, head)."""
    return tokens * heads * head_dim * elem + tokens * heads * (head_dim + 2)


def bytes_dequantize(tokens: int, heads: int, head_dim: int) -> int:
    """dequantize (int8): read codes and fp16 scales; write float32."""
    return tokens * heads * (head_dim + 2) + tokens * heads * head_dim * 4


def bytes_write_kv_quant(tokens: int, heads: int, head_dim: int, elem: int) -> int:
    """write_kv_quant (int8): read k, v and the slots; write codes + fp16 scales for K and V."""
    return 2 * tokens * heads * head_dim * elem + 4 * tokens + 2 * tokens * heads * (head_dim + 2)


def bytes_gather_kv_quant(context_lens: list[int], block_size: int, heads: int,
                          head_dim: int) -> int:
    """gather_kv_quant (int8): read table entries, lengths, codes + scales of every cached token;
    write float32 K and V."""
    rows = sum(context_lens)
    table = 4 * sum(-(-n // block_size) for n in context_lens)
    return (table + 4 * len(context_lens) + 2 * rows * heads * (head_dim + 2)
            + 2 * rows * heads * head_dim * 4)


def bytes_apply_rope(tokens: int, heads: int, head_dim: int, elem: int,
                     rotary_dim: int | None = None) -> int:
    """apply_rope: read x and the positions, one cos and one sin row (rotary_dim/2 float32 each)
    per token; write x rotated."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    x = tokens * heads * head_dim * elem
    return x + 4 * tokens + tokens * rotary_dim * 4 + x


def bytes_paged_decode(num_seqs: int, context_len: int, block_size: int, num_q_heads: int,
                       num_kv_heads: int, head_dim: int, q_elem: int = 2,
                       kv_dtype: str | None = None) -> int:
    """paged_decode_attention, one query row per sequence: read q, every cached K and V element
    (fp16 2 B; int8 1 B + one fp16 scale per (token, kv head)), the table entries in use, the
    lengths and query_start; write float32 out."""
    q = num_seqs * num_q_heads * head_dim * q_elem
    per_token = num_kv_heads * (head_dim + 2) if kv_dtype else num_kv_heads * head_dim * 2
    kv = 2 * num_seqs * context_len * per_token
    index = 4 * num_seqs * -(-context_len // block_size) + 4 * num_seqs + 4 * (num_seqs + 1)
    return q + kv + index + num_seqs * num_q_heads * head_dim * 4


def bytes_sdpa(num_seqs: int, context_len: int, num_q_heads: int, num_kv_heads: int,
               head_dim: int, elem: int = 2) -> int:
    """torch SDPA on contiguous K/V ``[B, Hkv, L, D]``: read q, K, V; write out (q's dtype)."""
    q = num_seqs * num_q_heads * head_dim * elem
    return 2 * q + 2 * num_seqs * context_len * num_kv_heads * head_dim * elem


def bytes_gather_then_sdpa(num_seqs: int, context_len: int, block_size: int, num_q_heads: int,
                           num_kv_heads: int, head_dim: int, elem: int = 2) -> int:
    """gather-then-SDPA: the gather (table entries + whole blocks of K and V read, the gathered
    copy written) plus SDPA on that copy."""
    blocks = -(-context_len // block_size)
    gathered = 2 * num_seqs * blocks * block_size * num_kv_heads * head_dim * elem
    return (4 * num_seqs * blocks + 2 * gathered
            + bytes_sdpa(num_seqs, context_len, num_q_heads, num_kv_heads, head_dim, elem))


# --- timers --------------------------------------------------------------------------------------

class CpuTimer:
    """Wall clock (``time.perf_counter``) around one call; ``sync`` waits for queued work."""

    def __init__(self, label: str, sync: Callable[[], None] | None = None):
        self.label = label
        self.sync = sync or (lambda: None)

    def run(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


class TorchCudaTimer:
    """``torch.cuda.Event`` pairs on the current stream; L2 flushed (a 256 MiB ``zero_``) first."""

    def __init__(self, torch: Any):
        self.torch = torch
        self.label = "torch.cuda.Event, L2 flushed before each run"
        self.flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def run(self, fn: Callable[[], Any]) -> float:
        torch = self.torch
        self.flush_buffer.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms -> s


class NumbaCudaTimer:
    """``numba.cuda.event`` pairs on the default stream; L2 flushed (a 256 MiB memset) first."""

    def __init__(self, cuda: Any, memset: Callable[[Any, int, int], None] | None = None):
        if memset is None:
            from numba.cuda.cudadrv.driver import device_memset as memset  # cuMemsetD8

        self.cuda = cuda
        self.memset = memset
        self.label = "numba.cuda.event, L2 flushed before each run"
        self.flush_buffer = cuda.device_array(L2_FLUSH_BYTES, dtype=np.uint8)

    def run(self, fn: Callable[[], Any]) -> float:
        cuda = self.cuda
        self.memset(self.flush_buffer, 0, L2_FLUSH_BYTES)
        start, end = cuda.event(timing=True), cuda.event(timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms -> s


class BackToBackTimer:
    """``calls`` runs of ``fn`` inside one run of ``timer`` (one pair of CUDA events), per run.

    Events bracket the GPU's timeline, and Numba spends ~0.1-0.4 ms on the host launching a kernel
    (H200, ``data/bench/h200_2026-11-27_host_overhead.txt``): timed alone, a kernel's time then
    includes the wait for its own launch. Launched back to back, the later launches queue while
    the earlier kernels run, so a kernel longer than its launch is timed as the GPU runs it. Used
    for the decode kernels alone where one call reads at least BACK_TO_BACK_MIN_BYTES (K/V is a
    GiB at ``--size real``), which dwarfs the L2 cache that one flush per run empties; a kernel
    whose data fits in L2 would read it warm from the second call.
    """

    def __init__(self, timer: Any, calls: int):
        self.timer, self.calls_per_run = timer, calls
        self.label = (f"{timer.label}; kernels alone over {_bytes(BACK_TO_BACK_MIN_BYTES)}: "
                      f"{calls} launches back to back per run")

    def run(self, fn: Callable[[], Any]) -> float:
        def calls() -> None:
            for _ in range(self.calls_per_run):
                fn()
        return self.timer.run(calls) / self.calls_per_run


KERNEL_CALLS_PER_RUN = 5  # BackToBackTimer's calls for the attention kernels alone, on a GPU
# Back to back only where one call's bytes are this many (the flush buffer's size, five times the
# L2 of an H100 or H200): a smaller K/V would be read from L2 by the second launch, not from DRAM.
BACK_TO_BACK_MIN_BYTES = L2_FLUSH_BYTES


def measure(timer: Any, fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls; fewer than ``repeats`` runs (at
    least MIN_REPEATS) when one run is so slow that they would take over SECONDS_PER_MEASUREMENT.
    A timer that calls ``fn`` several times a run says how many in ``calls_per_run``."""
    for _ in range(warmup):
        fn()
    times = [timer.run(fn)]
    seconds_per_run = times[0] * getattr(timer, "calls_per_run", 1)
    target = max(MIN_REPEATS, min(repeats, int(SECONDS_PER_MEASUREMENT / max(seconds_per_run, 1e-9))))
    while len(times) < min(repeats, target):
        times.append(timer.run(fn))
    return times


# --- rows and the context a stage runs in ---------------------------------------------------------

@dataclass
class Row:
    stage: str
    op: str
    impl: str                     # who ran it: "cuda", "torch-cpu", "torch-sdpa", ...
    shape: str
    bytes: int
    median_s: float
    min_s: float
    runs: int
    gb_per_s: float
    copy_bw_fraction: float | None = None   # GPU only: gb_per_s / measured copy bandwidth
    # {"impl/op" of a baseline row: baseline median / this median}; > 1 means faster than it
    speedups: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.impl}/{self.op}"


@dataclass
class Ctx:
    """What every stage function needs: backends, timers, shapes, data and a place for rows."""

    backend: Any
    impl: str
    timer: Any
    other: Any                    # the comparison backend, or None
    other_impl: str
    other_timer: Any
    torch: Any                    # the torch module when torch baselines can run, else None
    torch_device: str | None
    torch_timer: Any
    preset: str
    shape: dict[str, int]
    warmup: int
    repeats: int
    copy_bw: float | None
    progress: Any
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    _data: dict[str, Any] = field(default_factory=dict)
    kernel_timer: Any = None      # the attention kernels alone (None: ``timer``)

    def run(self, stage: str, op: str, impl: str, timer: Any, fn: Callable[[], Any], shape: str,
            nbytes: int, baseline: Row | None = None, note: str = "") -> Row:
        self.progress.set_postfix_str(f"{stage} {impl}/{op}", refresh=False)
        times = measure(timer, fn, self.warmup, self.repeats)
        median = max(statistics.median(times), 1e-9)  # a clock that reads 0 must not divide
        gbps = nbytes / median / 1e9
        row = Row(stage, op, impl, shape, int(nbytes), median, min(times), len(times), gbps,
                  gbps / self.copy_bw if self.copy_bw else None, note=note)
        if baseline is not None:
            self.compare(row, baseline)
        self.rows.append(row)
        self.progress.update(1)
        return row

    @staticmethod
    def compare(row: Row, baseline: Row) -> None:
        row.speedups[baseline.key] = baseline.median_s / row.median_s

    def pair(self, stage: str, op: str, shape: str, nbytes: int,
             make: Callable[[Any], Callable[[], Any]]) -> Row:
        """Time ``make(backend)()`` on this backend and on the other one (if any) with the same
        data; the other backend's row is the baseline. Returns this backend's row."""
        mine = self.run(stage, op, self.impl, self.timer, make(self.backend), shape, nbytes)
        if self.other is not None:
            theirs = self.run(stage, op, self.other_impl, self.other_timer, make(self.other),
                              shape, nbytes)
            self.compare(mine, theirs)
        return mine

    def data(self, name: str, build: Callable[[], Any]) -> Any:
        """Build a host array set once per process (all stages share the same data)."""
        if name not in self._data:
            self._data[name] = build()
        return self._data[name]

    def rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng(9 + salt)


def _random_bytes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random bytes; beyond 16 MB a random chunk of odd length repeats (the values do not change
    a timing, and drawing a gigabyte would take a GPU run's budget)."""
    n = math.prod(shape)
    chunk = np.frombuffer(rng.bytes(min(n, 16 * 1024**2 + 1)), np.uint8)
    return (chunk if chunk.size == n else np.resize(chunk, n)).reshape(shape)


_LEVELS = np.linspace(-1, 1, 256).astype(np.float16)


def _rand_f16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random fp16 in [-1, 1] (256 levels: timing needs no more), fast for a gigabyte of K/V."""
    return _LEVELS[_random_bytes(rng, shape)]


def _rand_int8_codes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random int8 codes in -127..127 (the int8 KV range)."""
    return np.maximum(_random_bytes(rng, shape).view(np.int8), -127)


def _fp8_codes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random E4M3 bytes, all finite: every exponent and mantissa, NaN codes moved one down."""
    codes = _random_bytes(rng, shape).copy()
    codes[(codes & 0x7F) == 0x7F] -= 1
    return codes


def _decode_batch(ctx: Ctx) -> dict[str, Any]:
    """The decode batch: shuffled block tables, fp16 pools, int8 pools (random codes + scales)."""
    s = ctx.shape
    rng = ctx.rng(1)
    b, n, h, d, bs = s["num_seqs"], s["context_len"], s["num_kv_heads"], s["head_dim"], s["block_size"]
    per_seq = -(-n // bs)
    num_blocks = b * per_seq
    pool_shape = (num_blocks, bs, h, d)
    tables = rng.permutation(num_blocks).astype(np.int32).reshape(b, per_seq)
    return dict(
        tables=tables,
        lens=np.full(b, n, np.int32),
        query_start=np.arange(b + 1, dtype=np.int32),
        q=_rand_f16(rng, (b, h * s["group"], d)),
        k_pool=_rand_f16(rng, pool_shape), v_pool=_rand_f16(rng, pool_shape),
        k_codes=_rand_int8_codes(rng, pool_shape), v_codes=_rand_int8_codes(rng, pool_shape),
        # fp8_e4m3 codes: every byte but the NaN codes 0x7f / 0xff (moved to 0x7e / 0xfe, ±448)
        k_fp8=_fp8_codes(rng, pool_shape), v_fp8=_fp8_codes(rng, pool_shape),
        k_scales=(_rand_f16(rng, pool_shape[:3]) + 1.5) / 128,   # 0.004 .. 0.02, fp16
        v_scales=(_rand_f16(rng, pool_shape[:3]) + 1.5) / 128,
    )


def _prefill(ctx: Ctx) -> dict[str, Any]:
    """A prefill of ``prefill`` tokens of one sequence: packed QKV, split q/k/v, a shuffled table."""
    from kvlab.ref.paging import slot_mapping
    from kvlab.ref.rope import rope_tables

    s = ctx.shape
    rng = ctx.rng(2)
    t, h, d, bs = s["prefill"], s["num_kv_heads"], s["head_dim"], s["block_size"]
    hq = h * s["group"]
    num_blocks = -(-t // bs)
    table = rng.permutation(num_blocks).astype(np.int32)
    positions = np.arange(t, dtype=np.int32)
    qkv = _rand_f16(rng, (t, (hq + 2 * h) * d))
    cos, sin = rope_tables(t, d, THETA)
    return dict(
        qkv=qkv, q=np.ascontiguousarray(qkv[:, :hq * d].reshape(t, hq, d)),
        k=np.ascontiguousarray(qkv[:, hq * d:(hq + h) * d].reshape(t, h, d)),
        v=np.ascontiguousarray(qkv[:, (hq + h) * d:].reshape(t, h, d)),
        table=table, positions=positions, slots=slot_mapping(table, positions, bs),
        pool_shape=(num_blocks, bs, h, d), cos=cos, sin=sin,
        q_norm_w=(1 + rng.random(d, dtype=np.float32) / 8), k_norm_w=(1 + rng.random(d, dtype=np.float32) / 8),
    )


# --- the stages ----------------------------------------------------------------------------------

def bench_paging(ctx: Ctx) -> None:
    s = ctx.shape
    h, d, bs, t = s["num_kv_heads"], s["head_dim"], s["block_size"], s["prefill"]
    pre = ctx.data("prefill", lambda: _prefill(ctx))
    dec = ctx.data("decode", lambda: _decode_batch(ctx))
    lens = [s["context_len"]] * s["num_seqs"]

    def write(be):
        k, v, slots = be.asarray(pre["k"]), be.asarray(pre["v"]), be.asarray(pre["slots"])
        kp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
        vp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
        return lambda: be.paging.write_kv(k, v, kp, vp, slots)

    ctx.pair("paging", "write_kv", f"T={t} Hkv={h} D={d} fp16", bytes_write_kv(t, h, d, 2), write)

    def slots(be):
        table, pos = be.asarray(pre["table"]), be.asarray(pre["positions"])
        return lambda: be.paging.slot_mapping(table, pos, bs)

    ctx.pair("paging", "slot_mapping", f"T={t} bs={bs}", bytes_slot_mapping(t), slots)

    def gather(be):
        kp, vp = be.asarray(dec["k_pool"]), be.asarray(dec["v_pool"])
        tables, ln = be.asarray(dec["tables"]), be.asarray(dec["lens"])
        return lambda: be.paging.gather_kv(kp, vp, tables, ln)

    ctx.pair("paging", "gather_kv", f"B={s['num_seqs']}x{s['context_len']} Hkv={h} D={d} fp16",
             bytes_gather_kv(lens, bs, h, d, 2), gather)

    n = min(s["copy_blocks"], dec["tables"].size // 2)

    def copy(be):
        kp, vp = be.asarray(dec["k_pool"]), be.asarray(dec["v_pool"])
        src = be.asarray(np.arange(n, dtype=np.int32))
        dst = be.asarray(np.arange(n, 2 * n, dtype=np.int32))
        return lambda: be.paging.copy_blocks(kp, vp, src, dst)

    ctx.pair("paging", "copy_blocks", f"N={n} bs={bs} Hkv={h} D={d} fp16",
             bytes_copy_blocks(n, bs, h, d, 2), copy)


def bench_quant(ctx: Ctx) -> None:
    s = ctx.shape
    h, d, bs, t = s["num_kv_heads"], s["head_dim"], s["block_size"], s["prefill"]
    pre = ctx.data("prefill", lambda: _prefill(ctx))
    dec = ctx.data("decode", lambda: _decode_batch(ctx))
    codes = pre["k"].astype(np.int8)  # any codes: dequantize does no checking of values
    scales = np.full((t, h), 0.01, np.float16)
    lens = [s["context_len"]] * s["num_seqs"]

    def quantize(be):
        k = be.asarray(pre["k"])
        return lambda: be.quant.quantize(k, "int8")

    ctx.pair("quant", "quantize", f"T={t} Hkv={h} D={d} fp16->int8",
             bytes_quantize(t, h, d, 2), quantize)

    def dequantize(be):
        c, sc = be.asarray(codes), be.asarray(scales)
        return lambda: be.quant.dequantize(c, sc, "int8")

    ctx.pair("quant", "dequantize", f"T={t} Hkv={h} D={d} int8->fp32",
             bytes_dequantize(t, h, d), dequantize)

    def write(be):
        k, v, slots = be.asarray(pre["k"]), be.asarray(pre["v"]), be.asarray(pre["slots"])
        kp = be.asarray(np.zeros(pre["pool_shape"], np.int8))
        vp = be.asarray(np.zeros(pre["pool_shape"], np.int8))
        ks = be.asarray(np.zeros(pre["pool_shape"][:3], np.float16))
        vs = be.asarray(np.zeros(pre["pool_shape"][:3], np.float16))
        return lambda: be.quant.write_kv_quant(k, v, kp, vp, ks, vs, slots, "int8")

    ctx.pair("quant", "write_kv_quant", f"T={t} Hkv={h} D={d} fp16->int8",
             bytes_write_kv_quant(t, h, d, 2), write)

    def gather(be):
        arrays = [be.asarray(dec[name]) for name in ("k_codes", "v_codes", "k_scales", "v_scales",
                                                     "tables", "lens")]
        return lambda: be.quant.gather_kv_quant(*arrays, "int8")

    ctx.pair("quant", "gather_kv_quant",
             f"B={s['num_seqs']}x{s['context_len']} Hkv={h} D={d} int8->fp32",
             bytes_gather_kv_quant(lens, bs, h, d), gather)


def bench_rope(ctx: Ctx) -> None:
    s = ctx.shape
    d, t = s["head_dim"], s["prefill"]
    hq = s["num_kv_heads"] * s["group"]
    pre = ctx.data("prefill", lambda: _prefill(ctx))

    def rope(be):
        q, pos = be.asarray(pre["q"]), be.asarray(pre["positions"])
        cos, sin = be.asarray(pre["cos"]), be.asarray(pre["sin"])
        return lambda: be.rope.apply_rope(q, cos, sin, pos)

    ctx.pair("rope", "apply_rope", f"T={t} H={hq} D={d} fp16 neox", bytes_apply_rope(t, hq, d, 2),
             rope)


def bench_fused_write(ctx: Ctx) -> None:
    from kvlab.ref.fused_write import write_traffic

    s = ctx.shape
    h, d, bs, t = s["num_kv_heads"], s["head_dim"], s["block_size"], s["prefill"]
    hq = h * s["group"]
    pre = ctx.data("prefill", lambda: _prefill(ctx))
    shape = f"T={t} Hq={hq} Hkv={h} D={d} fp16"

    def traffic(mode: int, step: str) -> int:
        steps = write_traffic(t, hq, h, d, qk_mode=mode)
        return steps[step]["read"] + steps[step]["write"]

    def fused(mode: int):
        def make(be):
            qkv, table = be.asarray(pre["qkv"]), be.asarray(pre["table"])
            cos, sin = be.asarray(pre["cos"]), be.asarray(pre["sin"])
            qw = be.asarray(pre["q_norm_w"]) if mode == 1 else None
            kw = be.asarray(pre["k_norm_w"]) if mode == 1 else None
            kp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
            vp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
            return lambda: be.fused_write.paged_write(qkv, qw, kw, cos, sin, kp, vp, table, 0, hq,
                                                      h, EPS, mode)
        return make

    def unfused(be):
        """RoPE on Q, RoPE on K, slot mapping, write K and V: the same result as qk_mode 2,
        one op (one launch or more) per step, from q, k, v already split (views cost nothing)."""
        q, k, v = be.asarray(pre["q"]), be.asarray(pre["k"]), be.asarray(pre["v"])
        cos, sin = be.asarray(pre["cos"]), be.asarray(pre["sin"])
        table, pos = be.asarray(pre["table"]), be.asarray(pre["positions"])
        kp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
        vp = be.asarray(np.zeros(pre["pool_shape"], np.float16))

        def run():
            q_out = be.rope.apply_rope(q, cos, sin, pos)
            k_rot = be.rope.apply_rope(k, cos, sin, pos)
            slots = be.paging.slot_mapping(table, pos, bs)
            be.paging.write_kv(k_rot, v, kp, vp, slots)
            return q_out
        return run

    base = ctx.run("fused_write", "unfused rope+write (qk_mode 2)", ctx.impl, ctx.timer,
                   unfused(ctx.backend), shape, traffic(2, "unfused"))
    mine = ctx.pair("fused_write", "fused paged_write (qk_mode 2)", shape, traffic(2, "fused"),
                    fused(2))
    ctx.compare(mine, base)
    ctx.pair("fused_write", "fused paged_write (qk_mode 1, Qwen3 norm)", shape,
             traffic(1, "fused"), fused(1))
    if ctx.backend.name == "cuda":
        from kvlab.kernels.cuda.fused_write import PAIRS_IN_REGISTERS, TOKENS_PER_BLOCK

        # kernels against kernels: the public ops above each check their arguments on the host
        unfused_alone = ctx.run("fused_write", "unfused kernels alone (qk_mode 2)", ctx.impl,
                                ctx.timer, _unfused_kernels_only(ctx, pre), shape,
                                traffic(2, "unfused"), baseline=base)
        for registers in (False, True):  # v3: heads carried in registers (no shared memory)
            for tokens in TOKENS_SWEEP[ctx.preset]:
                name = f"fused kernel alone (qk_mode 2) tokens/block={tokens}" + (
                    " in registers" if registers else "")
                kernel = ctx.run("fused_write", name, ctx.impl, ctx.timer,
                                 _fused_kernel_only(ctx, pre, hq, h, tokens, registers), shape,
                                 traffic(2, "fused"), baseline=unfused_alone)
                if (tokens, registers) == (TOKENS_PER_BLOCK, PAIRS_IN_REGISTERS):
                    ctx.compare(mine, kernel)  # < 1: what the op's checks and small copies cost
        ctx.run("fused_write", "fused kernel v4 alone (qk_mode 2) a warp per token", ctx.impl,
                ctx.timer, _fused_kernel_only(ctx, pre, hq, h, TOKENS_PER_BLOCK,
                                              PAIRS_IN_REGISTERS, version=4),
                shape, traffic(2, "fused"), baseline=unfused_alone)


def _unfused_kernels_only(ctx: Ctx, pre: dict[str, Any]) -> Callable[[], Any]:
    """The unfused sequence's four CUDA kernels (RoPE on Q, RoPE on K, slot mapping, write) launched
    directly, without the public ops' host-side checks: the fair baseline for the fused kernel
    alone. Outputs are allocated per call, as the ops (and the fused kernel) do."""
    from numba import cuda

    from kvlab.kernels.cuda import paging, rope

    be = ctx.backend
    q, k, v = be.asarray(pre["q"]), be.asarray(pre["k"]), be.asarray(pre["v"])
    cos, sin, pos = be.asarray(pre["cos"]), be.asarray(pre["sin"]), be.asarray(pre["positions"])
    table = be.asarray(pre["table"].reshape(1, -1))
    seq_ids = be.asarray(np.zeros(len(pre["positions"]), np.int32))
    kp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
    vp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
    num_tokens, block_size, rotary_dim = q.shape[0], pre["pool_shape"][1], q.shape[2]

    def rotate(x: Any) -> Any:
        out = cuda.device_array(x.shape, x.dtype)
        blocks = -(-(x.shape[0] * x.shape[1] * rotary_dim // 2) // rope.THREADS_PER_BLOCK)
        rope.apply_rope_kernel[blocks, rope.THREADS_PER_BLOCK](x, cos, sin, pos, rotary_dim,
                                                                False, out)
        return out

    def run() -> Any:
        q_out, k_rot = rotate(q), rotate(k)
        slots = cuda.device_array(num_tokens, np.int32)
        paging.slot_mapping_kernel[-(-num_tokens // paging.THREADS_PER_BLOCK),
                                   paging.THREADS_PER_BLOCK](table, pos, block_size, seq_ids,
                                                             slots)
        paging.write_kv_kernel[num_tokens, paging.THREADS_PER_BLOCK](k_rot, v, kp, vp, slots)
        return q_out
    return run


def _fused_kernel_only(ctx: Ctx, pre: dict[str, Any], hq: int, h: int,
                       tokens_per_block: int, registers: bool, version: int = 3
                       ) -> Callable[[], Any]:
    """kvlab.kernels.cuda.fused_write.launch on arguments checked once, outside the timing."""
    from kvlab.checks import check_fused_write
    from kvlab.kernels.cuda import fused_write
    from kvlab.ref.fused_write import _one_sequence

    be = ctx.backend
    qkv, cos, sin = be.asarray(pre["qkv"]), be.asarray(pre["cos"]), be.asarray(pre["sin"])
    kp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
    vp = be.asarray(np.zeros(pre["pool_shape"], np.float16))
    table, starts, offsets = (be.asarray(a) for a in _one_sequence(pre["qkv"], pre["table"], 0))
    shape = check_fused_write(qkv, None, None, cos, sin, kp, vp, table, starts, offsets, hq, h,
                              EPS, 2, None, None, None)
    return lambda: fused_write.launch(qkv, None, None, cos, sin, kp, vp, None, None, table,
                                      starts, offsets, shape, EPS, 2, None, True,
                                      tokens_per_block, registers, version=version)


def bench_attention(ctx: Ctx) -> None:
    s = ctx.shape
    b, n, h, d, bs = s["num_seqs"], s["context_len"], s["num_kv_heads"], s["head_dim"], s["block_size"]
    hq, splits = h * s["group"], s["num_splits"]
    dec = ctx.data("decode", lambda: _decode_batch(ctx))
    shape = f"B={b}x{n} Hq={hq} Hkv={h} D={d}"
    be = ctx.backend
    on_device: dict[tuple[str, str], Any] = {}  # one device copy per (backend, array), read only

    def arrays(backend: Any, *names: str) -> list[Any]:
        for name in names:
            if (backend.name, name) not in on_device:
                on_device[backend.name, name] = backend.asarray(dec[name])
        return [on_device[backend.name, name] for name in names]

    def paged(kv_dtype: str | None, num_splits: int | None, backend: Any = None):
        backend = backend or be
        qq, tt, ll, ss = arrays(backend, "q", "tables", "lens", "query_start")
        if kv_dtype is None:
            kp, vp = arrays(backend, "k_pool", "v_pool")
            ks = vs = None
        else:
            kp, vp, ks, vs = arrays(backend, "k_codes", "v_codes", "k_scales", "v_scales")
        return lambda: backend.attention.paged_decode_attention(
            qq, kp, vp, tt, ll, ss, k_scales=ks, v_scales=vs, num_splits=num_splits)

    fp16 = {}
    for num_splits in sorted({1, splits}):
        name = f"paged decode fp16 splits={num_splits}"
        fp16[num_splits] = ctx.run("attention", name, ctx.impl, ctx.timer, paged(None, num_splits),
                                   shape + " fp16", bytes_paged_decode(b, n, bs, hq, h, d))
        ctx.run("attention", f"paged decode int8 splits={num_splits}", ctx.impl, ctx.timer,
                paged("int8", num_splits), shape + " int8",
                bytes_paged_decode(b, n, bs, hq, h, d, kv_dtype="int8"),
                baseline=fp16[num_splits])
    if be.name == "cuda":  # num_splits=None: the op picks S for the device (the simulator: 1)
        from kvlab.kernels.cuda.attention import device_num_splits

        auto = device_num_splits(b, hq, h, n)
        fp16["auto"] = ctx.run("attention", f"paged decode fp16 splits=auto ({auto})", ctx.impl,
                               ctx.timer, paged(None, None), shape + " fp16",
                               bytes_paged_decode(b, n, bs, hq, h, d))
    if ctx.other is not None:
        theirs = ctx.run("attention", "paged decode fp16 splits=1", ctx.other_impl,
                         ctx.other_timer, paged(None, 1, ctx.other), shape + " fp16",
                         bytes_paged_decode(b, n, bs, hq, h, d))
        ctx.compare(fp16[1], theirs)

    baselines = _sdpa_rows(ctx, dec, shape, lambda: paged(None, 1)())
    # the kernels alone come last: a kernel that faults leaves the CUDA context unusable, and the
    # baselines above are then already measured
    kernels = _attention_kernel_rows(ctx, arrays, shape, fp16) if be.name == "cuda" else []
    for row in [*fp16.values(), *kernels]:
        for baseline in baselines:
            ctx.compare(row, baseline)


def _sdpa_rows(ctx: Ctx, dec: dict[str, Any], shape: str,
               paged_fp16: Callable[[], Any]) -> list[Row]:
    """torch SDPA on contiguous K/V (enable_gqa) and gather-then-SDPA on the same data, after a
    check that the paged op computes what SDPA computes; [] without torch."""
    s = ctx.shape
    b, n, h, d, bs = s["num_seqs"], s["context_len"], s["num_kv_heads"], s["head_dim"], s["block_size"]
    hq = h * s["group"]
    torch = ctx.torch
    if torch is None:
        return []
    dev = ctx.torch_device
    F = torch.nn.functional
    tq = torch.from_numpy(dec["q"]).to(dev).unsqueeze(2)                       # [B, Hq, 1, D]
    contiguous = {name: torch.from_numpy(dec[name][dec["tables"]].reshape(b, -1, h, d)[:, :n])
                  .to(dev).transpose(1, 2).contiguous() for name in ("k_pool", "v_pool")}
    k_pool_t, v_pool_t = (torch.from_numpy(dec[x]).to(dev) for x in ("k_pool", "v_pool"))
    table_t = torch.from_numpy(dec["tables"]).to(dev).long()

    def sdpa():
        return F.scaled_dot_product_attention(tq, contiguous["k_pool"], contiguous["v_pool"],
                                              enable_gqa=True)

    def gather_then_sdpa():
        k = k_pool_t[table_t].reshape(b, -1, h, d)[:, :n].transpose(1, 2)      # [B, Hkv, L, D]
        v = v_pool_t[table_t].reshape(b, -1, h, d)[:, :n].transpose(1, 2)
        return F.scaled_dot_product_attention(tq, k, v, enable_gqa=True)

    # Same data: check the paged result against SDPA once before timing anything against it.
    want = sdpa().squeeze(2).float().cpu().numpy()
    got = ctx.backend.to_numpy(paged_fp16())
    err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
    note = f"max|paged - sdpa| / max|sdpa| = {err:.1e}"
    if not err <= 2e-2:  # fp16 SDPA output vs float32 paged: ~1e-3; wrong data gives ~1
        ctx.notes.append(f"attention: paged decode differs from torch SDPA ({note}): NOT the "
                         "same computation, ratios against SDPA are suspect")
    ref = ctx.run("attention", "torch SDPA contiguous (enable_gqa)", f"torch-sdpa-{dev}",
                  ctx.torch_timer, sdpa, shape + " fp16", bytes_sdpa(b, n, hq, h, d), note=note)
    gts = ctx.run("attention", "torch gather-then-SDPA", f"torch-sdpa-{dev}", ctx.torch_timer,
                  gather_then_sdpa, shape + " fp16", bytes_gather_then_sdpa(b, n, bs, hq, h, d))
    if dev != "cpu":
        return [ref, gts]
    # torch has no fast float16 SDPA on a CPU (measured ~5x slower than float32 at --size medium):
    # there the fair baseline is SDPA on the contiguous K/V widened to float32 beforehand
    tq32, k32, v32 = (x.float() for x in (tq, contiguous["k_pool"], contiguous["v_pool"]))
    fp32 = ctx.run("attention", "torch SDPA contiguous fp32 (enable_gqa)", f"torch-sdpa-{dev}",
                   ctx.torch_timer,
                   lambda: F.scaled_dot_product_attention(tq32, k32, v32, enable_gqa=True),
                   shape + " fp32", bytes_sdpa(b, n, hq, h, d, elem=4))
    return [ref, gts, fp32]


def _attention_kernel_rows(ctx: Ctx, arrays: Callable[..., list[Any]], shape: str,
                           public: dict[int, Row]) -> list[Row]:
    """The CUDA attention kernels alone (``kvlab.kernels.cuda.attention.launch`` on arguments
    checked once, outside the timing): every numbered version over SPLIT_SWEEP, and v2-v7 on int8 and
    fp8 pools. Returns the fp16 rows (for the SDPA comparisons)."""
    from kvlab.checks import check_paged_decode_attention
    from kvlab.kernels.cuda import attention

    s = ctx.shape
    b, n, h, d, bs = s["num_seqs"], s["context_len"], s["num_kv_heads"], s["head_dim"], s["block_size"]
    hq = h * s["group"]
    be = ctx.backend
    q, tables, lens, starts = arrays(be, "q", "tables", "lens", "query_start")
    pools = {None: arrays(be, "k_pool", "v_pool") + [None, None],
             "int8": arrays(be, "k_codes", "v_codes", "k_scales", "v_scales"),
             "fp8_e4m3": arrays(be, "k_fp8", "v_fp8", "k_scales", "v_scales")}

    def launch(version: int, kv_dtype: str | None, num_splits: int):
        kp, vp, ks, vs = pools[kv_dtype]
        _, _, _, scale, window, splits = check_paged_decode_attention(
            q, kp, vp, tables, lens, starts, None, 0, ks, vs, num_splits)
        return lambda: attention.launch(q, kp, vp, ks, vs, kv_dtype, tables, lens, starts, scale,
                                        window, True, splits, version=version)

    rows: list[Row] = []

    def timer_for(nbytes: int) -> Any:
        big = ctx.kernel_timer is not None and nbytes >= BACK_TO_BACK_MIN_BYTES
        return ctx.kernel_timer if big else ctx.timer
    for version, sweep in SPLIT_SWEEP[ctx.preset].items():
        if version == 8:  # and the split count v8's own rule picks for this GPU (one wave)
            sweep = tuple(sorted({*sweep, attention.device_num_splits(b, hq, h, n, version=8)}))
        for num_splits in sweep:
            nbytes = bytes_paged_decode(b, n, bs, hq, h, d)
            try:
                row = ctx.run("attention", f"kernel v{version} fp16 splits={num_splits}", ctx.impl,
                              timer_for(nbytes), launch(version, None, num_splits), shape + " fp16",
                              nbytes, note=attention.VERSIONS[version].split(":")[0])
            except Exception as exc:  # noqa: BLE001  (one failing version must not end a GPU run)
                ctx.notes.append(f"attention kernel v{version} splits={num_splits} failed: "
                                 f"{type(exc).__name__}: {exc}")
                continue
            if num_splits in public and version == attention.DEFAULT_VERSION:
                # < 1: what the op's checks, host copies and launches cost on top of the kernel
                ctx.compare(public[num_splits], row)
            rows.append(row)
    for version in sorted(set(attention.VERSIONS) - {1}):  # int8 / fp8 at each one's best split
        best = min((r for r in rows if r.op.startswith(f"kernel v{version} ")),
                   key=lambda r: r.median_s, default=None)
        if best is None:
            continue
        num_splits = int(best.op.rsplit("=", 1)[1])
        for kv_dtype in ("int8", "fp8_e4m3"):
            nbytes = bytes_paged_decode(b, n, bs, hq, h, d, kv_dtype=kv_dtype)
            try:
                ctx.run("attention", f"kernel v{version} {kv_dtype} splits={num_splits}", ctx.impl,
                        timer_for(nbytes), launch(version, kv_dtype, num_splits),
                        shape + f" {kv_dtype}", nbytes, baseline=best)
            except Exception as exc:  # noqa: BLE001
                ctx.notes.append(f"attention kernel v{version} {kv_dtype} failed: "
                                 f"{type(exc).__name__}: {exc}")
    return rows


STAGES: dict[str, Callable[[Ctx], None]] = {
    "paging": bench_paging,
    "quant": bench_quant,
    "rope": bench_rope,
    "fused_write": bench_fused_write,
    "attention": bench_attention,
}


def stage_built(stage: str, backend_name: str) -> bool:
    """True when the stage's reference module and this backend's module exist."""
    package = {"numpy": "kvlab.ref", "cuda": "kvlab.kernels.cuda", "torch": "kvlab.kernels.mps"}
    return all(importlib.util.find_spec(f"{package[name]}.{stage}") is not None
               for name in ("numpy", backend_name))


# --- devices, baselines, metadata ---------------------------------------------------------------

def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _device_name(backend: Any, torch: Any) -> str:
    if backend.name == "cuda" and backend.device == "gpu":
        from numba import cuda

        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    if backend.name == "cuda":
        return "Numba CUDA simulator on " + (platform.processor() or platform.machine())
    if backend.name == "torch" and backend.device.startswith("cuda"):
        return torch.cuda.get_device_name()
    if backend.name == "torch" and backend.device == "mps":
        return "Apple MPS"
    return f"CPU {platform.processor() or platform.machine()}"


def _copy_bandwidth(backend: Any, timer: Any, torch: Any,
                    torch_timer: Any = None) -> tuple[float, str]:
    """GB/s of a device-to-device copy of COPY_BW_BYTES, counting bytes read + written: the faster
    of Numba's copy (cuMemcpyDtoD) and torch's ``copy_`` when both can run (on an H100 the driver's
    copy measured 2.5 TB/s while torch SDPA read K/V at 2.9 TB/s: the slower copy is no roof).
    Returns ``(GB/s, which copy)``."""
    def timed(fn: Callable[[], Any], clock: Any) -> float:
        return 2 * COPY_BW_BYTES / statistics.median(measure(clock, fn, 2, 10)) / 1e9

    rates = []  # (GB/s, how)
    if backend.name == "cuda":
        from numba import cuda

        src = cuda.device_array(COPY_BW_BYTES, np.uint8)
        dst = cuda.device_array(COPY_BW_BYTES, np.uint8)
        rates.append((timed(lambda: dst.copy_to_device(src), timer), "numba copy_to_device"))
        del src, dst
    device = backend.device if backend.name == "torch" else "cuda"
    if backend.name == "torch" or (torch_timer is not None and torch.cuda.is_available()):
        src = torch.empty(COPY_BW_BYTES, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        rates.append((timed(lambda: dst.copy_(src), torch_timer or timer), "torch copy_"))
    return max(rates)


def _fp32_matmul_tflops(torch: Any, timer: Any) -> float:
    """TFLOP/s of a 4096^3 float32 matrix product through torch (cuBLAS) with TF32 off: the
    measured ceiling of plain float32 arithmetic, the compute roof of notebook 05's roofline."""
    n = 4096
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        times = measure(timer, lambda: a @ b, 2, 10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return 2 * n**3 / statistics.median(times) / 1e12


def _progress(quiet: bool) -> Any:
    try:
        from tqdm.auto import tqdm  # a widget bar in JupyterLab, a text bar in a terminal
    except ImportError:  # the GPU machines may lack tqdm: a one-line-per-op stand-in
        class tqdm:  # noqa: N801
            def __init__(self, disable=False, **_):
                self.disable, self.n, self.stage = disable, 0, None

            def set_postfix_str(self, text, refresh=True):
                stage = text.split()[0]
                if not self.disable and stage != self.stage:
                    print(f"kvlab bench: {stage} ...", file=sys.stderr, flush=True)
                self.stage = stage

            def update(self, k=1):
                self.n += k

            def close(self):
                pass
    return tqdm(desc="kvlab bench", unit="run", file=sys.stderr, disable=quiet, leave=False,
                mininterval=0.5)


def _versions(torch: Any) -> dict[str, str | None]:
    out = {"python": platform.python_version(), "numpy": np.__version__,
           "torch": getattr(torch, "__version__", None), "numba": None, "numba_cuda": None}
    if "numba" in sys.modules:
        import numba

        out["numba"] = numba.__version__
        try:
            from importlib.metadata import version

            out["numba_cuda"] = version("numba-cuda")
        except Exception:  # noqa: BLE001  (metadata is informative only)
            pass
    return out


def run_bench(backend_name: str = "numpy", stages: list[str] | None = None,
              size: str | None = None, warmup: int | None = None, repeats: int | None = None,
              quiet: bool = True) -> dict[str, Any]:
    """Run the benchmark; return ``{"meta": {...}, "rows": [...], "notes": [...]}``.

    Raises ValueError for a bad backend/stage/size (or ``real`` shapes in the CUDA simulator).
    """
    if backend_name not in BACKENDS:
        raise ValueError(f"unknown backend {backend_name!r}; choose one of {', '.join(BACKENDS)}")
    stages = list(STAGES) if not stages else stages
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))}; known stages: "
                         f"{', '.join(STAGES)}")
    on_gpu = backend_name == "cuda" and cuda_mode() == "gpu"
    if size is None:
        size = "real" if on_gpu else "smoke"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if backend_name == "cuda" and cuda_mode() == "simulator" and size != "smoke":
        raise ValueError(f"the cuda backend runs in Numba's CUDA simulator here (no GPU), which is "
                         f"far too slow for --size {size}; use --size smoke (the default here)")

    backend = get_backend(backend_name)
    torch = _import_torch()
    notes: list[str] = []
    torch_device = None
    if torch is not None:
        if backend_name == "numpy":
            torch_device = "cpu"
        elif backend_name == "torch":
            torch_device = backend.device
        elif on_gpu:
            torch_device = "cuda" if torch.cuda.is_available() else None
            if torch_device is None:
                notes.append("torch.cuda is not available: torch baselines skipped")
        else:
            notes.append("cuda simulator: torch baselines skipped (nothing to compare on a "
                          "simulated device)")
    else:
        notes.append("torch is not installed: torch baselines skipped")

    gpu_timing = on_gpu or (torch_device or "").startswith("cuda")
    if warmup is None:
        warmup = 2 if gpu_timing else 1
    if repeats is None:
        repeats = 2 if backend_name == "cuda" and not on_gpu else (20 if gpu_timing else 10)

    def cpu_timer(label: str, be: Any = None) -> CpuTimer:
        return CpuTimer(label, be.synchronize if be is not None else None)

    if on_gpu:
        from numba import cuda

        timer = NumbaCudaTimer(cuda)
    elif backend_name == "torch" and backend.device.startswith("cuda"):
        timer = TorchCudaTimer(torch)
    else:
        timer = cpu_timer("time.perf_counter" + (" (simulator: times are meaningless)"
                                                  if backend_name == "cuda" else ""), backend)
    torch_timer = None
    if torch_device is not None:
        torch_timer = (TorchCudaTimer(torch) if torch_device.startswith("cuda")
                       else cpu_timer("time.perf_counter"))

    impl = backend_name if backend_name != "torch" else f"torch-{backend.device}"
    other, other_impl, other_timer = None, "", None
    if backend_name == "numpy" and torch is not None:
        other, other_impl, other_timer = get_backend("torch", "cpu"), "torch-cpu", torch_timer
    elif backend_name == "torch" and backend.device == "cpu":
        other, other_impl, other_timer = get_backend("numpy"), "numpy", cpu_timer("perf_counter")
    elif on_gpu and torch_device == "cuda":
        other, other_impl, other_timer = get_backend("torch", "cuda"), "torch-cuda", torch_timer
    if other is None:
        notes.append(f"no second backend to compare {impl}'s ops with"
                     + (" (run --backend cuda for the Numba kernels)" if impl.startswith("torch-") else ""))

    device = _device_name(backend, torch)
    copy_bw, copy_how = ((_copy_bandwidth(backend, timer, torch, torch_timer))
                         if gpu_timing and backend.name != "numpy" else (None, None))
    if copy_bw is None:
        notes.append("CPU: absolute times describe this machine only; the ratios are what is "
                     "meaningful" if backend_name != "cuda" else
                     "Numba CUDA simulator: times are meaningless; this checks the code path only")

    fp32_tflops = (_fp32_matmul_tflops(torch, torch_timer)
                   if torch_timer is not None and torch_device.startswith("cuda") else None)
    progress = _progress(quiet)
    ctx = Ctx(backend, impl, timer, other, other_impl, other_timer,
              torch if torch_device else None, torch_device, torch_timer, size, PRESETS[size],
              warmup, repeats, copy_bw, progress, notes)
    if on_gpu:
        ctx.kernel_timer = BackToBackTimer(timer, KERNEL_CALLS_PER_RUN)
    skipped = []
    try:
        for stage in stages:
            if not stage_built(stage, backend_name):
                skipped.append(stage)
                notes.append(f"{stage}: not built yet")
                continue
            try:
                STAGES[stage](ctx)
            except Exception as exc:  # noqa: BLE001  (keep the rows measured so far)
                if not on_gpu and not gpu_timing:
                    raise  # on a CPU a failure is a bug to see, not a device fault to survive
                notes.append(f"{stage}: stopped by {type(exc).__name__}: {exc}")
    except (KeyboardInterrupt, Interrupted) as exc:  # a time limit ran out: keep what was measured
        notes.append(f"interrupted ({exc or type(exc).__name__}) after {len(ctx.rows)} rows: "
                     "a partial result, later rows and stages were not run")
    finally:
        progress.close()
    meta = {
        "device": device, "backend": backend_name, "backend_description": backend.describe(),
        "cuda_mode": cuda_mode() if backend_name == "cuda" else None,
        "timer": timer.label, "baseline_timer": getattr(torch_timer, "label", None),
        "kernel_timer": getattr(ctx.kernel_timer, "label", None),
        "l2_flush_bytes": L2_FLUSH_BYTES if gpu_timing else None,
        "copy_bandwidth_gb_per_s": copy_bw, "copy_bandwidth_by": copy_how,
        "fp32_matmul_tflops": fp32_tflops,
        "size": size, "shape": PRESETS[size], "split_sweep": SPLIT_SWEEP[size],
        "warmup": warmup, "repeats": repeats, "stages": stages, "not_built": skipped,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(torch), "speedups": "{baseline impl/op: baseline median / this median} (> 1: faster)",
        "bytes": "compulsory bytes read + written by one call (formulas in kvlab/bench.py)",
    }
    return {"meta": meta, "rows": [asdict(r) for r in ctx.rows], "notes": notes}


# --- output --------------------------------------------------------------------------------------

def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"kvlab bench — {meta['device']} — backend {meta['backend_description']} — "
        f"size {meta['size']} — {meta['date']}",
        f"timer: {meta['timer']}" + (f"; baselines: {meta['baseline_timer']}"
                                     if meta["baseline_timer"] and meta["baseline_timer"] != meta["timer"] else ""),
    ]
    if meta["copy_bandwidth_gb_per_s"]:
        lines.append(f"device copy bandwidth (D2D, read + write): {meta['copy_bandwidth_gb_per_s']:,.0f} GB/s")
    if meta.get("fp32_matmul_tflops"):
        lines.append(f"float32 matrix product (torch, TF32 off): {meta['fp32_matmul_tflops']:.1f} TFLOP/s")
    lines.append("speedup = baseline median / this median (> 1: faster than the baseline); "
                 f"times are medians on {meta['device']}")
    gpu = meta["copy_bandwidth_gb_per_s"] is not None
    for stage in meta["stages"]:
        rows = [r for r in result["rows"] if r["stage"] == stage]
        lines.append("")
        if not rows:
            lines.append(f"== {stage}: not built yet" if stage in meta["not_built"] else f"== {stage}: no rows")
            continue
        lines.append(f"== {stage}")
        op_w = max(len(r["op"]) for r in rows)
        impl_w = max(4, *(len(r["impl"]) for r in rows))
        shape_w = max(5, *(len(r["shape"]) for r in rows))
        lines.append(f"{'op':<{op_w}}  {'impl':<{impl_w}}  {'shape':<{shape_w}}  {'bytes':>10}  "
                     f"{'median':>9}  {'min':>9}  {'GB/s':>8}" + ("  %copy" if gpu else "")
                     + "  speedup vs")
        for r in rows:
            ratio = "; ".join(f"{x:.2f}x vs {k}" for k, x in r["speedups"].items())
            line = (f"{r['op']:<{op_w}}  {r['impl']:<{impl_w}}  {r['shape']:<{shape_w}}  "
                    f"{_bytes(r['bytes']):>10}  {_time(r['median_s']):>9}  {_time(r['min_s']):>9}  "
                    f"{r['gb_per_s']:>8.2f}")
            if gpu:
                line += f"  {100 * r['copy_bw_fraction']:>4.0f}%"
            lines.append((line + "  " + ratio + ("  " + r["note"] if r["note"] else "")).rstrip())
    if result["notes"]:
        lines += ["", *(f"note: {n}" for n in result["notes"])]
    return "\n".join(lines)


def markdown_summary(result: dict[str, Any], stages: tuple[str, ...] = ("attention", "fused_write"),
                     ) -> str:
    """A Markdown table of a result's rows for ``stages`` (README and notebook 05 quote it; a test
    keeps the README's copy equal to this function's output on the stored result)."""
    meta = result["meta"]
    copy = meta["copy_bandwidth_gb_per_s"]
    lines = [f"Measured on {meta['device']}, {meta['date'][:10]}, `python -m kvlab bench --backend "
             f"{meta['backend']} --size {meta['size']}` (medians"
             + (f"; copy bandwidth {copy:,.0f} GB/s" if copy else "") + "):", "",
             "| stage | op | impl | median | GB/s | % of copy |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if r["stage"] in stages:
            copy = "" if r["copy_bw_fraction"] is None else f"{100 * r['copy_bw_fraction']:.0f}%"
            lines.append(f"| {r['stage']} | {r['op']} | {r['impl']} | {_time(r['median_s'])} | "
                         f"{r['gb_per_s']:,.0f} | {copy} |")
    return "\n".join(lines)


class Interrupted(BaseException):
    """Raised by a SIGTERM during ``cmd_bench`` (``timeout`` on a rented GPU sends one); a
    BaseException so that no stage's ``except Exception`` swallows it."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def cmd_bench(args: Any) -> int:
    """The ``bench`` subcommand (``kvlab.__main__`` parses the arguments). A SIGTERM or Ctrl-C
    ends the run early but still prints and saves the rows measured so far (exit status 1)."""
    stages = None
    if args.stage:
        stages = [s.strip() for part in args.stage for s in part.split(",") if s.strip()]
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        result = run_bench(args.backend, stages, args.size, args.warmup, args.repeats, args.quiet)
    finally:  # printing and saving what was measured are not to be cut short by a late SIGTERM
        signal.signal(signal.SIGTERM, previous)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
    return 1 if any(n.startswith("interrupted (") for n in result["notes"]) else 0
