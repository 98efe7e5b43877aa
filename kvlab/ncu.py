"""Read an Nsight Compute report saved as CSV (``ncu --csv --page details``), such as
``data/bench/h200_2026-11-27_ncu.csv``.

Nsight Compute (``ncu``) replays a kernel launch and reports, section by section, what the GPU did:
its duration, how busy DRAM and the SMs were, occupancy, registers, stall reasons. Its CSV has one
row per (launch, metric); this module folds them into one record per launch so a notebook can
print a table. Values are parsed as numbers where they are numbers (``"3,199,436.5"`` -> float).
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field

from kvlab.data import data_path


@dataclass
class NcuLaunch:
    """One profiled kernel launch.

    kernel: the kernel's name without Numba's mangled suffix (``warp_attention_v2_kernel``).
    block, grid: the launch's block and grid sizes as ncu printed them (``"(128, 1, 1)"``).
    metrics: ``{metric name: value}`` (numbers as float, others as str), units in ``units``.
    """
    kernel: str
    block: str
    grid: str
    metrics: dict[str, float | str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)


def _value(text: str) -> float | str:
    plain = text.replace(",", "")
    try:
        return float(plain)
    except ValueError:
        return text


def parse_ncu_csv(text: str) -> list[NcuLaunch]:
    """Launches of an ``ncu --csv --page details`` report, in the order ncu profiled them.

    Lines before the header (ncu's ``==PROF==`` notes) are skipped; rows without a metric name
    (a section's rule advice) are left out."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError('not an ncu CSV report: no header line starting with "ID"')
    launches: dict[str, NcuLaunch] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if row["ID"] not in launches:
            name = row["Kernel Name"].split("(", 1)[0].split("[", 1)[0]
            launches[row["ID"]] = NcuLaunch(re.sub(r"^\w+::", "", name), row["Block Size"],
                                            row["Grid Size"])
        if row["Metric Name"]:
            launch = launches[row["ID"]]
            launch.metrics[row["Metric Name"]] = _value(row["Metric Value"])
            launch.units[row["Metric Name"]] = row["Metric Unit"]
    return list(launches.values())


def load_ncu_csv(name: str) -> list[NcuLaunch]:
    """:func:`parse_ncu_csv` of ``data/<name>``."""
    return parse_ncu_csv(data_path(name).read_text(encoding="utf-8"))
