"""Before any worker starts: what to run (one ``Planned`` row per file, runtime, precision or ``.pt``
variant), checked so that everything that can fail fast does (files, backends, device, data classes); and the
host facts the report carries."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.bench.config import PT_VARIANTS, BenchConfig
from resopt.envinfo import available_cores, cpu_capabilities, openvino_version, read_cpu_fields
from resopt.errors import EnvironmentMismatchError, MissingDependencyError, UsageError
from resopt.kinds import KINDS, ModelStats, read_artifact_info

if TYPE_CHECKING:
    from resopt.artifacts import Preprocess


def host_info(device: str) -> dict[str, Any]:
    import platform

    from resopt.artifacts import library_versions

    cpu = read_cpu_fields().get("model name") or platform.processor() or platform.machine()
    info: dict[str, Any] = {"host": platform.node(), "cpu": cpu, "cores": available_cores(),
                            "device": device, "versions": library_versions()}
    if hasattr(os, "getloadavg"):
        info["load_average"] = round(os.getloadavg()[0], 2)
    # How idle pool threads wait (PyTorch's OpenMP, and onnxruntime's pool through make_session): it
    # changes CPU timings severalfold on a busy machine, so the report says which rule applied.
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    if device == "gpu":
        import torch

        from resopt.envinfo import tensorrt_version

        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["tensorrt"] = tensorrt_version()[0]
    return info


@dataclass(frozen=True)
class Planned:
    path: Path
    kind: str
    classes: list[str]
    input_size: int
    stats: ModelStats
    device: str = "cpu"  # where this file's worker runs it
    variant: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # extra runner keyword arguments
    speed_only: bool = False  # an ONNX without resopt metadata: no preprocessing to measure accuracy with
    backend: str = ""  # BACKENDS key; "" = the kind's default
    runtime: str = ""
    preprocess: Preprocess | None = None  # what accuracy feeds it (None: speed only)


def bare_onnx_input_size(path: Path, batch_sizes: tuple[int, ...]) -> int:
    """The square image size of an ONNX graph's input; refuses sizes or batches the graph cannot take."""
    from resopt.artifacts import load_onnx
    from resopt.errors import InputFileError
    from resopt.onnx_utils import graph_input

    model = load_onnx(path, load_weights=False)
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in graph_input(model, path).type.tensor_type.shape.dim]
    if not dims[2] or dims[2] != dims[3]:
        raise InputFileError(f"{path} has no resopt metadata and its input size is not fixed and square "
                             f"({dims}); bench cannot tell what to feed it",
                             hint=f"resopt import {path} --input-size N --mean R,G,B --std R,G,B --classes ...")
    if dims[0] and any(b != dims[0] for b in batch_sizes):
        raise UsageError(f"{path} has a fixed batch size of {dims[0]}; bench it with --batch-size {dims[0]}",
                         hint=f"`resopt import {path}` makes the batch axis dynamic")
    return int(dims[2])


