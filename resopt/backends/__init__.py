"""Runners: one table from artifact kind to the backend that executes it.

Every runner takes preprocessed NCHW float32 batches (numpy) and returns float32 logits, so accuracy and
timing code is written once. ``open_runner`` picks the backend by file kind and imports it lazily.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resopt.artifacts import Preprocess, artifact_kind
from resopt.envinfo import TENSORRT_INSTALL
from resopt.errors import MissingDependencyError


@dataclass(frozen=True)
class Backend:
    """One way to run a file: everything the runner registry, ``bench`` and its option checks know about it.

    ``key`` is the artifact kind it runs by default (``pt``, ``onnx``, ``engine``) or ``kind:runtime`` for a kind
    on another runtime (``onnx:openvino``). ``runtime`` is its ``bench --runtime`` name where .onnx files can be
    sent to it by name; ``cpu_only`` refuses ``--device gpu`` for it; ``precisions`` are the ``bench
    --precision`` values it can be asked for (more than f32: the runtime chooses its inference precision).
    """

    key: str
    module: str  # imported only when a file of this kind is run: the heavy library stays out of --help
    cls: str
    hint: str  # what to install when the module or its library is missing
    runtime: str | None = None
    cpu_only: bool = False
    precisions: tuple[str, ...] = ("f32",)


# The one table of backends. Adding a runtime: a Runner subclass in its own module and one entry here.
_BACKENDS = (
    Backend("pt", "resopt.backends.torch_backend", "TorchRunner", "pip install torch"),
    Backend("onnx", "resopt.backends.ort_backend", "OrtRunner",
            "pip install onnxruntime (or onnxruntime-gpu for the CUDA provider)", runtime="ort"),
    Backend("engine", "resopt.backends.tensorrt_backend", "TrtRunner", TENSORRT_INSTALL),
    Backend("onnx:openvino", "resopt.backends.openvino_backend", "OpenVinoRunner", "pip install openvino",
            runtime="openvino", cpu_only=True, precisions=("f32", "bf16")),
)
# Views of that table, derived from it: key -> (module, class); ``bench --runtime`` name -> key (runtimes for
# .onnx files); key -> install hint.
BACKENDS: dict[str, tuple[str, str]] = {b.key: (b.module, b.cls) for b in _BACKENDS}
BACKEND_RECORDS: dict[str, Backend] = {b.key: b for b in _BACKENDS}
ONNX_RUNTIMES: dict[str, str] = {b.runtime: b.key for b in _BACKENDS if b.runtime}
BACKEND_HINTS: dict[str, str] = {b.key: b.hint for b in _BACKENDS}


def runtime_record(runtime: str) -> Backend:
    """The backend a ``bench --runtime`` name stands for."""
    return BACKEND_RECORDS[ONNX_RUNTIMES[runtime]]


class Runner:
    """Base class. Subclasses set ``kind``/``device``/``input_size``/``preprocess`` and implement ``infer``."""

    kind: str = ""
    device: str = "cpu"
    input_size: int = 32
    preprocess: Preprocess | None = None
    provider: str = ""  # e.g. "CPUExecutionProvider", "torch eager", "TensorRT 10.3"
    max_batch: int | None = None  # largest batch the runner accepts (an engine's profile); None: any
    # Libraries the runner needs at run time. ``bench`` imports them before it reads a worker's baseline
    # memory, so that a model's peak memory counts the model, not the import of torch or onnxruntime.
    runtime_modules: tuple[str, ...] = ()
    # What the runtime reports about how it ran the file (precision it chose, layers in INT8, ...): bench
    # puts it into the file's row.
    details: dict[str, Any] = {}

    def __init__(self, path: Path | None = None, *, device: str = "cpu", threads: int | None = None,
                 **options: Any) -> None:
        """Subclasses load ``path`` for ``device`` (``threads``: CPU threads; ``options``: backend-specific)."""

    @classmethod
    def load_runtime(cls) -> None:
        """Load the runtime's libraries (``bench`` does it before reading a worker's baseline memory)."""
        for module in cls.runtime_modules:
            importlib.import_module(module)

    def prepare(self, batch_size: int) -> None:
        """Get ready for batches of ``batch_size`` (a runtime that compiles per shape does it here), before
        bench starts timing and its peak-memory window."""

    def infer(self, batch: Any) -> Any:  # np.ndarray (N,3,H,W) float32 -> np.ndarray (N,classes) float32
        raise NotImplementedError

    def time_batches(self, batch_size: int, *, warmup: int, iters: int, min_seconds: float = 0.0) -> list[float]:
        """Seconds per batch for ``iters`` runs (more if ``min_seconds`` is not reached) after ``warmup``.

        Host-timed on a pre-made input; GPU runners override this with CUDA-event timing on device data.
        """
        import numpy as np

        x = np.random.default_rng(0).standard_normal((batch_size, 3, self.input_size, self.input_size),
                                                     dtype=np.float32)
        for _ in range(warmup):
            self.infer(x)
        times: list[float] = []
        t_end = time.perf_counter() + min_seconds
        while len(times) < iters or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            self.infer(x)
            times.append(time.perf_counter() - t0)
        return times

    def reset_peak_device_memory(self) -> None:
        """Start a new peak-memory window on the accelerator (GPU runners); host memory is bench's job."""

    def peak_device_memory(self) -> int | None:
        """Bytes of accelerator memory at the peak since the last reset; None for CPU runners."""
        return None

    def close(self) -> None:
        pass


def runner_class(kind: str) -> type[Runner]:
    """The runner class for an artifact kind (or "kind:runtime" key of BACKENDS); a missing backend is a
    MissingDependencyError, not a traceback."""
    module, cls = BACKENDS[kind]
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as e:
        raise MissingDependencyError(f"cannot run .{kind} files: module {e.name!r} is not installed",
                                     hint=BACKEND_HINTS.get(kind)) from None


def backend_available(kind: str) -> bool:
    """Whether the backend module for ``kind`` exists, without importing it or its library."""
    from importlib.util import find_spec

    return find_spec(BACKENDS[kind][0]) is not None


def open_runner(path: Path, *, device: str = "cpu", threads: int | None = None, runtime: str | None = None,
                **kwargs: Any) -> Runner:
    """A runner for ``path`` on its kind's default backend, or for an .onnx file on ``runtime``
    (a key of ONNX_RUNTIMES)."""
    kind = artifact_kind(path)
    return runner_class(backend_key(kind, runtime))(Path(path), device=device, threads=threads, **kwargs)


def backend_key(kind: str, runtime: str | None) -> str:
    """The BACKENDS key for a file kind on ``runtime`` (None: the kind's default backend)."""
    if runtime is None:
        return kind
    if kind != "onnx":
        from resopt.errors import UsageError

        raise UsageError(f"--runtime {runtime} applies to .onnx files; .{kind} files run on their own backend")
    if runtime not in ONNX_RUNTIMES:
        from resopt.errors import choice_error

        raise choice_error("runtime", runtime, tuple(ONNX_RUNTIMES))
    return ONNX_RUNTIMES[runtime]
