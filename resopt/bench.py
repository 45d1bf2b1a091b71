"""Benchmarking: latency, throughput, size, memory and accuracy of model files, side by side.

``bench_models(paths, BenchConfig(...))`` measures every file at every batch size and returns a
``BenchReport``; the first file is the baseline of the speed-up column.

How the comparison is kept fair on a shared, noisy machine
-----------------------------------------------------------
* **One worker process per file** (``multiprocessing`` spawn). Each file gets its own PyTorch/onnxruntime
  thread pools, allocator and page cache state, so one runtime's spinning or lingering threads cannot slow
  the next, and the peak memory of a file is measurable on its own (below).
* **Interleaved rounds.** Every (file, batch size) measurement is split into ``rounds`` chunks, and the
  workers take turns, chunk by chunk, in an order rotated each round. When another job on the machine
  starts or stops halfway, every file sees it about equally, instead of the files measured last taking
  all of it. The quoted numbers are medians over all chunks' samples; the spread of the per-round medians
  is reported so a reader can tell a real difference from noise.
* **Warm-up** runs ``warmup`` batches before the first chunk of each batch size, and one or two more
  before every later chunk (the other workers have evicted this one's caches in between), and a short
  pause between workers lets the previous one's spinning threads go to sleep.
* **Enough samples:** a chunk runs at least ``iters / rounds`` batches *and* at least
  ``min_seconds / rounds`` seconds.

Peak memory is the peak resident set size of the worker while it runs batches, over its resident size
after the runtime libraries were imported and before the model was loaded: weights, the runtime's arena,
activations and workspace, not the import of torch or onnxruntime. The kernel's high-water mark is reset
(``/proc/self/clear_refs``) before each chunk, so loading-time transients (two copies of the weights while
a session is built) are not counted; where that is not available, the number is reported as unknown.
GPU runners add their own device-memory peak (``Runner.peak_device_memory``).

On the GPU (``--device gpu``) every runner times device-resident batches with CUDA events: ``.engine``
through TensorRT, ``.onnx`` through onnxruntime's CUDA provider (or its CPU provider, said so, where the
installed onnxruntime has none), and each ``.pt`` in the ``pt_variants`` it names: FP32, FP16 autocast,
channels_last, or both, one row each.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from resopt.errors import EnvironmentMismatchError, MissingDependencyError, ResoptError, UsageError
from resopt.kinds import KINDS, ModelStats

DEVICES = ("cpu", "gpu")
# How a .pt runs: eager FP32 as trained, and the usual GPU speed-ups (TorchRunner keyword arguments).
PT_VARIANTS: dict[str, dict[str, bool]] = {
    "fp32": {}, "channels-last": {"channels_last": True}, "fp16": {"fp16": True},
    "fp16-channels-last": {"fp16": True, "channels_last": True},
}
DEFAULT_PT_VARIANTS = {"cpu": ("fp32",), "gpu": ("fp32", "fp16", "fp16-channels-last")}
# Seconds between one worker's chunk and the next worker's: enough for OpenMP and onnxruntime pool threads
# to stop spin-waiting (well under a millisecond by default), negligible next to a measurement.
_SETTLE_SECONDS = 0.05


# -------------------------------------------------------------------------------------------- config


def parse_batch_sizes(text: str | int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``; a one-line UsageError naming the bad item otherwise."""
    if isinstance(text, int):
        items: list[Any] = [text]
    elif isinstance(text, (tuple, list)):
        items = list(text)
    else:
        items = [t.strip() for t in str(text).split(",")]
    sizes: list[int] = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise UsageError(f"--batch-size {text!r}: {item!r} is not a whole number; give one or a "
                             f"comma-separated list of positive integers like 1,8,32") from None
        if value < 1:
            raise UsageError(f"--batch-size {text!r}: batch sizes must be at least 1, got {value}")
        if value not in sizes:
            sizes.append(value)
    if not sizes:
        raise UsageError("--batch-size is empty; give one or a list like 1,8,32")
    return tuple(sizes)


