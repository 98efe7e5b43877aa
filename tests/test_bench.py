"""python -m kvlab bench: runs on every backend at smoke size, well-formed JSON, exact byte counts.

This checks that the benchmark runs and reports sane rows, not how fast anything is. The subprocess
tests inherit the repo-root conftest's choice of Numba's CUDA simulator (or the GPU under -m gpu).
"""
import json
import math
import subprocess
import sys

import pytest

from kvlab import bench
from kvlab.backends import cuda_mode

ROW_KEYS = {"stage", "op", "impl", "shape", "bytes", "median_s", "min_s", "runs", "gb_per_s",
            "copy_bw_fraction", "speedups", "note"}
META_KEYS = {"device", "backend", "backend_description", "cuda_mode", "timer", "baseline_timer",
             "l2_flush_bytes", "copy_bandwidth_gb_per_s", "size", "shape", "warmup", "repeats",
             "stages", "not_built", "date", "versions"}


def kvlab(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvlab", *args], capture_output=True, text=True,
                          timeout=timeout)


def check_result(result, backend, stages):
    assert META_KEYS <= set(result["meta"]), set(result["meta"]) ^ META_KEYS
    meta = result["meta"]
    assert meta["backend"] == backend and meta["device"] and meta["versions"]["numpy"]
    assert meta["stages"] == stages
    rows = result["rows"]
    assert rows and all(set(r) == ROW_KEYS for r in rows)
    for r in rows:
        assert r["bytes"] > 0 and r["median_s"] > 0 and 0 < r["min_s"] <= r["median_s"], r
        assert r["runs"] >= 1 and r["gb_per_s"] > 0, r
        assert all(math.isfinite(x) and x > 0 for x in r["speedups"].values()), r
        keys = {f"{b['impl']}/{b['op']}" for b in rows}
        assert set(r["speedups"]) <= keys, r  # every baseline named is a row of the same run
    return rows


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bench_smoke_json(backend, tmp_path):
    out_file = tmp_path / "bench.json"
    out = kvlab("bench", "--size", "smoke", "--backend", backend, "--json", str(out_file),
                "--repeats", "3", "--quiet")
    assert out.returncode == 0, out.stderr
    result = json.loads(out_file.read_text())
    rows = check_result(result, backend, list(bench.STAGES))
    assert {r["stage"] for r in rows} == set(bench.STAGES) - set(result["meta"]["not_built"])
    ops = {(r["stage"], r["op"]) for r in rows}
    assert {("paging", "write_kv"), ("paging", "gather_kv"), ("quant", "quantize"),
            ("rope", "apply_rope")} <= ops
    other = "torch-cpu" if backend == "numpy" else "numpy"
    me = backend if backend == "numpy" else "torch-cpu"
    mine = {r["op"]: r for r in rows if r["impl"] == me}
    assert mine["write_kv"]["speedups"].keys() == {f"{other}/write_kv"}  # numpy vs torch on CPU
    if "attention" in {r["stage"] for r in rows}:
        paged = mine["paged decode fp16 splits=1"]["speedups"]
        assert any("SDPA contiguous" in k for k in paged) and any("gather-then" in k for k in paged)
        assert "paged decode fp16 splits=1" in next(iter(mine["paged decode int8 splits=1"]["speedups"]))
        if backend == "torch":  # the tiles beside the one whole-context gather they replace
            whole = mine["paged decode fp16, whole context at once"]["speedups"]
            assert list(whole) == ["torch-cpu/paged decode fp16 splits=1"]
    if "fused_write" in {r["stage"] for r in rows}:
        fused = mine["fused paged_write (qk_mode 2)"]["speedups"]
        assert any(k.endswith("unfused rope+write (qk_mode 2)") for k in fused)
    # the table: every stage has a heading, the device is named, CPU times are labelled as such
    assert f"kvlab bench — {result['meta']['device']}" in out.stdout
    assert all(f"== {s}" in out.stdout for s in bench.STAGES)
    assert "ratios are what is meaningful" in out.stdout


