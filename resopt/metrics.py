"""Accuracy bookkeeping shared by every backend (numpy, so ONNX and TensorRT outputs use it too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TopK:
    """Running top-1 / top-5 counts."""

    n: int = 0
    correct1: int = 0
    correct5: int = 0
    loss_sum: float = 0.0
    nonfinite: int = 0  # samples whose logits hold NaN or inf (their argmax is meaningless)
    _extra: dict[str, Any] = field(default_factory=dict)

    def update(self, logits: Any, labels: Any, loss: float | None = None) -> None:
        import numpy as np

        logits = np.asarray(logits, dtype=np.float32)
        labels = np.asarray(labels).reshape(-1)
        k = min(5, logits.shape[1])
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k] if k < logits.shape[1] else \
            np.argsort(-logits, axis=1)[:, :k]
        self.correct1 += int((logits.argmax(axis=1) == labels).sum())
        self.correct5 += int((top == labels[:, None]).any(axis=1).sum())
        self.n += len(labels)
        if loss is not None:
            self.loss_sum += float(loss) * len(labels)

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / max(self.n, 1)

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / max(self.n, 1)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = {"top1": round(self.top1, 3), "top5": round(self.top5, 3), "images": self.n}
        if self.nonfinite:
            d["nonfinite_outputs"] = self.nonfinite
        return d
