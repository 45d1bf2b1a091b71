"""``quantize``: FP32 ONNX -> INT8 (static Q/DQ, calibrated), dynamic INT8 or FP16, checked against its parent.

Every result is compared with its parent on real images before it is written: top-1 agreement between
the two (on the test split with ``--data``, else on the calibration images), and with ``--data`` the
top-1/top-5 of both. The numbers go into the output's lineage; an agreement below ``min_agreement``
raises ``VerificationError`` and writes nothing.

The static INT8 defaults are the settings that run fastest with onnxruntime on x86 (see ``ort.py``):
ORT pre-processing, uint8 activations, int8 per-channel weights, QDQ format.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import (
    artifact_kind,
    check_output_path,
    lineage_entry,
    load_onnx,
    onnx_preprocess,
    read_onnx_meta,
    save_onnx,
    stamp_onnx,
)
from resopt.console import log, progress, warn
from resopt.errors import DataError, InputFileError, UsageError, VerificationError, choice_error
from resopt.metrics import TopK
from resopt.quantize.ort import CALIB_METHODS, TARGETS

if TYPE_CHECKING:
    import numpy as np

    from resopt.artifacts import Preprocess
    from resopt.calib import CalibSet

MODES = ("int8", "int8-dynamic", "fp16")
# Top-1 agreement (percent) with the parent below which a result is refused. FP16 should change almost
# nothing; 8-bit quantization of a healthy model keeps well above 90% (ResNet-20: ~97-99%).
DEFAULT_MIN_AGREEMENT = {"int8": 90.0, "int8-dynamic": 90.0, "fp16": 99.0}
DEFAULT_NUM_CALIB = 320


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "int8"
    target: str = "cpu"
    calib_data: str | None = None  # folder, dataset name or saved .npz set; None: the shipped calib/ set
    num_calib: int | None = DEFAULT_NUM_CALIB
    calib_method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool | None = None  # None: only on x86 without VNNI
    seed: int = 0
    data: str | None = None  # report top-1/top-5 on its test split and measure agreement there
    limit_per_class: int | None = None
    min_agreement: float | None = None  # None: DEFAULT_MIN_AGREEMENT[mode]
    exclude: tuple[str, ...] = ()
    save_calib: Path | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise choice_error("mode", self.mode, MODES)
        if self.target not in TARGETS:
            raise choice_error("target", self.target, TARGETS)
        if self.calib_method not in CALIB_METHODS:
            raise choice_error("calibration method", self.calib_method, CALIB_METHODS)
        if self.num_calib is not None and self.num_calib < 1:
            raise UsageError(f"--num-calib must be at least 1, got {self.num_calib}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 100.0:
            raise UsageError(f"--min-agreement must be a percentage in [0, 100], got {self.min_agreement}")
        if self.target == "trt" and self.mode != "int8":
            raise UsageError(f"--target trt shapes static INT8 Q/DQ; it does not apply to --mode {self.mode}")
        if self.limit_per_class is not None and self.data is None:
            raise UsageError("--limit-per-class limits the --data test split; pass --data too")

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "int8"

    def agreement_floor(self) -> float:
        return DEFAULT_MIN_AGREEMENT[self.mode] if self.min_agreement is None else self.min_agreement


@dataclass(frozen=True)
class ModelScore:
    file: Path
    size_bytes: int
    top1: float | None = None
    top5: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"file": str(self.file), "size_bytes": self.size_bytes, "top1": self.top1, "top5": self.top5}


@dataclass(frozen=True)
class QuantizeResult:
    output: Path
    mode: str
    settings: dict[str, Any]
    parent: ModelScore
    result: ModelScore
    agreement: float
    agreement_images: int
    agreement_on: str  # "test" (with --data) or "calibration"
    calib: dict[str, Any] | None
    excluded: tuple[str, ...] = ()
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        return self.parent.size_bytes / max(1, self.result.size_bytes)

    def summary(self) -> dict[str, Any]:
        return {"output": str(self.output), "mode": self.mode, "settings": self.settings,
                "parent": self.parent.as_dict(), "result": self.result.as_dict(),
                "compression": round(self.compression, 2), "agreement": self.agreement,
                "agreement_images": self.agreement_images, "agreement_on": self.agreement_on,
                "calibration": self.calib, "excluded": list(self.excluded), "seconds": round(self.seconds, 1),
                **self.extra}


# ------------------------------------------------------------------------------------ verification


@dataclass
class Comparison:
    """Parent vs result on the same images."""

    parent: TopK
    result: TopK
    agree: int = 0

    @property
    def images(self) -> int:
        return self.parent.n

    @property
    def agreement(self) -> float:
        return round(100.0 * self.agree / max(1, self.parent.n), 3)


def compare_sessions(parent: Any, result: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
                     total: int | None = None, description: str = "verify") -> Comparison:
    """Run both onnxruntime sessions over ``batches``; top-1/top-5 of each and their top-1 agreement."""
    cmp = Comparison(TopK(), TopK())
    p_in, r_in = parent.get_inputs()[0].name, result.get_inputs()[0].name
    with progress(description, total=total) as bar:
        for x, y in batches:
            lp = parent.run(None, {p_in: x})[0]
            lr = result.run(None, {r_in: x})[0]
            cmp.parent.update(lp, y)
            cmp.result.update(lr, y)
            cmp.agree += int((lp.argmax(1) == lr.argmax(1)).sum())
            bar.advance(1)
    return cmp


def eval_batches(data: str, pre: Preprocess, classes: list[str], *, per_class: int | None, seed: int,
                 batch_size: int = 64) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], int]:
    """The ``--data`` test split as numpy batches with the model's preprocessing, and the batch count."""
    from resopt.data import check_classes, classes_of, load_eval_set, make_loader

    ds = load_eval_set(data, pre, split="test", per_class=per_class, seed=seed)
    check_classes(classes, classes_of(ds), model_name="the model", data=data)
    loader = make_loader(ds, batch_size, shuffle=False)
    return ((x.numpy(), y.numpy()) for x, y in loader), len(loader)