def test_help_and_bad_arguments():
    assert kvlab("bench", "--help").returncode == 0
    bad = kvlab("bench", "--stage", "paging,flash", "--quiet")
    assert bad.returncode == 2 and "unknown stage(s) 'flash'" in bad.stderr
    assert "known stages: paging, quant, rope, fused_write, attention" in bad.stderr
    for args, message in ((["--backend", "jax"], "invalid choice: 'jax'"),
                          (["--size", "huge"], "invalid choice: 'huge'"),
                          (["--repeats", "0"], "expected a positive number"),
                          (["--warmup", "-1"], "expected an int >= 0")):
        out = kvlab("bench", *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


@pytest.mark.skipif(cuda_mode() != "simulator", reason="checks the simulator's guard")
def test_cuda_simulator_runs_smoke_and_refuses_real():
    refused = kvlab("bench", "--backend", "cuda", "--size", "real", "--stage", "rope")
    assert refused.returncode == 2 and "simulator" in refused.stderr and "--size smoke" in refused.stderr
    out = kvlab("bench", "--backend", "cuda", "--stage", "rope", "--warmup", "0", "--repeats", "1",
                "--quiet")
    assert out.returncode == 0, out.stderr
    assert "Numba CUDA simulator" in out.stdout and "times are meaningless" in out.stdout
    assert "apply_rope  cuda" in out.stdout


def test_not_built_stage_is_listed(monkeypatch):
    monkeypatch.setattr(bench.runner, "stage_built", lambda stage, backend: stage != "attention")
    result = bench.run_bench("numpy", ["rope", "attention"], warmup=0, repeats=1)
    assert result["meta"]["not_built"] == ["attention"]
    assert "attention: not built yet" in result["notes"]
    assert "== attention: not built yet" in bench.format_report(result)
    assert {r["stage"] for r in result["rows"]} == {"rope"}


def test_sigterm_mid_run_still_prints_and_saves_the_rows_so_far(tmp_path):
    # `timeout` on the GPU machine sends SIGTERM: the rows measured before it must not be lost.
    out_json = tmp_path / "partial.json"
    code = (
        "import os, signal\n"
        "from kvlab import bench\n"
        "from kvlab.__main__ import main\n"
        "def killed(ctx):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "bench.STAGES['rope'] = killed\n"
        f"raise SystemExit(main(['bench', '--backend', 'numpy', '--size', 'smoke', '--quiet', "
        f"'--stage', 'paging,rope,attention', '--json', {str(out_json)!r}]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr  # a partial result: saved, but not a success
    result = json.loads(out_json.read_text())
    stages = {r["stage"] for r in result["rows"]}
    assert "paging" in stages and "attention" not in stages, stages
    assert any(n.startswith("interrupted (SIGTERM) after ") for n in result["notes"]), result["notes"]
    assert "interrupted (SIGTERM)" in out.stdout


def test_bytes_moved_by_hand():
    """One shape per op, the products written out: T=32 tokens, 2 kv heads, head_dim 64, fp16,
    two sequences of 64 tokens in 16-token blocks (4 blocks each), 4 q heads."""
    kv = 32 * 2 * 64 * 2                                  # 8192 B of K (or V) for 32 tokens
    assert bench.bytes_write_kv(32, 2, 64, 2) == 2 * kv + 32 * 4 + 2 * kv == 32896
    assert bench.bytes_slot_mapping(32) == 32 * 4 * 3 == 384
    # gather: 8 table entries + 2 lengths, 128 rows of K and V read and written
    assert bench.bytes_gather_kv([64, 64], 16, 2, 64, 2) == 8 * 4 + 2 * 4 + 2 * 65536 == 131112
    # copy 4 blocks: src + dst ids, 4 blocks x 16 slots of K and V read and written
    assert bench.bytes_copy_blocks(4, 16, 2, 64, 2) == 32 + 2 * (2 * 4 * 16 * 2 * 64 * 2) == 65568
    # int8: 64 code bytes + one 2-byte scale per (token, head)
    assert bench.bytes_quantize(32, 2, 64, 2) == kv + 32 * 2 * (64 + 2) == 12416
    assert bench.bytes_dequantize(32, 2, 64) == 4224 + 32 * 2 * 64 * 4 == 20608
    assert bench.bytes_write_kv_quant(32, 2, 64, 2) == 2 * kv + 128 + 2 * 4224 == 24960
    assert bench.bytes_gather_kv_quant([64, 64], 16, 2, 64) == 32 + 8 + 2 * 128 * 2 * 66 + 2 * 128 * 2 * 64 * 4 == 164904
    # RoPE on q [32, 4, 64]: x read and written, positions, one cos + one sin row of 32 floats
    assert bench.bytes_apply_rope(32, 4, 64, 2) == 16384 + 128 + 32 * 64 * 4 + 16384 == 41088
    # decode: q [2, 4, 64] fp16, 2 x 64 tokens of K and V, 8 table entries + lens + query_start,
    # float32 out
    assert bench.bytes_paged_decode(2, 64, 16, 4, 2, 64) == 1024 + 65536 + 32 + 8 + 12 + 2048 == 68660
    assert bench.bytes_paged_decode(2, 64, 16, 4, 2, 64, kv_dtype="int8") == 1024 + 2 * 128 * 2 * 66 + 52 + 2048 == 36916
    assert bench.bytes_sdpa(2, 64, 4, 2, 64) == 1024 + 65536 + 1024 == 67584
    assert bench.bytes_gather_then_sdpa(2, 64, 16, 4, 2, 64) == 32 + 2 * 65536 + 67584 == 198688
    # the decode shape: 8 x 32k tokens, 8 kv heads x 128 of fp16 K and V = 1 GiB
    assert bench.bytes_paged_decode(8, 32768, 16, 32, 8, 128) == 2**30 + 65536 + 8 * 2048 * 4 + 32 + 36 + 131072


def test_measure_cuts_repeats_when_a_run_is_slow(monkeypatch):
    calls = []
    timer = bench.CpuTimer("test")
    monkeypatch.setattr(bench.timers, "SECONDS_PER_MEASUREMENT", 0.0)
    times = bench.measure(timer, lambda: calls.append(1), warmup=2, repeats=50)
    assert len(times) == bench.MIN_REPEATS and len(calls) == 2 + bench.MIN_REPEATS
    assert len(bench.measure(timer, lambda: None, warmup=0, repeats=1)) == 1


def test_side_by_side_takes_turns_and_reports_each_median():
    class Clock:  # a timer whose "seconds" are the call's order, and records who ran when
        def __init__(self):
            self.order = []

        def run(self, fn):
            fn()
            return float(len(self.order))

    clock = Clock()
    medians = bench.side_by_side({"a": lambda: clock.order.append("a"),
                                  "b": lambda: clock.order.append("b")}, clock, warmup=1, rounds=3)
    assert clock.order == ["a", "b"] + ["a", "b"] * 3  # warm-up, then one of each per round
    assert medians == {"a": 5.0, "b": 6.0}  # a ran 3rd, 5th, 7th; b 4th, 6th, 8th
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bench.side_by_side({"a": lambda: None}, clock, rounds=0)


@pytest.mark.gpu
def test_gpu_bench_events_flush_and_copy_bandwidth(tmp_path):
    """On a real GPU: CUDA events, L2 flush, copy bandwidth, torch-on-CUDA baselines, card name."""
    out_file = tmp_path / "bench.json"
    out = kvlab("bench", "--backend", "cuda", "--size", "smoke", "--stage", "rope,attention",
                "--json", str(out_file), "--quiet", timeout=240)
    assert out.returncode == 0, out.stderr
    result = json.loads(out_file.read_text())
    meta = result["meta"]
    assert meta["cuda_mode"] == "gpu" and "L2 flushed" in meta["timer"]
    assert meta["copy_bandwidth_gb_per_s"] > 100 and meta["l2_flush_bytes"] == bench.L2_FLUSH_BYTES
    rows = check_result(result, "cuda", ["rope", "attention"])
    assert all(r["copy_bw_fraction"] > 0 for r in rows)
    assert any(r["impl"] == "torch-cuda" for r in rows), result["notes"]
    assert not any("NOT the same computation" in n for n in result["notes"]), result["notes"]
    assert not any("failed" in n for n in result["notes"]), result["notes"]
    ops = {r["op"] for r in rows}
    assert any(op.startswith("paged decode fp16 splits=auto (") for op in ops), ops
    for version, splits in bench.SPLIT_SWEEP["smoke"].items():
        assert {f"kernel v{version} fp16 splits={n}" for n in splits} <= ops
    assert meta["fp32_matmul_tflops"] > 1


class FakeEvent:
    """Records what a timer does with a CUDA event; 'elapsed' is 2.5 ms."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def record(self):
        self.log.append(f"record {self.name}")

    def synchronize(self):
        self.log.append(f"sync {self.name}")

    def elapsed_time(self, end):
        self.log.append(f"elapsed {self.name}->{end.name}")
        return 2.5


def test_gpu_timers_flush_then_time_between_events():
    """The GPU timers' call order, with stand-ins for numba.cuda and torch (no GPU here): flush
    L2, record start, run, record end, wait for end, elapsed ms -> s."""
    log = []
    names = iter(["start", "end"] * 2)

    class FakeNumbaCuda:
        @staticmethod
        def device_array(n, dtype):
            log.append(f"alloc {n}")
            return "buffer"

        @staticmethod
        def event(timing=True):
            assert timing
            return FakeEvent(log, next(names))

    timer = bench.NumbaCudaTimer(FakeNumbaCuda, memset=lambda buf, v, n: log.append(f"memset {buf} {n}"))
    assert timer.run(lambda: log.append("fn")) == pytest.approx(2.5e-3)
    n = bench.L2_FLUSH_BYTES
    assert log == [f"alloc {n}", f"memset buffer {n}", "record start", "fn", "record end",
                   "sync end", "elapsed start->end"]

    log.clear()

    class FakeTensor:
        def zero_(self):
            log.append("zero_")

    class FakeTorch:
        uint8 = "uint8"

        @staticmethod
        def empty(n, dtype, device):
            log.append(f"empty {n} {dtype} {device}")
            return FakeTensor()

        class cuda:  # noqa: N801
            @staticmethod
            def Event(enable_timing):  # noqa: N802
                assert enable_timing
                return FakeEvent(log, next(names))

    timer = bench.TorchCudaTimer(FakeTorch)
    assert timer.run(lambda: log.append("fn")) == pytest.approx(2.5e-3)
    assert log == [f"empty {n} uint8 cuda", "zero_", "record start", "fn", "record end",
                   "sync end", "elapsed start->end"]


def test_back_to_back_timer_runs_the_calls_inside_one_timing():
    """The kernels-alone timer: one flush and one pair of events around ``calls`` launches,
    reported per launch."""
    log = []

    class FakeTimer:
        label = "events"

        def run(self, fn):
            log.append("start")
            fn()
            log.append("end")
            return 1.0

    timer = bench.BackToBackTimer(FakeTimer(), 4)
    assert timer.run(lambda: log.append("launch")) == pytest.approx(0.25)
    assert log == ["start"] + ["launch"] * 4 + ["end"]
    assert "4 launches back to back" in timer.label


def test_measure_plans_repeats_from_a_whole_run(monkeypatch):
    """A back-to-back run takes ``calls_per_run`` calls' time: repeats are planned from that."""
    class FiveCallsOfOneSecond:
        calls_per_run = 5

        def run(self, fn):
            return 1.0  # seconds per call

    monkeypatch.setattr(bench.timers, "SECONDS_PER_MEASUREMENT", 20.0)
    assert len(bench.measure(FiveCallsOfOneSecond(), lambda: None, warmup=0, repeats=50)) == 4
    monkeypatch.setattr(bench.timers, "SECONDS_PER_MEASUREMENT", 0.0)
    assert len(bench.measure(FiveCallsOfOneSecond(), lambda: None, 0, 50)) == bench.MIN_REPEATS


@pytest.mark.parametrize("size, back_to_back", [("smoke", False), ("medium", False), ("real", True)])
def test_kernels_run_back_to_back_only_past_l2(size, back_to_back):
    """Every decode pool of ``--size real`` (fp16, int8, fp8) is read from DRAM by each of the
    back-to-back launches; the smaller presets' pools would come from L2 after the first."""
    s = bench.PRESETS[size]
    hq = s["num_kv_heads"] * s["group"]
    for kv_dtype in (None, "int8", "fp8_e4m3"):
        nbytes = bench.bytes_paged_decode(s["num_seqs"], s["context_len"], s["block_size"], hq,
                                          s["num_kv_heads"], s["head_dim"], kv_dtype=kv_dtype)
        assert (nbytes >= bench.BACK_TO_BACK_MIN_BYTES) == back_to_back
