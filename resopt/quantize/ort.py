"""onnxruntime's quantization tool, driven the way resopt needs it.

Three things are done here rather than left to ``quantize_static``'s defaults:

- The graph is pre-processed first (``quant_pre_process``: ORT's basic optimisations and shape inference).
  Without it weights hidden behind Identity nodes are quantized as activations and the result runs at a
  third of FP32 speed; with it, uint8 activations + per-channel int8 weights run ~3x FP32 on x86.
- Calibration is run here, batch by batch, so a progress bar can follow it and memory stays at one batch
  of activations (ORT's histogram calibrators otherwise keep every batch's activations until the end).
  The resulting ranges are handed to ``quantize_static`` through its calibration cache, which also lets
  the accuracy guard re-quantize with other exclusions without calibrating again.
- ORT's quantizer prints to stdout and warns through the root logger; both are sent to stderr / muted so
  that ``--json`` output stays one clean document.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.console import progress
from resopt.envinfo import cpu_has_vnni
from resopt.errors import InputFileError

if TYPE_CHECKING:
    from resopt.artifacts import Preprocess
    from resopt.calib import CalibSet
    from resopt.fp16 import Fp16Conversion

CALIB_METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("cpu", "trt")

# Ops TensorRT runs in INT8 when fed by Q/DQ. Anything else gets no Q/DQ in the trt flavour: a Q/DQ pair
# around an op TensorRT only has in FP32 just adds a reformat on each side of it.
TRT_INT8_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool",
                "GlobalAveragePool", "Concat")


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """ORT's quantizer ``print``s progress and logs warnings on the root logger: send prints to stderr and
    mute the warnings (they recommend pre-processing, which resopt always does)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)


def default_reduce_range() -> bool:
    """7-bit weights only on x86 without VNNI: there u8 x s8 products accumulate in int16 (vpmaddubsw)
    and can saturate; VNNI accumulates in int32 and ARM kernels do not saturate either."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    return cpu_has_vnni() is False


def preprocess_model(src: Path, dst: Path) -> None:
    """ORT's pre-processing (basic graph optimisation + ONNX shape inference) from ``src`` into ``dst``.

    Symbolic shape inference is skipped: it serves transformer graphs, and on failure it drops a
    ``sym_shape_infer_temp.onnx`` into the current directory.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with quiet_ort():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    if not dst.exists():
        raise InputFileError(f"onnxruntime could not pre-process {src.name} for quantization")


@dataclass(frozen=True)
class Ranges:
    """Calibrated activation ranges (ORT TensorsData) and how they were obtained."""

    data: Any  # onnxruntime.quantization.calibrate.TensorsData
    method: str
    images: int

    def save(self, path: Path) -> Path:
        from onnxruntime.quantization.calibrate import save_tensors_data

        save_tensors_data(self.data, path)
        return path

    def minmax(self, name: str) -> tuple[float, float] | None:
        """The calibrated (low, high) of tensor ``name`` (per-tensor; None if it was not calibrated)."""
        import numpy as np

        if name not in self.data:
            return None
        lo, hi = self.data[name].range_value
        return float(np.min(lo)), float(np.max(hi))


