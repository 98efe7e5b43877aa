"""python -m kvlab plan: a readable table, JSON, and clear errors (run as a real subprocess)."""
import json
import subprocess
import sys


def kvlab(*args):
    return subprocess.run([sys.executable, "-m", "kvlab", *args], capture_output=True, text=True,
                          timeout=60)


def test_plan_prints_the_table():
    out = kvlab("plan", "--model", "qwen3-8b", "--dtype", "int8")
    assert out.returncode == 0, out.stderr
    assert "qwen3-8b (Qwen/Qwen3-8B): 36 layers, 32 q heads, 8 kv heads, head_dim 128" in out.stdout
    row = next(line.split() for line in out.stdout.splitlines() if line.startswith("int8 "))
    assert row[1:3] == ["2,080", "74,880"] and row[5] == "813,674"
    assert "contiguous" in out.stdout and "paged" in out.stdout


def test_plan_json_has_every_dtype():
    out = kvlab("plan", "--model", "llama-3.1-70b", "--tp", "16", "--json")
    rows = json.loads(out.stdout)
    assert {r["dtype"] for r in rows} >= {"fp16", "int8"}
    assert all(r["kv_heads_per_rank"] == 1 and r["kv_replication"] == 2 for r in rows)


def test_help_and_errors():
    assert "memory planner" in kvlab("--help").stdout
    assert "--memory-gib" in kvlab("plan", "--help").stdout
    bad = kvlab("plan", "--model", "gpt-5")
    assert bad.returncode == 2 and "known models:" in bad.stderr and "Traceback" not in bad.stderr
    bad = kvlab("plan", "--model", "qwen3-8b", "--tp", "3")
    assert bad.returncode == 2 and "must divide" in bad.stderr
    bad = kvlab("plan", "--model", "qwen3-8b", "--memory-gib", "-1")
    assert bad.returncode == 2 and "positive" in bad.stderr
    bad = kvlab("plan", "--model", "qwen3-8b", "--dtype", "int3")
    assert bad.returncode == 2 and "unknown KV dtype" in bad.stderr


def test_nan_and_inf_are_refused_with_a_clear_message():
    """float("nan") and float("inf") parse, and nan > 0 is False but so is nan <= 0: they used to
    reach the planner and end in "cannot convert float NaN to integer"."""
    for option in ("--memory-gib", "--utilization"):
        for value in ("nan", "inf", "-inf", "NaN"):
            bad = kvlab("plan", "--model", "qwen3-8b", f"{option}={value}")  # "-inf": not a flag
            assert bad.returncode == 2, (option, value, bad.stdout)
            assert f"argument {option}: expected a positive number, got '{value}' (it must be " \
                "finite)" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_sizes_include_medium():
    assert "medium" in kvlab("bench", "--help").stdout
