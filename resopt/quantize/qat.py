"""Quantization-aware training: fine-tune a checkpoint with the INT8 rounding of its deployed graph simulated
in the forward pass, so the weights learn to sit where the quantization grid puts them.

The simulated model mirrors what ``resopt quantize --mode int8`` deploys with onnxruntime:

- BatchNorm folding is simulated (Jacob et al. 2018): each Conv followed by a BatchNorm computes with
  ``w * gamma / sqrt(var + eps)`` and the folded bias, from frozen running statistics, exactly what the
  exported graph holds; so the weights that are fake-quantized are the ones that will be stored. The
  parameters stay in their original form (conv weight, BN gamma/beta), so the learning rate means what
  it means in ``train``. Frozen statistics make SGD far touchier than live BatchNorm, though: on a
  trained ResNet-20, five SGD steps on one batch take the loss from 1.17 to 2.49 at lr 0.01 with frozen
  BatchNorm (fake quantization on or off alike) and to 1.12 at lr 0.001, hence the default lr of 1e-3;
- weights: symmetric int8 per output channel (or per tensor), scale ``max|w| / 127``, recomputed each step;
- activations: the inputs of every Conv/Linear and both inputs of every residual add, per tensor, with
  ranges calibrated (min/max) on the calibration images and then frozen; uint8 asymmetric for the cpu
  target, int8 symmetric for trt;
- the straight-through estimator passes gradients through the rounding (``torch.fake_quantize_*``).

Training is ``resopt.train.fit`` (epochs, lr, AMP, seed). The fake-quant layers wrap the model's own
Conv/BatchNorm/Linear modules, so after training the model's ``state_dict`` is a plain checkpoint of the
original architecture, which ``resopt.export.export_onnx`` exports and the ORT pipeline quantizes with the
same calibration set. Activation ranges are re-calibrated on the fine-tuned weights in both the PyTorch
model and the ONNX, so the fake-quant PyTorch top-1 predicts the deployed one.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import fx, nn

    from resopt.quantize.config import QuantizeConfig
    from resopt.quantize.pipeline import ModeEntry, QuantizeResult


def _fake_quant_classes() -> tuple[type, type, type, type]:
    """(activation fake-quant, weight fake-quant, Conv(+BN) layer, Linear layer); built on first use so that
    importing this module does not import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ActFakeQuant(nn.Module):
        """Per-tensor activation fake quantization with min/max observation, then frozen ranges."""

        lo: torch.Tensor  # buffers (register_buffer): typed here for the checker
        hi: torch.Tensor
        scale: torch.Tensor
        zero_point: torch.Tensor

        def __init__(self, symmetric: bool) -> None:
            super().__init__()
            self.symmetric = symmetric
            self.observing = False
            self.enabled = False
            self.skip = False  # an --exclude'd layer's input: stays float whatever ``enabled`` says
            self.register_buffer("lo", torch.tensor(float("inf")))
            self.register_buffer("hi", torch.tensor(float("-inf")))
            self.register_buffer("scale", torch.tensor(1.0))
            self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

        def reset(self) -> None:
            self.lo.fill_(float("inf"))
            self.hi.fill_(float("-inf"))

        def freeze(self) -> None:
            """Scale and zero point from the observed range, the way onnxruntime computes them."""
            lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)  # the range always holds 0
            if self.symmetric:
                amax = max(abs(lo), abs(hi))
                scale, zp = (amax / 127.0 if amax > 0 else 1.0), 0
            else:
                scale = (hi - lo) / 255.0 if hi > lo else 1.0
                zp = int(round(-lo / scale))
            self.scale.fill_(scale)
            self.zero_point.fill_(zp)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.observing:
                self.lo.copy_(torch.minimum(self.lo, x.detach().min().float()))
                self.hi.copy_(torch.maximum(self.hi, x.detach().max().float()))
                return x
            if not self.enabled or self.skip:
                return x
            qmin, qmax = (-127, 127) if self.symmetric else (0, 255)
            y = torch.fake_quantize_per_tensor_affine(x.float(), self.scale, self.zero_point, qmin, qmax)
            return y.to(x.dtype)

    class WeightFakeQuant(nn.Module):
        """The weight as its symmetric int8 rounding (per output channel or per tensor), as ORT stores it."""

        def __init__(self, per_channel: bool) -> None:
            super().__init__()
            self.per_channel = per_channel
            self.enabled = True
            self.skip = False  # an --exclude'd layer: float weights whatever ``enabled`` says

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            if not self.enabled or self.skip:
                return w
            wf = w.float()
            if self.per_channel:
                amax = wf.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
                zp = torch.zeros_like(amax, dtype=torch.int32)
                return torch.fake_quantize_per_channel_affine(wf, amax / 127.0, zp, 0, -127, 127).to(w.dtype)
            amax = wf.detach().abs().max().clamp_min(1e-12)
            return torch.fake_quantize_per_tensor_affine(wf, amax / 127.0, torch.tensor(0, dtype=torch.int32),
                                                         -127, 127).to(w.dtype)

    class QatConv(nn.Module):
        """A Conv2d and the BatchNorm after it (if any), computed as the folded, fake-quantized conv."""

        def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, per_channel: bool) -> None:
            super().__init__()
            self.conv, self.bn = conv, bn
            self.weight_quant = WeightFakeQuant(per_channel)

        def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
            w, b = self.conv.weight, self.conv.bias
            if self.bn is None:
                return w, b
            mean, var = self.bn.running_mean, self.bn.running_var
            assert mean is not None and var is not None, "QAT folds BatchNorm layers that track running stats"
            scale = self.bn.weight / torch.sqrt(var + self.bn.eps)
            b0 = b if b is not None else torch.zeros_like(mean)
            return w * scale.reshape(-1, 1, 1, 1), (b0 - mean) * scale + self.bn.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w, b = self.folded()
            return self.conv._conv_forward(x, self.weight_quant(w), b)

    class QatLinear(nn.Module):
        def __init__(self, linear: nn.Linear, per_channel: bool) -> None:
            super().__init__()
            self.linear = linear
            self.weight_quant = WeightFakeQuant(per_channel)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight_quant(self.linear.weight), self.linear.bias)

    return ActFakeQuant, WeightFakeQuant, QatConv, QatLinear


