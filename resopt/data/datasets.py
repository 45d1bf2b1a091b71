"""Image datasets: reading one image (every unreadable file named), ImageFolder with that reader, the
labels and classes of a dataset or subset, class-balanced subsets, and the class checks every command makes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.errors import DataError, UsageError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset


BAD_IMAGE_HINT = "remove or replace that file: resopt does not skip unreadable images, so that every " \
    "measured number covers the whole folder"


def load_image(path: str) -> Any:
    """One image as RGB (grayscale, palette and RGBA converted), or a ``DataError`` naming the file.

    Unreadable images are an error, never skipped: a silently smaller data set would change every
    accuracy resopt reports and records in lineage. A pipe or device named ``.jpg`` is refused before
    it is opened, because reading it could block forever.
    """
    import stat

    from PIL import Image, UnidentifiedImageError

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DataError(f"image {path} is not a regular file", hint=BAD_IMAGE_HINT)
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} cannot be opened (a dangling link?)", hint=BAD_IMAGE_HINT) from None
    except UnidentifiedImageError:
        reason = "an empty file" if os.path.getsize(path) == 0 else "not an image format PIL reads"
        raise DataError(f"image {path} cannot be decoded ({reason})", hint=BAD_IMAGE_HINT) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DataError(f"image {path} cannot be decoded ({reason})", hint=BAD_IMAGE_HINT) from None


def image_folder(folder: Path, transform: Any = None) -> Dataset:
    """torchvision ImageFolder with ``load_image`` (every unreadable file named); at least two classes."""
    from torchvision.datasets import ImageFolder

    _check_no_loops(folder)
    try:
        ds = ImageFolder(str(folder), transform=transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"cannot read images from {folder}: {str(e).splitlines()[0]}") from None
    if len(ds.classes) < 2:
        raise DataError(f"data folder {folder} has {len(ds.classes)} class folder"
                        f"{'s' * (len(ds.classes) != 1)} ({', '.join(ds.classes)}); a classifier needs at least 2",
                        hint="put each class's images in its own subfolder")
    return ds


def _check_no_loops(folder: Path) -> None:
    """A symlink that points back up the tree makes ImageFolder read the same images again and again."""
    seen: dict[str, str] = {}
    for dirpath, _dirs, _files in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            raise DataError(f"data folder {folder} reaches {real} twice ({seen[real]} and {dirpath}): a symlink "
                            f"loop or a duplicated folder would repeat its images",
                            hint="remove the symlink so every image is read once")
        seen[real] = dirpath


def targets_of(dataset: Dataset) -> list[int]:
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        parent = targets_of(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    return list(dataset.targets)  # type: ignore[attr-defined]


def classes_of(dataset: Dataset) -> list[str]:
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return list(dataset.classes)  # type: ignore[attr-defined]


def balanced_indices(targets: Sequence[int], per_class: int, *, seed: int = 0) -> list[int]:
    """Up to ``per_class`` indices of each class, drawn with ``seed``; sorted, so order is stable."""
    import random

    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for c in sorted(by_class):
        idx = by_class[c]
        chosen += idx if len(idx) <= per_class else rng.sample(idx, per_class)
    return sorted(chosen)


def limit_per_class(dataset: Dataset, per_class: int | None, *, seed: int = 0) -> Dataset:
    if per_class is None:
        return dataset
    if per_class < 1:
        raise UsageError(f"--limit-per-class must be at least 1, got {per_class}")
    from torch.utils.data import Subset

    return Subset(dataset, balanced_indices(targets_of(dataset), per_class, seed=seed))


def check_split_classes(train_classes: Sequence[str], test_classes: Sequence[str], *, data: str,
                        split: str = "test") -> None:
    """An evaluation split must hold the same class folders as train/ (else labels would not line up)."""
    if list(train_classes) == list(test_classes):
        return
    missing = [c for c in train_classes if c not in test_classes]
    extra = [c for c in test_classes if c not in train_classes]
    what = "; ".join(x for x in (f"lacks {', '.join(missing[:5])}" if missing else "",
                                 f"has extra {', '.join(extra[:5])}" if extra else "") if x)
    raise DataError(f"the {split} split of data {data} does not have train/'s classes: it {what}",
                    hint=f"give train/ and {split}/ the same class folders")


def check_classes(model_classes: Sequence[str], data_classes: Sequence[str], *, model_name: str, data: str) -> None:
    """The data must have the classes the model predicts, in the same order."""
    if list(model_classes) == list(data_classes):
        return
    if len(model_classes) != len(data_classes):
        raise DataError(f"{model_name} predicts {len(model_classes)} classes but data {data} has "
                        f"{len(data_classes)}", hint="use the data the model was trained on")
    raise DataError(f"{model_name} was trained on classes {list(model_classes)[:4]}... but data {data} has "
                    f"{list(data_classes)[:4]}...", hint="use the data the model was trained on")


def stack_images(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` samples as one (images, labels) pair of tensors."""
    import torch

    n = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    xs, ys = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.tensor(ys)
