"""kvlab.gpu_limits: occupancy held against what Nsight Compute reported on an H200, and the
three bandwidth ceilings held against the stored measurements they must bound, and the sectors a
warp's load touches worked by hand."""
import numpy as np
import pytest

from kvlab.data import load_json
from kvlab.gpu_limits import (SM90, Machine, bandwidth_bounds, block_limits, blocks_per_sm, h200,
                              issue_bound, sectors_touched, time_floor)
from kvlab.ncu import load_ncu_csv

NCU = load_ncu_csv("bench/h200_2026-11-27_ncu.csv")
H200_RUN = load_json("bench/h200_2026-11-27.json")
NCU_LIMITS = {"registers": "Block Limit Registers", "shared": "Block Limit Shared Mem",
              "warps": "Block Limit Warps", "blocks": "Block Limit SM"}


@pytest.mark.parametrize("launch", NCU, ids=lambda launch: launch.kernel)
def test_block_limits_are_the_ones_nsight_compute_reported(launch):
    m = launch.metrics
    limits = block_limits(int(m["Registers Per Thread"]), int(m["Block Size"]),
                          int(m["Static Shared Memory Per Block"] + m["Dynamic Shared Memory Per Block"]),
                          int(m["Shared Memory Configuration Size"]))
    assert limits == {name: int(m[metric]) for name, metric in NCU_LIMITS.items()}
    # and the occupancy they imply is the profiler's theoretical occupancy
    warps = blocks_per_sm(int(m["Registers Per Thread"]), int(m["Block Size"]),
                          int(m["Static Shared Memory Per Block"]),
                          int(m["Shared Memory Configuration Size"])) * int(m["Block Size"]) // 32
    assert 100 * warps / SM90.max_warps == pytest.approx(m["Theoretical Occupancy"])


@pytest.mark.parametrize("registers, threads, expected", [
    # 97 x 32 = 3,104 registers a warp, allocated as 3,328; a quarter of the register file
    # (16,384) holds 4 such warps, so the SM 16: 8 blocks of 2 warps (65,536 / (97 x 64) would
    # say 10, 65,536 / 3,328 would say 9)
    (97, 64, 8),
    (33, 64, 24),    # 1,280 a warp: 12 a quarter, 48 warps
    (41, 192, 6),    # 1,536 a warp: 10 a quarter, 40 warps, blocks of 6
    (128, 64, 8),    # 4,096 a warp: 4 a quarter
    (40, 32, 48),    # 1,280 a warp: 48 warps of blocks of 1 (the warp slots then bind: 64)
])
def test_registers_go_to_warps_in_256s_from_each_quarter_of_the_register_file(registers, threads,
                                                                              expected):
    assert block_limits(registers, threads, 0, SM90.max_shared_per_sm)["registers"] == expected


def test_a_partial_warp_takes_a_whole_warp():
    assert block_limits(128, 33, 0, SM90.max_shared_per_sm)["warps"] == 32


def test_shared_memory_is_rounded_and_each_block_pays_the_driver_reserve():
    # 1 byte -> 128, + 1,024 reserved: 8 KiB configured holds 7 such blocks
    assert block_limits(32, 32, 1, 8 * 1024)["shared"] == 7
    assert block_limits(32, 32, 0, 8 * 1024)["shared"] == 8


@pytest.mark.parametrize("args, message", [
    ((256, 128, 0, 1024), "registers_per_thread must be <= 255"),
    ((32, 1025, 0, 1024), "threads_per_block must be <= 1024"),
    ((32, 128, 0, 229 * 1024), "shared_bytes_per_sm must be <= "),
    ((32, 128, 48 * 1024, 32 * 1024), "does not fit on one SM"),
    ((255, 1024, 0, 1024), "does not fit on one SM"),
    # 25 warps x 2,560 registers would fit in 65,536, but a quarter of the file holds 6 such warps:
    # 24 per SM (the hardware's check: it counts 28 warps, a multiple of 4)
    ((73, 800, 0, 1024), "does not fit on one SM"),
    ((0, 128, 0, 1024), "registers_per_thread must be >= 1"),
])
def test_a_block_no_sm_can_run_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        block_limits(*args)


def test_a_non_integer_is_refused_by_name():
    with pytest.raises(TypeError, match="threads_per_block must be an int"):
        block_limits(32, 128.0, 0, 1024)


def test_h200_comes_from_the_stored_runs():
    machine = h200()
    assert machine.num_sms == 132
    assert machine.clock_hz == pytest.approx(1.98e9, rel=0.01)
    assert machine.memory_bytes_per_s == pytest.approx(
        H200_RUN["meta"]["copy_bandwidth_gb_per_s"] * 1e9)


def test_the_issue_ceiling_is_the_formula_the_ptx_budget_uses():
    # 132 SMs x 1.98 GHz x 2.4 instructions per cycle at 0.75 instructions per byte
    assert issue_bound(0.75, 2.4, 132, 1.98e9) == pytest.approx(836.35e9, rel=1e-4)
    with pytest.raises(ValueError, match="issue_per_cycle must be in"):
        issue_bound(0.75, 5, 132, 1.98e9)
    with pytest.raises(ValueError, match="instructions_per_byte must be a positive"):
        issue_bound(0, 2, 132, 1.98e9)


