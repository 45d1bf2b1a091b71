"""The accuracy guard: keep the layers that cost the most accuracy in FP32 until the top-1 drop is within
``--max-drop``, or fail with ``AccuracyGateError`` (exit 7) naming what was tried.

Sensitivity is measured per layer on calibration images: the model is quantized with *only* that layer
in INT8 and the signal-to-quantization-noise ratio of its logits against the FP32 logits is taken
(SQNR = 10 log10(|y|^2 / |y - y_q|^2), in dB; low = sensitive). One layer at a time isolates each layer's
own error instead of the error it inherits from the layers before it, which is what decides whether
keeping it in FP32 helps. The calibrated ranges are computed once and reused for every re-quantization.

The drop itself is measured on the ``--data`` validation split (the one the model's lineage records,
re-derived; never test, which the chosen model is reported on). Layers are kept
in FP32 worst first, in growing steps (1, 2, 3, 4, 6, 8, ...), up to ``max_exclude`` layers: past a
quarter of the layers most of the INT8 speed is gone, so that is the default bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from resopt.console import log, progress
from resopt.errors import AccuracyGateError

if TYPE_CHECKING:
    import numpy as np



class Build(Protocol):
    """Writes the quantized model to ``dst``: all layers but ``exclude`` in INT8, or only ``only``."""

    def __call__(self, dst: Path, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> None: ...


@dataclass(frozen=True)
class GuardStep:
    excluded: tuple[str, ...]
    top1: float
    drop: float


@dataclass(frozen=True)
class GuardResult:
    parent_top1: float
    steps: tuple[GuardStep, ...]
    sensitivity: tuple[tuple[str, float], ...]  # (node, logit SQNR dB with only it quantized), worst first
    max_drop: float

    @property
    def chosen(self) -> GuardStep:
        return self.steps[-1]

    def summary(self) -> dict[str, Any]:
        return {"max_drop": self.max_drop, "parent_top1": round(self.parent_top1, 3),
                "excluded": list(self.chosen.excluded), "drop": round(self.chosen.drop, 3),
                "steps": [{"excluded": len(s.excluded), "top1": round(s.top1, 3), "drop": round(s.drop, 3)}
                          for s in self.steps],
                "sensitivity_db": [{"node": n, "sqnr_db": round(v, 2)} for n, v in self.sensitivity]}


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    import numpy as np

    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return 200.0 if noise == 0 else 10.0 * math.log10(max(signal, 1e-30) / noise)


def exclusion_steps(n: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... up to n (n itself included)."""
    steps, k = [], 1
    while k < n:
        steps.append(k)
        k = k + 1 if k < 4 else k + k // 2
    return [*steps, n] if n > 0 else []


def layer_sensitivity(build: Build, layers: list[str], fp32: Path, images: np.ndarray, workdir: Path,
                      ) -> list[tuple[str, float]]:
    """(layer, logit SQNR dB) with only that layer quantized, most sensitive first."""
    from resopt.backends.ort_backend import make_session

    ref_sess = make_session(fp32)
    name = ref_sess.get_inputs()[0].name
    ref = ref_sess.run(None, {name: images})[0]
    scores = []
    with progress("layer sensitivity", total=len(layers)) as bar:
        for layer in layers:
            path = workdir / "only.onnx"
            build(path, only=(layer,))
            sess = make_session(path)
            scores.append((layer, sqnr_db(ref, sess.run(None, {sess.get_inputs()[0].name: images})[0])))
            bar.advance(1)
    return sorted(scores, key=lambda kv: kv[1])


def run_guard(build: Build, *, fp32: Path, layers: list[str], base_exclude: tuple[str, ...], max_drop: float,
              max_exclude: int | None, eval_batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
              calib_images: np.ndarray, workdir: Path, output: Path) -> GuardResult:
    """Quantize with ``base_exclude``; if top-1 drops more than ``max_drop`` points, keep the most sensitive
    of ``layers`` in FP32 step by step. On success the chosen model is at ``output``."""
    from resopt.backends.ort_backend import onnx_predict
    from resopt.verify import top1_of

    parent_top1 = top1_of(onnx_predict(fp32), eval_batches())
    build(output, exclude=base_exclude)
    top1 = top1_of(onnx_predict(output), eval_batches())
    steps = [GuardStep(base_exclude, top1, parent_top1 - top1)]
    log(f"accuracy guard: FP32 top-1 {parent_top1:.2f}%, INT8 {top1:.2f}% (drop {parent_top1 - top1:.2f}, "
        f"allowed {max_drop:g})")
    if steps[-1].drop <= max_drop:
        return GuardResult(parent_top1, tuple(steps), (), max_drop)
    candidates = [la for la in layers if la not in base_exclude]
    bound = max(1, len(candidates) // 4) if max_exclude is None else min(max_exclude, len(candidates))
    ranking = layer_sensitivity(build, candidates, fp32, calib_images, workdir)
    trial = workdir / "trial.onnx"
    for k in exclusion_steps(bound):
        exclude = base_exclude + tuple(n for n, _ in ranking[:k])
        build(trial, exclude=exclude)
        top1 = top1_of(onnx_predict(trial), eval_batches())
        steps.append(GuardStep(exclude, top1, parent_top1 - top1))
        log(f"accuracy guard: {k} layer(s) in FP32 -> top-1 {top1:.2f}% (drop {parent_top1 - top1:.2f})")
        if steps[-1].drop <= max_drop:
            trial.replace(output)
            return GuardResult(parent_top1, tuple(steps), tuple(ranking), max_drop)
    best = min(steps, key=lambda s: s.drop)
    tried = ", ".join(f"{len(s.excluded) - len(base_exclude)} in FP32: {s.drop:.2f}" for s in steps)
    raise AccuracyGateError(
        f"no setting met --max-drop {max_drop:g}: best top-1 drop {best.drop:.2f} points "
        f"(FP32 {parent_top1:.2f}%); tried {tried}",
        hint=f"allow more layers in FP32 (--max-exclude, now {bound}), raise --max-drop, or try "
             f"--calib-method percentile / entropy")
