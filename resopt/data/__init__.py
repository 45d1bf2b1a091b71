"""Data: where images come from, how they become tensors, and class-balanced subsets.

``--data`` is either a folder in ImageFolder layout with ``train/`` and ``test/`` (or ``val/``) inside, a
bare ImageFolder (class folders directly, like ``calib/``), or the name ``cifar10`` / ``cifar100``,
looked up under ``$RESOPT_DATA`` in ImageFolder or torchvision layout and downloaded there through
torchvision only if it is missing (a clear error offline).

Preprocessing (input size, mean, std) is decided once, at train time, from the training images, stored
in the checkpoint as a ``Preprocess``, and read back by every later command.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import Preprocess
from resopt.errors import DataError, UsageError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
KNOWN_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
# The folder torchvision unpacks each into, under the data home.
_TV_FOLDERS = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}
TEST_SPLIT_NAMES = ("test", "val", "validation")


def data_home() -> Path:
    return Path(os.environ.get("RESOPT_DATA", Path.home() / ".cache" / "resopt" / "data")).expanduser()


@dataclass(frozen=True)
class DataSource:
    """A resolved ``--data`` argument."""

    spec: str
    kind: str  # "folder" (ImageFolder) or "torchvision" (CIFAR pickles)
    root: Path
    train_dir: Path | None = None
    test_dir: Path | None = None
    tv_name: str | None = None  # CIFAR10 / CIFAR100 for kind == "torchvision"

    def dataset(self, split: str, transform: Any = None) -> Dataset:
        """The ``train`` or ``test`` split as a torch Dataset with ``.classes`` and ``.targets``."""
        if self.kind == "torchvision":
            import torchvision

            cls = getattr(torchvision.datasets, self.tv_name or "")
            try:
                return cls(str(self.root), train=(split == "train"), transform=transform, download=False)
            except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
                # torchvision checks each file's md5 and raises "Dataset not found or corrupted"; a file that
                # passes but cannot be read (permissions) is an OSError.
                batches = self.root / _TV_FOLDERS.get(self.tv_name or "", "")
                detail = str(e).splitlines()[0][:120] if str(e) else "no detail"
                raise DataError(f"{self.spec}: the {split} files in {batches} are missing or corrupt "
                                f"({type(e).__name__}: {detail})",
                                hint=f"delete {batches} so that it is downloaded again, or set RESOPT_DATA to a "
                                     f"folder holding {self.spec}/train and {self.spec}/test (ImageFolder layout)",
                                ) from None
        folder = self.train_dir if split == "train" else self.test_dir
        if folder is None:
            raise DataError(f"data {self.spec} has no {split} split (expected a {split}/ folder in {self.root})")
        return image_folder(folder, transform)


def _has_images(folder: Path) -> bool:
    for _dirpath, _dirs, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_SUFFIXES) for f in files):
            return True
    return False


def resolve_data(spec: str | Path, *, download: bool = True) -> DataSource:
    """Turn a ``--data`` value into a DataSource, or fail with a one-line reason."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return _folder_source(text, path)
    if text.lower() in KNOWN_NAMES:
        return _named_source(text.lower(), download=download)
    raise DataError(f"data {text!r} is neither an existing folder nor one of: {', '.join(KNOWN_NAMES)}",
                    hint="pass a folder with train/ and test/ class subfolders")


