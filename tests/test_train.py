"""The train command on real images: artifact contents, determinism, resume, DDP and errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resopt.artifacts import load_checkpoint
from resopt.models import count_params, model_from_checkpoint
from resopt.train import TrainConfig
from resopt.train.loop import _cosine_with_warmup

TINY = ["--arch", "resnet20", "--width", "0.25", "--batch-size", "50", "--limit-per-class", "10"]


def test_trained_checkpoint_contents(trained_pt: Path) -> None:
    ckpt = load_checkpoint(trained_pt)
    assert ckpt["arch"] == "resnet20" and ckpt["arch_kwargs"] == {"width": 0.5}
    assert ckpt["classes"][:2] == ["airplane", "automobile"] and ckpt["num_classes"] == 10
    assert ckpt["preprocess"]["input_size"] == 32 and ckpt["preprocess"]["resize"] is None
    assert ckpt["lineage"][0]["command"] == "train" and ckpt["lineage"][0]["options"]["epochs"] == 3
    assert ckpt["metrics"]["params"] == count_params(model_from_checkpoint(ckpt))[0]
    # 3 epochs on 400 real images beats chance (10%) on the 200 test images.
    assert ckpt["metrics"]["top1"] > 15.0


def test_train_cli_json_and_same_seed_same_weights(cli, cifar_small: Path, tmp_path: Path) -> None:
    base = ["train", "--data", cifar_small, *TINY, "--epochs", "2", "--json"]
    args = [*base, "--seed", "3"]
    r1 = cli(*args, "-o", tmp_path / "a.pt")
    assert r1.code == 0, r1.stderr
    d = r1.json()
    assert d["train_images"] == 100 and d["test_images"] == 100 and len(d["history"]) == 2
    assert cli(*args, "-o", tmp_path / "b.pt").code == 0
    a = load_checkpoint(tmp_path / "a.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cli(*base, "--seed", "4", "-o", tmp_path / "c.pt").code == 0
    c = load_checkpoint(tmp_path / "c.pt")["state_dict"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_continues_an_interrupted_run(cli, cifar_small: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import resopt.train.loop as train_mod  # where fit looks evaluate up

    out = tmp_path / "r.pt"
    args = ["train", "--data", cifar_small, *TINY, "--epochs", "3", "-o", out]
    original = train_mod.evaluate
    calls = {"n": 0}

    def dying_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the machine "dies" during epoch 2's evaluation
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", dying_evaluate)
    interrupted = cli(*args)  # Ctrl-C: click reports "Aborted!" and exits non-zero
    assert interrupted.code != 0
    assert not out.exists(), "an interrupted run must not leave a checkpoint behind"
    assert (tmp_path / "r.pt.resume").exists()
    monkeypatch.setattr(train_mod, "evaluate", original)
    r = cli(*args, "--resume", "--json")
    assert r.code == 0, r.stderr
    assert "resuming from r.pt.resume after epoch 1/3" in r.stderr
    assert [h["epoch"] for h in r.json()["history"]] == [1, 2, 3]
    assert out.exists() and not (tmp_path / "r.pt.resume").exists()


def test_cosine_schedule_with_warmup() -> None:
    assert _cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert _cosine_with_warmup(9, 100, 10) == pytest.approx(1.0)
    assert _cosine_with_warmup(10, 100, 10) == pytest.approx(1.0)
    assert _cosine_with_warmup(55, 100, 10) == pytest.approx(0.5)
    assert _cosine_with_warmup(100, 100, 10) == pytest.approx(0.0)
    assert TrainConfig(batch_size=256).base_lr() == pytest.approx(0.2)
    assert TrainConfig(optimizer="adamw").base_lr() == pytest.approx(1e-3)


@pytest.mark.parametrize("args, code, message", [  # codes: the README's table (2 options, 8 hardware)
    (["--epochs", "0"], 2, "Error: --epochs must be at least 1, got 0"),
    (["--optimizer", "lamb"], 2, "Error: unknown optimizer 'lamb'; choose one of: sgd, adamw"),
    (["--arch", "resnet21"], 2, "Error: unknown architecture 'resnet21'"),
    (["--val-split", "1.2"], 2, "Error: --val-split must be in (0, 1), got 1.2"),
    (["--device", "cuda"], 8, "Error: --device cuda was asked for but no CUDA GPU is visible"),
])
def test_train_option_errors(cli, cifar_small: Path, tmp_path: Path, args: list[str], code: int,
                             message: str) -> None:
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = cli("train", "--data", cifar_small, *TINY, *args, "-o", tmp_path / "x.pt")
    assert r.code == code
    assert r.stderr.splitlines()[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.pt").exists()


def test_train_data_errors(cli, tmp_path: Path) -> None:
    r = cli("train", "--data", tmp_path / "missing", "-o", tmp_path / "x.pt")
    assert r.code == 4 and r.stderr.startswith("Error: data ") and "Hint:" in r.stderr
    r = cli("train", "-o", tmp_path / "x.pt")
    assert r.code == 2 and r.stderr.startswith("Error: train needs --data")


def test_training_data_defaults_to_the_checkpoints_recorded_data(trained_pt: Path, cifar_small: Path,
                                                                 tmp_path: Path) -> None:
    """The library decides the data of a command that trains: --data, else (prune, distill) what the
    checkpoint's lineage records, else the command's own one-line error."""
    from resopt.errors import UsageError
    from resopt.train import training_data

    assert training_data("cifar10", recorded_in=trained_pt, needs="x", hint="y") == "cifar10"
    assert Path(training_data(None, recorded_in=trained_pt, needs="x", hint="y")).resolve() == cifar_small.resolve()
    with pytest.raises(UsageError, match="^train needs --data$"):
        training_data(None, needs="train needs --data", hint="resopt train --data cifar10")


def test_ddp_two_processes_on_cpu_with_gloo(cifar_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESOPT_QUIET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "resopt", "train", "--data", str(cifar_small), *TINY, "--epochs", "1", "--json", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    result = json.loads(proc.stdout)  # exactly one JSON document: only rank 0 reports
    assert result["world_size"] == 2
    # 100 images, 50 per process per step, drop_last: 1 step per epoch in each of 2 processes
    assert load_checkpoint(out)["metrics"]["world_size"] == 2


def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 in percent, computed here rather than by resopt's evaluation code."""
    with torch.no_grad():
        return 100.0 * float((model.eval()(x).argmax(dim=1) == y).double().mean())


