"""``resopt info``: facts and lineage of .pt, .onnx and .engine files; --archs; refusing unsafe files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, copy_to, resnet20_counts
from torch import nn

from resopt.artifacts import load_checkpoint, read_onnx_meta, sha256_file, write_sidecar
from resopt.info import describe_model
from resopt.models import REGISTRY, model_from_checkpoint


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, trained_pt: Path, r20_onnx_session: Path) -> dict[str, Path]:
    """r20.pt -> r20.onnx (resopt export) -> r20.int8.onnx (onnxruntime Q/DQ, metadata carried over)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from resopt.artifacts import Preprocess
    from resopt.calib import find_default_calib
    from resopt.data import load_eval_set, stack_images

    folder = tmp_path_factory.mktemp("info")
    pt = folder / "r20.pt"
    shutil.copy(trained_pt, pt)
    onnx_path = copy_to(r20_onnx_session, folder)  # exported from trained_pt, whose copy ``pt`` is

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
    hand = resnet20_counts(8)  # --width 0.5
    assert (d["params"], d["macs"]) == (hand["params"], hand["macs"]) == (68_786, 10_314_048)
    # Trained float weights: none is exactly zero, so every parameter counts as non-zero.
    assert d["nonzero_params"] == sum(int((p != 0).sum()) for p in model.parameters()) == hand["params"]
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
    hand = resnet20_counts(8)  # BatchNorm folded into the convs: 2 per channel became 1 bias per channel
    assert (d["params"], d["nonzero_params"], d["macs"]) == (hand["folded_params"],) * 2 + (hand["macs"],)
    assert d["details"]["inputs"] == [{"name": "input", "shape": ["batch", 3, 32, 32]}]
    assert [s["command"] for s in d["lineage_steps"]] == ["train", "export"]
    export = d["lineage_steps"][1]
    assert export["parent_file"] == "r20.pt" and export["parent_sha256"] == sha256_file(pt)
    assert export["options"] == {"exporter": "dynamo", "opset": 18, "tolerance": 0.001, "num_verify": 20}
    assert export["metrics"]["top1_agreement"] == 100.0 and export["metrics"]["max_abs_diff"] < 1e-4
    assert d["lineage"] == read_onnx_meta(path)["lineage"]  # the full entries travel in --json

    r = cli("info", path)
    assert r.code == 0
    out = r.stdout
    for text in ("ONNX opset 18, FP32", "resnet20", "10 (airplane", "MACs / image", "lineage (oldest first)",
                 "exporter=dynamo", f"r20.pt @ {sha256_file(pt)[:12]}", "32x32", "top1_agreement=100%"):
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
    sidecar = _sidecar(engine, meta, lineage)
    write_sidecar(engine, sidecar)
    r = cli("info", engine, "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert (d["kind"], d["format"], d["arch"]) == ("engine", "TensorRT engine, fp16", "resnet20")
    assert d["details"]["built_with"]["gpu"] == "NVIDIA L4"
    # This machine is not an L4 with TensorRT 10.3.0 (or has no GPU / no TensorRT at all): never runnable.
    assert d["details"]["runs_here"] is False
    assert d["details"]["runs_here_reason"].startswith("no: ")
    assert [s["command"] for s in d["lineage_steps"]] == ["train", "export", "build"]
    assert d["lineage_steps"][2]["options"] == {"precision": "fp16", "min_batch": 1, "max_batch": 32}
    assert d["params"] == meta["lineage"][-1]["metrics"]["params"]  # the source ONNX's count
    assert d["input_size"] == 32

    bare = tmp_path / "bare.engine"
    bare.write_bytes(b"plan")
    r = cli("info", bare)
    assert r.code == 3 and r.stderr.startswith("Error: ") and "has no sidecar bare.engine.json" in r.stderr


L4 = {"tensorrt": "10.3.0", "cuda": "12.4", "gpu": "NVIDIA L4", "compute_capability": "8.9", "driver": "550.54"}


def _sidecar(engine: Path, meta: dict, lineage: list) -> dict:
    """A sidecar with every field `resopt build` writes and `bench` requires (literal values)."""
    return {"format": "resopt.engine", "format_version": 1, "built_with": dict(L4), "precision": "fp16",
            "profile": {"min": 1, "opt": 8, "max": 32}, "arch": "resnet20", "classes": CLASSES,
            "preprocess": meta["preprocess"], "lineage": lineage, "metrics": {},
            "engine": {"file": engine.name, "bytes": engine.stat().st_size, "sha256": sha256_file(engine)}}


def test_engine_sidecar_is_validated_like_bench_does(cli, chain: dict[str, Path], tmp_path: Path) -> None:
    meta = read_onnx_meta(chain["onnx"])
    engine = tmp_path / "r20.engine"
    engine.write_bytes(b"plan")
    good = _sidecar(engine, meta, meta["lineage"])
    for broken, message in (({k: v for k, v in good.items() if k != "profile"}, "lacks profile"),
                            ({k: v for k, v in good.items() if k != "format"}, "was not written by `resopt build`"),
                            ({**good, "format_version": 99}, "newer than this resopt understands")):
        write_sidecar(engine, broken)
        r = cli("info", engine)
        assert r.code == 3, (message, r.stdout, r.stderr)
        assert r.stdout == "" and r.stderr.startswith("Error: ") and message in r.stderr


def test_engine_runs_here_names_the_reason(chain: dict[str, Path], tmp_path: Path) -> None:
    from resopt.backends.tensorrt_backend import engine_runs_here

    meta = read_onnx_meta(chain["onnx"])
    engine = tmp_path / "r20.engine"
    engine.write_bytes(b"plan")
    side = _sidecar(engine, meta, meta["lineage"])
    assert engine_runs_here(side, engine, here=dict(L4)) == (
        True, "yes: built with TensorRT 10.3.0 on NVIDIA L4 (compute capability 8.9), as this machine has")
    ok, why = engine_runs_here(side, engine, here={**L4, "gpu": "NVIDIA H100", "compute_capability": "9.0"})
    assert not ok and why.startswith("no: r20.engine was built with TensorRT 10.3.0 on NVIDIA L4")
    assert "NVIDIA H100" in why and why.endswith("only with the GPU it was built for")
    ok, why = engine_runs_here(side, engine, here={**L4, "tensorrt": "10.7.0"})
    assert not ok and "TensorRT 10.7.0 on NVIDIA L4" in why and why.endswith("only with the TensorRT version it "
                                                                            "was built for")
    ok, _ = engine_runs_here(side, engine, here={**L4, "tensorrt": "10.3.0.26"})  # a build number is no release
    assert ok
    engine.write_bytes(b"another plan")
    assert engine_runs_here(side, engine, here=dict(L4)) == (
        False, "no: the engine file does not match its sidecar (sha256 differs); it was replaced after the build")


def test_engine_runs_here_on_this_machine(chain: dict[str, Path], tmp_path: Path) -> None:
    """What this machine lacks, checked in bench's order: a CUDA GPU first, then TensorRT."""
    import importlib.util

    from resopt.backends.tensorrt_backend import engine_runs_here

    meta = read_onnx_meta(chain["onnx"])
    engine = tmp_path / "r20.engine"
    engine.write_bytes(b"plan")
    ok, why = engine_runs_here(_sidecar(engine, meta, meta["lineage"]), engine)
    assert not ok
    if not torch.cuda.is_available():
        assert why.startswith("no: a TensorRT engine needs an NVIDIA GPU, but ")
    elif importlib.util.find_spec("tensorrt") is None:
        assert why == "no: TensorRT is not installed (the `tensorrt` Python package)"
    else:
        assert "was built with TensorRT 10.3.0 on NVIDIA L4" in why


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
