#!/usr/bin/env bash
# The GPU check, one command, under 8 minutes on one H100/H200:
#   0. in the background, the kernels the benchmark launches are compiled in parallel into
#      Triton's cache (bench/sass_report.py --precompile: about 20 kernels, 3-7 s each cold);
#   1. the tests marked `gpu` (Triton kernels vs the reference in fp32/bf16/fp16/fp64,
#      bit-identical runs, peak memory, the M = 65,536 / P = 16 smoke test, autocast), in three
#      pytest processes side by side, so that their cold compiles run in parallel;
#   2. the kernel benchmark (bench/kernel_bench.py --quick by default, with A/B rows of other
#      tiles at M = 4096, P = 4, d = 64, bf16; the full grid, BENCH_ARGS="", takes up to
#      4 minutes on its own: run it alone).
# Time limits: 200 s for the tests, 150 s for the benchmark (which writes its CSV and
# Markdown after every shape, so a run cut short still leaves results), 90 s for the
# modulated benchmark (MODULATED=1): at most 440 s plus start-up.
# Everything is written under runs/gpu_check/ (or $RESULTS). When $OUT is set (the device
# machine, which returns at most 8 files), at most 4 files go there: bench_results.tar.gz
# (all of $RESULTS: logs, CSVs, Markdown) and, readable as they are, environment.txt,
# summary.txt (the test and benchmark exit statuses and failures) and kernels.md.
# Exit status: non-zero when the tests or the benchmark failed.
#
#   bash bench/gpu_check.sh
#   BENCH_ARGS="" bash bench/gpu_check.sh      # full benchmark grid
#   MODULATED=1 bash bench/gpu_check.sh        # also the modulated-similarity benchmark
#   DRY_RUN=1 bash bench/gpu_check.sh          # print the commands, run nothing
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

echo "== precompile (background)"
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "+ python3 bench/sass_report.py --precompile --jobs ${JOBS:-8} > $RESULTS/precompile.log &"
  pre_pid=""
else
  timeout 180 python3 bench/sass_report.py --precompile --jobs "${JOBS:-8}" > "$RESULTS/precompile.log" 2>&1 &
  pre_pid=$!
fi

echo "== tests -m gpu (three processes)"
PYTEST=(python3 -m pytest -o addopts="" -m gpu -q -rs -p no:cacheprovider)
tests_rc=0
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "+ timeout 200 ${PYTEST[*]} tests/test_triton_dot.py | tests/test_modulated_triton.py | tests (the rest)"
else
  timeout 200 "${PYTEST[@]}" tests/test_triton_dot.py > "$RESULTS/gpu_tests_dot.txt" 2>&1 &
  t1=$!
  timeout 200 "${PYTEST[@]}" tests/test_modulated_triton.py > "$RESULTS/gpu_tests_modulated.txt" 2>&1 &
  t2=$!
  timeout 200 "${PYTEST[@]}" tests --ignore tests/test_triton_dot.py \
    --ignore tests/test_modulated_triton.py > "$RESULTS/gpu_tests_other.txt" 2>&1 &
  t3=$!
  for pid in $t1 $t2 $t3; do
    wait "$pid"; rc=$?
    [ "$rc" -eq 5 ] && rc=0  # 5: no test selected
    [ "$rc" -ne 0 ] && tests_rc=$rc
  done
  cat "$RESULTS"/gpu_tests_*.txt > "$RESULTS/gpu_tests.txt"
  tail -n 3 "$RESULTS"/gpu_tests_*.txt
fi
echo "tests exit status: $tests_rc" | tee -a "$RESULTS/gpu_tests.txt"

[ -n "$pre_pid" ] && { wait "$pre_pid"; echo "precompile exit status: $? ($(tail -n 1 "$RESULTS/precompile.log"))"; }

echo "== benchmark"
bench_rc=0
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "+ timeout 150 python3 bench/kernel_bench.py ${BENCH_ARGS---quick} --out $RESULTS"
else
  timeout 150 python3 bench/kernel_bench.py ${BENCH_ARGS---quick} --out "$RESULTS" > "$RESULTS/kernels.log" 2>&1
  bench_rc=$?
  tail -n 25 "$RESULTS/kernels.log"
fi
echo "benchmark exit status: $bench_rc" | tee -a "$RESULTS/kernels.log"

# The modulated-similarity benchmark (issue 4) only when asked for: MODULATED=1.
mod_rc=0
if [ "${MODULATED:-0}" = 1 ]; then
  echo "== modulated benchmark"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "+ timeout ${MODULATED_TIMEOUT:-90} python3 bench/kernel_bench_modulated.py --budget 60 --out $RESULTS"
  else
    timeout "${MODULATED_TIMEOUT:-90}" python3 bench/kernel_bench_modulated.py --budget 60 --out "$RESULTS" \
      > "$RESULTS/kernels_modulated.log" 2>&1
    mod_rc=$?
    tail -n 10 "$RESULTS/kernels_modulated.log"
  fi
  echo "modulated benchmark exit status: $mod_rc" | tee -a "$RESULTS/kernels_modulated.log"
fi

{
  echo "tests exit status: $tests_rc; benchmark: $bench_rc; modulated: $mod_rc"
  grep -h -E "^(FAILED|ERROR)|passed|failed" "$RESULTS"/gpu_tests_*.txt 2>/dev/null
} > "$RESULTS/summary.txt"

if [ -n "${OUT:-}" ] && [ "${DRY_RUN:-0}" != 1 ]; then  # at most 4 files: the device machine returns at most 8
  mkdir -p "$OUT"
  tar -czf "$OUT/bench_results.tar.gz" -C "$RESULTS" . 2>/dev/null || echo "tar of $RESULTS failed" >&2
  for f in environment.txt summary.txt kernels.md; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
  done
fi

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$mod_rc" -eq 0 ]
