"""``resopt report``: the trade-off at a glance, from artifacts and ``bench --json`` files.

``build_report(inputs, ReportConfig(...))`` reads the artifacts (``.pt``, ``.onnx``, ``.engine`` through
its sidecar, or folders of them) and bench JSON documents, joins them by sha256 (a bench row and the file
it measured; a child and its parent through the lineage), marks the Pareto-optimal rows and compares each
row with its root model. ``write_report(report, out_dir)`` writes ``report.md``, ``report.html`` (one
self-contained page, the plots embedded) and ``plots/*.png`` and ``*.svg``.

Nothing is invented: an artifact without a top-1 is plotted only where it has the coordinates, and the
report says which command measures the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resopt.errors import UsageError, choice_error
from resopt.ranges import check_fields
from resopt.report.pareto import pareto_front
from resopt.report.records import Record, compare_to_root, gather_inputs, join_records, link_records, read_record

METRICS = ("top1", "top5")
METRIC_NAMES = {"top1": "top-1", "top5": "top-5"}

__all__ = ["METRICS", "Report", "ReportConfig", "build_report", "pareto_front", "write_report"]


@dataclass(frozen=True)
class ReportConfig:
    title: str = "resopt report"
    metric: str = "top1"
    device: str | None = None  # the latency coordinate; None: cpu when measured there, else the first
    batch_size: int | None = None  # None: the smallest batch size measured on that device
    # The row every other is compared with; several: one per lineage tree; none: each row's root model.
    baseline: tuple[Path, ...] = ()

    def validate(self) -> None:
        if self.metric not in METRICS:
            raise choice_error("--metric", self.metric, METRICS)
        check_fields(self)  # --batch-size against resopt.ranges


@dataclass
class Report:
    config: ReportConfig
    records: list[Record]
    device: str | None  # the chosen latency coordinate (None: no latency in the inputs)
    batch_size: int | None
    coordinates: list[tuple[str, int]]  # every (device, batch size) some bench measured
    runs: list[tuple[str, list[dict[str, Any]]]]  # training / fine-tuning curves: (label, per-epoch rows)
    notes: list[str] = field(default_factory=list)  # what is missing and the command that measures it
    warnings: list[str] = field(default_factory=list)

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES[self.config.metric]

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.config.title, "metric": self.config.metric,
                "baseline": [str(b) for b in self.config.baseline] or None,
                "latency_coordinate": {"device": self.device, "batch_size": self.batch_size},
                "coordinates": [{"device": d, "batch_size": b} for d, b in self.coordinates],
                "records": [r.to_dict() for r in self.records], "notes": self.notes, "warnings": self.warnings,
                "curves": [{"run": name, "history": rows} for name, rows in self.runs]}


def build_report(inputs: list[Path], cfg: ReportConfig, *, skip: Path | None = None) -> Report:
    """Read, join, link and compare; ``skip``: a folder not to search (the report's own output)."""
    from resopt.artifacts import sha256_file
    from resopt.console import warn

    cfg.validate()
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        warn(msg)

    artifacts, benches = gather_inputs([Path(i) for i in inputs], skip=skip)
    records = join_records(artifacts, benches, warn=_warn)
    baseline_shas: list[str] = []
    for base in (Path(b) for b in cfg.baseline):
        if not base.is_file():
            raise UsageError(f"--baseline {base} does not exist")
        sha = sha256_file(base)
        if sha not in {r.sha256 for r in records}:
            records.append(read_record(base))
        baseline_shas.append(sha)
    records = link_records(records, baseline=baseline_shas)
    coords = sorted({(c.device, c.batch_size) for r in records for c in r.latency})
    device, batch_size = _coordinate(coords, cfg)
    compare_to_root(records, metric=cfg.metric, device=device, batch_size=batch_size)
    _mark_pareto(records, cfg.metric, coords)
    return Report(config=cfg, records=records, device=device, batch_size=batch_size, coordinates=coords,
                  runs=_training_runs(records), notes=_missing_notes(records, cfg.metric, coords, report_dir=skip),
                  warnings=warnings)


def _coordinate(coords: list[tuple[str, int]], cfg: ReportConfig) -> tuple[str | None, int | None]:
    devices = list(dict.fromkeys(d for d, _ in coords))
    if not coords:
        if cfg.device is not None or cfg.batch_size is not None:
            raise UsageError("--device/--batch-size choose a latency, but no bench JSON in the inputs measured one",
                             hint="resopt bench FILES... --batch-size 1,32 --json > bench.json")
        return None, None
    device = cfg.device or ("cpu" if "cpu" in devices else devices[0])
    if device not in devices:
        raise UsageError(f"--device {device}: no bench JSON among the inputs measured it; choose one of: "
                         f"{', '.join(devices)}")
    sizes = [b for d, b in coords if d == device]
    batch_size = cfg.batch_size if cfg.batch_size is not None else min(sizes)
    if batch_size not in sizes:
        raise UsageError(f"--batch-size {batch_size}: not measured on {device}; choose one of: "
                         f"{', '.join(str(s) for s in sizes)}")
    return device, batch_size


def _mark_pareto(records: list[Record], metric: str, coords: list[tuple[str, int]]) -> None:
    """``Record.pareto``: "size" and "DEVICE bN" for each frontier the row lies on."""
    sized = [r for r in records if r.file_bytes and r.metric(metric) is not None]
    for i in pareto_front([(float(r.file_bytes or 0), float(r.metric(metric) or 0)) for r in sized]):
        sized[i].pareto.append("size")
    for device, bs in coords:
        timed = [(r, c) for r in records if r.metric(metric) is not None
                 and (c := r.latency_at(device, bs)) is not None]
        for i in pareto_front([(c.p50_ms, float(r.metric(metric) or 0)) for r, c in timed]):
            timed[i][0].pareto.append(f"{device} b{bs}")


def _training_runs(records: list[Record]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each recorded training or fine-tuning history once (descendants carry their ancestors' entries)."""
    seen: set[tuple[str, str]] = set()
    runs = []
    for r in records:
        for k, entry in enumerate(r.lineage):
            history = (entry.get("metrics") or {}).get("history")
            key = (str(entry.get("command")), str(entry.get("time")) + str((entry.get("parent") or {}).get("sha256")))
            if not history or key in seen:
                continue
            seen.add(key)
            # Name the run after the file it produced when that file is in the report, else after the first
            # descendant that carries it.
            producer = next((o for o in records if len(o.lineage) == k + 1 and o.lineage[k] == entry
                             and o.kind == "pt"), None)
            label = f"{entry.get('command')} -> {producer.name}" if producer else \
                f"{entry.get('command')} (in {r.name}'s lineage)"
            runs.append((label, [row for row in history if isinstance(row, dict)]))
    return runs


def _shown(path: str, report_dir: Path | None) -> str:
    """A file as the report names it: relative to the report's folder, so that a committed report never
    carries the absolute paths of the machine that made it (and its commands run from that folder)."""
    if report_dir is None:
        return path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(report_dir))


def _missing_notes(records: list[Record], metric: str, coords: list[tuple[str, int]], *,
                   report_dir: Path | None = None) -> list[str]:
    notes = []
    data = next((str((e.get("options") or {}).get("data")) for r in records for e in r.lineage
                 if e.get("command") in ("train", "distill") and (e.get("options") or {}).get("data")), "DATA")
    if os.path.isabs(data):
        data = _shown(data, report_dir)
    no_acc = [r for r in records if r.metric(metric) is None]
    if no_acc:
        files = " ".join(_shown(r.path, report_dir) if r.path else r.name for r in no_acc)
        notes.append(f"{METRIC_NAMES[metric]} not recorded for {', '.join(r.name for r in no_acc)} (left out of the "
                     f"accuracy plots); measure it with: resopt bench {files} --data {data} --json > bench.json")
    no_lat = [r for r in records if not r.latency]
    if no_lat and coords:
        sizes = ",".join(str(s) for s in sorted({b for _, b in coords}))
        files_lat = " ".join(_shown(r.path, report_dir) if r.path else r.name for r in no_lat)
        notes.append(f"no latency for {', '.join(r.name for r in no_lat)}; measure it with: resopt bench "
                     f"{files_lat} --batch-size {sizes} --json > bench-more.json")
    elif not coords:
        notes.append("no bench JSON among the inputs, so no latency columns or plots; measure them with: "
                     "resopt bench FILES... --batch-size 1,32 --data " + data + " --json > bench.json")
    no_lineage = [r for r in records if not r.lineage]
    if no_lineage:
        notes.append(f"known only from bench output (file not found or not written by resopt, so no lineage): "
                     f"{', '.join(r.name for r in no_lineage)}")
    return notes


def write_report(report: Report, out_dir: Path) -> list[Path]:
    """Write the plots, ``report.md`` and ``report.html`` under ``out_dir``; returns the files written."""
    from resopt.report.writers import write_all

    return write_all(report, Path(out_dir))