def test_best_epoch_is_kept(cli, tmp_path: Path) -> None:
    """A high learning rate makes val top-1 move between epochs; the checkpoint must hold the best epoch's
    weights, whose test top-1 this test scores itself on every test image (PIL, the recorded mean/std,
    argmax) and compares with the recorded one (measured once, after the choice)."""
    import numpy as np
    from conftest import make_subset
    from PIL import Image

    data = make_subset(tmp_path / "d", 10, 10)
    out = tmp_path / "b.pt"
    r = cli("train", "--data", data, "--arch", "resnet20", "--width", "0.25", "--batch-size", "25", "--epochs", "4",
            "--lr", "0.5", "--seed", "1", "--json", "-o", out)
    assert r.code == 0, r.stderr
    tops = [h["val_top1"] for h in r.json()["history"]]
    best = max(range(4), key=lambda i: (tops[i], -i))  # the first epoch with the highest val top-1
    ckpt = load_checkpoint(out)
    assert ckpt["metrics"]["best_epoch"] == best + 1 and ckpt["metrics"]["val_top1"] == tops[best]
    mean, std = np.array(ckpt["preprocess"]["mean"]), np.array(ckpt["preprocess"]["std"])
    xs, ys = [], []
    for label, cls in enumerate(ckpt["classes"]):
        for f in sorted((data / "test" / cls).glob("*.jpg")):
            xs.append(((np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 - mean) / std).transpose(2, 0, 1))
            ys.append(label)
    x = torch.from_numpy(np.stack(xs).astype(np.float32))
    assert _top1(model_from_checkpoint(ckpt), x, torch.tensor(ys)) == pytest.approx(ckpt["metrics"]["test_top1"])
    assert ckpt["metrics"]["top1"] == ckpt["metrics"]["test_top1"] and ckpt["metrics"]["split"] == "test"


def test_val_split_through_the_cli(cli, cifar_small: Path, tmp_path: Path) -> None:
    """--val-split 0.2 holds out 8 of each class's 40 train images (before --limit-per-class 10, which then
    limits each split): 10 fit and 8 val images per class; test/ is measured once, 10 per class."""
    out = tmp_path / "v.pt"
    r = cli("train", "--data", cifar_small, *TINY, "--epochs", "1", "--val-split", "0.2", "--json", "-o", out)
    assert r.code == 0, r.stderr
    d = r.json()
    assert (d["train_images"], d["val_images"], d["test_images"]) == (100, 80, 100)
    entry = load_checkpoint(out)["lineage"][0]
    assert entry["options"]["val_split"] == 0.2 and entry["metrics"]["splits"]["val"]["held_out"] == 80