def preflight(paths: list[Path], cfg: BenchConfig) -> list[Planned]:
    """Everything that can fail fast (files, backends, device, data classes) before any worker starts."""
    from resopt.artifacts import artifact_kind
    from resopt.backends import BACKEND_HINTS, BACKENDS, ONNX_RUNTIMES, backend_available

    if not paths:
        raise UsageError("bench needs at least one model file", hint="resopt bench r20.pt r20.onnx")
    kinds = [artifact_kind(p) for p in paths]  # missing files and unknown suffixes, named
    for p, kind in zip(paths, kinds, strict=True):
        if kind == "engine" and cfg.device != "gpu":
            raise UsageError(f"{p} is a TensorRT engine, which runs only on the GPU; add --device gpu")
        if not backend_available(kind):
            raise MissingDependencyError(f"cannot bench {p}: the .{kind} backend ({BACKENDS[kind][0]}) is not "
                                         f"installed", hint=BACKEND_HINTS.get(kind))
    onnx_device = cfg.device
    ov_precisions = openvino_precisions(cfg) if "onnx" in kinds and "openvino" in cfg.runtimes else ()
    if cfg.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise EnvironmentMismatchError("--device gpu was asked for but no CUDA GPU is visible to PyTorch",
                                           hint="run on a GPU machine, or use --device cpu")
        if "onnx" in kinds:
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                from resopt.console import warn

                # Still measured, and labelled CPU in the table, rather than failing the whole comparison.
                warn("this onnxruntime has no CUDAExecutionProvider, so .onnx files run on the CPU provider "
                     "(pip install onnxruntime-gpu to run them on the GPU)")
                onnx_device = "cpu"
    data_classes: list[str] | None = None
    if cfg.data is not None:
        from resopt.data import classes_of, resolve_data

        data_classes = classes_of(resolve_data(cfg.data).dataset("test"))
    planned: list[Planned] = []
    for p, kind in zip(paths, kinds, strict=True):
        info = read_artifact_info(p)
        speed_only = info.preprocess is None and kind == "onnx"
        if speed_only:
            # An ONNX made elsewhere: its speed needs only the input shape, which the graph gives.
            size = bare_onnx_input_size(p, cfg.batch_sizes)
            from resopt.console import warn

            warn(f"{p.name} has no resopt metadata: speed only (input 3x{size}x{size} from the graph, no "
                 f"accuracy); `resopt import` it to record classes and preprocessing")
            classes: list[str] = []
        elif info.preprocess is None:
            from resopt.errors import InputFileError

            raise InputFileError(f"{p} records no preprocessing (input size, normalization); resopt cannot "
                                 f"feed it", hint="bench files written by resopt train/export/quantize/build")
        else:
            size, classes = info.preprocess.input_size, info.classes
            if data_classes is not None:
                from resopt.data import check_classes

                check_classes(info.classes, data_classes, model_name=str(p), data=str(cfg.data))
        stats = KINDS[kind].stats(p, size)
        rows_before = len(planned)
        if kind == "pt":
            planned += [Planned(p, kind, classes, size, stats, cfg.device,
                                 v if len(cfg.effective_pt_variants) > 1 or v != "fp32" else "", PT_VARIANTS[v])
                        for v in cfg.effective_pt_variants]
        elif kind == "onnx":
            for runtime in cfg.runtimes:
                if ONNX_RUNTIMES[runtime] == kind:  # the kind's own backend: the file's device and precision
                    planned.append(Planned(p, kind, classes, size, stats, onnx_device, runtime=runtime,
                                            speed_only=speed_only))
                    continue
                planned += [Planned(p, kind, classes, size, stats, "cpu", options={"precision": prec},
                                     backend=ONNX_RUNTIMES[runtime], runtime=runtime, speed_only=speed_only)
                            for prec in ov_precisions]
        else:
            planned.append(Planned(p, kind, classes, size, stats, cfg.device))
        if info.preprocess is not None:
            planned[rows_before:] = [replace(row, preprocess=info.preprocess) for row in planned[rows_before:]]
    return planned


def openvino_precisions(cfg: BenchConfig) -> tuple[str, ...]:
    """The precisions OpenVINO rows run in: each asked-for one this CPU has (BF16 falls back to f32 with a
    warning where the CPU lacks it); fails with one line when OpenVINO is not installed."""
    from resopt.backends import BACKEND_HINTS
    from resopt.backends.openvino_backend import resolve_precision
    from resopt.console import warn

    version, reason = openvino_version()
    if version is None:
        raise MissingDependencyError(f"--runtime openvino: {reason}", hint=BACKEND_HINTS["onnx:openvino"])
    capabilities = cpu_capabilities()
    chosen: list[str] = []
    for prec in cfg.precisions:
        ran, note = resolve_precision(prec, capabilities)
        if note:
            warn(note)
        if ran not in chosen:
            chosen.append(ran)
    return tuple(chosen)
