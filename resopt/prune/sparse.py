"""Weight-level sparsity: magnitude masks (``l1-unstruct``) and the 2:4 pattern, kept through fine-tuning.

Masks are plain boolean tensors applied to the weights in place; nothing is re-parametrised, so the
fine-tuned weights already hold their zeros ("folded") and the checkpoint loads into the dense
architecture unchanged. ``MaskHook`` re-applies the masks after every optimizer step (momentum and
weight decay would otherwise revive pruned weights) through ``fit``'s hooks.

Dense kernels multiply zeros like any other number: neither kind of sparsity makes a model faster on
onnxruntime or cuDNN. 2:4 is the layout TensorRT's sparse tensor-core kernels accept (Ampere and newer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    reason: str


def sparse_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    """The conv and linear layers whose weights weight-level pruning may zero (all of them)."""
    from torch import nn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def magnitude_masks(model: nn.Module, sparsity: float, *, global_: bool = False) -> dict[str, torch.Tensor]:
    """Masks zeroing the ``sparsity`` fraction of smallest-magnitude weights, per layer or across layers.

    Counts are exact (``round(n * sparsity)`` weights per layer, or in total when global): ranking by
    ``topk`` rather than a threshold keeps ties from over-pruning layers full of equal (zero) weights.
    """
    import torch

    layers = sparse_layers(model)
    masks: dict[str, torch.Tensor] = {}
    if global_:
        flat = torch.cat([m.weight.detach().abs().flatten() for _, m in layers])
        n_prune = int(round(flat.numel() * sparsity))
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        if n_prune:
            keep[torch.topk(flat, n_prune, largest=False).indices] = False
        offset = 0
        for name, m in layers:
            n = m.weight.numel()
            masks[name] = keep[offset:offset + n].view_as(m.weight)
            offset += n
        return masks
    for name, m in layers:
        w = m.weight.detach().abs().flatten()
        keep = torch.ones(w.numel(), dtype=torch.bool)
        n_prune = int(round(w.numel() * sparsity))
        if n_prune:
            keep[torch.topk(w, n_prune, largest=False).indices] = False
        masks[name] = keep.view_as(m.weight)
    return masks


def _in_channel_rows(weight: torch.Tensor) -> torch.Tensor:
    """View a conv (O, I, kh, kw) or linear (O, I) weight as rows of 4 consecutive input channels.

    TensorRT's structured-sparse kernels group weights along the input-channel (C) axis of the KCRS
    layout, so the 4-groups run over I for every (output, kh, kw) position.
    """
    if weight.ndim == 4:
        return weight.permute(0, 2, 3, 1).reshape(-1, 4)
    return weight.reshape(-1, 4)


def _from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.ndim == 4:
        o, i, kh, kw = like.shape
        return rows.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
    return rows.reshape(like.shape)


def nm_eligible(model: nn.Module) -> tuple[list[tuple[str, nn.Conv2d | nn.Linear]], list[SkippedLayer]]:
    """Layers 2:4 can apply to (input channels per group a multiple of 4) and the skipped ones, with why."""
    from torch import nn

    eligible: list[tuple[str, nn.Conv2d | nn.Linear]] = []
    skipped: list[SkippedLayer] = []
    for name, m in sparse_layers(model):
        if isinstance(m, nn.Conv2d):
            per_group = m.in_channels // m.groups
            if m.groups != 1:
                skipped.append(SkippedLayer(name, f"grouped conv ({m.groups} groups, {per_group} input "
                                                  f"channel{'s' if per_group != 1 else ''} per group)"))
                continue
            if per_group % 4:
                skipped.append(SkippedLayer(name, f"{per_group} input channels, not a multiple of 4"))
                continue
        elif m.in_features % 4:
            skipped.append(SkippedLayer(name, f"{m.in_features} input features, not a multiple of 4"))
            continue
        eligible.append((name, m))
    return eligible, skipped


def nm_masks(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[SkippedLayer]]:
    """2:4 masks: in every group of 4 consecutive input-channel weights, keep the 2 of largest magnitude."""
    import torch

    eligible, skipped = nm_eligible(model)
    masks: dict[str, torch.Tensor] = {}
    for name, m in eligible:
        rows = _in_channel_rows(m.weight.detach().abs())
        keep = torch.zeros_like(rows, dtype=torch.bool)
        keep.scatter_(1, torch.topk(rows, 2, dim=1).indices, True)
        masks[name] = _from_rows(keep, m.weight).contiguous()
    return masks, skipped


def nm_violations(model: nn.Module) -> list[str]:
    """Eligible layers where some group of 4 input-channel weights has more than 2 non-zeros."""
    eligible, _ = nm_eligible(model)
    bad = []
    for name, m in eligible:
        rows = _in_channel_rows(m.weight.detach())
        if int(((rows != 0).sum(dim=1) > 2).sum()):
            bad.append(name)
    return bad


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    import torch

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            w = modules[name].weight
            w.mul_(mask.to(device=w.device, dtype=w.dtype))


def weight_sparsity(model: nn.Module) -> tuple[int, int]:
    """(zero weights, total weights) over the conv and linear weights."""
    zeros = total = 0
    for _, m in sparse_layers(model):
        total += m.weight.numel()
        zeros += int((m.weight == 0).sum())
    return zeros, total


class MaskHook:
    """``fit`` hook: re-zero the masked weights after every optimizer step."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        modules = dict(model.named_modules())
        # Parameters keep their identity through fit (``.to`` and ``load_state_dict`` work in place), so
        # pairs resolved once stay valid; masks follow the weights to the training device on first use.
        self._pairs = [(modules[name].weight, mask) for name, mask in masks.items()]

    def on_step_end(self, model: nn.Module) -> None:
        import torch

        with torch.no_grad():
            for i, (w, mask) in enumerate(self._pairs):
                if mask.device != w.device or mask.dtype != w.dtype:
                    mask = mask.to(device=w.device, dtype=w.dtype)
                    self._pairs[i] = (w, mask)
                w.mul_(mask)
