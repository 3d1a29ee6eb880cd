#!/usr/bin/env bash
# Run one benchmark command and keep its output with the facts needed to read it:
#   bash bench/record.sh NAME COMMAND...     -> bench/results/NAME.txt
# The header names the command, the commit, the date and the machine (CPU model, cores, threads).
set -u -o pipefail
cd "$(dirname "$0")/.."
name=$1; shift
mkdir -p bench/results
out="bench/results/$name.txt"
tmp="$out.tmp"
{
  echo "# command: $*"
  echo "# commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- hdccf_triton kernels bench || echo ' (with uncommitted changes)')"
  echo "# date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "# machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores, torch $(python3 -c 'import torch; print(torch.__version__, torch.get_num_threads(), "threads")')"
  "$@" 2>&1
  echo "# exit status: $?"
} > "$tmp"
mv "$tmp" "$out"  # whole or not at all
cat "$out"
