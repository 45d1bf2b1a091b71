"""The bad-input and fault battery: every command x every kind of bad file, option, data folder and output.

Each case runs the real CLI and checks the whole contract: the exit code, ``Error:`` as the first line of
stderr and the only one, with the words that name the problem, no traceback, no file left behind, and no
input changed. The commands run with ``RESOPT_QUIET=1``, which silences progress lines (what a script that
reads stderr sets); warnings and errors still print, so an error that some chatter or a second error
line precedes fails the case.
Most cases run in-process (``resopt.cli.run``: fast, torch imported once); the ones where a hang, a signal
or a file size limit matters run ``python -m resopt`` as a subprocess under ``timeout``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import CLASSES, REPO, make_subset, randomize_bn

from resopt.artifacts import (
    Preprocess,
    lineage_entry,
    make_checkpoint,
    save_checkpoint,
    stamp_onnx,
)

CLASSES3 = CLASSES[:3]


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress lines off (in-process, and inherited by every child): only warnings and errors remain."""
    monkeypatch.setenv("RESOPT_QUIET", "1")


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A narrow untrained ResNet-20 (.pt, .onnx, calibration .npz) and a tiny real-image folder."""
    from resopt.calib import load_calib_set, save_calib_set
    from resopt.export import ExportConfig, export_onnx
    from resopt.models import build_model, model_widths

    root = tmp_path_factory.mktemp("battery")
    data = make_subset(root / "data", 6, 3, CLASSES3)
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet20", 3, width=0.25))
    pre = Preprocess(32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), None)
    ckpt = make_checkpoint(arch="resnet20", arch_kwargs={"width": 0.25}, state_dict=model.state_dict(),
                           classes=CLASSES3, preprocess=pre, lineage=[lineage_entry("train", options={})],
                           widths=model_widths(model))
    save_checkpoint(ckpt, root / "m.pt")
    export_onnx(root / "m.pt", root / "m.onnx", ExportConfig(exporter="torchscript", opset=17, data=str(data),
                                                             num_verify=6))
    save_calib_set(load_calib_set(str(data), num=6), root / "calib.npz")
    return {"root": root, "data": data, "pt": root / "m.pt", "onnx": root / "m.onnx", "npz": root / "calib.npz"}


def _tree(*folders: Path) -> dict[str, str]:
    """Every path under ``folders`` with a hash of its content (links by target), to spot leftovers."""
    out: dict[str, str] = {}
    for folder in folders:
        for dirpath, dirs, files in os.walk(folder):
            for name in dirs + files:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = "-> " + os.readlink(p)
                elif p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
                elif not p.is_dir():
                    out[str(p)] = "special"
                else:
                    out[str(p)] = "dir"
    return out


def _check(code: int, stderr: str, expect_code: int, words: tuple[str, ...], before: dict[str, str],
           after: dict[str, str]) -> None:
    assert "Traceback" not in stderr, stderr
    assert code == expect_code, f"exit {code}, expected {expect_code}: {stderr}"
    lines = stderr.splitlines()
    # The one Error: line comes first (a Hint: or warnings may follow it), and there is exactly one.
    assert lines and lines[0].startswith("Error: "), f"first line of stderr is not the Error: line: {stderr!r}"
    assert sum(ln.startswith("Error: ") for ln in lines) == 1, stderr
    error_line = lines[0]
    for w in words:
        assert w.lower() in error_line.lower(), f"{w!r} not in {error_line!r}"
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))}"


def _run(cli, argv: list[str], expect_code: int, words: tuple[str, ...], watch: list[Path]) -> None:
    before = _tree(*watch)
    r = cli(*argv)
    _check(r.code, r.stderr, expect_code, words, before, _tree(*watch))
    if expect_code != 0:
        assert r.stdout == "", r.stdout


# ------------------------------------------------------------------------------ bad checkpoints


def _ckpt_dict(good: dict[str, Path]) -> dict:
    return torch.load(good["pt"], weights_only=True)


class _Evil:
    def __reduce__(self):  # what a malicious pickle does: would run on load without weights_only
        return (os.system, ("touch PWNED",))


CKPT_CASES: dict[str, tuple[Callable[[dict], object], tuple[str, ...]]] = {
    "format_version_str": (lambda c: c.update(format_version="one"), ("format_version",)),
    "input_size_str": (lambda c: c["preprocess"].update(input_size="big"), ("preprocess.input_size",)),
    "input_size_huge": (lambda c: c["preprocess"].update(input_size=100000), ("input_size", "4096")),
    "std_zero": (lambda c: c["preprocess"].update(std=[0.0, 0.0, 0.0]), ("preprocess.std",)),
    "mean_nan": (lambda c: c["preprocess"].update(mean=[float("nan")] * 3), ("preprocess.mean",)),
    "mean_short": (lambda c: c["preprocess"].update(mean=[0.5]), ("preprocess.mean",)),
    "classes_int": (lambda c: c.update(classes=5), ("classes",)),
    "classes_count": (lambda c: c.update(num_classes=7), ("num_classes",)),
    "classes_repeat": (lambda c: c.update(classes=["a", "a", "b"]), ("classes",)),
    "lineage_str": (lambda c: c.update(lineage="trained by me"), ("lineage",)),
    "arch_unknown": (lambda c: c.update(arch="resnet9000"), ("arch", "resnet9000")),
    "arch_int": (lambda c: c.update(arch=20), ("arch",)),
    "no_state_dict": (lambda c: c.pop("state_dict"), ("state_dict",)),
    "state_dict_str": (lambda c: c["state_dict"].update({"fc.weight": "x"}), ("state_dict",)),
    "preprocess_list": (lambda c: c.update(preprocess=[32]), ("preprocess",)),
    "widths_str": (lambda c: c.update(widths="wide"), ("widths",)),
    "weights_nan": (lambda c: c["state_dict"]["fc.weight"].fill_(float("nan")), ("state_dict.fc.weight", "nan")),
}


def _write_bad_ckpt(good: dict[str, Path], case: str, dst: Path) -> None:
    if case == "pickled_code":
        torch.save({"format": "resopt.checkpoint", "evil": _Evil()}, dst)
    elif case == "garbage":
        dst.write_bytes(os.urandom(4096))
    elif case == "empty":
        dst.write_bytes(b"")
    elif case == "a_list":
        torch.save([1, 2, 3], dst)
    else:
        c = _ckpt_dict(good)
        CKPT_CASES[case][0](c)
        torch.save(c, dst)


ALL_CKPT = {**{k: v[1] for k, v in CKPT_CASES.items()}, "pickled_code": ("pickled",),
            "garbage": ("not a readable",), "empty": ("not a readable",), "a_list": ("not written by resopt",)}


def _ckpt_commands(bad: Path, good: dict[str, Path], out: Path) -> dict[str, list[str]]:
    d = str(good["data"])
    return {
        "info": ["info", bad],
        "export": ["export", bad, "-o", out / "x.onnx", "-d", d],
        "prune": ["prune", bad, "--sparsity", "0.5", "--finetune-epochs", "0", "-d", d, "-o", out / "p.pt"],
        "distill": ["distill", "--teacher", bad, "--student", "resnet20", "--epochs", "1", "-d", d,
                    "-o", out / "s.pt"],
        "distill-student": ["distill", "--teacher", good["pt"], "--student", bad, "--epochs", "1", "-d", d,
                            "-o", out / "s.pt"],
        "quantize": ["quantize", bad, "--mode", "fixed", "-o", out / "q.onnx"],
        "quantize-qat": ["quantize", bad, "--mode", "qat", "-d", d, "-o", out / "q.onnx"],
        "bench": ["bench", bad, "-b", "1", "--iters", "1", "--warmup", "0", "--min-time", "0", "--rounds", "1"],
    }


@pytest.mark.parametrize("command", ["info", "export", "prune", "distill", "distill-student", "quantize",
                                     "quantize-qat", "bench"])
@pytest.mark.parametrize("case", sorted(ALL_CKPT))
def test_bad_checkpoint(cli, good, tmp_path, monkeypatch, case, command):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.pt"
    _write_bad_ckpt(good, case, bad)
    argv = [str(a) for a in _ckpt_commands(bad, good, tmp_path)[command]]
    _run(cli, argv, 3, ALL_CKPT[case] + (str(bad),), [tmp_path, good["root"]])
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------- bad ONNX models


def _meta(good: dict[str, Path]) -> dict:
    from resopt.artifacts import read_onnx_meta

    return read_onnx_meta(good["onnx"])


def _with_meta(good: dict[str, Path], change: Callable[[dict], object]) -> onnx.ModelProto:
    m = onnx.load(str(good["onnx"]))
    meta = _meta(good)
    change(meta)
    stamp_onnx(m, meta)
    return m


def _raw_meta(good: dict[str, Path], key: str, value: str) -> onnx.ModelProto:
    m = onnx.load(str(good["onnx"]))
    for p in m.metadata_props:
        if p.key == "resopt." + key:
            p.value = value
    return m


def _add_graph(good: dict[str, Path]) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 32, 32])
    g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    stamp_onnx(m, _meta(good))
    return m


def _fixed_batch(good: dict[str, Path]) -> onnx.ModelProto:
    m = onnx.load(str(good["onnx"]))
    d = m.graph.input[0].type.tensor_type.shape.dim[0]
    d.Clear()
    d.dim_value = 1
    return m


ONNX_CASES: dict[str, tuple[Callable[[dict], onnx.ModelProto], tuple[str, ...]]] = {
    "meta_input_size_str": (lambda g: _with_meta(g, lambda m: m["preprocess"].update(input_size="big")),
                            ("preprocess.input_size",)),
    "meta_input_size_huge": (lambda g: _with_meta(g, lambda m: m["preprocess"].update(input_size=100000)),
                             ("preprocess.input_size",)),
    "meta_std_zero": (lambda g: _with_meta(g, lambda m: m["preprocess"].update(std=[0, 0, 0])), ("std",)),
    "meta_classes_int": (lambda g: _with_meta(g, lambda m: m.update(classes=5)), ("classes",)),
    "meta_lineage_str": (lambda g: _with_meta(g, lambda m: m.update(lineage="x")), ("lineage",)),
    "meta_preprocess_not_json": (lambda g: _raw_meta(g, "preprocess", "{oops"), ("preprocess",)),
    "add_graph": (_add_graph, ("classifier",)),
    "fixed_batch": (_fixed_batch, ("fixed batch",)),
}


def _onnx_commands(bad: Path, good: dict[str, Path], out: Path) -> dict[str, list]:
    return {
        "info": ["info", bad],
        "quantize": ["quantize", bad, "--mode", "int8-dynamic", "-o", out / "q.onnx"],
        "bench": ["bench", bad, "-b", "1,4", "--iters", "1", "--warmup", "0", "--min-time", "0", "--rounds", "1"],
        "build": ["build", bad, "-o", out / "e.engine"],
    }


# build checks the graph's metadata and input before it needs TensorRT, so it runs here for those cases.
# info describes any ONNX, classifier or not: only its metadata must be sound there.
ONNX_PAIRS = [(case, command) for case in sorted([*ONNX_CASES, "garbage", "empty"])
              for command in ("info", "quantize", "bench", "build")
              if not (command in ("info", "build") and case in ("add_graph", "fixed_batch"))]


@pytest.mark.parametrize("case,command", ONNX_PAIRS)
def test_bad_onnx(cli, good, tmp_path, monkeypatch, case, command):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.onnx"
    if case == "garbage":
        bad.write_bytes(os.urandom(4096))
        words: tuple[str, ...] = ("not a readable onnx",)
    elif case == "empty":
        bad.write_bytes(b"")
        words = ()
    else:
        make, words = ONNX_CASES[case]
        onnx.save(make(good), str(bad))
    argv = [str(a) for a in _onnx_commands(bad, good, tmp_path)[command]]
    _run(cli, argv, 3, words + (str(bad),), [tmp_path, good["root"]])


def test_bench_warns_when_outputs_are_nan(cli, good, tmp_path, monkeypatch):
    from onnx import numpy_helper

    monkeypatch.chdir(tmp_path)
    m = onnx.load(str(good["onnx"]))
    init = max(m.graph.initializer, key=lambda t: len(t.dims))  # a conv weight
    init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name))
    onnx.save(m, str(tmp_path / "nan.onnx"))
    r = cli("bench", tmp_path / "nan.onnx", "-d", good["data"], "-b", "1", "--iters", "1", "--warmup", "0",
            "--min-time", "0", "--rounds", "1", "--json")
    assert r.code == 0, r.stderr
    assert "are NaN or infinite" in r.stderr and "nan.onnx" in r.stderr, r.stderr
    acc = json.loads(r.stdout)["models"][0]["accuracy"]
    assert acc["nonfinite_outputs"] == acc["images"] == 9  # every output, recorded in the JSON too


# -------------------------------------------------------------------------------- bad sidecars


SIDECAR_CASES = {
    "json_list": ("[1, 2]", ("list",)),
    "not_json": ("{oops", ("not valid json",)),
    "preprocess_str": (json.dumps({"preprocess": "x", "classes": CLASSES3}), ("preprocess",)),
    "input_size_huge": (json.dumps({"preprocess": {"input_size": 100000, "mean": [0, 0, 0], "std": [1, 1, 1]}}),
                        ("preprocess.input_size",)),
    "classes_int": (json.dumps({"classes": 5}), ("classes",)),
    "macs_negative": (json.dumps({"macs": -1}), ("macs",)),
}


@pytest.mark.parametrize("case", sorted(SIDECAR_CASES))
def test_bad_sidecar(cli, good, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 64)
    text, words = SIDECAR_CASES[case]
    (tmp_path / "m.engine.json").write_text(text)
    _run(cli, ["info", str(engine)], 3, words + ("sidecar",), [tmp_path])


# ---------------------------------------------------------------------- bad calibration sets


def _npz_with(good: dict[str, Path], dst: Path, **change: object) -> None:
    with np.load(good["npz"]) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    for k, v in change.items():
        if k in arrays and k != "meta":
            arrays[k] = v  # type: ignore[assignment]
        else:
            meta[k] = v
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(dst, **arrays)


NPZ_CASES: dict[str, tuple[dict, tuple[str, ...]]] = {
    "classes_int": ({"classes": 5}, ("classes",)),
    "seed_str": ({"seed": "x"}, ("seed",)),
    "sha_bad": ({"sha256": "nothex"}, ("sha256",)),
    "labels_out_of_range": ({"labels": np.array([0, 1, 2, 9, 0, 1], dtype=np.int64)}, ("labels",)),
    "offsets_wrong": ({"offsets": np.array([0, 5], dtype=np.int64)}, ("offsets",)),
    "data_float": ({"data": np.zeros(10, dtype=np.float32)}, ("data",)),
}


@pytest.mark.parametrize("case", sorted([*NPZ_CASES, "garbage"]))
def test_bad_calibration_set(cli, good, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.npz"
    if case == "garbage":
        bad.write_bytes(os.urandom(512))
        words: tuple[str, ...] = ("not a readable calibration set",)
    else:
        change, words = NPZ_CASES[case]
        _npz_with(good, bad, **change)
    _run(cli, ["quantize", str(good["onnx"]), "--calib-data", str(bad), "-o", str(tmp_path / "q.onnx")], 3,
         words + (str(bad),), [tmp_path, good["root"]])


# ------------------------------------------------------------------------------- bad options


OPTION_CASES = [
    (["train", "--momentum", "-5"], "--momentum"),
    (["train", "--input-size", "0"], "--input-size"),
    (["train", "--workers", "-1"], "--workers"),
    (["train", "--warmup-epochs", "nan"], "--warmup-epochs"),
    (["train", "--wd", "nan"], "--weight-decay"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--label-smoothing", "1"], "--label-smoothing"),
    (["train", "--val-split", "1.5"], "--val-split"),
    (["train", "--width", "0"], "--width"),
    (["train", "--limit-per-class", "0"], "--limit-per-class"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--seed", "-1"], "--seed"),
    (["distill", "--teacher", "{pt}", "-s", "resnet20", "--alpha", "2"], "--alpha"),
    (["distill", "--teacher", "{pt}", "-s", "resnet20", "--temperature", "0"], "--temperature"),
    (["prune", "{pt}", "--iterative", "--steps", "0"], "--steps"),
    (["prune", "{pt}", "--analyze-images", "0"], "--analyze-images"),
    (["prune", "{pt}", "--sparsity", "1"], "--sparsity"),
    (["prune", "{pt}", "--target-macs", "nan"], "--target-macs"),
    (["prune", "{pt}", "--round-to", "0"], "--round-to"),
    (["prune", "{pt}", "--sparsity", "0.5", "--round-to", "1000"], "--round-to 1000"),
    (["prune", "{pt}", "--finetune-epochs", "-1"], "--finetune-epochs"),
    (["export", "{pt}", "--tolerance", "nan"], "--tolerance"),
    (["export", "{pt}", "--num-verify", "0"], "--num-verify"),
    (["quantize", "{onnx}", "--num-calib", "0"], "--num-calib"),
    (["quantize", "{onnx}", "--mode", "fixed", "--bits", "9"], "--bits"),
    (["quantize", "{onnx}", "--mode", "kmeans", "--clusters", "1"], "--clusters"),
    (["quantize", "{onnx}", "--max-drop", "-1"], "--max-drop"),
    (["quantize", "{onnx}", "--min-agreement", "101"], "--min-agreement"),
    (["bench", "{onnx}", "-b", "100000000"], "--batch-size"),
    (["bench", "{onnx}", "-b", "0"], "--batch-size"),
    (["bench", "{onnx}", "--min-time", "nan"], "--min-time"),
    (["bench", "{onnx}", "--iters", "0"], "--iters"),
    (["bench", "{onnx}", "--threads", "0"], "--threads"),
    (["bench", "{onnx}", "--rounds", "0"], "--rounds"),
    (["build", "{onnx}", "--max-batch", "0"], "--max-batch"),
    (["build", "{onnx}", "--calib-batch", "-3"], "--calib-batch"),
    (["train", "--momentum", "abc"], "--momentum"),
    (["train", "--no-such-option"], "--no-such-option"),
]


@pytest.mark.parametrize("argv,flag", OPTION_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in OPTION_CASES])
def test_bad_option_before_any_work(cli, good, tmp_path, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    # --data points at a folder that does not exist: a range error must come first, before it is read.
    args = [a.format(pt=good["pt"], onnx=good["onnx"]) for a in argv] + ["-d", str(tmp_path / "nodata")]
    if argv[0] in ("quantize", "build"):
        args = args[:-2] + ["--calib-data", str(tmp_path / "nodata")]
    before = _tree(tmp_path, good["root"])
    r = cli(*args)
    _check(r.code, r.stderr, 2, (flag,), before, _tree(tmp_path, good["root"]))
    assert r.stderr.startswith("Error: "), r.stderr


# ------------------------------------------------------------------------------- bad data folders


def _bad_image(folder: Path, kind: str) -> Path:
    dst = folder / "train" / CLASSES3[0] / "zz_bad.jpg"
    src = next((folder / "train" / CLASSES3[0]).iterdir())
    if kind == "truncated":
        dst.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2])
    elif kind == "zero_bytes":
        dst.write_bytes(b"")
    elif kind == "text":
        dst.write_text("this is not an image\n")
    elif kind == "dangling_link":
        dst.symlink_to(folder / "gone.jpg")
    return dst


@pytest.fixture
def data_copy(good, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(good["data"], dst)
    return dst


# bench spawns a worker process per file (seconds each): one kind of bad image is enough there.
IMAGE_PAIRS = [(kind, command) for kind in ("truncated", "zero_bytes", "text", "dangling_link")
               for command in ("train", "train-json", "export", "quantize", "bench")
               if command != "bench" or kind == "truncated"]


@pytest.mark.parametrize("kind,command", IMAGE_PAIRS)
def test_unreadable_image_names_the_file(cli, good, data_copy, tmp_path, monkeypatch, kind, command):
    monkeypatch.chdir(tmp_path)
    bad = _bad_image(data_copy, kind)
    d = str(data_copy)
    argv = {
        "train": ["train", "-d", d, "--epochs", "1", "--width", "0.25", "-o", "t.pt"],
        "train-json": ["train", "-d", d, "--epochs", "1", "--width", "0.25", "-o", "t.pt", "--json"],
        "export": ["export", good["pt"], "-d", d, "--split", "train", "--num-verify", "30", "-o", "x.onnx"],
        "quantize": ["quantize", good["onnx"], "--calib-data", d, "--num-calib", "100", "-o", "q.onnx"],
        "bench": ["bench", good["onnx"], "-d", str(data_copy / "train"), "-b", "1", "--iters", "1", "--warmup",
                  "0", "--min-time", "0", "--rounds", "1"],
    }[command]
    _run(cli, [str(a) for a in argv], 4, (str(bad),), [tmp_path, good["root"]])


def _one_class(d: Path) -> str:
    for split in ("train", "test"):
        for c in CLASSES3[1:]:
            shutil.rmtree(d / split / c)
    return "at least 2"


def _test_lacks_class(d: Path) -> str:
    shutil.rmtree(d / "test" / CLASSES3[2])
    return CLASSES3[2]


def _symlink_loop(d: Path) -> str:
    (d / "train" / CLASSES3[0] / "again").symlink_to(d / "train" / CLASSES3[0])
    return "symlink"


@pytest.mark.parametrize("shape", [_one_class, _test_lacks_class, _symlink_loop], ids=lambda f: f.__name__[1:])
def test_data_folder_shapes(cli, data_copy, tmp_path, monkeypatch, shape):
    monkeypatch.chdir(tmp_path)
    words = shape(data_copy)
    _run(cli, ["train", "-d", str(data_copy), "--epochs", "1", "--width", "0.25", "-o", "t.pt"], 4, (words,),
         [tmp_path])


# ------------------------------------------------------------------------------------- outputs


def _outputs(good: dict[str, Path], tmp: Path) -> list[tuple[str, list, tuple[str, ...], Callable | None]]:
    pt, on, d, npz = str(good["pt"]), str(good["onnx"]), str(good["data"]), str(good["npz"])
    folder = tmp / "afolder.pt"  # a folder with an output's suffix: only the folder check can refuse it
    onnx_folder = tmp / "afolder.onnx"
    npz_folder = tmp / "afolder.npz"
    a_file = tmp / "afile"

    def mk_folder() -> None:
        for f in (folder, onnx_folder, npz_folder):
            f.mkdir()

    def mk_file() -> None:
        a_file.write_text("x")

    def copy_npz() -> None:
        shutil.copy(npz, tmp / "set.npz")

    return [
        ("train -o folder", ["train", "-d", d, "-o", folder], ("is a folder",), mk_folder),
        ("train -o suffix", ["train", "-d", d, "-o", tmp / "t.onnx"], (".pt",), None),
        ("train -o under a file", ["train", "-d", d, "-o", a_file / "t.pt"], ("not a folder",), mk_file),
        ("export -o folder", ["export", pt, "-d", d, "-o", onnx_folder], ("is a folder",), mk_folder),
        ("export -o the input", ["export", pt, "-d", d, "-o", pt], (".onnx",), None),
        ("prune -o the input", ["prune", pt, "--sparsity", "0.5", "-d", d, "-o", pt], ("same file",), None),
        ("distill -o the teacher", ["distill", "--teacher", pt, "-s", "resnet20", "-d", d, "-o", pt],
         ("same file",), None),
        ("quantize -o the input", ["quantize", on, "-o", on], ("same file",), None),
        ("quantize --save-calib suffix", ["quantize", on, "--calib-data", d, "--save-calib", tmp / "s.zip",
                                          "-o", tmp / "q.onnx"], ("--save-calib", ".npz"), None),
        ("quantize --save-calib equals -o", ["quantize", on, "--calib-data", d, "--save-calib", tmp / "q.npz",
                                             "-o", tmp / "q.npz"], (".onnx",), None),
        ("quantize --save-calib same as -o name", ["quantize", on, "--calib-data", d, "--save-calib",
                                                   tmp / "q.onnx", "-o", tmp / "q.onnx"], ("--save-calib",), None),
        ("quantize --save-calib the input set", ["quantize", on, "--calib-data", tmp / "set.npz", "--save-calib",
                                                 tmp / "set.npz", "-o", tmp / "q.onnx"], ("same file",), copy_npz),
        ("quantize --save-calib folder", ["quantize", on, "--calib-data", d, "--save-calib", npz_folder,
                                          "-o", tmp / "q.onnx"], ("--save-calib", "is a folder"), mk_folder),
        ("quantize --save-calib the data", ["quantize", on, "--calib-data", d, "--save-calib", d, "-o",
                                            tmp / "q.onnx"], ("--save-calib", ".npz"), None),
        ("build -o suffix", ["build", on, "-o", tmp / "e.onnx"], (".engine",), None),
    ]


OUTPUT_IDS = [c[0] for c in _outputs({"pt": Path("a"), "onnx": Path("b"), "data": Path("c"), "npz": Path("d")},
                                     Path("t"))]


@pytest.mark.serial  # timed: the refusal must come before the work, which a shared core would blur
@pytest.mark.parametrize("case", OUTPUT_IDS)
def test_bad_output_refused_before_work(cli, good, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    _id, argv, words, setup = next(c for c in _outputs(good, tmp_path) if c[0] == case)
    if setup:
        setup()
    t0 = time.perf_counter()
    _run(cli, [str(a) for a in argv], 2, words, [tmp_path, good["root"]])
    assert time.perf_counter() - t0 < 20  # refused up front, not after training or calibration


def _unprivileged() -> None:
    """In the child, before exec: when the suite runs as root (CI does), drop every capability from the
    bounding set, so that the command's process is root without privileges (no CAP_DAC_OVERRIDE: a 0555
    folder refuses its writes, as it would a normal user's). The interpreter may live under /root, where a
    switch to another uid could not exec it."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in range(64):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
            os._exit(99)


