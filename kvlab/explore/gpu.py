"""Notebook 07's explorer: the three ceilings on a decode kernel's bandwidth, and which one binds.

:func:`ceilings_state` is the logic (:func:`kvlab.gpu_limits.bandwidth_bounds` for a kernel
described by its instructions per byte, its resident warps, the cycles each warp waits between
two instructions, and the bytes each warp keeps in flight, on the H200 of the stored runs; the
issue rate follows from the warps, :func:`kvlab.gpu_limits.issue_rate`); :func:`ceilings_explorer`
draws the three ceilings as bars under five sliders, with what the H200 measured for torch SDPA
and for v6 beside them. The sliders start at v6 as Nsight Compute saw it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import ipywidgets as widgets

from kvlab import gpu_limits
from kvlab.explore import Explorer

# v6 on the H200, as notebook 07 §3.10 reads it from Nsight Compute: ~0.75 warp instructions per
# byte of K/V; 14.6 warps active per SM on average (4 blocks of 4 resident), each waiting 5.99
# cycles between two of its instructions (so 2.43 issued a cycle); 1 KiB in flight per warp.
# With these the issue floor is Nsight's own SM active cycles / clock: a consistency check.
V6 = dict(instructions_per_byte=0.75, warps_per_sm=14.6, cycles_between_instructions=5.99,
          bytes_in_flight_per_warp=1024)
BYTES_IN_FLIGHT_PER_WARP = (256, 512, 1024, 2048, 4096, 8192, 16384)
REGISTER_FILE_BYTES = gpu_limits.SM90.registers * 4  # where an SM's loads land: 256 KiB


@lru_cache(maxsize=None)
def _stored() -> tuple[gpu_limits.Machine, int, dict[str, float]]:
    """The H200 (its latency assumed), the bench's K/V bytes, and the seconds the H200 measured:
    torch SDPA by CUDA events, v6 (16 splits) alone by Nsight Compute."""
    from kvlab.data import load_json
    from kvlab.ncu import load_ncu_csv

    rows = load_json("bench/h200_2026-11-27.json")["rows"]
    sdpa = next(r for r in rows if r["op"] == "torch SDPA contiguous (enable_gqa)")
    v6 = next(launch for launch in load_ncu_csv("bench/h200_2026-11-27_ncu.csv")
              if launch.kernel.startswith("warp_attention_v6"))
    return gpu_limits.h200(), sdpa["bytes"], {"torch SDPA (CUDA events)": sdpa["median_s"],
                                              "v6 (Nsight Compute)": v6.metrics["Duration"] * 1e-9}


def ceilings_state(instructions_per_byte: float, warps_per_sm: float,
                   cycles_between_instructions: float, bytes_in_flight_per_warp: int,
                   latency_ns: float) -> dict[str, Any]:
    """The ceilings (bytes per second) of a kernel on the H200 with a DRAM latency of
    ``latency_ns``, its ``issue_per_cycle``, which ceiling binds (``limit``), the time it allows
    for the bench's K and V (``floor_s``; 8 sequences x 32,768 tokens, fp16: 1.07 GB), that
    bandwidth as a fraction of the copy bandwidth (``of_copy``), whether the bytes in flight
    exceed what the SM's registers can receive (``over_registers``), and the bandwidth the H200
    measured for torch SDPA and v6 (``measured``). ``warps_per_sm`` is the SM's average of
    active warps (a fraction is fine, as Nsight Compute reports it)."""
    if isinstance(warps_per_sm, bool) or not isinstance(warps_per_sm, (int, float)) or \
            not 1 <= warps_per_sm <= gpu_limits.SM90.max_warps:
        raise ValueError(f"warps_per_sm must be a number in [1, {gpu_limits.SM90.max_warps}], "
                         f"got {warps_per_sm!r}")
    machine, kv_bytes, measured_s = _stored()
    machine = gpu_limits.Machine(machine.name, machine.num_sms, machine.clock_hz,
                                 machine.memory_bytes_per_s, latency_ns * 1e-9)
    issue = gpu_limits.issue_rate(warps_per_sm, cycles_between_instructions)
    in_flight = warps_per_sm * bytes_in_flight_per_warp
    bounds = gpu_limits.bandwidth_bounds(instructions_per_byte, issue, in_flight, machine)
    floor_s, limit = gpu_limits.time_floor(kv_bytes, instructions_per_byte, issue, in_flight,
                                           machine)
    return dict(bounds=bounds, limit=limit, floor_s=floor_s, kv_bytes=kv_bytes,
                issue_per_cycle=issue, bytes_in_flight_per_sm=in_flight,
                over_registers=in_flight > REGISTER_FILE_BYTES,
                of_copy=bounds[limit] / machine.memory_bytes_per_s,
                measured={name: kv_bytes / seconds for name, seconds in measured_s.items()})


def _bytes(n: int) -> str:
    return f"{n / 1024:.3g} KiB" if n >= 1024 else f"{n:.0f} B"


def draw_ceilings(instructions_per_byte: float, warps_per_sm: float,
                  cycles_between_instructions: float, bytes_in_flight_per_warp: int,
                  latency_ns: float):
    """:func:`kvlab.plot.plot_ceilings` of one setting, titled with what binds; returns the
    Figure."""
    from kvlab.plot import plot_ceilings

    state = ceilings_state(instructions_per_byte, warps_per_sm, cycles_between_instructions,
                           bytes_in_flight_per_warp, latency_ns)
    labels = {"memory": "memory: the copy bandwidth",
              "issue": f"issue: {state['issue_per_cycle']:.2f} a cycle / "
                       f"{instructions_per_byte:.3g} a byte",
              "latency": f"latency: {_bytes(state['bytes_in_flight_per_sm'])} per SM "
                         f"/ {latency_ns:.0f} ns"}
    measured = {f"{name}, measured on the H200": bandwidth
                for name, bandwidth in state["measured"].items()}
    share = state["of_copy"]
    title = (f"{state['limit']} binds: at most {share:.0%} of the copy bandwidth, "
             if share >= 0.1 else f"{state['limit']} binds: at most {share:.1%} of the copy "
                                  f"bandwidth, ") + \
        f"{state['floor_s'] * 1e3:.3g} ms for the bench's {state['kv_bytes'] / 1e9:.2f} GB of K/V"
    if state["over_registers"]:
        title += ("\n(more in flight than an SM's 256 KiB of registers could receive with nothing "
                  "else in them)")
    ax = plot_ceilings(state["bounds"], labels, measured, title=title)
    ax.figure.set_size_inches(9.5, 3.6)
    return ax.figure


def ceilings_explorer() -> Explorer:
    """Instructions per byte, resident warps, cycles between a warp's instructions, bytes in
    flight per warp and DRAM latency -> the three ceilings, starting at v6."""
    controls = {
        "instructions_per_byte": widgets.FloatLogSlider(
            # steps of 10^0.0125 (3 %), so 0.75 = 10^-0.125 and 0.20 sit on the slider
            value=V6["instructions_per_byte"], base=10, min=-2, max=0.5, step=0.0125,
            readout_format=".3f", description="instr / byte"),
        "warps_per_sm": widgets.FloatSlider(value=V6["warps_per_sm"], min=1,
                                            max=gpu_limits.SM90.max_warps, step=0.2,
                                            readout_format=".1f", description="warps / SM"),
        "cycles_between_instructions": widgets.FloatSlider(
            value=V6["cycles_between_instructions"], min=1, max=20, step=0.01,
            description="cycles / instr", style={"description_width": "initial"}),
        "bytes_in_flight_per_warp": widgets.SelectionSlider(
            options=BYTES_IN_FLIGHT_PER_WARP, value=V6["bytes_in_flight_per_warp"],
            description="B / warp"),
        "latency_ns": widgets.IntSlider(value=round(gpu_limits.DRAM_LATENCY_S * 1e9), min=200,
                                        max=1200, step=50, description="latency ns"),
    }
    return Explorer(draw_ceilings, controls,
                    "v6 as Nsight Compute saw it. What must change for a kernel to reach the "
                    "memory roof — and what would not help?")
