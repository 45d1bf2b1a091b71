"""Checkpoint format, pickled-object refusal, atomic writes, lineage and ONNX metadata."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from resopt.artifacts import (
    Preprocess,
    atomic_output,
    check_output_path,
    lineage_entry,
    load_checkpoint,
    make_checkpoint,
    read_onnx_meta,
    save_checkpoint,
    sha256_file,
    stamp_onnx,
)
from resopt.errors import InputFileError, UsageError

PRE = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _ckpt(lineage: list | None = None) -> dict:
    return make_checkpoint(arch="resnet20", arch_kwargs={"width": 0.5}, state_dict={"w": torch.ones(2)},
                           classes=["a", "b"], preprocess=PRE, lineage=lineage or [])


def test_checkpoint_roundtrip_is_plain_data(tmp_path: Path) -> None:
    save_checkpoint(_ckpt(), tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # loads without any unpickling of objects
    assert raw["format"] == "resopt.checkpoint" and raw["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert load_checkpoint(tmp_path / "m.pt")["classes"] == ["a", "b"]


def test_pickled_modules_are_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):  # would create the marker file if unpickled
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InputFileError, match="holds pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_foreign_and_corrupt_checkpoints(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(InputFileError, match="not written by resopt"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputFileError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(InputFileError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(InputFileError, match="not a model file"):
        load_checkpoint(tmp_path / "m.txt")


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_output_uses_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644


def test_no_command_overwrites_its_input(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    src.write_text("x")
    with pytest.raises(UsageError, match="same file as the input"):
        check_output_path(src, src)
    with pytest.raises(UsageError, match="must end in .onnx"):
        check_output_path(tmp_path / "m.pt", src, suffixes=(".onnx",))


def test_lineage_entry_records_parent_hash_and_versions(tmp_path: Path) -> None:
    parent = tmp_path / "p.pt"
    parent.write_bytes(b"abc")
    e = lineage_entry("export", options={"opset": 18, "out": tmp_path}, parent=parent, metrics={"d": 0.1})
    assert e["parent"] == {"file": "p.pt", "sha256": sha256_file(parent)}
    assert e["versions"]["torch"] == torch.__version__ and e["command"] == "export"
    assert e["options"]["out"] == str(tmp_path)


def test_onnx_metadata_is_namespaced_and_restamped() -> None:
    import onnx

    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    model.metadata_props.add(key="producer.note", value="keep me")
    stamp_onnx(model, {"arch": "resnet20", "lineage": [{"command": "train"}]})
    stamp_onnx(model, {"arch": "resnet20", "lineage": [{"command": "train"}, {"command": "export"}]})
    meta = read_onnx_meta(model)
    assert meta["arch"] == "resnet20" and len(meta["lineage"]) == 2
    keys = [p.key for p in model.metadata_props]
    assert keys.count("resopt.lineage") == 1 and "producer.note" in keys


# A sidecar as `resopt build` wrote it before the sidecar became a typed record (every key, in file order).
_BUILT_SIDECAR = {
    "format": "resopt.engine", "format_version": 1,
    "built_with": {"tensorrt": "10.3.0", "cuda": "12", "torch_cuda": "12.4", "gpu": "NVIDIA L4",
                   "compute_capability": "8.9", "driver": "550.54"},
    "precision": "fp16", "build_path": "TensorRT 10.3.0: BuilderFlag.FP16", "strongly_typed": False,
    "builder_flags": ["FP16"], "input": {"name": "input", "sample_shape": [3, 32, 32], "dynamic_batch": True},
    "profile": {"min": 1, "opt": 64, "max": 256}, "build_options": {"fp16": True, "int8": False},
    "onnx": {"file": "r20.onnx", "path": "out/r20.onnx", "sha256": "ab" * 32},
    "fp16_conversion": None, "calibration": None, "sparsity": None, "arch": "resnet20", "classes": ["cat", "dog"],
    "preprocess": {"input_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    "params": 270_000, "nonzero_params": 269_000, "macs": 41_000_000,
    "metrics": {"build": {"verified": True}}, "lineage": [{"command": "build"}],
    "engine": {"file": "r20.engine", "bytes": 4, "sha256": "cd" * 32},
}


def test_engine_sidecar_record_writes_the_json_build_always_wrote(tmp_path: Path) -> None:
    import json

    from resopt.artifacts import EngineSidecar, read_sidecar, write_sidecar

    record = EngineSidecar.from_dict(_BUILT_SIDECAR, tmp_path / "r20.engine")
    assert (record.precision, record.macs, record.built_with["gpu"]) == ("fp16", 41_000_000, "NVIDIA L4")
    write_sidecar(tmp_path / "r20.engine", record)
    text = (tmp_path / "r20.engine.json").read_text()
    assert list(json.loads(text)) == list(_BUILT_SIDECAR)  # same keys, same order
    assert read_sidecar(tmp_path / "r20.engine") == _BUILT_SIDECAR
    # Before the engine is written (the runner that checks it gets this), metrics, lineage, engine are absent.
    pending = EngineSidecar.from_dict({k: v for k, v in _BUILT_SIDECAR.items()
                                       if k not in ("metrics", "lineage", "engine")}, tmp_path / "r20.engine")
    assert list(pending.to_dict()) == [k for k in _BUILT_SIDECAR if k not in ("metrics", "lineage", "engine")]


def test_engine_sidecar_record_reads_older_and_newer_sidecars() -> None:
    from resopt.artifacts import EngineSidecar

    required = ("format", "format_version", "built_with", "precision", "profile", "preprocess", "classes")
    old = EngineSidecar.from_dict({k: _BUILT_SIDECAR[k] for k in required}, Path("old.engine"))
    assert (old.build_path, old.params, old.engine) == (None, None, None)
    newer = EngineSidecar.from_dict({**_BUILT_SIDECAR, "added_later": [1, 2]}, Path("new.engine"))
    assert newer.extra == {"added_later": [1, 2]} and newer.to_dict()["added_later"] == [1, 2]
    for broken, message in (({**_BUILT_SIDECAR, "format": "other"}, "not written by `resopt build`"),
                            ({**_BUILT_SIDECAR, "format_version": 2}, "newer than this resopt understands"),
                            ({k: v for k, v in _BUILT_SIDECAR.items() if k != "profile"}, "lacks profile")):
        with pytest.raises(InputFileError, match=message):
            EngineSidecar.from_dict(broken, Path("m.engine"))
