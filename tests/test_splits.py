"""train / val / test: the hold-out is stratified, seeded and disjoint from the fit images, a child command
re-derives its parent's held-out files, every choice is made on val and test is measured once, after it."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import cifar_root, make_subset

from resopt.artifacts import load_checkpoint
from resopt.data import holdout_indices, resolve_data, targets_of
from resopt.train import DataOptions, prepare_data

TINY = ["--arch", "resnet20", "--width", "0.25", "--batch-size", "50"]


def _files(ds) -> list[str]:
    """The image files of a dataset or a chain of Subsets over an ImageFolder, resolved here."""
    from torch.utils.data import Subset

    idx = list(range(len(ds)))
    while isinstance(ds, Subset):
        idx = [ds.indices[i] for i in idx]
        ds = ds.dataset
    return [ds.samples[i][0] for i in idx]


def _sha(files: list[str], root: Path) -> str:
    names = sorted(Path(f).relative_to(root).as_posix() for f in files)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 train and 10 test images per class: the default 10% hold-out is 2 per class."""
    return make_subset(tmp_path_factory.mktemp("splits"), 20, 10)


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    from conftest import run_captured

    out = tmp_path_factory.mktemp("parent") / "p.pt"
    code, _, err = run_captured("train", "--data", data, *TINY, "--epochs", "1", "--seed", "2", "-o", out)
    assert code == 0, err
    return out


def test_holdout_is_stratified_seeded_and_disjoint(data: Path) -> None:
    targets = targets_of(resolve_data(data).dataset("train"))
    fit, held = holdout_indices(targets, 0.25, seed=0)
    assert Counter(targets[i] for i in held) == dict.fromkeys(range(10), 5)  # 25% of 20 per class
    assert not set(fit) & set(held) and sorted(fit + held) == list(range(200))
    assert holdout_indices(targets, 0.25, seed=0) == (fit, held)
    assert holdout_indices(targets, 0.25, seed=1)[1] != held


def test_train_records_a_holdout_disjoint_from_the_fit_images(data: Path, parent: Path) -> None:
    ckpt = load_checkpoint(parent)
    split = ckpt["lineage"][0]["metrics"]["splits"]
    assert split["val"]["from"] == "holdout" and split["val"]["fraction"] == 0.1 and split["val"]["seed"] == 2
    assert (split["train"]["images"], split["val"]["images"], split["test"]["images"]) == (180, 20, 100)
    # The same images, drawn again here through the library with the recorded seed: the fit and val files.
    prepared = prepare_data(DataOptions(str(data), seed=2, data_path="pil"))
    fit, val = _files(prepared.train), _files(prepared.val)
    assert not set(fit) & set(val) and len(set(fit) | set(val)) == 200
    assert Counter(Path(f).parent.name for f in val) == dict.fromkeys(ckpt["classes"], 2)
    assert split["val"]["sha256"] == _sha(val, data / "train")
    m = ckpt["metrics"]
    assert (m["split"], m["eval_images"], m["val_images"], m["test_images"]) == ("test", 100, 20, 100)
    assert m["top1"] == m["test_top1"] and m["selected_on"] == "val"


