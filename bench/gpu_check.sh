#!/usr/bin/env bash
# The GPU check, one command, under 5 minutes on one H100:
#   1. the tests marked `gpu` (Triton kernels vs the reference in fp32/bf16/fp16/fp64,
#      bit-identical runs, peak memory, the M = 65,536 / P = 16 smoke test, autocast);
#   2. the kernel benchmark (bench/kernels.py --quick by default, about 1.5 minutes; the full
#      grid, BENCH_ARGS="", takes up to 4 minutes on its own: run it alone).
# Time limits: 150 s for the tests, 130 s for the benchmark (which writes its CSV and
# Markdown after every shape, so a run cut short still leaves results).
# Everything is written under bench/results/ (or $RESULTS; copied to $OUT when it is set).
# Exit status: non-zero when the tests or the benchmark failed.
#
#   bash bench/gpu_check.sh
#   BENCH_ARGS="" bash bench/gpu_check.sh      # full benchmark grid
#   MODULATED=1 bash bench/gpu_check.sh        # also the modulated-similarity benchmark
set -u -o pipefail

cd "$(dirname "$0")/.."
RESULTS="${RESULTS:-bench/results}"
mkdir -p "$RESULTS"
unset TRITON_INTERPRET  # the kernels must compile for the GPU, not run in the interpreter
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi failed"
  python - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton missing:", err)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
EOF
} 2>&1 | tee "$RESULTS/environment.txt"

echo "== tests -m gpu"
timeout 150 python -m pytest -o addopts="" tests -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "tests exit status: $tests_rc" | tee -a "$RESULTS/gpu_tests.txt"

echo "== benchmark"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout 130 python bench/kernels.py ${BENCH_ARGS---quick} --out "$RESULTS" 2>&1 | tee "$RESULTS/kernels.log"
bench_rc=${PIPESTATUS[0]}
echo "benchmark exit status: $bench_rc" | tee -a "$RESULTS/kernels.log"

# The modulated-similarity benchmark (issue 4) only when asked for: MODULATED=1 (about 2-4
# minutes more; run it in the same call when the device time allows, or alone).
mod_rc=0
if [ "${MODULATED:-0}" = 1 ]; then
  echo "== modulated benchmark"
  timeout "${MODULATED_TIMEOUT:-240}" python bench/kernels_modulated.py --budget 150 --out "$RESULTS" 2>&1 | tee "$RESULTS/kernels_modulated.log"
  mod_rc=${PIPESTATUS[0]}
  echo "modulated benchmark exit status: $mod_rc" | tee -a "$RESULTS/kernels_modulated.log"
fi

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/bench_results"
  cp -r "$RESULTS"/. "$OUT/bench_results/" 2>/dev/null || true
fi

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$mod_rc" -eq 0 ]
