"""``run_bench``: pick the timers and the baseline backends, run each stage in :data:`STAGES`, and
return the rows with what the run was measured on."""
from __future__ import annotations

import datetime as _dt
import importlib.util
import sys
from dataclasses import asdict
from typing import Any, Callable

from kvlab.backends import BACKENDS, cuda_mode, get_backend
from kvlab.bench.attention import bench_attention
from kvlab.bench.context import Ctx
from kvlab.bench.fused_write import bench_fused_write
from kvlab.bench.machine import (
    copy_bandwidth, device_name, fp32_matmul_tflops, library_versions,
)
from kvlab.bench.presets import PRESETS, SIZES, SPLIT_SWEEP
from kvlab.bench.stages import bench_paging, bench_quant, bench_rope
from kvlab.bench.timers import (
    KERNEL_CALLS_PER_RUN, L2_FLUSH_BYTES, BackToBackTimer, CpuTimer, NumbaCudaTimer, TorchCudaTimer,
)


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


class Interrupted(BaseException):
    """Raised by a SIGTERM during ``cmd_bench`` (``timeout`` on a rented GPU sends one); a
    BaseException so that no stage's ``except Exception`` swallows it."""


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


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

    device = device_name(backend, torch)
    copy_bw, copy_how = ((copy_bandwidth(backend, timer, torch, torch_timer))
                         if gpu_timing and backend.name != "numpy" else (None, None))
    if copy_bw is None:
        notes.append("CPU: absolute times describe this machine only; the ratios are what is "
                     "meaningful" if backend_name != "cuda" else
                     "Numba CUDA simulator: times are meaningless; this checks the code path only")

    fp32_tflops = (fp32_matmul_tflops(torch, torch_timer)
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
        "versions": library_versions(torch),
        "speedups": "{baseline impl/op: baseline median / this median} (> 1: faster)",
        "bytes": "compulsory bytes read + written by one call (formulas in kvlab/bench/traffic.py)",
    }
    return {"meta": meta, "rows": [asdict(r) for r in ctx.rows], "notes": notes}
