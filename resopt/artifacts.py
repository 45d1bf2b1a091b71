"""Artifact formats: the ``.pt`` checkpoint dict, lineage records, ONNX metadata, engine sidecars.

Every artifact says what produced it. A lineage is a list of entries, oldest first; each command copies
its parent's lineage and appends its own entry (command, options, parent sha256, library versions,
metrics), so ``resopt info`` can print the whole chain from any file.

Checkpoints are plain dicts of tensors and primitives so that ``torch.load(weights_only=True)`` reads
them: a file that needs the unpickler to build Python objects is refused, never executed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from resopt import __version__
from resopt.errors import InputFileError, OutputError, UsageError

CHECKPOINT_FORMAT = "resopt.checkpoint"
CHECKPOINT_VERSION = 1
META_PREFIX = "resopt."

KIND_BY_SUFFIX = {".pt": "pt", ".pth": "pt", ".onnx": "onnx", ".engine": "engine", ".plan": "engine"}
# Suffixes of PyTorch checkpoints written elsewhere: `resopt import` turns them into resopt artifacts.
FOREIGN_PT_SUFFIXES = (".th", ".ckpt", ".tar", ".pth", ".pt")
IMPORT_HINT = "bring it in with `resopt import {path} --mean R,G,B --std R,G,B --data DATA -o model.pt`"

# A sidecar is a few KB of JSON; reading more than this means it is not one (and bounds the read).
MAX_SIDECAR_BYTES = 16 << 20


# ---------------------------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it onto ``path`` only if the block succeeds.

    A failed or interrupted command (an exception, Ctrl-C, or SIGTERM, which the CLI turns into an
    exception) therefore never leaves a truncated artifact behind. A full disk is one line naming the
    output, whichever library was writing (torch.save reports it as a RuntimeError).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the artifact the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_torch_write_error(e):
            raise
        raise OutputError(f"could not write {path}: {_write_failure(e, path)}") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _is_torch_write_error(e: RuntimeError) -> bool:
    """torch.save reports a failed write (disk full, file size limit) as a RuntimeError from its zip writer."""
    text = str(e)
    return "inline_container" in text or "PytorchStreamWriter" in text or "file write failed" in text


def _write_failure(e: BaseException, path: Path) -> str:
    """Why a write failed, in words: the disk being full is the usual cause torch does not name."""
    import errno
    import shutil

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return e.strerror or "no space left"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    if free == 0:
        return "no space left on the device"
    text = (e.strerror if isinstance(e, OSError) else None) or str(e).splitlines()[-1].strip()
    return f"{text[:160]} (disk full or file size limit?)" if isinstance(e, RuntimeError) else text[:160]


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def check_output_path(output: Path, *inputs: Path | str | None, suffixes: tuple[str, ...] | None = None,
                      option: str = "output") -> Path:
    """Check an output before any work: right suffix, not a folder, not any input, in a writable folder.

    ``inputs`` are every file and data folder the command reads (outputs never have an image suffix, so one
    written inside a data folder cannot change what is read there). Returns the output path. Called by
    every command that writes, so a bad ``-o`` fails in a second rather than after the training.
    """
    output = Path(output)
    if suffixes and output.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {output} must end in {' or '.join(suffixes)}")
    if output.is_dir():
        raise UsageError(f"{option} {output} is a folder; give a file name inside it")
    if output.exists() and not output.is_file():
        raise UsageError(f"{option} {output} exists and is not a regular file")
    resolved = output.resolve()
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        src = Path(inp).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if resolved == src:
            raise UsageError(f"{option} {output} is the same file as the input {inp}; choose another {option}")
    folder = _existing_parent(resolved)
    if not folder.is_dir():
        raise UsageError(f"{option} {output}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {output}: folder {folder} is not writable")
    return output


def _existing_parent(path: Path) -> Path:
    """The nearest existing ancestor (atomic_output creates missing folders below it)."""
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def artifact_kind(path: Path) -> str:
    """``pt``, ``onnx`` or ``engine`` from the file's suffix; a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path} does not exist" + (" (a dangling link)" if path.is_symlink() else ""))
    if path.is_dir():
        raise InputFileError(f"{path} is a folder, not a model file")
    require_regular(path)
    kind = KIND_BY_SUFFIX.get(path.suffix.lower())
    if kind is None:
        raise InputFileError(
            f"{path} is not a model file resopt knows (suffix {path.suffix or 'none'!r}); "
            f"expected one of: {', '.join(sorted(KIND_BY_SUFFIX))}",
            hint=IMPORT_HINT.format(path=path) if path.suffix.lower() in FOREIGN_PT_SUFFIXES else None,
        )
    return kind


