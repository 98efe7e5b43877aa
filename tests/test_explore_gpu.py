"""Notebook 07's explorer: the three ceilings on a decode kernel's bandwidth, from v6 as Nsight
Compute saw it to v8 as its PTX counts it."""
import matplotlib
import pytest

from kvlab.explore.gpu import V6, ceilings_explorer, ceilings_state, draw_ceilings
from kvlab.ncu import load_ncu_csv

matplotlib.use("Agg")

V6_NCU_S = next(launch for launch in load_ncu_csv("bench/h200_2026-11-27_ncu.csv")
                if launch.kernel.startswith("warp_attention_v6")).metrics["Duration"] * 1e-9


def test_v6_is_issue_bound_and_its_floor_sits_just_under_what_it_measured():
    state = ceilings_state(**V6, latency_ns=600)
    assert state["limit"] == "issue"
    assert state["issue_per_cycle"] == pytest.approx(2.43, abs=0.01)  # 14.6 warps / 5.99 cycles
    assert state["of_copy"] == pytest.approx(0.20, abs=0.01)
    assert 0.9 * V6_NCU_S < state["floor_s"] <= V6_NCU_S


def test_more_warps_lift_an_issue_bound_kernel_until_four_a_cycle():
    base = ceilings_state(**V6, latency_ns=600)
    more = ceilings_state(**{**V6, "warps_per_sm": 32}, latency_ns=600)
    most = ceilings_state(**{**V6, "warps_per_sm": 64}, latency_ns=600)
    assert more["issue_per_cycle"] == most["issue_per_cycle"] == 4
    assert more["floor_s"] == most["floor_s"] < base["floor_s"]
    assert most["limit"] == "issue" and most["of_copy"] < 0.35  # v6's instructions still bind
    fewer = ceilings_state(**{**V6, "instructions_per_byte": 0.2}, latency_ns=600)
    assert fewer["floor_s"] < base["floor_s"] / 3


def test_v8_by_its_static_count_at_v6s_stalls_reaches_about_sixty_percent():
    state = ceilings_state(0.2, 12, 5.99, 4096, latency_ns=600)
    assert state["limit"] == "issue" and 0.55 < state["of_copy"] < 0.65
    assert ceilings_state(0.2, 20, 5.99, 4096, latency_ns=600)["limit"] == "memory"


def test_one_warp_with_little_in_flight_is_latency_bound_and_latency_matters():
    slow = ceilings_state(0.2, 1, 1.0, 256, latency_ns=1000)
    fast = ceilings_state(0.2, 1, 1.0, 256, latency_ns=500)
    assert slow["limit"] == fast["limit"] == "latency"
    assert slow["floor_s"] == pytest.approx(2 * fast["floor_s"])


def test_few_instructions_and_many_bytes_in_flight_reach_the_memory_roof():
    state = ceilings_state(0.02, 32, 8, 8192, latency_ns=600)
    assert state["limit"] == "memory" and state["of_copy"] == 1
    assert not state["over_registers"]
    assert ceilings_state(0.02, 64, 8, 16384, latency_ns=600)["over_registers"]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(warps_per_sm=0), ValueError, "warps_per_sm must be a number in"),
    (dict(warps_per_sm=65), ValueError, "warps_per_sm must be a number in"),
    (dict(cycles_between_instructions=0), ValueError, "cycles_between_instructions must be a"),
    (dict(latency_ns=0), ValueError, "latency_s must be a positive"),
    (dict(instructions_per_byte="0.2"), TypeError, "instructions_per_byte must be a number"),
])
def test_bad_settings_are_refused_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        ceilings_state(**{**V6, "latency_ns": 600, **kwargs})


def test_the_explorer_starts_at_v6_and_redraws_when_a_control_moves():
    explorer = ceilings_explorer()
    assert explorer.values() == {**V6, "latency_ns": 600}
    before = explorer.figure.value
    explorer.controls["instructions_per_byte"].value = 0.2
    assert explorer.figure.value != before


def test_the_title_says_what_binds_and_warns_of_impossible_settings():
    fig = draw_ceilings(**V6, latency_ns=600)
    assert fig.axes[0].get_title().startswith("issue binds: at most 20% of the copy bandwidth, "
                                              "1.27 ms")
    tiny = draw_ceilings(3.16, 1, 20, 256, 1200).axes[0].get_title()
    assert "at most 0.1% of the copy bandwidth" in tiny
    assert "256 KiB of registers" in draw_ceilings(0.02, 64, 8, 16384, 600).axes[0].get_title()
