"""Calibration sets (resopt.calib): class-balanced seeded sampling, hashing, saved sets, streaming."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_subset

from resopt.artifacts import Preprocess
from resopt.calib import (
    calib_batches,
    find_default_calib,
    load_calib_set,
    sample_indices,
    save_calib_set,
)
from resopt.errors import DataError, InputFileError

REPO = Path(__file__).resolve().parents[1]
PRE = Preprocess(32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def test_sample_indices_balanced_and_seeded():
    targets = [i % 4 for i in range(400)]  # 100 per class
    idx = sample_indices(targets, 40, seed=1)
    assert len(idx) == 40 and Counter(targets[i] for i in idx) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert idx == sample_indices(targets, 40, seed=1) != sample_indices(targets, 40, seed=2)
    few = sample_indices(targets, 3, seed=0)  # fewer than classes: still exactly 3, from distinct classes
    assert len(few) == 3 and len({targets[i] for i in few}) == 3
    assert sample_indices(targets, None, seed=0) == list(range(400))


def test_default_set_matches_classes():
    assert find_default_calib(CLASSES) == REPO / "calib" / "cifar10"
    with pytest.raises(DataError, match="no shipped calibration set matches the model's 3 classes"):
        find_default_calib(["a", "b", "c"])


def test_folder_sample_and_saved_set_hash_alike(tmp_path):
    cs = load_calib_set(REPO / "calib" / "cifar10", num=50, seed=0)
    assert len(cs) == 50 and cs.available == 320 and list(cs.classes) == CLASSES
    assert Counter(cs.labels) == dict.fromkeys(range(10), 5)
    assert load_calib_set(REPO / "calib" / "cifar10", num=50, seed=0).sha256 == cs.sha256
    assert load_calib_set(REPO / "calib" / "cifar10", num=50, seed=1).sha256 != cs.sha256
    saved = save_calib_set(cs, tmp_path / "set.npz")
    back = load_calib_set(saved)
    assert back.sha256 == cs.sha256 and back.labels == cs.labels and back.kind == "saved"
    assert [back.read(i) for i in range(3)] == [cs.read(i) for i in range(3)]
    sub = load_calib_set(saved, num=20, seed=0)  # a saved set can be sampled again
    assert len(sub) == 20 and sub.sha256 != cs.sha256


def test_corrupt_or_foreign_saved_set_is_refused(tmp_path):
    cs = load_calib_set(REPO / "calib" / "cifar10", num=10, seed=0)
    path = save_calib_set(cs, tmp_path / "set.npz")
    with np.load(path) as z:
        parts = {k: z[k].copy() for k in z.files}
    parts["data"][100] ^= 0xFF
    np.savez(tmp_path / "bad.npz", **parts)
    with pytest.raises(InputFileError, match="corrupt"):
        load_calib_set(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InputFileError, match="not a resopt calibration set"):
        load_calib_set(tmp_path / "other.npz")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="not a saved calibration set"):
        load_calib_set(tmp_path / "notes.txt")


def test_data_root_uses_train_split_only(tmp_path):
    root = make_subset(tmp_path / "d", 6, 4)
    cs = load_calib_set(root, num=None)
    assert cs.available == 60 and len(cs) == 60  # train/ only, never test/
    only_test = tmp_path / "t"
    (only_test / "test" / "cat").mkdir(parents=True)
    for f in sorted((root / "test" / "cat").iterdir()):
        (only_test / "test" / "cat" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="has no train/ split"):
        load_calib_set(only_test)


def test_batches_use_the_model_preprocessing():
    import torch
    from PIL import Image

    cs = load_calib_set(REPO / "calib" / "cifar10", num=20, seed=0)
    batches = list(calib_batches(cs, PRE, batch_size=8))
    assert [b[0].shape for b in batches] == [(8, 3, 32, 32), (8, 3, 32, 32), (4, 3, 32, 32)]
    assert batches[0][0].dtype == np.float32
    assert list(np.concatenate([b[1] for b in batches])) == list(cs.labels)
    import io

    with Image.open(io.BytesIO(cs.read(0))) as im:
        raw = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    expected = (raw - torch.tensor(PRE.mean)[:, None, None]) / torch.tensor(PRE.std)[:, None, None]
    np.testing.assert_allclose(batches[0][0][0], expected.numpy(), atol=1e-5)
