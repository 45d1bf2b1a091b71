"""Quantization-aware training: fine-tune a checkpoint with the INT8 rounding of its deployed graph simulated
in the forward pass, so the weights learn to sit where the quantization grid puts them.

The simulated model mirrors what ``resopt quantize --mode int8`` deploys with onnxruntime:

- BatchNorm is folded into the preceding convolution first (frozen statistics, as in the exported graph),
  so the weights that are fake-quantized are the ones that will be stored;
- weights: symmetric int8 per output channel (or per tensor), scale ``max|w| / 127``, recomputed each step;
- activations: the inputs of every Conv/Linear and both inputs of every residual add, per tensor, with
  ranges calibrated (min/max) on the calibration images and then frozen; uint8 asymmetric for the cpu
  target, int8 symmetric for trt;
- the straight-through estimator passes gradients through the rounding (``torch.fake_quantize_*``).

Training is ``resopt.train.fit`` (epochs, lr, AMP, seed). Afterwards the folded weights go back into a
plain checkpoint of the original architecture (BatchNorm set to the identity plus the folded bias), which
``resopt.export.export_onnx`` exports and the ORT pipeline quantizes with the same calibration set; the
activation ranges are re-calibrated on the fine-tuned weights in both the PyTorch model and the ONNX, so the
fake-quant PyTorch top-1 predicts the deployed one.
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


def _act_fake_quant_cls() -> type:
    import torch
    from torch import nn

    class _ActFakeQuant(nn.Module):
        """Per-tensor activation fake quantization with min/max observation, then frozen ranges."""

        def __init__(self, symmetric: bool) -> None:
            super().__init__()
            self.symmetric = symmetric
            self.observing = False
            self.enabled = False
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
            if not self.enabled:
                return x
            qmin, qmax = (-127, 127) if self.symmetric else (0, 255)
            y = torch.fake_quantize_per_tensor_affine(x.float(), self.scale, self.zero_point, qmin, qmax)
            return y.to(x.dtype)

    return _ActFakeQuant


def _weight_fake_quant_cls() -> type:
    import torch
    from torch import nn

    class _WeightFakeQuant(nn.Module):
        """A parametrization: the weight as its symmetric int8 rounding (per output channel or per tensor)."""

        def __init__(self, per_channel: bool) -> None:
            super().__init__()
            self.per_channel = per_channel
            self.enabled = True

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return w
            wf = w.float()
            if self.per_channel:
                amax = wf.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
                zp = torch.zeros_like(amax, dtype=torch.int32)
                return torch.fake_quantize_per_channel_affine(wf, amax / 127.0, zp, 0, -127, 127).to(w.dtype)
            amax = wf.detach().abs().max().clamp_min(1e-12)
            return torch.fake_quantize_per_tensor_affine(wf, amax / 127.0, torch.tensor(0, dtype=torch.int32),
                                                         -127, 127).to(w.dtype)

    return _WeightFakeQuant


@dataclass
class QatModel:
    """The fake-quant GraphModule and how to map it back to the original architecture."""

    module: fx.GraphModule
    folded: dict[str, str]  # conv name -> the BatchNorm folded into it
    act_quant: list[Any]
    weight_quant: list[Any]

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
    """Trace ``model`` (eval mode), fold Conv+BatchNorm pairs, add weight and activation fake quantization."""
    import torch
    from torch import fx, nn
    from torch.nn.utils import parametrize
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    folded: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"
                and isinstance(modules[prev.target], nn.Conv2d) and len(prev.users) == 1):
            continue
        fused = fuse_conv_bn_eval(modules[prev.target], modules[node.target])
        _set_module(gm, prev.target, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded[prev.target] = node.target
    modules = dict(gm.named_modules())

    act_cls, w_cls = _act_fake_quant_cls(), _weight_fake_quant_cls()
    acts: list[Any] = []
    weights: list[Any] = []

    def fq_before(user: fx.Node, arg_index: int) -> None:
        src = user.args[arg_index]
        if not isinstance(src, fx.Node):
            return
        q = act_cls(symmetric_acts)
        name = f"qat_act_{len(acts)}"
        gm.add_submodule(name, q)
        acts.append(q)
        with gm.graph.inserting_before(user):
            fq = gm.graph.call_module(name, (src,))
        args = list(user.args)
        args[arg_index] = fq
        user.args = tuple(args)

    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), (nn.Conv2d, nn.Linear)):
            fq_before(node, 0)
            layer = modules[node.target]
            if not parametrize.is_parametrized(layer, "weight"):
                wq = w_cls(per_channel)
                parametrize.register_parametrization(layer, "weight", wq)
                weights.append(wq)
        elif node.op == "call_function" and node.target in (operator.add, torch.add) \
                and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2:
            fq_before(node, 0)
            fq_before(node, 1)
    gm.graph.lint()
    gm.recompile()
    return QatModel(gm, folded, acts, weights)


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


def export_state_dict(qm: QatModel, original: nn.Module) -> dict[str, torch.Tensor]:
    """The fine-tuned weights as a state dict of ``original``'s architecture.

    A folded conv's weight and bias go back as the conv's weight and the BatchNorm's bias; the BatchNorm
    becomes the identity (weight 1, mean 0, variance 1 - eps), so exporting it folds back to exactly the
    trained conv.
    """
    import torch
    from torch.nn.utils import parametrize

    def float_weight(m: torch.nn.Module) -> torch.Tensor:
        # The trained float weight, not its fake-quantized view: ORT quantizes it once more, identically.
        if parametrize.is_parametrized(m, "weight"):
            return m.parametrizations["weight"].original.detach().clone()
        return m.weight.detach().clone()

    mods = dict(qm.module.named_modules())
    state = {k: v.clone() for k, v in original.state_dict().items()}
    for name, m in mods.items():
        if name and f"{name}.weight" in state and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            state[f"{name}.weight"] = float_weight(m)
            if m.bias is not None and f"{name}.bias" in state:
                state[f"{name}.bias"] = m.bias.detach().clone()
    for conv, bn in qm.folded.items():
        c = mods[conv]
        bn_mod = original.get_submodule(bn)
        state[f"{bn}.weight"] = torch.ones_like(state[f"{bn}.weight"])
        state[f"{bn}.bias"] = c.bias.detach().clone()
        state[f"{bn}.running_mean"] = torch.zeros_like(state[f"{bn}.running_mean"])
        state[f"{bn}.running_var"] = torch.full_like(state[f"{bn}.running_var"], 1.0 - bn_mod.eps)
    for name, m in mods.items():  # layers outside the registry's names (none today) would be lost: refuse
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not name.startswith("qat_") \
                and f"{name}.weight" not in state:
            raise RuntimeError(f"QAT layer {name} has no place in the original state dict")
    return state


def torch_infer(qm: QatModel) -> Any:
    """numpy batch -> logits of the fake-quant model (CPU, eval mode)."""
    import torch

    qm.module.eval().to("cpu")

    def infer(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return qm.module(torch.from_numpy(x)).float().numpy()

    return infer


def default_train_config(seed: int) -> Any:
    """A short fine-tune at a tenth of ``train``'s learning rate, without warm-up: the weights only
    need to move by about one quantization step, and a full-size lr would undo the training."""
    from resopt.train import TrainConfig

    return TrainConfig(epochs=3, batch_size=128, lr=0.01, warmup_epochs=0.0, seed=seed)


def quantize_qat(checkpoint: Path, output: Path, cfg: Any) -> Any:
    """``--mode qat``: PTQ baseline, fake-quant fine-tuning, export, ORT Q/DQ; reports top-1 of FP32, PTQ,
    the fake-quant PyTorch model and the deployed QAT ONNX. The ONNX is verified against the fake-quant
    model it must reproduce."""
    import tempfile
    import time

    from resopt import quantize as Q
    from resopt.artifacts import check_output_path, checkpoint_preprocess, make_checkpoint, save_checkpoint
    from resopt.calib import calib_batch_size, calib_batches
    from resopt.console import log
    from resopt.quantize import ort as q
    from resopt.quantize.guard import top1_of
    from resopt.train import DataOptions, fit, load_model, prepare_data

    t0 = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    check_output_path(output, checkpoint, suffixes=(".onnx",))
    model, ckpt = load_model(checkpoint)
    pre = checkpoint_preprocess(ckpt)
    classes = list(ckpt["classes"])
    train_cfg = cfg.train or default_train_config(cfg.seed)
    train_cfg.validate()
    with tempfile.TemporaryDirectory(prefix="resopt-qat-") as tmp_name:
        tmp = Path(tmp_name)
        src = Q._open_onnx(Q._export(checkpoint, tmp / "fp32.onnx", cfg), checkpoint)
        cs = Q._calib_set(cfg, classes)
        evals = Q.EvalImages(cfg.data, pre, classes, per_class=cfg.limit_per_class, seed=cfg.seed)
        reduce_range = q.default_reduce_range() if cfg.reduce_range is None else cfg.reduce_range
        bs = calib_batch_size(pre)

        def int8_of(fp32: Path, name: str) -> Path:
            prepped = tmp / f"{name}.prepped.onnx"
            q.preprocess_model(fp32, prepped)
            ranges = q.calibrate(prepped, cs, pre, method=cfg.calib_method, symmetric=cfg.target == "trt",
                                 workdir=tmp)
            out = tmp / f"{name}.int8.onnx"
            Q.static_builder(prepped, ranges, cfg, tmp, reduce_range)(out, exclude=cfg.exclude)
            return out

        fp32_acc = _topk(src.onnx, evals())
        top1_ptq = top1_of(int8_of(src.onnx, "ptq"), evals())
        log(f"qat: FP32 top-1 {fp32_acc[0]:.2f}%, PTQ INT8 {top1_ptq:.2f}%")

        qm = prepare_qat(model, symmetric_acts=cfg.target == "trt", per_channel=cfg.per_channel)
        calibrate_ranges(qm, calib_batches(cs, pre, batch_size=bs))
        data = prepare_data(DataOptions(cfg.data, cfg.limit_per_class, None, cfg.seed), preprocess=pre)
        from resopt.data import check_classes

        check_classes(classes, data.classes, model_name=str(checkpoint), data=cfg.data)
        fitted = fit(qm.module, data.train, data.eval, train_cfg, description="qat")
        # Ranges follow the fine-tuned weights, as the ONNX's calibration below will.
        calibrate_ranges(qm, calib_batches(cs, pre, batch_size=bs))
        fq = torch_infer(qm)
        fq_top1 = _topk_fn(fq, evals())[0]

        state = export_state_dict(qm, model)
        tuned = make_checkpoint(arch=ckpt["arch"], arch_kwargs=ckpt.get("arch_kwargs", {}), state_dict=state,
                                classes=classes, preprocess=pre, lineage=list(ckpt.get("lineage", [])),
                                metrics={}, widths=ckpt.get("widths") or {})
        save_checkpoint(tuned, tmp / "qat.pt")
        qat_int8 = int8_of(Q._export(tmp / "qat.pt", tmp / "qat.fp32.onnx", cfg), "qat")

        produced = Q._Produced(qat_int8, {**Q._settings(cfg, reduce_range), "qat_epochs": train_cfg.epochs},
                               reasons=dict.fromkeys(cfg.exclude, "--exclude"),
                               reference=fq, reference_name="fake-quant PyTorch model", parent_acc=fp32_acc)
        produced.options.update({"num_calib": len(cs), "calib_sha256": cs.sha256, "calib_source": cs.source,
                                 "seed": cfg.seed, "calib_preprocess": pre.to_dict(),
                                 "train": {k: getattr(train_cfg, k) for k in ("epochs", "batch_size", "lr",
                                                                             "optimizer", "weight_decay", "amp",
                                                                             "seed")}})
        produced.metrics.update({"top1_fp32": fp32_acc[0], "top1_ptq": round(top1_ptq, 3),
                                 "top1_qat_fakequant": round(fq_top1, 3)})
        produced.extra["qat"] = {"top1_fp32": fp32_acc[0], "top1_ptq": round(top1_ptq, 3),
                                 "top1_qat_fakequant": round(fq_top1, 3), "epochs": train_cfg.epochs,
                                 "best_epoch": fitted.best_epoch, "train_seconds": round(fitted.seconds, 1)}
        produced.excluded = cfg.exclude
        return Q._verify_and_write(src, output, cfg, cs, evals, produced, t0=t0, lineage_parent=checkpoint)


def _topk(model: Path, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    from resopt.quantize import ort_infer

    return _topk_fn(ort_infer(model), batches)


def _topk_fn(infer: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    from resopt.metrics import TopK

    acc = TopK()
    for x, y in batches:
        acc.update(infer(x), y)
    return round(acc.top1, 3), round(acc.top5, 3)
