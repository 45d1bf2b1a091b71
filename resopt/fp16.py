"""FP16 conversion of an FP32 ONNX, written once for ``build --fp16`` and ``quantize --mode fp16``.

Both keep the same numerically sensitive ops in FP32 (``FP16_KEEP_FP32_OPS`` plus onnxruntime's own
block list), so an FP16 model means the same thing whichever command made it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Ops kept in FP32 when the ONNX is converted to FP16: reductions and normalisations accumulate many
# terms (a mean over 49 or 1,024 values), and exp/log/pow/softmax overflow or lose range in FP16's
# 5-bit exponent. Convolutions, GEMMs, ReLU and Add - nearly all of a ResNet's time - run in FP16.
FP16_KEEP_FP32_OPS: tuple[str, ...] = (
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "GlobalAveragePool",
    "GlobalLpPool", "BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Erf",
    "QuantizeLinear", "DequantizeLinear",
)


@dataclass(frozen=True)
class Fp16Conversion:
    """What ``convert_onnx_fp16`` did: FP16 nodes, nodes kept in FP32 (by op type) and casts inserted."""

    fp16_nodes: int
    kept_fp32: dict[str, int]
    casts: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert_onnx_fp16(model: Any, *, keep_fp32_ops: Sequence[str] = FP16_KEEP_FP32_OPS,
                      exclude_nodes: Sequence[str] = ()) -> tuple[Any, Fp16Conversion]:
    """An FP16 copy of an FP32 ONNX: ``build --fp16`` (TensorRT's strongly typed networks) and
    ``quantize --mode fp16`` both convert through here.

    Inputs and outputs stay float32 (callers feed and read float32 as before; the casts run on the
    device), ops in ``keep_fp32_ops`` and onnxruntime's own list of ops without FP16 kernels stay FP32
    with casts around them, as do the nodes named in ``exclude_nodes`` (``--exclude``), and weights are
    stored in FP16 (values beyond FP16's range are clamped to +-65504 and tiny ones flushed, by the
    converter).
    """
    import copy

    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(keep_fp32_ops) | set(DEFAULT_OP_BLOCK_LIST))
    before = {n.name for n in model.graph.node}
    # The converter edits the graph it is given; keep the caller's model intact.
    converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True, op_block_list=block,
                                         node_block_list=list(exclude_nodes) or None)
    _toposort(converted)
    kept: dict[str, int] = {}
    fp16_nodes = casts = 0
    for node in converted.graph.node:
        if node.op_type == "Cast" and node.name not in before:
            casts += 1
        elif node.op_type in block or node.name in exclude_nodes:
            kept[node.op_type] = kept.get(node.op_type, 0) + 1
        else:
            fp16_nodes += 1
    return converted, Fp16Conversion(fp16_nodes, dict(sorted(kept.items())), casts)


def _toposort(model: Any) -> None:
    """Put the graph's nodes in dependency order (stable otherwise), in place.

    The converter appends the casts of the kept-float32 inputs after the nodes that read them;
    onnxruntime sorts for itself, but ``onnx.checker`` (and so ``resopt info`` and ``report``) refuses
    such a graph. onnx-graphsurgeon's ``toposort`` (which export uses) would round-trip the model and drop
    its metadata, so the nodes are reordered in place instead.
    """
    nodes = list(model.graph.node)
    producer = {out: k for k, n in enumerate(nodes) for out in n.output if out}
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    order: list[int] = []
    for start in range(len(nodes)):
        stack = [(start, iter(nodes[start].input))]
        while stack:  # depth-first, without recursion: graphs can be thousands of nodes deep
            k, inputs = stack[-1]
            if state[k] == 2:
                stack.pop()
                continue
            state[k] = 1
            dep = next((producer[i] for i in inputs if i in producer and state[producer[i]] == 0), None)
            if dep is not None:
                stack.append((dep, iter(nodes[dep].input)))
                continue
            stack.pop()
            state[k] = 2
            order.append(k)
    if order != list(range(len(nodes))):
        model.graph.ClearField("node")
        model.graph.node.extend(nodes[k] for k in order)
