"""What one SM of a GPU holds, and the three ceilings on the bandwidth a kernel can reach.

Notebook 07 reads its kernels' speed through two small models, kept here so that its exercises,
its explorer and the kernels' own reports (``python -m kvlab.kernels.cuda.ptx --budget``) share
one definition:

- **Occupancy** (:func:`block_limits`, :func:`blocks_per_sm`): how many thread blocks of a kernel
  one SM keeps resident, from its registers per thread, threads per block and shared memory per
  block — the rules of NVIDIA's occupancy calculator (``cuda_occupancy.h``) for compute
  capability 9.0 (H100, H200): registers are handed out per warp in units of 256, from the four
  quarters of the register file (one per scheduler) separately; shared memory per block in units
  of 128 bytes plus 1 KiB the driver reserves for each block. ``tests/test_gpu_limits.py`` holds
  the rules against the block limits Nsight Compute reported for the kernels profiled on an H200
  (three configurations) and against hand-worked cases of the header's rules.
- **Three bandwidth ceilings** (:func:`bandwidth_bounds`, :func:`time_floor`): a kernel that
  streams bytes from DRAM reads no faster than

  - *memory*: the card's copy bandwidth — a practical roof rather than a hard one: a copy reads
    and writes, and a kernel that only reads can beat it a little (torch SDPA read at 1.17x the
    copy bandwidth on the H100 of the stored runs, whose copy was timed with Numba's copy kernel;
    at 1.00x on the H200, timed with torch's copy);
  - *issue*: SMs x clock x warp instructions issued per cycle per SM ÷ warp instructions per byte
    (each SM issues at most 4 warp instructions a cycle, one per scheduler);
  - *latency* (Little's law): SMs x bytes in flight per SM ÷ DRAM latency — the loads outstanding
    at any moment must add up to bandwidth x latency.

  The smallest ceiling binds. The issue and latency ceilings are bounds, not a simulation: a
  kernel runs at or below them, and the model says which change can help (fewer instructions per
  byte, a higher issue rate, more bytes in flight) and which cannot. The issue rate is itself an
  outcome (:func:`issue_rate`): an SM issues from the warps that are ready, so it is at most its
  resident warps ÷ the cycles each warp waits between two instructions, and at most 4.

- **Coalescing** (:func:`sectors_touched`): the memory system serves a warp's load instruction
  in 32-byte sectors, so what one instruction costs the memory is the sectors its 32 lanes'
  bytes fall in, whatever the bytes it uses.

The H200's figures come from the stored runs (:func:`h200`): its SM count and clock from Nsight
Compute, its copy bandwidth from the benchmark's own copy. Its DRAM latency is **not measured
here**: ``DRAM_LATENCY_S`` is an assumed round figure of the order of published GPU DRAM latencies
(several hundred nanoseconds), which is why notebook 07's explorer lets the reader move it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WARP_SIZE = 32
SUB_PARTITIONS = 4             # an SM's schedulers, each with a quarter of the register file
ISSUE_PER_SM_PER_CYCLE = 4      # 4 schedulers per SM, one warp instruction per cycle each
DRAM_LATENCY_S = 600e-9         # assumed, not measured here (see the module's docstring)
SECTOR_BYTES = 32               # the unit in which the memory system serves a warp's loads


@dataclass(frozen=True)
class SmResources:
    """What one SM offers the blocks resident on it (compute capability 9.0 by default, from the
    CUDA C++ Programming Guide's table of compute capabilities and NVIDIA's occupancy calculator).

    registers: 32-bit registers per SM; register_unit: registers are allocated per warp, rounded
    up to a multiple of this; max_registers_per_thread: what ptxas may give one thread.
    max_warps, max_blocks: resident warps and blocks per SM; max_threads_per_block: a block's size.
    shared_unit: shared memory is allocated per block rounded up to this; shared_reserved_per_block:
    what the driver keeps for each block (Nsight Compute's "Driver Shared Memory Per Block");
    max_shared_per_sm: the largest shared-memory carve-out an SM can be configured with (the
    driver picks the carve-out per kernel; Nsight Compute reports it as "Shared Memory
    Configuration Size").
    """

    registers: int = 65_536
    register_unit: int = 256
    max_registers_per_thread: int = 255
    max_warps: int = 64
    max_blocks: int = 32
    max_threads_per_block: int = 1024
    shared_unit: int = 128
    shared_reserved_per_block: int = 1024
    max_shared_per_sm: int = 228 * 1024


SM90 = SmResources()


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _int_at_least(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def block_limits(registers_per_thread: int, threads_per_block: int, shared_bytes_per_block: int,
                 shared_bytes_per_sm: int, sm: SmResources = SM90) -> dict[str, int]:
    """Resident blocks per SM that each resource alone allows, named as Nsight Compute's "Block
    Limit ..." rows: ``registers``, ``shared`` (static + dynamic shared memory of a block against
    the SM's configured ``shared_bytes_per_sm``), ``warps`` and ``blocks`` (the SM's block slots).

    Registers, as ``cuda_occupancy.h`` counts them: a warp's registers (``registers_per_thread``
    x 32) are rounded up to a multiple of 256 and come from one quarter of the register file (one
    scheduler's), so an SM holds 4 x (65,536 / 4 // a warp's registers) warps. Raises ValueError
    for a block no SM could run: too many threads, registers or shared bytes — the hardware also
    refuses a block whose warps, rounded up to a multiple of 4, would need more than 65,536
    registers.
    """
    _int_at_least("registers_per_thread", registers_per_thread, 1)
    _int_at_least("threads_per_block", threads_per_block, 1)
    _int_at_least("shared_bytes_per_block", shared_bytes_per_block, 0)
    _int_at_least("shared_bytes_per_sm", shared_bytes_per_sm, 0)
    if registers_per_thread > sm.max_registers_per_thread:
        raise ValueError(f"registers_per_thread must be <= {sm.max_registers_per_thread}, "
                         f"got {registers_per_thread}")
    if threads_per_block > sm.max_threads_per_block:
        raise ValueError(f"threads_per_block must be <= {sm.max_threads_per_block}, "
                         f"got {threads_per_block}")
    if shared_bytes_per_sm > sm.max_shared_per_sm:
        raise ValueError(f"shared_bytes_per_sm must be <= {sm.max_shared_per_sm}, "
                         f"got {shared_bytes_per_sm}")
    warps = -(-threads_per_block // WARP_SIZE)  # a partial warp still takes a whole one
    registers_per_warp = _round_up(registers_per_thread * WARP_SIZE, sm.register_unit)
    warps_by_registers = sm.registers // SUB_PARTITIONS // registers_per_warp * SUB_PARTITIONS
    shared = _round_up(shared_bytes_per_block, sm.shared_unit) + sm.shared_reserved_per_block
    by_shared = shared_bytes_per_sm // shared
    # (warps_by_registers < warps is the header's hardware check: the block's warps, rounded up
    # to a multiple of 4, would need more than the register file)
    if warps_by_registers < warps or by_shared == 0:
        raise ValueError(
            f"a block of {threads_per_block} threads x {registers_per_thread} registers and "
            f"{shared_bytes_per_block} shared bytes does not fit on one SM "
            f"({sm.registers} registers in {SUB_PARTITIONS} quarters, {shared_bytes_per_sm} "
            f"shared bytes configured)")
    return {"registers": warps_by_registers // warps, "shared": by_shared,
            "warps": sm.max_warps // warps, "blocks": sm.max_blocks}


def blocks_per_sm(registers_per_thread: int, threads_per_block: int, shared_bytes_per_block: int,
                  shared_bytes_per_sm: int, sm: SmResources = SM90) -> int:
    """Blocks of a kernel one SM holds at once: the smallest of :func:`block_limits`."""
    return min(block_limits(registers_per_thread, threads_per_block, shared_bytes_per_block,
                            shared_bytes_per_sm, sm).values())


# --- the three ceilings ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    """The figures the ceilings need. name: the card; num_sms: its SMs; clock_hz: the SM clock
    under load; memory_bytes_per_s: the copy bandwidth (bytes read + written per second);
    latency_s: DRAM latency, the time a load takes to come back."""

    name: str
    num_sms: int
    clock_hz: float
    memory_bytes_per_s: float
    latency_s: float = DRAM_LATENCY_S


def h200(latency_s: float = DRAM_LATENCY_S) -> Machine:
    """The H200 of the stored runs: SMs and clock as Nsight Compute reported them while profiling
    the v6 decode kernel, copy bandwidth as the benchmark measured it (torch ``copy_``)."""
    from kvlab.data import load_json
    from kvlab.ncu import load_ncu_csv

    profiled = next(launch for launch in load_ncu_csv("bench/h200_2026-11-27_ncu.csv")
                    if launch.kernel.startswith("warp_attention_v6"))
    meta = load_json("bench/h200_2026-11-27.json")["meta"]
    return Machine(meta["device"], int(profiled.metrics["# SMs"]),
                   float(profiled.metrics["SM Frequency"]),
                   float(meta["copy_bandwidth_gb_per_s"]) * 1e9, latency_s)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def issue_rate(warps_per_sm: float, cycles_between_instructions: float) -> float:
    """Warp instructions an SM issues per cycle when each of its ``warps_per_sm`` resident warps
    waits ``cycles_between_instructions`` cycles between two of its own (Nsight Compute's "Warp
    Cycles Per Issued Instruction": its dependencies, memory waits, and turns it lost to other
    warps), capped at the SM's 4: ``min(4, warps / cycles)``. A model, not a law: adding warps
    can lengthen every warp's wait (more of them share the memory and the schedulers)."""
    return min(float(ISSUE_PER_SM_PER_CYCLE),
               _positive("warps_per_sm", warps_per_sm)
               / _positive("cycles_between_instructions", cycles_between_instructions))


