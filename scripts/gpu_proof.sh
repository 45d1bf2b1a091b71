#!/usr/bin/env bash
# The GPU proof (issue 13): train converged CIFAR-10 models on one CUDA GPU and measure resopt's GPU lines.
#
#   1. installs the wheels carried in .carry/wheels (offline: pip --no-index), unless GPU_PROOF_SKIP_INSTALL=1;
#   2. unpacks the carried CIFAR-10 JPEG archive (.carry/data/cifar10-jpeg.tar.gz), unless GPU_PROOF_DATA names
#      an ImageFolder with train/ and test/ already;
#   3. trains resnet18-cifar and resnet56 on the full train split (AMP bf16, channels_last, the fast data path)
#      for GPU_PROOF_BUDGET seconds each (train --time-budget), top-1 on the 10,000 test images, img/s per epoch;
#   4. benches both .pt files on the GPU: --pt-variants fp32,fp16,fp16-channels-last at batch 1, 256 and 4096;
#   5. exports and quantizes (static INT8) both on the machine's CPU, with top-1 on the test split, and
#      benches FP32 and INT8 ONNX there;
#   6. writes to $OUT (default ./gpu-proof-out) four files, since the device tool brings back at most eight:
#      gpu_proof.json (every step's JSON gathered by scripts/gpu_proof_summary.py), gpu_proof.log (every
#      step's stderr, appended as it runs, so a run cut short still says how far it got), steps.tar (the raw
#      per-step files, re-packed after each architecture) and resnet56.pt.
#
# GPU_PROOF_SMOKE=1 runs the same steps at a tiny scale on the CPU (1 epoch, 5 images per class, batch
# sizes 1 and 8, fp32 only) to test this script's logic where there is no GPU (tests/test_gpu_proof.py).
#
#   bash scripts/gpu_proof.sh                      # on the GPU machine (make gpu-proof)
#   GPU_PROOF_SMOKE=1 GPU_PROOF_DATA=examples/cifar10-mini bash scripts/gpu_proof.sh
set -euo pipefail

OUT=${OUT:-./gpu-proof-out}
PY=${PYTHON:-python3}
SMOKE=${GPU_PROOF_SMOKE:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/resopt-gpu-proof.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)
LOG="$OUT/gpu_proof.log"
STEPS="$WORK/steps"
mkdir -p "$STEPS"
: > "$LOG"
say() { echo "[gpu-proof +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG" >&2; }
# step NAME CMD...: run a resopt command, its JSON to steps/NAME.json, its stderr (the epoch lines with their
# img/s, for one) appended to the log and shown as it comes.
step() {
    local name=$1; shift
    echo "=== $name: resopt $*" >> "$LOG"
    if ! "$PY" -m resopt "$@" --json > "$STEPS/$name.json" 2> >(tee -a "$LOG" >&2); then
        say "step $name failed (see $LOG)"; tail -5 "$LOG" >&2; pack; exit 1
    fi
}
pack() { tar -cf "$OUT/steps.tar" -C "$WORK" steps; }

if [[ "$SMOKE" == 1 ]]; then
    DEVICE=cpu; BENCH_DEVICE=cpu; VARIANTS=fp32; GPU_BATCHES=1,8; CPU_BATCHES=1,8
    BUDGET=${GPU_PROOF_BUDGET:-600}; EPOCHS=1; BATCH=32; LIMIT=(--limit-per-class 5); EVAL_LIMIT=(--limit-per-class 5)
    BENCH_TIME=(--warmup 1 --iters 2 --min-time 0 --rounds 1); NUM_CALIB=20
else
    DEVICE=cuda; BENCH_DEVICE=gpu; VARIANTS=fp32,fp16,fp16-channels-last; GPU_BATCHES=1,256,4096; CPU_BATCHES=1,64
    BUDGET=${GPU_PROOF_BUDGET:-150}; EPOCHS=200; BATCH=512; LIMIT=(); EVAL_LIMIT=()
    BENCH_TIME=(--warmup 5 --iters 20 --min-time 1 --rounds 2); NUM_CALIB=500
