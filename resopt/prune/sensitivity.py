"""Layer sensitivity (Li et al. 2017, "Pruning Filters for Efficient ConvNets", section 4.1).

Each channel group is pruned alone, at several ratios, and the model's top-1 is measured on validation
images without fine-tuning. Groups whose accuracy barely moves can be pruned
harder; the proposal spends a sparsity or MACs budget greedily on the cheapest drop per saved unit and
is then checked by pruning a copy with the proposed ratios.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from resopt.console import log, progress
from resopt.prune.structured import ChannelGroup, StructuredPlan, prune_once

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class LayerSensitivity:
    group: ChannelGroup
    top1: dict[float, float]  # ratio -> top-1 (%) with only this group pruned
    macs: dict[float, int]  # ratio -> model MACs with only this group pruned
    channels_removed: dict[float, int]  # ratio -> output channels removed over the group's conv layers


@dataclass(frozen=True)
class Proposal:
    ratios: dict[str, float]  # group name -> ratio
    channel_sparsity: float
    macs: int
    top1: float  # of the copy pruned with the proposal, not fine-tuned
    reached: bool
    round_to: int | None = None  # the channel multiple the proposal was measured with (prune --round-to)

    def layer_ratios(self) -> str:
        """The proposal as a ``--layer-ratios`` value."""
        return ",".join(f"{name}={r:g}" for name, r in self.ratios.items() if r > 0)


@dataclass(frozen=True)
class SensitivityReport:
    ratios: tuple[float, ...]
    baseline_top1: float
    baseline_macs: int
    images: int
    layers: list[LayerSensitivity]
    proposal: Proposal | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ratios": list(self.ratios), "baseline_top1": round(self.baseline_top1, 3),
            "baseline_macs": self.baseline_macs, "images": self.images, "split": "val",
            "layers": [{"name": s.group.name, "channels": s.group.channels, "layers": len(s.group.members),
                        "top1_drop": {f"{r:g}": round(self.baseline_top1 - t, 3) for r, t in s.top1.items()},
                        "macs": {f"{r:g}": m for r, m in s.macs.items()}} for s in self.layers],
        }
        if self.proposal is not None:
            p = self.proposal
            out["proposal"] = {"ratios": p.ratios, "layer_ratios": p.layer_ratios(),
                               "channel_sparsity": round(p.channel_sparsity, 4), "macs": p.macs,
                               "macs_fraction": round(p.macs / self.baseline_macs, 4),
                               "top1": round(p.top1, 3), "reached": p.reached,
                               **({"round_to": p.round_to} if p.round_to else {})}
        return out


def top1_on(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    return 100.0 * correct / max(1, len(labels))


def conv_out_channels(model: nn.Module) -> int:
    """Output channels summed over conv and linear layers, the classifier excluded."""
    from torch import nn

    from resopt.prune.structured import classifier_of

    head = classifier_of(model)
    return sum(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not head)


def _spatial_sizes(model: nn.Module, input_size: int) -> dict[Any, int]:
    """Output pixels per channel of every conv (1 for linear layers), from one forward pass."""
    import torch
    from torch import nn

    sizes: dict[Any, int] = {}
    hooks = [m.register_forward_hook(lambda mod, _i, out: sizes.__setitem__(mod, out[0].numel() // out.shape[1]))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _macs_saved(pruner: Any, group: Any, sizes: dict[Any, int]) -> tuple[int, int]:
    """(MACs, conv/linear output channels) removing ``group``'s channels would save, counted per layer the
    way ``models.count_macs`` counts (output pixels x inputs per group x kernel area)."""
    from torch import nn

    removed: dict[Any, list[int]] = {}
    for dep, idxs in group:
        m = dep.target.module
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        r = removed.setdefault(m, [0, 0])
        if pruner.DG.is_out_channel_pruning_fn(dep.handler):
            r[0] = max(r[0], len(idxs))
        elif pruner.DG.is_in_channel_pruning_fn(dep.handler):
            r[1] = max(r[1], len(idxs))
    macs = channels = 0
    for m, (out_cut, in_cut) in removed.items():
        channels += out_cut
        if isinstance(m, nn.Linear):
            macs += m.out_features * m.in_features - (m.out_features - out_cut) * (m.in_features - in_cut)
            continue
        kk = m.kernel_size[0] * m.kernel_size[1]
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:  # depthwise: channels go as one
            macs += sizes[m] * max(out_cut, in_cut) * kk
        else:
            per_group_in = m.in_channels // m.groups
            new_per_group_in = (m.in_channels - in_cut) // m.groups
            macs += sizes[m] * kk * (m.out_channels * per_group_in - (m.out_channels - out_cut) * new_per_group_in)
    return macs, channels


def analyze_sensitivity(model: nn.Module, groups: list[ChannelGroup], images: torch.Tensor, labels: torch.Tensor,
                        *, input_size: int, ratios: tuple[float, ...] = (0.25, 0.5, 0.75), p: int = 1,
                        target_sparsity: float | None = None, target_macs: int | None = None,
                        round_to: int | None = None) -> SensitivityReport:
    """Measure every group's top-1 at ``ratios`` and, given a target, propose per-group ratios (measured as
    ``prune --layer-ratios ... --round-to round_to`` would prune them).

    A probe zeroes the group's lowest-norm channels completely (filters, biases and batch-norm scale and
    shift), which makes them exactly zero wherever they flow: the logits are those of the model with the
    channels removed, without copying the model and re-tracing its graph for every probe.
    """
    import torch

    from resopt.models import count_macs
    from resopt.prune.structured import build_pruner, iter_groups, zero_channels

    model.eval()
    base_top1 = top1_on(model, images, labels)
    base_macs = count_macs(model, input_size)
    base_channels = conv_out_channels(model)
    sizes = _spatial_sizes(model, input_size)
    pruner = build_pruner(model, input_size, p=p, ratio=0.0, global_=False, ratio_dict=None, round_to=None, steps=1)
    names = {m: n for n, m in model.named_modules()}
    tp_groups = {names[g[0].dep.target.module]: g for g in iter_groups(pruner)}
    saved_state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = []
    with progress("sensitivity", total=len(groups) * len(ratios)) as bar:
        for g in groups:
            full = tp_groups[g.root]
            order = torch.argsort(pruner.estimate_importance(full).cpu())
            root, handler = full[0].dep.target.module, full[0].dep.handler
            top1, macs, removed = {}, {}, {}
            for r in ratios:
                # Torch-Pruning's own count for a local ratio, capped so one channel stays.
                k = min(g.channels - int(g.channels * (1 - r)), g.channels - 1)
                group = pruner.DG.get_pruning_group(root, handler, order[:k].tolist())
                zero_channels(pruner, group, filters_only=False)
                top1[r] = top1_on(model, images, labels)
                saved, channels = _macs_saved(pruner, group, sizes)
                macs[r], removed[r] = base_macs - saved, channels
                model.load_state_dict(saved_state)
                bar.advance(1)
            layers.append(LayerSensitivity(g, top1, macs, removed))
            log(f"  {g.name:<28} {g.channels:>5} ch  " +
                "  ".join(f"{r:g}: {base_top1 - t:+.2f}" for r, t in top1.items()))
    proposal = None
    if target_sparsity is not None or target_macs is not None:
        proposal = _propose(model, groups, layers, images, labels, input_size=input_size, p=p,
                            base_top1=base_top1, base_macs=base_macs, base_channels=base_channels,
                            target_sparsity=target_sparsity, target_macs=target_macs, round_to=round_to)
    return SensitivityReport(tuple(ratios), base_top1, base_macs, len(labels), layers, proposal)


def _propose(model: nn.Module, groups: list[ChannelGroup], layers: list[LayerSensitivity], images: Any,
             labels: Any, *, input_size: int, p: int, base_top1: float, base_macs: int, base_channels: int,
             target_sparsity: float | None, target_macs: int | None, round_to: int | None) -> Proposal:
    """Greedy: raise the group whose next measured ratio costs the least top-1 per unit saved, until a
    copy pruned with the chosen ratios meets the target (savings are not exactly additive, so the
    estimate only decides when to check)."""
    from resopt.models import count_macs

    level = {s.group.root: 0 for s in layers}  # index into (0,) + ratios
    steps = (0.0,) + tuple(layers[0].top1) if layers else (0.0,)

    def saving(s: LayerSensitivity, r: float) -> float:
        if r == 0.0:
            return 0.0
        return (base_macs - s.macs[r]) if target_macs is not None else float(s.channels_removed[r])

    def drop(s: LayerSensitivity, r: float) -> float:
        return 0.0 if r == 0.0 else max(0.0, base_top1 - s.top1[r])

    need = (base_macs - target_macs) if target_macs is not None else base_channels * (target_sparsity or 0.0)

    def measure() -> tuple[nn.Module, int, float]:
        probe = copy.deepcopy(model)
        plan = StructuredPlan(p=p, round_to=round_to,
                              group_ratios={s.group.root: steps[level[s.group.root]] for s in layers})
        prune_once(probe, plan, groups, input_size)
        return probe, count_macs(probe, input_size), 1.0 - conv_out_channels(probe) / base_channels

    def met(macs: int, sparsity: float) -> bool:
        return macs <= target_macs if target_macs is not None else sparsity >= (target_sparsity or 0.0) - 1e-9

    probe, macs, sparsity = measure()
    while not met(macs, sparsity):
        best, best_cost = None, float("inf")
        for s in layers:
            i = level[s.group.root]
            if i + 1 >= len(steps):
                continue
            gain = saving(s, steps[i + 1]) - saving(s, steps[i])
            if gain <= 0:
                continue
            # 1e-3 points per unit keeps zero-drop layers ordered by how much they save.
            cost = (drop(s, steps[i + 1]) - drop(s, steps[i]) + 1e-3) / gain
            if cost < best_cost:
                best, best_cost = s, cost
        if best is None:
            break
        level[best.group.root] += 1
        estimate = sum(saving(s, steps[level[s.group.root]]) for s in layers)
        if estimate >= need:
            probe, macs, sparsity = measure()
    probe, macs, sparsity = measure()
    ratios = {s.group.name: steps[level[s.group.root]] for s in layers}
    return Proposal(ratios, sparsity, macs, top1_on(probe, images, labels), met(macs, sparsity), round_to)
