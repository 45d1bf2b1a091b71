"""MACs of an ONNX graph, and the statistics ``info`` and ``bench`` report (``onnx_stats``).

MACs
----
Multiply-accumulates of one image (batch 1): Conv / ConvInteger / QLinearConv count
``output elements x (input channels / groups) x kernel area``; Gemm / MatMul / MatMulInteger /
QLinearMatMul / QGemm count ``output elements x K``. This matches ``resopt.models.count_macs`` for
the PyTorch model the graph was exported from. Shapes come from ONNX shape inference on a copy whose
batch dimension is fixed to 1; the few onnxruntime contrib ops a QOperator-format graph uses
(QLinearAdd, QLinearGlobalAveragePool, QGemm, ...) get their shapes in ``shapes``, because ONNX's inference
stops at ops it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

from resopt.errors import InputFileError
from resopt.onnx_utils.params import CONV_OPS, GEMM_OPS, MATMUL_OPS, Constants, onnx_param_counts
from resopt.onnx_utils.shapes import Shape, attr, onnx_shapes

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class OnnxStats:
    """What ``info`` and ``bench`` print for an ONNX graph; ``macs`` is None when shapes are unknowable."""

    params: int
    nonzero_params: int
    macs: int | None
    opset: int
    ops: dict[str, int]


# ------------------------------------------------------------------------------------------ MACs


def _prod(dims: Shape) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def _known(shape: Shape | None) -> TypeGuard[Shape]:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def onnx_layer_macs(model: onnx.ModelProto) -> list[tuple[str, str, int | None]]:
    """(node name, op type, MACs or None if its shapes are unknown) of every layer op at batch 1."""
    shapes = onnx_shapes(model, batch=1)
    consts = Constants(model)

    def shape_of(name: str) -> Shape | None:
        s = shapes.get(name)
        if _known(s):
            return s
        v = consts.get(name)  # a constant sub-graph shape inference did not fold
        return list(v.shape) if v is not None else s

    rows: list[tuple[str, str, int | None]] = []
    for node in model.graph.node:
        op = node.op_type
        if op not in CONV_OPS and op not in MATMUL_OPS and op not in GEMM_OPS:
            continue
        y = shape_of(node.output[0])
        macs: int | None = None
        if op in CONV_OPS:
            w = shape_of(node.input[CONV_OPS[op]])
            if _known(y) and _known(w):
                macs = _prod(y) * _prod(w[1:])  # weight is (M, C/groups, k...): per output element
        elif op in MATMUL_OPS:
            a = shape_of(node.input[MATMUL_OPS[op]])
            if _known(y) and _known(a):
                macs = _prod(y) * a[-1]
        else:
            a = shape_of(node.input[0])
            if _known(a) and len(a) == 2:
                k = a[0] if attr(node, "transA", 0) else a[1]
                if not _known(y):  # QGemm: (M, N) from A and B when inference could not say
                    b_pos = 3 if op == "QGemm" else 1
                    b = shape_of(node.input[b_pos])
                    y = [a[1] if attr(node, "transA", 0) else a[0],
                         (b[0] if attr(node, "transB", 0) else b[1])] if _known(b) else None
                if _known(y):
                    macs = _prod(y) * k
        rows.append((node.name, op, macs))
    return rows


def onnx_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of one image (batch 1); raises InputFileError if a layer's shape is unknown."""
    rows = onnx_layer_macs(model)
    unknown = [f"{name or '?'} ({op})" for name, op, macs in rows if macs is None]
    if unknown:
        raise InputFileError(f"cannot infer the shapes of {len(unknown)} layer(s) to count MACs: "
                             f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    return sum(macs for _, _, macs in rows if macs is not None)


def onnx_stats(model: onnx.ModelProto) -> OnnxStats:
    """Parameters, non-zero parameters, MACs (None when unknowable), opset and op histogram."""
    params, nonzero = onnx_param_counts(model)
    try:
        macs: int | None = onnx_macs(model)
    except InputFileError:
        macs = None
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxStats(params=params, nonzero_params=nonzero, macs=macs, opset=opset,
                     ops=dict(sorted(ops.items(), key=lambda kv: -kv[1])))
