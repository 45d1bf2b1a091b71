#!/usr/bin/env python
"""Latency of one 3x3 convolution against its width, on onnxruntime and OpenVINO, FP32, BF16 and INT8: the
measurement behind ``resopt prune --round-to auto`` (resopt/latency/widths.py cites its result).

Per width ``w`` (``--widths``, default 8..72 step 4) and map size (``--maps``, default 32 and 8, CIFAR's first
and last stage), a tiny model is exported to ONNX: a 1x1 convolution 3 -> w (bench feeds 3-channel images)
followed by ``--layers`` (2) 3x3 convolutions w -> w with ReLU; INT8 files are quantized by resopt's own
static Q/DQ path. Each (runtime, precision, map) group of widths is timed by bench's worker processes in one
interleaved run (rotated order, medians), batch ``--batch-size`` (32) on all available cores. The table gives
the time per 3x3 layer (the file's median / ``--layers``) and its cost per channel-pair, ``ms / w^2``,
normalized to the group's best width: 1.00 is the most efficient width, 1.30 pays 30% more per MAC.

    python scripts/bench_widths.py                       # ~6 min on 2 cores; writes docs/widths/widths.{md,json}
    python scripts/bench_widths.py --widths 8,16,24 --maps 8 --out /tmp/w   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _table import REPO, Table, write_result

CONFIGS = (("ort", "f32"), ("ort", "int8"), ("openvino", "f32"), ("openvino", "bf16"), ("openvino", "int8"))


def conv_stack(width: int, layers: int) -> Any:
    from torch import nn

    mods: list[nn.Module] = [nn.Conv2d(3, width, 1, bias=False)]
    for _ in range(layers):
        mods += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.ReLU()]
    return nn.Sequential(*mods)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default=",".join(str(w) for w in range(8, 73, 4)))
    ap.add_argument("--maps", default="32,8")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--configs", default=",".join(f"{r}:{p}" for r, p in CONFIGS))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "widths")
    args = ap.parse_args()

    import torch

    from resopt.envinfo import available_cores, collect_env
    from resopt.latency.measure import Row, Timing, check_measured, make_files, time_rows

    torch.manual_seed(0)
    widths = [int(w) for w in args.widths.split(",")]
    maps = [int(m) for m in args.maps.split(",")]
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    threads = available_cores()
    timing = Timing(rounds=args.rounds, iters=args.iters, min_seconds=args.min_time, warmup=3)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-widths-") as tmp:
        files: dict[tuple[int, int, str], Path] = {}
        for size in maps:
            for w in widths:
                model = conv_stack(w, args.layers)
                for prec in sorted({check_measured(r, p)[0] for r, p in configs}):
                    files[(size, w, prec)] = make_files(model, size, Path(tmp) / f"m{size}-w{w}", prec)
        print(f"bench_widths: {len(files)} files exported in {time.time() - t0:.0f} s", file=sys.stderr)
        for runtime, prec in configs:
            file_prec, options = check_measured(runtime, prec)
            for size in maps:
                rows = [Row(files[(size, w, file_prec)], runtime, tuple(options.items())) for w in widths]
                ms = time_rows(rows, batch=args.batch_size, threads=threads, timing=timing)
                per_layer = [m / args.layers for m in ms]
                cost = [m / (w * w) for m, w in zip(per_layer, widths, strict=True)]
                best = min(cost)
                results += [{"runtime": runtime, "precision": prec, "map": size, "width": w,
                             "ms_per_layer": round(m, 4), "relative_cost_per_mac": round(c / best, 3)}
                            for w, m, c in zip(widths, per_layer, cost, strict=True)]
                print(f"bench_widths: {runtime} {prec} {size}x{size}: " +
                      " ".join(f"{w}:{c / best:.2f}" for w, c in zip(widths, cost, strict=True)), file=sys.stderr)
    env = collect_env()
    isa = [name for name, has in env.cpu_isa.items() if has] if getattr(env, "cpu_isa", None) else []
    table = Table(["width"] + [f"{r} {p} {s}x{s}" for r, p in configs for s in maps])
    for w in widths:
        cells = [str(w)]
        for r, p in configs:
            for s in maps:
                row = next(x for x in results if (x["runtime"], x["precision"], x["map"], x["width"]) == (r, p, s, w))
                cells.append(f"{row['ms_per_layer']:.3f} ({row['relative_cost_per_mac']:.2f})")
        table.add_row(*cells)
    seconds = time.time() - t0
    md = "\n".join([
        "# One 3x3 convolution's latency against its width",
        "",
        f"Measured by `scripts/bench_widths.py` on {dt.date.today().isoformat()}: {env.cpu or 'unknown CPU'} "
        f"({', '.join(isa) or 'no ISA facts'}), {threads} threads, batch {args.batch_size}; "
        f"onnxruntime {env.onnxruntime or '?'}, OpenVINO {env.openvino or '?'}.",
        "",
        f"Each cell: ms per 3x3 layer (w -> w, stride 1, the map size of the column; the median of one "
        f"interleaved run of bench's workers over all widths of the column, divided by the {args.layers} stacked "
        f"layers) and, in brackets, its cost per MAC (ms / w^2) over the column's best: 1.00 is the most "
        f"efficient width, 1.30 pays 30% more per MAC. INT8: resopt's static Q/DQ (u8 activations, s8 "
        f"per-channel weights).",
        "",
        *table.markdown(),
        "",
    ])
    write_result(args.out, "widths", {"seconds": round(seconds, 1), "host": {
        "cpu": env.cpu, "isa": isa, "threads": threads, "onnxruntime": env.onnxruntime, "openvino": env.openvino},
        "batch_size": args.batch_size, "layers": args.layers, "timing": asdict(timing), "rows": results}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
