"""ONNX statistics: parameters and MACs agree with the PyTorch model across storage formats."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import randomize_bn
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from resopt.errors import InputFileError
from resopt.models import build_model, count_macs
from resopt.onnx_utils import onnx_layer_macs, onnx_macs, onnx_param_counts, onnx_shapes, onnx_stats


def _export(model: nn.Module, size: int, *, dynamo: bool) -> onnx.ModelProto:
    x = torch.randn(2, 3, size, size)
    if dynamo:
        prog = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=18, input_names=["input"],
                                 output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                 verbose=False)
        proto = prog.model_proto
        # The dynamo exporter records value_info for initializers, which goes stale when onnxruntime's
        # quantizer transposes a Gemm weight; resopt export drops it and re-infers shapes the same way.
        del proto.graph.value_info[:]
        return proto
    buf = io.BytesIO()
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=18, input_names=["input"],
                          output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _folded_param_count(model: nn.Module) -> int:
    """Parameters of ``model`` once each BatchNorm is folded into its conv (weight + one bias per channel)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += m.weight.numel() + m.out_channels
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() + m.out_features
    return total


@pytest.fixture(scope="module")
def r20() -> tuple[nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet20", 10, width=0.5))
    # A pruned filter: its whole folded weight is zero, so non-zero params must drop by exactly its size.
    with torch.no_grad():
        model.layer2[0].conv1.weight[3].zero_()
    return model, _export(model, 32, dynamo=True)


def test_fp32_counts_match_the_torch_model(r20: tuple[nn.Module, onnx.ModelProto]) -> None:
    model, proto = r20
    params, nonzero = onnx_param_counts(proto)
    assert params == _folded_param_count(model)
    zeroed = model.layer2[0].conv1.weight[3].numel()
    assert nonzero == params - zeroed
    assert onnx_macs(proto) == count_macs(model, 32)


@pytest.mark.parametrize(("arch", "width", "size", "dynamo"), [
    ("resnet18-cifar", 0.25, 32, False),  # resnet50 (ImageNet stem, bottlenecks): see test_export
])
def test_macs_match_torch_count(arch: str, width: float, size: int, dynamo: bool) -> None:
    model = randomize_bn(build_model(arch, 10, width=width))
    proto = _export(model, size, dynamo=dynamo)
    assert onnx_macs(proto) == count_macs(model, size)
    assert onnx_param_counts(proto)[0] == _folded_param_count(model)


def test_grouped_conv_and_linear_macs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    proto = _export(model, 12, dynamo=False)
    expected = 12 * 12 * 8 * 3 * 9 + 12 * 12 * 16 * (8 // 4) * 9 + 16 * 5
    assert count_macs(model, 12) == expected
    assert [r[2] for r in onnx_layer_macs(proto)] == [12 * 12 * 8 * 3 * 9, 12 * 12 * 16 * 2 * 9, 16 * 5]
    assert onnx_macs(proto) == expected


def test_static_int8_qdq_counts_weights_not_scales(r20: tuple[nn.Module, onnx.ModelProto],
                                                   tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    _, proto = r20
    src = tmp_path / "r20.onnx"
    onnx.save(proto, src)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            batches = [rng.standard_normal((2, 3, 32, 32), dtype=np.float32) for _ in range(2)]
            self._it = iter([{"input": b} for b in batches])

        def get_next(self) -> dict | None:
            return next(self._it, None)

    params, nonzero = onnx_param_counts(proto)
    for fmt, name in ((QuantFormat.QDQ, "qdq"), (QuantFormat.QOperator, "qop")):
        dst = tmp_path / f"r20.{name}.onnx"
        quantize_static(str(src), str(dst), Reader(), quant_format=fmt, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        q = onnx.load(dst)
        ops = {n.op_type for n in q.graph.node}
        assert ("DequantizeLinear" in ops) if fmt == QuantFormat.QDQ else ("QLinearConv" in ops)
        q_params, q_nonzero = onnx_param_counts(q)
        assert q_params == params, name
        # Rounding to int8 can only turn small weights into zeros, never zeros into non-zeros.
        assert params - 0.02 * params < q_nonzero <= nonzero, name
        assert onnx_macs(q) == onnx_macs(proto), name


def test_dynamic_int8_counts_the_bias_add(r20: tuple[nn.Module, onnx.ModelProto], tmp_path: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    _, proto = r20
    src, dst = tmp_path / "r20.onnx", tmp_path / "r20.dyn.onnx"
    onnx.save(proto, src)
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    q = onnx.load(dst)
    assert "ConvInteger" in {n.op_type for n in q.graph.node}
    assert onnx_param_counts(q)[0] == onnx_param_counts(proto)[0]
    assert onnx_macs(q) == onnx_macs(proto)


def _tiny_conv_graph(weight_input: str, extra_nodes: list, extra_inits: list) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 5, 5])
    conv = helper.make_node("Conv", ["input", weight_input], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([*extra_nodes, conv], "g", [x], [y], initializer=extra_inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_kmeans_indices_count_and_codebook_does_not() -> None:
    codebook = np.array([0.0, -0.5, 0.25, 1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 4, size=(3, 2, 3, 3)).astype(np.uint8)
    model = _tiny_conv_graph("w", [helper.make_node("Gather", ["codebook", "idx"], ["w"], axis=0)],
                             [numpy_helper.from_array(codebook, "codebook"),
                              numpy_helper.from_array(indices, "idx")])
    onnx.checker.check_model(model)
    assert onnx_param_counts(model) == (indices.size, int(np.count_nonzero(indices)))  # entry 0 is 0.0
    assert onnx_macs(model) == 5 * 5 * 3 * 2 * 9


def test_integer_weights_are_zero_at_their_zero_point() -> None:
    w = np.full((3, 2, 3, 3), 7, dtype=np.uint8)
    w[0, 0, 0, 0] = 9
    x = helper.make_tensor_value_info("input", TensorProto.UINT8, [1, 2, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, None)
    node = helper.make_node("ConvInteger", ["input", "w", "xzp", "wzp"], ["y"], pads=[1, 1, 1, 1])
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0, np.uint8), "xzp"),
             numpy_helper.from_array(np.array(7, np.uint8), "wzp")]
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    assert onnx_param_counts(model) == (w.size, 1)
    assert onnx_macs(model) == 5 * 5 * 3 * 2 * 9


def test_batch_is_fixed_to_one_on_a_copy(r20: tuple[nn.Module, onnx.ModelProto]) -> None:
    _, proto = r20
    before = proto.SerializeToString()
    shapes = onnx_shapes(proto)
    assert shapes["logits"] == [1, 10]
    assert proto.SerializeToString() == before


def test_unknown_shapes_raise_and_stats_degrade() -> None:
    # A Conv whose input channels and spatial size are unknown cannot be counted.
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", "c", "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["input", "w"], ["y"])
    graph = helper.make_graph([conv], "g", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(InputFileError, match="cannot infer the shapes of 1 layer"):
        onnx_macs(model)
    stats = onnx_stats(model)
    assert (stats.params, stats.nonzero_params, stats.macs, stats.opset) == (72, 72, None, 18)
    assert stats.ops == {"Conv": 1}


def test_deep_graph_bias_add_is_found_without_deep_recursion() -> None:
    # 3000 activations before a dynamically-quantized-style layer: constant detection must not walk back
    # through them recursively (it used to hit Python's recursion limit and silently miss the bias).
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 5, 5])
    nodes = [helper.make_node("Relu", ["input" if i == 0 else f"r{i - 1}"], [f"r{i}"]) for i in range(3000)]
    nodes += [helper.make_node("Conv", ["r2999", "w"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Mul", ["c", "s"], ["m"]),
              helper.make_node("Reshape", ["b", "shape"], ["b4"]),
              helper.make_node("Add", ["m", "b4"], ["y"])]
    inits = [numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "w"),
             numpy_helper.from_array(np.array(2.0, np.float32), "s"),
             numpy_helper.from_array(np.array([1.0, 0.0, 2.0], np.float32), "b"),
             numpy_helper.from_array(np.array([1, 3, 1, 1], np.int64), "shape")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    assert onnx_param_counts(model) == (54 + 3, 54 + 2)
    assert onnx_macs(model) == 5 * 5 * 3 * 2 * 9
