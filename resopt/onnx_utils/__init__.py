"""ONNX graphs as resopt reads them, one module per concern.

``params`` (parameters and non-zero parameters, through the constant sub-graphs in front of the weights),
``shapes`` (every value's shape at a fixed batch), ``macs`` (multiply-accumulates per layer and in all, and
``onnx_stats``: what ``info`` and ``bench`` report), ``graph`` (the image-classifier checks: one NCHW input,
one (batch, classes) output). Each module's docstring says what it counts and why; every public name is
importable from ``resopt.onnx_utils``. Nothing here imports onnx at module level.
"""

from resopt.onnx_utils.graph import (
    check_classifier_graph,
    check_single_output,
    graph_input,
    image_input,
    tensor_dims,
)
from resopt.onnx_utils.macs import OnnxStats, onnx_layer_macs, onnx_macs, onnx_stats
from resopt.onnx_utils.params import (
    CONV_OPS,
    GEMM_OPS,
    LAYER_OPS,
    MATMUL_OPS,
    WEIGHT_SLOTS,
    ZERO_POINT_SLOT,
    onnx_param_counts,
)
from resopt.onnx_utils.shapes import onnx_shapes

__all__ = [
    "CONV_OPS", "GEMM_OPS", "LAYER_OPS", "MATMUL_OPS", "WEIGHT_SLOTS", "ZERO_POINT_SLOT", "OnnxStats",
    "check_classifier_graph", "check_single_output", "graph_input", "image_input", "onnx_layer_macs", "onnx_macs",
    "onnx_param_counts", "onnx_shapes", "onnx_stats", "tensor_dims",
]
