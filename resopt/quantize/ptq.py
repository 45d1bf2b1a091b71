"""Post-training steps that run before onnxruntime's static quantization (``--ptq``): cross-layer equalization
(Nagel et al. 2019), AdaRound (Nagel et al. 2020) and empirical bias correction.

They rewrite the FP32 ONNX graph (after onnxruntime's pre-processing, which has folded BatchNorm into the
convolutions), not the PyTorch model: ``--mode int8`` takes an ``.onnx`` (and a ``.pt`` only through the
export), so working on the graph serves both inputs and quantizes exactly the tensors onnxruntime will.
Every step leaves a float model that onnxruntime's quantizer then quantizes with its usual rule:

- CLE rescales consecutive convolutions (Conv [-> Relu] -> Conv): a function-preserving change.
- AdaRound writes each convolution's weights already on onnxruntime's weight grid (the scale unchanged: the
  largest weight of each channel is written as it was and keeps its nearest rounding), so the quantizer
  reproduces the learned up/down rounding exactly; on int8's grid (``--mode int8``) or int4's (``--mode w4a8``,
  with int8's for the layers it keeps at 8 bits).
- Bias correction subtracts each convolution's mean output error, measured on the calibration images with
  the weights as they will be stored (after AdaRound when both are asked for), from its bias.

AdaRound and bias correction take the layer inputs of the FP32 model on the first ``PTQ_IMAGES``
calibration images; they are seeded and deterministic on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.errors import UsageError

if TYPE_CHECKING:
    import numpy as np
    import onnx

PTQ_STEPS = ("cle", "bias-correction", "adaround")
PTQ_IMAGES = 128  # calibration images whose layer inputs AdaRound and bias correction use
ADAROUND_ITERS = 500


def parse_ptq(steps: Iterable[str]) -> tuple[str, ...]:
    """The ``--ptq`` steps, checked: known names, no repeats, written in the order of ``PTQ_STEPS``."""
    given = tuple(s.strip() for s in steps if s.strip())
    for s in given:
        if s not in PTQ_STEPS:
            raise UsageError(f"unknown --ptq step {s!r}; the steps are {', '.join(PTQ_STEPS)}")
    if len(set(given)) != len(given) or list(given) != sorted(given, key=PTQ_STEPS.index):
        raise UsageError(f"--ptq {','.join(given)}: name each step once, in the order {','.join(PTQ_STEPS)}")
    return given


@dataclass(frozen=True)
class WeightGrid:
    """onnxruntime's symmetric weight grid: integers in [qmin, qmax] (qmin = -qmax unless given), scale =
    max|w| / ((qmax - qmin) / 2) per output channel (or per tensor), zero point 0. int8: [-127, 127] (scale
    max|w|/127; [-64, 64] with reduce_range); int4: [-8, 7], scale max|w|/7.5, as ``quantize_static`` computes
    them (``compute_scale_zp`` with symmetric weights)."""

    qmax: int = 127  # 127; 64 with reduce_range (onnxruntime's reduced int8 range is [-64, 64]); 7 for int4
    per_channel: bool = True
    qmin: int | None = None  # None: -qmax; -8 for int4

    @property
    def low(self) -> int:
        return -self.qmax if self.qmin is None else self.qmin

    @property
    def bits(self) -> int:
        return int(self.qmax - self.low).bit_length()

    def describe(self) -> str:
        return f"int{self.bits} [{self.low}, {self.qmax}] {'per-channel' if self.per_channel else 'per-tensor'}"

    def absmax(self, w: np.ndarray) -> np.ndarray:
        import numpy as np

        a = np.abs(w).reshape(w.shape[0], -1).max(axis=1) if self.per_channel else np.full(w.shape[0], np.abs(w).max())
        return a.reshape((-1,) + (1,) * (w.ndim - 1))

    def scales(self, w: np.ndarray) -> np.ndarray:
        import numpy as np

        # As onnxruntime computes it: the range 2 max|w| over the integer range in float64, stored as float32.
        s = (self.absmax(w).astype(np.float64) * 2 / (self.qmax - self.low)).astype(np.float32)
        return np.where(s > 0, s, np.float32(1.0))

    def round_nearest(self, w: np.ndarray) -> np.ndarray:
        import numpy as np

        s = self.scales(w)
        return (np.clip(np.rint(w / s), self.low, self.qmax) * s).astype(np.float32)

    def stored(self, w: np.ndarray, w_q: np.ndarray) -> np.ndarray:
        """What to write into the float graph so that onnxruntime's quantizer reproduces ``w_q`` (on this grid):
        ``w_q``, but each channel's largest-magnitude weight as it was. onnxruntime derives the scale from that
        weight, and rounds it to nearest as ``w_q`` does; on int4's [-8, 7] grid its nearest value is not its
        magnitude (7.5 steps rounds to 7 or -8), so writing the rounded value would change the scale."""
        import numpy as np

        return np.where(np.abs(w) >= self.absmax(w), w, w_q).astype(np.float32)


# ------------------------------------------------------------------------------------------ the graph


def _inits(model: onnx.ModelProto) -> dict[str, Any]:
    return {i.name: i for i in model.graph.initializer}


def _array(init: Any) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init).copy()


def _set(init: Any, value: np.ndarray) -> None:
    import numpy as np
    from onnx import numpy_helper

    init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _convs(model: onnx.ModelProto) -> list[Any]:
    inits = _inits(model)
    return [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits]


def _ensure_bias(model: onnx.ModelProto, node: Any, out_channels: int) -> Any:
    import numpy as np
    from onnx import numpy_helper

    inits = _inits(model)
    if len(node.input) > 2 and node.input[2] in inits:
        return inits[node.input[2]]
    name = node.name + "__bias"
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(out_channels, np.float32), name))
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)
    return model.graph.initializer[-1]


# ------------------------------------------------------------------------------ cross-layer equalization


def equalize_pairs(model: onnx.ModelProto) -> list[tuple[Any, Any]]:
    """The (first, second) Conv pairs CLE can rescale: the first's output reaches only the second, through
    nothing or a single Relu (positively homogeneous, so a per-channel scale passes through it), and the
    second is an ordinary (group 1) convolution. ResNet's block-to-block convolutions feed a residual add and
    are left alone: a scale there would have to match on every branch."""
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    convs = {n.name: n for n in _convs(model)}
    pairs = []
    for a in convs.values():
        t = a.output[0]
        nxt = consumers.get(t, [])
        if t in outputs or len(nxt) != 1:
            continue
        b = nxt[0]
        if b.op_type == "Relu":
            t = b.output[0]
            nxt = consumers.get(t, [])
            if t in outputs or len(nxt) != 1:
                continue
            b = nxt[0]
        if b.op_type == "Conv" and b.name in convs and b.input[0] == t and _attr(b, "group", 1) == 1:
            pairs.append((a, b))
    return pairs


def equalize_cross_layer(model: onnx.ModelProto, *, rounds: int = 4) -> list[dict[str, Any]]:
    """Rescale each pair so that output channel i of the first and input channel i of the second have the
    same weight range, sqrt(r1_i * r2_i); the model computes the same function. Returns, per pair, the
    spread (largest / smallest per-channel range) of the first conv's output channels before and after."""
    import numpy as np

    inits = _inits(model)
    pairs = equalize_pairs(model)
    before = {a.name: _spread(_array(inits[a.input[1]])) for a, _ in pairs}
    for _ in range(rounds):  # chains (Conv-Relu-Conv-Relu-Conv) converge in a few rounds
        for a, b in pairs:
            w1, w2 = _array(inits[a.input[1]]), _array(inits[b.input[1]])
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
            r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(axis=1)
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0).astype(np.float32)
            _set(inits[a.input[1]], w1 / s.reshape(-1, 1, 1, 1))
            bias = _ensure_bias(model, a, w1.shape[0])
            _set(bias, _array(bias) / s)
            _set(inits[b.input[1]], w2 * s.reshape(1, -1, 1, 1))
    return [{"first": a.name, "second": b.name, "spread_before": round(before[a.name], 2),
             "spread_after": round(_spread(_array(inits[a.input[1]])), 2)} for a, b in pairs]


