"""Structured pruning through Torch-Pruning's dependency graph: whole channels leave every coupled layer.

A *channel group* is the set of layers whose channels must be removed together: a block's inner conv and
its batch norm and the next conv's inputs, or, for a residual stage, the stem/shortcut/last convs of every
block plus the batch norms and SE gates on the same residual width. Pruning is planned per group (local:
each group loses ``ratio`` of its channels) or across groups (global: one threshold on normalised
importance). The classifier's outputs (the class count) are never pruned; its inputs follow the last group.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resopt.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

# A group keeps at least one channel; global ranking may take up to this fraction of all channels.
MAX_RATIO = 0.95


@dataclass(frozen=True)
class ChannelGroup:
    """One prunable group: named after its first conv/linear layer in module order."""

    name: str
    root: str  # the module Torch-Pruning roots the group at (the key of its per-group ratio)
    members: tuple[str, ...]  # conv/linear layers whose output channels are the group's channels
    channels: int


@dataclass(frozen=True)
class StructuredPlan:
    """How to prune: importance norm, local or global ranking, uniform or per-group ratios, rounding."""

    p: int = 1  # 1: L1 norm, 2: L2 norm of the group's weights
    ratio: float = 0.0  # fraction of channels removed (uniform, or the global total)
    global_: bool = False
    group_ratios: dict[str, float] = field(default_factory=dict)  # root -> ratio; overrides ``ratio``
    round_to: int | None = None


def classifier_of(model: nn.Module) -> nn.Module:
    """The layer producing the logits: the last linear layer (the last conv for all-conv models)."""
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]


def _example(input_size: int) -> Any:
    import torch

    return torch.zeros(1, 3, input_size, input_size)


def build_pruner(model: nn.Module, input_size: int, *, p: int, ratio: float, global_: bool,
            ratio_dict: dict[Any, float] | None, round_to: int | None, steps: int) -> Any:
    import warnings

    import torch_pruning as tp

    with warnings.catch_warnings():
        # Torch-Pruning warns about ops it traces through but does not prune (pooling, flatten).
        warnings.simplefilter("ignore")
        return tp.pruner.BasePruner(
            model, _example(input_size), tp.importance.GroupMagnitudeImportance(p=p),
            global_pruning=global_, pruning_ratio=ratio, pruning_ratio_dict=ratio_dict,
            max_pruning_ratio=MAX_RATIO, iterative_steps=steps, round_to=round_to,
            ignored_layers=[classifier_of(model)])


def iter_groups(pruner: Any) -> Iterator[Any]:
    return pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                    root_module_types=pruner.root_module_types)


def channel_groups(model: nn.Module, input_size: int) -> list[ChannelGroup]:
    """The model's prunable channel groups, in module order."""
    from torch import nn

    pruner = build_pruner(model, input_size, p=1, ratio=0.0, global_=False, ratio_dict=None, round_to=None, steps=1)
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in iter_groups(pruner):
        root = group[0].dep.target.module
        members = sorted({dep.target.module for dep, _ in group
                          if pruner.DG.is_out_channel_pruning_fn(dep.handler)
                          and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))}, key=order.__getitem__)
        if not members:
            continue
        groups.append(ChannelGroup(name=names[members[0]], root=names[root],
                                   members=tuple(names[m] for m in members), channels=len(group[0].idxs)))
    by_name = dict(model.named_modules())
    return sorted(groups, key=lambda g: order[by_name[g.name]])


def make_pruner(model: nn.Module, plan: StructuredPlan, groups: list[ChannelGroup], input_size: int, *,
                steps: int = 1) -> Any:
    """A Torch-Pruning pruner for ``plan``; ``steps`` > 1 spreads the ratios over that many ``step()`` calls."""
    if plan.global_:
        return build_pruner(model, input_size, p=plan.p, ratio=plan.ratio, global_=True, ratio_dict=None,
                       round_to=plan.round_to, steps=steps)
    modules = dict(model.named_modules())
    ratios = plan.group_ratios or {g.root: plan.ratio for g in groups}
    ratio_dict = {}
    # Torch-Pruning leaves a group untouched when the ratio would remove all of its channels (a 4-channel
    # group at 0.8 keeps int(0.8) = 0, and --round-to 8 rounds 5 kept channels down to 0); cap each
    # group's ratio so it keeps one channel, or one multiple of --round-to.
    min_keep = plan.round_to or 1
    for g in groups:
        r = ratios.get(g.root, 0.0)
        if r > 0 and g.channels > min_keep:
            ratio_dict[modules[g.root]] = min(r, 1.0 - min_keep / g.channels - 1e-9)
    return build_pruner(model, input_size, p=plan.p, ratio=0.0, global_=False, ratio_dict=ratio_dict,
                   round_to=plan.round_to, steps=steps)


