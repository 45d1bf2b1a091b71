"""Gather artifacts and ``bench --json`` files and join them into one record per artifact.

The join key is the sha256 of the file's bytes: a bench row names the hash of the file it measured, and
every lineage entry names the hash of its parent, so a renamed or copied file still joins, and a file
rewritten after it was benchmarked does not pick up numbers that are no longer its own.

Artifacts are read with ``resopt.info.describe_model`` (the reader behind ``resopt info``); bench rows
are the documents ``resopt bench --json`` prints. Nothing here invents a number: a field that no input
recorded stays ``None``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from resopt.artifacts import KIND_BY_SUFFIX, sha256_file
from resopt.data.splits import split_of
from resopt.errors import InputFileError

TECHNIQUES = ("baseline", "pruned", "distilled", "quantized", "combined")
# The lineage commands that change what a model is; export and a plain FP32 build only change its format.
_TECHNIQUE_OF_COMMAND = {"prune": "pruned", "distill": "distilled", "quantize": "quantized"}
# The options worth naming in the "made by" column and on the lineage tree's edges, per command.
_STEP_OPTIONS: dict[str, tuple[str, ...]] = {
    "train": ("arch", "width", "epochs"),
    "distill": ("student", "width", "epochs", "alpha", "temperature"),
    "prune": ("method", "sparsity", "target_macs", "global", "iterative", "steps", "layer_ratios", "finetune_epochs"),
    "export": ("opset",),
    # Every quantize mode's ``Mode.label`` keys: ``resopt.quantize.modes.lineage_keys("label")``, which this
    # layer may not import (ARCHITECTURE.md); tests/test_quantize_options.py fails until the two are equal.
    "quantize": ("mode", "bits", "calib_method", "qat_epochs", "clusters"),
    "build": ("precision",),
}


@dataclass(frozen=True)
class Latency:
    """One bench cell: a file at one batch size on one device (latency per batch, p50)."""

    device: str
    batch_size: int
    p50_ms: float
    p90_ms: float
    throughput_ips: float
    provider: str
    variant: str
    bench_file: str


@dataclass(frozen=True)
class BenchRow:
    """One model entry of a ``bench --json`` document, with where it came from."""

    bench_file: Path
    file: str
    name: str
    sha256: str | None
    data: dict[str, Any]
    accuracy_data: str | None  # the --data it was evaluated on


@dataclass
class Record:
    """Everything the report knows about one artifact; ``None`` where no input recorded it."""

    name: str
    sha256: str
    path: str | None
    kind: str
    format: str | None
    arch: str | None
    file_bytes: int | None
    params: int | None
    nonzero_params: int | None
    macs: int | None
    lineage: list[dict[str, Any]] = field(default_factory=list)
    top1: float | None = None
    top5: float | None = None
    accuracy_source: str | None = None  # "bench --data X, test" or "lineage: COMMAND, SPLIT"
    latency: list[Latency] = field(default_factory=list)
    technique: str = "baseline"
    step: str = "?"
    parent: str | None = None  # sha256 of the nearest ancestor among the records
    edge: str = ""  # the commands from that ancestor to this file
    root: str = ""  # sha256 of the record it is compared with
    depth: int = 0
    pareto: list[str] = field(default_factory=list)  # the plots on whose frontier it lies
    vs_root: dict[str, float | None] = field(default_factory=dict)
    runtime: str | None = None  # how bench ran it ("ort", "openvino bf16", "torch fp16"); None: not benched
    same_file_as: str | None = None  # a second runtime of a file: the sha256 of the file's first row

    def latency_at(self, device: str, batch_size: int) -> Latency | None:
        """The default variant's cell (a .pt's first variant, fp32 unless bench was told otherwise)."""
        return next((c for c in self.latency if c.device == device and c.batch_size == batch_size), None)

    def metric(self, name: str) -> float | None:
        return self.top1 if name == "top1" else self.top5

    @property
    def accuracy_split(self) -> str | None:
        """test, val or "split unknown": what ``top1``/``top5`` were measured on."""
        return self.accuracy_source.rsplit(", ", 1)[-1] if self.accuracy_source and ", " in self.accuracy_source \
            else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "sha256": self.sha256, "kind": self.kind, "format": self.format,
            "arch": self.arch, "technique": self.technique, "step": self.step, "parent_sha256": self.parent,
            "edge": self.edge, "root_sha256": self.root, "depth": self.depth, "file_bytes": self.file_bytes,
            "params": self.params, "nonzero_params": self.nonzero_params, "macs": self.macs, "top1": self.top1,
            "top5": self.top5, "accuracy_source": self.accuracy_source, "accuracy_split": self.accuracy_split,
            "latency": [c.__dict__ for c in self.latency], "pareto": self.pareto, "vs_root": self.vs_root,
            "lineage_commands": [str(e.get("command", "?")) for e in self.lineage],
            "runtime": self.runtime, "same_file_as": self.same_file_as,
        }


# ------------------------------------------------------------------------------------------- inputs


def _is_sidecar(path: Path) -> bool:
    """An engine's JSON sidecar (``x.engine.json``): read through its engine, not as bench output."""
    return path.suffix.lower() == ".json" and Path(path.stem).suffix.lower() in (".engine", ".plan")