def require_regular(path: Path, what: str = "file") -> None:
    """Refuse FIFOs, devices and sockets: reading one can block forever or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise InputFileError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InputFileError(f"{what} {path} is not a regular file (a pipe, device or socket); refusing to read it")


def require_kind(path: Path, *kinds: str, hint: str | None = None) -> str:
    kind = artifact_kind(path)
    if kind not in kinds:
        raise InputFileError(f"{path} is a .{kind} file; this command takes {' or '.join('.' + k for k in kinds)}",
                             hint=hint)
    return kind


# -------------------------------------------------------------------------------------------- lineage


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact; only those already imported or cheap to find."""
    from importlib import metadata

    versions = {"resopt": __version__, "python": platform.python_version()}
    for dist, module in (("torch", "torch"), ("torchvision", "torchvision"), ("onnx", "onnx"),
                         ("onnxruntime", "onnxruntime"), ("torch-pruning", "torch_pruning"),
                         ("tensorrt", "tensorrt")):
        # A loaded module's own version names its build too (e.g. 2.15.0+cu132), which the dist lacks.
        loaded = getattr(sys.modules.get(module), "__version__", None)
        try:
            versions[dist] = str(loaded) if loaded else metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def lineage_entry(
    command: str,
    *,
    options: dict[str, Any] | None = None,
    parent: Path | None = None,
    metrics: dict[str, Any] | None = None,
    extra_parents: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """One step of an artifact's history."""
    entry: dict[str, Any] = {
        "command": command,
        "argv": list(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("resopt", "__main__.py")) else [],
        "options": _jsonable(options or {}),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "versions": library_versions(),
        "metrics": _jsonable(metrics or {}),
    }
    if parent is not None:
        entry["parent"] = {"file": Path(parent).name, "sha256": sha256_file(Path(parent))}
    for role, path in (extra_parents or {}).items():
        entry[role] = {"file": Path(path).name, "sha256": sha256_file(Path(path))}
    return entry


def _jsonable(value: Any) -> Any:
    """Options and metrics as JSON-safe primitives (paths to str, enums to values, tuples to lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return _jsonable(value.value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    try:  # numpy / torch scalars
        return value.item()
    except AttributeError:
        return str(value)


# --------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Preprocess:
    """How pixels become the model's input: recorded once at train time, read back downstream."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None  # eval-time resize before the center crop (None: no resize, 32x32 data)

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        mr, mg, mb = (float(x) for x in d["mean"])  # three values: resopt.schema validates the length
        sr, sg, sb = (float(x) for x in d["std"])
        return cls(input_size=int(d["input_size"]), mean=(mr, mg, mb), std=(sr, sg, sb), resize=d.get("resize"))


def make_checkpoint(
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    state_dict: dict[str, Any],
    classes: list[str],
    preprocess: Preprocess,
    lineage: list[dict[str, Any]],
    metrics: dict[str, Any] | None = None,
    widths: dict[str, list[int]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "state_dict": state_dict,
        "widths": widths or {},
        "metrics": _jsonable(metrics or {}),
        "lineage": lineage,
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def save_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    import torch

    with atomic_output(path) as tmp:
        torch.save(ckpt, tmp)


def torch_load_plain(path: Path, *, what: str = "PyTorch checkpoint", device: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with every failure as one ``InputFileError`` line naming ``path``."""
    import pickle

    import torch

    require_regular(path, what)
    try:
        # map_location: checkpoints saved from CUDA (legacy zip-less ones too) must load without a GPU.
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        # The restricted unpickler names the class it refused ("Unsupported global: GLOBAL x.y"); anything
        # else it rejects is not a pickle stream of a checkpoint at all.
        refused = next((ln.split("GLOBAL", 1)[1].split()[0] for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if refused is None:
            raise InputFileError(f"{path} is not a readable {what} (corrupt pickle stream)") from None
        raise InputFileError(
            f"{path} holds pickled Python objects ({refused}), not plain tensors; refusing to load it",
            hint="resopt reads only the plain checkpoints it writes (`resopt train`, `distill`, `prune`)",
        ) from None
    except Exception as e:  # zip errors, truncated files, random bytes
        raise InputFileError(f"{path} is not a readable {what} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else 'corrupt'})") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a resopt ``.pt`` with ``weights_only=True`` and check every field it carries.

    Pickled objects are refused, not executed; a field of the wrong type or out of range is an
    ``InputFileError`` naming it (see ``resopt.schema``).
    """
    from resopt.models import REGISTRY
    from resopt.schema import CheckpointSchema, validate

    path = Path(path)
    require_kind(path, "pt")
    ckpt = torch_load_plain(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputFileError(
            f"{path} was not written by resopt (no '{CHECKPOINT_FORMAT}' format tag)",
            hint=IMPORT_HINT.format(path=path),
        )
    version = ckpt.get("format_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > CHECKPOINT_VERSION:
        raise InputFileError(f"{path} uses checkpoint format {ckpt['format_version']}, newer than this "
                             f"resopt understands ({CHECKPOINT_VERSION})", hint="upgrade resopt")
    validate(CheckpointSchema, ckpt, path=path, what="checkpoint")
    _check_finite(ckpt["state_dict"], path)
    if ckpt["arch"] not in REGISTRY:
        raise InputFileError(f"checkpoint {path} has a bad field arch: unknown architecture {ckpt['arch']!r}",
                             hint="resopt info --archs lists the architectures this resopt builds")
    return ckpt


def _check_finite(state_dict: dict[str, Any], path: Path) -> None:
    """NaN or infinite weights make every later number meaningless (export parity, top-1): refuse them here."""
    import torch

    for name, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise InputFileError(f"checkpoint {path} has a bad field state_dict.{name}: {n} NaN or infinite "
                                 f"value{'s' * (n > 1)} (a diverged training?)",
                                 hint="retrain with a lower --lr, or use an earlier checkpoint")
    return


def checkpoint_preprocess(ckpt: dict[str, Any]) -> Preprocess:
    return Preprocess.from_dict(ckpt["preprocess"])


# ----------------------------------------------------------------------------------------------- ONNX


def stamp_onnx(model: Any, meta: dict[str, Any]) -> None:
    """Write ``resopt.*`` metadata_props (JSON values), replacing earlier resopt keys."""
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    for key, value in meta.items():
        model.metadata_props.add(key=META_PREFIX + key, value=json.dumps(_jsonable(value)))


def read_onnx_meta(model_or_path: Any, *, path: Path | None = None) -> dict[str, Any]:
    """The ``resopt.*`` metadata of an ONNX model (proto or path), JSON-decoded, prefix stripped, checked
    against ``resopt.schema.OnnxMetaSchema`` (``path`` names a proto's file in the error)."""
    from resopt.schema import OnnxMetaSchema, validate

    is_path = isinstance(model_or_path, (str, Path))
    model = load_onnx(model_or_path, load_weights=False) if is_path else model_or_path
    meta = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                meta[p.key[len(META_PREFIX):]] = json.loads(p.value)
            except json.JSONDecodeError:
                meta[p.key[len(META_PREFIX):]] = p.value
    where = Path(model_or_path) if is_path else (path or Path("(ONNX model)"))
    validate(OnnxMetaSchema, meta, path=where, what="ONNX metadata of")
    return meta


def load_onnx(path: Path, *, load_weights: bool = True) -> Any:
    import onnx

    path = Path(path)
    require_kind(path, "onnx")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as e:
        raise InputFileError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None


def save_onnx(model: Any, path: Path) -> None:
    import onnx

    with atomic_output(path) as tmp:
        onnx.save(model, str(tmp))


def onnx_meta_from_checkpoint(ckpt: dict[str, Any], lineage: list[dict[str, Any]]) -> dict[str, Any]:
    """The metadata an ONNX model carries from its checkpoint: enough to preprocess and to trace back."""
    return {
        "arch": ckpt["arch"],
        "classes": ckpt["classes"],
        "preprocess": ckpt["preprocess"],
        "metrics": ckpt.get("metrics", {}),
        "lineage": lineage,
    }


def onnx_preprocess(meta: dict[str, Any], path: Path) -> Preprocess:
    if "preprocess" not in meta:
        raise InputFileError(f"{path} has no resopt preprocessing metadata (was it exported by resopt?)",
                             hint=f"stamp it with `resopt import {path} --mean R,G,B --std R,G,B --classes ... "
                                  f"-o model.onnx`, or export it with `resopt export MODEL.pt`")
    return Preprocess.from_dict(meta["preprocess"])


# ------------------------------------------------------------------------------------ engine sidecars


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
    write_text_atomic(sidecar_path(engine), json.dumps(_jsonable(data), indent=2) + "\n")


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


# ------------------------------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class ArtifactInfo:
    """What ``resopt info`` and ``bench`` know about a file without running it."""

    path: Path
    kind: str
    arch: str | None
    classes: list[str]
    preprocess: Preprocess | None
    lineage: list[dict[str, Any]]
    metrics: dict[str, Any]


def read_artifact_info(path: Path) -> ArtifactInfo:
    """Classes, preprocessing, lineage and metrics of a model file, read by its kind (``resopt.kinds``)."""
    from resopt.kinds import kind_of

    path = Path(path)
    return kind_of(path).read_info(path)
