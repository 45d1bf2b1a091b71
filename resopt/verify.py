"""The one compare-and-check every transform uses: a result against its parent on the same real images.

``compare`` runs a reference and a candidate (each ``batch -> logits``) over the same batches and returns
one typed ``Parity``: max and mean absolute logit difference, top-1 agreement in **percent**, the number of
images and where they came from, and (when the batches carry labels) top-1/top-5 of both. ``Parity.check``
applies a command's bounds (a minimum agreement, a maximum difference) and raises ``VerificationError``
with the numbers. export (PyTorch vs onnxruntime), quantize (result vs parent), build (engine vs ONNX) and
import (imported graph vs source) all record its ``metrics()`` in their lineage entry, so a key has one
meaning everywhere: ``top1_agreement`` is a percentage.

Artifacts written before this module stored ``top1_agreement`` from export and import as a fraction;
``agreement_percent`` reads either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from resopt.errors import VerificationError

Predict = Callable[[Any], Any]  # a batch (N, C, H, W) float32 array -> logits (N, classes)


@dataclass(frozen=True)
class Parity:
    """A transformed model against its reference on the same images. Agreement and accuracies are percent."""

    images: int
    source: str  # the images it was measured on (a data set, a folder, "calibration" ...)
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float  # percent of images where both pick the same class
    logit_scale: float  # max |reference logit|, at least 1: the scale a relative tolerance applies to
    top1: float | None = None  # the candidate's accuracy, when the images have labels
    top5: float | None = None
    parent_top1: float | None = None  # the reference's accuracy on the same images
    parent_top5: float | None = None
    min_agreement: float | None = None  # the bounds it was checked against (set by ``check``)
    allowed_abs_diff: float | None = None

    def check(self, *, what: str, against: str, min_agreement: float | None = None,
              allowed_abs_diff: float | None = None, hint: str | None = None) -> Parity:
        """This parity with its bounds recorded, or ``VerificationError`` naming the numbers if it misses one."""
        where = f"{self.images} images of {self.source}"
        if allowed_abs_diff is not None and not self.max_abs_diff <= allowed_abs_diff:
            raise VerificationError(
                f"{what} differs from {against} by up to {self.max_abs_diff:.4g} > allowed {allowed_abs_diff:.4g} "
                f"(logit scale {self.logit_scale:.3g}) on {where}; top-1 agreement {self.top1_agreement:.2f}%",
                hint=hint)
        if min_agreement is not None and self.top1_agreement < min_agreement:
            accuracy = "" if self.top1 is None or self.parent_top1 is None else \
                f", top-1 {self.top1:.2f}% vs {self.parent_top1:.2f}%"
            raise VerificationError(
                f"{what} agrees with {against} on only {self.top1_agreement:.2f}% of top-1 predictions "
                f"(need >= {min_agreement:g}%) on {where}; max |diff| {self.max_abs_diff:.4g}{accuracy}", hint=hint)
        return replace(self, min_agreement=min_agreement, allowed_abs_diff=allowed_abs_diff)

    def metrics(self) -> dict[str, Any]:
        """The lineage/JSON form: every field that is set, rounded for reading."""
        out: dict[str, Any] = {"images": self.images, "data": self.source,
                               "max_abs_diff": round(self.max_abs_diff, 6) if _finite(self.max_abs_diff)
                               else self.max_abs_diff,
                               "mean_abs_diff": round(self.mean_abs_diff, 6), "top1_agreement": self.top1_agreement,
                               "logit_scale": round(self.logit_scale, 4)}
        for key in ("top1", "top5", "parent_top1", "parent_top5", "min_agreement", "allowed_abs_diff"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 6) if key == "allowed_abs_diff" else value
        return out


def _finite(x: float) -> bool:
    import math

    return math.isfinite(x)


def parity_of(reference: Any, candidate: Any, labels: Any | None = None, *, source: str) -> Parity:
    """``Parity`` of two logit arrays of the same images (and their labels, for top-1/top-5 of both)."""
    import numpy as np

    from resopt.metrics import TopK

    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(candidate, dtype=np.float64)
    if ref.shape != got.shape or ref.ndim != 2 or len(ref) == 0:
        raise VerificationError(f"the compared models returned logits of shapes {got.shape} and {ref.shape} for "
                                f"the same images of {source}")
    diff = np.abs(got - ref)
    finite = bool(np.isfinite(diff).all())
    parity = Parity(images=len(ref), source=source,
                    max_abs_diff=float(diff.max()) if finite else float("inf"),
                    mean_abs_diff=float(diff.mean()) if finite else float("inf"),
                    top1_agreement=round(100.0 * float((got.argmax(1) == ref.argmax(1)).mean()), 3),
                    logit_scale=max(1.0, float(np.abs(ref).max())))
    if labels is None:
        return parity
    mine, parent = TopK(), TopK()
    mine.update(got, np.asarray(labels))
    parent.update(ref, np.asarray(labels))
    return replace(parity, top1=round(mine.top1, 3), top5=round(mine.top5, 3), parent_top1=round(parent.top1, 3),
                   parent_top5=round(parent.top5, 3))


def compare(reference: Predict, candidate: Predict, batches: Iterable[tuple[Any, Any]], *, source: str,
            total: int | None = None, description: str | None = None) -> Parity:
    """Run both models over ``batches`` of ``(images, labels)`` (labels may be None) and compare them.

    With ``description`` a progress bar (stderr) counts the batches.
    """
    import contextlib

    import numpy as np

    from resopt.console import progress

    refs, outs, labels = [], [], []
    with progress(description, total=total) if description else contextlib.nullcontext() as bar:
        for x, y in batches:
            r, c = np.asarray(reference(x)), np.asarray(candidate(x))
            if r.shape != c.shape or len(r) != len(x):
                raise VerificationError(f"for a batch of {len(x)} images of {source} the models returned logits "
                                        f"of shapes {c.shape} and {r.shape}")
            refs.append(r)
            outs.append(c)
            if y is not None:
                labels.append(np.asarray(y))
            if bar is not None:
                bar.advance(1)
    if not refs:
        from resopt.errors import DataError

        raise DataError(f"no images of {source} to compare the models on")
    return parity_of(np.concatenate(refs), np.concatenate(outs),
                     np.concatenate(labels) if len(labels) == len(refs) else None, source=source)


def top1_of(predict: Predict, batches: Iterable[tuple[Any, Any]]) -> float:
    """top-1 (%) of ``predict`` over labelled ``batches``."""
    from resopt.metrics import TopK

    acc = TopK()
    for x, y in batches:
        acc.update(predict(x), y)
    return acc.top1


def agreement_percent(command: str, metrics: dict[str, Any]) -> float | None:
    """``top1_agreement`` of a lineage entry in percent, whichever resopt wrote it.

    Before ``resopt.verify``, export and import stored it as a fraction of 1 (a perfect export read
    ``top1_agreement=1``). Both gate on the logit difference (within about 1% of the logit scale), which
    leaves the argmax unchanged on nearly every image, so an export or import with 1% agreement or less
    cannot pass: for those two commands a value <= 1 is an old fraction.
    """
    value = metrics.get("top1_agreement")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    legacy_fraction = command in ("export", "import") and value <= 1.0
    return round(100.0 * float(value), 3) if legacy_fraction else float(value)
