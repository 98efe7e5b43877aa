#!/usr/bin/env bash
# Every GPU check of kvlab in one command, in order of importance: the card, `pytest -m gpu` (first:
# it runs every kernel version against NumPy at real sizes), `python -m kvlab bench --size real`,
# attention v7's knobs (scripts/sweep_v7.py, appended to bench.txt), the public ops' host-side
# costs part by part (scripts/profile_kernels.py --host), compute-sanitizer memcheck over the
# `sanitize`-marked tests, an Nsight Compute profile of the attention (v2, v5, v6, v7) and
# fused-write kernels (scripts/profile_kernels.py), the kernels' registers/shared/local memory,
# then racecheck and initcheck. compute-sanitizer and ncu come with the CUDA toolkit; a step whose
# tool is missing says so and is skipped.
#
# Run it from the repository root on a Linux machine with an NVIDIA GPU and its driver:
#     bash scripts/gpu_check.sh              installs kvlab with `make setup` (.venv, pinned
#                                            versions, from the network), then runs the checks
#     bash scripts/gpu_check.sh WHEELS_DIR   (or WHEELS=WHEELS_DIR) for a machine without network:
#                                            the Python that runs (PYTHON, default python3) must
#                                            already have kvlab's dependencies; the wheels in
#                                            WHEELS_DIR (e.g. numpy<2.5, downloaded elsewhere with
#                                            `pip download`) are put ahead of them, and kvlab is
#                                            installed editable without fetching anything
# Logs go to $OUT (default build/gpu_check): gpu.txt resources.json gpu_tests.log bench.txt
# bench.json host_overhead.txt ncu.csv sanitize.log (memcheck, racecheck, initcheck).
# The steps share one deadline (DEADLINE seconds, default 570): each step's timeout is its own or
# what is left, whichever is less, and the bench saves its rows so far when it is cut.
# BENCH_STAGES: the bench's stages, attention first (a rerun may skip stages whose code has not
# changed since the last run); SANITIZE_K: a pytest -k filter for memcheck's tests (all
# sanitize-marked ones by default).
set -uo pipefail
OUT=${OUT:-build/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-570}
WHEELS=${1:-${WHEELS:-}}
step() { echo "== $1 (t=${SECONDS}s)"; }
upto() { local left=$((DEADLINE - SECONDS)); echo $(( $1 < left ? $1 : (left > 5 ? left : 5) )); }
step card
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [ -n "$WHEELS" ]; then
  PY=${PYTHON:-python3}
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels (*.whl) in $WHEELS"; exit 1; }
  SITE=$(mktemp -d)  # the wheels go ahead of the environment's own packages, which stay untouched
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=$SITE
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
else
  make setup || exit 1
  PY=${PYTHON:-.venv/bin/python}
  SECONDS=0  # the deadline counts the checks, not a first install's download
fi
"$PY" -c "import numpy, numba, torch, numba.cuda as c, kvlab; print('numpy', numpy.__version__, 'numba', numba.__version__, 'torch', torch.__version__, 'cuda', c.is_available())" | tee -a "$OUT/gpu.txt"
step "pytest -m gpu"
# pytest-xdist (when installed) compiles the kernels in parallel processes; without it, one
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 12")
timeout -k 10 $(upto 170) "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider $XDIST tests > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; tail -15 "$OUT/gpu_tests.log"
step bench
timeout -k 10 $(upto 200) "$PY" -m kvlab bench --backend cuda --size real --stage "${BENCH_STAGES:-attention,fused_write,paging,quant,rope}" --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "rc=$?"; grep -vE '^\s*$' "$OUT/bench.txt" | grep -vE 'kvlab bench: ' | cut -c1-230 | tail -90
step "v7 sweep"
timeout -k 10 $(upto 60) "$PY" scripts/sweep_v7.py >> "$OUT/bench.txt" 2>&1
echo "rc=$?"; grep -A30 ': median / min of 20' "$OUT/bench.txt" | cut -c1-150
step "host overhead"
timeout -k 10 $(upto 60) "$PY" scripts/profile_kernels.py --host > "$OUT/host_overhead.txt" 2>&1
echo "rc=$?"; cut -c1-120 "$OUT/host_overhead.txt" | tail -20
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
sanitize() {  # sanitize TOOL K-FILTER [options]: one compute-sanitizer run, appended to sanitize.log
  local tool=$1 k=$2 limit=$3; shift 3
  echo "### $tool"
  if [ -z "$SANITIZER" ]; then echo "compute-sanitizer not found: $tool skipped"; return; fi
  timeout -k 10 $(upto "$limit") "$SANITIZER" --tool "$tool" "$@" --print-limit 20 "$PY" -m pytest -m "gpu and sanitize" -k "$k" -q -p no:cacheprovider tests
  echo "rc=$?"
}
step memcheck
sanitize memcheck "${SANITIZE_K:-}" 70 --report-api-errors no > "$OUT/sanitize.log" 2>&1
tail -4 "$OUT/sanitize.log"
step "ncu profile"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  timeout -k 10 $(upto 90) "$NCU" --clock-control none --profile-from-start off --kernel-name regex:'attention_v|warp_attention|fused_write' \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --csv --page details --log-file "$OUT/ncu.csv" \
    "$PY" scripts/profile_kernels.py 2>&1 | tail -5
  echo "rc=$?"; grep -E 'Duration|Achieved Occupancy|Memory Throughput|Registers Per|ERR' "$OUT/ncu.csv" | cut -c1-200 | head -30
else
  echo "ncu not found: no profile" | tee "$OUT/ncu.csv"
fi
step resources
# ptxas's figures (nvJitLink) and the driver's, for this card's compute capability
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
timeout -k 10 $(upto 90) "$PY" -m kvlab.kernels.cuda.ptx --cc "$CC" --resources paged_attention,merge_splits,warp_attention,attention_v8,fused_write > "$OUT/resources.json" 2>&1
grep -B1 -A3 '"registers"' "$OUT/resources.json" | grep -E 'attention|fused_write_kernel|registers|local' | cut -c1-120
step racecheck
sanitize racecheck "attention or fused" 45 >> "$OUT/sanitize.log" 2>&1
tail -3 "$OUT/sanitize.log"
step initcheck
sanitize initcheck "attention or fused" 45 --report-api-errors no >> "$OUT/sanitize.log" 2>&1
tail -3 "$OUT/sanitize.log"
step done