def issue_bound(instructions_per_byte: float, issue_per_cycle: float, num_sms: int,
                clock_hz: float) -> float:
    """Bytes per second a kernel can stream when issuing its instructions is the only limit:
    ``num_sms * clock_hz * issue_per_cycle / instructions_per_byte``."""
    _positive("instructions_per_byte", instructions_per_byte)
    if not 0 < _positive("issue_per_cycle", issue_per_cycle) <= ISSUE_PER_SM_PER_CYCLE:
        raise ValueError(f"issue_per_cycle must be in (0, {ISSUE_PER_SM_PER_CYCLE}], "
                         f"got {issue_per_cycle}")
    return (_positive("num_sms", num_sms) * _positive("clock_hz", clock_hz) * issue_per_cycle
            / instructions_per_byte)


def bandwidth_bounds(instructions_per_byte: float, issue_per_cycle: float,
                     bytes_in_flight_per_sm: float, machine: Machine) -> dict[str, float]:
    """The three ceilings, bytes per second: ``memory`` (the copy bandwidth), ``issue``
    (:func:`issue_bound`) and ``latency`` (Little's law: ``num_sms * bytes_in_flight_per_sm /
    latency_s``, with ``bytes_in_flight_per_sm`` the loads an SM's resident warps keep out)."""
    return {"memory": _positive("machine.memory_bytes_per_s", machine.memory_bytes_per_s),
            "issue": issue_bound(instructions_per_byte, issue_per_cycle, machine.num_sms,
                                 machine.clock_hz),
            "latency": machine.num_sms * _positive("bytes_in_flight_per_sm", bytes_in_flight_per_sm)
            / _positive("machine.latency_s", machine.latency_s)}


