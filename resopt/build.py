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

Everything that does not need TensorRT is a plain function tested on CPU: the path choice
(``plan_build``), the batch profile (``resolve_profile``), the FP16 conversion (``convert_onnx_fp16``),
the Q/DQ checks, and the calibrator's batch feeding and cache (``CalibrationFeeder``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import (
    atomic_output,
    check_output_path,
    lineage_entry,
    onnx_preprocess,
    read_onnx_meta,
    require_kind,
    sha256_file,
    sidecar_path,
    write_sidecar,
)
from resopt.console import log, warn
from resopt.envinfo import TENSORRT_INSTALL, trt_major
from resopt.errors import (
    DataError,
    EnvironmentMismatchError,
    InputFileError,
    MissingDependencyError,
    UsageError,
)
from resopt.fp16 import convert_onnx_fp16

if TYPE_CHECKING:
    from resopt.artifacts import Preprocess
    from resopt.verify import Parity

DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH = 1, 64, 256
DEFAULT_CALIB_BATCH = 32

# Minimum top-1 agreement (%) between the engine and its ONNX on real images, per precision. INT8 from a
# TensorRT calibration is compared with the FP32 ONNX, so it gets the loosest bound.
MIN_AGREEMENT: dict[str, float] = {"fp32": 99.0, "fp16": 98.0, "int8": 95.0, "int8-calibrated": 90.0}

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# onnxruntime's "QOperator" format: TensorRT's parser cannot import these, it wants Q/DQ pairs.
QOPERATOR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                           "QLinearAveragePool", "QLinearSigmoid", "QLinearConcat", "ConvInteger", "MatMulInteger",
                           "DynamicQuantizeLinear"})


# ---------------------------------------------------------------------------------------- options


