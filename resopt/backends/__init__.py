"""Runners: one table from artifact kind to the backend that executes it.

Every runner takes preprocessed NCHW float32 batches (numpy) and returns float32 logits, so accuracy and
timing code is written once. ``open_runner`` picks the backend by file kind and imports it lazily.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

from resopt.artifacts import artifact_kind

# kind -> (module, class). The heavy libraries are imported only by the chosen module.
BACKENDS: dict[str, tuple[str, str]] = {
    "pt": ("resopt.backends.torch_backend", "TorchRunner"),
    "onnx": ("resopt.backends.ort_backend", "OrtRunner"),
    "engine": ("resopt.backends.tensorrt_backend", "TrtRunner"),
}


class Runner:
    """Base class. Subclasses set ``kind``/``device``/``input_size`` and implement ``infer``."""

    kind: str = ""
    device: str = "cpu"
    input_size: int = 32
    provider: str = ""  # e.g. "CPUExecutionProvider", "torch eager", "TensorRT 10.3"

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

    def close(self) -> None:
        pass


def open_runner(path: Path, *, device: str = "cpu", threads: int | None = None, **kwargs: Any) -> Runner:
    kind = artifact_kind(path)
    module, cls = BACKENDS[kind]
    return getattr(importlib.import_module(module), cls)(Path(path), device=device, threads=threads, **kwargs)


def evaluate_runner(runner: Runner, dataset: Any, *, batch_size: int = 256) -> Any:
    """top-1/top-5 of ``runner`` on a torch Dataset of (image tensor, label) pairs."""
    from resopt.data import make_loader
    from resopt.metrics import TopK

    acc = TopK()
    for images, labels in make_loader(dataset, batch_size, shuffle=False):
        acc.update(runner.infer(images.numpy()), labels.numpy())
    return acc
