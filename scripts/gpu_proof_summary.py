#!/usr/bin/env python
"""Gather the step files of scripts/gpu_proof.sh (one ``NAME.json`` per resopt command) into one JSON
document on stdout, or with ``--table`` the Markdown rows for the README's GPU table.

    python scripts/gpu_proof_summary.py STEPS_DIR --archs resnet18-cifar resnet56 [--smoke] [--table]

Per architecture: training (epochs, seconds, top-1/top-5 on the test split, img/s of every epoch), the GPU
bench rows (variant, batch, latency p50/p99, img/s, GPU memory, and for the largest batch the fraction of
the GPU's bf16 peak that 2 x MACs per image reach), export parity, FP32 and INT8 ONNX top-1 and their CPU
bench rows. Goals from issue 13: ResNet-18 >= 90% top-1 within 180 s of training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _table import Table

BF16_PEAK_FLOPS = 790e12  # dense bf16 matrix products measured on the H200 this was written for
R18_GOAL = {"top1": 90.0, "seconds": 180.0}


def _load(steps: Path, name: str) -> dict[str, Any] | None:
    path = steps / f"{name}.json"
    if not path.exists() or path.stat().st_size == 0:
        return None
    return json.loads(path.read_text())


def _bench_rows(report: dict[str, Any] | None, *, peak: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for m in (report or {}).get("models", []):
        for b in m["batches"]:
            variant = m.get("variant") or ("fp32" if m["kind"] == "pt" else m.get("runtime") or m["kind"])
            row = {"file": m["name"], "variant": variant,
                   "device": m.get("device"), "batch": b["batch_size"], "p50_ms": b["p50_ms"], "p99_ms": b["p99_ms"],
                   "img_per_s": round(b["throughput_ips"], 1),
                   "gpu_memory_bytes": b.get("peak_device_memory_bytes"), "accuracy": m.get("accuracy")}
            if peak and m.get("macs"):
                row["bf16_peak_fraction"] = round(b["throughput_ips"] * 2 * m["macs"] / BF16_PEAK_FLOPS, 4)
            rows.append(row)
    return rows


def summarize(steps: Path, archs: list[str], *, smoke: bool, seconds: float | None) -> dict[str, Any]:
    env = _load(steps, "env") or {}
    models: dict[str, Any] = {}
    for arch in archs:
        train = _load(steps, f"train-{arch}")
        quant = _load(steps, f"quantize-{arch}")
        export = _load(steps, f"export-{arch}")
        entry: dict[str, Any] = {"trained": train is not None}
        if train is not None:
            entry["train"] = {k: train.get(k) for k in ("top1", "top5", "split", "val_top1", "val_images",
                                                        "best_epoch", "epochs", "train_seconds",
                                                        "train_images_per_sec", "train_images", "eval_images",
                                                        "device", "data_path", "params", "macs")}
            entry["train"]["epoch_images_per_sec"] = [row.get("images_per_sec") for row in train.get("history", [])]
            entry["train"]["epoch_val_top1"] = [row.get("val_top1") for row in train.get("history", [])]
        entry["gpu_bench"] = _bench_rows(_load(steps, f"bench-gpu-{arch}"), peak=not smoke)
        if export is not None:
            entry["export"] = {"exporter": export.get("exporter"), "verification": export.get("verification")}
        if quant is not None:
            entry["quantize"] = {"parent": quant.get("parent"), "result": quant.get("result")}
        entry["cpu_bench"] = _bench_rows(_load(steps, f"bench-cpu-{arch}"), peak=False)
        models[arch] = entry
    r18 = models.get("resnet18-cifar", {}).get("train")
    goals = {}
    if r18 is not None and not smoke:
        goals["resnet18_90pct_within_180s"] = {
            "top1": r18["top1"], "train_seconds": r18["train_seconds"],
            "met": bool(r18["top1"] >= R18_GOAL["top1"] and r18["train_seconds"] <= R18_GOAL["seconds"])}
    return {"smoke": smoke, "seconds": seconds, "env": env, "models": models, "goals": goals,
            "bf16_peak_flops": BF16_PEAK_FLOPS}


def table(summary: dict[str, Any]) -> Table:
    t = Table(["model", "epochs", "train s", "img/s (last epoch)", "top-1", "variant", "batch", "p50 ms",
               "img/s", "GPU MB", "of bf16 peak"], left=["model", "variant"])
    for arch, m in summary["models"].items():
        tr = m.get("train") or {}
        last_ips = (tr.get("epoch_images_per_sec") or [None])[-1]
        head = [arch, str(tr.get("epochs", "-")), f"{tr.get('train_seconds', 0):.0f}",
                f"{last_ips:.0f}" if last_ips else "-", f"{tr['top1']:.2f}%" if "top1" in tr else "-"]
        for row in m["gpu_bench"] or [{}]:
            mem = row.get("gpu_memory_bytes")
            frac = row.get("bf16_peak_fraction")
            t.add_row(*head, str(row.get("variant", "-")), str(row.get("batch", "-")),
                      f"{row['p50_ms']:.3g}" if "p50_ms" in row else "-", f"{row.get('img_per_s', 0):.0f}",
                      f"{mem / 2**20:.0f}" if mem else "-", f"{frac:.1%}" if frac is not None else "-")
            head = [""] * 5
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", type=Path)
    ap.add_argument("--archs", nargs="+", required=True)
    ap.add_argument("--smoke", action="store_true", help="a CPU smoke run: no peak fraction, no goals")
    ap.add_argument("--seconds", type=float, default=None, help="wall time of the whole proof")
    ap.add_argument("--table", action="store_true", help="print the Markdown table instead of the JSON")
    args = ap.parse_args()
    summary = summarize(args.steps, args.archs, smoke=args.smoke, seconds=args.seconds)
    if args.table:
        sys.stdout.write("\n".join(table(summary).markdown()) + "\n")
    else:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