def _spread(w: np.ndarray) -> float:
    import numpy as np

    r = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    return float(r.max() / max(float(r[r > 0].min(initial=r.max())), 1e-12))


# ------------------------------------------------------------------------------------ layer inputs


def conv_inputs(model: onnx.ModelProto, images: np.ndarray, *, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Each weighted Conv's input on ``images``, from the float ``model`` (node name -> NCHW array)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    convs = _convs(model)
    have = {o.name for o in probe.graph.output}
    for n in convs:
        if n.input[0] not in have:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None))
            have.add(n.input[0])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the tensors by name
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feed = sess.get_inputs()[0].name
    got: dict[str, list[np.ndarray]] = {n.input[0]: [] for n in convs}
    for i in range(0, len(images), batch_size):
        outs = dict(zip(names, sess.run(None, {feed: images[i:i + batch_size]}), strict=True))
        for t in got:
            got[t].append(outs[t])
    return {n.name: np.concatenate(got[n.input[0]]) for n in convs}


def _conv(x: Any, w: Any, node: Any) -> Any:
    import torch.nn.functional as F

    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    if pads[0] != pads[2] or pads[1] != pads[3]:
        x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
        pad: tuple[int, int] = (0, 0)
    else:
        pad = (pads[0], pads[1])
    return F.conv2d(x, w, None, stride=tuple(_attr(node, "strides", [1, 1])), padding=pad,
                    dilation=tuple(_attr(node, "dilations", [1, 1])), groups=_attr(node, "group", 1))