# ------------------------------------------------------------------------------------------ pipeline


def _calib_set(cfg: QuantizeConfig, classes: list[str]) -> CalibSet:
    from resopt.calib import find_default_calib, load_calib_set

    spec = cfg.calib_data if cfg.calib_data is not None else find_default_calib(classes)
    cs = load_calib_set(spec, num=cfg.num_calib, seed=cfg.seed)
    if list(cs.classes) != list(classes):
        warn(f"calibration set {cs.source} has classes {list(cs.classes)[:3]}..., the model "
             f"{list(classes)[:3]}...; ranges are still taken from its images")
    log(f"calibration set: {len(cs)} of {cs.available} images from {cs.source} (sha256 {cs.sha256[:12]})")
    return cs


def _settings(cfg: QuantizeConfig, reduce_range: bool) -> dict[str, Any]:
    if cfg.mode == "fp16":
        return {"weights": "float16", "activations": "float16", "io": "float32"}
    weights = "int8 per-channel" if cfg.per_channel else "int8 per-tensor"
    if cfg.mode == "int8-dynamic":
        return {"weights": weights.replace("int8", "uint8"), "activations": "uint8 dynamic",
                "reduce_range": reduce_range}
    acts = "int8 symmetric" if cfg.target == "trt" else "uint8 asymmetric"
    return {"format": "QDQ", "target": cfg.target, "activations": acts, "weights": weights + " symmetric",
            "calib_method": cfg.calib_method, "reduce_range": reduce_range, "preprocessed": True}


