"""Parameters and non-zero parameters of an ONNX graph, and the constant sub-graphs that feed its weights.

What counts as a parameter
--------------------------
A parameter is one element of a constant weight or bias tensor *as the layer sees it*. Each layer op
(Conv, Gemm, MatMul, their integer / QLinear forms, and the affine part of a normalization) has known
weight slots; when a slot is fed by a constant, the constant is evaluated through the small constant
sub-graph in front of it (DequantizeLinear, Gather, Reshape, Cast, ...) and its elements are counted.
So the storage format does not change the count:

- an FP32 or FP16 Conv weight counts its elements;
- an INT8 weight feeding DequantizeLinear (Q/DQ graphs), or the INT8 weight of a ConvInteger /
  QLinearConv, counts its elements; its scale and zero-point are encoding metadata and do not count;
- a k-means weight stored as uint8 indices into a small codebook (``Gather(codebook, indices)``) counts
  one parameter per index; the codebook, like a scale, does not count;
- BatchNormalization counts its scale and bias but not its running mean and variance, which mirrors
  PyTorch's split between parameters and buffers (after export BatchNorm is usually folded into the
  preceding Conv, whose bias then counts instead);
- a constant added to a layer's output (the bias that dynamic quantization moves out of ConvInteger /
  MatMulInteger, or a MatMul + Add linear layer) counts as that layer's bias.

A parameter is non-zero when its real (dequantized, decoded) value is non-zero: for an integer weight
that means ``q != zero_point``, for a k-means index that the codebook entry it points at is non-zero.
Shape tensors, Pad/Clip constants and quantization parameters of activations never count. Every layer
counts its own weight slots: exporters de-duplicate equal constants (all-zero biases of a fresh model
share one initializer), and counting per layer keeps such artefacts of the exporter out of the number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import onnx

# op type -> input positions that hold a layer's weight or bias.
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "ConvInteger": (1,),
    "MatMulInteger": (0, 1),
    "QLinearConv": (3, 8),
    "QLinearMatMul": (0, 3),
    "QGemm": (0, 3, 6),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "PRelu": (1,),
}

# (op type, weight position) -> position of that weight's zero-point: the integer value meaning 0.0.
ZERO_POINT_SLOT: dict[tuple[str, int], int] = {
    ("ConvInteger", 1): 3,
    ("MatMulInteger", 0): 2,
    ("MatMulInteger", 1): 3,
    ("QLinearConv", 3): 5,
    ("QLinearMatMul", 0): 2,
    ("QLinearMatMul", 3): 5,
    ("QGemm", 0): 2,
    ("QGemm", 3): 5,
}

CONV_OPS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op -> weight position
MATMUL_OPS = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0}  # op -> position of A
GEMM_OPS = {"Gemm": 0, "QGemm": 0}
LAYER_OPS = set(CONV_OPS) | set(MATMUL_OPS) | set(GEMM_OPS) | {"ConvTranspose"}

# Ops between a layer and a bias Add that only rescale or re-type its output (dynamic quantization:
# ConvInteger -> Cast -> Mul(scale) -> Add(bias)).
_RESCALE_OPS = {"Cast", "Mul", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"}


# ------------------------------------------------------------------------------------ constants


class Constants:
    """Evaluates graph values that depend only on initializers and Constant nodes, memoised.

    Which values are constant is decided up front in one forward pass, so asking about an activation
    costs a set lookup instead of a walk back through the whole network.
    """

    _NOT_FOLDABLE = {"Shape", "Size", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        self.graph = model.graph
        self.opsets = {o.domain or "": o.version for o in model.opset_import}
        self.init = {t.name: t for t in model.graph.initializer}
        self.producer = {out: node for node in model.graph.node for out in node.output if out}
        self._to_array = numpy_helper.to_array
        self._cache: dict[str, Any] = {}
        const = set(self.init)
        changed = True
        while changed:  # one pass for a topologically sorted graph; more only for a mis-sorted one
            changed = False
            for node in model.graph.node:
                if node.op_type in self._NOT_FOLDABLE or all(o in const for o in node.output if o):
                    continue
                if all(i in const for i in node.input if i):
                    const.update(o for o in node.output if o)
                    changed = True
        self.const_names = const

    def is_const(self, name: str) -> bool:
        return name in self.const_names and self.get(name) is not None

    def get(self, name: str) -> np.ndarray | None:
        if not name or name not in self.const_names:
            return None
        if name not in self._cache:
            self._cache[name] = None  # guards against cycles in a malformed graph
            self._cache[name] = self._evaluate(name)
        return self._cache[name]

    def _evaluate(self, name: str) -> np.ndarray | None:
        if name in self.init:
            try:
                return self._to_array(self.init[name])
            except Exception:  # external data that was not loaded
                return None
        node = self.producer[name]
        inputs = [self.get(i) if i else None for i in node.input]
        if any(v is None for v, i in zip(inputs, node.input, strict=True) if i):
            return None
        return self._run(node, inputs, name)

    def _run(self, node: onnx.NodeProto, inputs: list[Any], name: str) -> np.ndarray | None:
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        if node.domain not in ("", "ai.onnx"):
            if node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
                return None
            # onnxruntime's com.microsoft Q/DQ have the standard semantics (plus wider types).
            node = helper.make_node(node.op_type, node.input, node.output, **{
                a.name: helper.get_attribute_value(a) for a in node.attribute})
        try:
            ev = ReferenceEvaluator(node, opsets={"": self.opsets.get("", 18)})
            feeds = {i: v for i, v in zip(node.input, inputs, strict=True) if i}
            outs = ev.run(None, feeds)  # a list: intermediate=False
            assert isinstance(outs, list)
        except Exception:
            return None
        for out_name, value in zip(node.output, outs, strict=False):
            if out_name and out_name != name:
                self._cache[out_name] = value
        return outs[list(node.output).index(name)]


# ----------------------------------------------------------------------------------- parameters


def _nonzero(value: np.ndarray, zero_point: np.ndarray | None, *, conv_weight: bool) -> int:
    import numpy as np

    if zero_point is None or not np.any(zero_point):
        return int(np.count_nonzero(value))
    zp = np.asarray(zero_point).astype(np.int64)
    q = value.astype(np.int64)
    if zp.size > 1 and conv_weight:
        zp = zp.reshape((-1,) + (1,) * (q.ndim - 1))  # per output channel, axis 0
    try:
        return int(np.count_nonzero(q - zp))
    except ValueError:  # a per-channel axis this code does not know: fall back to raw values
        return int(np.count_nonzero(q))


def _bias_add_slots(model: onnx.ModelProto, consts: Constants) -> list[str]:
    """Constant operands of Adds that add a bias to a layer's (rescaled) output."""
    producer = consts.producer
    found = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        const_in = [i for i in node.input if consts.is_const(i)]
        if len(const_in) != 1:
            continue
        other = node.input[1] if node.input[0] == const_in[0] else node.input[0]
        src = producer.get(other)
        hops = 0
        while src is not None and src.op_type in _RESCALE_OPS and hops < 6:
            src = producer.get(src.input[0])
            hops += 1
        if src is not None and src.op_type in LAYER_OPS:
            found.append(const_in[0])
    return found


def onnx_param_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, non-zero parameters) of an ONNX graph; see the module docstring for what counts."""
    consts = Constants(model)
    params = nonzero = 0
    for node in model.graph.node:
        for pos in WEIGHT_SLOTS.get(node.op_type, ()):
            if pos >= len(node.input) or not node.input[pos]:
                continue
            value = consts.get(node.input[pos])
            if value is None:
                continue
            zp_pos = ZERO_POINT_SLOT.get((node.op_type, pos))
            zp = consts.get(node.input[zp_pos]) if zp_pos is not None and zp_pos < len(node.input) else None
            params += int(value.size)
            nonzero += _nonzero(value, zp, conv_weight=node.op_type in CONV_OPS)
    for name in _bias_add_slots(model, consts):
        value = consts.get(name)
        if value is None:  # _bias_add_slots names constants only; this is for the checker
            continue
        params += int(value.size)
        nonzero += _nonzero(value, None, conv_weight=False)
    return params, nonzero
