#!/usr/bin/env bash
# Every GPU check of kvlab in one device call (issue 9), in order of importance: the card,
# `pytest -m gpu` (first: it runs every kernel version against NumPy), `python -m kvlab bench
# --size real`, attention v7's knobs (scripts/sweep_v7.py, appended to bench.txt), the public
# ops' host-side costs part by part (scripts/profile_kernels.py --host), compute-sanitizer
# memcheck over the `sanitize`-marked tests, an Nsight Compute profile of the attention (v2, v5,
# v6, v7) and fused-write kernels (scripts/profile_kernels.py; skipped without ncu), the
# attention and fused-write kernels' registers/shared/local memory, then racecheck and initcheck.
# Run from the project root with .gpu/ prepared by ../shared/gpu/prepare.sh (the numpy<2.5 wheel):
#     bash scripts/gpu_check.sh        (device tool: carry [".gpu"])
# Logs go to $OUT (8 files, the device tool's limit): gpu.txt resources.json gpu_tests.log
# bench.txt bench.json host_overhead.txt ncu.csv sanitize.log (memcheck, racecheck, initcheck).
# The steps run in order of importance and share one deadline (DEADLINE seconds, default 570, for
# a device call of timeout_s 600): each step's timeout is its own or what is left, whichever is
# less. $OUT comes back even if the call is cut, and the bench saves its rows so far on SIGTERM.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-570}
# BENCH_STAGES: the bench's stages, attention first (a rerun may skip stages whose code has not
# changed since the last run: their rows are in that run's JSON); SANITIZE_K: a pytest -k filter
# for memcheck's tests (all sanitize-marked ones by default)
step() { echo "== $1 (t=${SECONDS}s)"; }
upto() { local left=$((DEADLINE - SECONDS)); echo $(( $1 < left ? $1 : (left > 5 ? left : 5) )); }
step card
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -c "import numpy, numba, torch, numba.cuda as c, kvlab; print('numpy', numpy.__version__, 'numba', numba.__version__, 'torch', torch.__version__, 'cuda', c.is_available())" | tee -a "$OUT/gpu.txt"
step "pytest -m gpu"
# pytest-xdist (in the GPU image) compiles the kernels in parallel processes; without it, one
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
timeout -k 10 $(upto 170) python3 -m pytest -m gpu -q -rs -p no:cacheprovider $XDIST tests > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; tail -15 "$OUT/gpu_tests.log"
step bench
timeout -k 10 $(upto 200) python3 -m kvlab bench --backend cuda --size real --stage "${BENCH_STAGES:-attention,fused_write,paging,quant,rope}" --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "rc=$?"; grep -vE '^\s*$' "$OUT/bench.txt" | grep -vE 'kvlab bench: ' | cut -c1-230 | tail -90
step "v7 sweep"
timeout -k 10 $(upto 60) python3 scripts/sweep_v7.py >> "$OUT/bench.txt" 2>&1
echo "rc=$?"; grep -A30 ': median / min of 20' "$OUT/bench.txt" | cut -c1-150
step "host overhead"
timeout -k 10 $(upto 60) python3 scripts/profile_kernels.py --host > "$OUT/host_overhead.txt" 2>&1
echo "rc=$?"; cut -c1-120 "$OUT/host_overhead.txt" | tail -12
step memcheck
{ echo "### memcheck"; timeout -k 10 $(upto 70) compute-sanitizer --tool memcheck --report-api-errors no --print-limit 20 python3 -m pytest -m "gpu and sanitize" -k "${SANITIZE_K:-}" -q -p no:cacheprovider tests; echo "rc=$?"; } > "$OUT/sanitize.log" 2>&1
tail -4 "$OUT/sanitize.log"
step "ncu profile"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  timeout -k 10 $(upto 90) "$NCU" --clock-control none --profile-from-start off --kernel-name regex:'warp_attention|fused_write_kernel' \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --csv --page details --log-file "$OUT/ncu.csv" \
    python3 scripts/profile_kernels.py 2>&1 | tail -5
  echo "rc=$?"; grep -E 'Duration|Achieved Occupancy|Memory Throughput|Registers Per|ERR' "$OUT/ncu.csv" | cut -c1-200 | head -30
else
  echo "ncu not found: no profile" | tee "$OUT/ncu.csv"
fi
step resources
timeout -k 10 $(upto 45) python3 -m kvlab.kernels.cuda.ptx --resources paged_attention,merge_splits,warp_attention,fused_write_kernel > "$OUT/resources.json" 2>&1
grep -B1 -A3 '"registers"' "$OUT/resources.json" | grep -E 'attention|fused_write_kernel|registers|local' | cut -c1-120
step racecheck
{ echo "### racecheck"; timeout -k 10 $(upto 45) compute-sanitizer --tool racecheck --print-limit 20 python3 -m pytest -m "gpu and sanitize" -k "attention or fused" -q -p no:cacheprovider tests; echo "rc=$?"; } >> "$OUT/sanitize.log" 2>&1
tail -3 "$OUT/sanitize.log"
step initcheck
{ echo "### initcheck"; timeout -k 10 $(upto 45) compute-sanitizer --tool initcheck --report-api-errors no --print-limit 20 python3 -m pytest -m "gpu and sanitize" -k "attention or fused" -q -p no:cacheprovider tests; echo "rc=$?"; } >> "$OUT/sanitize.log" 2>&1
tail -3 "$OUT/sanitize.log"
step done