def parse_pt_variants(text: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...] | None:
    """``"fp32,fp16"`` -> ``("fp32", "fp16")``; None stays None (the device's default)."""
    if text is None:
        return None
    return parse_choices("--pt-variants", text, tuple(PT_VARIANTS), what=".pt variant")


def parse_choices(option: str, text: str | tuple[str, ...] | list[str], allowed: tuple[str, ...], *,
                  what: str = "value") -> tuple[str, ...]:
    """``"ort,openvino"`` -> ``("ort", "openvino")``, each checked against ``allowed``, duplicates dropped."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    for item in items:
        if item not in allowed:
            raise UsageError(f"{option}: unknown {what} {item!r}; choose one or more of: {', '.join(allowed)}")
    if not items:
        raise UsageError(f"{option} is empty; choose one or more of: {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


# bench --runtime and --precision values (CPU runtimes for .onnx files; precisions OpenVINO can be told to use).
RUNTIMES = ("ort", "openvino")
PRECISIONS = ("f32", "bf16")


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    threads: int | None = None  # intra-op threads for torch and onnxruntime; None: all available cores
    warmup: int = 5
    iters: int = 20  # at least this many timed batches per (file, batch size), over all rounds
    min_seconds: float = 2.0  # and at least this much timed work per (file, batch size)
    rounds: int = 3
    device: str = "cpu"
    data: str | None = None  # --data: top-1/top-5 on its test split
    limit_per_class: int | None = None
    eval_batch_size: int = 256
    pt_variants: tuple[str, ...] | None = None  # None: DEFAULT_PT_VARIANTS[device]
    # Runtimes each .onnx file runs on, one row each (ort: onnxruntime; openvino: OpenVINO's CPU plugin), and
    # the inference precisions asked of the runtimes that choose one (OpenVINO), one row each.
    runtimes: tuple[str, ...] = ("ort",)
    precisions: tuple[str, ...] = ("f32",)

    def validate(self) -> None:
        parse_batch_sizes(self.batch_sizes)
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if self.device not in DEVICES:
            raise UsageError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        if self.iters < 1:
            raise UsageError(f"--iters must be at least 1, got {self.iters}")
        if self.min_seconds < 0:
            raise UsageError(f"--min-time must be >= 0 seconds, got {self.min_seconds}")
        if self.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, got {self.rounds}")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise UsageError(f"--limit-per-class must be at least 1, got {self.limit_per_class}")
        if self.limit_per_class is not None and self.data is None:
            raise UsageError("--limit-per-class needs --data")
        parse_choices("--runtime", self.runtimes, RUNTIMES)
        parse_choices("--precision", self.precisions, PRECISIONS)
        if "openvino" in self.runtimes and self.device != "cpu":
            raise UsageError("--runtime openvino runs on the CPU; use --device cpu")
        if set(self.precisions) != {"f32"} and "openvino" not in self.runtimes:
            raise UsageError(f"--precision {','.join(self.precisions)} applies to --runtime openvino "
                             f"(onnxruntime's CPU provider runs each file in its own precision)",
                             hint="add --runtime ort,openvino")
        fp16 = [v for v in parse_pt_variants(self.pt_variants) or () if PT_VARIANTS[v].get("fp16")]
        if fp16 and self.device != "gpu":
            raise UsageError(f"--pt-variants {fp16[0]} needs --device gpu (FP16 autocast runs on CUDA)")

    @property
    def effective_pt_variants(self) -> tuple[str, ...]:
        return parse_pt_variants(self.pt_variants) or DEFAULT_PT_VARIANTS[self.device]

    @property
    def effective_threads(self) -> int:
        return self.threads or available_cores()


# ------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LatencyStats:
    """One file at one batch size. Latencies are per batch; throughput is ``batch_size / p50``."""

    batch_size: int
    samples: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_ips: float
    round_p50_ms: tuple[float, ...]
    spread_pct: float  # (max - min) of the per-round medians, in % of the overall median
    peak_memory_bytes: int | None
    peak_device_memory_bytes: int | None = None
    speedup: float | None = None  # throughput over the first file's at this batch size
    # The same ratio within each round (p50 of the first file over this file's, both from that round):
    # neighbours in time, so a load change between rounds cancels out. Their range is the honest
    # uncertainty of ``speedup`` on a shared machine.
    speedup_rounds: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelBench:
    path: Path
    kind: str
    provider: str
    device: str
    file_bytes: int
    params: int | None
    nonzero_params: int | None
    macs: int | None  # per image (batch 1)
    input_size: int
    batches: tuple[LatencyStats, ...]
    accuracy: dict[str, float] | None = None  # top1, top5 (percent), images
    load_seconds: float = 0.0
    variant: str = ""  # a .pt's PT_VARIANTS name; "" for other files
    sha256: str = ""  # of the file measured: `resopt report` joins bench rows to artifacts by it
    runtime: str = ""  # --runtime name for .onnx rows ("ort", "openvino"); "" for other files
    details: dict[str, Any] = field(default_factory=dict)  # what the runtime says it ran (Runner.details)

    @property
    def peak_memory_bytes(self) -> int | None:
        peaks = [b.peak_memory_bytes for b in self.batches if b.peak_memory_bytes is not None]
        return max(peaks) if peaks else None

    def at(self, batch_size: int) -> LatencyStats:
        return next(b for b in self.batches if b.batch_size == batch_size)


@dataclass(frozen=True)
class BenchReport:
    config: BenchConfig
    models: tuple[ModelBench, ...]
    host: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        cfg["threads"] = self.config.effective_threads
        cfg["batch_sizes"] = list(self.config.batch_sizes)
        cfg["method"] = ("one worker process per file; each (file, batch size) split into interleaved rounds "
                         "in rotated order; medians over all samples; throughput = batch_size / p50")
        cfg["peak_memory"] = ("peak RSS of the file's worker while running batches, over its RSS after "
                              "importing the runtime and before loading the model")
        models = []
        for m in self.models:
            models.append({
                "file": str(m.path), "name": m.path.name, "sha256": m.sha256, "kind": m.kind,
                "provider": m.provider,
                "device": m.device, "file_bytes": m.file_bytes, "params": m.params,
                "nonzero_params": m.nonzero_params, "macs": m.macs, "input_size": m.input_size,
                "peak_memory_bytes": m.peak_memory_bytes, "accuracy": m.accuracy,
                "load_seconds": round(m.load_seconds, 3), "variant": m.variant, "runtime": m.runtime,
                "details": m.details,
                "batches": [{**asdict(b), "round_p50_ms": list(b.round_p50_ms),
                             "speedup_rounds": list(b.speedup_rounds)} for b in m.batches],
            })
        return {"baseline": str(self.models[0].path) if self.models else None, "config": cfg,
                "host": self.host, "models": models}


def latency_stats(batch_size: int, rounds: list[list[float]], peak_memory: int | None = None,
                  peak_device_memory: int | None = None) -> LatencyStats:
    """Percentiles over all samples of all rounds (seconds in, milliseconds out)."""
    import numpy as np

    all_s = np.asarray([t for r in rounds for t in r], dtype=np.float64)
    if all_s.size == 0:
        raise ValueError("no timing samples")
    p50, p90, p99 = (float(v) for v in np.percentile(all_s, [50, 90, 99]))
    round_p50 = [float(np.median(r)) for r in rounds if r]
    spread = (max(round_p50) - min(round_p50)) / p50 * 100.0 if p50 > 0 else 0.0
    return LatencyStats(
        batch_size=batch_size, samples=int(all_s.size), p50_ms=p50 * 1e3, p90_ms=p90 * 1e3, p99_ms=p99 * 1e3,
        mean_ms=float(all_s.mean()) * 1e3, min_ms=float(all_s.min()) * 1e3,
        throughput_ips=batch_size / p50 if p50 > 0 else math.inf,
        round_p50_ms=tuple(v * 1e3 for v in round_p50), spread_pct=spread,
        peak_memory_bytes=peak_memory, peak_device_memory_bytes=peak_device_memory)


def round_ratios(base: LatencyStats, other: LatencyStats) -> tuple[float, ...]:
    """``other``'s throughput over ``base``'s, round by round (rounds interleave the files, so round r of
    both was measured minutes apart at most)."""
    return tuple(b / o for b, o in zip(base.round_p50_ms, other.round_p50_ms, strict=False) if o > 0)


def with_speedups(models: list[ModelBench]) -> list[ModelBench]:
    """Each file's throughput over the first file's, batch size by batch size."""
    if not models:
        return models
    base = {b.batch_size: b for b in models[0].batches}
    return [replace(m, batches=tuple(replace(b, speedup=b.throughput_ips / base[b.batch_size].throughput_ips,
                                             speedup_rounds=round_ratios(base[b.batch_size], b))
                                     for b in m.batches)) for m in models]


# --------------------------------------------------------------------------------------------- host


def host_info(device: str) -> dict[str, Any]:
    import platform

    from resopt.artifacts import library_versions

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"host": platform.node(), "cpu": cpu, "cores": available_cores(),
                            "device": device, "versions": library_versions()}
    if hasattr(os, "getloadavg"):
        info["load_average"] = round(os.getloadavg()[0], 2)
    # How idle pool threads wait (PyTorch's OpenMP, and onnxruntime's pool through make_session): it
    # changes CPU timings severalfold on a busy machine, so the report says which rule applied.
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    if device == "gpu":
        import torch

        from resopt.envinfo import tensorrt_version

        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["tensorrt"] = tensorrt_version()[0]
    return info


# ----------------------------------------------------------------------------------------- preflight


@dataclass(frozen=True)
class _Planned:
    path: Path
    kind: str
    classes: list[str]
    input_size: int
    stats: ModelStats
    device: str = "cpu"  # where this file's worker runs it
    variant: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # extra runner keyword arguments
    speed_only: bool = False  # an ONNX without resopt metadata: no preprocessing to measure accuracy with
    backend: str = ""  # BACKENDS key; "" = the kind's default
    runtime: str = ""


def _bare_onnx_input_size(path: Path, batch_sizes: tuple[int, ...]) -> int:
    """The square image size of an ONNX graph's input; refuses sizes or batches the graph cannot take."""
    from resopt.artifacts import load_onnx
    from resopt.errors import InputFileError
    from resopt.importer.onnx_source import graph_input

    model = load_onnx(path, load_weights=False)
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in graph_input(model, path).type.tensor_type.shape.dim]
    if not dims[2] or dims[2] != dims[3]:
        raise InputFileError(f"{path} has no resopt metadata and its input size is not fixed and square "
                             f"({dims}); bench cannot tell what to feed it",
                             hint=f"resopt import {path} --input-size N --mean R,G,B --std R,G,B --classes ...")
    if dims[0] and any(b != dims[0] for b in batch_sizes):
        raise UsageError(f"{path} has a fixed batch size of {dims[0]}; bench it with --batch-size {dims[0]}",
                         hint=f"`resopt import {path}` makes the batch axis dynamic")
    return int(dims[2])


