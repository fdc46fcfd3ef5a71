#!/usr/bin/env bash
# The issue-6 measurements on a lent GPU machine (H100/H200), one stage per `run` call (each
# stays under the device tool's 10-minute limit). A session gets about 15 device-minutes, the
# machine's start included: `all` runs the stages that matter most in one call, each under a
# time limit, most important first, so that what finished comes back even if the call is cut.
#
# Here, first:   bash ../shared/gpu/prepare.sh --bin kiln-bench --example mnist_cnn
#                find .device-bin -type f ! -name kiln-bench ! -name mnist_cnn -delete
# (prepare.sh copies every binary ever built into .device-bin: 102 MB here, over the 64 MiB
# that `run` carries; these two are 24 MB)
# Then, through the device tool's `run` with carry [".gl", ".device-bin"] (timeout_s 560):
#   bash benches/device.sh all       # suite, train, profile, sweep (about 8 minutes at most)
# or one call per stage:
#   bash benches/device.sh suite     # the suite with model-chosen kernels (incl. f16, tensor cores)
#   bash benches/device.sh tune      # the suite's products and steps with GEMMs timed per shape
#   bash benches/device.sh sweep     # every tensor-core (f16) and GEMM (f32) configuration on 4096^3
#   bash benches/device.sh profile   # per-op GPU times of every plan of the suite
#   bash benches/device.sh train     # the README's MNIST command, timed
# Results land in $OUT (JSON, logs; targets.txt: the six issue-6 targets, met or not); copy the
# numbers into BENCHMARKS.md with the command.
set -euo pipefail
stage=${1:?usage: bash benches/device.sh all|suite|tune|sweep|profile|train}
out=${OUT:-/tmp/kiln-out}
mkdir -p "$out"
# the machine has the driver but no Vulkan loader: unpack the carried packages once
if ! ldconfig -p | grep -q libvulkan.so.1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$out/gpu.txt" 2>&1 || true
export KILN_CACHE_DIR="$out/cache"
# `all` limits each program's time (STAGE_LIMIT seconds)
limited() { if [ -n "${STAGE_LIMIT:-}" ]; then timeout -k 5 "$STAGE_LIMIT" "$@"; else "$@"; fi; }
case "$stage" in
  suite)
    limited .device-bin/kiln-bench --quick --no-cpu --json "$out/auto.json" 2>&1 | tee "$out/auto.txt"
    # the six targets, met or not (benches/targets.py: standard-library Python)
    python3 benches/targets.py "$out/auto.json" 2>&1 | tee "$out/targets.txt" || true
    # the recurrent layers one dispatch per step, against the whole-sequence kernels above
    KILN_RNN_STEPS=1 limited .device-bin/kiln-bench --quick --no-cpu --only lstm 2>&1 | tee "$out/lstm-steps.txt" ;;
  tune)
    KILN_GEMM=tune limited .device-bin/kiln-bench --quick --no-cpu --only matmul --only conv --only cnn --only lstm \
      --json "$out/tune.json" 2>&1 | tee "$out/tune.txt"
    cp "$KILN_CACHE_DIR"/gemm-tune-*.txt "$out/" 2>/dev/null || true
    python3 benches/targets.py "$out"/auto.json "$out/tune.json" 2>&1 | tee "$out/targets-tuned.txt" || true ;;
  sweep)
    limited .device-bin/kiln-bench --sweep 4096 --quick 2>&1 | tee "$out/sweep.txt" ;;
  profile)
    KILN_PROFILE=1 limited .device-bin/kiln-bench --quick --no-cpu > "$out/profile.txt" 2>&1 ;;
  train)
    { time limited .device-bin/mnist_cnn --data data/mnist --limit 2000 --epochs 3; } > "$out/train.txt" 2>&1 ;;
  all)
    # seconds per program of each stage; a stage cut short keeps what it wrote
    for s in suite:180 train:60 profile:80 sweep:150; do
      STAGE_LIMIT=${s#*:} bash "$0" "${s%%:*}" || echo "[stage ${s%%:*} ended with $?]" | tee -a "$out/all.txt"
    done
    ls -l "$out" ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
