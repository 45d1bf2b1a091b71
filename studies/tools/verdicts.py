#!/usr/bin/env python3
"""The converged-cifar study's two targets, judged from its committed bench.json against the reference they
are stated for: the FP32 ResNet-56 (r56.onnx) on onnxruntime.

  cd studies/results/converged-cifar && python ../../tools/verdicts.py bench.json > verdicts.md

Target 1: >= 10x the reference's throughput (at batch 1 and at batch 32) within 1.0 point of its top-1.
Target 2: a file of at most 0.5 MB (10^6 bytes / 2) within 0.5 point of its top-1.
Every row of the bench (each file on each runtime) is a candidate; the verdict is printed, not typed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REFERENCE = ("r56.onnx", "ort")
SPEED_TARGET, SPEED_POINTS = 10.0, 1.0
SIZE_TARGET_BYTES, SIZE_POINTS = 500_000, 0.5


def main(path: str) -> int:
    doc = json.loads(Path(path).read_text())
    rows = doc["models"]
    ref = next(m for m in rows if (m["name"], m["runtime"]) == REFERENCE)
    ref_top1 = ref["accuracy"]["top1"]
    ref_ips = {b["batch_size"]: b["throughput_ips"] for b in ref["batches"]}
    print(f"# converged-cifar: the targets against {REFERENCE[0]} on {REFERENCE[1]} "
          f"(top-1 {ref_top1:.2f}% on {ref['accuracy']['images']} images)\n")
    print(f"Computed by `studies/tools/verdicts.py` from `{Path(path).name}`.\n")

    def label(m: dict) -> str:
        return f"{m['name']} @ {m['runtime']}"

    print(f"## Target 1: >= {SPEED_TARGET:g}x throughput within {SPEED_POINTS} point\n")
    for batch in sorted(ref_ips):
        def speed(m: dict, b: int = batch) -> float:
            return next(x["throughput_ips"] for x in m["batches"] if x["batch_size"] == b) / ref_ips[b]
        within = [m for m in rows if m["accuracy"]["top1"] >= ref_top1 - SPEED_POINTS]
        best = max(within, key=speed)
        fastest = max(rows, key=speed)
        met = speed(best) >= SPEED_TARGET
        print(f"- batch {batch}: {'reached' if met else 'not reached'}: the fastest within {SPEED_POINTS} point is "
              f"{label(best)}, {speed(best):.2f}x at {best['accuracy']['top1'] - ref_top1:+.2f} points; the fastest "
              f"of all is {label(fastest)}, {speed(fastest):.2f}x at {fastest['accuracy']['top1'] - ref_top1:+.2f}")
        fast = sorted((m for m in rows if speed(m) >= SPEED_TARGET), key=lambda m: -m["accuracy"]["top1"])
        for m in fast:
            print(f"  - {SPEED_TARGET:g}x or more: {label(m)}, {speed(m):.2f}x at "
                  f"{m['accuracy']['top1'] - ref_top1:+.2f} points")
    print(f"\n## Target 2: <= {SIZE_TARGET_BYTES / 1e6:g} MB within {SIZE_POINTS} point\n")
    small = [m for m in rows if m["file_bytes"] <= SIZE_TARGET_BYTES]
    within = [m for m in small if m["accuracy"]["top1"] >= ref_top1 - SIZE_POINTS]
    if within:
        best = min(within, key=lambda m: m["file_bytes"])
        print(f"- reached: {label(best)}, {best['file_bytes'] / 1e6:.3f} MB at "
              f"{best['accuracy']['top1'] - ref_top1:+.2f} points")
    else:
        closest = max(small, key=lambda m: m["accuracy"]["top1"])
        print(f"- not reached: no file of at most {SIZE_TARGET_BYTES / 1e6:g} MB comes within {SIZE_POINTS} point; "
              f"the most accurate of them is {label(closest)}, {closest['file_bytes'] / 1e6:.3f} MB at "
              f"{closest['accuracy']['top1'] - ref_top1:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "studies/results/converged-cifar/bench.json"))
