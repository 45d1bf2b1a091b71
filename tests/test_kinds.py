"""The table keyed by artifact kind (resopt.kinds): one entry per suffix kind and runner, counts of every kind
from one place, the engine's counts from its sidecar (older sidecars: from the lineage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from resopt.errors import InputFileError
from resopt.kinds import KINDS, ModelStats, kind_of, onnx_model_stats


def test_one_entry_per_kind_with_a_runner() -> None:
    from resopt.artifacts import KIND_BY_SUFFIX
    from resopt.backends import BACKENDS

    assert set(KINDS) == set(KIND_BY_SUFFIX.values()) == {k for k in BACKENDS if ":" not in k}
    assert [k.title for k in KINDS.values()] == ["PyTorch checkpoint", "ONNX model", "TensorRT engine"]


def _unknown_shape_conv() -> object:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", "c", "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.array([0, 1] * 36, np.float32).reshape(4, 2, 3, 3), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["y"])], "g", [x], [y], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_onnx_counts_degrade_or_raise_when_macs_are_unknowable(capsys: pytest.CaptureFixture[str]) -> None:
    model = _unknown_shape_conv()
    assert onnx_model_stats(model) == ModelStats(72, 36, None)
    assert onnx_model_stats(model, name="m.onnx") == ModelStats(72, 36, None)
    assert "MACs of m.onnx unknown" in capsys.readouterr().err
    with pytest.raises(InputFileError, match="cannot infer the shapes"):
        onnx_model_stats(model, require_macs=True)


def test_engine_counts_come_from_the_sidecar_else_the_lineage(tmp_path: Path) -> None:
    from resopt.artifacts import write_sidecar

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    lineage = [{"command": "export", "metrics": {"params": 100, "macs": 2000}},
               {"command": "quantize", "metrics": {"agreement": 99.0}}]
    side = {"format": "resopt.engine", "format_version": 1, "built_with": {"gpu": "x"}, "precision": "fp16",
            "profile": {"min": 1, "opt": 8, "max": 8}, "classes": ["a", "b"],
            "preprocess": {"input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}, "lineage": lineage}
    write_sidecar(engine, side)
    assert kind_of(engine).stats(engine, 32) == ModelStats(100, None, 2000)  # older sidecar: the source's
    write_sidecar(engine, {**side, "params": 90, "nonzero_params": 45, "macs": 1800})
    assert kind_of(engine).stats(engine, 32) == ModelStats(90, 45, 1800)
    info = kind_of(engine).read_info(engine)
    assert (info.kind, info.classes, info.preprocess.input_size) == ("engine", ["a", "b"], 32)


def test_unknown_suffix_is_one_error_naming_the_known_ones(tmp_path: Path) -> None:
    f = tmp_path / "m.tflite"
    f.write_bytes(b"x")
    with pytest.raises(InputFileError, match="expected one of: .engine, .onnx, .plan, .pt, .pth"):
        kind_of(f)
