"""Shapes of every value of an ONNX graph at a fixed batch: ONNX shape inference, plus the onnxruntime contrib ops
of QOperator-format graphs (QLinearAdd, QLinearGlobalAveragePool, QGemm, ...) that it cannot see through."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

# ---------------------------------------------------------------------------------------- shapes


Shape = list  # list[int | None]


def _dims(type_proto: Any) -> Shape | None:
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _broadcast(a: Shape, b: Shape) -> Shape:
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + list(a)
    b = [1] * (n - len(b)) + list(b)
    return [y if x == 1 else x for x, y in zip(a, b, strict=True)]


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# Output shapes of the onnxruntime contrib ops found in QOperator-format graphs, which ONNX's own shape
# inference cannot see through: (node, input shapes) -> (output shape, input whose element type it has).
def _contrib_shape(node: onnx.NodeProto, shapes: dict[str, Shape]) -> tuple[Shape, int] | None:
    ins = [shapes.get(i) for i in node.input]
    op = node.op_type
    if op in ("QLinearAdd", "QLinearMul") and ins[0] is not None and len(ins) > 3 and ins[3] is not None:
        return _broadcast(ins[0], ins[3]), 0
    if op in ("QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax") and ins[0] is not None:
        return list(ins[0]), 0
    if op == "QLinearGlobalAveragePool" and ins[0] is not None:
        x = ins[0]
        if attr(node, "channels_last", 0):
            return [x[0]] + [1] * (len(x) - 2) + [x[-1]], 0
        return x[:2] + [1] * (len(x) - 2), 0
    if op == "QGemm" and ins[0] is not None and len(ins) > 3 and ins[3] is not None:
        a, b = ins[0], ins[3]
        m = a[1] if attr(node, "transA", 0) else a[0]
        n = b[0] if attr(node, "transB", 0) else b[1]
        return [m, n], (7 if len(node.input) > 7 and node.input[7] else 1)
    return None


def onnx_shapes(model: onnx.ModelProto, *, batch: int = 1) -> dict[str, Shape]:
    """Every value's shape (unknown dims None) with the batch dimension fixed to ``batch``.

    Works on a copy; existing value_info is dropped first, since exporters store symbolic batch dims
    there that would otherwise survive the fixed-batch inference.
    """
    import onnx
    from onnx import helper, shape_inference

    m = copy.deepcopy(model)
    del m.graph.value_info[:]
    init_names = {t.name for t in m.graph.initializer}
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.name in init_names or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch

    shapes: dict[str, Shape] = {}
    elem: dict[str, int] = {}
    for _ in range(64):  # each round resolves one more layer of contrib ops
        try:
            inferred = shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
        except Exception:  # malformed shapes in a graph onnxruntime still runs: keep what we have
            inferred = m
        g = inferred.graph
        for t in g.initializer:
            shapes[t.name] = list(t.dims)
            elem[t.name] = t.data_type
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            d = _dims(vi.type)
            if d is not None and (vi.name not in shapes or None in shapes[vi.name]):
                shapes[vi.name] = d
                elem[vi.name] = vi.type.tensor_type.elem_type
        added = False
        for node in g.node:
            if node.domain != "com.microsoft" or not node.output or node.output[0] in shapes:
                continue
            res = _contrib_shape(node, shapes)
            if res is None:
                continue
            shape, type_from = res
            src = node.input[type_from] if type_from < len(node.input) else ""
            m.graph.value_info.append(helper.make_tensor_value_info(
                node.output[0], elem.get(src, onnx.TensorProto.FLOAT), shape))
            shapes[node.output[0]] = shape
            added = True
        if not added:
            break
    return shapes
