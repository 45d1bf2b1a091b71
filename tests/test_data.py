"""Data resolution, class-balanced subsets, image modes and measured normalization on real images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resopt.artifacts import Preprocess
from resopt.data import (
    balanced_indices,
    check_classes,
    compute_normalization,
    decide_input_size,
    eval_transform,
    limit_per_class,
    resolve_data,
    split_validation,
    targets_of,
)
from resopt.errors import DataError, UsageError


def test_resolves_imagefolder_with_splits(cifar_small: Path) -> None:
    src = resolve_data(cifar_small)
    assert src.kind == "folder" and src.train_dir == cifar_small / "train" and src.test_dir == cifar_small / "test"
    ds = src.dataset("train")
    assert len(ds) == 400 and ds.classes[0] == "airplane"


def test_val_folder_counts_as_test_split(tmp_path: Path, cifar_small: Path) -> None:
    (tmp_path / "train").symlink_to(cifar_small / "train")
    (tmp_path / "val").symlink_to(cifar_small / "test")
    assert resolve_data(tmp_path).test_dir == tmp_path / "val"


def test_bare_imagefolder_serves_both_splits() -> None:
    calib = Path(__file__).resolve().parents[1] / "calib" / "cifar10"
    src = resolve_data(calib)
    assert len(src.dataset("train")) == 320 and len(src.dataset("test")) == 320


def test_missing_and_empty_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="neither an existing folder nor one of: cifar10"):
        resolve_data(tmp_path / "nope")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no images"):
        resolve_data(tmp_path / "empty")


def test_named_cifar_found_under_resopt_data(tmp_path: Path, cifar_small: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cifar10").symlink_to(cifar_small)
    monkeypatch.setenv("RESOPT_DATA", str(tmp_path))
    assert resolve_data("cifar10").train_dir == tmp_path / "cifar10" / "train"


def test_named_cifar_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESOPT_DATA", str(tmp_path))
    with pytest.raises(DataError, match="cifar100 not found"):
        resolve_data("cifar100", download=False)


def test_balanced_subset_and_validation_split(cifar_small: Path) -> None:
    ds = resolve_data(cifar_small).dataset("train")
    sub = limit_per_class(ds, 7, seed=1)
    assert Counter(targets_of(sub)) == {c: 7 for c in range(10)}
    assert balanced_indices(targets_of(ds), 7, seed=1) == balanced_indices(targets_of(ds), 7, seed=1)
    assert balanced_indices(targets_of(ds), 7, seed=1) != balanced_indices(targets_of(ds), 7, seed=2)
    train, val = split_validation(ds, 0.25, seed=0)
    assert len(train) + len(val) == 400 and Counter(targets_of(val)) == {c: 10 for c in range(10)}
    assert not set(train.indices) & set(val.indices)
    with pytest.raises(UsageError):
        split_validation(ds, 1.5)


def test_normalization_is_measured_from_the_images(cifar_small: Path) -> None:
    # 400 samples of a 400-image, 10-class folder: every image. The expectation is computed here, with
    # PIL and numpy over the JPEG files, not through resopt's loader: hard-coded statistics (ImageNet's
    # 0.485 0.456 0.406, or the data set README's rounded ones) would miss it by far more than 5e-4.
    mean, std = compute_normalization(resolve_data(cifar_small).dataset("train"), samples=400)
    pixels = np.concatenate([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
                             for f in sorted((cifar_small / "train").glob("*/*.jpg"))])
    assert len(pixels) == 400 * 32 * 32
    np.testing.assert_allclose(mean, pixels.mean(axis=0), atol=5e-4)  # resopt rounds to 4 decimals
    np.testing.assert_allclose(std, pixels.std(axis=0), atol=5e-4)


def test_grayscale_palette_and_large_images_become_rgb_tensors(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls, mode in (("a", "L"), ("b", "P"), ("c", "RGBA")):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new(mode, (120, 90)).save(tmp_path / split / cls / "x.png")
    src = resolve_data(tmp_path)
    size, resize = decide_input_size(src, None, 224)
    assert (size, resize) == (224, 256)
    pre = Preprocess(input_size=96, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), resize=110)
    img, _ = src.dataset("test", eval_transform(pre))[1]
    assert tuple(img.shape) == (3, 96, 96)


def test_cifar_images_train_at_native_size(cifar_small: Path) -> None:
    assert decide_input_size(resolve_data(cifar_small), None, 224) == (32, None)


def test_class_mismatch_messages() -> None:
    check_classes(["a", "b"], ["a", "b"], model_name="m.pt", data="d")
    with pytest.raises(DataError, match="m.pt predicts 2 classes but data d has 3"):
        check_classes(["a", "b"], ["a", "b", "c"], model_name="m.pt", data="d")
    with pytest.raises(DataError, match="trained on classes"):
        check_classes(["a", "b"], ["x", "y"], model_name="m.pt", data="d")
