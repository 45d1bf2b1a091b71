"""How images become tensors: the input size and normalization decided once, at train time, from the
training images (stored in the checkpoint as a ``Preprocess`` and read back by every later command), and
the train (augmenting) and eval transforms built from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import Preprocess
from resopt.data.datasets import balanced_indices, load_image, targets_of
from resopt.data.sources import IMAGE_SUFFIXES, DataSource
from resopt.errors import DataError

if TYPE_CHECKING:
    from torch.utils.data import Dataset


def probe_image_size(source: DataSource, *, samples: int = 16) -> int:
    """The smaller side of the first images of the training split (CIFAR pickles: 32)."""
    if source.kind == "torchvision":
        return 32
    folder = source.train_dir or source.test_dir
    assert folder is not None
    sizes = []
    for dirpath, _dirs, files in sorted(os.walk(folder)):
        for f in sorted(files):
            if f.lower().endswith(IMAGE_SUFFIXES):
                sizes.append(min(load_image(str(Path(dirpath) / f)).size))
                if len(sizes) >= samples:
                    return max(sizes)
    if not sizes:
        raise DataError(f"no images in {folder}")
    return max(sizes)


def decide_input_size(source: DataSource, requested: int | None, arch_default: int) -> tuple[int, int | None]:
    """(input_size, eval resize). Small images (<= 64 px) train at native size; larger ones use the
    architecture's size with the usual resize-to-size/0.875 then center crop at evaluation."""
    native = probe_image_size(source)
    if requested is not None:
        size = requested
    else:
        size = native if native <= 64 else arch_default
    resize = None if native <= 64 and size <= native else int(round(size / 0.875))
    return size, resize


def compute_normalization(dataset_no_transform: Dataset, *, samples: int = 1000, seed: int = 0) -> tuple[
        tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of a class-balanced sample of the training images."""
    import torch
    from torchvision.transforms import functional as F

    targets = targets_of(dataset_no_transform)
    n_classes = max(len(set(targets)), 1)
    idx = balanced_indices(targets, max(1, samples // n_classes), seed=seed)
    s = torch.zeros(3, dtype=torch.float64)
    sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in idx:
        img, _ = dataset_no_transform[i]
        t = F.to_tensor(img).to(torch.float64)
        s += t.sum(dim=(1, 2))
        sq += (t * t).sum(dim=(1, 2))
        count += t.shape[1] * t.shape[2]
    mean = s / count
    std = (sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return (tuple(round(float(x), 4) for x in mean), tuple(round(float(x), 4) for x in std))  # type: ignore


def train_transform(pre: Preprocess) -> Any:
    from torchvision import transforms as T

    norm = T.Normalize(pre.mean, pre.std)
    if pre.resize is None:  # CIFAR-style augmentation for small images
        return T.Compose([T.Resize(pre.input_size), T.CenterCrop(pre.input_size),
                          T.RandomCrop(pre.input_size, padding=max(1, pre.input_size // 8)),
                          T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.RandomResizedCrop(pre.input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])


def eval_transform(pre: Preprocess) -> Any:
    from torchvision import transforms as T

    return T.Compose([T.Resize(pre.resize or pre.input_size), T.CenterCrop(pre.input_size), T.ToTensor(),
                      T.Normalize(pre.mean, pre.std)])


