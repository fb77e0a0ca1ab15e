#!/usr/bin/env bash
# The on-device check of the GPU issue: one short run on a lent GPU machine (see the
# `device` tool). Two stages:
#
#   scripts/gpu-check.sh --stage   here (x86-64): builds mep and the device-parametrised
#                                  test executable with `--features cuda` (into target-gpu/,
#                                  or $CARGO_TARGET_DIR)
#                                  and copies them, with MNIST, into gpu-stage/ (ignored
#                                  by git; carry it: about 28 MiB)
#   scripts/gpu-check.sh --run     there: nvidia-smi, the fidelity tests on CUDA, the
#                                  EP-vs-backprop check in f32, f16 and bf16, `bench
#                                  speed --quick`, and one full
#                                  MNIST epoch of smep and of adam; JSON into $OUT
#
# Each step has its own time limit so that the whole run stays inside a 10-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=gpu-stage

case "${1:-}" in
--stage)
  set -e
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-gpu}
  cargo build --release --locked --features cuda
  tests=$(cargo test --release --locked --features cuda --test device --no-run \
    --message-format=json | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
  rm -rf "$stage" && mkdir -p "$stage/data/mnist"
  # Stripped and xz-compressed, the two executables travel in about 17 MiB.
  for pair in "$CARGO_TARGET_DIR/release/mep:mep" "$tests:device-tests"; do
    cp "${pair%%:*}" "$stage/${pair##*:}"
    strip "$stage/${pair##*:}"
    xz -T0 -6 "$stage/${pair##*:}"
  done
  cp "${MEP_DATA_DIR:-../shared/data}"/mnist/*.gz "$stage/data/mnist/"
  du -sh "$stage"
  ;;
--run)
  out=${OUT:-/tmp/gpu-check}
  mkdir -p "$out"
  export MEP_DATA_DIR=$PWD/$stage/data
  bin=/tmp/gpu-check-bin
  mkdir -p "$bin"
  for exe in mep device-tests; do
    if command -v xz >/dev/null; then
      xz -dc "$stage/$exe.xz" >"$bin/$exe"
    else
      python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' \
        "$stage/$exe.xz" >"$bin/$exe"
    fi
    chmod +x "$bin/$exe"
  done
  mep=$bin/mep
  step() { echo; echo "== $*"; }
  step "nvidia-smi"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  step "fidelity tests on cuda"
  MEP_TEST_DEVICE=cuda timeout 180 "$bin/device-tests" --nocapture --test-threads 1
  # Each precision at the smallest nudge it resolves (tests/fidelity.rs on the CPU).
  for pb in f32:0.001 f16:0.01 bf16:0.1; do
    step "EP in ${pb%%:*} against backprop in f32 on cuda (check-gradient, beta ${pb##*:})"
    timeout 120 "$mep" --device cuda check-gradient --steps 300 \
      --precision "${pb%%:*}" --beta "${pb##*:}"
  done
  step "bench speed --quick on cuda"
  timeout 240 "$mep" --device cuda bench speed --quick --json --out "$out/speed" >"$out/speed.json"
  tail -c 2000 "$out/speed.json"
  for preset in adam smep; do
    step "one full MNIST epoch: $preset on cuda"
    timeout 240 "$mep" --device cuda train --preset "$preset" --dataset mnist \
      --model 784-256-128-10 --epochs 1 --json --out "$out/train-$preset" | tee "$out/$preset.json"
  done
  ;;
*)
  echo "usage: $0 --stage | --run" >&2
  exit 2
  ;;
esac
