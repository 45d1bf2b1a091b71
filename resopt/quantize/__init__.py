"""``quantize``: FP32 model -> INT8 Q/DQ (static, calibrated; cpu or trt flavour), dynamic INT8, FP16, k-means
weight clustering, N-bit fixed point, or QAT; every result checked against its parent before it is written.

Verification: top-1 agreement between the result and its parent on real images (the ``--data`` test
split, else the calibration images) and, with ``--data``, top-1/top-5 of both. The numbers go into the
output's lineage; an agreement below ``min_agreement`` raises ``VerificationError`` and writes nothing.
With ``max_drop`` the accuracy guard keeps the most sensitive layers in FP32 until the top-1 drop is
within bounds, or raises ``AccuracyGateError``. Every INT8 result is linted (which layers run in INT8 and
why not; the fraction of MACs in INT8), and a ``trt`` graph that breaks TensorRT's rules is refused.

The static INT8 defaults are the settings that run fastest with onnxruntime on x86 (see ``ort.py``):
ORT pre-processing, uint8 activations, int8 per-channel weights, QDQ format.

Modes ``int8``, ``int8-dynamic`` and ``fp16`` take an exported ONNX (quantizing a ``.pt`` directly would
hide the export and its parity check); ``kmeans`` and ``fixed`` take an ONNX or a ``.pt`` (exported here
with ``resopt.export.export_onnx``); ``qat`` takes a ``.pt``, since it fine-tunes in PyTorch.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
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
from resopt.console import log, warn
from resopt.errors import InputFileError, UsageError, VerificationError, choice_error
from resopt.quantize.ort import CALIB_METHODS, TARGETS

if TYPE_CHECKING:
    import numpy as np

    from resopt.artifacts import Preprocess
    from resopt.calib import CalibSet
    from resopt.quantize.lint import QdqLint
    from resopt.quantize.ort import Ranges
    from resopt.train import TrainConfig

MODES = ("int8", "int8-dynamic", "fp16", "qat", "kmeans", "fixed")
ONNX_ONLY_MODES = ("int8", "int8-dynamic", "fp16")
# Top-1 agreement (percent) with the parent below which a result is refused. FP16 changes almost nothing;
# 8-bit quantization or 256-cluster k-means of a healthy model keeps well above 90%. Fixed point is a
# study tool (at 4 bits most predictions change, by design), so it reports without gating. QAT is gated
# against its fake-quant PyTorch model, which is what its ONNX must reproduce.
DEFAULT_MIN_AGREEMENT = {"int8": 90.0, "int8-dynamic": 90.0, "fp16": 99.0, "qat": 90.0, "kmeans": 90.0,
                         "fixed": 0.0}
DEFAULT_NUM_CALIB = 320
GUARD_MODES = ("int8", "fixed")


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
    max_drop: float | None = None  # accuracy guard, top-1 points on the --data test split
    max_exclude: int | None = None  # most layers the guard may keep in FP32 (None: a quarter of them)
    clusters: int = 256  # kmeans
    bits: int = 8  # fixed: weight bits
    act_bits: int | None = None  # fixed: activation bits (None: activations stay float)
    train: TrainConfig | None = None  # qat fine-tuning (None: qat.default_train_config)

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
        if self.target == "trt" and self.mode not in ("int8", "qat"):
            raise UsageError(f"--target trt shapes INT8 Q/DQ (--mode int8 or qat); it does not apply to "
                             f"--mode {self.mode}")
        if self.limit_per_class is not None and self.data is None:
            raise UsageError("--limit-per-class limits the --data test split; pass --data too")
        if not 2 <= self.clusters <= 256:
            raise UsageError(f"--clusters must be between 2 and 256 (uint8 indices), got {self.clusters}")
        if not 2 <= self.bits <= 8:
            raise UsageError(f"--bits must be between 2 and 8, got {self.bits}")
        if self.act_bits is not None and not 2 <= self.act_bits <= 8:
            raise UsageError(f"--act-bits must be between 2 and 8, got {self.act_bits}")
        if self.max_drop is not None:
            if self.mode not in GUARD_MODES:
                raise UsageError(f"--max-drop guards --mode {' or '.join(GUARD_MODES)}, not --mode {self.mode}")
            if self.data is None:
                raise UsageError("--max-drop measures the top-1 drop on the --data test split; pass --data",
                                 hint="resopt quantize m.onnx --mode int8 --max-drop 0.5 --data cifar10")
            if self.max_drop < 0:
                raise UsageError(f"--max-drop must be >= 0 top-1 points, got {self.max_drop}")
        if self.max_exclude is not None and (self.max_exclude < 0 or self.max_drop is None):
            raise UsageError("--max-exclude bounds the accuracy guard: a number >= 0, with --max-drop")
        if self.mode == "qat" and self.data is None:
            raise UsageError("--mode qat fine-tunes on the --data train split; pass --data",
                             hint="resopt quantize r20.pt --mode qat --epochs 3 --data cifar10 -o r20.qat.onnx")

    @property
    def needs_calibration(self) -> bool:
        return self.mode in ("int8", "qat") or (self.mode == "fixed" and self.act_bits is not None)

    def agreement_floor(self) -> float:
        return DEFAULT_MIN_AGREEMENT[self.mode] if self.min_agreement is None else self.min_agreement


@dataclass(frozen=True)
class ModelScore:
    file: str
    size_bytes: int
    top1: float | None = None
    top5: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "size_bytes": self.size_bytes, "top1": self.top1, "top5": self.top5}


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
    lint: dict[str, Any] | None = None
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
                "calibration": self.calib, "excluded": list(self.excluded), "lint": self.lint,
                "seconds": round(self.seconds, 1), **self.extra}


# ------------------------------------------------------------------------------------ verification


Batches = Iterable[tuple["np.ndarray", "np.ndarray"]]


class EvalImages:
    """The ``--data`` test split with the model's preprocessing, decoded once when it fits in memory
    (the guard evaluates many candidate models on it) and streamed otherwise."""

    CACHE_BYTES = 1 << 30

    def __init__(self, data: str, pre: Preprocess, classes: list[str], *, per_class: int | None, seed: int,
                 batch_size: int = 64) -> None:
        from resopt.data import check_classes, classes_of, load_eval_set, make_loader

        self.dataset = load_eval_set(data, pre, split="test", per_class=per_class, seed=seed)
        check_classes(classes, classes_of(self.dataset), model_name="the model", data=data)
        self._loader = make_loader(self.dataset, batch_size, shuffle=False)
        self.total = len(self._loader)
        n = len(self.dataset)  # type: ignore[arg-type]
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = \
            [] if n * 3 * pre.input_size ** 2 * 4 <= self.CACHE_BYTES else None
        self._complete = False

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._cache is not None and self._complete:
            yield from self._cache
            return
        seen = []
        for x, y in self._loader:
            batch = (x.numpy(), y.numpy())
            if self._cache is not None:
                seen.append(batch)
            yield batch
        if self._cache is not None:
            self._cache, self._complete = seen, True


# ------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class _Source:
    """The FP32 ONNX being quantized, and what the user passed."""

    onnx: Path
    given: Path
    meta: dict[str, Any]
    pre: Preprocess
    classes: list[str]


def _open_onnx(path: Path, given: Path) -> _Source:
    from resopt.onnx_utils import check_classifier_graph

    proto = load_onnx(path)
    meta = read_onnx_meta(proto, path=given)
    pre = onnx_preprocess(meta, given)
    check_classifier_graph(proto, given, image_size=pre.input_size)
    _check_float_model(proto, given)
    return _Source(path, given, meta, pre, list(meta.get("classes", [])))


def _check_float_model(model: Any, path: Path) -> None:
    """Refuse a model that is already quantized: quantizing Q/DQ again would stack errors silently."""
    import onnx

    ops = {n.op_type for n in model.graph.node}
    done = ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger",
                  "DynamicQuantizeLinear"}
    if any(i.name.endswith("__codebook") for i in model.graph.initializer):
        done.add("k-means codebooks")
    if done:
        raise InputFileError(f"{path} is already quantized (it has {', '.join(sorted(done))})",
                             hint="quantize the FP32 ONNX that `resopt export` wrote")
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        raise InputFileError(f"{path} already holds float16 weights", hint="quantize the FP32 export instead")


def _export(checkpoint: Path, dst: Path, cfg: QuantizeConfig) -> Path:
    from resopt.export import ExportConfig, export_onnx

    log(f"exporting {checkpoint} to FP32 ONNX first")
    export_onnx(checkpoint, dst, ExportConfig(data=cfg.data))
    return dst


def _calib_set(cfg: QuantizeConfig, classes: list[str], lineage: list[dict[str, Any]] | None = None) -> CalibSet:
    from resopt.calib import default_data, load_calib_set

    spec = cfg.calib_data if cfg.calib_data is not None else \
        default_data(classes, lineage or [], option="--calib-data", purpose="calibration")
    cs = load_calib_set(spec, num=cfg.num_calib, seed=cfg.seed)
    if list(cs.classes) != list(classes):
        warn(f"calibration set {cs.source} has classes {list(cs.classes)[:3]}..., the model "
             f"{list(classes)[:3]}...; ranges are still taken from its images")
    log(f"calibration set: {len(cs)} of {cs.available} images from {cs.source} (sha256 {cs.sha256[:12]})")
    return cs


def _check_excluded_exist(model: Path, exclude: tuple[str, ...]) -> None:
    if not exclude:
        return
    import onnx

    names = {n.name for n in onnx.load(str(model), load_external_data=False).graph.node}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        from resopt.quantize.lint import lint_qdq

        layers = [la.name for la in lint_qdq(onnx.load(str(model)), target=None).layers][:6]
        raise UsageError(f"--exclude names no node of the model: {', '.join(unknown)}; its layers are e.g. "
                         f"{', '.join(layers)}",
                         hint="the result table's lint and `--json` (lint.layers) list every layer name")


# ------------------------------------------------------------------------------------------ pipeline


def check_outputs(output: Path, cfg: QuantizeConfig, *inputs: Path) -> None:
    """``-o`` and ``--save-calib`` checked before any work: suffixes, folders, and neither over an input
    (the model, ``--calib-data``, ``--data``) nor over each other."""
    check_output_path(output, *inputs, cfg.calib_data, cfg.data, suffixes=(".onnx",))
    if cfg.save_calib is not None:
        save = Path(cfg.save_calib)
        check_output_path(save, *inputs, cfg.calib_data, cfg.data, suffixes=(".npz",), option="--save-calib")
        if save.resolve() == Path(output).resolve():
            raise UsageError(f"--save-calib {save} is the same file as -o; choose another name")


def quantize_model(model: Path, output: Path, cfg: QuantizeConfig) -> QuantizeResult:
    """The command's entry: an ``.onnx`` for every mode but qat; a ``.pt`` for qat, kmeans and fixed."""
    cfg.validate()
    model = Path(model)
    kind = artifact_kind(model)
    if kind == "pt" and cfg.mode == "qat":
        from resopt.quantize.qat import quantize_qat

        return quantize_qat(model, output, cfg)
    if kind == "pt" and cfg.mode in ("kmeans", "fixed"):
        check_outputs(output, cfg, model)
        with tempfile.TemporaryDirectory(prefix="resopt-export-") as tmp:
            fp32 = _export(model, Path(tmp) / (model.stem + ".onnx"), cfg)
            return quantize_onnx(fp32, output, cfg, given=model)
    return quantize_onnx(model, output, cfg)


