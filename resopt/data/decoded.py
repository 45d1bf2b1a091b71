"""The fast data path for small images: decode once, augment per batch as tensor operations.

The PIL path decodes every JPEG and runs the augmentation image by image, every epoch; for CIFAR-size
images that costs more than the forward and backward pass of a small ResNet. Here the split is decoded once
(with the same ``load_image`` and the same resize / center crop as the PIL path, so the pixels are identical)
into one ``uint8`` tensor N x 3 x H x W, moved to the training device, and each batch is cropped (zero
padding of ``size // 8``, a random crop), flipped and normalized there. The random draws (order, crop
offsets, flips) come from one seeded CPU generator per loader, so the same seed gives the same batches, and
resuming restores that generator like the PIL path's DataLoader generator.

``DecodedImages`` is still a ``Dataset`` (``__getitem__`` gives one augmented, normalized image), so code
that does not know the fast path (``stack_images``, a ``Subset``, a plain DataLoader) works unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from resopt.artifacts import Preprocess
from resopt.errors import UsageError, choice_error

DATA_PATHS = ("auto", "fast", "pil")
MAX_FAST_SIZE = 64  # larger (ImageNet-size) inputs use RandomResizedCrop, which stays on the PIL path
MEMORY_FRACTION = 0.25  # auto: the decoded images may take at most this share of free RAM / GPU memory


def fast_path_applies(pre: Preprocess) -> bool:
    """Small images trained at their native size (CIFAR-style augmentation, no eval resize)."""
    return pre.resize is None and pre.input_size <= MAX_FAST_SIZE


def crop_padding(pre: Preprocess) -> int:
    """The zero padding of the random crop, as in ``data.train_transform``."""
    return max(1, pre.input_size // 8)


def decode_transform(pre: Preprocess) -> Any:
    """PIL image -> uint8 tensor: the deterministic part of both ``train_transform`` and ``eval_transform``
    for small images (the later ``ToTensor`` is this divided by 255)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(pre.input_size), T.CenterCrop(pre.input_size), T.PILToTensor()])


def available_memory(device: torch.device | None) -> tuple[int, int | None]:
    """(free RAM, free memory of ``device`` if it is a CUDA device) in bytes."""
    ram = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if not ram:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    gpu = None
    if device is not None and device.type == "cuda":
        gpu = int(torch.cuda.mem_get_info(device)[0])
    return ram, gpu


@dataclass(frozen=True)
class PathChoice:
    path: str  # "fast" or "pil"
    reason: str


def choose_data_path(requested: str, pre: Preprocess, n_images: int, *, device: torch.device | None = None,
                     fraction: float = MEMORY_FRACTION) -> PathChoice:
    """Which path a command takes: ``pil`` when asked or for large images; ``fast`` when asked; ``auto``:
    ``fast`` when the decoded images fit in ``fraction`` of free RAM (and of free GPU memory when training
    on CUDA), every process of this machine counted under torchrun."""
    if requested not in DATA_PATHS:
        raise choice_error("data-path", requested, DATA_PATHS)
    if requested == "pil":
        return PathChoice("pil", "--data-path pil")
    if not fast_path_applies(pre):
        if requested == "fast":
            raise UsageError(f"--data-path fast is for images of at most {MAX_FAST_SIZE} px trained at their "
                             f"native size; this model takes {pre.input_size} px with a resize to {pre.resize}",
                             hint="use --data-path pil (or auto) for large images")
        return PathChoice("pil", f"input {pre.input_size} px is larger than the fast path's {MAX_FAST_SIZE} px")
    if requested == "fast":
        return PathChoice("fast", "--data-path fast")
    need = n_images * 3 * pre.input_size * pre.input_size * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    ram, gpu = available_memory(device)
    for what, free in (("free RAM", ram), ("free GPU memory", gpu)):
        if free is not None and need > fraction * free:
            return PathChoice("pil", f"{n_images} decoded images need {need / 2**20:.0f} MiB, more than "
                                     f"{fraction:.0%} of the {free / 2**20:.0f} MiB of {what}")
    return PathChoice("fast", f"{n_images} decoded images fit in {need / 2**20:.1f} MiB")


# ------------------------------------------------------------------------------------------ decoding