@pytest.mark.parametrize("command", ["train", "export", "quantize"])
def test_read_only_output_folder_refused_before_work(good, tmp_path, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    d = str(good["data"])
    argv = {"train": ["train", "-d", d, "-o", ro / "t.pt"],
            "export": ["export", good["pt"], "-d", d, "-o", ro / "x.onnx"],
            "quantize": ["quantize", good["onnx"], "--calib-data", d, "-o", ro / "q.onnx"]}[command]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    before = _tree(tmp_path, good["root"])
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "resopt", *map(str, argv)], cwd=tmp_path, env=env, text=True,
                           capture_output=True, timeout=120, preexec_fn=_unprivileged)
    finally:
        ro.chmod(0o755)
    assert r.returncode != 99, "could not drop the child's capabilities"
    _check(r.returncode, r.stderr, 2, ("not writable", str(ro)), before, _tree(tmp_path, good["root"]))
    assert r.stdout == "", r.stdout
    assert time.perf_counter() - t0 < 60  # refused up front, not after training or calibration


def test_unprivileged_child_cannot_write_a_read_only_folder(tmp_path):
    """The premise of the case above, checked: the child really cannot write into a 0555 folder."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = subprocess.run([sys.executable, "-c", f"open({str(ro / 'f')!r}, 'w')"], capture_output=True,
                           text=True, preexec_fn=_unprivileged, timeout=60)
    finally:
        ro.chmod(0o755)
    assert r.returncode == 1 and "PermissionError" in r.stderr, r.stderr
    assert not (ro / "f").exists()


# ------------------------------------------------------- hangs, signals, full disk: subprocesses


def _resopt(args: list, *, cwd: Path, timeout: int = 90, pre: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "resopt", *map(str, args)])
    # `timeout` turns a hang into exit 124 and a failed test instead of a stuck suite.
    return subprocess.run(["bash", "-c", f"{pre} exec timeout -k 5 {timeout} {cmd}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout + 30)


@pytest.mark.parametrize("target", ["fifo.pt", "urandom.onnx"])
@pytest.mark.parametrize("command", ["info", "bench"])
def test_non_regular_file_is_refused_not_read(good, tmp_path, target, command):
    path = tmp_path / target
    if target == "fifo.pt":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/urandom")
    args = ["info", path] if command == "info" else ["bench", path, "-b", "1", "--iters", "1"]
    before = _tree(tmp_path)
    r = _resopt(args, cwd=tmp_path, timeout=60)
    _check(r.returncode, r.stderr, 3, ("not a regular file",), before, _tree(tmp_path))


def _default_sigint() -> None:
    """A shell without job control starts background jobs with SIGINT ignored, and Python keeps it so: give
    the child the default disposition, as a terminal's Ctrl-C would find it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_train(data: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # Long enough to be interrupted: the per-image (PIL) data path and epochs to spare (the fast path runs an
    # epoch of these few images in milliseconds, and 500 of them ended before the signal came).
    return subprocess.Popen([sys.executable, "-m", "resopt", "train", "-d", str(data), "--epochs", "100000",
                             "--data-path", "pil", "--width", "0.25", "-b", "8", "-o", "t.pt"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_while_training_leaves_nothing(good, tmp_path, sig, code):
    p = _start_train(good["data"], tmp_path)
    try:
        deadline = time.monotonic() + 90
        # The resume state is rewritten after every epoch: wait for one, then interrupt mid-run.
        while not (tmp_path / "t.pt.resume").exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert (tmp_path / "t.pt.resume").exists(), p.stderr.read() if p.poll() is not None else "no epoch"
        time.sleep(0.3)
        p.send_signal(sig)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert "Traceback" not in err, err
    assert p.returncode == code, err
    # Training logs its epochs on stderr first; the signal's one Error: line ends it (Typer used to swallow
    # Ctrl-C into a silent exit 130).
    errors = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
    expected = "Error: interrupted" if sig == signal.SIGINT else "Error: terminated by SIGTERM"
    assert len(errors) == 1 and errors[0].startswith(expected), err
    assert err.splitlines()[-1] == errors[0], err
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == ["t.pt.resume"], left  # the last complete resume state; no .tmp, no half-written t.pt
    torch.load(tmp_path / "t.pt.resume", weights_only=True)  # complete and loadable


@pytest.mark.parametrize("command", ["train", "prune", "export"])
def test_full_disk_is_one_line_and_leaves_nothing(cli, good, tmp_path, monkeypatch, command):
    # A file size limit stands in for a full disk (SIGXFSZ ignored, so a write past it fails with EFBIG;
    # torch.save reports both as the same RuntimeError). 8 KB fits nothing resopt writes here. Set
    # in-process for this one command only, around the CLI call.
    import resource

    monkeypatch.chdir(tmp_path)
    d = str(good["data"])
    args = {"train": ["train", "-d", d, "--epochs", "1", "--width", "0.25", "-o", "t.pt"],
            "prune": ["prune", good["pt"], "--sparsity", "0.5", "--finetune-epochs", "0", "-d", d, "-o", "p.pt"],
            "export": ["export", good["pt"], "-d", d, "--num-verify", "6", "--exporter", "torchscript",
                       "--opset", "17", "-o", "x.onnx"]}[command]
    before = _tree(tmp_path, good["root"])
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, old_limit[1]))
    try:
        r = cli(*map(str, args))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    _check(r.code, r.stderr, 1, ("could not write",), before, _tree(tmp_path, good["root"]))
    assert [ln for ln in r.stderr.splitlines() if ln.startswith(("Error", "Hint"))] == \
        [ln for ln in r.stderr.splitlines()[-2:] if ln.startswith(("Error", "Hint"))]


