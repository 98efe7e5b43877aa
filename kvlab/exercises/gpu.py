"""Exercises of notebook 07 (GPU performance): how many blocks an SM holds, how many 32-byte
sectors a warp's load touches, which of three ceilings sets a kernel's speed, how many
split-K partitions fill one wave, and how far two runs of the same kernels disagree.

Each is checked against the code the project runs: occupancy against
:func:`kvlab.gpu_limits.blocks_per_sm` (itself held against the block limits Nsight Compute
reported on an H200, tests/test_gpu_limits.py), the sectors against
:func:`kvlab.gpu_limits.sectors_touched`, the ceilings against
:func:`kvlab.gpu_limits.time_floor`, the split count against the rule decode kernel v8 launches
with (:func:`kvlab.kernels.cuda.attention.one_wave_splits`), the noise band against
:func:`kvlab.bench.report.noise_band`.
"""
from __future__ import annotations

import numpy as np

from kvlab import gpu_limits
from kvlab.bench.report import kernel_medians, noise_band
from kvlab.exercises.core import Case, Exercise, register
from kvlab.gpu_limits import SM90, Machine

NOTEBOOK = "07_gpu_performance"
H200_SHARED_CONFIG = 135_168  # the carve-out the driver chose for the kernels profiled (132 KiB)


# --- 07.blocks_per_sm --------------------------------------------------------------------------

