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
