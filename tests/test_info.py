"""``resopt info``: facts and lineage of .pt, .onnx and .engine files; --archs; refusing unsafe files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import CLASSES
from torch import nn

from resopt.artifacts import load_checkpoint, read_onnx_meta, sha256_file, write_sidecar
from resopt.export import ExportConfig, export_onnx
from resopt.info import describe_model
from resopt.models import REGISTRY, count_macs, count_params, model_from_checkpoint
from resopt.onnx_utils import onnx_param_counts


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, trained_pt: Path) -> dict[str, Path]:
    """r20.pt -> r20.onnx (resopt export) -> r20.int8.onnx (onnxruntime Q/DQ, metadata carried over)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from resopt.artifacts import Preprocess
    from resopt.calib import find_default_calib
    from resopt.data import load_eval_set, stack_images

    folder = tmp_path_factory.mktemp("info")
    pt = folder / "r20.pt"
    shutil.copy(trained_pt, pt)
    onnx_path = folder / "r20.onnx"
    export_onnx(pt, onnx_path, ExportConfig(num_verify=20))

    pre = Preprocess.from_dict(load_checkpoint(pt)["preprocess"])
    images, _ = stack_images(load_eval_set(find_default_calib(CLASSES), pre, per_class=2))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": images.numpy()}])

        def get_next(self) -> dict | None:
            return next(self._it, None)

    int8 = folder / "r20.int8.onnx"
    quantize_static(str(onnx_path), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"pt": pt, "onnx": onnx_path, "int8": int8}


