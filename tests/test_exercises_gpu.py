"""Wrong answers the 07 (GPU performance) checkers must reject (gathered by
tests/test_exercises.py)."""
import pytest

from kvlab.exercises.gpu import blocks_per_sm_solution, time_floor_solution
from kvlab.gpu_limits import Machine


def registers_per_thread_unrounded(registers_per_thread, threads_per_block,
                                   shared_bytes_per_block, shared_bytes_per_sm):
    """Divides the register file by registers x threads: forgets they go to warps in 256s."""
    warps = -(-threads_per_block // 32)
    by_registers = 65_536 // (registers_per_thread * threads_per_block)
    shared = -(-shared_bytes_per_block // 128) * 128 + 1024
    return min(by_registers, shared_bytes_per_sm // shared, 64 // warps, 32)


def without_the_driver_reserve(registers_per_thread, threads_per_block, shared_bytes_per_block,
                               shared_bytes_per_sm):
    """Forgets the 1 KiB of shared memory the driver keeps for every block."""
    warps = -(-threads_per_block // 32)
    by_registers = 65_536 // (-(-registers_per_thread * 32 // 256) * 256) // warps
    by_shared = shared_bytes_per_sm // max(1, shared_bytes_per_block)
    return min(by_registers, by_shared, 64 // warps, 32)


def registers_from_the_whole_file(registers_per_thread, threads_per_block,
                                  shared_bytes_per_block, shared_bytes_per_sm):
    """Rounds each warp's registers to 256 but takes them from one pool of 65,536, not from the
    four quarters each scheduler owns."""
    warps = -(-threads_per_block // 32)
    by_registers = 65_536 // (-(-registers_per_thread * 32 // 256) * 256) // warps
    shared = -(-shared_bytes_per_block // 128) * 128 + 1024
    return min(by_registers, shared_bytes_per_sm // shared, 64 // warps, 32)


def shared_bytes_unrounded(registers_per_thread, threads_per_block, shared_bytes_per_block,
                           shared_bytes_per_sm):
    """Forgets that shared memory is allocated in 128-byte units."""
    warps = -(-threads_per_block // 32)
    by_registers = 65_536 // 4 // (-(-registers_per_thread * 32 // 256) * 256) * 4 // warps
    by_shared = shared_bytes_per_sm // (shared_bytes_per_block + 1024)
    return min(by_registers, by_shared, 64 // warps, 32)


def carve_out_fixed_at_132_kib(registers_per_thread, threads_per_block, shared_bytes_per_block,
                               shared_bytes_per_sm):
    """Uses the H200 kernels' 132 KiB of shared memory, not the SM's configured amount."""
    return blocks_per_sm_solution(registers_per_thread, threads_per_block,
                                  shared_bytes_per_block, 135_168)


def partial_warps(registers_per_thread, threads_per_block, shared_bytes_per_block,
                  shared_bytes_per_sm):
    """Counts 80 threads as 2.5 warps."""
    warps = threads_per_block / 32
    by_registers = int(65_536 // (-(-registers_per_thread * 32 // 256) * 256) // warps)
    shared = -(-shared_bytes_per_block // 128) * 128 + 1024
    return min(by_registers, shared_bytes_per_sm // shared, int(64 // warps), 32)


def registers_only(registers_per_thread, threads_per_block, shared_bytes_per_block,
                   shared_bytes_per_sm):
    """Only the register limit (what notebook 07's own first cell computes)."""
    return 65_536 // (registers_per_thread * threads_per_block)


def _bounds(instructions_per_byte, issue_per_cycle, bytes_in_flight_per_sm, machine):
    return {"memory": machine.memory_bytes_per_s,
            "issue": machine.num_sms * machine.clock_hz * issue_per_cycle / instructions_per_byte,
            "latency": machine.num_sms * bytes_in_flight_per_sm / machine.latency_s}


def floor_without_latency(kv_bytes, instructions_per_byte, issue_per_cycle,
                          bytes_in_flight_per_sm, machine):
    """Forgets Little's law: as if any number of bytes could be in flight."""
    bounds = _bounds(instructions_per_byte, issue_per_cycle, bytes_in_flight_per_sm, machine)
    del bounds["latency"]
    limit = min(bounds, key=bounds.get)
    return kv_bytes / bounds[limit], limit


def floor_for_the_h200_only(kv_bytes, instructions_per_byte, issue_per_cycle,
                            bytes_in_flight_per_sm, machine):
    """Ignores ``machine``: the H200's SMs, clock, copy bandwidth and latency written in."""
    h200 = Machine("H200", 132, 1.9786e9, 4.207e12, 600e-9)
    return time_floor_solution(kv_bytes, instructions_per_byte, issue_per_cycle,
                               bytes_in_flight_per_sm, h200)


def floor_at_full_issue(kv_bytes, instructions_per_byte, issue_per_cycle,
                        bytes_in_flight_per_sm, machine):
    """Assumes every SM issues 4 instructions a cycle, whatever the kernel achieves."""
    bounds = _bounds(instructions_per_byte, 4, bytes_in_flight_per_sm, machine)
    limit = min(bounds, key=bounds.get)
    return kv_bytes / bounds[limit], limit


def floor_from_the_largest(kv_bytes, instructions_per_byte, issue_per_cycle,
                           bytes_in_flight_per_sm, machine):
    """Takes the largest ceiling: the one a kernel never reaches."""
    bounds = _bounds(instructions_per_byte, issue_per_cycle, bytes_in_flight_per_sm, machine)
    limit = max(bounds, key=bounds.get)
    return kv_bytes / bounds[limit], limit


def power_of_two_splits(base_blocks, longest_context, num_sms, resident_blocks):
    """Rounds down to a power of two, as v2-v7's rule does: 4 splits at the bench, not 6."""
    most = max(1, longest_context // 256)
    splits = 1
    while base_blocks * splits * 2 <= num_sms * resident_blocks and splits * 2 <= most:
        splits *= 2
    return splits


def splits_without_the_key_floor(base_blocks, longest_context, num_sms, resident_blocks):
    """Fills the wave even with partitions of a handful of keys."""
    return max(1, num_sms * resident_blocks // base_blocks)


def splits_rounding_keys_up(base_blocks, longest_context, num_sms, resident_blocks):
    """Allows a last partition shorter than 256 keys (ceil instead of floor)."""
    return max(1, min(num_sms * resident_blocks // base_blocks, -(-longest_context // 256)))


def splits_while_the_average_partition_is_long(base_blocks, longest_context, num_sms,
                                               resident_blocks):
    """Adds partitions while the context over them averages 256 keys or more: 3,830 tokens get
    15, and a last partition of 246 keys."""
    splits = 1
    while (base_blocks * (splits + 1) <= num_sms * resident_blocks
           and -(-longest_context // (splits + 1)) >= 256):
        splits += 1
    return splits


def splits_can_be_zero(base_blocks, longest_context, num_sms, resident_blocks):
    """A batch over one wave gets 0 partitions."""
    return min(num_sms * resident_blocks // base_blocks, max(1, longest_context // 256))


def sectors_counted_by_lane(byte_addresses, bytes_per_lane):
    """One sector per lane that loads: what an uncoalesced load costs, not what v2's costs."""
    return int((byte_addresses >= 0).sum())


def sectors_of_first_bytes_only(byte_addresses, bytes_per_lane):
    """Forgets that a lane's bytes can cross into the next sector."""
    return len({int(a) // 32 for a in byte_addresses if a >= 0})


def sectors_from_the_byte_count(byte_addresses, bytes_per_lane):
    """The bytes the lanes use ÷ 32: right only when they are one aligned stretch."""
    return -(-int((byte_addresses >= 0).sum()) * bytes_per_lane // 32)


def sectors_of_idle_lanes_too(byte_addresses, bytes_per_lane):
    """Counts lane -1's bytes (sectors -1 and 0)."""
    return len({s for a in byte_addresses.tolist()
                for s in range(a // 32, (a + bytes_per_lane - 1) // 32 + 1)})


WRONG_ANSWERS = {
    "07.blocks_per_sm": [registers_per_thread_unrounded, registers_from_the_whole_file,
                         without_the_driver_reserve, shared_bytes_unrounded,
                         carve_out_fixed_at_132_kib, partial_warps, registers_only],
    "07.sectors_per_load": [sectors_counted_by_lane, sectors_of_first_bytes_only,
                            sectors_from_the_byte_count, sectors_of_idle_lanes_too],
    "07.time_floor": [floor_without_latency, floor_for_the_h200_only, floor_at_full_issue,
                      floor_from_the_largest],
    "07.one_wave_splits": [power_of_two_splits, splits_without_the_key_floor,
                           splits_rounding_keys_up, splits_while_the_average_partition_is_long,
                           splits_can_be_zero],
}


def band_upside_down(run_a, run_b):
    """run_b / run_a: the band of the other direction."""
    ratios = [run_b[row] / run_a[row] for row in run_a if row in run_b]
    return min(ratios), max(ratios)


def band_paired_by_position(run_a, run_b):
    """Pairs the rows by their place in each dict, as if both runs listed the same rows in the
    same order."""
    ratios = [a / b for a, b in zip(run_a.values(), run_b.values())]
    return min(ratios), max(ratios)


def band_of_every_row_of_run_a(run_a, run_b):
    """Takes every row of run_a: a row run_b lacks is a KeyError."""
    ratios = [run_a[row] / run_b[row] for row in run_a]
    return min(ratios), max(ratios)


def band_of_the_extreme_times(run_a, run_b):
    """The slowest row of each run over each other, and the fastest: not a row against itself."""
    shared = [row for row in run_a if row in run_b]
    return (max(run_a[r] for r in shared) / max(run_b[r] for r in shared),
            min(run_a[r] for r in shared) / min(run_b[r] for r in shared))


def band_as_the_mean(run_a, run_b):
    """One number for the noise: the mean ratio, twice."""
    ratios = [run_a[row] / run_b[row] for row in run_a if row in run_b]
    mean = sum(ratios) / len(ratios)
    return mean, mean


def band_reversed(run_a, run_b):
    """(highest, lowest)."""
    ratios = [run_a[row] / run_b[row] for row in run_a if row in run_b]
    return max(ratios), min(ratios)


def band_around_one(run_a, run_b):
    """The largest distance from 1, either way: a symmetric band that is wider than the runs'."""
    ratios = [run_a[row] / run_b[row] for row in run_a if row in run_b]
    far = max(abs(r - 1) for r in ratios)
    return 1 - far, 1 + far


WRONG_ANSWERS["07.noise_band"] = [band_upside_down, band_paired_by_position,
                                  band_of_the_extreme_times, band_of_every_row_of_run_a,
                                  band_as_the_mean, band_reversed, band_around_one]


def test_a_noise_band_gone_wrong_names_the_slip(learner_view, capsys):
    from kvlab.exercises import get

    for wrong, case, words in (
            (band_upside_down, "three rows", "run_b / run_a, upside down"),
            (band_of_the_extreme_times, "three rows",
             "the ratio of the slowest rows and of the fastest, not of each row with itself"),
            (band_paired_by_position, "the same rows in another order",
             "rows paired by their place in each dict, not by name"),
            (band_as_the_mean, "three rows", "the mean ratio, not the lowest and highest"),
            (band_reversed, "three rows", "(highest, lowest): the pair reversed")):
        assert get("07.noise_band").check(wrong) is False
        out = capsys.readouterr().out
        assert f"fails on case '{case}" in out and f"your band is {words}." in out, out
    assert get("07.noise_band").check(band_of_every_row_of_run_a) is False
    out = capsys.readouterr().out
    assert "fails on case 'a row only run_a has'" in out and "KeyError" in out
    assert "rows both runs timed: 2 (of 3 and 2)" in out


def test_the_noise_band_of_two_runs_by_hand():
    from kvlab.bench import noise_band

    # v7 only in run b; v2 and v3 in both: ratios 2.0/1.6 = 1.25 and 1.0/1.25 = 0.8
    assert noise_band({"v2": 2.0, "v3": 1.0}, {"v3": 1.25, "v7": 9.0, "v2": 1.6}) == (0.8, 1.25)
    assert noise_band({"v6": 1.5}, {"v6": 1.5}) == (1.0, 1.0)
    with pytest.raises(ValueError, match="share no row"):
        noise_band({"v1": 1.0}, {"v2": 1.0})


def test_kernel_medians_takes_the_kernels_alone_from_a_bench_result():
    from kvlab.bench import kernel_medians

    rows = [dict(impl="cuda", op="kernel v6 fp16 splits=16", median_s=1.6),
            dict(impl="cuda", op="paged decode fp16 splits=16", median_s=2.4),  # the public op
            dict(impl="torch-cuda", op="kernel v6 fp16 splits=16", median_s=9.0)]
    assert kernel_medians({"rows": rows}) == {"kernel v6 fp16 splits=16": 1.6}


def test_a_failure_shows_each_limit_and_each_ceiling(monkeypatch, capsys):
    from kvlab.exercises import SOLUTIONS_ENV, get

    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)
    assert get("07.blocks_per_sm").check(shared_bytes_unrounded) is False
    out = capsys.readouterr().out
    assert "fails on case '9,350 shared bytes are allocated as 9,472'" in out
    assert "registers 32, shared 12, warps 32, blocks 32 -> the smallest, 12" in out
    assert get("07.time_floor").check(floor_without_latency) is False
    assert "latency 0.225 TB/s" in capsys.readouterr().out


def test_a_sector_count_gone_wrong_names_the_slip(learner_view, capsys):
    from kvlab.exercises import get

    for wrong, case, words in (
            (sectors_counted_by_lane, "v2: 2 keys x 16 lanes", "32 is the count of the active "
             "lanes, not the sectors they share"),
            (sectors_from_the_byte_count, "v1: every lane its own key", "2 is the count of the "
             "bytes ÷ 32, as if the lanes' bytes were one aligned stretch"),
            (sectors_of_first_bytes_only, "five lanes of 8 bytes", "1 is the count of only the "
             "sector of each lane's first byte"),
            (sectors_of_idle_lanes_too, "five lanes of 8 bytes", "3 is the count of the idle "
             "lanes' -1 taken as an address")):
        assert get("07.sectors_per_load").check(wrong) is False
        out = capsys.readouterr().out
        assert f"fails on case '{case}" in out and words in out, out
    get("07.sectors_per_load").check(sectors_counted_by_lane)
    assert "the sectors it touches (byte address // 32): 0, 64\n" in capsys.readouterr().out
