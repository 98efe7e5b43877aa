"""``python -m kvlab bench``: time every stage's ops, count their bytes, compare against baselines.

For each stage (paging, quant, rope, fused_write, attention) and each op, on the chosen backend:
the shapes, the **bytes moved** (exact, from the shapes: formulas below), the median and min time
over repeated runs after a warm-up, the achieved GB/s and — the numbers that carry meaning — the
**speedup against a baseline run in the same process on the same data** (baseline median / this
median; > 1 means faster than the baseline). Baselines:

- every op against the same op on the "other" backend: numpy <-> torch on the CPU, and on a GPU the
  Numba kernels (``--backend cuda``) against kvlab's torch ops on the same GPU;
- paged decode attention against torch SDPA on contiguous K/V (``enable_gqa=True``) and against
  gather-then-SDPA; INT8 paged decode against FP16 paged decode; the op given a step plan
  (``paging.plan_step``, made once outside the timing: no index read-back) against the op without;
- the fused QKV -> cache write against the unfused ops (RoPE on Q, RoPE on K, slot mapping, write).

Timing (:mod:`kvlab.bench.timers`: :class:`CpuTimer`, :class:`TorchCudaTimer`,
:class:`NumbaCudaTimer`): warm-up calls (JIT compiles included) are not timed; on a GPU each run is
bracketed by CUDA events and the L2 cache is flushed before it by writing a 256 MiB buffer; the
device's copy bandwidth is measured once (a large device-to-device copy, bytes read + written) and
each row reports the fraction of it it reached.
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
formula of each op is in :mod:`kvlab.bench.traffic`, checked by hand in ``tests/test_bench.py``.

On the CPU absolute times describe this machine only: the ratios are what is meaningful. In Numba's
CUDA simulator times mean nothing at all (it runs each thread as Python); the simulator only ever
runs the ``smoke`` shapes, to check the code path.

Adding a stage = one ``bench_<stage>(ctx)`` function that adds its rows with ``ctx.run``, and an
entry in ``STAGES`` (:mod:`kvlab.bench.runner`).

Where each part lives:

- :mod:`~kvlab.bench.presets`: the sizes (``PRESETS``), the kernel sweeps (``SPLIT_SWEEP``,
  ``TOKENS_SWEEP``) and the model constants;
- :mod:`~kvlab.bench.traffic`: the bytes-moved formulas (``bytes_*``);
- :mod:`~kvlab.bench.timers`: the timers, :func:`measure` and :func:`side_by_side`;
- :mod:`~kvlab.bench.context`: :class:`Row` and :class:`Ctx`, what a stage function runs in;
- :mod:`~kvlab.bench.inputs`: the random decode batch and prefill every stage times on;
- :mod:`~kvlab.bench.stages` (paging, quant, rope), :mod:`~kvlab.bench.fused_write` and
  :mod:`~kvlab.bench.attention`: the stage functions;
- :mod:`~kvlab.bench.machine`: the device's name, copy bandwidth, float32 matmul rate, versions;
- :mod:`~kvlab.bench.runner`: :func:`run_bench` and ``STAGES``;
- :mod:`~kvlab.bench.report`: :func:`format_report`, :func:`markdown_summary`,
  :func:`kernel_medians` and :func:`noise_band`;
- :mod:`~kvlab.bench.cli`: :func:`cmd_bench`, the ``python -m kvlab bench`` subcommand.

The public names are re-exported here (``from kvlab.bench import run_bench``). Each is read in
the module that defines it, so a test that patches one (``SECONDS_PER_MEASUREMENT``,
``stage_built``) patches that module (``kvlab.bench.timers``, ``kvlab.bench.runner``), not this
package.
"""
from kvlab.bench.attention import bench_attention
from kvlab.bench.cli import cmd_bench
from kvlab.bench.context import Ctx, Row
from kvlab.bench.fused_write import bench_fused_write
from kvlab.bench.machine import COPY_BW_BYTES
from kvlab.bench.presets import EPS, PRESETS, SIZES, SPLIT_SWEEP, THETA, TOKENS_SWEEP
from kvlab.bench.report import format_report, kernel_medians, markdown_summary, noise_band
from kvlab.bench.runner import STAGES, Interrupted, run_bench, stage_built
from kvlab.bench.stages import bench_paging, bench_quant, bench_rope
from kvlab.bench.timers import (
    BACK_TO_BACK_MIN_BYTES, KERNEL_CALLS_PER_RUN, L2_FLUSH_BYTES, MIN_REPEATS,
    SECONDS_PER_MEASUREMENT, BackToBackTimer, CpuTimer, NumbaCudaTimer, TorchCudaTimer, measure,
    side_by_side,
)
from kvlab.bench.traffic import (
    bytes_apply_rope, bytes_copy_blocks, bytes_dequantize, bytes_gather_kv, bytes_gather_kv_quant,
    bytes_gather_then_sdpa, bytes_paged_decode, bytes_quantize, bytes_sdpa, bytes_slot_mapping,
    bytes_write_kv, bytes_write_kv_quant,
)

__all__ = [
    # presets
    "EPS", "PRESETS", "SIZES", "SPLIT_SWEEP", "THETA", "TOKENS_SWEEP",
    # traffic
    "bytes_apply_rope", "bytes_copy_blocks", "bytes_dequantize", "bytes_gather_kv",
    "bytes_gather_kv_quant", "bytes_gather_then_sdpa", "bytes_paged_decode", "bytes_quantize",
    "bytes_sdpa", "bytes_slot_mapping", "bytes_write_kv", "bytes_write_kv_quant",
    # timers
    "BACK_TO_BACK_MIN_BYTES", "KERNEL_CALLS_PER_RUN", "L2_FLUSH_BYTES", "MIN_REPEATS",
    "SECONDS_PER_MEASUREMENT", "BackToBackTimer", "CpuTimer", "NumbaCudaTimer", "TorchCudaTimer",
    "measure", "side_by_side",
    # rows, context and stages
    "Ctx", "Row", "bench_attention", "bench_fused_write", "bench_paging", "bench_quant",
    "bench_rope",
    # runner, machine, report, command line
    "COPY_BW_BYTES", "STAGES", "Interrupted", "run_bench", "stage_built", "format_report",
    "kernel_medians", "markdown_summary", "noise_band", "cmd_bench",
]