_SIZE_UNITS = {"": 2**20, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
               "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """``--workspace`` value in bytes: ``512M``, ``4G``, ``4GiB``, ``1.5GB``; a bare number is MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"--workspace {text!r} is not a size; use e.g. 512M, 4G or 4GiB (a bare number is MiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile's batch sizes: TensorRT tunes kernels for ``opt`` and accepts min..max."""

    min: int
    opt: int
    max: int

    def shapes(self, sample_shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return tuple((b, *sample_shape) for b in (self.min, self.opt, self.max))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def resolve_profile(*, min_batch: int | None = None, opt_batch: int | None = None, max_batch: int | None = None,
                    static_batch: int | None = None) -> BatchProfile:
    """The batch profile from ``--min/--opt/--max-batch``; unset values follow the set ones.

    Defaults are 1..256 tuned for 64 (the batch sizes ``bench`` reports); ``--max-batch 32`` alone gives
    1/32/32. An ONNX with a fixed batch dimension admits only that batch.
    """
    for name, v in (("--min-batch", min_batch), ("--opt-batch", opt_batch), ("--max-batch", max_batch)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be at least 1, got {v}")
    if static_batch is not None:
        wrong = [(n, v) for n, v in (("--min-batch", min_batch), ("--opt-batch", opt_batch),
                                     ("--max-batch", max_batch)) if v is not None and v != static_batch]
        if wrong:
            raise UsageError(f"the ONNX input has a fixed batch of {static_batch}, so {wrong[0][0]} {wrong[0][1]} "
                             f"cannot apply", hint="export the model with a dynamic batch axis (resopt export does)")
        return BatchProfile(static_batch, static_batch, static_batch)
    lo = min_batch if min_batch is not None else DEFAULT_MIN_BATCH
    hi = max_batch if max_batch is not None else max(DEFAULT_MAX_BATCH, lo, opt_batch or 0)
    opt = opt_batch if opt_batch is not None else min(max(DEFAULT_OPT_BATCH, lo), hi)
    if not lo <= opt <= hi:
        raise UsageError(f"batch profile must satisfy min <= opt <= max, got min {lo}, opt {opt}, max {hi}")
    return BatchProfile(lo, opt, hi)


# ------------------------------------------------------------------------------------ ONNX checks


@dataclass(frozen=True)
class InputSpec:
    name: str
    batch: int | None  # None: dynamic batch axis
    sample_shape: tuple[int, ...]  # (C, H, W)


def onnx_input_spec(model: Any, path: Path | str = "model") -> InputSpec:
    """The single image input of a classifier ONNX: its name, batch axis and (C, H, W)."""
    from resopt.onnx_utils import check_single_output, image_input

    inp = image_input(model, path)
    check_single_output(model, path)
    dims = inp.type.tensor_type.shape.dim
    sample = []
    for d in dims[1:]:
        if not d.HasField("dim_value"):
            raise InputFileError(f"{path} input {inp.name!r} has a dynamic C/H/W dimension "
                                 f"({d.dim_param or '?'}); only the batch axis may be dynamic")
        sample.append(int(d.dim_value))
    batch = int(dims[0].dim_value) if dims[0].HasField("dim_value") else None
    return InputSpec(inp.name, batch, tuple(sample))


def onnx_quantization(model: Any, path: Path | str = "model") -> str:
    """``"qdq"`` for an ONNX with TensorRT-compatible Q/DQ nodes, ``"none"`` for a float model.

    TensorRT's explicit quantization is symmetric signed INT8 (zero point 0), so QOperator graphs,
    uint8 or nonzero zero points fail here with the quantize command that fixes them.
    """
    import numpy as np
    from onnx import numpy_helper

    ops = {n.op_type for n in model.graph.node}
    qop = sorted(ops & QOPERATOR_OPS)
    if qop:
        raise InputFileError(f"{path} uses onnxruntime QOperator nodes ({', '.join(qop)}), which TensorRT cannot "
                             f"parse; TensorRT needs Q/DQ (QuantizeLinear/DequantizeLinear) nodes",
                             hint="re-quantize the FP32 model with `resopt quantize MODEL.onnx --target trt`")
    if not ops & QDQ_OPS:
        return "none"
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: next((a.t for a in n.attribute if a.name == "value"), None)
              for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 3 or not node.input[2]:
            continue  # no zero point input: ONNX defaults it to 0 (int8 when the output type is unset)
        tensor = inits.get(node.input[2]) or consts.get(node.input[2])
        if tensor is None:
            continue
        zp = numpy_helper.to_array(tensor)
        if zp.dtype != np.int8 or np.any(zp != 0):
            raise InputFileError(
                f"{path} has {node.op_type} {node.name or node.output[0]!r} with zero point "
                f"{zp.reshape(-1)[:4].tolist()} of type {zp.dtype}; TensorRT needs symmetric int8 quantization "
                f"(int8, zero point 0)",
                hint="re-quantize the FP32 model with `resopt quantize MODEL.onnx --target trt`")
    return "qdq"


def sparsity_24(model: Any) -> dict[str, Any]:
    """How much of the Conv/Gemm weights follow the 2:4 pattern TensorRT's sparse kernels need: in every
    group of 4 consecutive input channels, at least 2 zeros. A layer qualifies only if all its groups do.
    """
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    layers = eligible = groups = ok_groups = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits and name in producers and producers[name].op_type == "DequantizeLinear":
            name = producers[name].input[0]  # Q/DQ graph: the quantized weight feeds a DequantizeLinear
        if name not in inits:
            continue
        w = numpy_helper.to_array(inits[name])
        if w.ndim == 4:  # Conv (K, C, R, S): groups run along C
            w = w.transpose(0, 2, 3, 1).reshape(-1, w.shape[1])
        elif w.ndim == 2:  # Gemm: weight (out, in) with transB=1 as exported by torch; groups along "in"
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            w = w if (node.op_type == "Gemm" and trans_b) else w.T
        else:
            continue
        pad = (-w.shape[1]) % 4
        w = np.pad(w, ((0, 0), (0, pad)))
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(axis=2)
        layers += 1
        groups += zeros.size
        ok_groups += int((zeros >= 2).sum())
        eligible += int(bool((zeros >= 2).all()))
    return {"layers": layers, "eligible_layers": eligible,
            "groups_2_4": round(ok_groups / groups, 4) if groups else 0.0}


# ----------------------------------------------------------------------------------- path choice


@dataclass(frozen=True)
class BuildPlan:
    """How an engine is built with a given TensorRT: the pure decision, made before TensorRT is touched."""

    trt_version: str
    precision: str  # fp32 | fp16 | int8 | int8-calibrated (+ "-fp16" suffix for mixed INT8/FP16 on TRT 10)
    strongly_typed: bool
    convert_fp16: bool  # convert the ONNX to FP16 before parsing (TensorRT >= 11)
    builder_flags: tuple[str, ...]  # BuilderFlag member names to set
    calibrate: bool
    description: str

    @property
    def trt_major(self) -> int:
        return trt_major(self.trt_version)

    @property
    def gate(self) -> str:
        """Which MIN_AGREEMENT entry the parity check uses."""
        return "int8-calibrated" if self.calibrate else self.precision.split("+")[0]


def check_request(*, int8: bool, calibrate: bool, has_qdq: bool) -> None:
    """The precision requests that are wrong with any TensorRT version (checked before TensorRT is loaded)."""
    if calibrate and not int8:
        raise UsageError("--calib-data calibrates INT8; add --int8 (or drop --calib-data)")
    if calibrate and has_qdq:
        raise UsageError("this ONNX is already quantized (it has Q/DQ nodes), so --calib-data has nothing to calibrate",
                         hint="build it without --calib-data")
    if int8 and not has_qdq and not calibrate:
        raise UsageError("--int8 needs a Q/DQ ONNX or --calib-data DIR (TensorRT 10 only)",
                         hint="make a Q/DQ ONNX with `resopt quantize MODEL.onnx --target trt --calib-data DIR`")


def plan_build(trt_version: str, *, fp16: bool = False, int8: bool = False, calibrate: bool = False,
               has_qdq: bool = False, sparsity: bool = False) -> BuildPlan:
    """Choose the precision path for this TensorRT version; refuse combinations it cannot build."""
    major = trt_major(trt_version)
    if major < 10:
        raise MissingDependencyError(f"TensorRT {trt_version} is too old; resopt needs TensorRT 10 or newer",
                                     hint=TENSORRT_INSTALL)
    check_request(int8=int8, calibrate=calibrate, has_qdq=has_qdq)
    sparse = ("SPARSE_WEIGHTS",) if sparsity else ()
    tag = f"TensorRT {trt_version}"
    if major >= 11:
        if calibrate:
            raise EnvironmentMismatchError(
                f"{tag} removed implicit INT8 calibration (IInt8EntropyCalibrator2), so --int8 --calib-data cannot "
                f"build here; INT8 now comes from Q/DQ nodes in the ONNX",
                hint="quantize first: `resopt quantize MODEL.onnx --target trt --calib-data DIR -o MODEL.int8.onnx`, "
                     "then `resopt build MODEL.int8.onnx`")
        if has_qdq and fp16:
            raise UsageError(f"{tag} builds a Q/DQ ONNX exactly as typed: quantized layers run INT8 and the rest keep "
                             f"the ONNX's float type, so --fp16 cannot be added to a Q/DQ model here",
                             hint="build the Q/DQ ONNX without --fp16")
        if has_qdq:
            return BuildPlan(trt_version, "int8", True, False, sparse, False,
                             f"{tag}: INT8 from the ONNX's Q/DQ nodes, strongly typed network")
        if fp16:
            return BuildPlan(trt_version, "fp16", True, True, sparse, False,
                             f"{tag}: ONNX converted to FP16 (float32 inputs/outputs, sensitive ops kept FP32), "
                             f"strongly typed network (TensorRT 11 has no FP16 builder flag)")
        return BuildPlan(trt_version, "fp32", True, False, sparse, False,
                         f"{tag}: FP32 ONNX, strongly typed network (TF32 where the GPU has it)")
    # TensorRT 10.x. BuilderFlag.FP16/INT8 are deprecated from 10.12 (strong typing replaces them) and gone in 11.
    deprecated = " (BuilderFlag.FP16/INT8 are deprecated from TensorRT 10.12)"
    if calibrate:
        flags = ("INT8", "FP16") if fp16 else ("INT8",)
        return BuildPlan(trt_version, "int8-calibrated" + ("+fp16" if fp16 else ""), False, False, flags + sparse,
                         True, f"{tag}: BuilderFlag.{' + BuilderFlag.'.join(flags)} with an entropy calibrator "
                               f"(IInt8EntropyCalibrator2, deprecated since 10.1), weakly typed network{deprecated}")
    if has_qdq and fp16:
        # Weakly typed so that TensorRT may run the unquantized layers in FP16; a weakly typed Q/DQ
        # network also needs the INT8 flag to enable its quantized layers.
        return BuildPlan(trt_version, "int8+fp16", False, False, ("INT8", "FP16") + sparse, False,
                         f"{tag}: INT8 from Q/DQ nodes plus BuilderFlag.FP16 for the unquantized layers, "
                         f"weakly typed network{deprecated}")
    if has_qdq:
        return BuildPlan(trt_version, "int8", True, False, sparse, False,
                         f"{tag}: INT8 from the ONNX's Q/DQ nodes, strongly typed network")
    if fp16:
        return BuildPlan(trt_version, "fp16", False, False, ("FP16",) + sparse, False,
                         f"{tag}: BuilderFlag.FP16 on a weakly typed network (TensorRT picks FP16 kernels "
                         f"where they are faster){deprecated}")
    return BuildPlan(trt_version, "fp32", False, False, sparse, False,
                     f"{tag}: FP32 ONNX, no precision flags (TF32 where the GPU has it)")


# ------------------------------------------------------------------------------------- calibration


def interleave_by_class(targets: Sequence[int]) -> list[int]:
    """Indices ordered round-robin over classes (first of each class, then second, ...), so that every
    calibration batch - and the dropped remainder - mixes all classes instead of holding one."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    order: list[int] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        order += [q[rank] for q in queues if rank < len(q)]
    return order


class CalibrationFeeder:
    """Calibration batches for TensorRT 10's entropy calibrator, without TensorRT.

    The images are the calibration set ``resopt quantize`` uses (``resopt.calib``: a training folder,
    dataset name or saved ``.npz``, ``num`` images class-balanced and hashed), preprocessed exactly as
    the ONNX's metadata says, in full batches of ``batch_size`` interleaved over classes. The TensorRT
    calibrator class only moves these host batches to the GPU; the cache is read and written here,
    keyed so that a cache made for another model, image set or preprocessing is ignored, not reused.
    """

    def __init__(self, data: str | Path, preprocess: Preprocess, *, batch_size: int = 32, num: int | None = None,
                 classes: Sequence[str] | None = None, seed: int = 0, cache: Path | None = None,
                 model_sha256: str = "") -> None:
        from resopt.calib import load_calib_set
        from resopt.data import check_classes

        if batch_size < 1:
            raise UsageError(f"--calib-batch must be at least 1, got {batch_size}")
        self.calib_set = load_calib_set(data, num=num, seed=seed)
        if classes:
            check_classes(classes, self.calib_set.classes, model_name="the model", data=str(data))
        self.preprocess = preprocess
        self.order = interleave_by_class(self.calib_set.labels)
        self.batch_size = batch_size
        self.num_batches = len(self.order) // batch_size
        if self.num_batches == 0:
            raise DataError(f"calibration data {data} has {len(self.order)} images, fewer than one batch of "
                            f"{batch_size}", hint="add images or lower --calib-batch")
        self.images = self.num_batches * batch_size
        self.cache = Path(cache) if cache is not None else None
        self.key = {"model_sha256": model_sha256, "calib_set_sha256": self.calib_set.sha256, "images": self.images,
                    "batch_size": batch_size, "preprocess": preprocess.to_dict()}
        self._transform: Any = None
        self._next = 0
        self.batches_served = 0
        self.cache_used = False

    def describe(self) -> dict[str, Any]:
        return {**self.calib_set.describe(), "images_used": self.images, "batch_size": self.batch_size}

    def batches(self) -> Iterator[Any]:
        """All full batches as float32 (N, C, H, W) arrays, in the interleaved order."""
        for b in range(self.num_batches):
            yield self._batch(b)

    def batch_labels(self, b: int) -> list[int]:
        return [self.calib_set.labels[i] for i in self.order[b * self.batch_size:(b + 1) * self.batch_size]]

    def _batch(self, b: int) -> Any:
        import io

        import numpy as np
        from PIL import Image

        from resopt.data import eval_transform

        if self._transform is None:
            self._transform = eval_transform(self.preprocess)
        xs = []
        for i in self.order[b * self.batch_size:(b + 1) * self.batch_size]:
            try:
                with Image.open(io.BytesIO(self.calib_set.read(i))) as im:
                    xs.append(self._transform(im.convert("RGB")).numpy())
            except (OSError, ValueError) as e:
                raise DataError(f"{self.calib_set.describe_item(i)} cannot be decoded ({type(e).__name__})") \
                    from None
        return np.stack(xs).astype(np.float32, copy=False)

    def next_batch(self) -> Any | None:
        """The next batch for ``get_batch``, or None when calibration has seen them all."""
        if self._next >= self.num_batches:
            return None
        batch = self._batch(self._next)
        self._next += 1
        self.batches_served += 1
        return batch

    def _key_path(self) -> Path:
        assert self.cache is not None
        return Path(str(self.cache) + ".json")

    def read_cache(self) -> bytes | None:
        """The cached calibration table if it was made for this model, image set and preprocessing."""
        import json

        if self.cache is None or not self.cache.exists() or self.cache.stat().st_size == 0:
            return None
        key_path = self._key_path()
        if key_path.exists():
            try:
                stored = json.loads(key_path.read_text())
            except json.JSONDecodeError:
                stored = None
            if stored != self.key:
                warn(f"calibration cache {self.cache} was made for another model, image set or preprocessing; "
                     f"recalibrating and overwriting it")
                return None
        else:
            log(f"using calibration cache {self.cache} (no {key_path.name} alongside, so it cannot be checked)")
        self.cache_used = True
        return self.cache.read_bytes()

    def write_cache(self, data: bytes) -> None:
        import json

        from resopt.artifacts import write_text_atomic

        if self.cache is None:
            return
        with atomic_output(self.cache) as tmp:
            tmp.write_bytes(bytes(data))
        write_text_atomic(self._key_path(), json.dumps(self.key, indent=2) + "\n")


def make_entropy_calibrator(trt: Any, feeder: CalibrationFeeder, *, device: str = "cuda") -> Any:
    """A ``trt.IInt8EntropyCalibrator2`` (TensorRT 10 only) that feeds ``feeder``'s batches from a ``device`` tensor.

    The bindings catch any exception raised in a Python override: one in ``get_batch`` reads as "no more
    batches" (calibration ends early and the build succeeds), one in ``write_calibration_cache`` is only
    printed. So every override keeps its first exception in ``error``, and ``_serialize_engine`` re-raises
    it once the build returns.
    """
    import torch

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._device_batch: Any = None  # referenced until the next call: TensorRT reads it asynchronously
            self.error: BaseException | None = None

        def _keep(self, e: BaseException) -> None:
            if self.error is None:
                self.error = e

        def get_batch_size(self) -> int:
            return feeder.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.error is not None:
                return None
            try:
                batch = feeder.next_batch()
                if batch is None:
                    return None
                self._device_batch = torch.from_numpy(batch).to(device).contiguous()
                return [int(self._device_batch.data_ptr())]
            except BaseException as e:  # noqa: BLE001 - kept and re-raised after the build
                self._keep(e)
                return None

        def read_calibration_cache(self) -> bytes | None:
            try:
                return feeder.read_cache()
            except BaseException as e:  # noqa: BLE001 - kept and re-raised after the build
                self._keep(e)
                return None

        def write_calibration_cache(self, cache: Any) -> None:
            try:
                feeder.write_cache(bytes(cache))
            except BaseException as e:  # noqa: BLE001 - kept and re-raised after the build
                self._keep(e)

    return _EntropyCalibrator()


def calibration_batch(calib_batch: int | None, static_batch: int | None) -> int:
    """The calibration batch size: ``--calib-batch`` (default 32) for a dynamic batch axis; an ONNX with a
    fixed batch calibrates in batches of exactly that size (TensorRT reads ``get_batch_size`` images per call
    into the network's fixed input), so another ``--calib-batch`` is refused rather than ignored."""
    if static_batch is None:
        return DEFAULT_CALIB_BATCH if calib_batch is None else calib_batch
    if calib_batch is not None and calib_batch != static_batch:
        raise UsageError(f"the ONNX input has a fixed batch of {static_batch}, so --calib-batch {calib_batch} "
                         f"cannot apply (calibration batches must be {static_batch} images)",
                         hint="drop --calib-batch, or export the model with a dynamic batch axis")
    return static_batch


# ------------------------------------------------------------------------------------------ parity


def agreement_bound(gate: str, min_agreement: float | None = None) -> float:
    """The minimum top-1 agreement (%) with the ONNX: ``--min-agreement`` or the precision's default."""
    return MIN_AGREEMENT[gate] if min_agreement is None else min_agreement


def compare_with_onnx(runner: Any, onnx_path: Path, dataset: Any, *, source: str, batch_size: int = 64) -> Parity:
    """``runner`` (the candidate) against onnxruntime on CPU (the reference) on the same labelled images."""
    from resopt.backends.ort_backend import make_session
    from resopt.data import make_loader
    from resopt.verify import compare

    session = make_session(onnx_path)
    name = session.get_inputs()[0].name
    loader = make_loader(dataset, min(batch_size, getattr(runner, "max_batch", None) or batch_size), shuffle=False)
    return compare(lambda x: session.run(None, {name: x})[0], runner.infer,
                   ((x.numpy(), y.numpy()) for x, y in loader), source=source)


# ------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildConfig:
    fp16: bool = False
    int8: bool = False
    calib_data: str | None = None
    calib_cache: Path | None = None  # None: <output>.calib.cache when calibrating
    calib_batch: int | None = None  # None: 32, or the ONNX's fixed batch
    num_calib: int | None = None  # calibration images, class-balanced (None: the whole set)
    sparsity: bool = False
    workspace: str | None = None  # as given (e.g. "4G"); ``workspace_bytes`` parses it
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    timing_cache: Path | None = None
    data: str | None = None  # images for the engine-vs-ONNX check (test split); None: calib/ set for the classes
    verify_per_class: int = 20
    min_agreement: float | None = None
    seed: int = 0

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace is None else parse_size(self.workspace)

    def validate(self) -> None:
        self.workspace_bytes  # noqa: B018 - parsing is the check
        if self.calib_batch is not None and self.calib_batch < 1:
            raise UsageError(f"--calib-batch must be at least 1, got {self.calib_batch}")
        if self.num_calib is not None and self.num_calib < 1:
            raise UsageError(f"--num-calib must be at least 1, got {self.num_calib}")
        if self.verify_per_class < 1:
            raise UsageError(f"--limit-per-class must be at least 1, got {self.verify_per_class}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 100.0:
            raise UsageError(f"--min-agreement must be a percentage in [0, 100], got {self.min_agreement}")
        if self.calib_data is not None and not self.int8:
            raise UsageError("--calib-data calibrates INT8; add --int8 (or drop --calib-data)")
        resolve_profile(min_batch=self.min_batch, opt_batch=self.opt_batch, max_batch=self.max_batch)

    def cli_options(self) -> dict[str, Any]:
        """The options as the sidecar and ``rebuild_command`` record them (CLI names, given values)."""
        return {"fp16": self.fp16, "int8": self.int8, "calib_data": self.calib_data, "sparsity": self.sparsity,
                "workspace": self.workspace, "min_batch": self.min_batch, "opt_batch": self.opt_batch,
                "max_batch": self.max_batch, "timing_cache": str(self.timing_cache) if self.timing_cache else None,
                "calib_batch": self.calib_batch if self.calib_data else None,
                "num_calib": self.num_calib if self.calib_data else None}


@dataclass(frozen=True)
class BuildResult:
    output: Path
    sidecar: Path
    precision: str
    build_path: str
    tensorrt: str
    gpu: str
    compute_capability: str
    profile: dict[str, int]
    engine_bytes: int
    onnx_bytes: int
    build_seconds: float
    verification: dict[str, Any]
    fp16_conversion: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    timing_cache: dict[str, Any] | None = None
    sparsity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"], d["sidecar"] = str(self.output), str(self.sidecar)
        return d


def _timing_cache_bytes(path: Path | None) -> bytes:
    return path.read_bytes() if path is not None and path.exists() else b""


def _serialize_engine(trt: Any, onnx_bytes: bytes, onnx_path: Path, plan: BuildPlan, spec: InputSpec,
                      profile: BatchProfile, cfg: BuildConfig, calibrator: Any,
                      cache_in: bytes) -> tuple[bytes, bytes, bool]:
    """The TensorRT part: parse, configure, build. Returns (serialized plan, serialized timing cache, whether
    the given timing cache was used)."""
    from resopt.backends.tensorrt_backend import make_logger

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and plan.trt_major < 11:
        # 11.x is always strongly typed and ignores (deprecates) the flag, so it is passed on 10.x only.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes, str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise InputFileError(f"TensorRT cannot parse {onnx_path}: {(errors or logger.errors or ['unknown error'])[0]}")
    config = builder.create_builder_config()
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if cfg.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    if spec.batch is None:
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(spec.name, *profile.shapes(spec.sample_shape))
        config.add_optimization_profile(opt_profile)
    if calibrator is not None:
        config.int8_calibrator = calibrator
        if spec.batch is None:
            # Calibration runs at one shape; TensorRT 10 needs a profile for it when the batch is dynamic.
            # With a fixed batch the feeder's batch is that batch (``calibration_batch``), so no profile.
            calib_profile = builder.create_optimization_profile()
            b = calibrator.get_batch_size()
            calib_profile.set_shape(spec.name, *((b, *spec.sample_shape),) * 3)
            config.set_calibration_profile(calib_profile)
    cache_reused = bool(cache_in)
    # ignore_mismatch=False: a cache made on another GPU or TensorRT is refused - set_timing_cache returns
    # False and leaves the config without a cache - so the build starts from an empty one instead.
    if not config.set_timing_cache(config.create_timing_cache(cache_in), False):
        if cache_in:
            warn(f"timing cache {cfg.timing_cache} was made on another GPU or TensorRT version; building without "
                 f"it and overwriting it")
        cache_reused = False
        if not config.set_timing_cache(config.create_timing_cache(b""), False):
            raise InputFileError(f"TensorRT refused an empty timing cache while building {onnx_path}")
    serialized = builder.build_serialized_network(network, config)
    error = getattr(calibrator, "error", None)
    if error is not None:  # the bindings swallowed it (see make_entropy_calibrator); the engine is not trusted
        raise error
    if serialized is None:
        raise InputFileError(f"TensorRT could not build an engine from {onnx_path}: "
                             f"{(logger.errors or ['see the TensorRT log above'])[-1]}")
    cache = config.get_timing_cache()
    return bytes(serialized), (bytes(cache.serialize()) if cache is not None else b""), cache_reused


def verification_set(cfg: BuildConfig, meta: dict[str, Any], preprocess: Preprocess,
                     onnx_path: Path) -> tuple[str, Any]:
    """The real images the engine is checked on: the test split of ``--data``, else the repository's
    calib/ set whose classes are the model's (as ``export`` does). Loaded before the build, so a missing
    set fails in a second rather than after minutes of kernel tuning."""
    from resopt.calib import default_data
    from resopt.data import check_classes, classes_of, load_eval_set

    classes = list(meta.get("classes", []))
    spec = cfg.data if cfg.data is not None else default_data(classes, meta.get("lineage", []))
    dataset = load_eval_set(spec, preprocess, split="test", per_class=cfg.verify_per_class, seed=cfg.seed)
    if classes:
        check_classes(classes, classes_of(dataset), model_name=onnx_path.name, data=spec)
    return spec, dataset


def _hardware_notes(plan: BuildPlan, here: dict[str, Any], cfg: BuildConfig,
                    sparse_info: dict[str, Any] | None) -> list[str]:
    from resopt.envinfo import parse_cc, precision_support

    support = precision_support(parse_cc(here["compute_capability"]))
    notes = [f"{here['gpu']} (compute capability {here['compute_capability']}) has no fast {key}; TensorRT may "
             f"fall back to slower kernels"
             for wanted, key in (("fp16" in plan.precision, "fp16"), ("int8" in plan.precision, "int8"),
                                 (cfg.sparsity, "sparsity_2_4")) if wanted and not support[key]]
    if sparse_info is not None and sparse_info["eligible_layers"] == 0:
        notes.append(f"--sparsity: none of the {sparse_info['layers']} Conv/Gemm layers has 2:4-sparse weights, "
                     f"so TensorRT has no sparse kernels to pick (prune to a 2:4 pattern first)")
    return notes


def _model_counts(model: Any) -> dict[str, int | None]:
    """Parameters, non-zero parameters and MACs of the source ONNX: an engine cannot be inspected layer by
    layer, so ``info`` and ``bench`` read these from the sidecar."""
    from resopt.errors import ResoptError
    from resopt.onnx_utils import onnx_macs, onnx_param_counts

    params, nonzero = onnx_param_counts(model)
    try:
        macs: int | None = int(onnx_macs(model))
    except ResoptError:  # a shape the inference cannot see through: unknown, not fatal
        macs = None
    return {"params": int(params), "nonzero_params": int(nonzero), "macs": macs}


def build_engine(onnx_path: Path, output: Path, cfg: BuildConfig) -> BuildResult:
    """ONNX -> TensorRT engine + sidecar, checked against the ONNX on real images.

    Order matters for clean failures: options and the ONNX are checked first (UsageError,
    InputFileError), then TensorRT is loaded (MissingDependencyError), then the GPU is looked for
    (EnvironmentMismatchError). Nothing is written unless the engine passes its check.
    """
    from resopt.artifacts import load_onnx
    from resopt.backends.cuda import require_cuda
    from resopt.backends.tensorrt_backend import (
        SIDECAR_FORMAT,
        SIDECAR_VERSION,
        TrtRunner,
        describe_env,
        engine_env_here,
        require_tensorrt,
    )

    onnx_path, output = Path(onnx_path), Path(output)
    require_kind(onnx_path, "onnx", hint="export a checkpoint first: resopt export MODEL.pt -o MODEL.onnx")
    check_output_path(output, onnx_path, cfg.data, cfg.calib_data, cfg.timing_cache, suffixes=(".engine", ".plan"))
    check_output_path(sidecar_path(output), onnx_path, cfg.data, cfg.calib_data, cfg.timing_cache, option="sidecar")
    if cfg.timing_cache is not None:
        check_output_path(cfg.timing_cache, onnx_path, cfg.data, cfg.calib_data, option="--timing-cache")
    cfg.validate()
    model = load_onnx(onnx_path)
    meta = read_onnx_meta(model, path=onnx_path)
    preprocess = onnx_preprocess(meta, onnx_path)
    spec = onnx_input_spec(model, onnx_path)
    profile = resolve_profile(min_batch=cfg.min_batch, opt_batch=cfg.opt_batch, max_batch=cfg.max_batch,
                              static_batch=spec.batch)
    has_qdq = onnx_quantization(model, onnx_path) == "qdq"
    calibrate = cfg.calib_data is not None
    check_request(int8=cfg.int8, calibrate=calibrate, has_qdq=has_qdq)
    if calibrate:
        calibration_batch(cfg.calib_batch, spec.batch)  # a --calib-batch the ONNX cannot take fails here

    trt = require_tensorrt()
    plan = plan_build(trt.__version__, fp16=cfg.fp16, int8=cfg.int8, calibrate=calibrate, has_qdq=has_qdq,
                      sparsity=cfg.sparsity)
    require_cuda("`resopt build`", hint="build on the machine the engine will run on (engines are GPU-specific; "
                                        "check with `resopt env`)")
    here = engine_env_here(trt.__version__)
    verify_spec, verify_images = verification_set(cfg, meta, preprocess, onnx_path)
    log(f"build path: {plan.description}")
    sparse_info = sparsity_24(model) if cfg.sparsity else None
    notes = _hardware_notes(plan, here, cfg, sparse_info)
    for n in notes:
        warn(n)

    fp16_info = None
    if plan.convert_fp16:
        converted, conversion = convert_onnx_fp16(model)
        fp16_info = conversion.to_dict()
        log(f"converted the ONNX to FP16: {conversion.fp16_nodes} nodes FP16, kept FP32: "
            f"{conversion.kept_fp32 or 'none'}, {conversion.casts} casts")
        onnx_bytes = converted.SerializeToString()
    else:
        onnx_bytes = onnx_path.read_bytes()  # the parser is given the path too, for external weights

    feeder = calibrator = None
    if calibrate:
        feeder = CalibrationFeeder(cfg.calib_data, preprocess,  # type: ignore[arg-type]
                                   batch_size=calibration_batch(cfg.calib_batch, spec.batch),
                                   num=cfg.num_calib, classes=meta.get("classes"), seed=cfg.seed,
                                   cache=cfg.calib_cache or output.with_suffix(".calib.cache"),
                                   model_sha256=sha256_file(onnx_path))
        calibrator = make_entropy_calibrator(trt, feeder)

    cache_in = _timing_cache_bytes(cfg.timing_cache)
    log(f"building {output.name} ({plan.precision}, batch {profile.min}..{profile.max} tuned for {profile.opt}) "
        f"with {describe_env(here)}")
    t0 = time.perf_counter()
    engine_bytes, cache_out, cache_reused = _serialize_engine(trt, onnx_bytes, onnx_path, plan, spec, profile, cfg,
                                                              calibrator, cache_in)
    build_seconds = time.perf_counter() - t0
    calib_info = None if feeder is None else {
        **feeder.describe(), "batches_fed": feeder.batches_served, "cache": str(feeder.cache),
        "cache_used": feeder.cache_used}

    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION,
        "built_with": here, "precision": plan.precision, "build_path": plan.description,
        "strongly_typed": plan.strongly_typed, "builder_flags": list(plan.builder_flags),
        "input": {"name": spec.name, "sample_shape": list(spec.sample_shape), "dynamic_batch": spec.batch is None},
        "profile": profile.to_dict(), "build_options": cfg.cli_options(),
        "onnx": {"file": onnx_path.name, "path": str(onnx_path), "sha256": sha256_file(onnx_path)},
        "fp16_conversion": fp16_info, "calibration": calib_info, "sparsity": sparse_info,
        "arch": meta.get("arch"), "classes": meta.get("classes", []), "preprocess": preprocess.to_dict(),
        **_model_counts(model),
    }

    runner = TrtRunner(plan=engine_bytes, sidecar=sidecar)
    try:
        parity = compare_with_onnx(runner, onnx_path, verify_images, source=verify_spec)
    finally:
        runner.close()
    log(f"engine vs ONNX on {parity.images} images: top-1 agreement {parity.top1_agreement:.2f}%, "
        f"max |diff| {parity.max_abs_diff:.4g}, top-1 {parity.top1:.2f}%")
    parity = parity.check(what=output.name, against=f"its ONNX ({plan.gate})",
                          min_agreement=agreement_bound(plan.gate, cfg.min_agreement),
                          hint="check the calibration data, try --fp16 instead of --int8, or lower --min-agreement")
    verification = {"verified": True, **parity.metrics()}

    timing_info = None
    if cfg.timing_cache is not None and cache_out:
        with atomic_output(cfg.timing_cache) as tmp:
            tmp.write_bytes(cache_out)
        timing_info = {"file": str(cfg.timing_cache), "loaded_bytes": len(cache_in), "reused": cache_reused,
                       "saved_bytes": len(cache_out)}
    sidecar["metrics"] = {**meta.get("metrics", {}), "build": verification}
    sidecar["lineage"] = list(meta.get("lineage", [])) + [lineage_entry(
        "build", options={**cfg.cli_options(), "precision": plan.precision, "build_path": plan.description},
        parent=onnx_path, metrics=verification)]
    with atomic_output(output) as tmp:
        tmp.write_bytes(engine_bytes)
    sidecar["engine"] = {"file": output.name, "bytes": len(engine_bytes), "sha256": sha256_file(output)}
    write_sidecar(output, sidecar)
    return BuildResult(output=output, sidecar=sidecar_path(output), precision=plan.precision,
                       build_path=plan.description, tensorrt=trt.__version__, gpu=here["gpu"],
                       compute_capability=here["compute_capability"], profile=profile.to_dict(),
                       engine_bytes=len(engine_bytes), onnx_bytes=onnx_path.stat().st_size,
                       build_seconds=round(build_seconds, 2), verification=verification, fp16_conversion=fp16_info,
                       calibration=calib_info, timing_cache=timing_info, sparsity=sparse_info, notes=notes)