def calibrate(model: Path, cs: CalibSet, pre: Preprocess, *, method: str, symmetric: bool, workdir: Path,
              op_types: list[str] | None = None) -> Ranges:
    """Run ``model`` over the calibration images and compute activation ranges with ``method``.

    Each batch goes through ``collect_data`` on its own: MinMax folds it into running ranges and the
    histogram methods into running histograms, so no batch's activations outlive it.
    """
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from resopt.calib import calib_batch_size, calib_batches

    ort_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]

    class _OneBatch(CalibrationDataReader):
        def __init__(self, name: str, batch: np.ndarray) -> None:
            self.items = [{name: batch}]

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self.items.pop() if self.items else None

    with quiet_ort():
        calibrator = create_calibrator(model, op_types or None, augmented_model_path=str(workdir / "augmented.onnx"),
                                       calibrate_method=ort_method, extra_options={"symmetric": symmetric})
    input_name = calibrator.infer_session.get_inputs()[0].name
    bs = calib_batch_size(pre)
    with progress(f"calibrate ({method})", total=(len(cs) + bs - 1) // bs) as bar, quiet_ort():
        for x, _ in calib_batches(cs, pre, batch_size=bs):
            calibrator.collect_data(_OneBatch(input_name, x))
            bar.advance(1)
        data = calibrator.compute_data()
    return Ranges(data, method, len(cs))


def static_qdq(src: Path, dst: Path, ranges: Ranges, *, workdir: Path, target: str = "cpu", per_channel: bool = True,
               reduce_range: bool = False, exclude: tuple[str, ...] = (), include: tuple[str, ...] = ()) -> None:
    """Static Q/DQ quantization of the pre-processed ``src`` with calibrated ``ranges``.

    ``cpu``: uint8 activations (asymmetric, so ReLUs fold into the zero point) and int8 weights, the
    pairing ORT's x86 kernels (VNNI u8 x s8) run fastest. ``trt``: symmetric int8 activations and weights
    (zero point 0), as TensorRT's explicit quantization requires, and Q/DQ only around ops it runs in INT8.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cache = ranges.save(workdir / f"ranges-{ranges.method}.json")
    ort_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[ranges.method]
    extra: dict[str, Any] = {"WeightSymmetric": True}
    if target == "trt":
        # TensorRT's DequantizeLinear takes int8 only: biases stay FP32 (it folds them into the INT8 layer).
        extra.update({"ActivationSymmetric": True, "QuantizeBias": False})
        activation_type, op_types = QuantType.QInt8, list(TRT_INT8_OPS)
    else:
        activation_type, op_types = QuantType.QUInt8, None
    with quiet_ort():
        quantize_static(str(src), str(dst), calibration_data_reader=None, calibration_cache_path=str(cache),
                        calibrate_method=ort_method, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        reduce_range=reduce_range, activation_type=activation_type, weight_type=QuantType.QInt8,
                        op_types_to_quantize=op_types, nodes_to_exclude=list(exclude) or None,
                        nodes_to_quantize=list(include) or None, extra_options=extra)


def static_w4a8(src: Path, dst: Path, ranges: Ranges, *, workdir: Path, int8_weights: Mapping[str, int] | None = None,
                per_channel: bool = True, reduce_range: bool = False, exclude: tuple[str, ...] = ()) -> None:
    """Static Q/DQ with int4 weights (symmetric, [-8, 7], scale max|w|/7.5) and uint8 activations; the weights
    ``int8_weights`` names (initializer -> its output-channel axis) at int8, through ``quantize_static``'s
    per-tensor overrides (``TensorQuantOverrides``). ``src`` is raised to opset 21 first, where
    ``DequantizeLinear`` takes int4: the quantizer then writes standard Q/DQ with the int4 weights packed two
    to a byte (below opset 21 it falls back to onnxruntime's com.microsoft Q/DQ). ``reduce_range`` applies to
    the int8 weights only: onnxruntime's reduced int4 range ([-4, 3]) would halve the 4-bit grid."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 21:
        model = version_converter.convert_version(model, 21)
    src21 = workdir / "w4a8-opset21.onnx"
    onnx.save(model, str(src21))
    cache = ranges.save(workdir / f"ranges-{ranges.method}.json")
    ort_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[ranges.method]
    int8: dict[str, Any] = {"quant_type": QuantType.QInt8, "symmetric": True, "reduce_range": reduce_range}
    # Without an axis an override is per-tensor, so per-channel int8 weights name theirs.
    overrides = {name: [{**int8, **({"axis": axis} if per_channel else {})}]
                 for name, axis in (int8_weights or {}).items()}
    with quiet_ort():
        quantize_static(str(src21), str(dst), calibration_data_reader=None, calibration_cache_path=str(cache),
                        calibrate_method=ort_method, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt4,
                        nodes_to_exclude=list(exclude) or None,
                        extra_options={"WeightSymmetric": True, "TensorQuantOverrides": overrides})


def dynamic_int8(src: Path, dst: Path, *, per_channel: bool = True, reduce_range: bool = False,
                 exclude: tuple[str, ...] = ()) -> None:
    """Dynamic quantization: int8 weights stored, activation ranges computed at run time.

    uint8 weights: ORT's CPU ConvInteger runs u8 x u8 about 3x faster than u8 x s8 (measured on a
    ResNet-20), and a CNN spends its time in convolutions.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_ort():
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, reduce_range=reduce_range,
                         weight_type=QuantType.QUInt8, nodes_to_exclude=list(exclude) or None)


def float16(src: Path, dst: Path, *, exclude: tuple[str, ...] = ()) -> Fp16Conversion:
    """FP16 weights and compute with float32 inputs and outputs, so callers feed the same arrays; the
    numerically sensitive ops stay FP32 exactly as in ``build --fp16`` (``resopt.fp16``)."""
    import onnx

    from resopt.fp16 import convert_onnx_fp16

    with quiet_ort():
        model, conversion = convert_onnx_fp16(onnx.load(str(src)), exclude_nodes=exclude)
    onnx.save(model, str(dst))
    return conversion
