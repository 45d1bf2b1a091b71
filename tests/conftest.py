"""Shared fixtures: real CIFAR-10 images from ../shared/datasets, unpacked once into a cache.

Only the first ``PER_CLASS`` images of each class and split are unpacked (GNU tar with a wildcard: 0.5 s
here, where Python's ``tarfile`` took 13 s for the whole archive); every subset the tests cut
(``make_subset``) is taken from those. ``RESOPT_TEST_CACHE`` chooses the cache folder (default
``.cache/data``); a cache that already holds the full archive (marker ``.complete``) is used as it is.
Without the archive the image tests skip, except in CI (``CI=true``), where a missing data set is an
error: a suite that skips its real-image tests proves nothing.

The suite trains one narrow model once per session (``trained_pt``), exports it once (``r20_onnx_session``)
and quantizes that once (``r20_int8_session``); these session files are read-only for the tests (a test that
writes next to a model copies it into its own folder first). Most command tests run in-process through
``resopt.cli.run`` (``cli`` fixture) to avoid paying torch's import per command; the contracts that only
a real process can show (exit status, the bytes on stdout, files left behind) are in test_process.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
CACHE = Path(os.environ.get("RESOPT_TEST_CACHE", REPO / ".cache" / "data"))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Images unpacked per class and split: files 0000.jpg-0059.jpg. The largest subset the suite cuts is
# cifar_small's 40 train / 20 test per class; make_subset refuses to ask for more than this.
PER_CLASS = 60
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

os.environ.setdefault("RESOPT_QUIET", "0")
# One thread per pytest-xdist worker (`make test` runs two workers on two cores): two workers with two OpenMP
# threads each would oversubscribe the cores, and a spinning OpenMP pool then waits on a descheduled peer.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", "1" if XDIST_WORKERS > 1 else "2")

# The files that take longest (a `--durations` run on 2 cores), handed out first: `make test` gives each
# xdist worker whole files (--dist loadfile, so module fixtures are built once) in collection order
# (--no-loadscope-reorder), and starting the longest first keeps one worker from finishing them alone at
# the end while the other sits idle. Every other file follows in its usual order.
LONGEST_FIRST = ["test_studies.py", "test_importer.py", "test_build.py", "test_process.py", "test_battery.py",
                 "test_report.py", "test_quantize_modes.py", "test_prune.py", "test_train.py", "test_gpu_proof.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def _missing_data(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the real-image tests (CI=true)", pytrace=False)
    pytest.skip(reason)


def require_shared(path: Path, what: str) -> Path:
    """A shared input (a published model in ../shared/models, a tool such as make) that a test needs: skip
    without it, except with CI=true, where it fails like missing data (a skip there would hide the test)."""
    if not path.exists():
        _missing_data(f"{what} not found at {path}")
    return path


def cifar_root() -> Path:
    """The unpacked CIFAR-10 ImageFolder tree (train/, test/); unpacked on first use, under a lock."""
    root = CACHE / "cifar10"
    full, subset = root / ".complete", root / f".subset-{PER_CLASS}"
    if full.exists() or subset.exists():
        return root
    if not ARCHIVE.exists():
        _missing_data(f"CIFAR-10 archive not found at {ARCHIVE}")
    if shutil.which("tar") is None:
        _missing_data("GNU tar is needed to unpack the CIFAR-10 archive")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (full.exists() or subset.exists()):
            # NNNN.jpg names: 00[0-5]? is the first 60 of each class folder.
            pattern = f"cifar10/*/*/00[0-{PER_CLASS // 10 - 1}]?.jpg"
            subprocess.run(["tar", "-xzf", str(ARCHIVE), "-C", str(CACHE), "--wildcards", pattern],
                           check=True, stdout=subprocess.DEVNULL)
            counts = {len(list((root / s / c).glob("*.jpg"))) for s in ("train", "test") for c in CLASSES}
            if counts != {PER_CLASS}:
                pytest.fail(f"unpacking {ARCHIVE} gave {sorted(counts)} images per class, expected {PER_CLASS}",
                            pytrace=False)
            subset.touch()
    return root


def cifar_full_test() -> Path:
    """All 10,000 test images (for the tests that compare with published accuracy), unpacked once beside
    the subset, under the same lock; the train split stays packed."""
    root = CACHE / "cifar10-full-test"
    marker = root / ".complete"
    if (CACHE / "cifar10" / ".complete").exists():  # a cache that already holds the whole archive
        return CACHE / "cifar10"
    if marker.exists():
        return root / "cifar10"
    if not ARCHIVE.exists():
        _missing_data(f"CIFAR-10 archive not found at {ARCHIVE}")
    root.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            subprocess.run(["tar", "-xzf", str(ARCHIVE), "-C", str(root), "--wildcards", "cifar10/test/*"],
                           check=True, stdout=subprocess.DEVNULL)
            marker.touch()
    return root / "cifar10"


def make_subset(dst: Path, train_per_class: int, test_per_class: int, classes: list[str] = CLASSES) -> Path:
    """A small ImageFolder (train/ and test/) of real CIFAR-10 JPEGs, first N files of each class."""
    assert max(train_per_class, test_per_class) <= PER_CLASS, f"raise PER_CLASS in conftest.py to {PER_CLASS}+"
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


def _run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder this run's workers share: under pytest-xdist each worker has its own base temporary folder
    (``pytest-N/popen-gwK``), the run's own ``pytest-N`` above them; without xdist, the base folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """``build(folder)`` run once per test run, however many xdist workers ask: the first takes a file lock
    and builds into ``session/NAME``, the others wait for it and reuse the folder (a session fixture that
    trains, exports or quantizes must not do it once per worker: that would double its cost on 2 cores)."""
    root = _run_dir(tmp_path_factory) / "session"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 train + 20 test images per class (400 / 200): enough to see learning, fast on 2 cores."""
    return built_once(tmp_path_factory, "cifar_small", lambda d: make_subset(d, 40, 20))


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def run_captured(*args: object) -> tuple[int, str, str]:
    """``resopt ARGS`` in-process with stdout/stderr captured, for module-scoped fixtures (the ``cli``
    fixture is per test); returns exit code, stdout and stderr."""
    import contextlib
    import io

    from resopt.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


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

    return built_once(tmp_path_factory, "trained", lambda d: train_model(
        "resnet20", DataOptions(str(cifar_small)), TrainConfig(epochs=3, batch_size=64, lr=0.05), d / "r20.pt",
        width=0.5)) / "r20.pt"


