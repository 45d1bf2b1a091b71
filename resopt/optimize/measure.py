"""How a trial's numbers are taken: latency with bench's worker under an exclusive per-host lock, val top-1
on the validation split the model's lineage records, and the host facts each trial stores.

The lock: a trial's latency is only comparable with another's when neither was timed while a second worker
on the same machine trained, fine-tuned or timed. Training may overlap (it only makes the host busier,
which the lock cannot prevent), but two latency measurements never do: every worker takes ``bench_lock``
(``fcntl.flock`` on one file per host name) around ``bench_models``, and the interval it held it is
recorded on the trial so that the claim can be checked afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def lock_path() -> Path:
    """The per-host lock file, in the host's temporary folder (``$TMPDIR``, else /tmp): every resopt optimize
    process on this machine waits for it, whatever study or DIR it works on, and workers on other machines
    (a shared DIR on a network file system included) never wait for it. ``RESOPT_BENCH_LOCK`` overrides it.
    It stays in place between runs (removing a lock file another process holds would break the lock)."""
    import tempfile

    return Path(os.environ.get("RESOPT_BENCH_LOCK") or Path(tempfile.gettempdir()) / ".resopt-bench.lock")


@contextlib.contextmanager
def bench_lock(path: Path, intervals: list[list[float]]) -> Iterator[None]:
    """Hold the exclusive lock; append ``[acquired, released]`` (wall-clock seconds) to ``intervals``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        with contextlib.suppress(OSError):  # another user's resopt on this host takes the same lock
            os.chmod(path, 0o666)
        fcntl.flock(f, fcntl.LOCK_EX)
        t0 = time.time()
        try:
            yield
        finally:
            intervals.append([t0, time.time()])
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class BenchSettings:
    batch_size: int = 32
    threads: int | None = None
    warmup: int = 5
    iters: int = 20
    min_seconds: float = 1.0
    rounds: int = 3

    def config(self, runtime: str, *, data: str | None = None, limit_per_class: int | None = None) -> Any:
        from resopt.bench import BenchConfig

        return BenchConfig(batch_sizes=(self.batch_size,), threads=self.threads, warmup=self.warmup,
                           iters=self.iters, min_seconds=self.min_seconds, rounds=self.rounds, runtimes=(runtime,),
                           data=data, limit_per_class=limit_per_class)


def measure_latency(path: Path, runtime: str, settings: BenchSettings, *, lock: Path,
                    intervals: list[list[float]]) -> dict[str, Any]:
    """p50 latency (ms) of ``path`` on ``runtime`` at the study's batch size, from one bench row."""
    from resopt.bench import bench_models

    with bench_lock(lock, intervals):
        report = bench_models([path], settings.config(runtime))
    row = report.to_dict()["models"][0]
    b = row["batches"][0]
    return {"latency_ms": float(b["p50_ms"]), "p90_ms": float(b["p90_ms"]), "spread_pct": float(b["spread_pct"]),
            "samples": int(b["samples"]), "provider": row["provider"], "threads": report.config.effective_threads}


def val_top1(path: Path, runtime: str | None, *, data: str, limit_per_class: int | None, seed: int,
             threads: int | None = None) -> tuple[float, int]:
    """top-1 (percent) and image count of ``path`` run on ``runtime`` on the validation split recorded in its
    lineage (``resopt.data.splits``): what every choice of the search is made on; never the test split."""
    import numpy as np

    from resopt.backends import open_runner
    from resopt.data import make_loader
    from resopt.data.splits import load_val_set
    from resopt.errors import InputFileError
    from resopt.kinds import read_artifact_info
    from resopt.metrics import TopK

    info = read_artifact_info(path)
    if info.preprocess is None:
        raise InputFileError(f"{path} records no preprocessing; optimize cannot measure its top-1",
                             hint="export it with `resopt export`, or stamp it with `resopt import`")
    dataset, _ = load_val_set(data, info.preprocess, lineage=info.lineage, per_class=limit_per_class, seed=seed)
    runner = open_runner(path, runtime=runtime, threads=threads)
    acc = TopK()
    try:
        batch_size = min(256, runner.max_batch or 256)
        for images, labels in make_loader(dataset, batch_size, shuffle=False, workers=0):
            logits = runner.infer(images.numpy())
            # NaN logits still yield an argmax (class 0): a file whose outputs are not finite has no top-1.
            acc.nonfinite += int((~np.isfinite(logits)).any(axis=1).sum())
            acc.update(logits, labels.numpy())
    finally:
        runner.close()
    if acc.nonfinite:
        raise InputFileError(f"{path.name}: {acc.nonfinite} of {acc.n} outputs on val are NaN or infinite; "
                             f"its top-1 is meaningless")
    d = acc.as_dict()
    return float(d["top1"]), int(d["images"])


def host_facts(threads: int | None) -> dict[str, Any]:
    """What a latency depends on besides the file: the CPU and its instruction sets, the runtimes' versions,
    the threads."""
    from resopt.envinfo import available_cores, cpu_isa, openvino_version, read_cpuinfo

    model, flags = read_cpuinfo()
    versions: dict[str, str] = {}
    from importlib import metadata

    for dist in ("onnxruntime", "openvino", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    ov = openvino_version()[0]
    if ov:
        versions["openvino"] = ov
    return {"host": platform.node(), "cpu": model or platform.processor() or platform.machine(),
            "machine": platform.machine(), "isa": sorted(k for k, v in cpu_isa(flags, platform.machine()).items() if v),
            "versions": versions, "threads": threads or available_cores(), "pid": os.getpid()}


def device_key(facts: dict[str, Any]) -> str:
    """Latencies of trials with the same key may share one front: same CPU, instruction sets, runtime
    versions and thread count."""
    key = {k: facts[k] for k in ("cpu", "machine", "isa", "versions", "threads")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