def _preflight(paths: list[Path], cfg: BenchConfig) -> list[_Planned]:
    """Everything that can fail fast (files, backends, device, data classes) before any worker starts."""
    from resopt.artifacts import artifact_kind, read_artifact_info
    from resopt.backends import BACKEND_HINTS, BACKENDS, ONNX_RUNTIMES, backend_available

    if not paths:
        raise UsageError("bench needs at least one model file", hint="resopt bench r20.pt r20.onnx")
    kinds = [artifact_kind(p) for p in paths]  # missing files and unknown suffixes, named
    for p, kind in zip(paths, kinds, strict=True):
        if kind == "engine" and cfg.device != "gpu":
            raise UsageError(f"{p} is a TensorRT engine, which runs only on the GPU; add --device gpu")
        if not backend_available(kind):
            raise MissingDependencyError(f"cannot bench {p}: the .{kind} backend ({BACKENDS[kind][0]}) is not "
                                         f"installed", hint=BACKEND_HINTS.get(kind))
    onnx_device = cfg.device
    openvino_precisions = _openvino_precisions(cfg) if "onnx" in kinds and "openvino" in cfg.runtimes else ()
    if cfg.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise EnvironmentMismatchError("--device gpu was asked for but no CUDA GPU is visible to PyTorch",
                                           hint="run on a GPU machine, or use --device cpu")
        if "onnx" in kinds:
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                from resopt.console import warn

                # Still measured, and labelled CPU in the table, rather than failing the whole comparison.
                warn("this onnxruntime has no CUDAExecutionProvider, so .onnx files run on the CPU provider "
                     "(pip install onnxruntime-gpu to run them on the GPU)")
                onnx_device = "cpu"
    data_classes: list[str] | None = None
    if cfg.data is not None:
        from resopt.data import classes_of, resolve_data

        data_classes = classes_of(resolve_data(cfg.data).dataset("test"))
    planned: list[_Planned] = []
    for p, kind in zip(paths, kinds, strict=True):
        info = read_artifact_info(p)
        speed_only = info.preprocess is None and kind == "onnx"
        if speed_only:
            # An ONNX made elsewhere: its speed needs only the input shape, which the graph gives.
            size = _bare_onnx_input_size(p, cfg.batch_sizes)
            from resopt.console import warn

            warn(f"{p.name} has no resopt metadata: speed only (input 3x{size}x{size} from the graph, no "
                 f"accuracy); `resopt import` it to record classes and preprocessing")
            classes: list[str] = []
        elif info.preprocess is None:
            from resopt.errors import InputFileError

            raise InputFileError(f"{p} records no preprocessing (input size, normalization); resopt cannot "
                                 f"feed it", hint="bench files written by resopt train/export/quantize/build")
        else:
            size, classes = info.preprocess.input_size, info.classes
            if data_classes is not None:
                from resopt.data import check_classes

                check_classes(info.classes, data_classes, model_name=str(p), data=str(cfg.data))
        stats = KINDS[kind].stats(p, size)
        if kind == "pt":
            planned += [_Planned(p, kind, classes, size, stats, cfg.device,
                                 v if len(cfg.effective_pt_variants) > 1 or v != "fp32" else "", PT_VARIANTS[v])
                        for v in cfg.effective_pt_variants]
        elif kind == "onnx":
            for runtime in cfg.runtimes:
                if runtime == "ort":
                    planned.append(_Planned(p, kind, classes, size, stats, onnx_device, runtime="ort",
                                            speed_only=speed_only))
                    continue
                planned += [_Planned(p, kind, classes, size, stats, "cpu", options={"precision": prec},
                                     backend=ONNX_RUNTIMES[runtime], runtime=runtime, speed_only=speed_only)
                            for prec in openvino_precisions]
        else:
            planned.append(_Planned(p, kind, classes, size, stats, cfg.device))
    return planned