def test_bad_resume_state_is_refused(cli, good, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = str(good["data"])
    (tmp_path / "t.pt.resume").write_bytes(os.urandom(2048))
    _run(cli, ["train", "-d", d, "--epochs", "1", "--width", "0.25", "-o", "t.pt", "--resume"], 3,
         ("resume state", "t.pt.resume"), [tmp_path])
    torch.save({"format": "x", "evil": _Evil()}, tmp_path / "t.pt.resume")
    _run(cli, ["train", "-d", d, "--epochs", "1", "--width", "0.25", "-o", "t.pt", "--resume"], 3,
         ("pickled",), [tmp_path])
    torch.save({"config": {}, "epoch": "three"}, tmp_path / "t.pt.resume")
    _run(cli, ["train", "-d", d, "--epochs", "1", "--width", "0.25", "-o", "t.pt", "--resume"], 3,
         ("resume state", "model"), [tmp_path])
    assert not (tmp_path / "PWNED").exists()


def test_corrupt_cifar_under_data_home_is_exit_4(cli, tmp_path, monkeypatch):
    """`--data cifar10` over a RESOPT_DATA home whose torchvision batches are corrupt: one line, exit 4
    (torchvision's own check raised a RuntimeError traceback, exit 1)."""
    home = tmp_path / "home"
    batches = home / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"]:
        (batches / name).write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    monkeypatch.setenv("RESOPT_DATA", str(home))
    monkeypatch.chdir(tmp_path)
    _run(cli, ["train", "--data", "cifar10", "--epochs", "1", "--width", "0.25", "-o", "t.pt"], 4,
         ("corrupt", str(batches)), [tmp_path])


def test_interrupt_while_the_temporary_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    """A SIGINT that lands as the temporary file is created (after the system call made it, before its name
    is returned) must not leave a 0-byte ``.x.onnx.*.tmp``: the KeyboardInterrupt is raised from inside
    os.open, the last moment the old mkstemp-before-try code could not clean up after."""
    from resopt.artifacts import atomic_output

    real_open = os.open

    def open_then_interrupt(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        os.close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "x.onnx") as tmp:
        tmp.write_bytes(b"never")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_signal_after_the_output_is_in_place_lets_the_command_finish(cli, good, tmp_path, monkeypatch):
    """SIGINT just after the output was renamed into place: the command completes and exits 0 with the
    whole, loadable file and one Warning line (the previous file at -o is gone by then, so there is nothing
    to roll back to). It used to exit 130 with the finished file left."""
    import resopt.artifacts.files as files

    monkeypatch.chdir(tmp_path)
    real_replace = os.replace
    sent: list[str] = []

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        if Path(dst).name == "x.onnx":
            sent.append(str(dst))
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, in this (main) thread

    monkeypatch.setattr(files.os, "replace", replace_then_signal)
    # As a terminal gives it: a suite run as a background job starts with SIGINT ignored.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        r = cli("export", good["pt"], "-d", good["data"], "--num-verify", "6", "--exporter", "torchscript",
                "--opset", "17", "-o", "x.onnx")
    finally:
        signal.signal(signal.SIGINT, old)
    assert sent == ["x.onnx"]
    assert r.code == 0, r.stderr
    assert not any(ln.startswith("Error: ") for ln in r.stderr.splitlines()), r.stderr
    assert "Warning: SIGINT arrived after x.onnx was written; the command finished" in r.stderr
    onnx.checker.check_model(onnx.load(str(tmp_path / "x.onnx")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


def test_signal_before_the_output_is_in_place_still_stops_the_command(cli, good, tmp_path, monkeypatch):
    """The other side of the line: SIGINT just before the rename is exit 130, one Error: line, nothing left."""
    import resopt.artifacts.files as files

    monkeypatch.chdir(tmp_path)
    real_chmod = os.chmod

    def chmod_then_signal(path, mode, *args, **kwargs):
        real_chmod(path, mode, *args, **kwargs)
        if Path(path).name.startswith(".x.onnx."):  # atomic_output's last step before the rename
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(files.os, "chmod", chmod_then_signal)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = _tree(tmp_path, good["root"])
        r = cli("export", good["pt"], "-d", good["data"], "--num-verify", "6", "--exporter", "torchscript",
                "--opset", "17", "-o", "x.onnx")
    finally:
        signal.signal(signal.SIGINT, old)
    _check(r.code, r.stderr, 130, ("interrupted; no partial file was left",), before, _tree(tmp_path, good["root"]))
