#!/usr/bin/env bash
# Data-parallel scaling on this machine: one EP epoch with 1 and 2 MPI ranks, one thread
# per rank, side by side in one run (the ratio is what to read; absolute times vary).
#
#   cargo build --release --features mpi
#   MEP_DATA_DIR=../shared/data scripts/mpi_scaling.sh [RANKS...]   # default: 1 2
#
# Prints each run's epoch metrics and rank 0's communication line.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${MEP_BIN:-target/release/mep}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
ranks=("${@:-1 2}")
read -r -a ranks <<<"${ranks[*]}"
mpi=(mpirun --allow-run-as-root --oversubscribe)
run() {
  local name="$1"; shift
  for n in "${ranks[@]}"; do
    echo "$name, $n rank(s)"
    "${mpi[@]}" -n "$n" "$bin" --threads 1 train "$@" --no-fetch --json --force --out "$out/$name-$n" 2>&1 |
      grep -E '^\{|communication'
  done
}
run "784-256-128-10 smep" --preset smep --epochs 1
run "784-256-128-10 EP+Adam" --estimator ep --optimizer adam --epochs 1
run "cnn smep_plus (4096 samples)" --model cnn --train-samples 4096 --test-samples 1000 --epochs 1
