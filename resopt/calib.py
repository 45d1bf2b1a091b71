"""Calibration sets: a seeded, class-balanced sample of real images that sets quantization ranges.

A set is read from a folder (class folders directly, like the repository's ``calib/cifar10``, or a data
root whose ``train/`` split is sampled), a dataset name (``cifar10``: its train split), or a saved set
(``.npz`` written by ``resopt quantize --save-calib``). Whatever the source, an item is the image's
encoded bytes plus its class, and the set's hash is taken over exactly those (class name and sha256 of
each item's bytes, in order), so a folder and the set saved from it hash alike, and the lineage of a
quantized model names the images that calibrated it.

Images are decoded and preprocessed batch by batch with the model's own preprocessing (read from its
artifact, never hard-coded), so memory stays bounded by one batch however large the set is.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import Preprocess, atomic_output
from resopt.errors import DataError, InputFileError, UsageError

if TYPE_CHECKING:
    import numpy as np

CALIB_FORMAT = "resopt.calibset"
CALIB_VERSION = 1
SAVED_SUFFIX = ".npz"


@dataclass(frozen=True)
class CalibSet:
    """The chosen images: ``labels[i]`` indexes ``classes``; ``read(i)`` returns item i's encoded bytes."""

    source: str
    kind: str  # "folder", "dataset" (torchvision CIFAR arrays, PNG-encoded) or "saved"
    classes: tuple[str, ...]
    labels: tuple[int, ...]
    seed: int
    sha256: str
    available: int  # images in the source before sampling
    read: Callable[[int], bytes] = field(repr=False, compare=False)
    name: Callable[[int], str] | None = field(default=None, repr=False, compare=False)  # item i's file

    def describe_item(self, i: int) -> str:
        return f"image {self.name(i)}" if self.name else f"calibration image {i} of {self.source}"

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> dict[str, Any]:
        """What the lineage records about the set."""
        return {"source": self.source, "kind": self.kind, "images": len(self), "available": self.available,
                "classes": len(self.classes), "seed": self.seed, "sha256": self.sha256}


# ------------------------------------------------------------------------------------------ sampling


def sample_indices(targets: list[int], num: int | None, *, seed: int) -> list[int]:
    """Up to ``num`` indices, spread evenly over the classes (all of them if ``num`` is None)."""
    from resopt.data import balanced_indices

    if num is None:
        return list(range(len(targets)))
    n_classes = max(1, len(set(targets)))
    idx = balanced_indices(targets, math.ceil(num / n_classes), seed=seed)
    if len(idx) > num:  # fewer images wanted than classes x per-class: drop a seeded few
        idx = sorted(random.Random(seed).sample(idx, num))
    return idx


def _hash_items(classes: tuple[str, ...], labels: tuple[int, ...], read: Callable[[int], bytes]) -> str:
    h = hashlib.sha256()
    for i, label in enumerate(labels):
        h.update(classes[label].encode() + b"\0" + hashlib.sha256(read(i)).digest())
    return h.hexdigest()


def default_calib_dirs() -> list[Path]:
    """Where the shipped calibration sets live: the repository's calib/ and ./calib."""
    import resopt

    dirs = [Path(resopt.__file__).resolve().parents[1] / "calib", Path.cwd() / "calib"]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def find_default_calib(classes: list[str], *, option: str = "--calib-data") -> Path:
    """The shipped set (e.g. calib/cifar10) whose class folders are exactly the model's classes.

    Matching on class names picks the right set for the model, and refuses, instead of silently
    calibrating (or verifying, for export and build) on unrelated images, for a model trained on other
    data. ``option`` is the flag the calling command takes instead, named in the hint.
    """
    seen: list[Path] = []
    for root in default_calib_dirs():
        for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
            subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            if subdirs == sorted(classes):
                return folder
            seen.append(folder)
    shipped = ", ".join(str(c) for c in seen[1:] or seen) or "none found"
    raise DataError(f"no shipped calibration set matches the model's {len(classes)} classes "
                    f"({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}); looked at: {shipped}",
                    hint=f"pass {option} with a folder of real images of the model's classes (one subfolder per class)")


LINEAGE_DATA_STEPS = ("train", "import", "prune", "distill")


def default_data(classes: list[str], lineage: list[dict[str, Any]], *, option: str = "--data",
                 purpose: str = "verification") -> str:
    """The real images a command uses when it gets no ``--data``/``--calib-data``: the data recorded in
    the model's lineage (its newest train, import, prune or distill step) while it still exists here with
    the model's classes, then the shipped calib/ set for its classes, else the error naming ``option``.
    Says on stderr which it chose."""
    from resopt.console import log

    found = lineage_data(classes, lineage)
    if found is not None:
        spec, command = found
        log(f"{purpose} images: {spec} (the data recorded in the model's `{command}` step; "
            f"pass {option} to choose others)")
        return spec
    folder = find_default_calib(classes, option=option)
    log(f"{purpose} images: {folder} (the shipped set for the model's classes; pass {option} to choose others)")
    return str(folder)