@dataclass
class QatModel:
    """The fake-quant GraphModule and ``base``, the original-architecture model whose modules it wraps."""

    module: fx.GraphModule
    base: nn.Module
    folded: dict[str, str]  # conv name -> the BatchNorm folded into it
    act_quant: list[Any]
    weight_quant: list[Any]
    layer_inputs: list[tuple[Any, Any]]  # (Conv/Linear layer, the fake-quant of its input), in graph order
    add_inputs: list[tuple[Any, Any]]  # the fake-quants of both inputs of every residual add, in graph order

    def observe(self, on: bool) -> None:
        for q in self.act_quant:
            if on:
                q.reset()
            q.observing = on
            if not on:
                q.freeze()

    def enable(self, *, acts: bool, weights: bool) -> None:
        for q in self.act_quant:
            q.enabled = acts
        for q in self.weight_quant:
            q.enabled = weights


def prepare_qat(model: nn.Module, *, symmetric_acts: bool, per_channel: bool) -> QatModel:
    """Trace a copy of ``model``; wrap Conv(+BatchNorm) and Linear layers in fake-quant layers; add
    activation fake quantization before every layer and on both inputs of every residual add."""
    import torch
    from torch import fx, nn

    base = copy.deepcopy(model).eval()
    gm = fx.symbolic_trace(base)  # leaf modules are shared with ``base``; the wrappers replace them in gm only
    modules = dict(gm.named_modules())
    act_cls, _w_cls, conv_cls, linear_cls = _fake_quant_classes()
    folded: dict[str, str] = {}
    weights: list[Any] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if isinstance(mod, nn.Conv2d):
            users = list(node.users)
            bn_node = users[0] if len(users) == 1 and users[0].op == "call_module" \
                and isinstance(modules[users[0].target], nn.BatchNorm2d) else None
            layer = conv_cls(mod, modules[bn_node.target] if bn_node else None, per_channel)
            if bn_node is not None:
                bn_node.replace_all_uses_with(node)
                gm.graph.erase_node(bn_node)
                folded[node.target] = bn_node.target
        elif isinstance(mod, nn.Linear):
            layer = linear_cls(mod, per_channel)
        else:
            continue
        _set_module(gm, node.target, layer)
        weights.append(layer.weight_quant)
    modules = dict(gm.named_modules())

    acts: list[Any] = []
    layer_inputs: list[tuple[Any, Any]] = []
    add_inputs: list[tuple[Any, Any]] = []

    def fq_before(user: fx.Node, arg_index: int) -> Any:
        src = user.args[arg_index]
        if not isinstance(src, fx.Node):
            return None
        q = act_cls(symmetric_acts)
        name = f"qat_act_{len(acts)}"
        gm.add_submodule(name, q)
        acts.append(q)
        with gm.graph.inserting_before(user):
            fq = gm.graph.call_module(name, (src,))
        args = list(user.args)
        args[arg_index] = fq
        user.args = tuple(args)
        return q

    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), (conv_cls, linear_cls)):
            layer_inputs.append((modules[node.target], fq_before(node, 0)))
        elif node.op == "call_function" and node.target in (operator.add, torch.add) \
                and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2:
            add_inputs.append((fq_before(node, 0), fq_before(node, 1)))
    gm.graph.lint()
    gm.recompile()
    return QatModel(gm, base, folded, acts, weights, layer_inputs, add_inputs)


