"""kvlab.ncu: Nsight Compute CSV reports folded into one record per launch."""
import pytest

from kvlab.ncu import load_ncu_csv, parse_ncu_csv

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


V2 = "attention::warp_attention_v2_kernel[v2,abc](Array<float, 3>)"  # Numba's mangled name


def _row(launch, kernel, metric, unit, value):
    return (f'"{launch}","1","python3","host","{kernel}","1","7","(128, 1, 1)","(8, 8, 16)","0","9.0",'
            f'"Section","{metric}","{unit}","{value}"')


def test_parse_by_hand():
    text = "\n".join([
        "==PROF== Connected to process 1",
        HEADER,
        _row(0, V2, "Duration", "ns", "1,935,616"),
        _row(0, V2, "Function Cache", "", "CachePreferNone"),
        _row(0, V2, "", "", ""),  # a rule's advice: no metric
        _row(1, "fused_write::fused_write_kernel[v62,x](Array<__fp16, 2>)", "Duration", "ns", "201,760"),
    ])
    launches = parse_ncu_csv(text)
    assert [launch.kernel for launch in launches] == ["warp_attention_v2_kernel", "fused_write_kernel"]
    first = launches[0]
    assert first.metrics == {"Duration": 1_935_616.0, "Function Cache": "CachePreferNone"}
    assert first.units["Duration"] == "ns"
    assert (first.block, first.grid) == ("(128, 1, 1)", "(8, 8, 16)")
    assert launches[1].metrics["Duration"] == 201_760.0


def test_refuses_text_that_is_not_a_report():
    with pytest.raises(ValueError, match="not an ncu CSV report"):
        parse_ncu_csv("==PROF== nothing profiled\n")


def test_stored_h200_report():
    launches = load_ncu_csv("bench/h200_2026-11-27_ncu.csv")
    assert [launch.kernel for launch in launches] == [
        "warp_attention_v2_kernel", "warp_attention_v5_2byte_kernel", "warp_attention_v6_2byte_kernel",
        "fused_write_kernel", "fused_write_kernel", "fused_write_kernel"]
    v6 = launches[2].metrics
    assert v6["Registers Per Thread"] == 128 and v6["# SMs"] == 132
    assert v6["Duration"] == 1_310_464.0 and v6["Local Memory Spilling Requests"] == 8_486_912
    # the fused write at 1 token per block (grid: 4,096 tokens x 48 heads), then 16 tokens per block
    assert [launch.grid for launch in launches[3:]] == ["(4096, 48, 1)", "(256, 48, 1)", "(256, 48, 1)"]
