"""Shared fixtures: real CIFAR-10 images from ../shared/datasets, unpacked once into .cache/data.

The suite trains one narrow model once per session (``trained_pt``) and runs the real commands on it,
in-process through ``resopt.cli.run`` (``cli`` fixture) so a test asserts exit codes and stdout/stderr
exactly as a user would see them, without paying torch's import for every command.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
CACHE = Path(os.environ.get("RESOPT_TEST_CACHE", REPO / ".cache" / "data"))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

os.environ.setdefault("RESOPT_QUIET", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def cifar_root() -> Path:
    """The unpacked CIFAR-10 ImageFolder tree (train/, test/); unpacked on first use, under a lock."""
    root = CACHE / "cifar10"
    if (root / ".complete").exists():
        return root
    if not ARCHIVE.exists():
        pytest.skip(f"CIFAR-10 archive not found at {ARCHIVE}")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").exists():
            with tarfile.open(ARCHIVE) as tar:
                tar.extractall(CACHE, filter="data")
            (root / ".complete").touch()
    return root


def make_subset(dst: Path, train_per_class: int, test_per_class: int, classes: list[str] = CLASSES) -> Path:
    """A small ImageFolder (train/ and test/) of real CIFAR-10 JPEGs, first N files of each class."""
    src = cifar_root()
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in classes:
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for f in sorted(os.listdir(src / split / c))[:n]:
                os.link(src / split / c / f, dst / split / c / f) if _same_fs(src, dst) else \
                    shutil.copy(src / split / c / f, dst / split / c / f)
    return dst


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b.parent if not b.exists() else b).st_dev
    except FileNotFoundError:
        return False


def randomize_bn(model, seed: int = 0):
    """Give every BatchNorm trained-looking statistics (so BN folding matters), without training."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 train + 20 test images per class (400 / 200): enough to see learning, fast on 2 cores."""
    return make_subset(tmp_path_factory.mktemp("cifar_small"), 40, 20)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``resopt ARGS...`` in-process; returns exit code, stdout and stderr."""
    from resopt.cli import run

    def _run(*args: object) -> CliResult:
        capsys.readouterr()
        code = run([str(a) for a in args])
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return _run


@pytest.fixture(scope="session")
def trained_pt(tmp_path_factory: pytest.TempPathFactory, cifar_small: Path) -> Path:
    """A narrow ResNet-20 trained for 3 epochs on ``cifar_small``; reused read-only by many tests."""
    from resopt.train import DataOptions, TrainConfig, train_model

    out = tmp_path_factory.mktemp("trained") / "r20.pt"
    train_model("resnet20", DataOptions(str(cifar_small)), TrainConfig(epochs=3, batch_size=64, lr=0.05),
                out, width=0.5)
    return out


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path
