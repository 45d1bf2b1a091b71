#!/usr/bin/env bash
# Fill .carry/ (ignored by git) with what scripts/gpu_proof.sh needs on the GPU machine, which has no network:
#   .carry/wheels/  the packages resopt needs that the machine's image lacks (torch-pruning,
#                   onnx-graphsurgeon, pydantic with pydantic-core built for its Python, annotated-types,
#                   typing-inspection and a typing-extensions new enough for them),
#                   downloaded for CPython 3.12 on manylinux x86-64;
#   .carry/data/    the CIFAR-10 JPEG archive from ../shared/datasets (../shared does not travel).
# The machine has torch, torchvision, onnx, onnxruntime, onnxscript, numpy, pillow, typer, rich, psutil and
# matplotlib (the device tool's KINDS.md); openvino is not carried, since gpu_proof.sh benches with onnxruntime.
#
#   bash scripts/gpu_proof_prepare.sh            (make gpu-proof-prepare)
# then, with the device tool:  run(command="bash scripts/gpu_proof.sh", carry=[".carry"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
ARCHIVE=${CIFAR_ARCHIVE:-../shared/datasets/cifar10-jpeg.tar.gz}
# Versions: those of the development environment where they are installed, so both run the same code.
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
pin() { local v; v=$(ver "$1"); if [[ -n "$v" ]]; then echo "$1==$v"; else echo "$1"; fi; }
PACKAGES=(
    "$(pin torch-pruning)" "$(pin onnx-graphsurgeon)" "$(pin pydantic)" "$(pin pydantic-core)"
    "$(pin annotated-types)" "$(pin typing-inspection)" "$(pin typing-extensions)"
)
mkdir -p .carry/wheels .carry/data
rm -f .carry/wheels/*.whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .carry/wheels "${PACKAGES[@]}"
cp "$ARCHIVE" .carry/data/cifar10-jpeg.tar.gz
echo "wheels: $(ls .carry/wheels | tr '\n' ' ')" >&2
du -sh .carry >&2