def _folder_source(text: str, path: Path) -> DataSource:
    if not path.is_dir():
        raise DataError(f"data {text} is a file, not a folder of images")
    train = path / "train" if (path / "train").is_dir() else None
    test = next((path / n for n in TEST_SPLIT_NAMES if (path / n).is_dir()), None)
    if train is None and test is None:
        # A bare ImageFolder (class folders directly): serves as both splits, e.g. the calib/ set.
        if not _has_images(path):
            raise DataError(f"data folder {text} contains no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
        return DataSource(text, "folder", path, path, path)
    for split in (train, test):
        if split is not None and not _has_images(split):
            raise DataError(f"data folder {split} contains no images")
    return DataSource(text, "folder", path, train, test)


def _named_source(name: str, *, download: bool) -> DataSource:
    home = data_home()
    for candidate in (home / name, home / name.replace("cifar", "cifar-")):
        if (candidate / "train").is_dir():
            return _folder_source(str(candidate), candidate)
    tv_name = KNOWN_NAMES[name]
    batches = home / _TV_FOLDERS[tv_name]
    if not batches.is_dir():
        if not download:
            raise DataError(f"{name} not found under {home}")
        import torchvision

        try:
            home.mkdir(parents=True, exist_ok=True)
            getattr(torchvision.datasets, tv_name)(str(home), train=True, download=True)
        except Exception as e:
            raise DataError(
                f"{name} is not under {home} and could not be downloaded ({type(e).__name__}); offline?",
                hint=f"set RESOPT_DATA to a folder holding {name}/train and {name}/test (ImageFolder layout)",
            ) from None
    return DataSource(name, "torchvision", home, tv_name=tv_name)


# --------------------------------------------------------------------------------------- datasets


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


def split_validation(dataset: Dataset, fraction: float, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A stratified hold-out: ``fraction`` of each class goes to validation."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--val-split must be in (0, 1), got {fraction}")
    import random

    from torch.utils.data import Subset

    targets = targets_of(dataset)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    rng = random.Random(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for c in sorted(by_class):
        idx = list(by_class[c])
        rng.shuffle(idx)
        n_val = max(1, int(round(len(idx) * fraction)))
        val_idx += idx[:n_val]
        train_idx += idx[n_val:]
    return Subset(dataset, sorted(train_idx)), Subset(dataset, sorted(val_idx))


# ------------------------------------------------------------------------------------- transforms


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


# --------------------------------------------------------------------------------------- loaders


def default_workers(n_items: int) -> int:
    """Worker processes for a DataLoader: none for small sets (spawning costs more than decoding)."""
    if n_items < 4000:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, workers: int | None = None,
                drop_last: bool = False, sampler: Any = None, device: Any = "cpu") -> Any:
    """A DataLoader, or for decoded images (the fast path) their ``TensorBatches`` on ``device``; a
    ``DistributedSampler`` given as ``sampler`` decides the shard (its rank and world size)."""
    import torch
    from torch.utils.data import DataLoader

    from resopt.data.decoded import DecodedImages, TensorBatches

    if isinstance(dataset, DecodedImages):
        rank, world = (sampler.rank, sampler.num_replicas) if sampler is not None else (0, 1)
        return TensorBatches(dataset, batch_size, shuffle=shuffle, seed=seed, device=device, rank=rank,
                             world_size=world, drop_last=drop_last or bool(getattr(sampler, "drop_last", False)))
    n_workers = default_workers(len(dataset)) if workers is None else workers  # type: ignore[arg-type]
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=n_workers, generator=gen, drop_last=drop_last,
                      persistent_workers=n_workers > 0, pin_memory=False)


def check_split_classes(train_classes: Sequence[str], test_classes: Sequence[str], *, data: str) -> None:
    """The evaluation split must hold the same class folders as train/ (else labels would not line up)."""
    if list(train_classes) == list(test_classes):
        return
    missing = [c for c in train_classes if c not in test_classes]
    extra = [c for c in test_classes if c not in train_classes]
    what = "; ".join(x for x in (f"lacks {', '.join(missing[:5])}" if missing else "",
                                 f"has extra {', '.join(extra[:5])}" if extra else "") if x)
    raise DataError(f"the test split of data {data} does not have train/'s classes: it {what}",
                    hint="give train/ and test/ the same class folders")


def check_classes(model_classes: Sequence[str], data_classes: Sequence[str], *, model_name: str, data: str) -> None:
    """The data must have the classes the model predicts, in the same order."""
    if list(model_classes) == list(data_classes):
        return
    if len(model_classes) != len(data_classes):
        raise DataError(f"{model_name} predicts {len(model_classes)} classes but data {data} has "
                        f"{len(data_classes)}", hint="use the data the model was trained on")
    raise DataError(f"{model_name} was trained on classes {list(model_classes)[:4]}... but data {data} has "
                    f"{list(data_classes)[:4]}...", hint="use the data the model was trained on")


def load_eval_set(spec: str | Path, pre: Preprocess, *, split: str = "test", per_class: int | None = None,
                  seed: int = 0) -> Dataset:
    """A split of ``spec`` with the model's eval preprocessing, optionally class-balanced and limited."""
    source = resolve_data(spec)
    ds = source.dataset(split, eval_transform(pre))
    return limit_per_class(ds, per_class, seed=seed)


def stack_images(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` samples as one (images, labels) pair of tensors."""
    import torch

    n = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    xs, ys = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.tensor(ys)