@pytest.fixture(scope="session")
def r20_onnx_session(tmp_path_factory: pytest.TempPathFactory, trained_pt: Path, cifar_small: Path) -> Path:
    """``trained_pt`` exported once by resopt's exporter (verified on 20 real images); read-only."""
    from resopt.export import ExportConfig, export_onnx

    return built_once(tmp_path_factory, "session_onnx", lambda d: export_onnx(
        trained_pt, d / "r20.onnx", ExportConfig(data=str(cifar_small), num_verify=20))) / "r20.onnx"


@pytest.fixture(scope="session")
def r20_int8_session(tmp_path_factory: pytest.TempPathFactory, r20_onnx_session: Path) -> Path:
    """``r20_onnx_session`` quantized once to static INT8 (default ``--target cpu``, 64 calibration images
    from the shipped calib/ set); read-only."""
    from resopt.quantize import QuantizeConfig, quantize_model

    # The shipped set named explicitly: the default is now the data in the model's lineage.
    return built_once(tmp_path_factory, "session_int8", lambda d: quantize_model(
        r20_onnx_session, d / "r20.int8.onnx",
        QuantizeConfig(num_calib=64, calib_data=str(REPO / "calib" / "cifar10")))) / "r20.int8.onnx"


def copy_to(src: Path, folder: Path, name: str | None = None) -> Path:
    """A private copy of a read-only session artifact, for tests that write next to their input."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / (name or src.name)
    shutil.copy2(src, dst)
    return dst


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def resnet20_counts(base: int, num_classes: int = 10, size: int = 32) -> dict[str, int]:
    """Parameters, BatchNorm channels and MACs of the CIFAR ResNet-20 (He et al. 2016: a 3x3 stem, 3 stages
    of 3 basic blocks with base, 2*base and 4*base channels, a 1x1 projection shortcut with BatchNorm where a
    stage changes width, global pooling and a linear classifier), counted from the architecture by hand.

    The expectation for the counts the commands report, independent of resopt's hook-based counters:
    ``--width 0.5`` is base 8: 68,786 parameters (68,394 once export folds the 392 BatchNorm channels into
    conv biases) and 10,314,048 MACs at 32x32.
    """
    params = 3 * base * 9 + 2 * base  # stem conv + its BatchNorm (scale, shift)
    macs = size * size * base * 3 * 9
    bn = base
    c_in, hw = base, size
    for stage, width in enumerate((base, 2 * base, 4 * base)):
        if stage:
            hw //= 2
        for block in range(3):
            cin = c_in if block == 0 else width
            params += 9 * cin * width + 9 * width * width + 4 * width  # two 3x3 convs, two BatchNorms
            macs += hw * hw * width * 9 * (cin + width)
            bn += 2 * width
            if block == 0 and cin != width:  # projection shortcut, 1x1 stride 2, with BatchNorm
                params += cin * width + 2 * width
                macs += hw * hw * width * cin
                bn += width
        c_in = width
    params += 4 * base * num_classes + num_classes
    macs += 4 * base * num_classes
    return {"params": params, "bn_channels": bn, "folded_params": params - bn, "macs": macs}
