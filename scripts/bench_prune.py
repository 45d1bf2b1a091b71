#!/usr/bin/env python
"""Pruning benchmark (``make bench-prune``): a trained ResNet and its pruned children side by side on
onnxruntime CPU, in one table (markdown + JSON).

Everything goes through the real commands (``resopt train / prune / export / bench``):

1. the parent is trained on ``--data`` (or given with ``--model``);
2. children: l1-struct at 30/50/70% of each layer's channels, l1-struct at half the parent's MACs
   (``--target-macs 0.5``: per layer, per layer with ``--round-to 8``, and global with ``--round-to 8``),
   l1-unstruct at 50% of the weights, and 2:4; each fine-tuned ``--finetune-epochs`` on the same data;
3. every file is exported to ONNX (verified against PyTorch by ``export``);
4. ONE ``resopt bench`` run measures all of them (one worker process per file, interleaved rounds, so
   drifting load on a shared machine hits every row alike), with top-1 of the ONNX files on the test split.

Target (issue 3): a structured prune that halves the MACs runs at least 1.7x faster than its parent.
The script prints what it measured, met or not; ``--strict`` also exits 1 when it is not met.
Unstructured and 2:4 rows show that zeros alone buy nothing on dense kernels.

    python scripts/bench_prune.py                        # ~20-40 min on 2 busy cores (training dominates)
    python scripts/bench_prune.py --model runs/bench-cpu/r18.pt   # prune an already trained model
    python scripts/bench_prune.py --reuse                # re-measure the artifacts already in --out
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _table import REPO, Table, exit_code, resopt, verdict_line, write_result

SPEED_TARGET = 1.7  # throughput of the half-MACs structured child over its parent


@dataclass(frozen=True)
class Child:
    key: str
    label: str
    args: tuple[str, ...]
    halves_macs: bool = False  # the row(s) the target is about


CHILDREN = (
    Child("p30", "l1-struct 30%", ("--sparsity", "0.3")),
    Child("p50", "l1-struct 50%", ("--sparsity", "0.5")),
    Child("p70", "l1-struct 70%", ("--sparsity", "0.7")),
    Child("m50", "l1-struct, MACs / 2", ("--target-macs", "0.5"), halves_macs=True),
    Child("m50r8", "l1-struct, MACs / 2, round-to 8", ("--target-macs", "0.5", "--round-to", "8"), halves_macs=True),
    Child("g50r8", "l1-struct, MACs / 2, global, round-to 8",
          ("--target-macs", "0.5", "--global", "--round-to", "8"), halves_macs=True),
    Child("u50", "l1-unstruct 50%", ("--method", "l1-unstruct", "--sparsity", "0.5")),
    Child("s24", "2:4", ("--method", "2:4")),
)


def _data_args(opts: argparse.Namespace) -> list[object]:
    return ["--data", opts.data, *(["--limit-per-class", opts.limit_per_class] if opts.limit_per_class else [])]


def build(opts: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The parent checkpoint and every child's prune report (reused from --out with --reuse)."""
    out: Path = opts.out
    parent = Path(opts.model) if opts.model else out / "parent.pt"
    steps: dict[str, Any] = {}
    if not opts.model and not (opts.reuse and parent.exists()):
        steps["train"] = resopt("train", "--arch", opts.arch, "--width", opts.width, *_data_args(opts),
                                "--epochs", opts.epochs, "--batch-size", 64, "--lr", 0.05, "--seed", opts.seed,
                                "-o", parent)
    reports = {}
    for c in CHILDREN:
        pt = out / f"{c.key}.pt"
        report = out / f"{c.key}.prune.json"
        if not (opts.reuse and pt.exists() and report.exists()):
            d = resopt("prune", parent, *c.args, "--finetune-epochs", opts.finetune_epochs, *_data_args(opts),
                       "--batch-size", 64, "--seed", opts.seed, "-o", pt)
            report.write_text(json.dumps(d, indent=2) + "\n")
        reports[c.key] = json.loads(report.read_text())
    for pt in [parent] + [out / f"{c.key}.pt" for c in CHILDREN]:
        onnx = out / (pt.stem + ".onnx")
        if not (opts.reuse and onnx.exists()):
            steps[f"export {pt.name}"] = resopt("export", pt, "-o", onnx, "--data", opts.data)
    return parent, {"steps": steps, "prune": reports}


def summarize(parent: Path, built: dict[str, Any], bench: dict[str, Any], opts: argparse.Namespace) -> dict[str, Any]:
    by_name = {Path(m["file"]).name: m for m in bench["models"]}
    base = by_name[parent.stem + ".onnx"]
    rows = []
    for key, label, report in [("parent", f"parent ({opts.arch if not opts.model else parent.name})", None)] + \
            [(c.key, c.label, built["prune"][c.key]) for c in CHILDREN]:
        m = by_name[(parent.stem if key == "parent" else key) + ".onnx"]
        row = {"key": key, "method": label, "file": m["name"], "params": m["params"],
               "nonzero_params": m["nonzero_params"], "macs": m["macs"], "macs_fraction": m["macs"] / base["macs"],
               "file_bytes": m["file_bytes"], "top1": (m["accuracy"] or {}).get("top1"),
               "eval_images": (m["accuracy"] or {}).get("images"),
               "top1_before_finetune": None if report is None else report["val_top1_before_finetune"]}
        for b in m["batches"]:
            row[f"b{b['batch_size']}"] = {"p50_ms": b["p50_ms"], "p99_ms": b["p99_ms"],
                                          "throughput_ips": b["throughput_ips"], "speedup": b["speedup"],
                                          "spread_pct": b["spread_pct"]}
        rows.append(row)
    verdicts = []
    for c in CHILDREN:
        if not c.halves_macs:
            continue
        row = next(r for r in rows if r["key"] == c.key)
        for bs in opts.batch_sizes:
            s = row[f"b{bs}"]["speedup"]
            verdicts.append({"child": c.label, "batch_size": bs, "macs_fraction": round(row["macs_fraction"], 3),
                             "speedup": round(s, 2), "target": SPEED_TARGET, "met": s >= SPEED_TARGET})
    return {"rows": rows, "verdicts": verdicts}


