"""The Q/DQ lint: which convolutions, matmuls and residual adds of a graph run in INT8, which do not and
why, and the fraction of MACs that run in INT8; plus the rules a target needs (TensorRT: symmetric int8,
both inputs of every residual Add quantized, no Q/DQ around ops it only runs in FP32).

A layer counts as INT8 when every non-constant input it computes with arrives through DequantizeLinear
and, for Conv/Gemm/MatMul, its weight is an integer constant behind DequantizeLinear: that is the pattern
onnxruntime fuses into an integer kernel and TensorRT turns into an INT8 layer. Integer ops written
directly (QLinearConv, ConvInteger, MatMulInteger: QOperator and dynamic graphs) count as INT8 too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

LINT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
INTEGER_OPS = {"QLinearConv": "Conv", "ConvInteger": "Conv", "MatMulInteger": "MatMul", "QLinearMatMul": "MatMul",
               "QGemm": "Gemm", "QLinearAdd": "Add"}
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
# Ops a DequantizeLinear may feed in a TensorRT Q/DQ graph without forcing an FP32 fallback: the INT8
# layers themselves, and the ops TensorRT fuses into them or moves Q/DQ across.
TRT_QDQ_CONSUMERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool",
                     "GlobalAveragePool", "Concat", "Relu", "Reshape", "Flatten", "Identity", "Transpose",
                     "Squeeze", "Unsqueeze", "QuantizeLinear"}


@dataclass(frozen=True)
class LayerLint:
    name: str
    op: str
    int8: bool
    reason: str  # why not INT8 ("" when it is)
    macs: int | None
    weights: str  # "int8 per-channel", "int8 per-tensor", "fp32", "-" (no weight)


@dataclass(frozen=True)
class QdqLint:
    layers: tuple[LayerLint, ...]
    int8_macs: int
    total_macs: int
    issues: tuple[str, ...] = ()  # target rules the graph breaks
    activation_types: tuple[str, ...] = ()
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # op -> (int8, total)

    @property
    def int8_mac_fraction(self) -> float:
        return self.int8_macs / self.total_macs if self.total_macs else 0.0

    def not_int8(self) -> list[LayerLint]:
        return [la for la in self.layers if not la.int8]

    def summary(self) -> dict[str, Any]:
        return {"int8_mac_fraction": round(self.int8_mac_fraction, 4), "int8_macs": self.int8_macs,
                "total_macs": self.total_macs, "counts": {k: list(v) for k, v in self.counts.items()},
                "activation_types": list(self.activation_types), "issues": list(self.issues),
                "not_int8": [{"name": la.name, "op": la.op, "reason": la.reason, "macs": la.macs}
                             for la in self.not_int8()],
                "layers": [asdict(la) for la in self.layers]}

    def counts_line(self) -> str:
        parts = [f"{q}/{t} {op}" for op, (q, t) in self.counts.items()]
        return f"INT8: {', '.join(parts)}; {100 * self.int8_mac_fraction:.2f}% of MACs"


def static_values(model: onnx.ModelProto) -> set[str]:
    """Names of values computed from constants only (initializers, Constant nodes, the DequantizeLinear
    of an int8 weight, a k-means Gather from a codebook): everything that is not an activation."""
    static = {i.name for i in model.graph.initializer}
    for n in model.graph.node:  # exported graphs are topologically sorted
        if n.op_type == "Constant" or (n.input and all(i in static for i in n.input if i)):
            static.update(o for o in n.output if o)
    return static


def lint_qdq(model: onnx.ModelProto, *, target: str | None = None, reasons: dict[str, str] | None = None) -> QdqLint:
    """Lint ``model``. ``reasons`` names why particular nodes were kept in FP32 (``--exclude``, the guard);
    ``target`` ("cpu"/"trt") adds that target's rules to ``issues``."""
    from onnx import numpy_helper

    from resopt.onnx_utils import onnx_layer_macs

    reasons = reasons or {}
    init = {i.name: i for i in model.graph.initializer}
    consts = static_values(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    try:
        macs = {name: m for name, _op, m in onnx_layer_macs(model)}
    except Exception:  # shapes unknowable: the lint still lists layers, without MACs
        macs = {}

    def is_const(name: str) -> bool:
        return name in consts

    def dq_of(name: str) -> onnx.NodeProto | None:
        p = producer.get(name)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def weight_scheme(dq: onnx.NodeProto | None, weight: str) -> str:
        if dq is None or dq.input[0] not in init:
            return "fp32" if is_const(weight) else "-"
        scale = init.get(dq.input[1])
        per_channel = scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1
        t = init.get(dq.input[0])
        dtype = numpy_helper.to_array(t).dtype.name if t is not None else "int"
        return f"{dtype} {'per-channel' if per_channel else 'per-tensor'}"

    layers: list[LayerLint] = []
    for node in model.graph.node:
        op = INTEGER_OPS.get(node.op_type, node.op_type)
        if op not in LINT_OPS:
            continue
        if node.op_type in INTEGER_OPS:
            layers.append(LayerLint(node.name, op, True, "", macs.get(node.name), "integer op"))
            continue
        activations = [i for i in node.input if i and not is_const(i)]
        if op == "Add" and len(activations) < 2:
            continue  # a bias add, not a residual add
        w_pos = WEIGHT_INPUT.get(op)
        weight = node.input[w_pos] if w_pos is not None and len(node.input) > w_pos else ""
        if weight and not is_const(weight):
            weight = ""  # activation x activation MatMul: both operands are activations
        act_inputs = [i for i in activations if i != weight]
        w_dq = dq_of(weight) if weight else None
        scheme = weight_scheme(w_dq, weight) if weight else "-"
        reason = ""
        if node.name in reasons:
            reason = reasons[node.name]
        else:
            float_in = [i for i in act_inputs if dq_of(i) is None]
            if float_in:
                src = producer.get(float_in[0])
                reason = f"input {float_in[0]!r} is float (from {src.op_type if src else 'the graph input'})"
            elif weight and (w_dq is None or w_dq.input[0] not in init):
                reason = "weight kept in FP32"
        layers.append(LayerLint(node.name, op, not reason, reason, macs.get(node.name), scheme))

    counts: dict[str, tuple[int, int]] = {}
    for la in layers:
        q, t = counts.get(la.op, (0, 0))
        counts[la.op] = (q + la.int8, t + 1)
    compute = [la for la in layers if la.op != "Add"]
    total = sum(la.macs or 0 for la in compute)
    int8 = sum(la.macs or 0 for la in compute if la.int8)

    act_types = set()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in init:
            act_types.add(numpy_helper.to_array(init[n.input[2]]).dtype.name)
    issues = _target_issues(model, target, layers, init, consumers) if target else []
    return QdqLint(tuple(layers), int8, total, tuple(issues), tuple(sorted(act_types)), counts)


def _target_issues(model: onnx.ModelProto, target: str, layers: list[LayerLint], init: dict[str, Any],
                   consumers: dict[str, list[Any]]) -> list[str]:
    from onnx import numpy_helper

    issues: list[str] = []
    if target == "trt":
        for n in model.graph.node:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3:
                continue
            zp = init.get(n.input[2])
            if zp is None:
                continue
            arr = numpy_helper.to_array(zp)
            if arr.dtype.name != "int8":
                issues.append(f"{n.name}: {arr.dtype.name} Q/DQ; TensorRT's Q/DQ take int8 only")
            elif arr.any():
                issues.append(f"{n.name}: non-zero zero point; TensorRT needs symmetric quantization")
            if n.op_type == "DequantizeLinear":
                for c in consumers.get(n.output[0], []):
                    if c.op_type not in TRT_QDQ_CONSUMERS:
                        issues.append(f"{n.name} feeds {c.op_type} {c.name!r}, which TensorRT runs in FP32")
        for la in layers:
            if la.op == "Add" and not la.int8 and not la.reason.startswith(("--exclude", "accuracy guard")):
                issues.append(f"residual Add {la.name!r} is not INT8: {la.reason}")
    elif target == "cpu":
        for n in model.graph.node:
            if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in init:
                dtype = numpy_helper.to_array(init[n.input[2]]).dtype.name
                if dtype != "uint8":
                    issues.append(f"{n.name}: {dtype} activations; onnxruntime on x86 runs uint8 fastest")
    return issues