def quantize_onnx(model: Path, output: Path, cfg: QuantizeConfig, *, given: Path | None = None) -> QuantizeResult:
    """Quantize the FP32 ONNX ``model`` into ``output`` (never over ``model``), verified against it.

    ``given``: the file the user passed when ``model`` is an export made on the way (lineage parent).
    """
    t0 = time.perf_counter()
    cfg.validate()
    model, output = Path(model), Path(output)
    given = Path(given) if given is not None else model
    kind = artifact_kind(model)
    if cfg.mode == "qat":
        raise UsageError(f"--mode qat fine-tunes in PyTorch; it takes the .pt checkpoint, not {model.name}",
                         hint="resopt quantize r20.pt --mode qat --epochs 3 --data cifar10 -o r20.qat.onnx")
    if kind not in ("onnx", "pt"):
        raise InputFileError(f"{model} is a .{kind} file; quantize takes an FP32 .onnx (or a .pt for --mode qat, "
                             f"kmeans or fixed)")
    if kind == "pt":
        stem = model.name[: -len(model.suffix)]
        raise InputFileError(f"{model} is a PyTorch checkpoint; --mode {cfg.mode} quantizes an ONNX model",
                             hint=f"resopt export {model} -o {stem}.onnx, then resopt quantize {stem}.onnx")
    check_outputs(output, cfg, model, given)
    src = _open_onnx(model, given)
    needs_calib = cfg.needs_calibration or cfg.data is None or cfg.save_calib
    cs = _calib_set(cfg, src.classes, src.meta.get("lineage")) if needs_calib else None
    evals = EvalImages(cfg.data, src.pre, src.classes, per_class=cfg.limit_per_class, seed=cfg.seed) \
        if cfg.data is not None else None
    with tempfile.TemporaryDirectory(prefix="resopt-quantize-") as tmp_name:
        tmp = Path(tmp_name)
        produced = _produce(src, cfg, cs, evals, tmp)
        result = _verify_and_write(src, output, cfg, cs, evals, produced, t0=t0)
    if cfg.save_calib is not None and cs is not None:
        from resopt.calib import save_calib_set

        save_calib_set(cs, cfg.save_calib)
        log(f"saved the calibration set to {cfg.save_calib}")
    return result


