"""Where images come from: a ``--data`` value resolved into a ``DataSource`` with its splits.

``--data`` is either a folder in ImageFolder layout with ``train/`` and ``test/`` (and optionally ``val/``)
inside, a bare ImageFolder (class folders directly, like ``calib/``), or the name ``cifar10`` /
``cifar100``, looked up under ``$RESOPT_DATA`` in ImageFolder or torchvision layout and downloaded there
through torchvision only if it is missing (a clear error offline).

A folder with ``train/``, ``val/`` and ``test/`` has all three splits; with ``train/`` and ``val/`` only,
``val/`` is the reported split (ImageNet's layout) and validation is held out of train
(``resopt.data.splits``).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.data.datasets import image_folder
from resopt.errors import DataError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
KNOWN_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
# The folder torchvision unpacks each into, under the data home.
_TV_FOLDERS = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}
TEST_SPLIT_NAMES = ("test", "val", "validation")  # the first present is the reported split
VAL_SPLIT_NAMES = ("val", "validation")


def data_home() -> Path:
    return Path(os.environ.get("RESOPT_DATA", Path.home() / ".cache" / "resopt" / "data")).expanduser()


@dataclass(frozen=True)
class DataSource:
    """A resolved ``--data`` argument."""

    spec: str
    kind: str  # "folder" (ImageFolder) or "torchvision" (CIFAR pickles)
    root: Path
    train_dir: Path | None = None
    test_dir: Path | None = None  # the reported split
    tv_name: str | None = None  # CIFAR10 / CIFAR100 for kind == "torchvision"
    val_dir: Path | None = None  # the data's own validation split, when it has train/, val/ and test/
    bare: bool = False  # class folders directly: the same images serve every split (e.g. calib/)

    @property
    def has_test(self) -> bool:
        return self.kind == "torchvision" or self.test_dir is not None

    def dataset(self, split: str, transform: Any = None) -> Dataset:
        """The ``train``, ``val`` or ``test`` split as a torch Dataset with ``.classes`` and ``.targets``."""
        if self.kind == "torchvision" and split != "val":
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
        folder = {"train": self.train_dir, "val": self.val_dir, "test": self.test_dir}[split]
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
        # A bare ImageFolder (class folders directly): serves as every split, e.g. the calib/ set.
        if not _has_images(path):
            raise DataError(f"data folder {text} contains no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
        return DataSource(text, "folder", path, path, path, bare=True)
    # With test/ present, a val/ folder is the validation split; without it, val/ is what is reported.
    val = next((path / n for n in VAL_SPLIT_NAMES if (path / n).is_dir()), None) \
        if test is not None and test.name == "test" else None
    for split in (train, val, test):
        if split is not None and not _has_images(split):
            raise DataError(f"data folder {split} contains no images")
    return DataSource(text, "folder", path, train, test, val_dir=val)


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


