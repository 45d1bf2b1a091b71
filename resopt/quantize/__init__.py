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

The package: ``config`` (the shared options and one options dataclass per mode), ``modes`` (the registry of
modes: producer, options, calibration, checks), ``pipeline`` (what the modes share: sources, calibration set,
verification and writing), and one module per method (``ort``, ``kmeans``, ``fixed``, ``qat``), with the
accuracy guard (``guard``), the Q/DQ lint (``lint``) and the per-runtime INT8 counts (``runtimes``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from resopt.artifacts import artifact_kind
from resopt.console import log
from resopt.errors import InputFileError, UsageError
from resopt.quantize.config import (
    DEFAULT_NUM_CALIB,
    FixedOptions,
    KmeansOptions,
    ModeOptions,
    NoOptions,
    QatOptions,
    QuantizeConfig,
)
from resopt.quantize.modes import MODES, Mode, check_config, check_options_apply, get_mode
from resopt.quantize.pipeline import (
    EvalImages,
    ModelScore,
    QuantizeResult,
    calib_set,
    check_outputs,
    export_fp32,
    open_onnx,
    prepare,
    verify_and_write,
)

__all__ = [
    "DEFAULT_NUM_CALIB", "MODES", "EvalImages", "FixedOptions", "KmeansOptions", "Mode", "ModeOptions", "ModelScore",
    "NoOptions", "QatOptions", "QuantizeConfig", "QuantizeResult", "check_config", "check_options_apply",
    "check_outputs", "get_mode", "quantize_model", "quantize_onnx",
]


def quantize_model(model: Path, output: Path, cfg: QuantizeConfig) -> QuantizeResult:
    """The command's entry: an ``.onnx`` for the modes with a producer; a ``.pt`` for qat (which fine-tunes
    it) and for kmeans and fixed (exported to FP32 ONNX first)."""
    mode = check_config(cfg)
    model = Path(model)
    kind = artifact_kind(model)
    if kind == "pt" and mode.from_checkpoint is not None:
        return mode.from_checkpoint(model, output, cfg)
    if kind == "pt" and mode.exports_pt:
        check_outputs(output, cfg, model)
        with tempfile.TemporaryDirectory(prefix="resopt-export-") as tmp:
            fp32 = export_fp32(model, Path(tmp) / (model.stem + ".onnx"), cfg)
            return quantize_onnx(fp32, output, cfg, given=model)
    return quantize_onnx(model, output, cfg)


def quantize_onnx(model: Path, output: Path, cfg: QuantizeConfig, *, given: Path | None = None) -> QuantizeResult:
    """Quantize the FP32 ONNX ``model`` into ``output`` (never over ``model``), verified against it.

    ``given``: the file the user passed when ``model`` is an export made on the way (lineage parent).
    """
    t0 = time.perf_counter()
    mode = check_config(cfg)
    model, output = Path(model), Path(output)
    given = Path(given) if given is not None else model
    kind = artifact_kind(model)
    if mode.produce is None:
        raise UsageError(f"--mode {cfg.mode} fine-tunes in PyTorch; it takes the .pt checkpoint, not {model.name}",
                         hint="resopt quantize r20.pt --mode qat --epochs 3 --data cifar10 -o r20.qat.onnx")
    if kind not in ("onnx", "pt"):
        pt_modes = [n for n, m in MODES.items() if m.produce is None or m.exports_pt]
        raise InputFileError(f"{model} is a .{kind} file; quantize takes an FP32 .onnx (or a .pt for --mode "
                             f"{', '.join(pt_modes[:-1])} or {pt_modes[-1]})")
    if kind == "pt":
        stem = model.name[: -len(model.suffix)]
        raise InputFileError(f"{model} is a PyTorch checkpoint; --mode {cfg.mode} quantizes an ONNX model",
                             hint=f"resopt export {model} -o {stem}.onnx, then resopt quantize {stem}.onnx")
    check_outputs(output, cfg, model, given)
    src = open_onnx(model, given)
    cs = calib_set(cfg, src.classes, src.meta.get("lineage")) if mode.reads_calib_set(cfg) else None
    evals = EvalImages(cfg.data, src.pre, src.classes, per_class=cfg.limit_per_class, seed=cfg.seed) \
        if cfg.data is not None else None
    # --max-drop chooses which layers stay FP32: on the validation split the model's lineage records, never test.
    val_evals = EvalImages(cfg.data, src.pre, src.classes, per_class=cfg.limit_per_class, seed=cfg.seed,
                           split="val", lineage=src.meta.get("lineage")) \
        if cfg.data is not None and cfg.max_drop is not None else None
    with tempfile.TemporaryDirectory(prefix="resopt-quantize-") as tmp_name:
        job = prepare(src, cfg, mode, cs, evals, Path(tmp_name), val_evals)
        mode.produce(job)
        job.produced.excluded = tuple(job.produced.reasons)
        result = verify_and_write(src, output, cfg, mode, cs, evals, job.produced, t0=t0)
    if cfg.save_calib is not None and cs is not None:
        from resopt.calib import save_calib_set

        save_calib_set(cs, cfg.save_calib)
        log(f"saved the calibration set to {cfg.save_calib}")
    return result
