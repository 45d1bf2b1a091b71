"""Statistics of an ONNX graph that ``info`` and ``bench`` report: parameters, non-zero parameters, MACs.

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

MACs
----
Multiply-accumulates of one image (batch 1): Conv / ConvInteger / QLinearConv count
``output elements x (input channels / groups) x kernel area``; Gemm / MatMul / MatMulInteger /
QLinearMatMul / QGemm count ``output elements x K``. This matches ``resopt.models.count_macs`` for
the PyTorch model the graph was exported from. Shapes come from ONNX shape inference on a copy whose
batch dimension is fixed to 1; the few onnxruntime contrib ops a QOperator-format graph uses
(QLinearAdd, QLinearGlobalAveragePool, QGemm, ...) get their shapes here, because ONNX's inference
stops at ops it does not know.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

from resopt.errors import InputFileError

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


@dataclass(frozen=True)
class OnnxStats:
    """What ``info`` and ``bench`` print for an ONNX graph; ``macs`` is None when shapes are unknowable."""

    params: int
    nonzero_params: int
    macs: int | None
    opset: int
    ops: dict[str, int]


# ------------------------------------------------------------------------------------ constants


class _Constants:
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


def _bias_add_slots(model: onnx.ModelProto, consts: _Constants) -> list[str]:
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
    consts = _Constants(model)
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


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
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
        if _attr(node, "channels_last", 0):
            return [x[0]] + [1] * (len(x) - 2) + [x[-1]], 0
        return x[:2] + [1] * (len(x) - 2), 0
    if op == "QGemm" and ins[0] is not None and len(ins) > 3 and ins[3] is not None:
        a, b = ins[0], ins[3]
        m = a[1] if _attr(node, "transA", 0) else a[0]
        n = b[0] if _attr(node, "transB", 0) else b[1]
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
    consts = _Constants(model)

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
                k = a[0] if _attr(node, "transA", 0) else a[1]
                if not _known(y):  # QGemm: (M, N) from A and B when inference could not say
                    b_pos = 3 if op == "QGemm" else 1
                    b = shape_of(node.input[b_pos])
                    y = [a[1] if _attr(node, "transA", 0) else a[0],
                         (b[0] if _attr(node, "transB", 0) else b[1])] if _known(b) else None
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



def image_input(model: Any, path: object) -> Any:
    """The graph's one image input (``ValueInfoProto``), NCHW: graph inputs that are initializers (old
    exporters list the weights as inputs) are not inputs. Anything else is one ``InputFileError`` line."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputFileError(f"{path} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); an image "
                             f"classifier takes one NCHW image tensor")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise InputFileError(f"{path} input {inputs[0].name!r} has rank {len(dims)}; expected NCHW images")
    return inputs[0]


def check_single_output(model: Any, path: object) -> None:
    if len(model.graph.output) != 1:
        raise InputFileError(f"{path} has {len(model.graph.output)} outputs; an image classifier has one output "
                             f"of (batch, classes) logits")


def check_classifier_graph(model: Any, path: object, *, image_size: int | None = None) -> None:
    """Refuse an ONNX that resopt cannot run as an image classifier, with one line saying why.

    resopt feeds one NCHW float batch of any size and reads one (batch, classes) output, so the graph needs
    exactly one image input with a dynamic batch axis (``resopt export`` writes one) and one rank-2 output.
    """
    inp = image_input(model, path)
    check_single_output(model, path)
    dims = inp.type.tensor_type.shape.dim
    if dims[0].HasField("dim_value"):
        raise InputFileError(f"{path} input {inp.name!r} has a fixed batch of {dims[0].dim_value}; resopt "
                             f"needs a dynamic batch axis",
                             hint="export it with `resopt export MODEL.pt`, or make its batch dynamic: `resopt import`")
    size = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    if size[0] not in (3, None) or (image_size is not None and size[1:] not in ([image_size] * 2, [None, None])):
        raise InputFileError(f"{path} input {inp.name!r} has shape (N, {', '.join(map(str, size))}); its "
                             f"metadata says 3 x {image_size} x {image_size} images")
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) != 2:
        raise InputFileError(f"{path} output {model.graph.output[0].name!r} has rank {len(out_dims)}; a classifier "
                             f"outputs (batch, classes)")