def lineage_data(classes: list[str], lineage: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(data, command) of the newest lineage step that names data still present with the model's classes."""
    for step in reversed(lineage):
        if step.get("command") not in LINEAGE_DATA_STEPS:
            continue
        spec = (step.get("options") or {}).get("data")
        if spec and _has_classes(str(spec), classes):
            return str(spec), str(step["command"])
    return None


def data_from_checkpoint(path: Path) -> str | None:
    """For commands that train (prune, distill) and get no ``--data``: the data in the checkpoint's lineage,
    if it is still here. No shipped-set fallback: fine-tuning and measuring on 320 calibration images
    would report top-1 on the training images."""
    from resopt.artifacts import load_checkpoint
    from resopt.console import log

    ckpt = load_checkpoint(path)
    found = lineage_data(list(ckpt["classes"]), ckpt.get("lineage", []))
    if found is not None:
        log(f"data: {found[0]} (recorded in the `{found[1]}` step of {Path(path).name}; pass --data to choose "
            f"other images)")
    return found[0] if found else None


def _has_classes(spec: str, classes: list[str]) -> bool:
    """Whether ``spec`` resolves here, without downloading, to class folders named like ``classes``."""
    from resopt.data import resolve_data

    try:
        source = resolve_data(spec, download=False)
    except DataError:
        return False
    if source.kind != "folder":
        return source.tv_name == "CIFAR10" and len(classes) == 10 or source.tv_name == "CIFAR100" \
            and len(classes) == 100
    folder = source.train_dir or source.test_dir
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder else []
    return names == sorted(classes)


def load_calib_set(spec: str | Path, *, num: int | None = None, seed: int = 0) -> CalibSet:
    """Resolve ``--calib-data`` (folder, dataset name or saved ``.npz`` set) and sample ``num`` images."""
    if num is not None and num < 1:
        raise UsageError(f"--num-calib must be at least 1, got {num}")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != SAVED_SUFFIX:
            raise DataError(f"calibration data {text} is a file but not a saved calibration set "
                            f"({SAVED_SUFFIX})", hint="pass a folder of images or a set written by --save-calib")
        return _load_saved(path, num=num, seed=seed)

    from resopt.data import resolve_data

    source = resolve_data(text)
    if source.kind == "torchvision":
        return _from_arrays(text, source.dataset("train"), num=num, seed=seed)
    folder = source.train_dir
    if folder is None:
        raise DataError(f"calibration data {text} has no train/ split; calibrating on test images would "
                        f"leak them into the model", hint="pass a folder of training images")
    return _from_folder(text, folder, num=num, seed=seed)


def uncalibrated_set(cs: CalibSet, *, num: int, seed: int) -> tuple[CalibSet, str] | None:
    """(images, where) of the calibration set's source that calibration did not use, for checking the result
    against its parent on images its ranges were not fitted to: the source's test split (calibration only
    reads train/), else, for a bare folder, its images not chosen for ``cs``; None for a saved set or when
    calibration used every image."""
    from resopt.data import resolve_data

    if cs.kind == "saved":
        return None
    source = resolve_data(cs.source, download=False)
    if source.kind == "torchvision":
        return _from_arrays(cs.source, source.dataset("test"), num=num, seed=seed), "test"
    if source.test_dir is not None and not source.bare:
        return _from_folder(cs.source, source.test_dir, num=num, seed=seed), "test"
    assert source.train_dir is not None and cs.name is not None
    used = frozenset(cs.name(i) for i in range(len(cs)))
    try:
        return _from_folder(cs.source, source.train_dir, num=num, seed=seed, skip=used), "uncalibrated"
    except DataError:  # every image was calibrated on
        return None


def _from_folder(text: str, folder: Path, *, num: int | None, seed: int,
                 skip: frozenset[str] = frozenset()) -> CalibSet:
    from resopt.data import image_folder

    ds = image_folder(folder)
    samples = [(p, t) for p, t in ds.samples if str(Path(p)) not in skip]  # type: ignore[attr-defined]
    files = [Path(p) for p, _ in samples]
    targets = [int(t) for _, t in samples]
    if not files:
        raise DataError(f"calibration folder {folder} contains no images")
    idx = sample_indices(targets, num, seed=seed)
    chosen = [files[i] for i in idx]
    labels = tuple(targets[i] for i in idx)
    classes = tuple(ds.classes)  # type: ignore[attr-defined]

    def read(i: int) -> bytes:
        from resopt.data import BAD_IMAGE_HINT

        try:
            if not chosen[i].is_file():  # a pipe named .jpg would block the read forever
                raise DataError(f"image {chosen[i]} is not a regular file", hint=BAD_IMAGE_HINT)
            return chosen[i].read_bytes()
        except OSError as e:
            raise DataError(f"image {chosen[i]} cannot be read ({e.strerror or type(e).__name__})",
                            hint=BAD_IMAGE_HINT) from None

    return CalibSet(text, "folder", classes, labels, seed, _hash_items(classes, labels, read), len(files), read,
                    name=lambda i: str(chosen[i]))


def _from_arrays(text: str, ds: Any, *, num: int | None, seed: int) -> CalibSet:
    """torchvision CIFAR (pixel arrays in memory): items are PNG-encoded so every set is encoded bytes."""
    from PIL import Image

    targets = [int(t) for t in ds.targets]
    idx = sample_indices(targets, num, seed=seed)
    labels = tuple(targets[i] for i in idx)
    classes = tuple(ds.classes)

    def read(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(ds.data[idx[i]]).save(buf, format="PNG")
        return buf.getvalue()

    return CalibSet(text, "dataset", classes, labels, seed, _hash_items(classes, labels, read), len(targets), read)


# -------------------------------------------------------------------------------------- saved sets


def save_calib_set(cs: CalibSet, path: Path) -> Path:
    """Write ``cs`` as one self-contained ``.npz`` (encoded images, labels, classes; no pickles)."""
    import numpy as np

    path = Path(path)
    if path.suffix.lower() != SAVED_SUFFIX:
        raise UsageError(f"calibration set file {path} must end in {SAVED_SUFFIX}")
    blobs = [cs.read(i) for i in range(len(cs))]
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    meta = {"format": CALIB_FORMAT, "format_version": CALIB_VERSION, "classes": list(cs.classes),
            "source": cs.source, "seed": cs.seed, "sha256": cs.sha256}
    # Written before quantization (--save-calib): an interrupt must still stop the command after it.
    with atomic_output(path, commit=False) as tmp, open(tmp, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), data=np.frombuffer(b"".join(blobs), dtype=np.uint8),
                 offsets=offsets, labels=np.array(cs.labels, dtype=np.int64))
    return path


def _load_saved(path: Path, *, num: int | None, seed: int) -> CalibSet:
    import numpy as np

    from resopt.artifacts import require_regular
    from resopt.schema import CalibMetaSchema, validate

    foreign = InputFileError(f"{path} is an .npz but not a resopt calibration set",
                             hint="write one with `resopt quantize MODEL.onnx --save-calib SET.npz`")
    require_regular(path, "calibration set")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"meta", "data", "offsets", "labels"} <= set(z.files):
                raise foreign
            meta = json.loads(str(z["meta"]))
            data, offsets, labels_arr = z["data"], z["offsets"], z["labels"]
    except (OSError, ValueError, EOFError, json.JSONDecodeError) as e:
        raise InputFileError(f"{path} is not a readable calibration set ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != CALIB_FORMAT:
        raise foreign
    validate(CalibMetaSchema, meta, path=path, what="calibration set")
    classes = tuple(meta["classes"])
    n = len(labels_arr) if labels_arr.ndim == 1 else -1
    problem = (
        "data: not a 1-D uint8 array" if data.dtype != np.uint8 or data.ndim != 1 else
        "labels: not a 1-D integer array" if n < 0 or labels_arr.dtype.kind not in "iu" else
        "labels: empty" if n == 0 else
        f"labels: outside 0..{len(classes) - 1}" if labels_arr.min() < 0 or labels_arr.max() >= len(classes) else
        f"offsets: not {n + 1} integers" if offsets.dtype.kind not in "iu" or offsets.shape != (n + 1,) else
        "offsets: not increasing from 0 to the data size" if offsets[0] != 0 or offsets[-1] != len(data)
        or bool((np.diff(offsets) <= 0).any()) else None)
    if problem:
        raise InputFileError(f"calibration set {path} has a bad field {problem}")
    all_labels = [int(x) for x in labels_arr]

    def read_all(i: int) -> bytes:
        return data[offsets[i]:offsets[i + 1]].tobytes()

    if _hash_items(classes, tuple(all_labels), read_all) != meta["sha256"]:
        raise InputFileError(f"calibration set {path} is corrupt: its images do not match its recorded hash")
    idx = sample_indices(all_labels, num, seed=seed)
    labels = tuple(all_labels[i] for i in idx)

    def read(i: int) -> bytes:
        return read_all(idx[i])

    sha = meta["sha256"] if len(idx) == len(all_labels) else _hash_items(classes, labels, read)
    return CalibSet(str(path), "saved", classes, labels, seed, sha, len(all_labels), read)


# -------------------------------------------------------------------------------------- streaming


def calib_batches(cs: CalibSet, pre: Preprocess, *, batch_size: int, limit: int | None = None,
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images NCHW float32, labels) batches with the model's eval preprocessing; one batch in memory."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from resopt.data import eval_transform

    transform = eval_transform(pre)
    n = len(cs) if limit is None else min(limit, len(cs))
    for start in range(0, n, batch_size):
        xs, ys = [], []
        for i in range(start, min(start + batch_size, n)):
            try:
                with Image.open(io.BytesIO(cs.read(i))) as im:
                    xs.append(transform(im.convert("RGB")).numpy())
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{cs.describe_item(i)} cannot be decoded ({type(e).__name__})") from None
            ys.append(cs.labels[i])
        yield np.stack(xs).astype(np.float32, copy=False), np.asarray(ys, dtype=np.int64)


def calib_batch_size(pre: Preprocess) -> int:
    """Batch size for calibration: histogram calibration holds every activation of one batch, so large
    inputs get small batches (a ResNet-50 keeps ~100 MB of activations per 224 px image)."""
    return 32 if pre.input_size <= 64 else 8
