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

The package: ``config`` (options), ``plan`` (the preflight and host facts), ``worker`` (the worker process),
``results`` (statistics and the report); this module runs the interleaved rounds. The tables are rendered by
the CLI (``resopt.cli.bench``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from resopt.bench.config import (
    DEFAULT_PT_VARIANTS,
    DEVICES,
    PRECISIONS,
    PT_VARIANTS,
    RUNTIMES,
    BenchConfig,
    parse_batch_sizes,
    parse_choices,
    parse_pt_variants,
)
from resopt.bench.plan import Planned, host_info, preflight
from resopt.bench.results import BenchReport, LatencyStats, ModelBench, latency_stats, round_ratios, with_speedups
from resopt.bench.worker import Worker

__all__ = [
    "DEFAULT_PT_VARIANTS", "DEVICES", "PRECISIONS", "PT_VARIANTS", "RUNTIMES", "BenchConfig", "BenchReport",
    "LatencyStats", "ModelBench", "bench_models", "host_info", "latency_stats",
    "parse_batch_sizes", "parse_choices", "parse_pt_variants", "preflight", "round_ratios", "with_speedups",
]

# Seconds between one worker's chunk and the next worker's: enough for OpenMP and onnxruntime pool threads
# to stop spin-waiting (well under a millisecond by default), negligible next to a measurement.
SETTLE_SECONDS = 0.05


def measure_accuracy(planned: list[Planned], workers: list[Worker], data: str, cfg: BenchConfig,
                     ) -> list[dict[str, Any] | None]:
    """top-1/top-5 of every row on the test split of ``data``. The images are decoded here, once per
    preprocessing (every file resopt derives from one parent shares it), and each batch goes to every worker
    that takes it: N files cost one decode, and no worker imports torch only to read images."""
    import numpy as np

    from resopt.console import log, progress, warn
    from resopt.data import load_eval_set, make_loader
    from resopt.metrics import TopK

    accuracy: list[dict[str, Any] | None] = [None] * len(planned)
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(planned):
        if row.preprocess is not None:
            groups.setdefault(row.preprocess, []).append(i)
    for pre, rows in groups.items():
        names = ", ".join(dict.fromkeys(planned[i].path.name for i in rows))
        log(f"bench: top-1/top-5 of {names} on {data}")
        dataset = load_eval_set(data, pre, per_class=cfg.limit_per_class)
        counts = {i: TopK() for i in rows}
        loader = make_loader(dataset, cfg.eval_batch_size, shuffle=False, workers=0)
        with progress("accuracy", total=len(loader) * len(rows)) as bar:
            for images, labels in loader:
                batch, truth = images.numpy(), labels.numpy()
                for i in rows:
                    logits = workers[i].request("infer", batch)[1]
                    # NaN logits still yield an argmax (class 0): count them so top-1 is not taken at face value.
                    counts[i].nonfinite += int((~np.isfinite(logits)).any(axis=1).sum())
                    counts[i].update(logits, truth)
                    bar.advance(1)
        for i in rows:
            # bench reports: the test split, which nothing resopt chooses is chosen on.
            accuracy[i] = {**counts[i].as_dict(), "split": "test"}
            if counts[i].nonfinite:
                warn(f"{planned[i].path.name}: {counts[i].nonfinite} of {counts[i].n} outputs are NaN or "
                     f"infinite (NaN weights?); its top-1 is meaningless")
    return accuracy


def bench_models(paths: list[Path], cfg: BenchConfig) -> BenchReport:
    """Measure every file at every batch size (and its accuracy with ``cfg.data``); see the module doc."""
    import multiprocessing

    from resopt.artifacts import sha256_file
    from resopt.console import log, progress

    cfg = replace(cfg, batch_sizes=parse_batch_sizes(cfg.batch_sizes))
    cfg.validate()
    paths = [Path(p) for p in paths]
    planned = preflight(paths, cfg)
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
    workers: list[Worker] = []
    try:
        workers = [Worker(ctx, p.path, p.device, threads, p.options, p.backend) for p in planned]
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
                        time.sleep(SETTLE_SECONDS)
                        _, times, peak, dev_peak = workers[i].request(
                            "time", batch, cfg.warmup if r == 0 else rewarm, per_chunk_iters, per_chunk_seconds)
                        samples.setdefault((i, batch), []).append(times)
                        if peak is not None:
                            peaks.setdefault((i, batch), []).append(peak)
                        if dev_peak is not None:
                            device_peaks.setdefault((i, batch), []).append(dev_peak)
                        bar.advance(1, file=planned[i].path.name, batch=batch)
        accuracy: list[dict[str, Any] | None] = [None] * n
        if cfg.data is not None:
            accuracy = measure_accuracy(planned, workers, cfg.data, cfg)
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