def blocks_per_sm_solution(registers_per_thread: int, threads_per_block: int,
                           shared_bytes_per_block: int, shared_bytes_per_sm: int) -> int:
    """Blocks of a kernel one SM (compute capability 9.0) holds at once."""
    warps = -(-threads_per_block // 32)                  # a partial warp takes a whole one
    per_warp = -(-registers_per_thread * 32 // 256) * 256  # registers go to warps, in 256s,
    warps_by_registers = 65_536 // 4 // per_warp * 4       # from each quarter of the file
    by_registers = warps_by_registers // warps
    shared = -(-shared_bytes_per_block // 128) * 128 + 1024  # + the driver's 1 KiB per block
    by_shared = shared_bytes_per_sm // shared
    by_warps = 64 // warps
    return min(by_registers, by_shared, by_warps, 32)    # 32: the SM's block slots


def _blocks_per_sm_cases() -> list[Case]:
    def case(label, registers, threads, shared, config=H200_SHARED_CONFIG, random=False):
        return Case(label, dict(registers_per_thread=registers, threads_per_block=threads,
                                shared_bytes_per_block=shared, shared_bytes_per_sm=config),
                    random=random)

    cases = [
        case("decode v2 on the H200: 159 registers x 128 threads", 159, 128, 20_480),
        case("decode v6: launch bounds held it to 128 registers", 128, 128, 20_480),
        case("the fused write: 48 registers, 4.5 KiB shared", 48, 128, 4_608),
        case("97 registers, 2 warps: 256-register units, from each quarter of the file", 97, 64,
             0),
        case("33 registers, 2 warps: each quarter holds 12 warps of 1,280 registers", 33, 64, 0),
        case("33,000 shared bytes: the driver's 1 KiB per block counts", 32, 128, 33_000),
        case("9,300 shared bytes are allocated as 9,344", 32, 64, 9_300),
        case("9,350 shared bytes are allocated as 9,472", 32, 64, 9_350),
        case("3 warps of 24 registers: the SM's 64 warps bind", 24, 96, 0),
        case("80 threads are 3 warps, not 2.5", 16, 80, 0),
        case("a 64 KiB carve-out: shared memory binds", 128, 128, 20_480, 65_536),
        case("one warp of 16 registers: the SM's 32 block slots bind", 16, 32, 0,
             SM90.max_shared_per_sm),
        case("a 1,024-thread block", 64, 1024, 0),
    ]
    rng = np.random.default_rng(7)
    while sum(c.random for c in cases) < 5:
        registers = int(rng.integers(16, 256))
        threads = int(rng.choice([32, 64, 96, 128, 192, 256, 512]))
        shared = int(rng.choice([0, 1_000, 4_608, 12_000, 20_480, 48_000]))
        config = int(rng.choice([65_536, H200_SHARED_CONFIG, SM90.max_shared_per_sm]))
        try:
            gpu_limits.blocks_per_sm(registers, threads, shared, config)
        except ValueError:  # a block no SM could hold: not a case
            continue
        cases.append(case(f"random {sum(c.random for c in cases)}", registers, threads, shared,
                          config, random=True))
    return cases


def _explain_blocks(fn, case: Case) -> None:
    """Each limit on its own, so the learner sees which rule their answer got wrong."""
    limits = gpu_limits.block_limits(**case.kwargs)
    print("  each limit alone (kvlab.gpu_limits.block_limits): "
          + ", ".join(f"{name} {value}" for name, value in limits.items())
          + f" -> the smallest, {min(limits.values())}")


register(Exercise(
    name="07.blocks_per_sm", notebook=NOTEBOOK, section="1 The words the story needs",
    signature="blocks_per_sm(registers_per_thread, threads_per_block, shared_bytes_per_block, "
              "shared_bytes_per_sm) -> int",
    hint="four limits, take the smallest: registers (each warp's rounded up to a multiple of 256, "
         "taken from one of 4 quarters of the 65,536: warps per quarter x 4 is what fits), shared "
         "memory (a block's bytes rounded up to 128, plus 1,024 the driver keeps per block), warps "
         "(64 per SM) and block slots (32 per SM).",
    solution=blocks_per_sm_solution,
    reference=gpu_limits.blocks_per_sm,
    cases=_blocks_per_sm_cases,
    explain=_explain_blocks,
))


# --- 07.sectors_per_load: coalescing, counted -------------------------------------------------

def sectors_per_load_solution(byte_addresses, bytes_per_lane: int) -> int:
    """The 32-byte sectors one warp load instruction touches (int): lane i reads
    ``bytes_per_lane`` bytes from ``byte_addresses[i]``; -1 is a lane that loads nothing."""
    sectors = set()
    for address in byte_addresses:
        if address < 0:                                   # an idle lane loads nothing
            continue
        first = address // 32                             # the sector of the lane's first byte
        last = (address + bytes_per_lane - 1) // 32       # and of its last: it may straddle two
        sectors.update(range(first, last + 1))
    return len(sectors)


ROW_BYTES = 2_048  # one position of the bench's pool: 8 KV heads x 128 dims x fp16


def _lanes(per_row: int, bytes_per_lane: int, rows: int = 2, start: int = 0) -> np.ndarray:
    """Byte addresses of a warp-wide load in which ``per_row`` lanes read one row's neighbouring
    ``bytes_per_lane``-byte pieces, ``rows`` rows ``ROW_BYTES`` apart (the rest of the 32 lanes
    idle: -1)."""
    lanes = [start + row * ROW_BYTES + lane * bytes_per_lane
             for row in range(rows) for lane in range(per_row)]
    return np.array(lanes + [-1] * (32 - len(lanes)), np.int64)


def _sectors_cases() -> list[Case]:
    def case(label, addresses, bytes_per_lane, random=False):
        return Case(label, dict(byte_addresses=np.asarray(addresses, np.int64),
                                bytes_per_lane=bytes_per_lane), random=random)

    cases = [
        case("v2: 2 keys x 16 lanes, 2 bytes each (a dim), the keys' rows 2,048 bytes apart",
             _lanes(16, 2), 2),
        case("v1: every lane its own key, 2 bytes of it", _lanes(1, 2, rows=32), 2),
        case("v5: 2 keys x 16 lanes, an 8-byte word each", _lanes(16, 8), 8),
        case("v8: 2 rows x 16 lanes, 16 bytes each", _lanes(16, 16), 16),
        case("a stretch of 64 bytes that starts mid-sector (byte 16)", _lanes(32, 2, rows=1,
                                                                             start=16), 2),
        case("five lanes of 8 bytes at bytes 8 to 28: the last one crosses into the next sector",
             [8, 12, 16, 20, 28] + [-1] * 27, 8),
        case("every lane the same 4 bytes (a broadcast)", [4096] * 32, 4),
    ]
    rng = np.random.default_rng(31)
    for i in range(4):
        per_lane = int(rng.choice([1, 2, 4, 8, 16]))
        addresses = rng.integers(0, 16, size=32) * int(rng.choice([4, 8, 32, 2048])) + int(
            rng.integers(0, 32))
        addresses[rng.random(32) < 0.2] = -1
        cases.append(case(f"random {i}", addresses, per_lane, random=True))
    return cases


def _explain_sectors(fn, case: Case) -> None:
    """The sectors the load touches, and the count a usual slip gives when it is the learner's."""
    from kvlab.trace import index_runs

    def spanned(lanes):  # the sectors from each lane's first byte to its last
        return {s for a in lanes for s in range(a // 32, (a + per_lane - 1) // 32 + 1)}

    addresses, per_lane = case.kwargs["byte_addresses"], case.kwargs["bytes_per_lane"]
    active = addresses[addresses >= 0]
    sectors = spanned(active)
    print(f"  the sectors it touches (byte address // 32): {index_runs(sectors) or 'none'}")
    try:
        yours = fn(**case.kwargs)
    except Exception:
        return
    slips = {
        "the active lanes, not the sectors they share": len(active),
        "only the sector of each lane's first byte (a lane's bytes can cross into the next)":
            len({a // 32 for a in active}),
        "the bytes ÷ 32, as if the lanes' bytes were one aligned stretch":
            -(-len(active) * per_lane // 32),
        "the distinct addresses": len(set(active.tolist())),
        "the idle lanes' -1 taken as an address": len(spanned(addresses)),
    }
    named = [words for words, count in slips.items() if count == yours != len(sectors)]
    if named:
        print(f"  {yours} is the count of " + "; or of ".join(named) + ".")


register(Exercise(
    name="07.sectors_per_load", notebook=NOTEBOOK, section="3.3 v2, warps: lanes share a key",
    signature="sectors_per_load(byte_addresses, bytes_per_lane) -> int  # byte_addresses: int64 "
              "[32], -1 for an idle lane",
    hint="a lane's bytes run from its address to address + bytes_per_lane - 1; the sectors are "
         "address // 32 for each of those bytes' ends and all between; count each sector once, "
         "and skip the lanes at -1.",
    solution=sectors_per_load_solution,
    reference=gpu_limits.sectors_touched,
    cases=_sectors_cases,
    explain=_explain_sectors,
))


# --- 07.time_floor -----------------------------------------------------------------------------

def time_floor_solution(kv_bytes: float, instructions_per_byte: float, issue_per_cycle: float,
                        bytes_in_flight_per_sm: float, machine: Machine) -> tuple[float, str]:
    """The least time to stream ``kv_bytes``, and which ceiling sets it."""
    bounds = {
        "memory": machine.memory_bytes_per_s,
        # instructions an SM can issue per second, over the instructions each byte costs
        "issue": machine.num_sms * machine.clock_hz * issue_per_cycle / instructions_per_byte,
        # Little's law: bandwidth = bytes in flight / the time each load takes to return
        "latency": machine.num_sms * bytes_in_flight_per_sm / machine.latency_s,
    }
    limit = min(bounds, key=bounds.get)
    return kv_bytes / bounds[limit], limit


def _time_floor_cases() -> list[Case]:
    h200 = gpu_limits.h200()
    other = Machine("a made-up card: 108 SMs, 1.41 GHz, 1.6 TB/s, 700 ns", 108, 1.41e9, 1.6e12,
                    700e-9)
    kv = 1_073_741_824  # the bench's K and V: 8 sequences x 32,768 tokens x 8 heads x 128 x fp16

    def case(label, instructions, issue, in_flight, machine=h200, kv_bytes=kv, random=False):
        return Case(label, dict(kv_bytes=kv_bytes, instructions_per_byte=instructions,
                                issue_per_cycle=issue, bytes_in_flight_per_sm=in_flight,
                                machine=machine), random=random)

    cases = [
        case("v6 as Nsight Compute counted it: 0.75 per byte at 2.43 a cycle", 0.75, 2.43,
             16 * 1024),
        case("v6 at the SM's full issue rate", 0.75, 4, 16 * 1024),
        case("SDPA-like: few instructions, many bytes in flight", 0.05, 3, 64 * 1024),
        case("one warp of 1 KiB per SM (0.17 a cycle): latency binds", 0.05, 1 / 5.99, 1024),
        case("v8's design at v6's waits: 0.20 per byte, 2.0 a cycle, 12 warps x 4 KiB", 0.2,
             12 / 5.99, 48 * 1024),
        case("another card, issue-bound", 0.3, 2, 16 * 1024, other),
        case("another card, memory-bound", 0.05, 4, 64 * 1024, other),
        case("another card, latency-bound", 0.05, 4, 4 * 1024, other),
    ]
    rng = np.random.default_rng(77)
    for i in range(4):
        cases.append(case(f"random {i}", float(10 ** rng.uniform(-2, 0.3)),
                          float(rng.uniform(0.5, 4)), int(rng.integers(1, 65)) * 1024,
                          h200 if i % 2 else other,
                          int(rng.integers(1, 4)) << 28, random=True))
    return cases


def _explain_floor(fn, case: Case) -> None:
    """The three ceilings of the failing case, in TB/s."""
    kwargs = {k: v for k, v in case.kwargs.items() if k != "kv_bytes"}
    bounds = gpu_limits.bandwidth_bounds(**kwargs)
    print("  the ceilings (kvlab.gpu_limits.bandwidth_bounds): "
          + ", ".join(f"{name} {value / 1e12:.3g} TB/s" for name, value in bounds.items()))


register(Exercise(
    name="07.time_floor", notebook=NOTEBOOK, section="3.11 Three ceilings: which one binds",
    signature="time_floor(kv_bytes, instructions_per_byte, issue_per_cycle, "
              "bytes_in_flight_per_sm, machine) -> (seconds, 'memory' | 'issue' | 'latency')",
    hint="three bandwidths in bytes per second — the copy bandwidth; SMs x clock x issue rate / "
         "instructions per byte; SMs x bytes in flight per SM / latency — the smallest sets the "
         "time, kv_bytes / it.",
    solution=time_floor_solution,
    reference=gpu_limits.time_floor,
    cases=_time_floor_cases,
    explain=_explain_floor,
))


# --- 07.one_wave_splits ------------------------------------------------------------------------

def one_wave_splits_solution(base_blocks: int, longest_context: int, num_sms: int,
                             resident_blocks: int) -> int:
    """Split-K partitions per sequence for v8: as many as fill one wave of resident CTAs."""
    wave = num_sms * resident_blocks // base_blocks   # CTAs the GPU runs at once / CTAs per split
    most = max(1, longest_context // 256)             # no partition shorter than 256 keys
    return max(1, min(wave, most))                    # and at least one partition


def one_wave_splits_reference(base_blocks: int, longest_context: int, num_sms: int,
                              resident_blocks: int) -> int:
    """The rule ``paged_decode_attention`` launches v8 with."""
    from kvlab.kernels.cuda.attention import one_wave_splits

    return one_wave_splits(base_blocks, longest_context, num_sms, resident_blocks)


def _one_wave_cases() -> list[Case]:
    def case(label, base, context, sms=132, resident=3, random=False):
        return Case(label, dict(base_blocks=base, longest_context=context, num_sms=sms,
                                resident_blocks=resident), random=random)

    cases = [
        case("the bench: 8 sequences x 8 kv heads, 32,768 tokens, 132 SMs x 3", 64, 32_768),
        case("int8 pools: 2 resident CTAs", 64, 32_768, resident=2),
        case("one sequence of 4,096 tokens: at most 16 partitions of 256 keys or more", 8, 4_096),
        case("4,000 tokens: 15 partitions, as 16 would be shorter than 256 keys", 8, 4_000),
        case("3,830 tokens: 14 partitions, as 15 would leave one under 256 keys", 8, 3_830),
        case("a batch already over one wave", 512, 32_768),
        case("a context shorter than 256 keys", 8, 100),
        case("not a power of two", 40, 65_536, 108, 4),
    ]
    rng = np.random.default_rng(70)
    for i in range(4):
        cases.append(case(f"random {i}", int(rng.integers(1, 130)), int(rng.integers(1, 100_000)),
                          int(rng.choice([80, 108, 132, 144])), int(rng.integers(1, 5)),
                          random=True))
    return cases


register(Exercise(
    name="07.one_wave_splits", notebook=NOTEBOOK,
    section="6.1 Counted without a GPU",
    signature="one_wave_splits(base_blocks, longest_context, num_sms, resident_blocks) -> int",
    hint="one wave is num_sms x resident_blocks CTAs and each partition adds base_blocks of them; "
         "no partition may be shorter than 256 keys, and there is always at least one.",
    solution=one_wave_splits_solution,
    reference=one_wave_splits_reference,
    cases=_one_wave_cases,
))


# --- 07.noise_band -----------------------------------------------------------------------------

def noise_band_solution(run_a: dict, run_b: dict) -> tuple[float, float]:
    """The lowest and highest run_a[row] / run_b[row] over the rows both runs timed."""
    ratios = [run_a[row] / run_b[row] for row in run_a if row in run_b]  # by name, both runs
    return min(ratios), max(ratios)


def _noise_cases() -> list[Case]:
    from kvlab.data import load_json

    def case(label, run_a, run_b, random=False):
        return Case(label, dict(run_a=dict(run_a), run_b=dict(run_b)), random=random)

    run_1 = kernel_medians(load_json("bench/h200_2026-11-27_before_v7.json"))
    run_2 = kernel_medians(load_json("bench/h200_2026-11-27.json"))
    cases = [
        case("three rows: one the same, one faster in run_b, one slower",
             {"v2": 2.0, "v3": 1.5, "v4": 1.2}, {"v2": 2.0, "v3": 1.4, "v4": 1.25}),
        case("the same rows in another order: pair them by name", {"v2": 2.0, "v3": 1.0},
             {"v3": 1.1, "v2": 2.0}),
        case("a row only run_b has (v7, written between the runs)", {"v5": 1.8, "v6": 1.6},
             {"v5": 1.7, "v6": 1.6, "v7": 1.4}),
        case("a row only run_a has", {"v1": 36.2, "v5": 1.8, "v6": 1.6}, {"v5": 1.8, "v6": 1.5}),
        case("one shared row: the band is one ratio", {"v6": 1.6, "v2": 2.4}, {"v6": 1.5}),
        case("the two H200 runs' kernel rows (run 1, run 2)", run_1, run_2),
    ]
    rng = np.random.default_rng(71)
    for i in range(4):
        rows = [f"kernel v{v} splits={s}" for v in range(1, 8) for s in (1, 16)]
        times = {row: float(rng.uniform(0.5, 40)) for row in rows}
        a = {row: t for row, t in times.items() if rng.random() < 0.8}
        b = {row: t * float(rng.uniform(0.85, 1.15)) for row, t in times.items()
             if rng.random() < 0.8 or row not in a}
        b.setdefault(next(iter(a)), times[next(iter(a))])  # at least one row in both
        cases.append(case(f"random {i}", a, dict(reversed(list(b.items()))), random=True))
    return cases


def _slip_bands(run_a: dict, run_b: dict) -> dict[str, tuple[float, float]]:
    """The band each usual slip gives for two runs, by what the slip is, in words."""
    shared = [row for row in run_a if row in run_b]
    ratios = [run_a[row] / run_b[row] for row in shared]
    by_position = [a / b for a, b in zip(run_a.values(), run_b.values())]
    slowest = max(run_a[row] for row in shared) / max(run_b[row] for row in shared)
    fastest = min(run_a[row] for row in shared) / min(run_b[row] for row in shared)
    low, high = min(ratios), max(ratios)
    mean, median = float(np.mean(ratios)), float(np.median(ratios))
    return {
        "run_b / run_a, upside down": (1 / high, 1 / low),
        "(highest, lowest): the pair reversed": (high, low),
        "rows paired by their place in each dict, not by name": (min(by_position),
                                                                 max(by_position)),
        "the mean ratio, not the lowest and highest": (mean, mean),
        "the median ratio, not the lowest and highest": (median, median),
        "the ratio of the fastest rows and of the slowest, not of each row with itself":
            (fastest, slowest),
        "the ratio of the slowest rows and of the fastest, not of each row with itself":
            (slowest, fastest),
    }


def _explain_noise(fn, case: Case) -> None:
    """How many rows the runs share, and which usual slip gives the learner's band: one that
    gives the learner's result on every hand-picked case it can take (one case alone may fit
    several slips, and a slip may be right on some cases, as the learner's answer is)."""
    run_a, run_b = case.kwargs["run_a"], case.kwargs["run_b"]
    shared = [row for row in run_a if row in run_b]
    print(f"  rows both runs timed: {len(shared)} (of {len(run_a)} and {len(run_b)})")
    fits = None  # the slips that fit every case tried so far
    for tried in (c for c in _noise_cases() if not c.random):
        kwargs = tried.kwargs
        try:
            yours = tuple(float(x) for x in fn(**dict(run_a=dict(kwargs["run_a"]),
                                                     run_b=dict(kwargs["run_b"]))))
        except Exception:
            continue  # a case the answer cannot take says nothing about which slip it is
        fit = {words for words, band in _slip_bands(**kwargs).items()
               if len(yours) == 2 and np.allclose(yours, band, rtol=1e-9)}
        fits = fit if fits is None else fits & fit
    if fits:
        print(f"  your band is {sorted(fits)[0]}.")


register(Exercise(
    name="07.noise_band", notebook=NOTEBOOK, section="6.2 How sure is a measurement?",
    signature="noise_band(run_a, run_b) -> (low, high)  # run_a, run_b: {row name: seconds}",
    hint="only the rows both runs timed, paired by name; each one's run_a / run_b; the band is the "
         "smallest and the largest of those ratios.",
    solution=noise_band_solution,
    reference=noise_band,
    cases=_noise_cases,
    explain=_explain_noise,
))
