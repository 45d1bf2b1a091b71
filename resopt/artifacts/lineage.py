"""Lineage: the entry every command appends (command, options, parent sha256, library versions, metrics)."""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from pathlib import Path
from typing import Any

from resopt import __version__
from resopt.artifacts.files import sha256_file


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
        "options": jsonable(options or {}),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "versions": library_versions(),
        "metrics": jsonable(metrics or {}),
    }
    if parent is not None:
        entry["parent"] = {"file": Path(parent).name, "sha256": sha256_file(Path(parent))}
    for role, path in (extra_parents or {}).items():
        entry[role] = {"file": Path(path).name, "sha256": sha256_file(Path(path))}
    return entry


def jsonable(value: Any) -> Any:
    """Options and metrics as JSON-safe primitives (paths to str, enums to values, tuples to lists)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return jsonable(value.value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    try:  # numpy / torch scalars
        return value.item()
    except AttributeError:
        return str(value)
