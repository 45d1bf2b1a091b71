"""Where latency tables live and which machine they belong to.

A table is only valid where it was measured: the file's name is a hash of its ``MachineKey`` (CPU model, its
instruction sets, runtime and version, threads, batch, precision), and the key is stored inside it too. A
file whose stored key differs from this machine's (copied from another host, another runtime version) is
never used: it is measured again and overwritten.

The folder: ``$RESOPT_CACHE_DIR/latency`` when that is set (tests point it at a temporary folder), else
``$XDG_CACHE_HOME/resopt/latency``, else ``~/.cache/resopt/latency``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Bumped when what a table row means changes (how it is measured): older files are then measured again.
FORMAT = 1


def cache_dir() -> Path:
    """The folder latency tables are cached in (see the module doc)."""
    if os.environ.get("RESOPT_CACHE_DIR"):
        return Path(os.environ["RESOPT_CACHE_DIR"]) / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "resopt" / "latency"


@dataclass(frozen=True)
class MachineKey:
    """What a latency measurement depends on besides the model."""

    cpu: str
    isa: tuple[str, ...]  # the instruction sets `resopt env` names, those present
    runtime: str
    runtime_version: str
    threads: int
    batch: int
    precision: str
    format: int = FORMAT

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """``openvino 2026.4.1 int8 on AMD EPYC (AVX-512 VNNI, ...), 2 threads, batch 32``"""
        return (f"{self.runtime} {self.runtime_version} {self.precision} on {self.cpu} ({', '.join(self.isa)}), "
                f"{self.threads} thread{'s' * (self.threads > 1)}, batch {self.batch}")

    def differences(self, other: MachineKey) -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f"{k} {theirs[k]!r} (here {mine[k]!r})" for k in mine if mine[k] != theirs[k]]


def runtime_version(runtime: str) -> str:
    if runtime == "openvino":
        from resopt.envinfo import openvino_version

        version, reason = openvino_version()
        if version is None:
            from resopt.backends import BACKEND_HINTS
            from resopt.errors import MissingDependencyError

            raise MissingDependencyError(f"--runtime openvino: {reason}", hint=BACKEND_HINTS["onnx:openvino"])
        return version
    import onnxruntime

    return str(onnxruntime.__version__)


def machine_key(runtime: str, precision: str, *, batch: int, threads: int) -> MachineKey:
    """This machine's key for ``runtime``/``precision`` at ``batch`` on ``threads`` threads."""
    import platform

    from resopt.envinfo import cpu_isa, read_cpuinfo

    model, flags = read_cpuinfo()
    isa = tuple(name for name, has in cpu_isa(flags, platform.machine()).items() if has)
    return MachineKey(cpu=model or platform.processor() or platform.machine(), isa=isa, runtime=runtime,
                      runtime_version=runtime_version(runtime), threads=threads, batch=batch, precision=precision)


def cache_path(key: MachineKey) -> Path:
    return cache_dir() / f"{key.runtime}-{key.precision}-b{key.batch}-t{key.threads}-{key.digest()}.json"


def load_cached(key: MachineKey) -> tuple[dict[str, Any], str | None]:
    """The cached rows for ``key`` (empty when there are none) and, when a file was there but is not this
    machine's (or unreadable), why it was not used."""
    path = cache_path(key)
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text())
        stored = MachineKey(**{**data["key"], "isa": tuple(data["key"]["isa"])})
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {}, f"{path} is not a latency table ({type(e).__name__}); measuring again"
    if stored != key:
        return {}, (f"{path} was measured elsewhere ({'; '.join(key.differences(stored))}); it is never used "
                    f"here: measuring again")
    return dict(data.get("rows", {})), None


def save_cached(key: MachineKey, rows: dict[str, Any]) -> Path:
    """Write ``rows`` for ``key`` atomically (another process may be reading the same file)."""
    from resopt.artifacts import atomic_output

    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps({"key": asdict(key), "rows": rows}, indent=1, sort_keys=True) + "\n")
    return path
