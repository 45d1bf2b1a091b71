"""One table keyed by artifact kind (``pt``, ``onnx``, ``engine``): what resopt reads from a model file without
running it. Each ``Kind`` says how to read the file's record (``read_info``: classes, preprocessing, lineage),
how to count its parameters and MACs (``stats``) and how ``resopt info`` describes it (``describe``). The suffix
of a file gives its kind (``artifacts.KIND_BY_SUFFIX``); the runner that executes it is in
``backends.BACKENDS`` under the same name.

Counts: a ``.pt`` is counted on the rebuilt PyTorch model (BatchNorm scale and shift are parameters there), an
``.onnx`` on its graph (BatchNorm folded into the convolutions), an ``.engine`` cannot be inspected layer by
layer, so its numbers are the ones its build recorded from the source ONNX (``onnx_model_stats``).

To add a kind: a suffix in ``KIND_BY_SUFFIX``, an entry here, a runner in ``BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resopt.artifacts import (
    Preprocess,
    artifact_kind,
    checkpoint_preprocess,
    load_checkpoint,
    read_onnx_meta,
    read_sidecar,
)
from resopt.errors import InputFileError, ResoptError

COUNT_KEYS = ("params", "nonzero_params", "macs")


@dataclass(frozen=True)
class ArtifactInfo:
    """What ``resopt info`` and ``bench`` know about a file without running it."""

    path: Path
    kind: str
    arch: str | None
    classes: list[str]
    preprocess: Preprocess | None
    lineage: list[dict[str, Any]]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class ModelStats:
    params: int | None
    nonzero_params: int | None
    macs: int | None


def onnx_model_stats(model: Any, *, name: str | None = None, require_macs: bool = False) -> ModelStats:
    """Parameters, non-zero parameters and MACs (one image) of an ONNX graph. MACs are None where shape
    inference cannot see through an op (with a warning naming ``name`` when given), or an error with
    ``require_macs``."""
    from resopt.onnx_utils import onnx_macs, onnx_param_counts

    params, nonzero = onnx_param_counts(model)
    try:
        macs: int | None = int(onnx_macs(model))
    except ResoptError as e:
        if require_macs:
            raise
        if name is not None:
            from resopt.console import warn

            warn(f"MACs of {name} unknown: {e}")
        macs = None
    return ModelStats(int(params), int(nonzero), macs)


# ------------------------------------------------------------------------------------------------ .pt


def _pt_info(path: Path) -> ArtifactInfo:
    ckpt = load_checkpoint(path)
    return ArtifactInfo(path, "pt", ckpt["arch"], ckpt["classes"], checkpoint_preprocess(ckpt),
                        ckpt.get("lineage", []), ckpt.get("metrics", {}))


def _torch_stats(model: Any, input_size: int) -> ModelStats:
    from resopt.models import count_macs, count_params

    params, nonzero = count_params(model)
    return ModelStats(params, nonzero, count_macs(model, input_size))


def _pt_stats(path: Path, input_size: int) -> ModelStats:
    from resopt.artifacts import load_model

    model, _ = load_model(path)
    return _torch_stats(model, input_size)


def _pt_describe(path: Path) -> dict[str, Any]:
    from resopt.models import model_from_checkpoint

    ckpt = load_checkpoint(path)  # weights_only=True: refuses pickled objects without running them
    try:
        pre = checkpoint_preprocess(ckpt)
        model = model_from_checkpoint(ckpt)
    except KeyError as e:
        raise InputFileError(f"{path} is missing the checkpoint field {e}") from None
    stats = _torch_stats(model, pre.input_size)
    base = ckpt.get("arch_kwargs", {})
    details: dict[str, Any] = {"arch_kwargs": base, "format_version": ckpt.get("format_version")}
    if ckpt.get("metrics"):
        details["metrics"] = ckpt["metrics"]
    return {"format": KINDS["pt"].title, "arch": ckpt.get("arch"), "classes": ckpt.get("classes", []),
            "params": stats.params, "nonzero_params": stats.nonzero_params, "macs": stats.macs,
            "preprocess": pre, "lineage": ckpt.get("lineage", []), "details": details}


# ---------------------------------------------------------------------------------------------- .onnx


def _onnx_info(path: Path) -> ArtifactInfo:
    meta = read_onnx_meta(path)
    pre = Preprocess.from_dict(meta["preprocess"]) if "preprocess" in meta else None
    return ArtifactInfo(path, "onnx", meta.get("arch"), meta.get("classes", []), pre,
                        meta.get("lineage", []), meta.get("metrics", {}))


def _onnx_stats(path: Path, input_size: int) -> ModelStats:
    from resopt.artifacts import load_onnx

    try:
        import resopt.onnx_utils  # noqa: F401 - ships with `export`; without it the numbers are unknown
    except ImportError:
        return ModelStats(None, None, None)
    return onnx_model_stats(load_onnx(path), name=path.name)


def onnx_precision(model: Any) -> str:
    """A short name for how the graph stores its weights: FP32, FP16, INT8 Q/DQ, INT8 QOperator, ..."""
    from onnx import TensorProto

    ops = {n.op_type for n in model.graph.node}
    if "DequantizeLinear" in ops and ops & {"Conv", "Gemm", "MatMul"}:
        types = {t.data_type for t in model.graph.initializer if len(t.dims) > 1}
        if types & {TensorProto.INT4, TensorProto.UINT4}:  # --mode w4a8: int4 weights, 8-bit activations
            return "INT4+INT8 Q/DQ" if types & {TensorProto.INT8, TensorProto.UINT8} else "INT4 Q/DQ"
        return "INT8 Q/DQ"
    if ops & {"QLinearConv", "QLinearMatMul", "QGemm"}:
        return "INT8 QOperator"
    if ops & {"ConvInteger", "MatMulInteger"}:
        return "INT8 dynamic"
    types = {t.data_type for t in model.graph.initializer if len(t.dims) > 1}
    if TensorProto.FLOAT16 in types and TensorProto.FLOAT not in types:
        return "FP16"
    if TensorProto.BFLOAT16 in types and TensorProto.FLOAT not in types:
        return "BF16"
    return "FP32"


def _onnx_describe(path: Path) -> dict[str, Any]:
    import onnx

    from resopt.artifacts import load_onnx
    from resopt.onnx_utils import onnx_stats

    model = load_onnx(path)
    try:
        # Random bytes sometimes decode as a protobuf message; the checker tells a model from noise.
        onnx.checker.check_model(model)
    except Exception as e:
        raise InputFileError(f"{path} is not a valid ONNX model ({str(e).strip().splitlines()[0][:160]})") \
            from None
    if not model.graph.node:
        raise InputFileError(f"{path} is not a valid ONNX model (its graph has no nodes)")
    meta = read_onnx_meta(model, path=path)
    stats = onnx_stats(model)
    pre = Preprocess.from_dict(meta["preprocess"]) if "preprocess" in meta else None
    inputs = [{"name": i.name, "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
              for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    details = {"opset": stats.opset, "ops": stats.ops, "inputs": inputs,
               "producer": f"{model.producer_name} {model.producer_version}".strip(),
               "resopt_metadata": bool(meta)}
    return {"format": f"ONNX opset {stats.opset}, {onnx_precision(model)}", "arch": meta.get("arch"),
            "classes": meta.get("classes", []), "params": stats.params, "nonzero_params": stats.nonzero_params,
            "macs": stats.macs, "preprocess": pre, "lineage": meta.get("lineage", []), "details": details}


# -------------------------------------------------------------------------------------------- .engine


def _engine_info(path: Path) -> ArtifactInfo:
    side = read_sidecar(path)
    pre = Preprocess.from_dict(side["preprocess"]) if "preprocess" in side else None
    return ArtifactInfo(path, "engine", side.get("arch"), side.get("classes", []), pre,
                        side.get("lineage", []), side.get("metrics", {}))


def _engine_counts(side: dict[str, Any], lineage: list[dict[str, Any]]) -> ModelStats:
    """The counts the build recorded (``params``, ``nonzero_params``, ``macs`` in the sidecar); for a sidecar
    written before it recorded them, the latest ones in the lineage (the source ONNX's), else unknown."""
    counts: dict[str, Any] = {}
    for entry in lineage:
        counts.update({k: v for k, v in (entry.get("metrics") or {}).items() if k in COUNT_KEYS})
    counts.update({k: side[k] for k in COUNT_KEYS if side.get(k) is not None})
    return ModelStats(*(int(counts[k]) if counts.get(k) is not None else None for k in COUNT_KEYS))


def _engine_stats(path: Path, input_size: int) -> ModelStats:
    side = read_sidecar(path)
    return _engine_counts(side, side.get("lineage", []))


def _engine_describe(path: Path) -> dict[str, Any]:
    from resopt.artifacts import validate_sidecar
    from resopt.backends.tensorrt_backend import engine_runs_here

    side = read_sidecar(path)
    validate_sidecar(side, path)  # the sidecar bench would accept, or InputFileError (exit 3)
    info = _engine_info(path)  # the sidecar: no TensorRT needed
    stats = _engine_counts(side, info.lineage)
    details = {k: v for k, v in side.items() if k not in ("lineage", "classes", "preprocess", "metrics")}
    runs, why = engine_runs_here(side, path)
    details["runs_here"], details["runs_here_reason"] = runs, why
    precision = side.get("precision")
    return {"format": KINDS["engine"].title + (f", {precision}" if precision else ""), "arch": info.arch,
            "classes": info.classes, "params": stats.params, "nonzero_params": stats.nonzero_params,
            "macs": stats.macs, "preprocess": info.preprocess, "lineage": info.lineage, "details": details}


# ---------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Kind:
    name: str
    title: str  # what `resopt info` calls it
    read_info: Callable[[Path], ArtifactInfo]  # classes, preprocessing, lineage, metrics; never runs the model
    stats: Callable[[Path, int], ModelStats]  # (path, input size) -> parameters and MACs
    describe: Callable[[Path], dict[str, Any]]  # everything `resopt info` shows


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("pt", "PyTorch checkpoint", _pt_info, _pt_stats, _pt_describe),
    Kind("onnx", "ONNX model", _onnx_info, _onnx_stats, _onnx_describe),
    Kind("engine", "TensorRT engine", _engine_info, _engine_stats, _engine_describe),
)}


def kind_of(path: Path) -> Kind:
    """The table entry for ``path`` (missing file, folder, unknown suffix: InputFileError)."""
    return KINDS[artifact_kind(Path(path))]


def read_artifact_info(path: Path) -> ArtifactInfo:
    """Classes, preprocessing, lineage and metrics of a model file, read by its kind."""
    path = Path(path)
    return kind_of(path).read_info(path)
