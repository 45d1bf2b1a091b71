"""What a model file is and where it came from, without running it.

``describe_model(path)`` reads a ``.pt`` (as a plain checkpoint, ``weights_only=True``: pickled objects
are refused, never executed), an ``.onnx`` (its graph and ``resopt.*`` metadata) or an ``.engine`` (its
JSON sidecar only, validated as ``bench`` validates it, so no TensorRT is needed;
``backends.tensorrt_backend.engine_runs_here`` adds whether this machine could run it), through the table
of kinds (``resopt.kinds.KINDS``), and returns a ``ModelInfo``. Parameters and MACs of a ``.pt`` are counted
on the rebuilt PyTorch model (BatchNorm scale and shift are parameters there); those of an ``.onnx`` on its
graph by ``resopt.onnx_utils`` (where BatchNorm is folded into the convolutions), so an exported model shows
slightly fewer parameters than its checkpoint and the same MACs.

``list_archs()`` describes the model registry and imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resopt.artifacts import Preprocess, sha256_file
from resopt.data.splits import UNKNOWN, split_of
from resopt.kinds import kind_of
from resopt.verify import agreement_percent

# The options and metrics worth a column in the lineage table, per command; anything else is in --json.
# Names a command does not record are skipped, so the table tolerates older and newer lineages.
KEY_OPTIONS: dict[str, tuple[str, ...]] = {
    "train": ("arch", "width", "data", "epochs", "batch_size", "lr", "optimizer", "pretrained"),
    "distill": ("teacher", "student", "width", "epochs", "alpha", "temperature"),
    "prune": ("method", "sparsity", "target_macs", "global", "finetune_epochs", "teacher"),
    "export": ("exporter", "opset", "tolerance", "num_verify"),
    # Every quantize mode's ``Mode.shown`` keys: ``resopt.quantize.modes.lineage_keys("shown")``, which this
    # layer may not import (ARCHITECTURE.md); tests/test_quantize_options.py fails until the two are equal.
    "quantize": ("mode", "calib_method", "clusters", "bits", "weights", "activations", "num_calib", "qat_epochs",
                 "int8_layers"),
    "build": ("precision", "build_path", "min_batch", "opt_batch", "max_batch"),
}
KEY_METRICS = ("top1", "top5", "parent_top1", "val_top1", "agreement", "max_abs_diff", "top1_agreement", "params",
               "nonzero_params", "macs", "channel_sparsity", "weight_sparsity", "best_epoch")


@dataclass(frozen=True)
class LineageStep:
    """One row of the lineage table: the key facts of one command that shaped the artifact."""

    command: str
    time: str
    options: dict[str, Any]
    parent_file: str | None
    parent_sha256: str | None
    metrics: dict[str, Any]
    split: str | None = None  # what top1/top5/parent_top1 were measured on: test, val or "split unknown"
    split_images: int | None = None

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> LineageStep:
        command = str(entry.get("command", "?"))
        options = entry.get("options") or {}
        metrics = entry.get("metrics") or {}
        keys = KEY_OPTIONS.get(command)
        if keys is None:  # a command this table does not know: its first few plain options
            keys = tuple(k for k, v in options.items() if isinstance(v, (str, int, float, bool)))[:5]
        parent = entry.get("parent") or {}
        shown = {k: metrics[k] for k in KEY_METRICS if metrics.get(k) is not None}
        if "top1_agreement" in shown:  # percent, also for entries written when export/import stored a fraction
            shown["top1_agreement"] = agreement_percent(command, metrics)
        split = split_of(metrics) if metrics.get("top1") is not None else None
        images = metrics.get("eval_images") if split != UNKNOWN else None
        return cls(command=command, time=str(entry.get("time", "")),
                   options={k: options[k] for k in keys if options.get(k) not in (None, "", [], {})},
                   parent_file=parent.get("file"), parent_sha256=parent.get("sha256"), metrics=shown,
                   split=split, split_images=images if isinstance(images, int) else None)


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    kind: str  # pt, onnx, engine
    format: str  # e.g. "PyTorch checkpoint", "ONNX opset 18, INT8 Q/DQ", "TensorRT engine, fp16"
    arch: str | None
    classes: tuple[str, ...]
    params: int | None
    nonzero_params: int | None
    macs: int | None
    file_size: int
    sha256: str
    preprocess: Preprocess | None
    lineage: tuple[dict[str, Any], ...]  # the full recorded entries, oldest first
    details: dict[str, Any] = field(default_factory=dict)  # kind-specific: opset and ops, engine build...

    @property
    def steps(self) -> tuple[LineageStep, ...]:
        return tuple(LineageStep.from_entry(e) for e in self.lineage)

    def summary(self) -> dict[str, Any]:
        pre = self.preprocess
        return {
            "path": str(self.path), "kind": self.kind, "format": self.format, "arch": self.arch,
            "num_classes": len(self.classes), "classes": list(self.classes), "params": self.params,
            "nonzero_params": self.nonzero_params, "macs": self.macs, "file_size": self.file_size,
            "sha256": self.sha256, "input_size": pre.input_size if pre else None,
            "mean": list(pre.mean) if pre else None, "std": list(pre.std) if pre else None,
            "resize": pre.resize if pre else None, "details": self.details,
            "lineage_steps": [step.__dict__ for step in self.steps], "lineage": list(self.lineage),
        }


def describe_model(path: Path) -> ModelInfo:
    """Everything ``resopt info`` prints about a ``.pt``, ``.onnx`` or ``.engine`` file."""
    path = Path(path)
    kind = kind_of(path)  # missing file, folder, unknown suffix: InputFileError
    d = kind.describe(path)
    return ModelInfo(path=path, kind=kind.name, format=d["format"], arch=d["arch"], classes=tuple(d["classes"]),
                     params=d["params"], nonzero_params=d["nonzero_params"], macs=d["macs"],
                     file_size=path.stat().st_size, sha256=sha256_file(path), preprocess=d["preprocess"],
                     lineage=tuple(d["lineage"]), details=d["details"])


def list_archs() -> list[dict[str, Any]]:
    """The model registry: name, description, family, default input size (imports no torch)."""
    from resopt.models import REGISTRY

    return [{"name": s.name, "description": s.description, "family": s.family,
             "input_size": s.default_input_size, "pretrained": s.torchvision_name is not None}
            for s in REGISTRY.values()]
