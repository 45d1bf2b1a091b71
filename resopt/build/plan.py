"""Build planning, before TensorRT is touched: the options (``BuildConfig``, ``--workspace`` sizes), the batch
profile (``resolve_profile``) and the precision path for a TensorRT version (``plan_build``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resopt.envinfo import TENSORRT_INSTALL, trt_major
from resopt.errors import EnvironmentMismatchError, MissingDependencyError, UsageError
from resopt.ranges import check_fields

DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH = 1, 64, 256


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
        check_fields(self, verify_per_class="limit_per_class")  # against resopt.ranges
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