def gather_inputs(inputs: list[Path], *, skip: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Split INPUTS into artifact files and bench JSON files; folders are searched recursively.

    A file named on the command line must be one of the two (or it is an error); inside a folder, files
    of other kinds (logs, resume states, sidecars, the report's own output) are passed over.
    """
    artifacts: list[Path] = []
    benches: list[Path] = []
    for inp in inputs:
        inp = Path(inp)
        if not inp.exists():
            raise InputFileError(f"{inp} does not exist")
        if inp.is_dir():
            # The report's own folder inside an input folder is not searched (-o runs/report with runs/);
            # -o runs itself writes only .md, .html, .png and .svg there, which are never inputs.
            own = skip.resolve() if skip is not None and skip.resolve() != inp.resolve() else None
            for f in sorted(inp.rglob("*")):
                if not f.is_file() or f.name.startswith(".") or (own is not None and own in f.resolve().parents):
                    continue
                if f.suffix.lower() in KIND_BY_SUFFIX:
                    artifacts.append(f)
                elif f.suffix.lower() == ".json" and not _is_sidecar(f) and _looks_like_bench(f):
                    benches.append(f)
            continue
        if inp.suffix.lower() == ".json" and not _is_sidecar(inp):
            benches.append(inp)
        elif _is_sidecar(inp):
            artifacts.append(inp.with_suffix(""))
        else:
            artifacts.append(inp)  # describe_model names an unknown suffix in its error
    if not artifacts and not benches:
        raise InputFileError(f"no model files (.pt, .onnx, .engine) or bench JSON found in "
                             f"{', '.join(str(i) for i in inputs)}",
                             hint="resopt report runs/ (a folder of artifacts) runs/bench.json")
    def unique(paths: list[Path]) -> list[Path]:  # a file named and also found in a named folder: once
        out, seen = [], set()
        for p in paths:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                out.append(p)
        return out

    return unique(artifacts), unique(benches)


def _looks_like_bench(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("models"), list) and isinstance(doc.get("config"), dict)


def read_bench_json(path: Path) -> list[BenchRow]:
    """The model rows of a ``resopt bench --json`` document; a one-line error for anything else."""
    path = Path(path)
    hint = "write one with: resopt bench MODEL... --json > bench.json"
    try:
        doc = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise InputFileError(f"{path} is not a JSON file (not UTF-8 text)", hint=hint) from None
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})", hint=hint) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not isinstance(doc.get("config"), dict):
        raise InputFileError(f"{path} is not `resopt bench --json` output (no 'config' and 'models')", hint=hint)
    rows = []
    data = doc["config"].get("data")
    for i, m in enumerate(doc["models"]):
        if not isinstance(m, dict) or "file" not in m or not isinstance(m.get("batches"), list):
            raise InputFileError(f"{path}: model entry {i} is not a bench row (no 'file' and 'batches')", hint=hint)
        rows.append(BenchRow(path, str(m["file"]), str(m.get("name") or Path(m["file"]).name), m.get("sha256"), m,
                             data))
    return rows


# ------------------------------------------------------------------------------------------- records


def read_record(path: Path) -> Record:
    """One artifact as ``resopt info`` sees it; a file without resopt's metadata is refused."""
    from resopt.info import describe_model

    info = describe_model(path)  # .pt not written by resopt, corrupt files: one-line InputFileError
    if info.kind == "onnx" and not info.details.get("resopt_metadata"):
        raise InputFileError(f"{path} has no resopt metadata (not written by `resopt export` or `quantize`), so "
                             f"its lineage is unknown",
                             hint="pass its `resopt bench --json` output instead, or export it with resopt")
    rec = Record(name=path.name, sha256=info.sha256, path=str(path), kind=info.kind, format=info.format,
                 arch=info.arch, file_bytes=info.file_size, params=info.params, nonzero_params=info.nonzero_params,
                 macs=info.macs, lineage=list(info.lineage))
    last = (rec.lineage[-1].get("metrics") or {}) if rec.lineage else {}
    if last.get("top1") is not None:
        rec.top1, rec.top5 = float(last["top1"]), _float(last.get("top5"))
        rec.accuracy_source = f"lineage: {rec.lineage[-1].get('command', '?')}, {split_of(last)}"
    return rec


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def _record_from_bench(row: BenchRow) -> Record:
    m = row.data
    return Record(name=row.name, sha256=row.sha256 or f"unhashed:{row.file}", path=None, kind=str(m.get("kind", "?")),
                  format=None, arch=None, file_bytes=m.get("file_bytes"), params=m.get("params"),
                  nonzero_params=m.get("nonzero_params"), macs=m.get("macs"))


def _resolve_bench_file(row: BenchRow) -> Path | None:
    """The file a bench row measured, as given to bench (relative to where it ran, or to the JSON)."""
    for cand in (Path(row.file), row.bench_file.parent / row.file, row.bench_file.parent / Path(row.file).name):
        if cand.is_file():
            return cand
    return None


def runtime_label(m: dict[str, Any]) -> str:
    """How a bench row ran its file: the runtime, then a precision other than f32 and the variant."""
    details = m.get("details") or {}
    parts = [str(m.get("runtime") or m.get("kind") or "?")]
    precision = details.get("precision")
    if precision and precision != "f32":
        parts.append(str(precision))
    if m.get("variant"):
        parts.append(str(m["variant"]))
    return " ".join(parts)


def join_records(artifacts: list[Path], bench_files: list[Path], *, warn: Any = None) -> list[Record]:
    """One record per distinct file (by sha256), with every bench row that measured it attached.

    A file benched on several runtimes (``--runtime ort,openvino``, ``--precision f32,bf16``, the .pt
    variants) is a different deployment point on each: the first runtime stays on the file's record, every
    other one becomes a row of its own (``r56.int8.onnx @ openvino``) linked to it, with its own latency and
    accuracy.
    """
    warn = warn or (lambda _msg: None)
    records: dict[str, Record] = {}
    for path in artifacts:
        rec = read_record(path)
        records.setdefault(rec.sha256, rec)  # the same bytes under two names: one point, the first name
    for bench_file in bench_files:
        for row in read_bench_json(bench_file):
            sha = row.sha256
            if sha is None or sha not in records:
                on_disk = _resolve_bench_file(row)
                if on_disk is not None:
                    disk_sha = sha256_file(on_disk)
                    if sha is None:  # bench JSON from before bench recorded hashes: the file as it is now
                        sha = disk_sha
                    if sha == disk_sha and sha not in records:
                        try:
                            records[sha] = read_record(on_disk)
                        except InputFileError as e:
                            warn(f"{on_disk}: {e.message}; using the bench numbers alone")
                    elif sha != disk_sha:
                        warn(f"{bench_file.name}: {row.name} was measured as a different version of {on_disk} "
                             f"(sha256 {sha[:12]} there, {disk_sha[:12]} now); its numbers are kept apart")
            key = sha or f"unhashed:{row.file}"
            if key not in records:
                records[key] = _record_from_bench(BenchRow(row.bench_file, row.file, row.name, sha, row.data,
                                                           row.accuracy_data))
            rec = records[key]
            label = runtime_label(row.data)
            if rec.runtime is not None and rec.runtime != label:
                alt_key = f"{key}@{label}"
                if alt_key not in records:
                    records[alt_key] = replace(rec, name=f"{rec.name} @ {label}", sha256=alt_key, latency=[],
                                               top1=None, top5=None, accuracy_source=None, pareto=[],
                                               vs_root={}, runtime=label, same_file_as=key)
                rec = records[alt_key]
            rec.runtime = label
            _attach(rec, row)
    for rec in list(records.values()):  # name the first runtime too where a file has several
        if rec.same_file_as is not None:
            base = records[rec.same_file_as]
            if "@" not in base.name:
                base.name = f"{base.name} @ {base.runtime}"
    return list(records.values())


def _attach(rec: Record, row: BenchRow) -> None:
    m = row.data
    for attr in ("params", "nonzero_params", "macs", "file_bytes"):
        if getattr(rec, attr) is None and m.get(attr) is not None:
            setattr(rec, attr, m[attr])
    acc = m.get("accuracy")
    # A measurement on --data beats a number the producing command recorded on its own eval split.
    if acc and acc.get("top1") is not None and (rec.accuracy_source is None or
                                                 rec.accuracy_source.startswith("lineage")):
        rec.top1, rec.top5 = float(acc["top1"]), _float(acc.get("top5"))
        rec.accuracy_source = f"bench --data {row.accuracy_data}, {acc.get('split', 'test')}"
    device = str(m.get("device", "cpu"))
    device = "gpu" if device.startswith(("cuda", "gpu")) else "cpu" if device.startswith("cpu") else device
    for b in m["batches"]:
        bs = int(b["batch_size"])
        if rec.latency_at(device, bs) is not None:  # another .pt variant, or a second bench of the same file
            continue
        rec.latency.append(Latency(device=device, batch_size=bs, p50_ms=float(b["p50_ms"]),
                                   p90_ms=float(b.get("p90_ms", b["p50_ms"])),
                                   throughput_ips=float(b["throughput_ips"]), provider=str(m.get("provider", "")),
                                   variant=str(m.get("variant", "")), bench_file=row.bench_file.name))


# ------------------------------------------------------------------------------------------- lineage


def technique_of(lineage: list[dict[str, Any]]) -> str:
    """baseline, pruned, distilled, quantized, or combined (two or more of them) from the commands."""
    found = {_TECHNIQUE_OF_COMMAND[e.get("command", "")] for e in lineage if e.get("command") in _TECHNIQUE_OF_COMMAND}
    found |= {"quantized" for e in lineage if e.get("command") == "build"
              and "int8" in str((e.get("options") or {}).get("precision", "")).lower()}
    if len(found) > 1:
        return "combined"
    return found.pop() if found else "baseline"


def describe_step(entry: dict[str, Any]) -> str:
    """``prune method=l1-struct sparsity=0.5``: the command and the options that say what it did."""
    command = str(entry.get("command", "?"))
    options = entry.get("options") or {}
    parts = [command]
    for key in _STEP_OPTIONS.get(command, ()):
        value = options.get(key)
        if value in (None, "", [], {}, False) or (key == "steps" and not options.get("iterative")):
            continue
        if isinstance(value, str) and ("/" in value or "\\" in value):
            value = Path(value).name
        parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _ancestors(lineage: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(sha256, index of the first entry after it) of every recorded ancestor, nearest first.

    Entry k's parent is the file entry k-1 produced; a distillation from scratch has no parent but a
    teacher, which is then the file it came from.
    """
    out = []
    for k in range(len(lineage) - 1, -1, -1):
        e = lineage[k]
        src = e.get("parent") or (e.get("teacher") if e.get("command") == "distill" else None)
        if isinstance(src, dict) and src.get("sha256"):
            out.append((str(src["sha256"]), k))
    return out


def link_records(records: list[Record], *, baseline: str | list[str] | None = None) -> list[Record]:
    """Set parent, edge, root, depth, technique and step; return the records in pipeline order.

    ``baseline``: the sha256 of the record every row is compared with (default: each row's root); with
    several, each row is compared with the one in its own lineage tree (its root, where the tree has none).
    """
    by_sha = {r.sha256: r for r in records}
    for r in records:
        r.technique = technique_of(r.lineage)
        if r.same_file_as is not None:  # the same file on another runtime
            r.parent, r.step = r.same_file_as, f"bench on {r.runtime}"
            r.edge = r.step
            continue
        r.step = describe_step(r.lineage[-1]) if r.lineage else "? (no lineage: bench numbers only)"
        for sha, k in _ancestors(r.lineage):
            if sha in by_sha and sha != r.sha256:
                r.parent = sha
                r.edge = " -> ".join(describe_step(e) for e in r.lineage[k:])
                break
    bases = [baseline] if isinstance(baseline, str) else list(baseline or [])
    tree_root: dict[str, str] = {}
    for r in records:
        node, seen = r, {r.sha256}
        while node.parent is not None and node.parent not in seen:
            seen.add(node.parent)
            node = by_sha[node.parent]
        tree_root[r.sha256] = node.sha256
        r.depth = len(seen) - 1
    base_of_tree = {tree_root[b]: b for b in reversed(bases) if b in tree_root}
    for r in records:
        if len(bases) == 1:
            r.root = bases[0]
        else:
            r.root = base_of_tree.get(tree_root[r.sha256], tree_root[r.sha256])
    children: dict[str | None, list[Record]] = {}
    for r in records:
        children.setdefault(r.parent, []).append(r)
    ordered: list[Record] = []

    def visit(r: Record) -> None:
        ordered.append(r)
        for c in sorted(children.get(r.sha256, []), key=lambda c: (len(c.lineage), c.name)):
            visit(c)

    # Roots with a lineage first, oldest chains first; rows known only from bench last.
    for r in sorted(children.get(None, []), key=lambda r: (not r.lineage, len(r.lineage), r.name)):
        visit(r)
    return ordered


def compare_to_root(records: list[Record], *, metric: str, device: str | None, batch_size: int | None) -> None:
    """``vs_root``: x smaller (file size), x faster (p50 at the chosen coordinate), points of the metric."""
    by_sha = {r.sha256: r for r in records}
    for r in records:
        root = by_sha[r.root]
        smaller = root.file_bytes / r.file_bytes if root.file_bytes and r.file_bytes else None
        faster = None
        if device is not None and batch_size is not None:
            a, b = root.latency_at(device, batch_size), r.latency_at(device, batch_size)
            faster = a.p50_ms / b.p50_ms if a and b and b.p50_ms > 0 else None
        m, m0 = r.metric(metric), root.metric(metric)
        r.vs_root = {"smaller": smaller, "faster": faster,
                     "points": None if m is None or m0 is None else round(m - m0, 3)}