def test_pt_info(cli, chain: dict[str, Path]) -> None:
    pt = chain["pt"]
    r = cli("info", pt, "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    ckpt = load_checkpoint(pt)
    model = model_from_checkpoint(ckpt)
    assert (d["kind"], d["format"], d["arch"], d["num_classes"]) == ("pt", "PyTorch checkpoint", "resnet20", 10)
    assert (d["params"], d["nonzero_params"]) == count_params(model)
    assert d["macs"] == count_macs(model, 32)
    assert d["input_size"] == 32 and d["mean"] == ckpt["preprocess"]["mean"] and d["std"] == ckpt["preprocess"]["std"]
    assert d["file_size"] == pt.stat().st_size and d["sha256"] == sha256_file(pt)
    assert [s["command"] for s in d["lineage_steps"]] == ["train"]
    step = d["lineage_steps"][0]
    assert step["options"]["arch"] == "resnet20" and step["options"]["width"] == 0.5
    assert step["metrics"]["top1"] == ckpt["metrics"]["top1"] and step["parent_file"] is None


def test_onnx_info_table_and_json(cli, chain: dict[str, Path]) -> None:
    pt, path = chain["pt"], chain["onnx"]
    r = cli("info", path, "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "onnx" and d["format"] == "ONNX opset 18, FP32" and d["arch"] == "resnet20"
    assert (d["params"], d["nonzero_params"]) == onnx_param_counts(onnx.load(path))
    assert d["macs"] == count_macs(model_from_checkpoint(load_checkpoint(pt)), 32)
    assert d["details"]["inputs"] == [{"name": "input", "shape": ["batch", 3, 32, 32]}]
    assert [s["command"] for s in d["lineage_steps"]] == ["train", "export"]
    export = d["lineage_steps"][1]
    assert export["parent_file"] == "r20.pt" and export["parent_sha256"] == sha256_file(pt)
    assert export["options"] == {"exporter": "dynamo", "opset": 18, "tolerance": 0.001, "num_verify": 20}
    assert export["metrics"]["top1_agreement"] == 1.0 and export["metrics"]["max_abs_diff"] < 1e-4
    assert d["lineage"] == read_onnx_meta(path)["lineage"]  # the full entries travel in --json

    r = cli("info", path)
    assert r.code == 0
    out = r.stdout
    for text in ("ONNX opset 18, FP32", "resnet20", "10 (airplane", "MACs / image", "lineage (oldest first)",
                 "exporter=dynamo", f"r20.pt @ {sha256_file(pt)[:12]}", "32x32", "top1_agreement=1"):
        assert text in out, text
    assert r.stderr == ""


def test_quantized_onnx_info(cli, chain: dict[str, Path]) -> None:
    d = cli("info", chain["int8"], "--json").json()
    assert d["format"] == "ONNX opset 18, INT8 Q/DQ"
    fp32 = describe_model(chain["onnx"])
    assert d["params"] == fp32.params  # int8 weights count, their scales and zero-points do not
    assert d["macs"] == fp32.macs
    assert len(d["lineage_steps"]) == 2  # onnxruntime carried the metadata; resopt quantize would add a step


def test_engine_info_from_sidecar(cli, chain: dict[str, Path], tmp_path: Path) -> None:
    meta = read_onnx_meta(chain["onnx"])
    engine = tmp_path / "r20.engine"
    engine.write_bytes(b"\x00plan bytes that only TensorRT could read")
    lineage = meta["lineage"] + [{"command": "build", "time": "2026-01-01T00:00:00+00:00",
                                  "options": {"precision": "fp16", "min_batch": 1, "max_batch": 32},
                                  "parent": {"file": "r20.onnx", "sha256": sha256_file(chain["onnx"])},
                                  "metrics": {"top1_agreement": 99.5, "max_abs_diff": 0.002}}]
    write_sidecar(engine, {"arch": "resnet20", "classes": CLASSES, "preprocess": meta["preprocess"],
                           "precision": "fp16", "built_with": {"tensorrt": "10.3.0", "gpu": "NVIDIA L4"},
                           "lineage": lineage, "metrics": {}})
    r = cli("info", engine, "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert (d["kind"], d["format"], d["arch"]) == ("engine", "TensorRT engine, fp16", "resnet20")
    assert d["details"]["built_with"]["gpu"] == "NVIDIA L4"
    assert [s["command"] for s in d["lineage_steps"]] == ["train", "export", "build"]
    assert d["lineage_steps"][2]["options"] == {"precision": "fp16", "min_batch": 1, "max_batch": 32}
    assert d["params"] == meta["lineage"][-1]["metrics"]["params"]  # the source ONNX's count
    assert d["input_size"] == 32

    bare = tmp_path / "bare.engine"
    bare.write_bytes(b"plan")
    r = cli("info", bare)
    assert r.code == 3 and r.stderr.startswith("Error: ") and "has no sidecar bare.engine.json" in r.stderr


def test_archs_lists_the_registry_without_torch(cli) -> None:
    d = cli("info", "--archs", "--json").json()
    assert [a["name"] for a in d["archs"]] == list(REGISTRY)
    assert {a["name"]: a["input_size"] for a in d["archs"]}["resnet50"] == 224
    assert {a["name"]: a["input_size"] for a in d["archs"]}["resnet20"] == 32
    code = ("import sys; from resopt.cli import run; rc = run(['info', '--archs']); "
            "print(rc, 'torch' in sys.modules, 'onnx' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().splitlines()[-1] == "0 False False"
    assert "resnet18-cifar" in proc.stdout and "vgg16-bn-cifar" in proc.stdout


class _Payload:
    """Unpickling this creates a file: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_pickled_objects_are_refused_never_executed(cli, workdir: Path) -> None:
    torch.save(nn.Linear(2, 2), "module.pt")
    r = cli("info", "module.pt")
    assert r.code == 3
    first = r.stderr.splitlines()[0]
    assert first.startswith("Error: module.pt holds pickled Python objects") and "refusing to load it" in first

    marker = workdir / "executed"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, "evil.pt")
    r = cli("info", "evil.pt")
    assert r.code == 3 and r.stderr.startswith("Error: evil.pt holds pickled Python objects")
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load("evil.pt", weights_only=False)
    assert marker.exists()

    torch.save({"weights": torch.zeros(2)}, "plain.pt")
    r = cli("info", "plain.pt")
    assert r.code == 3 and r.stderr.startswith("Error: plain.pt was not written by resopt")


def test_file_errors(cli, workdir: Path) -> None:
    r = cli("info", "nope.onnx")
    assert (r.code, r.stderr.splitlines()[0]) == (3, "Error: nope.onnx does not exist")

    Path("notes.txt").write_text("hello")
    r = cli("info", "notes.txt")
    assert r.code == 3 and r.stderr.startswith("Error: notes.txt is not a model file resopt knows (suffix '.txt')")

    Path("junk.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    r = cli("info", "junk.onnx")
    assert r.code == 3 and r.stderr.startswith("Error: junk.onnx is not a ")
    assert "ONNX model" in r.stderr.splitlines()[0] and "Traceback" not in r.stderr

    Path("empty.onnx").write_bytes(b"")
    r = cli("info", "empty.onnx")
    assert r.code == 3 and r.stderr.startswith("Error: empty.onnx is not a valid ONNX model")

    for args in ([], ["--archs", "junk.onnx"]):
        r = cli("info", *args)
        assert r.code == 2 and r.stderr.startswith("Error: info takes a model file or --archs"), args
    assert r.stdout == ""
