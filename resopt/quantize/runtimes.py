"""How many layers of a quantized ONNX really execute in INT8, per CPU runtime.

The Q/DQ lint (``lint.py``) reads the file; this asks the runtimes what they made of it, because the same
Q/DQ file is fused differently: onnxruntime turns a Q/DQ-wrapped Conv into ``QLinearConv`` only where its
fusion rules match, and OpenVINO's CPU plugin reports each executed layer's ``runtimePrecision``. Compute
layers are the convolutions and matrix products (what carries the MACs).

* onnxruntime: the graph after its full CPU optimisation (``optimized_model_filepath``), integer ops
  (QLinearConv, QGemm, ConvInteger, ...) against float ones (Conv, FusedConv, Gemm, MatMul, ...).
* OpenVINO: the compiled model's runtime model (``resopt.backends.openvino_backend.layer_precisions``),
  u8/i8 layers against all compute layers. Skipped, with the reason, when OpenVINO is not installed.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ORT_INT8_OPS = ("QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul")
ORT_FLOAT_OPS = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def ort_int8_layers(path: Path) -> dict[str, Any]:
    """``{"int8": n, "layers": m, "ops": {op: count}}`` of the graph onnxruntime's CPU provider runs."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="resopt-ort-opt-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    ops = Counter(n.op_type for n in graph.node if n.op_type in ORT_INT8_OPS + ORT_FLOAT_OPS)
    int8 = sum(n for op, n in ops.items() if op in ORT_INT8_OPS)
    return {"int8": int8, "layers": sum(ops.values()), "ops": dict(ops)}


def openvino_int8_layers(path: Path, input_size: int) -> dict[str, Any]:
    """The same count from OpenVINO's compiled model (FP32 inference precision, batch 1)."""
    from resopt.backends.openvino_backend import compile_onnx, int8_layer_count, layer_precisions

    precisions = layer_precisions(compile_onnx(path, 1, input_size, threads=1, precision="f32"))
    int8, total = int8_layer_count(precisions)
    return {"int8": int8, "layers": total, "precisions": precisions}


def runtime_int8_layers(path: Path, input_size: int) -> dict[str, Any]:
    """Per CPU runtime, how many compute layers of ``path`` execute in INT8 (see the module doc)."""
    from resopt.envinfo import openvino_version

    counts: dict[str, Any] = {"onnxruntime": ort_int8_layers(path)}
    version, reason = openvino_version()
    counts["openvino"] = openvino_int8_layers(path, input_size) if version else {"skipped": reason}
    return counts