def exclude_layers(qm: QatModel, fp32: Any, names: tuple[str, ...]) -> None:
    """Keep the ``--exclude``d nodes of the FP32 ONNX ``fp32`` (the export of the same weights) in float in the
    fake-quant model too, so that fine-tuning and the agreement check see the graph that will be deployed. A
    Conv or Gemm is found by its weight (the export folds BatchNorm exactly as ``QatConv.folded`` does), a
    residual Add by its place among the graph's two-activation Adds."""
    from onnx import numpy_helper

    from resopt.errors import UsageError

    inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    nodes = {n.name: n for n in fp32.graph.node}
    adds = [n.name for n in fp32.graph.node if n.op_type == "Add" and not any(i in inits for i in n.input)]
    for name in names:
        node = nodes[name]
        if node.op_type in ("Conv", "Gemm") and node.input[1] in inits:
            w = inits[node.input[1]]
            matches = [(layer, fq) for layer, fq in qm.layer_inputs if _same_weight(layer, w)]
            if len(matches) == 1:
                layer, fq = matches[0]
                layer.weight_quant.skip = True
                if fq is not None:
                    fq.skip = True
                continue
        elif node.op_type == "Add" and len(adds) == len(qm.add_inputs):
            for fq in qm.add_inputs[adds.index(name)]:
                if fq is not None:
                    fq.skip = True
            continue
        raise UsageError(f"--mode qat cannot find the PyTorch layer of --exclude {name} ({node.op_type}); it can "
                         f"keep Conv, Gemm and residual Add nodes in FP32", hint="drop it from --exclude")


