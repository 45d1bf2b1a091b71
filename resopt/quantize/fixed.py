"""Fixed-point quantization: N-bit values with a per-layer fractional length, as in the fixed-point
studies resopt replaces (Ristretto-style dynamic fixed point).

A value is ``q * 2^-fl`` with ``q`` an N-bit integer. Per layer, the integer length is what the layer's
range needs (``il = ceil(log2(max|x|))``, plus a sign bit when values go negative) and the rest of the N
bits are fraction: ``fl = N - il``. Weights use their own range; activations (the inputs of each Conv,
Gemm and MatMul, with ``act_bits``) the calibrated range on real images.

In ONNX this is exactly a DequantizeLinear with scale ``2^-fl`` and zero point 0: weights are stored as
int8 holding N-bit values (so the file is ~4x smaller at any N <= 8), activations pass through a
Clip to the N-bit range (below 8 bits QuantizeLinear alone would saturate at the int8 range) and a
Q/DQ pair. onnxruntime then computes exactly what fixed-point hardware would, up to float accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from resopt.quantize.ort import Ranges

LAYER_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op -> weight slot


@dataclass(frozen=True)
class FixedFormat:
    """An N-bit signed or unsigned fixed-point format with ``frac`` fractional bits."""

    bits: int
    frac: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def scale(self) -> float:
        return 2.0 ** -self.frac

    def name(self) -> str:
        return f"{'s' if self.signed else 'u'}{self.bits}.{self.frac}"  # e.g. s8.6 = 8 bits, 6 fractional


def fixed_format(absmax: float, bits: int, *, signed: bool) -> FixedFormat:
    """The format whose integer part just holds ``absmax``."""
    il = math.ceil(math.log2(absmax)) if absmax > 0 else 0
    return FixedFormat(bits, bits - il - (1 if signed else 0), signed)


def to_fixed(x: np.ndarray, fmt: FixedFormat) -> np.ndarray:
    import numpy as np

    return np.clip(np.round(x * 2.0 ** fmt.frac), fmt.qmin, fmt.qmax)


def fixed_point(src: Path, dst: Path, *, bits: int, act_bits: int | None = None, ranges: Ranges | None = None,
                exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> dict[str, dict[str, str]]:
    """Write ``src`` with N-bit fixed-point weights (and activations with ``act_bits``); returns the format
    chosen per layer, ``{node: {"weight": "s8.7", "input": "u8.4"}}``."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    init = {i.name: i for i in model.graph.initializer}
    new_init: list[onnx.TensorProto] = []
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # insert before node index
    formats: dict[str, dict[str, str]] = {}
    done_weights: dict[str, str] = {}
    done_acts: dict[str, str] = {}

    for pos, node in enumerate(model.graph.node):
        slot = LAYER_OPS.get(node.op_type)
        if slot is None or node.name in exclude or (only and node.name not in only):
            continue
        f: dict[str, str] = {}
        w_name = node.input[slot] if len(node.input) > slot else ""
        if w_name in init and init[w_name].data_type == onnx.TensorProto.FLOAT:
            if w_name not in done_weights:
                w = numpy_helper.to_array(init[w_name])
                fmt = fixed_format(float(np.abs(w).max()), bits, signed=True)
                q = to_fixed(w, fmt).astype(np.int8)
                model.graph.initializer.remove(init[w_name])
                new_init += [numpy_helper.from_array(q, f"{w_name}__fixed"),
                             numpy_helper.from_array(np.array(fmt.scale, np.float32), f"{w_name}__fixed_scale"),
                             numpy_helper.from_array(np.array(0, np.int8), f"{w_name}__fixed_zp")]
                new_nodes.setdefault(0, []).append(helper.make_node(
                    "DequantizeLinear", [f"{w_name}__fixed", f"{w_name}__fixed_scale", f"{w_name}__fixed_zp"],
                    [w_name], name=f"{w_name}__fixed_dq"))
                done_weights[w_name] = fmt.name()
            f["weight"] = done_weights[w_name]
        x = node.input[0] if node.op_type != "MatMul" or w_name == node.input[1] else ""
        lo_hi = ranges.minmax(x) if act_bits is not None and ranges is not None and x and x not in init else None
        if lo_hi is not None and act_bits is not None:
            if x not in done_acts:
                lo, hi = lo_hi
                fmt = fixed_format(max(abs(lo), abs(hi)), act_bits, signed=lo < 0)
                qtype = np.int8 if fmt.signed else np.uint8
                base = f"{x}__fx"
                new_init += [numpy_helper.from_array(np.array(fmt.qmin * fmt.scale, np.float32), f"{base}_lo"),
                             numpy_helper.from_array(np.array(fmt.qmax * fmt.scale, np.float32), f"{base}_hi"),
                             numpy_helper.from_array(np.array(fmt.scale, np.float32), f"{base}_scale"),
                             numpy_helper.from_array(np.array(0, qtype), f"{base}_zp")]
                new_nodes.setdefault(pos, []).extend([
                    helper.make_node("Clip", [x, f"{base}_lo", f"{base}_hi"], [f"{base}_clip"], name=f"{base}_clip"),
                    helper.make_node("QuantizeLinear", [f"{base}_clip", f"{base}_scale", f"{base}_zp"], [f"{base}_q"],
                                     name=f"{base}_q"),
                    helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"], [base],
                                     name=f"{base}_dq")])
                done_acts[x] = fmt.name()
            node.input[0] = f"{x}__fx"
            f["input"] = done_acts[x]
        if f:
            formats[node.name] = f

    nodes: list[onnx.NodeProto] = []
    for pos, node in enumerate(model.graph.node):
        nodes += new_nodes.get(pos, [])
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_init)
    keep = [v for v in model.graph.value_info if v.name not in done_weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return formats