def prune_once(model: nn.Module, plan: StructuredPlan, groups: list[ChannelGroup], input_size: int) -> None:
    """One-shot structured pruning of ``model`` in place."""
    make_pruner(model, plan, groups, input_size).step()


def search_ratio(model: nn.Module, plan: StructuredPlan, groups: list[ChannelGroup], input_size: int,
                 target_macs: int, *, tolerance: float = 0.005) -> tuple[float, int]:
    """The smallest channel ratio whose one-shot prune leaves at most ``target_macs`` (bisection to
    ``tolerance``: half a percent of the channels, below one channel for groups under 200 wide).

    Returns the ratio and the MACs it leaves. Each probe prunes a copy, so ``model`` is untouched.
    """
    from resopt.models import count_macs

    def macs_at(ratio: float) -> int:
        probe = copy.deepcopy(model)
        prune_once(probe, StructuredPlan(p=plan.p, ratio=ratio, global_=plan.global_, round_to=plan.round_to),
                   groups, input_size)
        return count_macs(probe, input_size)

    # MACs fall with the ratio, except near the top in global mode, where a group that would lose every
    # channel is left whole: step down until a ratio reaches the target, then bisect below it.
    lo, fewest = 0.0, macs_at(MAX_RATIO)
    for hi in (MAX_RATIO, 0.9, 0.8, 0.7, 0.6):
        macs_hi = fewest if hi == MAX_RATIO else macs_at(hi)
        fewest = min(fewest, macs_hi)
        if macs_hi <= target_macs:
            break
    else:
        base = count_macs(model, input_size)
        hint = f"--round-to {plan.round_to} keeps layers narrower than that whole; lower it" if plan.round_to \
            else "ask for a larger --target-macs fraction"
        raise UsageError(f"--target-macs {target_macs / base:.3g} is out of reach: no channel ratio up to "
                         f"{MAX_RATIO:.0%} leaves fewer than {fewest / base:.3f} of the MACs", hint=hint)
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        macs_mid = macs_at(mid)
        if macs_mid <= target_macs:
            hi, macs_hi = mid, macs_mid
        else:
            lo = mid
    return hi, macs_hi


# ------------------------------------------------------------------------------------ --layer-ratios


def _blocks(model: nn.Module) -> list[str]:
    # Residual blocks carry torchvision's ``expansion`` class attribute (BasicBlock, Bottleneck and
    # resopt's CIFAR blocks all do), which is what tells a block from any other container.
    return [n for n, m in model.named_modules() if n and hasattr(type(m), "expansion")]


def _stages(model: nn.Module) -> list[str]:
    from torch import nn

    return [n for n, m in model.named_modules()
            if n and isinstance(m, nn.Sequential) and len(m) and all(hasattr(type(c), "expansion") for c in m)]


def _matches(key: str, member: str) -> bool:
    return member == key or member.startswith(key + ".")