class DecodedImages(Dataset):
    """A split decoded into ``images`` (uint8, N x 3 x H x W) and ``labels``, with the normalization and
    (for training) the crop padding to apply per batch. A ``Dataset``: ``ds[i]`` is one image as the
    PIL path gives it (augmented with the global torch RNG when ``pad`` is set)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], *,
                 mean: tuple[float, ...], std: tuple[float, ...], pad: int | None) -> None:
        self.images = images
        self.labels = labels
        self.classes = classes
        self.mean = mean
        self.std = std
        self.pad = pad

    @property
    def targets(self) -> list[int]:
        return [int(t) for t in self.labels.tolist()]

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i : i + 1]
        if self.pad is not None:
            offsets = torch.randint(0, 2 * self.pad + 1, (1, 2))
            flips = torch.rand(1) < 0.5
            x = crop_flip(x, offsets, flips, self.pad)
        return normalize(x, self.mean, self.std)[0], int(self.labels[i])


def decode_images(dataset: Dataset, pre: Preprocess, classes: list[str], *, augment: bool, what: str,
                  workers: int | None = None) -> DecodedImages:
    """Decode ``dataset`` (whose transform is ``decode_transform(pre)``) into a ``DecodedImages``, in
    parallel worker processes for large sets."""
    from resopt.console import progress
    from resopt.data import make_loader

    n = len(dataset)  # type: ignore[arg-type]
    if workers is None:
        workers = 0 if n < 4000 else min(8, os.cpu_count() or 1)
    loader = make_loader(dataset, 500, shuffle=False, workers=workers)
    size = pre.input_size
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    pos = 0
    with progress(f"decoding {n} {what} images", total=len(loader)) as bar:
        for x, y in loader:
            images[pos : pos + len(x)] = x
            labels[pos : pos + len(x)] = y
            pos += len(x)
            bar.advance(1)
    return DecodedImages(images, labels, classes, mean=tuple(pre.mean), std=tuple(pre.std),
                         pad=crop_padding(pre) if augment else None)


# ---------------------------------------------------------------------------------- batch operations


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """The PIL path's ``RandomCrop(size, padding=pad)`` then ``RandomHorizontalFlip`` for a whole batch:
    image b is cropped at row ``offsets[b, 0]``, column ``offsets[b, 1]`` of its zero-padded copy, and
    mirrored where ``flips[b]``. One gather, on whatever device ``x`` is on."""
    import torch.nn.functional as F

    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # B x H+2p x W+2p x C
    offsets = offsets.to(dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flips.to(dev)[:, None], w - 1 - cols, cols) + offsets[:, 1:2]
    rows = torch.arange(h, device=dev)[None, :] + offsets[:, 0:1]
    out = padded[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 -> float32 as ``ToTensor`` then ``Normalize`` compute it (divide by 255, subtract, divide)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[None, :, None, None]
    return x.float().div_(255).sub_(m).div_(s)


class TensorBatches:
    """The DataLoader of a ``DecodedImages``: the whole tensor on ``device`` once, then per epoch a seeded
    order (and crop offsets and flips for every image), cut into batches. Under torchrun every process
    draws the same order from the same seed and keeps positions ``rank, rank + world, ...`` (the tail that
    does not divide evenly is dropped when ``drop_last``, as ``DistributedSampler`` does)."""

    def __init__(self, data: DecodedImages, batch_size: int, *, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1) -> None:
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    def _local_count(self) -> int:
        n = len(self.data)
        if self.world_size > 1:
            n = n // self.world_size if self.drop_last else len(range(self.rank, n, self.world_size))
        return n

    def __len__(self) -> int:
        n = self._local_count()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Any:
        if self._images is None:
            self._images = self.data.images.to(self.device)
            self._labels = self.data.labels.to(self.device)
        assert self._labels is not None
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        pad = self.data.pad
        if pad is not None:
            offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=self.generator)
            flips = torch.randint(0, 2, (n,), generator=self.generator).bool()
        positions = torch.arange(n)
        if self.world_size > 1:
            end = n // self.world_size * self.world_size if self.drop_last else n
            positions = positions[self.rank : end : self.world_size]
        for k in range(len(self)):
            pos = positions[k * self.batch_size : (k + 1) * self.batch_size]
            idx = order[pos].to(self.device)
            x = self._images[idx]
            if pad is not None:
                x = crop_flip(x, offsets[pos], flips[pos], pad)
            yield normalize(x, self.data.mean, self.data.std), self._labels[idx]
