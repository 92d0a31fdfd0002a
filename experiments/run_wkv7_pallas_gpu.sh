#!/bin/bash
# One device call for the WKV-7 Pallas kernel: a smoke test (stop early if it fails to
# compile; SKIP_SMOKE=1 skips it), the benchmark, then the GPU tests (TEST_K=expr selects
# some). Logs under $OUT; the short tables come last.
#   bash experiments/run_wkv7_pallas_gpu.sh
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/wkv7_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
if [ -z "$SKIP_SMOKE" ]; then
  timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_wkv7_pallas.py -m gpu \
    -k "test_forward_matches_float64 and model" 2>&1 | tee "$OUT/smoke.log" || exit 1
fi
timeout 250 python3 experiments/bench_wkv7.py --out "$OUT" --check --check-t 1024 \
  --impls scan,chunked,pallas --pallas-variants 16:bf16,32:tf32,32:bf16 2>&1 | tee "$OUT/bench.log"
timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_wkv7_pallas.py -m gpu \
  -k "${TEST_K:-gpu}" -rA --durations=5 2>&1 | tee "$OUT/tests.log" | grep -v "^PASSED" | tail -30
grep "check" "$OUT/bench.log"; sed -n '/^| (B, T, H)/,$p' "$OUT/bench.log"
