"""``--mode w4a8``: 4-bit weights, 8-bit activations, through onnxruntime's own quantizer.

Weights are int4, symmetric, per output channel (onnxruntime's grid: [-8, 7], scale max|w|/7.5, zero point 0),
activations uint8 with calibrated ranges, as ``--mode int8 --target cpu`` has them. The first convolution and
the classifier stay at int8 by default (``--int4-ends`` puts them at 4 bits too): they hold few of the weights
and lose the most at 4 bits (the first sees the raw image through 27 weights per channel, the classifier
decides). ``quantize_static`` does the work (``resopt.quantize.ort.static_w4a8``): the int8 layers are its
per-tensor overrides, and the graph is raised to opset 21, where ``DequantizeLinear`` takes int4 and the
weights are stored packed, two to a byte. Nothing here rewrites the graph.

What runs it: onnxruntime's CPU provider has no int4 convolution; it dequantizes the int4 weights once, at
load time, and runs those convolutions in float on 8-bit activations (fake-quantized), the int8 ends as
QLinearConv / QGemm. OpenVINO (2026.x) reads the same file and does the same: the int4 convolutions run in
float on decompressed weights, the int8 ends in u8. So the file is what shrinks (about 8x against FP32);
speed stays near FP32's on both runtimes.

``--ptq adaround`` learns the rounding on the same grids (``ptq_grids``): int4 for the 4-bit convs, int8 for
the ones kept at 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.errors import VerificationError

if TYPE_CHECKING:
    import onnx

    from resopt.quantize.config import QuantizeConfig
    from resopt.quantize.pipeline import Job
    from resopt.quantize.ptq import WeightGrid

LAYER_OPS = ("Conv", "Gemm", "MatMul")
INT4_GRID = (-8, 7)


@dataclass(frozen=True)
class LayerPlan:
    """Per weighted layer (node name, in graph order) its weight bits; the layers ``--exclude`` keeps in
    float have none. ``weights``: node -> (weight initializer, its output-channel axis)."""

    bits: dict[str, int]
    weights: dict[str, tuple[str, int]]
    ends: tuple[str, ...]  # the first weighted layer and the last (the classifier)

    @property
    def int8(self) -> tuple[str, ...]:
        return tuple(n for n, b in self.bits.items() if b == 8)


def _axis(node: Any, weight: Any) -> int:
    """The output-channel axis of a layer's weight, as onnxruntime's per-channel quantizer takes it."""
    import onnx

    if node.op_type == "Gemm":
        trans_b = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return len(weight.dims) - 1
    return 0


def plan_layers(model: onnx.ModelProto, *, int8_ends: bool, exclude: tuple[str, ...] = ()) -> LayerPlan:
    """Which weighted layers get 4 and which 8 bits."""
    init = {i.name: i for i in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in init]
    ends = tuple(dict.fromkeys(n.name for n in layers[:1] + layers[-1:]))
    bits = {n.name: 8 if int8_ends and n.name in ends else 4 for n in layers if n.name not in exclude}
    weights = {n.name: (n.input[1], _axis(n, init[n.input[1]])) for n in layers}
    return LayerPlan(bits, weights, ends)


def ptq_grids(prepped: Path, cfg: QuantizeConfig, reduce_range: bool) -> tuple[WeightGrid, dict[str, WeightGrid]]:
    """``--ptq``'s weight grids: int4 for every conv, int8 (as ``--mode int8`` rounds) for those kept at 8."""
    import onnx

    from resopt.quantize.config import W4a8Options
    from resopt.quantize.ptq import WeightGrid

    plan = plan_layers(onnx.load(str(prepped)), int8_ends=cfg.mode_options(W4a8Options).int8_ends,
                       exclude=cfg.exclude)
    int8 = WeightGrid(64 if reduce_range else 127, cfg.per_channel)
    return WeightGrid(INT4_GRID[1], cfg.per_channel, INT4_GRID[0]), dict.fromkeys(plan.int8, int8)


