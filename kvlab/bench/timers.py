"""Timers (wall clock on a CPU, CUDA events with an L2 flush on a GPU) and :func:`measure`, which
times one call after a warm-up and plans how many repeats fit in a measurement."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from kvlab.bench.report import format_bytes

L2_FLUSH_BYTES = 256 * 1024**2       # > any current GPU's L2 (H100: 50 MB, H200: 50 MB)
SECONDS_PER_MEASUREMENT = 1.5        # repeats are cut so one measurement takes about this long
MIN_REPEATS = 3


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
        self.label = (f"{timer.label}; kernels alone over {format_bytes(BACK_TO_BACK_MIN_BYTES)}"
                      f": {calls} launches back to back per run")

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


def side_by_side(fns: dict[str, Callable[[], Any]], timer: Any, warmup: int = 1,
                 rounds: int = 7) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, timed in turns: one call of each per round,
    ``rounds`` rounds, after ``warmup`` untimed calls of each.

    Interleaved, a busy moment of a shared machine (another process taking a core for a second)
    slows one call of every function, not all the calls of one: on a 2-core CPU the ratio of two
    ops timed one after the other moved from 0.6 to 1.0 between runs, where both ops were
    unchanged. For the ratios a notebook shows on the reader's own machine. It evens out a
    passing burst, not a steady load: on a loaded machine an op of many small steps (a tiled torch
    op) loses more than one of a few large ones (SDPA), so compare ratios from an idle machine.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, "
                         f"warmup={warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timer.run(fn))
    return {name: float(np.median(t)) for name, t in times.items()}