@dataclass
class _Produced:
    """A quantized model in the work folder, with what the report and the lineage say about it."""

    path: Path
    settings: dict[str, Any]
    reasons: dict[str, str] = field(default_factory=dict)  # node -> why it stays FP32
    options: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    excluded: tuple[str, ...] = ()
    reference: Callable[[np.ndarray], np.ndarray] | None = None  # what agreement is measured against
    reference_name: str = "parent"
    parent_acc: tuple[float, float] | None = None  # parent top-1/top-5 when the reference is not the parent


def _settings(cfg: QuantizeConfig, reduce_range: bool) -> dict[str, Any]:
    weights = "int8 per-channel" if cfg.per_channel else "int8 per-tensor"
    if cfg.mode == "fp16":
        return {"weights": "float16", "activations": "float16", "io": "float32"}
    if cfg.mode == "int8-dynamic":
        return {"weights": weights.replace("int8", "uint8"), "activations": "uint8 dynamic",
                "reduce_range": reduce_range}
    if cfg.mode == "kmeans":
        return {"clusters": cfg.clusters, "weights": "uint8 indices + float32 codebook", "activations": "float32"}
    if cfg.mode == "fixed":
        return {"bits": cfg.bits, "weights": f"{cfg.bits}-bit fixed point per layer",
                "activations": f"{cfg.act_bits}-bit fixed point per layer" if cfg.act_bits else "float32",
                **({"calib_method": "minmax"} if cfg.act_bits else {})}
    acts = "int8 symmetric" if cfg.target == "trt" else "uint8 asymmetric"
    return {"format": "QDQ", "target": cfg.target, "activations": acts, "weights": weights + " symmetric",
            "calib_method": cfg.calib_method, "reduce_range": reduce_range, "preprocessed": True}


