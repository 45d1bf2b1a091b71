"""What ``build`` needs to know about its ONNX, read without TensorRT: the single image input and its batch
axis (``onnx_input_spec``), whether it carries TensorRT-compatible Q/DQ nodes (``onnx_quantization``) and
how much of its weights follow the 2:4 sparsity pattern (``sparsity_24``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resopt.errors import InputFileError

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# onnxruntime's "QOperator" format: TensorRT's parser cannot import these, it wants Q/DQ pairs.
QOPERATOR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                           "QLinearAveragePool", "QLinearSigmoid", "QLinearConcat", "ConvInteger", "MatMulInteger",
                           "DynamicQuantizeLinear"})



@dataclass(frozen=True)
class InputSpec:
    name: str
    batch: int | None  # None: dynamic batch axis
    sample_shape: tuple[int, ...]  # (C, H, W)


def onnx_input_spec(model: Any, path: Path | str = "model") -> InputSpec:
    """The single image input of a classifier ONNX: its name, batch axis and (C, H, W)."""
    from resopt.onnx_utils import check_single_output, image_input

    inp = image_input(model, path)
    check_single_output(model, path)
    dims = inp.type.tensor_type.shape.dim
    sample = []
    for d in dims[1:]:
        if not d.HasField("dim_value"):
            raise InputFileError(f"{path} input {inp.name!r} has a dynamic C/H/W dimension "
                                 f"({d.dim_param or '?'}); only the batch axis may be dynamic")
        sample.append(int(d.dim_value))
    batch = int(dims[0].dim_value) if dims[0].HasField("dim_value") else None
    return InputSpec(inp.name, batch, tuple(sample))


def onnx_quantization(model: Any, path: Path | str = "model") -> str:
    """``"qdq"`` for an ONNX with TensorRT-compatible Q/DQ nodes, ``"none"`` for a float model.

    TensorRT's explicit quantization is symmetric signed INT8 (zero point 0), so QOperator graphs,
    uint8 or nonzero zero points fail here with the quantize command that fixes them.
    """
    import numpy as np
    from onnx import numpy_helper

    ops = {n.op_type for n in model.graph.node}
    qop = sorted(ops & QOPERATOR_OPS)
    if qop:
        raise InputFileError(f"{path} uses onnxruntime QOperator nodes ({', '.join(qop)}), which TensorRT cannot "
                             f"parse; TensorRT needs Q/DQ (QuantizeLinear/DequantizeLinear) nodes",
                             hint="re-quantize the FP32 model with `resopt quantize MODEL.onnx --target trt`")
    if not ops & QDQ_OPS:
        return "none"
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: next((a.t for a in n.attribute if a.name == "value"), None)
              for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 3 or not node.input[2]:
            continue  # no zero point input: ONNX defaults it to 0 (int8 when the output type is unset)
        tensor = inits.get(node.input[2]) or consts.get(node.input[2])
        if tensor is None:
            continue
        zp = numpy_helper.to_array(tensor)
        if zp.dtype != np.int8 or np.any(zp != 0):
            raise InputFileError(
                f"{path} has {node.op_type} {node.name or node.output[0]!r} with zero point "
                f"{zp.reshape(-1)[:4].tolist()} of type {zp.dtype}; TensorRT needs symmetric int8 quantization "
                f"(int8, zero point 0)",
                hint="re-quantize the FP32 model with `resopt quantize MODEL.onnx --target trt`")
    return "qdq"


def sparsity_24(model: Any) -> dict[str, Any]:
    """How much of the Conv/Gemm weights follow the 2:4 pattern TensorRT's sparse kernels need: in every
    group of 4 consecutive input channels, at least 2 zeros. A layer qualifies only if all its groups do.
    """
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    layers = eligible = groups = ok_groups = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits and name in producers and producers[name].op_type == "DequantizeLinear":
            name = producers[name].input[0]  # Q/DQ graph: the quantized weight feeds a DequantizeLinear
        if name not in inits:
            continue
        w = numpy_helper.to_array(inits[name])
        if w.ndim == 4:  # Conv (K, C, R, S): groups run along C
            w = w.transpose(0, 2, 3, 1).reshape(-1, w.shape[1])
        elif w.ndim == 2:  # Gemm: weight (out, in) with transB=1 as exported by torch; groups along "in"
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            w = w if (node.op_type == "Gemm" and trans_b) else w.T
        else:
            continue
        pad = (-w.shape[1]) % 4
        w = np.pad(w, ((0, 0), (0, pad)))
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(axis=2)
        layers += 1
        groups += zeros.size
        ok_groups += int((zeros >= 2).sum())
        eligible += int(bool((zeros >= 2).all()))
    return {"layers": layers, "eligible_layers": eligible,
            "groups_2_4": round(ok_groups / groups, 4) if groups else 0.0}

