"""The three splits every command shares: ``train`` (fit), ``val`` (every choice: best epoch, the quantize
guard, pruning sensitivity, iterative steps) and ``test`` (reported, never used to choose).

Validation is the data's own ``val/`` folder when it has ``train/``, ``val/`` and ``test/``; otherwise a
stratified, seeded hold-out of train (``DEFAULT_VAL_FRACTION`` of each class, ``--val-split`` to change it).
The hold-out is drawn from the *whole* train split, before ``--limit-per-class``, so it depends only on the
data, the fraction and the seed: the lineage records those (``ValSplit.to_dict``) with the sha256 of the
held-out file list, and every later command on that model's lineage (prune or distill fine-tuning, QAT, the
quantize guard) re-derives the same held-out images from the record, so a child never trains on its
parent's validation images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import Preprocess
from resopt.console import warn
from resopt.data.datasets import check_split_classes, classes_of, limit_per_class, targets_of
from resopt.data.sources import DataSource, resolve_data
from resopt.data.transforms import eval_transform
from resopt.errors import DataError, UsageError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

DEFAULT_VAL_FRACTION = 0.1
SELECT = ("best", "last")  # --select: the epoch kept by fine-tuning loops
UNKNOWN = "split unknown"  # what an artifact written before splits were recorded shows


def split_of(metrics: dict[str, Any] | None) -> str:
    """The split a lineage step's ``top1``/``top5`` were measured on: ``test`` or ``val``, or "split unknown"
    for a step written before the split was recorded (never assumed to be test)."""
    split = (metrics or {}).get("split")
    return split if split in ("test", "val") else UNKNOWN


def check_val_fraction(fraction: float) -> float:
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--val-split must be in (0, 1), got {fraction}",
                         hint=f"it is the fraction of each class of train/ held out for validation "
                              f"(default {DEFAULT_VAL_FRACTION})")
    return fraction


@dataclass(frozen=True)
class ValSplit:
    """Where the validation images come from: the data's ``val/`` folder, or a hold-out of train."""

    origin: str  # "folder" or "holdout"
    fraction: float | None = None  # holdout only
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        if self.origin == "folder":
            return {"from": "folder"}
        return {"from": "holdout", "fraction": self.fraction, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValSplit:
        if d.get("from") == "folder":
            return cls("folder")
        return cls("holdout", float(d["fraction"]), int(d.get("seed", 0)))

    def describe(self, images: int) -> str:
        if self.origin == "folder":
            return f"{images:,} images of val/"
        return f"{images:,} images held out of train"


def recorded_val_split(lineage: Sequence[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The validation split the newest lineage step recorded (with its ``sha256`` and ``held_out`` count), or
    None for a model trained before splits were recorded (or imported)."""
    for entry in reversed(list(lineage or [])):
        val = ((entry.get("metrics") or {}).get("splits") or {}).get("val")
        if isinstance(val, dict) and val.get("from") in ("folder", "holdout"):
            return val
    return None


def choose_val_split(source: DataSource, *, requested: float | None, seed: int,
                     recorded: dict[str, Any] | None = None) -> ValSplit:
    """The validation split a command uses: the one its model's lineage recorded (a different ``--val-split``
    is refused: the child would fine-tune on its parent's validation images), else ``--val-split``, else the
    data's ``val/`` folder, else the default hold-out."""
    if requested is not None:
        check_val_fraction(requested)
    if recorded is not None:
        r = ValSplit.from_dict(recorded)
        if requested is not None and (r.origin != "holdout" or abs(requested - (r.fraction or 0.0)) > 1e-9):
            was = "the data's val/ folder" if r.origin == "folder" else f"a {r.fraction:g} hold-out (seed {r.seed})"
            raise UsageError(f"--val-split {requested:g} differs from the validation split the model's lineage "
                             f"records ({was}); fine-tuning would train on its parent's validation images",
                             hint="drop --val-split: the recorded split is re-derived")
        if r.origin == "folder" and source.val_dir is None:
            warn(f"the model was validated on a val/ folder, which data {source.spec} lacks; holding out "
                 f"{DEFAULT_VAL_FRACTION:g} of train instead")
            return ValSplit("holdout", DEFAULT_VAL_FRACTION, seed)
        return r
    if requested is not None:
        return ValSplit("holdout", requested, seed)
    if source.val_dir is not None:
        return ValSplit("folder")
    return ValSplit("holdout", DEFAULT_VAL_FRACTION, seed)


def holdout_indices(targets: Sequence[int], fraction: float, *, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit, held out) indices: ``fraction`` of each class (at least one image) held out, drawn with ``seed``."""
    import random

    check_val_fraction(fraction)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    rng = random.Random(seed)
    fit: list[int] = []
    held: list[int] = []
    for c in sorted(by_class):
        idx = list(by_class[c])
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, max(1, int(round(len(idx) * fraction))))
        held += idx[:n_val]
        fit += idx[n_val:]
    return sorted(fit), sorted(held)


def split_validation(dataset: Dataset, fraction: float, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A stratified hold-out of ``dataset``: (the rest, ``fraction`` of each class)."""
    from torch.utils.data import Subset

    fit, held = holdout_indices(targets_of(dataset), fraction, seed=seed)
    return Subset(dataset, fit), Subset(dataset, held)


def file_names(dataset: Dataset, indices: Sequence[int] | None = None) -> list[str]:
    """The images of ``dataset`` (at ``indices``) by name relative to their folder (ImageFolder), or by index
    (torchvision's CIFAR arrays): what the lineage's ``sha256`` of a split is taken over."""
    samples = getattr(dataset, "samples", None)
    idx = range(len(dataset)) if indices is None else indices  # type: ignore[arg-type]
    if samples is None:
        return [str(i) for i in idx]
    root = Path(dataset.root)  # type: ignore[attr-defined]
    return [Path(samples[i][0]).relative_to(root).as_posix() for i in idx]


def names_sha256(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


@dataclass
class Splits:
    """The three datasets of one command, and what its lineage records about them."""

    fit: Dataset
    val: Dataset
    test: Dataset | None
    classes: list[str]
    val_split: ValSplit
    val_sha256: str
    held_out: int  # images in the validation split before --limit-per-class

    def record(self) -> dict[str, Any]:
        """The lineage's ``splits``: per split how many images, and how validation was chosen."""
        return {"train": {"images": len(self.fit)},  # type: ignore[arg-type]
                "val": {**self.val_split.to_dict(), "images": len(self.val), "held_out": self.held_out,  # type: ignore[arg-type]
                        "sha256": self.val_sha256},
                "test": {"images": len(self.test) if self.test is not None else 0}}  # type: ignore[arg-type]


def make_splits(source: DataSource, val_split: ValSplit, *, train_tf: Any, eval_tf: Any,
                per_class: int | None = None, seed: int = 0, recorded_sha256: str | None = None) -> Splits:
    """train/val/test of ``source`` with these transforms; validation per ``val_split``, each split limited to
    ``per_class`` images of each class afterwards. ``recorded_sha256``: the held-out file list the parent
    recorded; a different one here means other data, and is warned about."""
    from torch.utils.data import Subset

    train_aug = source.dataset("train", train_tf)
    classes = classes_of(train_aug)
    fit: Dataset
    val: Dataset
    if val_split.origin == "folder":
        val = source.dataset("val", eval_tf)
        check_split_classes(classes, classes_of(val), data=source.spec, split="val")
        fit, names = train_aug, file_names(val)
    else:
        assert val_split.fraction is not None
        train_eval = source.dataset("train", eval_tf)
        fit_idx, held_idx = holdout_indices(targets_of(train_aug), val_split.fraction, seed=val_split.seed)
        fit, val = Subset(train_aug, fit_idx), Subset(train_eval, held_idx)
        names = file_names(train_eval, held_idx)
    sha = names_sha256(names)
    if recorded_sha256 is not None and recorded_sha256 != sha:
        warn(f"the validation images re-derived from data {source.spec} differ from the ones the model's lineage "
             f"records (sha256 {sha[:12]}, recorded {recorded_sha256[:12]}): is this the data it was trained on?")
    test: Dataset | None = None
    if source.has_test and not source.bare:  # a bare folder's test images would be its training images
        test = source.dataset("test", eval_tf)
        check_split_classes(classes, classes_of(test), data=source.spec)
        test = limit_per_class(test, per_class, seed=seed)
    return Splits(limit_per_class(fit, per_class, seed=seed), limit_per_class(val, per_class, seed=seed), test,
                  classes, val_split, sha, len(names))


def load_eval_set(spec: str | Path, pre: Preprocess, *, split: str = "test", per_class: int | None = None,
                  seed: int = 0) -> Dataset:
    """A split of ``spec`` with the model's eval preprocessing, optionally class-balanced and limited."""
    source = resolve_data(spec)
    ds = source.dataset(split, eval_transform(pre))
    return limit_per_class(ds, per_class, seed=seed)


def load_report_set(spec: str | Path, pre: Preprocess, *, per_class: int | None = None, seed: int = 0,
                    lineage: Sequence[dict[str, Any]] | None = None) -> tuple[Dataset, str]:
    """(images, split) an evaluation-only command reports on: the test split, or where the data has none
    (train/ only) its validation split; e.g. ``import``'s sanity check."""
    source = resolve_data(spec)
    if source.has_test:
        return load_eval_set(spec, pre, split="test", per_class=per_class, seed=seed), "test"
    return load_val_set(spec, pre, lineage=lineage, per_class=per_class, seed=seed)[0], "val"


def load_val_set(spec: str | Path, pre: Preprocess, *, lineage: Sequence[dict[str, Any]] | None,
                 requested: float | None = None, per_class: int | None = None, seed: int = 0) -> tuple[
                     Dataset, ValSplit]:
    """The validation images of ``spec`` for a model with this lineage (re-derived from its record), with the
    model's eval preprocessing: what an evaluation-only command (the quantize guard) chooses on."""
    source = resolve_data(spec)
    if source.kind == "folder" and (source.train_dir is None or source.bare) and source.val_dir is None:
        raise DataError(f"data {spec} has no train/ or val/ folder to take validation images from",
                        hint="pass the data the model was trained on (a folder with train/ and test/)")
    recorded = recorded_val_split(lineage)
    vs = choose_val_split(source, requested=requested, seed=seed, recorded=recorded)
    tf = eval_transform(pre)
    splits = make_splits(source, vs, train_tf=tf, eval_tf=tf, per_class=per_class, seed=seed,
                         recorded_sha256=(recorded or {}).get("sha256") if recorded and
                         ValSplit.from_dict(recorded) == vs else None)
    return splits.val, vs