def time_floor(kv_bytes: float, instructions_per_byte: float, issue_per_cycle: float,
               bytes_in_flight_per_sm: float, machine: Machine) -> tuple[float, str]:
    """The least time a kernel can take to stream ``kv_bytes``, and the ceiling that sets it
    (``"memory"``, ``"issue"`` or ``"latency"``): ``kv_bytes`` over the smallest of
    :func:`bandwidth_bounds`."""
    bounds = bandwidth_bounds(instructions_per_byte, issue_per_cycle, bytes_in_flight_per_sm,
                              machine)
    limit = min(bounds, key=bounds.get)
    return _positive("kv_bytes", kv_bytes) / bounds[limit], limit


def sectors_touched(byte_addresses: np.ndarray, bytes_per_lane: int) -> int:
    """The 32-byte sectors one warp-wide load instruction touches: lane i reads ``bytes_per_lane``
    bytes from ``byte_addresses[i]`` (ints, one per lane; -1 for a lane that loads nothing). A
    lane's bytes may straddle two sectors; lanes that read the same sector share it."""
    per_lane = _int_at_least("bytes_per_lane", bytes_per_lane, 1)
    addresses = np.asarray(byte_addresses, dtype=np.int64).ravel()
    starts = addresses[addresses >= 0]
    first, last = starts // SECTOR_BYTES, (starts + per_lane - 1) // SECTOR_BYTES
    return len({int(sector) for a, b in zip(first, last) for sector in range(a, b + 1)})
