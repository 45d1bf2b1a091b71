"""Block (depth) pruning: remove whole residual blocks whose shortcut is the identity.

A deep, narrow CIFAR ResNet's channels (16/32/64) are already at the bottom of what INT8 and AMX kernels fill,
so removing channels buys little time there; removing a block removes its time on every runtime. Each
removable block (identity shortcut, never a stage's first block, which changes the shape) is bypassed once,
on validation images, and ranked by how much the val loss rises without it (top-1 breaks ties: on a few
hundred images many blocks change it by 0). The least important are removed; the result is the same
registry architecture with fewer blocks per stage (``arch_kwargs["blocks"]``, read by ``model_from_checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from resopt.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class BlockScore:
    name: str  # the parent's module name, e.g. "layer2.3"
    stage: int  # 1-based, as "stage 2" is printed
    index: int
    macs: int  # what removing it saves
    loss_change: float  # val loss bypassed minus val loss of the whole model
    top1_change: float  # points

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.name, "macs": self.macs, "val_loss_change": round(self.loss_change, 5),
                "val_top1_change": round(self.top1_change, 3)}


def removable_blocks(model: nn.Module) -> list[tuple[str, int, int]]:
    """(stage name, stage number from 1, block index) of every block that can go: an identity shortcut and not
    its stage's first block (so every stage keeps at least one, and the recorded depths rebuild it)."""
    from resopt.models import identity_shortcut, residual_stages

    return [(name, s, i) for s, (name, stage) in enumerate(residual_stages(model).items(), 1)
            for i, block in enumerate(stage) if i > 0 and identity_shortcut(block)]


def _evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str,
              batch: int = 256) -> tuple[float, float]:
    """Mean cross-entropy and top-1 (%) of ``model`` on the stacked images (``train.evaluate`` over them)."""
    import torch

    from resopt.train import evaluate

    acc = evaluate(model, zip(images.split(batch), labels.split(batch), strict=True), torch.device(device))
    return acc.loss, acc.top1


def score_blocks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, input_size: int,
                 device: str = "cpu") -> list[BlockScore]:
    """Every removable block's val loss and top-1 change when it is bypassed, measured once each, least
    important first."""
    from torch import nn

    from resopt.models import count_macs, residual_stages

    candidates = removable_blocks(model)
    if not candidates:
        raise UsageError("this model has no residual block with an identity shortcut past a stage's first; "
                         "--method block does not apply", hint="use --method l1-struct")
    stages = residual_stages(model)
    full_macs = count_macs(model, input_size)
    was_training = model.training
    model.to(device).eval()
    try:
        base_loss, base_top1 = _evaluate(model, images, labels, device)
        scores = []
        for stage_name, s, i in candidates:
            stage = stages[stage_name]
            block = stage[i]
            stage[i] = nn.Identity()  # the block's output is relu(x + f(x)); bypassed it passes x, already >= 0
            try:
                loss, top1 = _evaluate(model, images, labels, device)
                macs = full_macs - count_macs(model, input_size)
            finally:
                stage[i] = block
            scores.append(BlockScore(f"{stage_name}.{i}", s, i, macs, loss - base_loss, top1 - base_top1))
    finally:
        model.to("cpu").train(was_training)
    # Least harm first: the loss change, then the top-1 change (a larger drop is more important).
    return sorted(scores, key=lambda b: (b.loss_change, -b.top1_change))


def choose_blocks(scores: list[BlockScore], *, n: int | None = None, target_macs: int | None = None,
                  total_macs: int = 0) -> list[BlockScore]:
    """The ``n`` least important blocks, or the fewest least-important ones that bring the MACs to
    ``target_macs``."""
    if n is not None:
        if not 1 <= n <= len(scores):
            raise UsageError(f"--blocks {n}: this model has {len(scores)} removable blocks (identity shortcut, "
                             f"not a stage's first)", hint=f"use --blocks 1..{len(scores)}")
        return scores[:n]
    assert target_macs is not None
    chosen, macs = [], total_macs
    for b in scores:
        if macs <= target_macs:
            break
        chosen.append(b)
        macs -= b.macs
    if macs > target_macs:
        raise UsageError(f"--target-macs cannot be reached by removing blocks: without all {len(scores)} removable "
                         f"blocks {macs / max(1, total_macs):.3f} of the MACs remain",
                         hint="raise --target-macs, then prune channels of the result (--method l1-struct)")
    return chosen


def remove_blocks(model: nn.Module, chosen: list[BlockScore]) -> None:
    """Remove the chosen blocks from their stages (the kept ones renumber from 0, as the rebuilt stage does)."""
    from torch import nn

    from resopt.models import residual_stages

    gone = {b.name for b in chosen}
    for name, stage in residual_stages(model).items():
        kept = [blk for i, blk in enumerate(stage) if f"{name}.{i}" not in gone]
        if len(kept) < len(stage):
            setattr(model, name, nn.Sequential(*kept))


def removed_summary(chosen: list[BlockScore], total: int, stages: int) -> str:
    """``removed 3 of 9 blocks (stage 1: 1, stage 2: 1, stage 3: 1)``."""
    per = [sum(b.stage == s for b in chosen) for s in range(1, stages + 1)]
    return (f"removed {len(chosen)} of {total} blocks ("
            + ", ".join(f"stage {s}: {k}" for s, k in enumerate(per, 1)) + ")")