def _openvino_precisions(cfg: BenchConfig) -> tuple[str, ...]:
    """The precisions OpenVINO rows run in: each asked-for one this CPU has (BF16 falls back to f32 with a
    warning where the CPU lacks it); fails with one line when OpenVINO is not installed."""
    from resopt.backends import BACKEND_HINTS
    from resopt.backends.openvino_backend import cpu_capabilities, openvino_version, resolve_precision
    from resopt.console import warn

    version, reason = openvino_version()
    if version is None:
        raise MissingDependencyError(f"--runtime openvino: {reason}", hint=BACKEND_HINTS["onnx:openvino"])
    capabilities = cpu_capabilities()
    chosen: list[str] = []
    for prec in cfg.precisions:
        ran, note = resolve_precision(prec, capabilities)
        if note:
            warn(note)
        if ran not in chosen:
            chosen.append(ran)
    return tuple(chosen)


# ---------------------------------------------------------------------------------------- the worker


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Give freed heap back to the OS so resident size reflects live memory, not glibc's free lists."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _worker_main(conn: Any, path: str, device: str, threads: int, options: dict[str, Any] | None = None,
                 backend: str = "") -> None:
    """Runs in a fresh process: open one runner, then serve timing and accuracy requests until "stop"."""
    # Before torch or onnxruntime is imported: their OpenMP pools read these once.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import traceback

    runner = None
    try:
        from resopt.artifacts import artifact_kind
        from resopt.backends import runner_class

        cls = runner_class(backend or artifact_kind(Path(path)))
        cls.load_runtime()
        import numpy  # noqa: F401  (every runner returns numpy)

        _release_free_memory()
        baseline = _proc_status("VmRSS")
        t0 = time.perf_counter()
        runner = cls(Path(path), device=device, threads=threads, **(options or {}))
        load_s = time.perf_counter() - t0
        _release_free_memory()
        conn.send(("ready", {"provider": runner.provider, "device": runner.device,
                             "input_size": runner.input_size, "load_seconds": load_s,
                             "details": dict(runner.details)}))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "time":
                _, batch, warmup, iters, min_s = msg
                runner.prepare(batch)
                can_reset = _reset_peak_rss()
                runner.reset_peak_device_memory()
                times = runner.time_batches(batch, warmup=warmup, iters=iters, min_seconds=min_s)
                hwm = _proc_status("VmHWM")
                peak = hwm - baseline if can_reset and hwm is not None and baseline is not None else None
                conn.send(("times", times, peak, runner.peak_device_memory()))
            elif msg[0] == "eval":
                _, data, per_class, eval_bs = msg
                from resopt.backends import evaluate_runner
                from resopt.data import load_eval_set

                if runner.preprocess is None:
                    raise UsageError(f"{path} records no preprocessing; cannot evaluate it")
                dataset = load_eval_set(data, runner.preprocess, per_class=per_class)
                conn.send(("accuracy", evaluate_runner(runner, dataset, batch_size=eval_bs).as_dict()))
    except ResoptError as e:
        conn.send(("error", type(e).__name__, e.message, e.hint))
    except BaseException:  # a bug or a runtime failure: hand the traceback to the parent to show
        conn.send(("crash", traceback.format_exc()))
    finally:
        if runner is not None:
            runner.close()
        conn.close()


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, ctx: Any, path: Path, device: str, threads: int, options: dict[str, Any] | None = None,
                 backend: str = "") -> None:
        self.path = path
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, str(path), device, threads, options, backend),
                                daemon=True,
                                name=f"resopt-bench-{path.name}")
        self.proc.start()
        child.close()

    def request(self, *msg: Any) -> tuple[Any, ...]:
        self.conn.send(msg)
        return self.receive()

    def receive(self) -> tuple[Any, ...]:
        try:
            reply = self.conn.recv()
        except (EOFError, ConnectionResetError):
            self.proc.join(5)
            code = self.proc.exitcode
            why = " (killed: out of memory?)" if code in (-9, 137) else ""
            raise ResoptError(f"the benchmark worker for {self.path} died with exit code {code}{why}",
                              hint="run it alone with a smaller --batch-size") from None
        if reply[0] == "error":
            import resopt.errors as errors

            cls = getattr(errors, reply[1], ResoptError)
            raise (cls if isinstance(cls, type) and issubclass(cls, ResoptError) else ResoptError)(
                reply[2], hint=reply[3])
        if reply[0] == "crash":
            raise RuntimeError(f"benchmark worker for {self.path} failed:\n{reply[1]}")
        return reply

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("stop",))
            self.proc.join(10)
        except (OSError, BrokenPipeError):
            pass
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


