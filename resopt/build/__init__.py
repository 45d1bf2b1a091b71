"""``build``: ONNX -> TensorRT ``.engine`` (plus its ``.engine.json`` sidecar), verified against the ONNX.

Precision depends on the TensorRT major version, and resopt says which path it took:

* TensorRT 11 removed the FP16/INT8 builder flags and implicit INT8 calibration: every network is
  strongly typed, so precision comes from the ONNX itself. ``--fp16`` converts the ONNX to FP16 first
  (inputs/outputs stay float32, numerically sensitive ops stay FP32); INT8 comes from Q/DQ nodes
  (``resopt quantize --target trt``); ``--int8 --calib-data`` is refused with the Q/DQ route as hint.
* TensorRT 10 still has ``BuilderFlag.FP16``/``INT8`` (deprecated from 10.12) and ``IInt8EntropyCalibrator2``
  (deprecated since 10.1): ``--fp16`` sets the flag on a weakly typed network, ``--int8 --calib-data``
  calibrates with an entropy calibrator and a calibration cache, and a Q/DQ ONNX builds as a strongly
  typed network.

The package is split by purpose:

* ``plan``: the options (``BuildConfig``), the batch profile (``resolve_profile``) and the precision path
  (``plan_build``), decided before TensorRT is loaded;
* ``onnx_checks``: the input spec, the Q/DQ checks and the 2:4 sparsity count, read from the ONNX;
* ``calibrator``: TensorRT 10's INT8 calibration (``CalibrationFeeder`` and the entropy calibrator), the
  one module to delete when TensorRT 10 is dropped;
* ``engine``: the build, the engine-vs-ONNX check and the sidecar (``resopt.artifacts.EngineSidecar``).

The FP16 conversion is ``resopt.fp16`` (shared with ``quantize --mode fp16``). Everything that does not
need TensorRT is a plain function tested on CPU.
"""

from __future__ import annotations

from resopt.build.calibrator import (
    DEFAULT_CALIB_BATCH,
    CalibrationFeeder,
    calibration_batch,
    interleave_by_class,
    make_entropy_calibrator,
)
from resopt.build.engine import (
    MIN_AGREEMENT,
    BuildResult,
    agreement_bound,
    build_engine,
    compare_with_onnx,
    verification_set,
)
from resopt.build.onnx_checks import (
    QDQ_OPS,
    QOPERATOR_OPS,
    InputSpec,
    onnx_input_spec,
    onnx_quantization,
    sparsity_24,
)
from resopt.build.plan import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MIN_BATCH,
    DEFAULT_OPT_BATCH,
    BatchProfile,
    BuildConfig,
    BuildPlan,
    check_request,
    parse_size,
    plan_build,
    resolve_profile,
)

__all__ = [
    "DEFAULT_CALIB_BATCH", "DEFAULT_MAX_BATCH", "DEFAULT_MIN_BATCH", "DEFAULT_OPT_BATCH", "MIN_AGREEMENT", "QDQ_OPS",
    "QOPERATOR_OPS", "BatchProfile", "BuildConfig", "BuildPlan", "BuildResult", "CalibrationFeeder", "InputSpec",
    "agreement_bound", "build_engine", "calibration_batch", "check_request", "compare_with_onnx",
    "interleave_by_class", "make_entropy_calibrator", "onnx_input_spec", "onnx_quantization", "parse_size",
    "plan_build", "resolve_profile", "sparsity_24", "verification_set",
]
