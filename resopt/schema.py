"""Schemas for everything resopt reads back from disk, checked at load time.

A checkpoint dict, the ``resopt.*`` metadata of an ONNX model, an engine sidecar, a saved calibration set
and a training resume state are all written by resopt, but a user (or a bad copy) can hand any of them
back with a field of the wrong type or out of range. Every loader validates against one of the models
below, so a bad field is one line naming the file and the field (``InputFileError``, exit 3) instead of
a ``TypeError`` somewhere downstream.

Only the fields resopt reads are described; others (``extra="allow"``) pass through untouched, so a newer
resopt's additions do not make an older file unreadable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from resopt.errors import InputFileError

# Input resolutions resopt can build a model for; 4096 px already needs ~200 MB per fp32 image.
MAX_INPUT_SIZE = 4096
MAX_CLASSES = 100_000

Size = Annotated[StrictInt, Field(ge=8, le=MAX_INPUT_SIZE)]  # the same range as --input-size
Name = Annotated[StrictStr, Field(min_length=1, max_length=256)]
LineageEntry = dict[str, Any]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class PreprocessSchema(_Model):
    input_size: Size
    mean: Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=3, max_length=3)]
    std: Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=3, max_length=3)]
    resize: Annotated[StrictInt, Field(ge=1, le=2 * MAX_INPUT_SIZE)] | None = None


def _check_classes(classes: list[str] | None, num_classes: int | None = None) -> None:
    if classes is None:
        return
    if len(set(classes)) != len(classes):
        raise ValueError("classes: names repeat")
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"num_classes: {num_classes} but classes lists {len(classes)} names")


Classes = Annotated[list[Name], Field(min_length=2, max_length=MAX_CLASSES)]


class CheckpointSchema(_Model):
    format: Literal["resopt.checkpoint"]
    format_version: Annotated[StrictInt, Field(ge=1)]
    arch: Name
    arch_kwargs: dict[str, Any] = {}
    num_classes: Annotated[StrictInt, Field(ge=2, le=MAX_CLASSES)]
    classes: Classes
    preprocess: PreprocessSchema
    state_dict: dict[str, Any]
    widths: dict[str, list[StrictInt]] = {}
    metrics: dict[str, Any] = {}
    lineage: list[LineageEntry] = []

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointSchema:
        _check_classes(self.classes, self.num_classes)
        bad = next((k for k, v in self.state_dict.items() if not hasattr(v, "shape")), None)
        if bad is not None:
            raise ValueError(f"state_dict.{bad}: not a tensor")
        return self


class OnnxMetaSchema(_Model):
    arch: Name | None = None
    classes: Classes | None = None
    preprocess: PreprocessSchema | None = None
    metrics: dict[str, Any] = {}
    lineage: list[LineageEntry] = []

    @model_validator(mode="after")
    def _consistent(self) -> OnnxMetaSchema:
        _check_classes(self.classes)
        return self


Count = Annotated[StrictInt, Field(ge=0)] | None


class SidecarSchema(OnnxMetaSchema):
    format: StrictStr | None = None
    format_version: StrictInt | None = None
    built_with: dict[str, Any] | None = None
    precision: StrictStr | None = None
    profile: dict[str, Any] | None = None
    input: dict[str, Any] | None = None
    build_options: dict[str, Any] = {}
    onnx: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    params: Count = None
    nonzero_params: Count = None
    macs: Count = None


class CalibMetaSchema(_Model):
    format: Literal["resopt.calibset"]
    format_version: Annotated[StrictInt, Field(ge=1)]
    classes: Classes
    source: StrictStr
    seed: StrictInt
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


class ResumeSchema(_Model):
    config: dict[str, Any]
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch: Annotated[StrictInt, Field(ge=0)]
    history: list[dict[str, Any]]
    best_top1: float
    best_top5: float
    best_epoch: Annotated[StrictInt, Field(ge=0)]
    best_state: dict[str, Any] | None
    rng_cpu: Any
    rng_loader: Any

    @model_validator(mode="after")
    def _tensors(self) -> ResumeSchema:
        for name in ("rng_cpu", "rng_loader"):
            if not hasattr(getattr(self, name), "shape"):
                raise ValueError(f"{name}: not a tensor")
        return self


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _got(value: Any) -> str:
    text = repr(value) if isinstance(value, (int, float, str, bool)) or value is None else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def validate(schema: type[_Model], data: Any, *, path: Path, what: str, hint: str | None = None) -> Any:
    """``data`` checked against ``schema``; a bad field is an ``InputFileError`` naming file and field."""
    if not isinstance(data, dict):
        raise InputFileError(f"{what} {path} is a {type(data).__name__}, not a mapping of fields", hint=hint)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc, msg = err.get("loc", ()), err.get("msg", "invalid")
        if err.get("type") == "value_error" and not loc:  # a model_validator names its own field
            text = str(err.get("ctx", {}).get("error", msg))
            raise InputFileError(f"{what} {path} has a bad field {text}", hint=hint) from None
        value = err.get("input")
        got = "" if err.get("type") == "missing" else f" (got {_got(value)})"
        raise InputFileError(f"{what} {path} has a bad field {_where(loc)}: {msg.lower()}{got}", hint=hint) \
            from None
