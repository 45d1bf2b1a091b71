#!/usr/bin/env python
"""CPU benchmark (``make bench-cpu``): PyTorch eager, onnxruntime and OpenVINO, FP32 / BF16 / resopt's INT8,
for CIFAR ResNets and ResNet-50, one table (markdown + JSON) with each row's distance from the CPU's ceiling.

Everything goes through the real commands (``resopt train / prune / export / quantize / bench``), so the
table measures what a user gets:

* **resnet18-cifar** and **resnet56** (CIFAR stems, 32 px) are *trained* on ``--data`` (the shipped
  ``examples/cifar10-mini`` by default), so their rows carry an accuracy claim: top-1/top-5 of every
  runtime and precision on the test split of ``--eval-data``. resnet56 also gets a child pruned to half its
  MACs (``prune --target-macs 0.5 --global --round-to 8``, fine-tuned) and quantized: resopt's fastest CPU
  path, pruning and INT8 compounded.
* **resnet50** (ImageNet stem, 224 px, 4.1 GMACs) cannot be trained on 2 CPU cores in a benchmark run, so
  it is built by a one-step ``resopt train`` on 10 images and its rows are **speed only**.

Each architecture's speed rows come from ONE ``resopt bench --runtime ort,openvino --precision f32,bf16``
run (one worker process per file and runtime, interleaved rounds; see ``resopt.bench``), so drifting load
on a shared machine hits every row alike; ratios are within that run. OpenVINO runs the very same ONNX files
(the Q/DQ INT8 file included), with the inference precision set explicitly (f32 or bf16) and reported.

The physical ceiling: per-core peak multiply-accumulates per cycle of the CPU's widest units for each
precision (FP32 FMA, AVX-512 BF16 dot products, VNNI INT8 dot products, AMX tiles where present), times
the clock (the higher of /proc/cpuinfo's and the one a measured one-thread GEMM proves: PyTorch FP32 /
BF16 matmul, INT8 ``torch._int_mm``), times the threads. A row's "of peak" is its MACs per second (img/s x
MACs per image) over that ceiling for the precision its convolutions run in.

    python scripts/bench_cpu.py                          # ~20-40 min on 2 busy cores (training dominates)
    python scripts/bench_cpu.py --archs r56,r50 --epochs 3
    python scripts/bench_cpu.py --reuse                  # re-measure existing artifacts in --out
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _table import REPO, Table, exit_code, resopt, verdict_line, write_result

SPEED_TARGET = 3.0  # resopt INT8 on onnxruntime over ORT FP32 (issue 2)
DROP_TARGET = 0.5  # top-1 points, INT8 vs FP32 on the same runtime


@dataclass(frozen=True)
class Arch:
    key: str
    arch: str
    trained: bool
    batch_size: int
    input_size: int | None = None  # None: the data's native size
    pruned_child: bool = False  # also bench a child pruned to half the MACs, quantized


ARCHS = {
    "r18": Arch("r18", "resnet18-cifar", trained=True, batch_size=32),
    "r56": Arch("r56", "resnet56", trained=True, batch_size=32, pruned_child=True),
    "r50": Arch("r50", "resnet50", trained=False, batch_size=8, input_size=224),
}
# (file suffix, runtime, OpenVINO precision) -> label, in table order. Rows the CPU cannot run (BF16 without
# BF16 support falls back to f32 and is dropped as a duplicate) are simply absent.
ROWS = {
    ("pt", "", ""): "PyTorch eager FP32",
    ("onnx", "ort", ""): "onnxruntime FP32",
    ("onnx", "openvino", "f32"): "OpenVINO FP32",
    ("onnx", "openvino", "bf16"): "OpenVINO BF16",
    ("int8.onnx", "ort", ""): "resopt INT8 on onnxruntime",
    ("int8.onnx", "openvino", "f32"): "resopt INT8 on OpenVINO",
    ("int8.onnx", "openvino", "bf16"): "resopt INT8 on OpenVINO, bf16 rest",
    ("p50.int8.onnx", "ort", ""): "pruned MACs/2 + INT8 on onnxruntime",
    ("p50.int8.onnx", "openvino", "f32"): "pruned MACs/2 + INT8 on OpenVINO",
    ("p50.int8.onnx", "openvino", "bf16"): "pruned MACs/2 + INT8 on OpenVINO, bf16 rest",
}


def build_artifacts(a: Arch, out: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """train -> export -> quantize (and prune -> export -> quantize for the pruned child)."""
    pt, fp32, int8 = (out / f"{a.key}.{s}" for s in ("pt", "onnx", "int8.onnx"))
    steps: dict[str, Any] = {}

    def step(name: str, dst: Path, *args: object) -> None:
        if not (opts.reuse and dst.exists()):
            steps[name] = resopt(*args)

    if a.trained:
        extra = ["--limit-per-class", opts.train_limit_per_class] if opts.train_limit_per_class else []
        step("train", pt, "train", "--arch", a.arch, "--data", opts.data, "--epochs", opts.epochs,
             "--batch-size", 64, "--lr", 0.05, "--seed", opts.seed, *extra, "-o", pt)
    else:
        # Speed only: one epoch on one image per class gives a valid checkpoint (preprocessing, classes,
        # lineage) with untrained weights; throughput does not depend on the weights' values.
        step("train", pt, "train", "--arch", a.arch, "--data", opts.data, "--epochs", 1, "--limit-per-class", 1,
             "--batch-size", 10, *(["--input-size", a.input_size] if a.input_size else []), "-o", pt)
    step("export", fp32, "export", pt, "-o", fp32, "--data", opts.data)
    step("quantize", int8, "quantize", fp32, "--mode", "int8", "-o", int8)
    files = [pt, fp32, int8]
    if a.pruned_child:
        ppt, pfp32, pint8 = (out / f"{a.key}.{s}" for s in ("p50.pt", "p50.onnx", "p50.int8.onnx"))
        step("prune", ppt, "prune", pt, "--target-macs", 0.5, "--global", "--round-to", 8, "--finetune-epochs",
             opts.finetune_epochs, "--data", opts.data, "--seed", opts.seed, "-o", ppt)
        step("export_pruned", pfp32, "export", ppt, "-o", pfp32, "--data", opts.data)
        step("quantize_pruned", pint8, "quantize", pfp32, "--mode", "int8", "-o", pint8)
        files.append(pint8)
    return {"files": files, "steps": steps}


# --------------------------------------------------------------------------------------------- ceiling


def cpu_facts() -> dict[str, Any]:
    """Vendor, flags and clock (MHz as /proc/cpuinfo reports it: nominal under a hypervisor)."""
    from resopt.envinfo import read_cpu_fields

    fields = read_cpu_fields()
    mhz = fields.get("cpu mhz")
    return {"vendor": fields.get("vendor_id", ""), "flags": set(fields.get("flags", "").split()),
            "mhz": float(mhz) if mhz else None, "model": fields.get("model name", "")}


def peak_macs_per_cycle(vendor: str, flags: set[str]) -> tuple[dict[str, int], str]:
    """Per-core dense MACs per cycle for fp32 / bf16 / int8, and how they were derived.

    Two vector FMA pipes per core. Intel server cores with AVX-512 run 512-bit ops on 512-bit units (16 FP32
    lanes per pipe); AMD Zen 4 runs AVX-512 on two 256-bit pipes (8 lanes per pipe). A BF16 dot product
    (VDPBF16PS) does 2 MACs per FP32 lane, a VNNI INT8 dot product (VPDPBUSD) 4. AMX's tile unit does 1024
    INT8 or 512 BF16 MACs per cycle per core (Intel's figures for Sapphire Rapids).
    """
    lanes = 16 if "avx512f" in flags and vendor == "GenuineIntel" else 8
    fp32 = 2 * lanes
    why = [f"2 FMA pipes x {lanes} FP32 lanes = {fp32} FP32 MACs"]
    bf16 = 2 * fp32 if "avx512_bf16" in flags else fp32
    why.append(f"{'AVX-512 BF16 dot products' if bf16 > fp32 else 'no BF16 instructions'}: {bf16} BF16 MACs")
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    int8 = 4 * fp32 if vnni else 2 * fp32
    why.append(f"{'VNNI dot products' if vnni else 'no VNNI (pmaddubsw path)'}: {int8} INT8 MACs")
    if "amx_bf16" in flags:
        bf16, why[1] = 512, "AMX-BF16: 512 BF16 MACs"
    if "amx_int8" in flags:
        int8, why[2] = 1024, "AMX-INT8: 1024 INT8 MACs"
    return {"fp32": fp32, "bf16": bf16, "int8": int8}, "; ".join(why) + " per cycle per core"


def measured_gemm(seconds: float = 2.0) -> dict[str, float]:
    """One-thread GEMM rates in GMAC/s (best of several 1024^3 products) in PyTorch: FP32, BF16 and INT8."""
    import torch

    torch.set_num_threads(1)
    n = 1024
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    cases = {"fp32": (torch.mm, a, b), "bf16": (torch.mm, a.bfloat16(), b.bfloat16()),
             "int8": (getattr(torch, "_int_mm", None), (a * 40).to(torch.int8), (b * 40).to(torch.int8))}
    rates: dict[str, float] = {}
    for name, (fn, x, y) in cases.items():
        if fn is None:
            continue
        try:
            fn(x, y)
        except RuntimeError:  # an op this torch build does not have on the CPU
            continue
        best, t_end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn(x, y)
            best = min(best, time.perf_counter() - t0)
        rates[name] = n ** 3 / best / 1e9
    return rates


# ---------------------------------------------------------------------------------------------- tables


def row_key(m: dict[str, Any], key: str) -> tuple[str, str, str]:
    suffix = m["name"][len(key) + 1:]
    return suffix, m.get("runtime", ""), (m.get("details") or {}).get("precision", "") \
        if m.get("runtime") == "openvino" else ""


def compute_precision(suffix: str, runtime: str, precision: str) -> str:
    """The precision the convolutions of a row run in (what its ceiling is)."""
    if "int8" in suffix:
        return "int8"
    return "bf16" if runtime == "openvino" and precision == "bf16" else "fp32"


def summarize(a: Arch, speed: dict[str, Any], accuracy: dict[str, Any] | None, peak_gmacs: dict[str, float],
              threads: int) -> dict[str, Any]:
    """Rows of one architecture (in ROWS order) and the verdicts against the targets."""
    def index(doc: dict[str, Any] | None) -> dict[tuple[str, str, str], dict[str, Any]]:
        return {row_key(m, a.key): m for m in (doc or {}).get("models", [])}

    by, acc_by = index(speed), index(accuracy)
    base = by[("onnx", "ort", "")]["batches"][0]
    pt = by[("pt", "", "")]["batches"][0]

    def ratio(b: dict[str, Any], ref: dict[str, Any]) -> tuple[float, float, float]:
        """Median and range of ``b``'s throughput over ``ref``'s, round by round: rows of one round ran
        next to each other, so a load change between rounds cancels out (a pooled median does not)."""
        import statistics

        r = [x / y for x, y in zip(ref["round_p50_ms"], b["round_p50_ms"], strict=True)]
        return statistics.median(r), min(r), max(r)

    rows = []
    for key, label in ROWS.items():
        if key not in by:
            continue
        m = by[key]
        b = m["batches"][0]
        vs_ort, vs_pt = ratio(b, base), ratio(b, pt)
        acc = (acc_by.get(key) or {}).get("accuracy") if a.trained else None
        prec = compute_precision(*key)
        ceiling = peak_gmacs[prec] * 1e9 * threads / m["macs"] if m["macs"] else None
        rows.append({
            "model": a.arch, "runtime": label, "file": m["name"], "provider": m["provider"],
            "weights": "trained" if a.trained else "untrained (speed only)", "input": m["input_size"],
            "file_bytes": m["file_bytes"], "params": m["params"], "macs": m["macs"],
            "top1": acc["top1"] if acc else None, "top5": acc["top5"] if acc else None,
            "eval_images": acc["images"] if acc else None, "batch_size": b["batch_size"], "p50_ms": b["p50_ms"],
            "p99_ms": b["p99_ms"], "throughput_ips": b["throughput_ips"], "spread_pct": b["spread_pct"],
            "vs_ort_fp32": vs_ort[0], "vs_ort_fp32_range": vs_ort[1:], "vs_pytorch": vs_pt[0],
            "compute_precision": prec, "ceiling_ips": ceiling,
            "of_peak": b["throughput_ips"] / ceiling if ceiling else None,
            "peak_memory_bytes": b["peak_memory_bytes"], "samples": b["samples"],
            "layers": (m.get("details") or {}).get("layer_precisions")})
    verdicts = []
    ort_int8 = next(r for r in rows if r["file"] == f"{a.key}.int8.onnx" and r["runtime"].endswith("onnxruntime"))
    verdicts.append({"model": a.arch, "target": f"INT8 on onnxruntime >= {SPEED_TARGET:g}x ORT FP32 throughput",
                     "value": round(ort_int8["vs_ort_fp32"], 2), "met": ort_int8["vs_ort_fp32"] >= SPEED_TARGET})
    best = max(rows, key=lambda r: r["throughput_ips"])
    goal = 6.0 if a.key == "r50" else 10.0
    verdicts.append({"model": a.arch, "target": f"fastest CPU path >= {goal:g}x ORT FP32 (issue 14 goal)",
                     "value": round(best["vs_ort_fp32"], 2), "met": best["vs_ort_fp32"] >= goal,
                     "row": best["runtime"]})
    if a.trained and accuracy is not None:
        fp32 = next(r for r in rows if r["file"] == f"{a.key}.onnx" and r["runtime"] == "onnxruntime FP32")["top1"]
        for r in rows:
            if r["top1"] is not None and r["file"] != f"{a.key}.pt":
                limit = DROP_TARGET if "pruned" not in r["runtime"] else 1.0
                verdicts.append({"model": a.arch, "target": f"{r['runtime']}: top-1 drop vs ORT FP32 <= {limit:g}",
                                 "value": round(fp32 - r["top1"], 2), "met": fp32 - r["top1"] <= limit,
                                 "images": r["eval_images"]})
    return {"rows": rows, "verdicts": verdicts}


def _mb(n: float | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _count(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _shown(path: str) -> str:
    """A data path as the reader would type it: relative to the repository when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def markdown(result: dict[str, Any]) -> str:
    host, cfg, ceil = result["host"], result["config"], result["ceiling"]
    isa = ", ".join(k for k, v in result["cpu_isa"].items() if v) or "unknown"
    lacks = ", ".join(k for k, v in result["cpu_isa"].items() if not v)
    gemm = ", ".join(f"{k.upper()} {v:.0f}" for k, v in ceil["measured_gemm_gmacs"].items())
    loads = "; ".join(f"{k} {v.get('before')} -> {v.get('after')}" for k, v in result["load_average"].items())
    lines = [
        f"# resopt CPU benchmark ({result['date']})", "",
        f"{host['cpu']}, {host['cores']} cores available, {cfg['threads']} threads; instruction sets: {isa}"
        + (f" (not: {lacks})" if lacks else "") + f". torch {host['versions'].get('torch', '?')}, onnxruntime "
        f"{host['versions'].get('onnxruntime', '?')}, OpenVINO {result['openvino']}. 1-minute load average per "
        f"speed run ({loads}; above {host['cores']} means other work competed).", "",
        f"Ceiling per core: {ceil['derivation']}; at {ceil['ghz']:.2f} GHz (/proc/cpuinfo reports "
        f"{ceil['reported_ghz']:.2f} GHz; the fastest measured GEMM implies at least {ceil['implied_ghz']:.2f} GHz) "
        f"that is FP32 {ceil['peak_gmacs']['fp32']:.0f}, "
        f"BF16 {ceil['peak_gmacs']['bf16']:.0f}, INT8 {ceil['peak_gmacs']['int8']:.0f} GMAC/s; measured one-thread "
        f"GEMM (PyTorch): {gemm} GMAC/s. \"of peak\" = img/s x MACs over threads x the peak of the precision the "
        f"convolutions run in.", "",
        f"Speed: one `resopt bench --runtime ort,openvino --precision f32,bf16` run per model ({cfg['method']}); "
        f">= {cfg['iters']} batches and >= {cfg['min_seconds']:g} s per row in {cfg['rounds']} rounds; img/s = "
        f"batch / p50; ± = half the spread of the per-round medians; vs ORT FP32 / PyTorch = median (and range) "
        f"of the per-round ratios.", "",
        f"Accuracy: test split of `{_shown(cfg['eval_data'])}`"
        + (f" ({cfg['eval_limit_per_class']} per class)" if cfg.get("eval_limit_per_class") else "")
        + f"; trained models: {cfg['epochs']} epochs on `{_shown(cfg['data'])}`"
        + (f" ({cfg['train_limit_per_class']} per class)" if cfg.get("train_limit_per_class") else "") + ".", "",
    ]
    table = Table(["model", "runtime", "size", "MACs", "top-1", "batch", "p50 ms", "img/s", "vs ORT FP32",
                   "vs PyTorch", "of peak", "peak mem"], left=("model", "runtime"))
    for r in result["rows"]:
        top1 = "n/a" if r["top1"] is None else f"{r['top1']:.2f}%"
        peak = "?" if r["of_peak"] is None else f"{100 * r['of_peak']:.0f}% {r['compute_precision'].upper()}"
        table.add_row(f"{r['model']} ({r['input']}px)", r["runtime"], _mb(r["file_bytes"]), _count(r["macs"]), top1,
                      str(r["batch_size"]), f"{r['p50_ms']:.2f}",
                      f"{r['throughput_ips']:,.0f} ±{r['spread_pct'] / 2:.0f}%",
                      f"{r['vs_ort_fp32']:.2f}x ({r['vs_ort_fp32_range'][0]:.2f}-{r['vs_ort_fp32_range'][1]:.2f})",
                      f"{r['vs_pytorch']:.2f}x", peak, _mb(r["peak_memory_bytes"]))
    lines += table.markdown()
    lines += ["", "Targets and goals:", ""]
    for v in result["verdicts"]:
        unit = "x" if "x ORT" in v["target"] or "throughput" in v["target"] else " points"
        on = f" ({v['row']})" if v.get("row") else f" on {v['images']} test images" if v.get("images") else ""
        lines.append(verdict_line(f"{v['model']}: {v['target']}", f"{v['value']:g}{unit}", v["met"], after=on))
    lines += ["", "Ratios are from one interleaved run per model, so they are fairer than the absolute numbers, "
              "which move with the machine's load. Trained models are short runs on a small training set, not "
              "converged; resnet50 rows are speed only."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-cpu", help="folder for artifacts and tables")
    p.add_argument("--archs", default="r18,r56,r50", help=f"comma-separated subset of {','.join(ARCHS)}")
    p.add_argument("--data", default=str(REPO / "examples" / "cifar10-mini"), help="training data (train/, test/)")
    p.add_argument("--eval-data", default=None, help="data whose test split measures accuracy [default: --data]")
    p.add_argument("--eval-limit-per-class", type=int, default=None)
    p.add_argument("--train-limit-per-class", type=int, default=None)
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the CIFAR models")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs of the pruned child")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="one batch size for every model [default: 32 "
                                                                 "for CIFAR models, 8 for resnet50]")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--min-time", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=6, help="more, shorter rounds interleave the files more finely")
    p.add_argument("--reuse", action="store_true", help="keep artifacts already in --out")
    p.add_argument("--no-accuracy", action="store_true", help="speed only (skips the accuracy bench)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    opts = p.parse_args(argv)
    archs = [ARCHS[k.strip()] for k in opts.archs.split(",") if k.strip()]
    opts.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    sys.path.insert(0, str(REPO))
    from resopt.envinfo import cpu_isa, openvino_version, read_cpuinfo

    facts = cpu_facts()
    per_cycle, derivation = peak_macs_per_cycle(facts["vendor"], facts["flags"])
    gemm = measured_gemm()
    # /proc/cpuinfo's MHz is the nominal clock under a hypervisor, and cores boost above it: a GEMM that
    # runs faster than MACs/cycle x that clock proves a higher one. The ceiling uses the higher of the two.
    reported_ghz = (facts["mhz"] or 0) / 1000
    implied_ghz = max((gemm[k] / per_cycle[k] for k in gemm), default=0.0)
    ghz = max(reported_ghz, implied_ghz)
    ceiling = {"ghz": ghz, "reported_ghz": reported_ghz, "implied_ghz": implied_ghz, "macs_per_cycle": per_cycle,
               "derivation": derivation,
               "peak_gmacs": {k: v * ghz for k, v in per_cycle.items()}, "measured_gemm_gmacs": gemm}
    _, flags = read_cpuinfo()
    import platform

    built = {a.key: build_artifacts(a, opts.out, opts) for a in archs}
    rows, verdicts, speeds, accuracies, loads = [], [], {}, {}, {}
    for a in archs:
        bs = opts.batch_size or a.batch_size
        files = built[a.key]["files"]
        common = ["--runtime", "ort,openvino", "--precision", "f32,bf16", "--batch-size", bs, "--threads", opts.threads]
        speeds[a.key] = resopt("bench", *files, *common, "--iters", opts.iters, "--min-time", opts.min_time,
                               "--rounds", opts.rounds)
        loads[a.arch] = speeds[a.key]["host"].get("load_average") or {}
        if a.trained and not opts.no_accuracy:
            limit = ["--limit-per-class", opts.eval_limit_per_class] if opts.eval_limit_per_class else []
            accuracies[a.key] = resopt("bench", *files, *common, "--warmup", 0, "--iters", 1, "--min-time", 0,
                                       "--rounds", 1, "--data", opts.eval_data or opts.data, *limit)
        s = summarize(a, speeds[a.key], accuracies.get(a.key), ceiling["peak_gmacs"], opts.threads)
        rows += s["rows"]
        verdicts += s["verdicts"]

    first = speeds[archs[0].key]
    result = {
        "date": dt.date.today().isoformat(), "host": first["host"], "openvino": openvino_version()[0],
        "cpu_isa": cpu_isa(flags, platform.machine()), "ceiling": ceiling, "load_average": loads,
        "config": {**{k: first["config"][k] for k in ("threads", "iters", "min_seconds", "rounds", "method")},
                   "data": opts.data, "eval_data": opts.eval_data or opts.data,
                   "eval_limit_per_class": opts.eval_limit_per_class,
                   "train_limit_per_class": opts.train_limit_per_class, "epochs": opts.epochs},
        "rows": rows, "verdicts": verdicts,
        "steps": {k: v["steps"] for k, v in built.items()},
        "bench_speed": speeds, "bench_accuracy": accuracies, "seconds": round(time.time() - t0, 1),
    }
    write_result(opts.out, "bench-cpu", result, markdown(result))
    return exit_code(result["verdicts"], strict=opts.strict)


if __name__ == "__main__":
    sys.exit(main())
