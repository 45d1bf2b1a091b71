#!/usr/bin/env python
"""GPU benchmark behind ``make bench-gpu``: one table of throughput and latency on the local GPU.

resnet18-cifar (32 px) and resnet50 (224 px), at batch 1 and 256, as
  PyTorch FP32 (eager, cuDNN autotuned) | PyTorch FP16 autocast + channels_last |
  TensorRT FP16 | TensorRT INT8 (Q/DQ from `resopt quantize --target trt` on TensorRT 11, the entropy
  calibrator on TensorRT 10), where TensorRT is installed.

Speed does not depend on the weights, so the models are freshly initialised (no download, no training);
the engines are still built, checked against their ONNX and timed by resopt's own library
(``export_onnx``, ``quantize_onnx``, ``build_engine``, the runners' CUDA-event timing), with the
parity gates opened (the agreement of a random network is reported, not enforced). Calibration and
check images are the repository's calib/cifar10 set. Reference points: MLPerf offline ResNet-50 INT8
is about 90,000 img/s on one H100; resopt's TensorRT INT8 ResNet-50 should reach 60,000 img/s there.

Without a GPU it exits with code 8 and one line saying so; without TensorRT it prints the PyTorch rows
and says what to install for the rest.

    python scripts/bench_gpu.py [--archs resnet18-cifar,resnet50] [--batch-sizes 1,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _table import Table, write_json

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "calib" / "cifar10"
MLPERF_R50_INT8_H100 = 90_000
TARGET_R50_INT8_H100 = 60_000


@dataclass(frozen=True)
class Row:
    arch: str
    backend: str
    batch: int
    p50_ms: float
    p99_ms: float
    img_per_s: float
    gpu_memory: int | None
    agreement: float | None = None  # engine vs its ONNX, top-1 %, on calib images


def make_checkpoint_file(arch: str, folder: Path) -> Path:
    """A freshly initialised ``arch`` for CIFAR-10's classes, saved as a resopt checkpoint; normalisation
    is measured on the calibration images, as ``train`` would (never hard-coded)."""
    from resopt.artifacts import Preprocess, lineage_entry, make_checkpoint, save_checkpoint
    from resopt.data import compute_normalization, image_folder
    from resopt.models import build_model, get_spec, model_widths

    spec = get_spec(arch)
    ds = image_folder(CALIB)
    mean, std = compute_normalization(ds, samples=320)
    size = spec.default_input_size
    pre = Preprocess(size, mean, std, resize=None if size <= 64 else round(size / 0.875))
    model = build_model(arch, len(ds.classes))  # type: ignore[attr-defined]
    path = folder / f"{arch}.pt"
    save_checkpoint(make_checkpoint(arch=arch, arch_kwargs={"width": 1.0}, state_dict=model.state_dict(),
                                    classes=list(ds.classes), preprocess=pre,  # type: ignore[attr-defined]
                                    lineage=[lineage_entry("bench-gpu init", options={"arch": arch})],
                                    widths=model_widths(model)), path)
    return path


def time_runner(runner: Any, arch: str, backend: str, batches: list[int], args: argparse.Namespace,
                agreement: float | None = None) -> list[Row]:
    import numpy as np

    rows = []
    for b in batches:
        runner.reset_peak_device_memory()
        t = np.asarray(runner.time_batches(b, warmup=args.warmup, iters=args.iters, min_seconds=args.min_time))
        p50 = float(np.median(t))
        rows.append(Row(arch, backend, b, p50 * 1e3, float(np.percentile(t, 99)) * 1e3, b / p50,
                        runner.peak_device_memory(), agreement))
        print(f"  {arch:15s} {backend:28s} batch {b:4d}: {b / p50:10.0f} img/s", file=sys.stderr, flush=True)
    return rows


def bench_arch(arch: str, batches: list[int], work: Path, trt_version: str | None,
               args: argparse.Namespace) -> list[Row]:
    from resopt.backends.tensorrt_backend import TrtRunner
    from resopt.backends.torch_backend import TorchRunner

    pt = make_checkpoint_file(arch, work)
    rows: list[Row] = []
    for label, fp16, cl in (("PyTorch FP32", False, False), ("PyTorch FP16 channels_last", True, True)):
        runner = TorchRunner(pt, device="gpu", fp16=fp16, channels_last=cl)
        rows += time_runner(runner, arch, label, batches, args)
        del runner
    if trt_version is None:
        return rows

    from resopt.build import BuildConfig, build_engine
    from resopt.export import ExportConfig, export_onnx

    onnx = work / f"{arch}.onnx"
    export_onnx(pt, onnx, ExportConfig(data=str(CALIB), num_verify=16))
    # Random weights: the parity gate is opened and the measured agreement reported instead.
    common = {"min_batch": 1, "opt_batch": max(batches), "max_batch": max(batches), "data": str(CALIB),
              "verify_per_class": 5, "min_agreement": 0.0, "timing_cache": work / "timing.cache"}
    engines = [("TensorRT FP16", build_engine(onnx, work / f"{arch}.fp16.engine", BuildConfig(fp16=True, **common)))]
    if int(trt_version.split(".")[0]) >= 11:
        from resopt.quantize import QuantizeConfig, quantize_onnx

        qdq = work / f"{arch}.int8.trt.onnx"
        quantize_onnx(onnx, qdq, QuantizeConfig(target="trt", calib_data=str(CALIB), min_agreement=0.0))
        engines.append(("TensorRT INT8 (Q/DQ)", build_engine(qdq, work / f"{arch}.int8.engine", BuildConfig(**common))))
    else:
        engines.append(("TensorRT INT8 (calibrated)", build_engine(
            onnx, work / f"{arch}.int8.engine", BuildConfig(int8=True, calib_data=str(CALIB), fp16=True, **common))))
    for label, result in engines:
        runner = TrtRunner(result.output, device="gpu")
        rows += time_runner(runner, arch, label, batches, args, result.verification["top1_agreement"])
        runner.close()
    return rows


def render(rows: list[Row], gpu: str, trt_version: str | None, args: argparse.Namespace) -> Any:
    base = {(r.arch, r.batch): r.img_per_s for r in rows if r.backend == "PyTorch FP32"}
    table = Table(["model", "backend", "batch", "p50 ms", "p99 ms", "img/s", "speed-up", "GPU mem", "agreement"],
                  left=("model", "backend"))
    for r in rows:
        table.add_row(r.arch, r.backend, str(r.batch), f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}", f"{r.img_per_s:,.0f}",
                      f"{r.img_per_s / base[(r.arch, r.batch)]:.2f}x",
                      "-" if r.gpu_memory is None else f"{r.gpu_memory / 2**20:,.0f} MiB",
                      "-" if r.agreement is None else f"{r.agreement:.1f}%")
    return table.rich(title=f"resopt bench-gpu on {gpu} (TensorRT {trt_version or 'not installed'})",
                      caption=f"CUDA-event timing, p50/p99 over >= {args.iters} batches and {args.min_time:g} s; "
                              f"speed-up over PyTorch FP32 at the same batch; agreement = engine vs its ONNX, top-1 "
                              f"(random weights). MLPerf offline ResNet-50 INT8 on one H100: "
                              f"~{MLPERF_R50_INT8_H100:,} img/s; resopt target there: >= {TARGET_R50_INT8_H100:,} "
                              f"img/s.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="resnet18-cifar,resnet50")
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from resopt.backends.cuda import require_cuda
    from resopt.cli import report_error
    from resopt.envinfo import TENSORRT_INSTALL, tensorrt_version
    from resopt.errors import ResoptError

    try:
        from resopt.bench import parse_batch_sizes

        batches = list(parse_batch_sizes(args.batch_sizes))
        torch = require_cuda("scripts/bench_gpu.py", hint="run it on a GPU machine (check with `resopt env`)")
        trt_version, reason = tensorrt_version()
        if trt_version is None:
            print(f"{reason}: TensorRT rows skipped; install with: {TENSORRT_INSTALL}", file=sys.stderr)
        rows: list[Row] = []
        with tempfile.TemporaryDirectory(prefix="resopt-bench-gpu-") as tmp:
            for arch in args.archs.split(","):
                rows += bench_arch(arch.strip(), batches, Path(tmp), trt_version, args)
    except ResoptError as e:
        return report_error(e)
    from rich.console import Console

    Console(width=180).print(render(rows, torch.cuda.get_device_name(0), trt_version, args))
    if args.json:
        write_json(args.json, [asdict(r) for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
