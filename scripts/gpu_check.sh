#!/usr/bin/env bash
# Every GPU check of kvlab in one device call (issue 9): the card, the attention and fused-write
# kernels' registers/shared/local memory, `pytest -m gpu` (first: it runs every kernel version
# against NumPy), `python -m kvlab bench --size real`,
# then compute-sanitizer memcheck, racecheck and initcheck over the `sanitize`-marked tests.
# Run from the project root with .gpu/ prepared by ../shared/gpu/prepare.sh (the numpy<2.5 wheel):
#     bash scripts/gpu_check.sh        (device tool: carry [".gpu"])
# Logs go to $OUT (8 files, the device tool's limit): gpu.txt resources.json bench.txt bench.json
# gpu_tests.log memcheck.log racecheck.log initcheck.log
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "== $1 (t=${SECONDS}s)"; }
step card
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -c "import numpy, numba, torch, numba.cuda as c, kvlab; print('numpy', numpy.__version__, 'numba', numba.__version__, 'torch', torch.__version__, 'cuda', c.is_available())" | tee -a "$OUT/gpu.txt"
step resources
timeout 60 python3 -m kvlab.kernels.cuda.ptx --resources paged_attention,merge_splits,warp_attention,fused_write_kernel > "$OUT/resources.json" 2>&1
grep -B1 -A3 '"registers"' "$OUT/resources.json" | grep -E 'attention|fused_write_kernel|registers|local' | cut -c1-120
step "pytest -m gpu"
timeout 170 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests > "$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; tail -15 "$OUT/gpu_tests.log"
step bench
timeout 200 python3 -m kvlab bench --backend cuda --size real --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "rc=$?"; grep -vE '^\s*$' "$OUT/bench.txt" | grep -vE 'kvlab bench: ' | cut -c1-230 | tail -60
step memcheck
timeout 80 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 20 python3 -m pytest -m "gpu and sanitize" -q -p no:cacheprovider tests > "$OUT/memcheck.log" 2>&1
echo "rc=$?"; tail -4 "$OUT/memcheck.log"
step racecheck
timeout 60 compute-sanitizer --tool racecheck --print-limit 20 python3 -m pytest -m "gpu and sanitize" -k "attention or fused" -q -p no:cacheprovider tests > "$OUT/racecheck.log" 2>&1
echo "rc=$?"; tail -4 "$OUT/racecheck.log"
step initcheck
timeout 60 compute-sanitizer --tool initcheck --report-api-errors no --print-limit 20 python3 -m pytest -m "gpu and sanitize" -k "attention or fused" -q -p no:cacheprovider tests > "$OUT/initcheck.log" 2>&1
echo "rc=$?"; tail -4 "$OUT/initcheck.log"
step done
