#!/usr/bin/env bash
# The GPU check, one command, under 5 minutes on one H100:
#   1. the tests marked `gpu` (Triton kernels vs the reference in fp32/bf16/fp16/fp64,
#      bit-identical runs, peak memory, the M = 65,536 / P = 16 smoke test, autocast);
#   2. the kernel benchmark (bench/kernel_bench.py --quick by default, about 1.5 minutes; the
#      full grid, BENCH_ARGS="", takes up to 4 minutes on its own: run it alone).
# Time limits: 150 s for the tests, 130 s for the benchmark (which writes its CSV and
# Markdown after every shape, so a run cut short still leaves results).
# Everything is written under runs/gpu_check/ (or $RESULTS). When $OUT is set (the device
# machine, which returns at most 8 files), at most 5 files go there: bench_results.tar.gz
# (all of $RESULTS) and, readable as they are, environment.txt, gpu_tests.txt, kernels.md
# and, with MODULATED=1, kernels_modulated.md.
# Exit status: non-zero when the tests or the benchmark failed.
#
#   bash bench/gpu_check.sh
#   BENCH_ARGS="" bash bench/gpu_check.sh      # full benchmark grid
#   MODULATED=1 bash bench/gpu_check.sh        # also the modulated-similarity benchmark
set -u -o pipefail

cd "$(dirname "$0")/.."
RESULTS="${RESULTS:-runs/gpu_check}"
mkdir -p "$RESULTS"
unset TRITON_INTERPRET  # the kernels must compile for the GPU, not run in the interpreter
# The package as pip would install it (hdccf_triton with kernels/ as hdccf_triton.kernels), without
# pip: the device image has no network, and a bare checkout on PYTHONPATH lacks hdccf_triton.kernels.
SITE="$(mktemp -d)"
cp -r hdccf_triton "$SITE/" && cp -r kernels "$SITE/hdccf_triton/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi failed"
  python3 - <<'EOF'
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
timeout 150 python3 -m pytest -o addopts="" tests -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "tests exit status: $tests_rc" | tee -a "$RESULTS/gpu_tests.txt"

echo "== benchmark"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout 130 python3 bench/kernel_bench.py ${BENCH_ARGS---quick} --out "$RESULTS" 2>&1 | tee "$RESULTS/kernels.log"
bench_rc=${PIPESTATUS[0]}
echo "benchmark exit status: $bench_rc" | tee -a "$RESULTS/kernels.log"

# The modulated-similarity benchmark (issue 4) only when asked for: MODULATED=1 (about 2-4
# minutes more; run it in the same call when the device time allows, or alone).
mod_rc=0
if [ "${MODULATED:-0}" = 1 ]; then
  echo "== modulated benchmark"
  timeout "${MODULATED_TIMEOUT:-240}" python3 bench/kernel_bench_modulated.py --budget 150 --out "$RESULTS" 2>&1 | tee "$RESULTS/kernels_modulated.log"
  mod_rc=${PIPESTATUS[0]}
  echo "modulated benchmark exit status: $mod_rc" | tee -a "$RESULTS/kernels_modulated.log"
fi

if [ -n "${OUT:-}" ]; then  # at most 5 files: the device machine returns at most 8
  mkdir -p "$OUT"
  tar -czf "$OUT/bench_results.tar.gz" -C "$RESULTS" . 2>/dev/null || echo "tar of $RESULTS failed" >&2
  for f in environment.txt gpu_tests.txt kernels.md kernels_modulated.md; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
  done
fi

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$mod_rc" -eq 0 ]