def static_builder(prepped: Path, ranges: Ranges, cfg: QuantizeConfig, workdir: Path, reduce_range: bool) -> Any:
    """The guard's ``build``: static Q/DQ of ``prepped`` with fixed ranges and chosen exclusions."""
    from resopt.quantize import ort as q

    def build(dst: Path, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> None:
        q.static_qdq(prepped, dst, ranges, workdir=workdir, target=cfg.target, per_channel=cfg.per_channel,
                     reduce_range=reduce_range, exclude=exclude, include=only)

    return build


def _produce(src: _Source, cfg: QuantizeConfig, cs: CalibSet | None, evals: EvalImages | None,
             tmp: Path) -> _Produced:
    from resopt.quantize import ort as q

    reduce_range = q.default_reduce_range() if cfg.reduce_range is None else cfg.reduce_range
    prepped, out = tmp / "prepped.onnx", tmp / "quantized.onnx"
    q.preprocess_model(src.onnx, prepped)
    _check_excluded_exist(prepped, cfg.exclude)
    produced = _Produced(out, _settings(cfg, reduce_range), reasons=dict.fromkeys(cfg.exclude, "--exclude"))
    ranges = None
    if cs is not None and cfg.needs_calibration:
        ranges = q.calibrate(prepped, cs, src.pre, method=cfg.calib_method if cfg.mode != "fixed" else "minmax",
                             symmetric=cfg.target == "trt", workdir=tmp)
        produced.options.update({"num_calib": len(cs), "calib_sha256": cs.sha256, "calib_source": cs.source,
                                 "seed": cfg.seed, "calib_preprocess": src.pre.to_dict()})

    if cfg.mode == "int8":
        assert ranges is not None
        build = static_builder(prepped, ranges, cfg, tmp, reduce_range)
        if cfg.max_drop is None:
            build(out, exclude=cfg.exclude)
        else:
            _guard(produced, build, src, prepped, cfg, cs, evals, tmp)
    elif cfg.mode == "int8-dynamic":
        q.dynamic_int8(prepped, out, per_channel=cfg.per_channel, reduce_range=reduce_range, exclude=cfg.exclude)
    elif cfg.mode == "fp16":
        produced.extra["fp16_conversion"] = q.float16(prepped, out, exclude=cfg.exclude).to_dict()
    elif cfg.mode == "kmeans":
        from resopt.quantize.kmeans import cluster_weights

        layers = cluster_weights(prepped, out, clusters=cfg.clusters, exclude=cfg.exclude)
        produced.metrics["weight_sqnr_db_min"] = round(min((la.sqnr_db for la in layers), default=0.0), 2)
        produced.extra["clustered"] = [{"weight": la.weight, "elements": la.elements, "clusters": la.clusters,
                                        "sqnr_db": round(la.sqnr_db, 2)} for la in layers]
    else:  # fixed
        from resopt.quantize.fixed import fixed_point

        formats: dict[str, dict[str, str]] = {}

        def build_fixed(dst: Path, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> None:
            formats.clear()
            formats.update(fixed_point(prepped, dst, bits=cfg.bits, act_bits=cfg.act_bits, ranges=ranges,
                                       exclude=exclude, only=only))

        if cfg.max_drop is None:
            build_fixed(out, exclude=cfg.exclude)
        else:
            _guard(produced, build_fixed, src, prepped, cfg, cs, evals, tmp)
        produced.extra["formats"] = dict(formats)
    produced.excluded = tuple(produced.reasons)
    return produced


def _guard(produced: _Produced, build: Any, src: _Source, prepped: Path, cfg: QuantizeConfig,
           cs: CalibSet | None, evals: EvalImages | None, tmp: Path) -> None:
    import numpy as np
    import onnx

    from resopt.calib import calib_batches
    from resopt.quantize.guard import run_guard
    from resopt.quantize.lint import lint_qdq

    assert evals is not None and cfg.max_drop is not None
    if cs is None:
        cs = _calib_set(cfg, src.classes, src.meta.get("lineage"))
    layers = [la.name for la in lint_qdq(onnx.load(str(prepped))).layers
              if cfg.mode != "fixed" or la.op != "Add"]  # fixed point leaves adds in float
    images = np.concatenate([x for x, _ in calib_batches(cs, src.pre, batch_size=64, limit=64)])
    g = run_guard(build, fp32=prepped, layers=layers, base_exclude=cfg.exclude, max_drop=cfg.max_drop,
                  max_exclude=cfg.max_exclude, eval_batches=evals, calib_images=images, workdir=tmp,
                  output=produced.path)
    sens = dict(g.sensitivity)
    for node in g.chosen.excluded:
        if node not in produced.reasons:
            produced.reasons[node] = f"accuracy guard (logit SQNR {sens[node]:.1f} dB when quantized alone)"
    produced.options.update({"max_drop": cfg.max_drop, "max_exclude": cfg.max_exclude,
                             "guard_excluded": [n for n in g.chosen.excluded if n not in cfg.exclude]})
    produced.metrics["guard_drop"] = round(g.chosen.drop, 3)
    produced.extra["guard"] = g.summary()


def _verify_and_write(src: _Source, output: Path, cfg: QuantizeConfig, cs: CalibSet | None,
                      evals: EvalImages | None, produced: _Produced, *, t0: float,
                      lineage_parent: Path | None = None) -> QuantizeResult:
    import onnx

    from resopt.calib import calib_batch_size, calib_batches
    from resopt.quantize.lint import lint_qdq

    if evals is not None:
        batches: Batches = evals()
        total, on = evals.total, "test"
    else:
        assert cs is not None
        bs = calib_batch_size(src.pre)
        batches, total, on = calib_batches(cs, src.pre, batch_size=bs), (len(cs) + bs - 1) // bs, "calibration"
    from resopt.backends.ort_backend import onnx_predict
    from resopt.verify import compare

    reference = produced.reference or onnx_predict(src.onnx)
    cmp = compare(reference, onnx_predict(produced.path), batches, total=total, description=f"verify on {on} images",
                  source=str(cfg.data) if evals is not None else "the calibration set")
    cmp.check(what=f"the {cfg.mode} result", against=f"its {produced.reference_name}",
              min_agreement=cfg.agreement_floor(), hint=_agreement_hint(cfg))

    lint: QdqLint | None = None
    if cfg.mode in ("int8", "qat", "int8-dynamic") or (cfg.mode == "fixed" and cfg.act_bits):
        lint = lint_qdq(onnx.load(str(produced.path)), target=cfg.target if cfg.mode in ("int8", "qat") else None,
                        reasons=produced.reasons)
        if lint.issues:
            raise VerificationError(f"the --target {cfg.target} graph breaks the target's Q/DQ rules: "
                                    f"{'; '.join(lint.issues[:3])}{' ...' if len(lint.issues) > 3 else ''}")

    runtime_int8: dict[str, Any] = {}
    if cfg.mode in ("int8", "qat"):
        from resopt.quantize.runtimes import runtime_int8_layers

        runtime_int8 = {"runtime_int8": runtime_int8_layers(produced.path, src.pre.input_size)}

    labelled = evals is not None
    ref_is_parent = produced.reference is None
    parent_file = str(src.given) if src.given == src.onnx else f"{src.given} (as FP32 ONNX)"
    parent_acc = ((cmp.parent_top1, cmp.parent_top5) if ref_is_parent else produced.parent_acc) if labelled else None
    parent_score = ModelScore(parent_file, src.onnx.stat().st_size, *(parent_acc or (None, None)))
    metrics: dict[str, Any] = {"agreement": cmp.top1_agreement, "agreement_images": cmp.images, "agreement_on": on,
                               "parent_size_bytes": parent_score.size_bytes, **produced.metrics}
    if labelled:
        metrics.update({"top1": cmp.top1, "top5": cmp.top5,
                        "eval_images": cmp.images, "data": cfg.data})
        if parent_acc is not None:
            metrics.update({"parent_top1": parent_acc[0], "parent_top5": parent_acc[1]})
    if lint is not None:
        metrics["int8_mac_fraction"] = round(lint.int8_mac_fraction, 4)
    options = {"mode": cfg.mode, **produced.settings, "exclude": list(cfg.exclude), **produced.options}
    _write(produced.path, output, src.meta, parent=lineage_parent or src.given, options=options, metrics=metrics,
           quantization={"mode": cfg.mode, **produced.settings})
    result_score = ModelScore(str(output), output.stat().st_size, *((cmp.top1, cmp.top5) if labelled else (None, None)))
    return QuantizeResult(output=output, mode=cfg.mode, settings=produced.settings, parent=parent_score,
                          result=result_score, agreement=cmp.top1_agreement, agreement_images=cmp.images,
                          agreement_on=on,
                          calib=cs.describe() if cs is not None and cfg.needs_calibration else None,
                          excluded=produced.excluded, lint=lint.summary() if lint is not None else None,
                          seconds=time.perf_counter() - t0,
                          extra={**produced.extra, "agreement_with": produced.reference_name, **runtime_int8})


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


def _agreement_hint(cfg: QuantizeConfig) -> str:
    """What can raise the agreement of *this* mode: calibration options only where there is calibration."""
    if cfg.mode == "kmeans":
        return "raise --clusters (more values per layer), --exclude the sensitive layers, or lower --min-agreement"
    if cfg.mode == "fixed":
        return "raise --bits (or --act-bits), --exclude the sensitive layers, or lower --min-agreement"
    if not cfg.needs_calibration:
        return "--exclude the sensitive layers, or lower --min-agreement"
    return ("try --calib-method percentile or entropy, more --num-calib, --max-drop with --data, "
            "--exclude the sensitive layers, or lower --min-agreement")