def test_a_child_rederives_the_parent_holdout(cli, data: Path, parent: Path, tmp_path: Path) -> None:
    """prune with another --seed: its fine-tuning still holds out the parent's 20 files, and trains on none."""
    parent_val = _files(prepare_data(DataOptions(str(data), seed=2, data_path="pil")).val)
    child = prepare_data(DataOptions(str(data), seed=7, data_path="pil"),
                         lineage=load_checkpoint(parent)["lineage"])
    assert sorted(_files(child.val)) == sorted(parent_val)
    assert not set(_files(child.train)) & set(parent_val)

    out = tmp_path / "c.pt"
    r = cli("prune", parent, "--sparsity", "0.5", "--finetune-epochs", "1", "--data", data, "--seed", "7",
            "--batch-size", "50", "-o", out)
    assert r.code == 0, r.stderr
    steps = load_checkpoint(out)["lineage"]
    assert steps[1]["metrics"]["splits"]["val"] == steps[0]["metrics"]["splits"]["val"]
    assert steps[1]["options"]["val_split"] == 0.1
    # A different hold-out for the child would fine-tune on the parent's validation images: refused.
    r = cli("prune", parent, "--sparsity", "0.5", "--data", data, "--val-split", "0.2", "-o", tmp_path / "x.pt")
    assert r.code == 2 and r.stderr.startswith("Error: --val-split 0.2 differs from the validation split"), r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_the_epoch_is_chosen_on_val_and_test_is_measured_once_after(cli, data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every evaluation is counted by the images it ran on: val (20) once per epoch while training, test (100)
    exactly once, after the last epoch; the kept epoch is the first with the highest val top-1."""
    import resopt.train as train_pkg
    import resopt.train.loop as loop

    seen: list[int] = []
    original = loop.evaluate

    def counting(model, loader, device, **kw):
        acc = original(model, loader, device, **kw)
        seen.append(acc.n)
        return acc

    monkeypatch.setattr(loop, "evaluate", counting)
    monkeypatch.setattr(train_pkg, "evaluate", counting)
    out = tmp_path / "b.pt"
    r = cli("train", "--data", data, *TINY, "--epochs", "4", "--lr", "0.5", "--seed", "1", "--json", "-o", out)
    assert r.code == 0, r.stderr
    assert seen == [20, 20, 20, 20, 100]
    d = r.json()
    tops = [h["val_top1"] for h in d["history"]]
    best = max(range(4), key=lambda i: (tops[i], -i))
    assert d["best_epoch"] == best + 1 and d["val_top1"] == tops[best] and d["select"] == "best"
    assert all("top1" not in h for h in d["history"])  # per-epoch numbers are val numbers, named so
    lines = r.stderr.splitlines()
    chosen = next(i for i, ln in enumerate(lines) if f"best epoch {best + 1} (chosen on val)" in ln)
    tested = [i for i, ln in enumerate(lines) if "test top-1" in ln]
    assert len(tested) == 1 and tested[0] > chosen
    assert "(100 test images, measured once, after the choice)" in lines[tested[0]]
    assert "val top-1" in lines[chosen - 1] and "(20 images held out of train)" in lines[chosen - 1]
    # The recorded test top-1 is the kept model's, scored here on the test images it never chose on.
    from resopt.data import load_eval_set, stack_images
    from resopt.models import model_from_checkpoint

    ckpt = load_checkpoint(out)
    from resopt.artifacts import Preprocess

    x, y = stack_images(load_eval_set(data, Preprocess.from_dict(ckpt["preprocess"])))
    with torch.no_grad():
        mine = 100.0 * float((model_from_checkpoint(ckpt).eval()(x).argmax(1) == y).double().mean())
    assert ckpt["metrics"]["test_top1"] == pytest.approx(mine, abs=1e-3)


def test_select_last_keeps_the_last_epoch(cli, data: Path, tmp_path: Path) -> None:
    r = cli("train", "--data", data, *TINY, "--epochs", "3", "--lr", "0.5", "--select", "last", "--json",
            "-o", tmp_path / "l.pt")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["best_epoch"] == 3 and d["select"] == "last" and d["val_top1"] == d["history"][-1]["val_top1"]
    assert "kept the last epoch, 3 (--select last)" in r.stderr
    r = cli("train", "--data", data, *TINY, "--select", "worst", "-o", tmp_path / "w.pt")
    assert r.code == 2 and r.stderr.startswith("Error: unknown --select 'worst'; choose one of: best, last")


def test_a_val_folder_is_the_validation_split(cli, tmp_path: Path) -> None:
    """train/, val/ and test/: nothing is held out of train, and val/ is what the epoch is chosen on."""
    root = make_subset(tmp_path / "d", 10, 10)
    src = cifar_root() / "test"
    for c in sorted(os.listdir(src)):
        (root / "val" / c).mkdir(parents=True)
        for f in sorted(os.listdir(src / c))[-3:]:  # the last 3 test files: not among test/'s first 10
            shutil.copy(src / c / f, root / "val" / c / f)
    r = cli("train", "--data", root, *TINY, "--epochs", "1", "--json", "-o", tmp_path / "v.pt")
    assert r.code == 0, r.stderr
    splits = load_checkpoint(tmp_path / "v.pt")["metrics"]["splits"]
    assert splits["val"]["from"] == "folder" and splits["val"]["images"] == 30
    assert (splits["train"]["images"], splits["test"]["images"]) == (100, 100)
    assert "(30 images of val/)" in r.stderr


def test_val_split_out_of_range_is_one_line(cli, data: Path, parent: Path, tmp_path: Path) -> None:
    for cmd in (["train", "--data", data, *TINY], ["prune", parent, "--sparsity", "0.5", "--data", data],
                ["distill", "--teacher", parent, "--student", "resnet20", "--data", data]):
        for bad in ("0", "1", "-0.1"):
            r = cli(*cmd, "--val-split", bad, "-o", tmp_path / "x.pt")
            assert r.code == 2, (cmd[0], bad, r.stderr)
            assert r.stderr.startswith(f"Error: --val-split must be in (0, 1), got {float(bad)}"), r.stderr
            assert sum(ln.startswith("Error:") for ln in r.stderr.splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_an_old_lineage_shows_split_unknown(cli, parent: Path, tmp_path: Path) -> None:
    """A checkpoint written before splits were recorded still loads; its accuracy is not called test."""
    ckpt = load_checkpoint(parent)
    for entry in ckpt["lineage"]:
        for key in ("split", "splits", "val_top1", "val_top5", "val_images", "test_top1", "test_top5",
                    "test_images", "selected_on", "select"):
            entry["metrics"].pop(key, None)
        entry["metrics"]["eval_split"] = "test"  # what the old format wrote, chosen on that same split
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    r = cli("info", old, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["lineage_steps"][0]["split"] == "split unknown"
    r = cli("info", old)
    assert r.code == 0 and "top1=" in r.stdout and "(split unknown)" in r.stdout
    assert "(test" not in r.stdout
    new = cli("info", parent)
    assert "(test, 100 images)" in new.stdout and "split unknown" not in new.stdout
    from resopt.report.records import read_record

    assert read_record(old).accuracy_split == "split unknown" and read_record(parent).accuracy_split == "test"
