"""``bench`` results: per-batch latency statistics, one ``ModelBench`` per row, the ``BenchReport``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from resopt.bench.config import BenchConfig


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
    accuracy: dict[str, Any] | None = None  # top1, top5 (percent), images, split (test)
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