def _same_weight(layer: Any, w: np.ndarray) -> bool:
    import numpy as np
    import torch

    with torch.no_grad():
        mine = (layer.folded()[0] if hasattr(layer, "folded") else layer.linear.weight).float().cpu().numpy()
    return any(c.shape == mine.shape and np.allclose(c, mine, rtol=1e-4, atol=1e-6) for c in (w, w.T))


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def calibrate_ranges(qm: QatModel, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    """Observe min/max of every fake-quantized activation on the FP32 forward (as ORT calibrates)."""
    import torch

    qm.module.eval()
    qm.enable(acts=False, weights=False)
    qm.observe(True)
    with torch.no_grad():
        for x, _ in batches:
            qm.module(torch.from_numpy(x))
    qm.observe(False)
    qm.enable(acts=True, weights=True)


def export_state_dict(qm: QatModel) -> dict[str, torch.Tensor]:
    """The fine-tuned weights as a plain state dict of the original architecture (BatchNorm statistics
    unchanged: they were frozen, and export folds them exactly as training simulated)."""
    return {k: v.detach().clone() for k, v in qm.base.state_dict().items()}


def torch_infer(qm: QatModel) -> Any:
    """numpy batch -> logits of the fake-quant model (CPU, eval mode)."""
    import torch

    qm.module.eval().to("cpu")

    def infer(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return qm.module(torch.from_numpy(x)).float().numpy()

    return infer


def quantize_qat(checkpoint: Path, output: Path, cfg: QuantizeConfig, mode: ModeEntry) -> QuantizeResult:
    """``--mode qat``: PTQ baseline, fake-quant fine-tuning, export, ORT Q/DQ; reports top-1 of FP32, PTQ,
    the fake-quant PyTorch model and the deployed QAT ONNX. The ONNX is verified against the fake-quant
    model it must reproduce."""
    import tempfile
    import time

    from resopt.artifacts import checkpoint_preprocess, load_model, make_checkpoint, save_checkpoint
    from resopt.backends.ort_backend import onnx_predict
    from resopt.calib import calib_batch_size, calib_batches, save_calib_set
    from resopt.console import log
    from resopt.quantize import ort as q
    from resopt.quantize.config import QatOptions
    from resopt.quantize.pipeline import (
        EvalImages,
        Produced,
        calib_set,
        check_excluded_exist,
        check_outputs,
        export_fp32,
        open_onnx,
        static_builder,
        verify_and_write,
    )
    from resopt.train import DataOptions, fit, prepare_data
    from resopt.verify import top1_of

    t0 = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    check_outputs(output, cfg, checkpoint)
    model, ckpt = load_model(checkpoint)
    pre = checkpoint_preprocess(ckpt)
    classes = list(ckpt["classes"])
    train_cfg = cfg.mode_options(QatOptions).train_config(cfg.seed)
    data_spec = cfg.data
    assert data_spec is not None  # QatOptions.validate requires --data
    train_cfg.validate()
    with tempfile.TemporaryDirectory(prefix="resopt-qat-") as tmp_name:
        tmp = Path(tmp_name)
        src = open_onnx(export_fp32(checkpoint, tmp / "fp32.onnx", cfg), checkpoint)
        cs = calib_set(cfg, classes, ckpt.get("lineage"))
        evals = EvalImages(data_spec, pre, classes, per_class=cfg.limit_per_class, seed=cfg.seed)
        reduce_range = cfg.weights_reduce_range()
        bs = calib_batch_size(pre)

        def int8_of(fp32: Path, name: str) -> Path:
            prepped = tmp / f"{name}.prepped.onnx"
            q.preprocess_model(fp32, prepped)
            # min/max, as the fake-quant layers observe: the PyTorch model must predict this ONNX.
            ranges = q.calibrate(prepped, cs, pre, method="minmax", symmetric=cfg.target == "trt", workdir=tmp)
            out = tmp / f"{name}.int8.onnx"
            static_builder(prepped, ranges, cfg, tmp, reduce_range)(out, exclude=cfg.exclude)
            return out

        fp32_acc = _topk(src.onnx, evals())
        top1_ptq = top1_of(onnx_predict(int8_of(src.onnx, "ptq")), evals())
        log(f"qat: FP32 top-1 {fp32_acc[0]:.2f}%, PTQ INT8 {top1_ptq:.2f}%")

        qm = prepare_qat(model, symmetric_acts=cfg.target == "trt", per_channel=cfg.per_channel)
        if cfg.exclude:
            import onnx

            check_excluded_exist(src.onnx, cfg.exclude)
            exclude_layers(qm, onnx.load(str(src.onnx)), cfg.exclude)
        calibrate_ranges(qm, calib_batches(cs, pre, batch_size=bs))
        qat_opts = cfg.mode_options(QatOptions)
        # The model's recorded validation split: QAT fine-tuning never trains on its parent's val images.
        data = prepare_data(DataOptions(data_spec, cfg.limit_per_class, None, cfg.seed, qat_opts.data_path),
                            preprocess=pre, device=train_cfg.device, lineage=ckpt.get("lineage"))
        from resopt.data import check_classes

        check_classes(classes, data.classes, model_name=str(checkpoint), data=data_spec)
        fitted = fit(qm.module, data.train, data.val, train_cfg, description="qat", val_note=data.val_note)
        # Ranges follow the fine-tuned weights, as the ONNX's calibration below will.
        calibrate_ranges(qm, calib_batches(cs, pre, batch_size=bs))
        fq = torch_infer(qm)
        fq_top1 = _topk_fn(fq, evals())[0]

        state = export_state_dict(qm)
        tuned = make_checkpoint(arch=ckpt["arch"], arch_kwargs=ckpt.get("arch_kwargs", {}), state_dict=state,
                                classes=classes, preprocess=pre, lineage=list(ckpt.get("lineage", [])),
                                metrics={}, widths=ckpt.get("widths") or {})
        save_checkpoint(tuned, tmp / "qat.pt", commit=False)
        qat_int8 = int8_of(export_fp32(tmp / "qat.pt", tmp / "qat.fp32.onnx", cfg), "qat")

        produced = Produced(qat_int8, {**mode.settings(cfg, reduce_range), "qat_epochs": train_cfg.epochs},
                               reasons=dict.fromkeys(cfg.exclude, "--exclude"),
                               reference=fq, reference_name="fake-quant PyTorch model", parent_acc=fp32_acc)
        produced.options.update({"num_calib": len(cs), "calib_sha256": cs.sha256, "calib_source": cs.source,
                                 "seed": cfg.seed, "calib_preprocess": pre.to_dict(),
                                 "train": {k: getattr(train_cfg, k) for k in ("epochs", "batch_size", "lr",
                                                                             "optimizer", "weight_decay", "amp",
                                                                             "seed", "device", "select")},
                                 "data_path": fitted.data_path})
        produced.metrics.update({"top1_fp32": fp32_acc[0], "top1_ptq": round(top1_ptq, 3),
                                 "top1_qat_fakequant": round(fq_top1, 3)})
        produced.extra["qat"] = {"top1_fp32": fp32_acc[0], "top1_ptq": round(top1_ptq, 3),
                                 "top1_qat_fakequant": round(fq_top1, 3), "epochs": train_cfg.epochs,
                                 "best_epoch": fitted.best_epoch, "train_seconds": round(fitted.seconds, 1),
                                 "data_path": fitted.data_path}
        produced.excluded = cfg.exclude
        result = verify_and_write(src, output, cfg, mode, cs, evals, produced, t0=t0, lineage_parent=checkpoint)
    if cfg.save_calib is not None:
        save_calib_set(cs, cfg.save_calib)
        log(f"saved the calibration set to {cfg.save_calib}")
    return result


def _topk(model: Path, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    from resopt.backends.ort_backend import onnx_predict

    return _topk_fn(onnx_predict(model), batches)


def _topk_fn(infer: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    from resopt.metrics import TopK

    acc = TopK()
    for x, y in batches:
        acc.update(infer(x), y)
    return round(acc.top1, 3), round(acc.top5, 3)
