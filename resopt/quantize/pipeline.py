"""What every quantize mode shares: opening and checking the FP32 ONNX (``open_onnx``), exporting a ``.pt``
first (``export_fp32``), the calibration set, the ``--data`` images, the static Q/DQ builder and the accuracy
guard, and the end of every mode: verify the result against its parent, lint it, stamp its lineage and write
it (``verify_and_write``). The modes themselves are in ``resopt.quantize.modes``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from resopt.artifacts import (
    check_output_path,
    lineage_entry,
    load_onnx,
    onnx_preprocess,
    read_onnx_meta,
    save_onnx,
    stamp_onnx,
)
from resopt.console import log, warn
from resopt.errors import InputFileError, UsageError, VerificationError

if TYPE_CHECKING:
    import numpy as np

    from resopt.artifacts import Preprocess
    from resopt.calib import CalibSet
    from resopt.quantize.config import QuantizeConfig
    from resopt.quantize.lint import QdqLint
    from resopt.quantize.ort import Ranges
    from resopt.quantize.ptq import WeightGrid


class ModeEntry(Protocol):
    """What the shared steps read of a mode's registry entry (``resopt.quantize.modes.Mode``). The entry is
    handed in by the caller, never looked up here: ``modes`` imports this module for its producers, so the
    imports point one way."""

    @property
    def settings(self) -> Callable[[QuantizeConfig, bool], dict[str, Any]]: ...
    @property
    def calibrates(self) -> Callable[[QuantizeConfig], bool]: ...
    @property
    def lints(self) -> Callable[[QuantizeConfig], bool]: ...
    @property
    def qdq_int8(self) -> bool: ...
    @property
    def agreement_hint(self) -> str: ...
    @property
    def ptq_grids(self) -> Callable[[Path, QuantizeConfig, bool],
                                    tuple[WeightGrid, dict[str, WeightGrid]]] | None: ...
    def takes(self, flag: str) -> bool: ...
    def agreement_floor(self, cfg: QuantizeConfig) -> float: ...


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
    agreement_on: str  # "test", "uncalibrated" (a bare folder's images not calibrated on) or "calibration"
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
    """A split of ``--data`` with the model's preprocessing, decoded once when it fits in memory (the guard
    evaluates many candidate models on it) and streamed otherwise: ``test`` (what is reported, and what the
    result is checked against its parent on) or ``val`` (what ``--max-drop`` decides on: the validation split
    the model's ``lineage`` records, re-derived)."""

    CACHE_BYTES = 1 << 30

    def __init__(self, data: str, pre: Preprocess, classes: list[str], *, per_class: int | None, seed: int,
                 batch_size: int = 64, split: str = "test", lineage: list[dict[str, Any]] | None = None) -> None:
        from resopt.data import check_classes, classes_of, load_eval_set, load_val_set, make_loader

        self.split = split
        if split == "val":
            self.dataset, vs = load_val_set(data, pre, lineage=lineage, per_class=per_class, seed=seed)
            self.note = vs.describe(len(self.dataset))  # type: ignore[arg-type]
        else:
            self.dataset = load_eval_set(data, pre, split="test", per_class=per_class, seed=seed)
            self.note = f"{len(self.dataset):,} test images"  # type: ignore[arg-type]
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
class Source:
    """The FP32 ONNX being quantized, and what the user passed."""

    onnx: Path
    given: Path
    meta: dict[str, Any]
    pre: Preprocess
    classes: list[str]


def open_onnx(path: Path, given: Path) -> Source:
    from resopt.onnx_utils import check_classifier_graph

    proto = load_onnx(path)
    meta = read_onnx_meta(proto, path=given)
    pre = onnx_preprocess(meta, given)
    check_classifier_graph(proto, given, image_size=pre.input_size)
    check_float_model(proto, given)
    return Source(path, given, meta, pre, list(meta.get("classes", [])))


def check_float_model(model: Any, path: Path) -> None:
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


def export_fp32(checkpoint: Path, dst: Path, cfg: QuantizeConfig) -> Path:
    from resopt.export import ExportConfig, export_onnx

    log(f"exporting {checkpoint} to FP32 ONNX first")
    export_onnx(checkpoint, dst, ExportConfig(data=cfg.data))
    return dst


def calib_set(cfg: QuantizeConfig, classes: list[str], lineage: list[dict[str, Any]] | None = None) -> CalibSet:
    from resopt.calib import default_data, load_calib_set

    spec = cfg.calib_data if cfg.calib_data is not None else \
        default_data(classes, lineage or [], option="--calib-data", purpose="calibration")
    cs = load_calib_set(spec, num=cfg.num_calib, seed=cfg.seed)
    if list(cs.classes) != list(classes):
        warn(f"calibration set {cs.source} has classes {list(cs.classes)[:3]}..., the model "
             f"{list(classes)[:3]}...; ranges are still taken from its images")
    log(f"calibration set: {len(cs)} of {cs.available} images from {cs.source} (sha256 {cs.sha256[:12]})")
    return cs


def check_excluded_exist(model: Path, exclude: tuple[str, ...]) -> None:
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


def check_outputs(output: Path, cfg: QuantizeConfig, *inputs: Path) -> None:
    """``-o`` and ``--save-calib`` checked before any work: suffixes, folders, and neither over an input
    (the model, ``--calib-data``, ``--data``) nor over each other."""
    check_output_path(output, *inputs, cfg.calib_data, cfg.data, suffixes=(".onnx",))
    if cfg.save_calib is not None:
        save = Path(cfg.save_calib)
        check_output_path(save, *inputs, cfg.calib_data, cfg.data, suffixes=(".npz",), option="--save-calib")
        if save.resolve() == Path(output).resolve():
            raise UsageError(f"--save-calib {save} is the same file as -o; choose another name")


@dataclass
class Produced:
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


def static_builder(prepped: Path, ranges: Ranges, cfg: QuantizeConfig, workdir: Path, reduce_range: bool) -> Any:
    """The guard's ``build``: static Q/DQ of ``prepped`` with fixed ranges and chosen exclusions."""
    from resopt.quantize import ort as q

    def build(dst: Path, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> None:
        q.static_qdq(prepped, dst, ranges, workdir=workdir, target=cfg.target, per_channel=cfg.per_channel,
                     reduce_range=reduce_range, exclude=exclude, include=only)

    return build


@dataclass(frozen=True)
class Job:
    """What a mode's producer gets: the FP32 source after onnxruntime's pre-processing (``prepped``), where to
    write (``produced.path``), and the activation ranges when the mode calibrates."""

    src: Source
    cfg: QuantizeConfig
    cs: CalibSet | None
    evals: EvalImages | None
    tmp: Path
    prepped: Path
    ranges: Ranges | None
    reduce_range: bool
    produced: Produced
    val_evals: EvalImages | None = None  # what --max-drop decides on


def prepare(src: Source, cfg: QuantizeConfig, mode: ModeEntry, cs: CalibSet | None, evals: EvalImages | None,
            tmp: Path, val_evals: EvalImages | None = None) -> Job:
    """The steps before any mode's own work: onnxruntime's pre-processing, the ``--exclude`` check, and, for a
    mode that calibrates, the activation ranges (``--calib-method`` where the mode takes it, else minmax)."""
    from resopt.quantize import ort as q

    reduce_range = cfg.weights_reduce_range()
    prepped, out = tmp / "prepped.onnx", tmp / "quantized.onnx"
    q.preprocess_model(src.onnx, prepped)
    check_excluded_exist(prepped, cfg.exclude)
    produced = Produced(out, mode.settings(cfg, reduce_range), reasons=dict.fromkeys(cfg.exclude, "--exclude"))
    ranges = None
    if cfg.ptq:  # before calibration: CLE changes the activation ranges
        prepped = _run_ptq(prepped, src, cfg, mode, cs, reduce_range, produced)
    if cs is not None and mode.calibrates(cfg):
        ranges = q.calibrate(prepped, cs, src.pre, method=cfg.calib_method if mode.takes("--calib-method") else
                             "minmax", symmetric=cfg.target == "trt", workdir=tmp)
        produced.options.update({"num_calib": len(cs), "calib_sha256": cs.sha256, "calib_source": cs.source,
                                 "seed": cfg.seed, "calib_preprocess": src.pre.to_dict()})
    return Job(src, cfg, cs, evals, tmp, prepped, ranges, reduce_range, produced, val_evals)


def _run_ptq(prepped: Path, src: Source, cfg: QuantizeConfig, mode: ModeEntry, cs: CalibSet | None,
             reduce_range: bool, produced: Produced) -> Path:
    """``--ptq``: the float graph rewritten for onnxruntime's weight grid (``resopt.quantize.ptq``): int8's, or
    the mode's own (``Mode.ptq_grids``: w4a8's int4 grid)."""
    import numpy as np

    from resopt.calib import calib_batches
    from resopt.quantize.ptq import PTQ_IMAGES, WeightGrid, apply_ptq

    images = None
    if any(s != "cle" for s in cfg.ptq):
        assert cs is not None
        images = np.concatenate([x for x, _ in calib_batches(cs, src.pre, batch_size=32, limit=PTQ_IMAGES)])
    out = prepped.with_name("ptq.onnx")
    grid, layer_grids = mode.ptq_grids(prepped, cfg, reduce_range) if mode.ptq_grids is not None \
        else (WeightGrid(64 if reduce_range else 127, cfg.per_channel), {})
    record = apply_ptq(prepped, out, cfg.ptq, grid, images, seed=cfg.seed, layer_grids=layer_grids)
    produced.options["ptq"] = record
    produced.extra["ptq"] = record
    log(f"--ptq {','.join(cfg.ptq)}: done" + (f" on {record['images']} calibration images" if images is not None
                                              else ""))
    return out


def guard(produced: Produced, build: Any, src: Source, prepped: Path, cfg: QuantizeConfig,
          cs: CalibSet | None, evals: EvalImages | None, tmp: Path, *, skip_ops: tuple[str, ...] = ()) -> None:
    """The accuracy guard (``--max-drop``) around ``build``: ranks the layers (but those of ``skip_ops``, which
    the mode leaves in float) and keeps the most sensitive in FP32 until the drop, measured on ``evals`` (the
    validation split, never test), is within bounds."""
    import numpy as np
    import onnx

    from resopt.calib import calib_batches
    from resopt.quantize.guard import run_guard
    from resopt.quantize.lint import lint_qdq

    assert evals is not None and evals.split == "val" and cfg.max_drop is not None
    log(f"accuracy guard: deciding on val ({evals.note}); test is measured once, on the chosen model")
    if cs is None:
        cs = calib_set(cfg, src.classes, src.meta.get("lineage"))
    layers = [la.name for la in lint_qdq(onnx.load(str(prepped))).layers
              if la.op not in skip_ops]
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
    produced.metrics["guard_split"] = "val"
    produced.metrics["guard_images"] = len(evals.dataset)  # type: ignore[arg-type]
    produced.extra["guard"] = g.summary()


def verify_and_write(src: Source, output: Path, cfg: QuantizeConfig, mode: ModeEntry, cs: CalibSet | None,
                      evals: EvalImages | None, produced: Produced, *, t0: float,
                      lineage_parent: Path | None = None) -> QuantizeResult:
    import onnx

    from resopt.calib import calib_batch_size, calib_batches
    from resopt.quantize.lint import lint_qdq


    if evals is not None:
        batches: Batches = evals()
        total, on, where = evals.total, "test", str(cfg.data)
    else:
        # Without --data: images of the calibration source the ranges were not fitted to (its test split, or
        # its images not drawn for calibration); the calibration images only when there are no others.
        from resopt.calib import uncalibrated_set

        assert cs is not None
        bs = calib_batch_size(src.pre)
        other = uncalibrated_set(cs, num=len(cs), seed=cfg.seed)
        if other is None:
            warn(f"every image of {cs.source} was used for calibration; checking the result against its parent on "
                 f"those same images (pass --data, or a smaller --num-calib, to check on others)")
            check, on, where = cs, "calibration", "the calibration set"
        else:
            check, on = other
            where = f"{cs.source} ({'test split' if on == 'test' else 'images not used for calibration'})"
        batches, total = calib_batches(check, src.pre, batch_size=bs), (len(check) + bs - 1) // bs
    from resopt.backends.ort_backend import onnx_predict
    from resopt.verify import compare

    reference = produced.reference or onnx_predict(src.onnx)
    cmp = compare(reference, onnx_predict(produced.path), batches, total=total, description=f"verify on {on} images",
                  source=where)
    cmp.check(what=f"the {cfg.mode} result", against=f"its {produced.reference_name}",
              min_agreement=mode.agreement_floor(cfg), hint=mode.agreement_hint)

    lint: QdqLint | None = None
    if mode.lints(cfg):
        lint = lint_qdq(onnx.load(str(produced.path)), target=cfg.target if mode.qdq_int8 else None,
                        reasons=produced.reasons)
        if lint.issues:
            raise VerificationError(f"the --target {cfg.target} graph breaks the target's Q/DQ rules: "
                                    f"{'; '.join(lint.issues[:3])}{' ...' if len(lint.issues) > 3 else ''}")

    runtime_int8: dict[str, Any] = {}
    if mode.qdq_int8:
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
        metrics.update({"top1": cmp.top1, "top5": cmp.top5, "split": "test",
                        "eval_images": cmp.images, "data": cfg.data})
        if parent_acc is not None:
            metrics.update({"parent_top1": parent_acc[0], "parent_top5": parent_acc[1]})
    if lint is not None:
        metrics["int8_mac_fraction"] = round(lint.int8_mac_fraction, 4)
    # The gate it passed: --min-agreement is part of what made the file (and is then not silently ignored).
    options = {"mode": cfg.mode, **produced.settings, "exclude": list(cfg.exclude), **produced.options,
               "min_agreement": mode.agreement_floor(cfg)}
    write_quantized(produced.path, output, src.meta, parent=lineage_parent or src.given, options=options,
                    metrics=metrics, quantization={"mode": cfg.mode, **produced.settings})
    result_score = ModelScore(str(output), output.stat().st_size, *((cmp.top1, cmp.top5) if labelled else (None, None)))
    return QuantizeResult(output=output, mode=cfg.mode, settings=produced.settings, parent=parent_score,
                          result=result_score, agreement=cmp.top1_agreement, agreement_images=cmp.images,
                          agreement_on=on,
                          calib=cs.describe() if cs is not None and mode.calibrates(cfg) else None,
                          excluded=produced.excluded, lint=lint.summary() if lint is not None else None,
                          seconds=time.perf_counter() - t0,
                          extra={**produced.extra, "agreement_with": produced.reference_name, **runtime_int8})


def write_quantized(src: Path, output: Path, parent_meta: dict[str, Any], *, parent: Path, options: dict[str, Any],
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