# ------------------------------------------------------------------------------------------- bench


def bench_models(paths: list[Path], cfg: BenchConfig) -> BenchReport:
    """Measure every file at every batch size (and its accuracy with ``cfg.data``); see the module doc."""
    import multiprocessing

    from resopt.artifacts import sha256_file
    from resopt.console import log, progress

    cfg = replace(cfg, batch_sizes=parse_batch_sizes(cfg.batch_sizes))
    cfg.validate()
    paths = [Path(p) for p in paths]
    planned = _preflight(paths, cfg)
    threads = cfg.effective_threads
    n = len(planned)
    # The 1-minute load average before and after: on a shared machine, the first thing to look at when
    # numbers look off (a load above the core count means the files competed with other work).
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    # spawn, not fork: a forked child would inherit the parent's torch thread pools (and CUDA state), which
    # is exactly what one process per file is meant to avoid.
    ctx = multiprocessing.get_context("spawn")
    log(f"bench: {n} file{'s' * (n > 1)}, batch sizes {','.join(map(str, cfg.batch_sizes))}, {threads} "
        f"thread{'s' * (threads > 1)}, device {cfg.device}; one worker process per file, {cfg.rounds} "
        f"interleaved round{'s' * (cfg.rounds > 1)}")
    workers: list[_Worker] = []
    try:
        workers = [_Worker(ctx, p.path, p.device, threads, p.options, p.backend) for p in planned]
        ready = [w.receive()[1] for w in workers]  # all load at once; timing starts when every one is ready
        per_chunk_iters = max(1, math.ceil(cfg.iters / cfg.rounds))
        per_chunk_seconds = cfg.min_seconds / cfg.rounds
        rewarm = min(cfg.warmup, 2)
        samples: dict[tuple[int, int], list[list[float]]] = {}
        peaks: dict[tuple[int, int], list[int]] = {}
        device_peaks: dict[tuple[int, int], list[int]] = {}
        with progress("bench", total=len(cfg.batch_sizes) * cfg.rounds * n) as bar:
            for batch in cfg.batch_sizes:
                for r in range(cfg.rounds):
                    for k in range(n):
                        i = (k + r) % n  # rotate the order so no file always runs right after the same one
                        time.sleep(_SETTLE_SECONDS)
                        _, times, peak, dev_peak = workers[i].request(
                            "time", batch, cfg.warmup if r == 0 else rewarm, per_chunk_iters, per_chunk_seconds)
                        samples.setdefault((i, batch), []).append(times)
                        if peak is not None:
                            peaks.setdefault((i, batch), []).append(peak)
                        if dev_peak is not None:
                            device_peaks.setdefault((i, batch), []).append(dev_peak)
                        bar.advance(1, file=planned[i].path.name, batch=batch)
        accuracy: list[dict[str, float] | None] = [None] * n
        if cfg.data is not None:
            with progress("accuracy", total=n) as bar:
                for i, w in enumerate(workers):
                    if planned[i].speed_only:
                        bar.advance(1)
                        continue
                    log(f"bench: top-1/top-5 of {planned[i].path.name} on {cfg.data}")
                    accuracy[i] = w.request("eval", cfg.data, cfg.limit_per_class, cfg.eval_batch_size)[1]
                    bad = (accuracy[i] or {}).get("nonfinite_outputs")
                    if bad:
                        from resopt.console import warn

                        warn(f"{planned[i].path.name}: {bad} of {accuracy[i]['images']} outputs are NaN or "  # type: ignore
                             f"infinite (NaN weights?); its top-1 is meaningless")
                    bar.advance(1)
    finally:
        for w in workers:
            w.stop()

    # One file can be several rows (runtimes, precisions, .pt variants): hash each file once.
    hashes = {p.path: sha256_file(p.path) for p in planned}
    models = []
    for i, p in enumerate(planned):
        batches = tuple(
            latency_stats(b, samples[(i, b)], max(peaks[(i, b)]) if (i, b) in peaks else None,
                          max(device_peaks[(i, b)]) if (i, b) in device_peaks else None)
            for b in cfg.batch_sizes)
        models.append(ModelBench(
            path=p.path, kind=p.kind, provider=ready[i]["provider"], device=ready[i]["device"],
            file_bytes=p.path.stat().st_size, params=p.stats.params, nonzero_params=p.stats.nonzero_params,
            macs=p.stats.macs, input_size=int(ready[i]["input_size"]), batches=batches, accuracy=accuracy[i],
            load_seconds=float(ready[i]["load_seconds"]), variant=p.variant, runtime=p.runtime,
            sha256=hashes[p.path], details=ready[i].get("details") or {}))
    host = host_info(cfg.device)
    host["load_average"] = {"before": load_before, "after": host.pop("load_average", None)}
    return BenchReport(config=cfg, models=tuple(with_speedups(models)), host=host)