def _count(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown(result: dict[str, Any]) -> str:
    host, cfg = result["host"], result["config"]
    bss = cfg["batch_sizes"]
    lines = [
        f"# resopt pruning benchmark ({result['date']})", "",
        f"{host['cpu']}, {host['cores']} cores available, onnxruntime CPU with {cfg['threads']} intra-op threads; "
        f"torch {host['versions'].get('torch', '?')}, onnxruntime {host['versions'].get('onnxruntime', '?')}, "
        f"torch-pruning {host['versions'].get('torch-pruning', '?')}.", "",
        f"Parent: {cfg['parent']}. Children fine-tuned {cfg['finetune_epochs']} epoch(s) on `{cfg['data']}`"
        + (f" ({cfg['limit_per_class']} images per class)" if cfg["limit_per_class"] else "") + ". "
        f"Top-1: the ONNX files on the test split ({cfg['eval_images']} images), measured by the same "
        f"`resopt bench` run as the speed ({cfg['method']}).", "",
    ]
    table = Table(["model", "params", "non-zero", "MACs", "size", "val top-1 pruned, not fine-tuned",
                   "test top-1 (ONNX)", *(c for b in bss for c in (f"b{b} p50 ms", f"b{b} speed-up"))], left=("model",))
    for r in result["rows"]:
        before = "" if r["top1_before_finetune"] is None else f"{r['top1_before_finetune']:.2f}%"
        top1 = "?" if r["top1"] is None else f"{r['top1']:.2f}%"
        cells = [r["method"], _count(r["params"]), _count(r["nonzero_params"]),
                 f"{_count(r['macs'])} ({r['macs_fraction']:.2f}x)", f"{r['file_bytes'] / 1e6:.2f} MB", before, top1]
        for b in bss:
            s = r[f"b{b}"]
            cells += [f"{s['p50_ms']:.2f} ±{s['spread_pct'] / 2:.0f}%", f"{s['speedup']:.2f}x"]
        table.add_row(*cells)
    lines += table.markdown()
    lines += ["", f"Target: a structured prune that halves the MACs runs >= {SPEED_TARGET}x faster than its parent "
              "(throughput ratio at the same batch size):", ""]
    for v in result["verdicts"]:
        lines.append(verdict_line(f"{v['child']} ({v['macs_fraction']:.2f}x MACs), batch {v['batch_size']}",
                                  f"{v['speedup']:.2f}x", v["met"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-prune", help="folder for artifacts and tables")
    p.add_argument("--model", default=None, help="a trained .pt to prune instead of training a parent")
    p.add_argument("--arch", default="resnet18-cifar", help="parent architecture when training one")
    p.add_argument("--width", type=float, default=0.5, help="parent width multiplier when training one")
    p.add_argument("--epochs", type=int, default=5, help="parent training epochs")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs of every child")
    p.add_argument("--data", default=str(REPO / "examples" / "cifar10-mini"), help="data (train/, test/)")
    p.add_argument("--limit-per-class", type=int, default=None, help="images per class for training and top-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", default="1,32", help="bench batch sizes")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--min-time", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reuse", action="store_true", help="keep artifacts already in --out")
    p.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    opts = p.parse_args(argv)
    opts.batch_sizes = [int(b) for b in opts.batch_size.split(",")]
    opts.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    parent, built = build(opts)
    files = [opts.out / (parent.stem + ".onnx")] + [opts.out / f"{c.key}.onnx" for c in CHILDREN]
    bench = resopt("bench", *files, "--batch-size", opts.batch_size, "--threads", opts.threads, "--iters", opts.iters,
                   "--min-time", opts.min_time, "--rounds", opts.rounds, *_data_args(opts))
    summary = summarize(parent, built, bench, opts)
    result = {
        "date": dt.date.today().isoformat(), "host": bench["host"],
        "config": {"threads": bench["config"]["threads"], "method": bench["config"]["method"],
                   "batch_sizes": opts.batch_sizes, "parent": str(opts.model) if opts.model else
                   f"{opts.arch} width {opts.width:g} trained {opts.epochs} epochs on {opts.data}",
                   "finetune_epochs": opts.finetune_epochs, "data": opts.data,
                   "limit_per_class": opts.limit_per_class,
                   "eval_images": summary["rows"][0]["eval_images"]},
        **summary, "steps": built["steps"], "prune": built["prune"], "bench": bench,
        "seconds": round(time.time() - t0, 1),
    }
    write_result(opts.out, "bench-prune", result, markdown(result))
    return exit_code(result["verdicts"], strict=opts.strict)


if __name__ == "__main__":
    sys.exit(main())