def resolve_layer_ratios(model: nn.Module, groups: list[ChannelGroup], spec: str) -> dict[str, float]:
    """``--layer-ratios`` as a ratio per group root.

    ``spec`` is either ``name=ratio`` pairs (a layer, block or stage name; the most specific name wins) or
    a bare list with one value per stage, per residual block, or per channel group (as ``--analyze``
    lists them). A group that spans several blocks (a stage's residual width) takes the ratio of the first
    of its layers that a name covers; groups no name covers are not pruned.
    """
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UsageError("--layer-ratios is empty", hint="e.g. --layer-ratios 0.1,0.2,0.3 (one per stage)")
    named = ["=" in s for s in items]
    if any(named) and not all(named):
        raise UsageError(f"--layer-ratios {spec!r} mixes name=ratio pairs and bare values; use one form")
    keyed: dict[str, float] = {}
    if all(named):
        for item in items:
            key, _, value = item.partition("=")
            keyed[key.strip()] = _ratio(value, item)
        known = [m for g in groups for m in g.members]
        for key in keyed:
            if not any(_matches(key, m) for m in known):
                raise UsageError(f"--layer-ratios names {key!r}, which holds no prunable layer; prunable layers: "
                                 f"{', '.join(g.name for g in groups[:12])}{', ...' if len(groups) > 12 else ''}",
                                 hint="resopt prune MODEL.pt --analyze --data DATA lists them")
    else:
        values = [_ratio(v, v) for v in items]
        stages, blocks = _stages(model), _blocks(model)
        for names in (stages, blocks, [g.name for g in groups]):
            if names and len(values) == len(names):
                keyed = dict(zip(names, values, strict=True))
                break
        else:
            counts = [f"{len(stages)} (one per stage: {', '.join(stages)})"] if stages else []
            counts += [f"{len(blocks)} (one per residual block)"] if blocks else []
            counts.append(f"{len(groups)} (one per prunable layer)")
            raise UsageError(f"--layer-ratios has {len(values)} values; this model takes {' or '.join(counts)}, "
                             f"or name=ratio pairs",
                             hint="resopt prune MODEL.pt --analyze --data DATA lists the layers")
    ratios: dict[str, float] = {}
    for g in groups:
        for member in g.members:
            hits = [k for k in keyed if _matches(k, member)]
            if hits:
                ratios[g.root] = keyed[max(hits, key=len)]
                break
    return ratios


def _ratio(text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--layer-ratios entry {item!r} is not a number") from None
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise UsageError(f"--layer-ratios entry {item!r} must be in [0, 1)")
    return value


# ------------------------------------------------------------------------------ soft filter pruning


def zero_channels(pruner: Any, group: Any, *, filters_only: bool) -> None:
    """Zero the group's channels: the conv/linear filters (and biases); with ``filters_only=False`` also
    the batch-norm scale and shift, after which the channel is exactly zero everywhere it flows."""
    import torch
    from torch import nn

    with torch.no_grad():
        for dep, idxs in group:
            if not pruner.DG.is_out_channel_pruning_fn(dep.handler):
                continue
            m = dep.target.module
            idx = torch.as_tensor(list(idxs), dtype=torch.long)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[idx.to(m.weight.device)] = 0
                if m.bias is not None:
                    m.bias[idx.to(m.bias.device)] = 0
            elif isinstance(m, nn.BatchNorm2d) and not filters_only and m.affine:
                m.weight[idx.to(m.weight.device)] = 0
                m.bias[idx.to(m.bias.device)] = 0


class SoftFilterHook:
    """Soft filter pruning (He et al. 2018) as a ``fit`` hook.

    After every epoch the lowest-norm channels of each group (by the plan's ratio, local or global) have
    their filters zeroed. The batch norms are left alone, so their gradient can grow a zeroed filter back
    if the data wants it: the pruned set may change from epoch to epoch until training ends.
    """

    def __init__(self, model: nn.Module, plan: StructuredPlan, groups: list[ChannelGroup], input_size: int) -> None:
        self.pruner = make_pruner(model, plan, groups, input_size)
        self.epochs_zeroed = 0

    def _selected(self) -> list[Any]:
        self.pruner.reset()
        return list(self.pruner.step(interactive=True))

    def zero(self) -> int:
        groups = self._selected()
        for group in groups:
            zero_channels(self.pruner, group, filters_only=True)
        return sum(len(g[0].idxs) for g in groups)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.zero()
        self.epochs_zeroed += 1

    def remove(self, model: nn.Module, probe: Any) -> float:
        """Zero the selected channels completely, then remove them; returns the largest logit change the
        removal caused on ``probe`` (it is exact up to float rounding, since the channels are all-zero)."""
        import torch

        selected = []
        for group in self._selected():
            zero_channels(self.pruner, group, filters_only=False)
            selected.append((group[0].dep.target.module, group[0].dep.handler, [int(i) for i in group[0].idxs]))
        model.eval()
        with torch.no_grad():
            before = model(probe)
        # Remove exactly the channels just zeroed: re-ranking would count the consumers' input weights,
        # which zeroing leaves alone, and could pick other channels.
        for module, handler, idxs in selected:
            self.pruner.DG.get_pruning_group(module, handler, idxs).prune()
        with torch.no_grad():
            after = model(probe)
        return float((after - before).abs().max())