def quantize_onnx(model: Path, output: Path, cfg: QuantizeConfig) -> QuantizeResult:
    """Quantize the FP32 ONNX ``model`` into ``output`` (never over ``model``), verified against it."""
    from resopt.backends.ort_backend import make_session
    from resopt.calib import calib_batch_size, calib_batches, save_calib_set
    from resopt.quantize import ort as q

    t0 = time.perf_counter()
    cfg.validate()
    model, output = Path(model), Path(output)
    if artifact_kind(model) != "onnx":
        stem = model.name[: -len(model.suffix)]
        raise InputFileError(f"{model} is a PyTorch checkpoint; --mode {cfg.mode} quantizes an ONNX model",
                             hint=f"resopt export {model} -o {stem}.onnx, then resopt quantize {stem}.onnx")
    check_output_path(output, model, suffixes=(".onnx",))
    parent_proto = load_onnx(model)
    meta = read_onnx_meta(parent_proto)
    pre = onnx_preprocess(meta, model)
    classes = list(meta.get("classes", []))
    _check_float_model(parent_proto, model)
    del parent_proto
    reduce_range = q.default_reduce_range() if cfg.reduce_range is None else cfg.reduce_range

    cs = _calib_set(cfg, classes) if (cfg.needs_calibration or cfg.data is None or cfg.save_calib) else None
    with tempfile.TemporaryDirectory(prefix="resopt-quantize-") as tmp_name:
        tmp = Path(tmp_name)
        prepped, quantized = tmp / "prepped.onnx", tmp / "quantized.onnx"
        q.preprocess_model(model, prepped)
        _check_excluded_exist(prepped, cfg.exclude)
        if cfg.mode == "int8":
            assert cs is not None
            ranges = q.calibrate(prepped, cs, pre, method=cfg.calib_method, symmetric=cfg.target == "trt",
                                 workdir=tmp)
            q.static_qdq(prepped, quantized, ranges, workdir=tmp, target=cfg.target, per_channel=cfg.per_channel,
                         reduce_range=reduce_range, exclude=cfg.exclude)
        elif cfg.mode == "int8-dynamic":
            q.dynamic_int8(prepped, quantized, per_channel=cfg.per_channel, reduce_range=reduce_range,
                           exclude=cfg.exclude)
        else:
            q.float16(prepped, quantized, exclude=cfg.exclude)

        parent_sess, result_sess = make_session(model), make_session(quantized)
        if cfg.data is not None:
            batches, total = eval_batches(cfg.data, pre, classes, per_class=cfg.limit_per_class, seed=cfg.seed)
            on = "test"
        else:
            assert cs is not None
            bs = calib_batch_size(pre)
            batches, total, on = calib_batches(cs, pre, batch_size=bs), (len(cs) + bs - 1) // bs, "calibration"
        cmp = compare_sessions(parent_sess, result_sess, batches, total=total, description=f"verify on {on} images")
        del parent_sess, result_sess
        if cmp.images == 0:
            raise DataError(f"no {on} images to verify the quantized model on")
        floor = cfg.agreement_floor()
        if cmp.agreement < floor:
            raise VerificationError(
                f"{cfg.mode} result agrees with its parent on only {cmp.agreement:.2f}% of {cmp.images} {on} "
                f"images (minimum {floor:g}%)",
                hint="try --calib-method percentile or entropy, more --num-calib, --exclude the sensitive "
                     "layers, or lower --min-agreement")

        labelled = cfg.data is not None
        parent_score = ModelScore(model, model.stat().st_size, *(_acc(cmp.parent) if labelled else (None, None)))
        settings = _settings(cfg, reduce_range)
        metrics: dict[str, Any] = {"agreement": cmp.agreement, "agreement_images": cmp.images, "agreement_on": on,
                                   "parent_size_bytes": parent_score.size_bytes}
        if labelled:
            metrics.update({"top1": round(cmp.result.top1, 3), "top5": round(cmp.result.top5, 3),
                            "parent_top1": round(cmp.parent.top1, 3), "parent_top5": round(cmp.parent.top5, 3),
                            "eval_images": cmp.images, "data": cfg.data})
        options = {"mode": cfg.mode, **settings, "exclude": list(cfg.exclude)}
        if cs is not None and cfg.needs_calibration:
            options.update({"num_calib": len(cs), "calib_sha256": cs.sha256, "calib_source": cs.source,
                            "seed": cfg.seed, "calib_preprocess": pre.to_dict()})
        _write(quantized, output, meta, parent=model, options=options, metrics=metrics,
               quantization={"mode": cfg.mode, **settings})
    if cfg.save_calib is not None and cs is not None:
        save_calib_set(cs, cfg.save_calib)
        log(f"saved the calibration set to {cfg.save_calib}")
    result_score = ModelScore(output, output.stat().st_size, *(_acc(cmp.result) if labelled else (None, None)))
    return QuantizeResult(output=output, mode=cfg.mode, settings=settings, parent=parent_score,
                          result=result_score, agreement=cmp.agreement, agreement_images=cmp.images,
                          agreement_on=on, calib=cs.describe() if cs is not None and cfg.needs_calibration else None,
                          excluded=cfg.exclude, seconds=time.perf_counter() - t0)


def _acc(t: TopK) -> tuple[float, float]:
    return round(t.top1, 3), round(t.top5, 3)


def _check_float_model(model: Any, path: Path) -> None:
    """Refuse a model that is already quantized: quantizing Q/DQ again would stack errors silently."""
    ops = {n.op_type for n in model.graph.node}
    done = ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger",
                  "DynamicQuantizeLinear"}
    if done:
        raise InputFileError(f"{path} is already quantized (it has {', '.join(sorted(done))} nodes)",
                             hint="quantize the FP32 ONNX that `resopt export` wrote")
    import onnx

    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        raise InputFileError(f"{path} already holds float16 weights", hint="quantize the FP32 export instead")


def _check_excluded_exist(model: Path, exclude: tuple[str, ...]) -> None:
    if not exclude:
        return
    import onnx

    names = {n.name for n in onnx.load(str(model), load_external_data=False).graph.node}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        sample = ", ".join(sorted(n for n in names if n)[:6])
        raise UsageError(f"--exclude names no node of the model: {', '.join(unknown)}; nodes are e.g. {sample}",
                         hint="list the layer names with `resopt quantize MODEL --mode int8 --json` (lint)")


def _write(src: Path, output: Path, parent_meta: dict[str, Any], *, parent: Path, options: dict[str, Any],
           metrics: dict[str, Any], quantization: dict[str, Any]) -> None:
    """Re-stamp ``src`` with the parent's metadata + this step's lineage entry, and write it atomically."""
    import onnx

    proto = onnx.load(str(src))
    meta = dict(parent_meta)
    meta["lineage"] = list(parent_meta.get("lineage", [])) + [
        lineage_entry("quantize", options=options, parent=parent, metrics=metrics)]
    meta["metrics"] = metrics
    meta["quantization"] = quantization
    stamp_onnx(proto, meta)
    save_onnx(proto, output)