@pytest.mark.parametrize("machine, message", [
    (Machine("no SMs", 0, 1e9, 1e12), "num_sms must be a positive"),
    (Machine("no clock", 100, 0.0, 1e12), "clock_hz must be a positive"),
    (Machine("no memory", 100, 1e9, float("nan")), "memory_bytes_per_s must be a positive"),
])
def test_a_machine_without_its_figures_is_refused_by_name(machine, message):
    with pytest.raises(ValueError, match=message):
        time_floor(1e9, 0.5, 2, 1024, machine)


def test_the_binding_ceiling_is_the_smallest():
    machine = Machine("test", num_sms=100, clock_hz=1e9, memory_bytes_per_s=3e12, latency_s=1e-6)
    bounds = bandwidth_bounds(0.5, 2, 16 * 1024, machine)
    assert bounds == pytest.approx({"memory": 3e12, "issue": 4e11, "latency": 1.6384e12})
    assert time_floor(4e11, 0.5, 2, 16 * 1024, machine) == (pytest.approx(1.0), "issue")
    assert time_floor(3e12, 0.01, 4, 1e6, machine) == (pytest.approx(1.0), "memory")
    assert time_floor(1e9, 0.01, 4, 1024, machine)[1] == "latency"


def _measured(op, impl="cuda"):
    return next(r for r in H200_RUN["rows"] if r["op"] == op and r["impl"] == impl)


def test_the_floors_hold_under_what_the_h200_measured():
    """An issue floor that a measurement beat would be a wrong model: the warp kernels' floors,
    from Nsight Compute's own count of their instructions at the SM's full issue rate (notebook 07
    §3.10), must sit under the measured time. The memory ceiling is a practical roof (a copy
    reads and writes, SDPA only reads): SDPA sits at it within 5 %, on either side."""
    machine = h200()
    sdpa = _measured("torch SDPA contiguous (enable_gqa)", "torch-sdpa-cuda")
    floor, limit = time_floor(sdpa["bytes"], 0.01, 4, 64 * 1024, machine)
    assert limit == "memory" and sdpa["median_s"] == pytest.approx(floor, rel=0.05)
    kv_bytes = _measured("kernel v6 fp16 splits=16")["bytes"]
    for launch in NCU[:3]:
        m = launch.metrics
        issued = m["SM Active Cycles"] * m["Achieved Active Warps Per SM"] / \
            m["Warp Cycles Per Issued Instruction"] * m["# SMs"]
        floor, limit = time_floor(kv_bytes, issued / kv_bytes, 4, 16 * 1024, machine)
        assert limit == "issue"
        assert floor < m["Duration"] * 1e-9


@pytest.mark.gpu
def test_occupancy_agrees_with_the_driver_for_every_registered_kernel():
    """On a GPU, the driver's own occupancy calculator (cuOccupancyMaxActiveBlocksPerMultiprocessor)
    for every registered kernel at 128 threads a block, without and with 16 KiB of dynamic shared
    memory (where the small kernels become shared-memory bound), against kvlab's rules fed the
    driver's registers and shared memory for that kernel and the largest carve-out. The CPU tests
    hold the rules against 3 profiled configurations; this holds them against every kernel the
    GPU compiles. Compute capability 9.x only: the rules are sm_90's."""
    from kvlab.kernels import cuda as kcuda

    device = kcuda.cuda.get_current_device()
    if device.compute_capability[0] != 9:
        pytest.skip(f"the rules are for sm_90, this GPU is sm_{device.compute_capability}")
    kcuda.load_all_stages()
    context, threads, checked = kcuda.cuda.current_context(), 128, 0
    for entry in kcuda.REGISTRY:
        if entry.min_cc is not None and device.compute_capability < entry.min_cc:
            continue
        kernel = entry.dispatcher.compile(entry.signatures[0])
        if kernel.max_threads_per_block < threads:
            continue
        for dynamic in (0, 16 * 1024):
            driver = context.get_active_blocks_per_multiprocessor(
                kernel.library.get_cufunc(), threads, dynamic)
            ours = blocks_per_sm(kernel.regs_per_thread, threads,
                                 kernel.shared_mem_per_block + dynamic, SM90.max_shared_per_sm)
            assert ours == driver, (entry.name, kernel.regs_per_thread,
                                    kernel.shared_mem_per_block, dynamic)
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("addresses, per_lane, sectors", [
    ([0, 2, 4, 30], 2, 1),                  # one sector, four lanes
    ([30], 4, 2),                           # bytes 30-33 cross from sector 0 into 1
    ([31, 63, 95], 1, 3),                   # a byte in each of three sectors
    ([0, -1, -1, 2048], 16, 2),             # idle lanes load nothing; rows far apart
    ([-1] * 32, 8, 0),                      # a warp with nothing to load
    (list(range(0, 512, 16)), 16, 16),      # 32 lanes x 16 bytes: 512 bytes, 16 sectors
])
def test_sectors_touched_by_hand(addresses, per_lane, sectors):
    assert sectors_touched(np.array(addresses), per_lane) == sectors


def test_sectors_touched_refuses_a_lane_of_no_bytes():
    with pytest.raises(ValueError, match="bytes_per_lane"):
        sectors_touched(np.zeros(32, np.int64), 0)
    with pytest.raises(TypeError, match="bytes_per_lane must be an int"):
        sectors_touched(np.zeros(32, np.int64), 2.0)