fi
ARCHS=${GPU_PROOF_ARCHS:-resnet18-cifar resnet56}
CARRY=${GPU_PROOF_CARRY:-.carry}  # filled by scripts/gpu_proof_prepare.sh
SMOKE_FLAG=(); [[ "$SMOKE" == 1 ]] && SMOKE_FLAG=(--smoke)

# 1. The packages the GPU machine lacks, from wheels carried with the working tree (no network there).
if [[ "${GPU_PROOF_SKIP_INSTALL:-0}" != 1 ]]; then
    if ! ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
        echo "Error: no wheels in $CARRY/wheels; run scripts/gpu_proof_prepare.sh first (or GPU_PROOF_SKIP_INSTALL=1)" >&2
        exit 2
    fi
    say "installing $(ls "$CARRY"/wheels/*.whl | wc -l) carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$CARRY"/wheels/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# 2. The data.
DATA=${GPU_PROOF_DATA:-}
if [[ -z "$DATA" ]]; then
    ARCHIVE=$CARRY/data/cifar10-jpeg.tar.gz
    [[ -f "$ARCHIVE" ]] || { echo "Error: $ARCHIVE not found; run scripts/gpu_proof_prepare.sh first" >&2; exit 2; }
    say "unpacking $ARCHIVE"
    tar -xzf "$ARCHIVE" -C "$WORK"
    DATA="$WORK/cifar10"
fi
say "data: $DATA"
step env env
if [[ "$SMOKE" != 1 ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$LOG" 2>&1 || true
fi

# 3.-5. Per architecture: train on the GPU, bench the .pt there, export + quantize + bench on the CPU.
for ARCH in $ARCHS; do
    say "train $ARCH for ${BUDGET}s on $DEVICE"
    step "train-$ARCH" train --arch "$ARCH" --data "$DATA" --device "$DEVICE" --epochs "$EPOCHS" \
        --time-budget "$BUDGET" --batch-size "$BATCH" --label-smoothing 0.1 --data-path fast "${LIMIT[@]}" \
        -o "$WORK/$ARCH.pt"
    if [[ "$ARCH" == resnet56 ]]; then cp "$WORK/$ARCH.pt" "$OUT/resnet56.pt"; fi
    say "bench $ARCH.pt on $BENCH_DEVICE ($VARIANTS, batch $GPU_BATCHES)"
    step "bench-gpu-$ARCH" bench "$WORK/$ARCH.pt" --device "$BENCH_DEVICE" --pt-variants "$VARIANTS" \
        -b "$GPU_BATCHES" "${BENCH_TIME[@]}"
    say "export + quantize $ARCH on the CPU"
    step "export-$ARCH" export "$WORK/$ARCH.pt" -o "$WORK/$ARCH.onnx"
    step "quantize-$ARCH" quantize "$WORK/$ARCH.onnx" --mode int8 --num-calib "$NUM_CALIB" --data "$DATA" \
        "${EVAL_LIMIT[@]}" -o "$WORK/$ARCH.int8.onnx"
    say "bench $ARCH.onnx and $ARCH.int8.onnx on the CPU (batch $CPU_BATCHES)"
    step "bench-cpu-$ARCH" bench "$WORK/$ARCH.onnx" "$WORK/$ARCH.int8.onnx" --device cpu -b "$CPU_BATCHES" \
        "${BENCH_TIME[@]}"
    pack
done

"$PY" scripts/gpu_proof_summary.py "$STEPS" --archs $ARCHS --seconds $(( $(date +%s) - T0 )) \
    "${SMOKE_FLAG[@]}" > "$OUT/gpu_proof.json"
"$PY" scripts/gpu_proof_summary.py "$STEPS" --archs $ARCHS --table "${SMOKE_FLAG[@]}" | tee -a "$LOG"
say "done: $OUT"
