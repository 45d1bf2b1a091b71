"""Small ONNX models and their latency: the measurements the latency tables and the width sweep are made of.

Every number comes from bench's worker (``resopt.bench.worker.Worker``: one fresh process per file, its own
thread pools) in rounds that interleave the files in rotated order, as ``resopt bench`` does, so load that
drifts on a shared machine hits every file alike. A file here is fed what bench feeds any runner, a
``(batch, 3, H, H)`` image batch; a piece of a network that takes another width is therefore measured behind a
1x1 "adapter" convolution (3 -> its input channels), and the adapter alone is measured too and subtracted
(``Probe.base``).

INT8 files are quantized with resopt's own static Q/DQ path (``resopt.quantize.ort``: ORT's pre-processing,
MinMax calibration, uint8 activations and per-channel int8 weights), calibrated on random images: a
convolution's speed does not depend on its ranges.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

# The runtimes a latency table or sweep can be measured on (bench's names) and the precisions each takes:
# (the file's precision, the runtime option). OpenVINO's BF16 is an inference precision of the FP32 file.
MEASURED: dict[str, dict[str, tuple[str, dict[str, str]]]] = {
    "ort": {"f32": ("f32", {}), "int8": ("int8", {})},
    "openvino": {"f32": ("f32", {"precision": "f32"}), "bf16": ("f32", {"precision": "bf16"}),
                 "int8": ("int8", {"precision": "f32"})},
}
SETTLE_SECONDS = 0.05  # as bench: let the previous worker's pool threads go to sleep


@dataclass(frozen=True)
class Timing:
    """How long each file is measured: per file, ``rounds`` chunks of at least ``iters / rounds`` batches and
    ``min_seconds / rounds`` seconds, after ``warmup`` batches (bench's meaning of the same names)."""

    rounds: int = 3
    iters: int = 12
    min_seconds: float = 0.6
    warmup: int = 3

    @classmethod
    def from_env(cls) -> Timing:
        """The defaults, or ``RESOPT_LATENCY_TIMING="rounds,iters,min_seconds"`` (the tests' fast setting)."""
        import os

        text = os.environ.get("RESOPT_LATENCY_TIMING")
        if not text:
            return cls()
        rounds, iters, seconds = text.split(",")
        return cls(rounds=int(rounds), iters=int(iters), min_seconds=float(seconds), warmup=1)


def check_measured(runtime: str, precision: str) -> tuple[str, dict[str, str]]:
    """(file precision, runner options) for ``runtime``/``precision``; a one-line UsageError otherwise."""
    if runtime not in MEASURED:
        raise UsageError(f"--runtime {runtime}: latency is measured on {' or '.join(MEASURED)} (CPU runtimes "
                         f"bench times .onnx files on); {runtime} has no latency table yet",
                         hint="use --runtime ort or --runtime openvino")
    if precision not in MEASURED[runtime]:
        raise UsageError(f"--precision {precision} does not apply to --runtime {runtime}; it takes "
                         f"{', '.join(MEASURED[runtime])}")
    if runtime == "openvino":
        from resopt.backends import BACKEND_HINTS
        from resopt.backends.openvino_backend import resolve_precision
        from resopt.envinfo import cpu_capabilities, openvino_version
        from resopt.errors import MissingDependencyError

        version, reason = openvino_version()
        if version is None:
            raise MissingDependencyError(f"--runtime openvino: {reason}", hint=BACKEND_HINTS["onnx:openvino"])
        inference = MEASURED[runtime][precision][1].get("precision", "f32")
        ran, note = resolve_precision(inference, cpu_capabilities())
        if ran != inference:
            # A table measured in another precision than asked would answer the wrong question.
            raise UsageError(f"--precision {precision} is not available on --runtime openvino here: {note}",
                             hint="use --precision f32 or int8")
    return MEASURED[runtime][precision]


def export_module(module: nn.Module, size: int, dst: Path) -> Path:
    """``module`` (fed ``(N, 3, size, size)``) as a batch-dynamic ONNX at ``dst``, cleaned like export's."""
    import onnx
    import torch

    from resopt.export import clean_onnx, stdout_to_stderr

    module = module.eval()
    buf = io.BytesIO()
    with stdout_to_stderr(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: a few hundred milliseconds per piece, where dynamo takes seconds.
        torch.onnx.export(module, (torch.zeros(1, 3, size, size),), buf, dynamo=False,  # type: ignore[arg-type]
                          opset_version=17, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, do_constant_folding=True)
    model = clean_onnx(onnx.load_from_string(buf.getvalue()))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def quantize_int8(src: Path, dst: Path, *, images: int = 8) -> Path:
    """Static Q/DQ INT8 of ``src`` with resopt's quantizer, calibrated on ``images`` random images."""
    import tempfile

    import numpy as np
    import onnx
    from PIL import Image

    from resopt.artifacts import Preprocess
    from resopt.calib import CalibSet
    from resopt.quantize.ort import calibrate, default_reduce_range, preprocess_model, static_qdq

    size = int(onnx.load(str(src), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[2].dim_value)
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    cs = CalibSet(source="random", kind="saved", classes=("random",), labels=(0,) * images, seed=0, sha256="",
                  available=images, read=encoded.__getitem__)
    pre = Preprocess(input_size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with tempfile.TemporaryDirectory(prefix="resopt-q-") as tmp:
        work = Path(tmp)
        prepped = work / "pre.onnx"
        preprocess_model(src, prepped)
        ranges = calibrate(prepped, cs, pre, method="minmax", symmetric=False, workdir=work)
        static_qdq(prepped, dst, ranges, workdir=work, reduce_range=default_reduce_range())
    return dst


def make_files(module: nn.Module, size: int, stem: Path, precision: str) -> Path:
    """``module`` exported to ``stem``.onnx, and quantized to ``stem``.int8.onnx when ``precision`` is int8."""
    fp32 = export_module(module, size, stem.with_suffix(".onnx"))
    return quantize_int8(fp32, stem.with_suffix(".int8.onnx")) if precision == "int8" else fp32


@dataclass(frozen=True)
class Row:
    """One file to time on one runtime (``options``: the runner's, e.g. OpenVINO's inference precision)."""

    path: Path
    runtime: str
    options: tuple[tuple[str, str], ...] = ()


def time_rows(rows: Sequence[Row], *, batch: int, threads: int, timing: Timing,
              on_round: Callable[[int, int], None] | None = None) -> list[float]:
    """The median milliseconds per batch of every row, measured by bench's workers in one interleaved run
    (``on_round(done, total)`` after every chunk, for a progress line)."""
    import multiprocessing

    import numpy as np

    from resopt.backends import ONNX_RUNTIMES
    from resopt.bench.worker import Worker

    ctx = multiprocessing.get_context("spawn")
    n = len(rows)
    workers: list[Worker] = []
    samples: list[list[float]] = [[] for _ in rows]
    per_iters = max(1, math.ceil(timing.iters / timing.rounds))
    per_seconds = timing.min_seconds / timing.rounds
    try:
        workers = [Worker(ctx, r.path, "cpu", threads, dict(r.options), ONNX_RUNTIMES[r.runtime]) for r in rows]
        for w in workers:
            w.receive()
        done = 0
        for rnd in range(timing.rounds):
            for k in range(n):
                i = (k + rnd) % n
                time.sleep(SETTLE_SECONDS)
                warm = timing.warmup if rnd == 0 else min(timing.warmup, 2)
                samples[i] += workers[i].request("time", batch, warm, per_iters, per_seconds)[1]
                done += 1
                if on_round is not None:
                    on_round(done, n * timing.rounds)
    finally:
        for w in workers:
            w.stop()
    return [float(np.median(s)) * 1e3 for s in samples]


def time_in_groups(rows: Sequence[Row], *, batch: int, threads: int, timing: Timing, group: int = 24,
                   what: str = "latency") -> list[float]:
    """``time_rows`` over at most ``group`` live workers at a time (each holds a runtime in memory), with a
    progress line on stderr."""
    from resopt.console import progress

    out: list[float] = []
    with progress(what, total=len(rows) * timing.rounds) as bar:
        for start in range(0, len(rows), group):
            out += time_rows(rows[start:start + group], batch=batch, threads=threads, timing=timing,
                             on_round=lambda _d, _t: bar.advance(1))
    return out


def adapter(channels: int) -> Any:
    """The 1x1 convolution that turns a 3-channel image batch into ``channels`` channels."""
    from torch import nn

    return nn.Conv2d(3, channels, 1, bias=False)
