"""The engine sidecar (``MODEL.engine.json``): how an engine was built, as a typed record."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from resopt.artifacts.files import require_regular, write_text_atomic
from resopt.artifacts.lineage import jsonable
from resopt.errors import InputFileError

# A sidecar is a few KB of JSON; reading more than this means it is not one (and bounds the read).
MAX_SIDECAR_BYTES = 16 << 20


def sidecar_path(engine: Path) -> Path:
    return Path(str(engine) + ".json")


ENGINE_SIDECAR_FORMAT = "resopt.engine"
ENGINE_SIDECAR_VERSION = 1
# What a loader cannot do without: the portability guard (built_with), the runner (profile, preprocess,
# classes) and bench's row (precision). Sidecars of every version so far carry them.
_SIDECAR_REQUIRED = ("built_with", "precision", "profile", "preprocess", "classes")


@dataclass(frozen=True)
class EngineSidecar:
    """The ``.engine.json`` sidecar: how an engine was built (TensorRT, CUDA, GPU, precision, profile), from which
    ONNX (sha256), with the ONNX's classes, preprocessing, counts, metrics and lineage.

    The fields are the JSON keys, in the order they are written. ``from_dict`` reads sidecars of every format
    version so far (fields an older resopt did not write are None, fields a newer one added are kept in
    ``extra`` and written back). ``metrics``, ``lineage`` and ``engine`` are None until the engine has passed
    its check and been written, and are left out of the JSON until then.
    """

    built_with: dict[str, Any]
    precision: str
    profile: dict[str, int]
    preprocess: dict[str, Any]
    classes: list[str]
    build_path: str | None = None
    strongly_typed: bool | None = None
    builder_flags: list[str] | None = None
    input: dict[str, Any] | None = None
    build_options: dict[str, Any] | None = None
    onnx: dict[str, Any] | None = None
    fp16_conversion: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    sparsity: dict[str, Any] | None = None
    arch: str | None = None
    params: int | None = None
    nonzero_params: int | None = None
    macs: int | None = None
    metrics: dict[str, Any] | None = None
    lineage: list[dict[str, Any]] | None = None
    engine: dict[str, Any] | None = None
    format_version: int = ENGINE_SIDECAR_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    _ORDER = ("format", "format_version", "built_with", "precision", "build_path", "strongly_typed", "builder_flags",
              "input", "profile", "build_options", "onnx", "fp16_conversion", "calibration", "sparsity", "arch",
              "classes", "preprocess", "params", "nonzero_params", "macs", "metrics", "lineage", "engine")
    _UNTIL_WRITTEN = ("metrics", "lineage", "engine")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": ENGINE_SIDECAR_FORMAT}
        for key in self._ORDER[1:]:
            value = getattr(self, key)
            if value is None and key in self._UNTIL_WRITTEN:
                continue
            d[key] = value
        return {**d, **{k: v for k, v in self.extra.items() if k not in d}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], engine: Path) -> EngineSidecar:
        """The record of a sidecar resopt wrote and can read; anything else is an InputFileError naming the
        engine (exit 3)."""
        validate_sidecar(data, engine)
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "format"}
        return cls(**known, extra=extra)


def validate_sidecar(sidecar: dict[str, Any], engine: Path) -> None:
    """A sidecar resopt wrote and can read; anything else is an InputFileError naming the engine."""
    if sidecar.get("format") != ENGINE_SIDECAR_FORMAT:
        raise InputFileError(f"sidecar of {engine} was not written by `resopt build` (no '{ENGINE_SIDECAR_FORMAT}' "
                             f"tag)", hint=f"rebuild it with `resopt build MODEL.onnx -o {engine}`")
    if int(sidecar.get("format_version", 0)) > ENGINE_SIDECAR_VERSION:
        raise InputFileError(f"sidecar of {engine} uses format {sidecar['format_version']}, newer than this resopt "
                             f"understands ({ENGINE_SIDECAR_VERSION})", hint="upgrade resopt")
    missing = [k for k in _SIDECAR_REQUIRED if k not in sidecar]
    if missing or not isinstance(sidecar.get("built_with"), dict):
        raise InputFileError(f"sidecar of {engine} lacks {', '.join(missing) or 'built_with'}",
                             hint=f"rebuild it with `resopt build MODEL.onnx -o {engine}`")


def write_sidecar(engine: Path, data: EngineSidecar | dict[str, Any]) -> None:
    if isinstance(data, EngineSidecar):
        data = data.to_dict()
    write_text_atomic(sidecar_path(engine), json.dumps(jsonable(data), indent=2) + "\n")


def read_sidecar(engine: Path) -> dict[str, Any]:
    p = sidecar_path(engine)
    if not p.exists():
        raise InputFileError(f"{engine} has no sidecar {p.name}; resopt cannot tell how it was built",
                             hint=f"rebuild it with `resopt build MODEL.onnx -o {engine}`")
    from resopt.schema import SidecarSchema, validate

    require_regular(p, "sidecar")
    with open(p, "rb") as f:
        raw = f.read(MAX_SIDECAR_BYTES + 1)
    if len(raw) > MAX_SIDECAR_BYTES:
        raise InputFileError(f"sidecar {p} is larger than {MAX_SIDECAR_BYTES >> 20} MB; not a resopt sidecar")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputFileError(f"sidecar {p} is not valid JSON") from None
    validate(SidecarSchema, data, path=p, what="sidecar")
    return data  # type: ignore[no-any-return]