# ------------------------------------------------------------------------------------------ AdaRound


def adaround_layer(w: np.ndarray, x: np.ndarray, node: Any, grid: WeightGrid, *, iters: int = ADAROUND_ITERS,
                   seed: int = 0, batch: int = 32, reg: float = 0.01) -> tuple[np.ndarray, dict[str, float]]:
    """AdaRound one convolution: learn, for every weight, rounding down or up on ``grid`` so that the
    layer's output on ``x`` changes least, ``mean((conv(x, w) - conv(x, w_q))^2)``. The result is on the grid
    with the same scales (each channel's largest weight keeps its nearest rounding) and is never worse on that
    objective than rounding to nearest, which it falls back to when its learned rounding is."""
    import numpy as np
    import torch

    zeta, gamma = 1.1, -0.1
    g = torch.Generator().manual_seed(seed)
    s = torch.from_numpy(grid.scales(w))
    wt, xt = torch.from_numpy(w), torch.from_numpy(x)
    base = torch.floor(wt / s)
    rest = (wt / s - base).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((zeta - gamma) / (rest - gamma) - 1)).requires_grad_(True)
    keep = torch.abs(wt) >= torch.from_numpy(grid.absmax(w))
    nearest = torch.from_numpy(grid.round_nearest(w))
    with torch.no_grad():
        ref = _conv(xt, wt, node)

    def soft(v: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(v) * (zeta - gamma) + gamma).clamp(0, 1)

    # Learned roundings stay within +-min(qmax, -qmin): below that (int4's -8) a weight's magnitude would exceed
    # its channel's largest, from which onnxruntime derives the scale; that weight keeps its nearest value.
    sym = min(grid.qmax, -grid.low)

    def weights(h: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(base + h, -sym, sym) * s
        return torch.where(keep, nearest, q)

    opt = torch.optim.Adam([v], lr=1e-2)
    warm = iters // 5
    for it in range(iters):
        idx = torch.randint(0, len(xt), (min(batch, len(xt)),), generator=g)
        h = soft(v)
        loss = torch.mean((ref[idx] - _conv(xt[idx], weights(h), node)) ** 2)
        if it >= warm:
            beta = 20 + (2 - 20) * (it - warm) / max(1, iters - warm)
            loss = loss + reg * torch.sum(1 - torch.abs(2 * h - 1) ** beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = weights((v >= 0).to(wt.dtype))
        err_nearest = float(torch.mean((ref - _conv(xt, nearest, node)) ** 2))
        err_learned = float(torch.mean((ref - _conv(xt, learned, node)) ** 2))
    chosen = learned if err_learned <= err_nearest else nearest
    flipped = float(torch.mean((chosen != nearest).to(torch.float32)))
    return chosen.numpy().astype(np.float32), {"mse_nearest": err_nearest, "mse_adaround": min(err_learned,
                                                                                               err_nearest),
                                               "flipped": flipped}


# ------------------------------------------------------------------------------------------ bias correction


def bias_correction(w: np.ndarray, w_q: np.ndarray, x: np.ndarray, node: Any) -> np.ndarray:
    """The per-output-channel mean of ``conv(x, w_q) - conv(x, w)`` over images and positions: what to
    subtract from the bias so that the quantized layer's mean output on ``x`` equals the float layer's."""
    import torch

    with torch.no_grad():
        err = _conv(torch.from_numpy(x), torch.from_numpy(w_q - w), node)
    return err.mean(dim=(0, 2, 3)).numpy()


# ------------------------------------------------------------------------------------------ the steps


def apply_ptq(src: Path, dst: Path, steps: tuple[str, ...], grid: WeightGrid, images: np.ndarray | None, *,
              seed: int = 0, iters: int = ADAROUND_ITERS,
              layer_grids: Mapping[str, WeightGrid] | None = None) -> dict[str, Any]:
    """Run ``steps`` on the float ONNX ``src`` and write ``dst``; returns what each step changed (for the
    lineage). AdaRound runs before bias correction whenever both are given, so the bias is corrected for the
    weights that are stored. ``grid`` is the weight grid of every conv but those ``layer_grids`` names (node
    name -> grid: ``--mode w4a8`` rounds its 4-bit convs on int4's grid and the ones it keeps at 8 bits on
    int8's)."""
    import numpy as np
    import onnx

    model = onnx.load(str(src))
    layer_grids = dict(layer_grids or {})
    record: dict[str, Any] = {"steps": list(steps), "seed": seed, "weight_qmax": grid.qmax,
                              "per_channel": grid.per_channel}
    if layer_grids:
        record["weight_grid"] = grid.describe()
        record["layer_grids"] = {name: g.describe() for name, g in layer_grids.items()}
    if "cle" in steps:
        record["cle"] = equalize_cross_layer(model)
    if "adaround" in steps or "bias-correction" in steps:
        assert images is not None
        images = images[:PTQ_IMAGES]
        record["images"] = len(images)
        inputs = conv_inputs(model, images)
        inits = _inits(model)
        ada, bc = [], []
        for i, node in enumerate(_convs(model)):
            w = _array(inits[node.input[1]])
            x = inputs[node.name]
            g = layer_grids.get(node.name, grid)
            if "adaround" in steps:
                w_q, info = adaround_layer(w, x, node, g, iters=iters, seed=seed + i)
                _set(inits[node.input[1]], g.stored(w, w_q))
                ada.append({"layer": node.name, **({"bits": g.bits} if layer_grids else {}),
                            **{k: float(f"{v:.4g}") for k, v in info.items()}})
            else:
                w_q = g.round_nearest(w)
            if "bias-correction" in steps:
                corr = bias_correction(w, w_q, x, node)
                bias = _ensure_bias(model, node, w.shape[0])
                _set(bias, _array(bias) - corr)
                bc.append({"layer": node.name, "mean_abs_correction": float(f"{np.abs(corr).mean():.4g}")})
            del inputs[node.name]
        if ada:
            record["adaround"] = {"iters": iters, "layers": ada}
        if bc:
            record["bias_correction"] = bc
    onnx.save(model, str(dst))
    return record