def weight_storage(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """Per weighted layer of a Q/DQ graph, how its weight is stored: ``{"dtype": "INT4", "elements": n,
    "bytes": b}`` (b: the initializer's raw bytes), read from the initializer behind its
    DequantizeLinear; a float weight is ``FLOAT``."""
    import onnx

    init = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, dict[str, Any]] = {}
    for n in model.graph.node:
        if n.op_type not in LAYER_OPS or len(n.input) < 2:
            continue
        w = n.input[1]
        dq = producer.get(w)
        t = init.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else init.get(w)
        if t is None:
            continue
        elements = 1
        for d in t.dims:
            elements *= d
        out[n.name] = {"dtype": onnx.TensorProto.DataType.Name(t.data_type), "elements": elements,
                       "bytes": len(t.raw_data) or len(t.SerializeToString())}
    return out


def settings(cfg: QuantizeConfig, reduce_range: bool) -> dict[str, Any]:
    from resopt.quantize.config import W4a8Options

    ends = cfg.mode_options(W4a8Options).int8_ends
    scope = "per-channel" if cfg.per_channel else "per-tensor"
    return {"format": "QDQ opset 21", "activations": "uint8 asymmetric",
            "weights": f"int4 {scope} symmetric" + (f" (first conv and classifier int8 {scope})" if ends else ""),
            "int8_ends": ends, "calib_method": cfg.calib_method, "reduce_range": reduce_range,
            "preprocessed": True}


def produce(job: Job) -> None:
    """The ``--mode w4a8`` producer: plan, quantize with onnxruntime, and check that what it wrote is what was
    planned (int4 where 4 bits were asked for, int8 at the ends)."""
    import onnx

    from resopt.quantize import ort as q
    from resopt.quantize.config import W4a8Options
    from resopt.quantize.runtimes import runtime_int8_layers

    assert job.ranges is not None
    opts = job.cfg.mode_options(W4a8Options)
    plan = plan_layers(onnx.load(str(job.prepped)), int8_ends=opts.int8_ends, exclude=job.cfg.exclude)
    q.static_w4a8(job.prepped, job.produced.path, job.ranges, workdir=job.tmp,
                  int8_weights=dict(plan.weights[n] for n in plan.int8), per_channel=job.cfg.per_channel,
                  reduce_range=job.reduce_range, exclude=job.cfg.exclude)
    stored = weight_storage(onnx.load(str(job.produced.path)))
    expected = {4: "INT4", 8: "INT8"}
    wrong = [f"{n} ({stored.get(n, {}).get('dtype', 'missing')}, not {expected[b]})" for n, b in plan.bits.items()
             if stored.get(n, {}).get("dtype") != expected[b]]
    if wrong:
        raise VerificationError(f"onnxruntime's quantizer did not write the planned weights: {', '.join(wrong[:3])}"
                                + (" ..." if len(wrong) > 3 else ""))
    counts = {b: sum(stored[n]["elements"] for n, bb in plan.bits.items() if bb == b) for b in (4, 8)}
    float_weights = sum(s["elements"] for n, s in stored.items() if n not in plan.bits)
    total = counts[4] + counts[8] + float_weights
    job.produced.options.update({"layer_bits": plan.bits, "int8_layers": list(plan.int8)})
    job.produced.metrics.update({
        "int4_weights": counts[4], "int8_weights": counts[8], "float_weights": float_weights,
        "int4_weight_bytes": sum(stored[n]["bytes"] for n, b in plan.bits.items() if b == 4),
        "mean_weight_bits": round((4 * counts[4] + 8 * counts[8] + 32 * float_weights) / max(1, total), 3)})
    job.produced.extra["w4a8"] = {"layer_bits": plan.bits, "int8_layers": list(plan.int8),
                                  "int4_weights": counts[4], "int8_weights": counts[8],
                                  "float_weights": float_weights}
    job.produced.extra["runtime_int8"] = runtime_int8_layers(job.produced.path, job.src.pre.input_size)
