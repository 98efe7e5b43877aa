"""A measured row (:class:`Row`) and what every stage function runs in (:class:`Ctx`): backends,
timers, shapes, the shared data, and the rows measured so far."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kvlab.bench.timers import measure


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
