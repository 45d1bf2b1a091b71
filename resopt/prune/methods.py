"""The pruning methods, one runner each, listed in ``RUNNERS`` (method -> runner): a runner prunes
``work.model`` in place as ``work.cfg`` says, fine-tunes it through ``work.finetuned`` and records its steps and
notes in ``work``. ``prune_checkpoint`` prepares the ``Work`` and writes the result."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from resopt.console import log, warn
from resopt.errors import UsageError, VerificationError

if TYPE_CHECKING:
    from torch import nn

    from resopt.prune import PruneConfig
    from resopt.train import FitResult

DENSE_NOTE = ("dense kernels (onnxruntime, cuDNN) still multiply the zeroed weights: this model is no faster "
              "and its file no smaller than its parent. For speed use a structured method (l1-struct).")
NM_NOTE = ("2:4 keeps 2 of every 4 consecutive input-channel weights, the layout of TensorRT's sparse "
           "tensor-core kernels (Ampere or newer, built with sparsity enabled); ")


@dataclass
class Work:
    """What a method needs from ``prune_checkpoint`` and what it reports back."""

    model: nn.Module
    cfg: PruneConfig
    input_size: int
    top1: Callable[[nn.Module], float]
    fine_tune: Callable[..., FitResult | None]
    parent_macs: int
    top1_pruned: float = math.nan
    ratio: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fits: list[FitResult] = field(default_factory=list)
    probe: Callable[[], Any] | None = None  # a few evaluation images (sfp checks the channels it removes on them)

    def finetuned(self, description: str, hooks: tuple[Any, ...] = ()) -> FitResult | None:
        fit_result = self.fine_tune(description, hooks)
        if fit_result is not None:
            self.fits.append(fit_result)
        return fit_result


def plan_structured(work: Work) -> tuple[Any, list[Any]]:
    """The structured plan for ``work.cfg`` (searching the ratio for --target-macs) and the channel groups."""
    from resopt.prune.structured import StructuredPlan, channel_groups, resolve_layer_ratios, search_ratio

    cfg, model = work.cfg, work.model
    groups = channel_groups(model, work.input_size)
    plan = StructuredPlan(p=2 if cfg.method in ("l2-struct", "sfp") else 1, ratio=cfg.sparsity or 0.0,
                          global_=cfg.global_, round_to=cfg.round_to,
                          group_ratios=resolve_layer_ratios(model, groups, cfg.layer_ratios)
                          if cfg.layer_ratios else {})
    if cfg.target_macs is not None:
        ratio, macs = search_ratio(model, plan, groups, work.input_size, int(cfg.target_macs * work.parent_macs))
        log(f"--target-macs {cfg.target_macs:g}: channel ratio {ratio:.4f} leaves {macs / work.parent_macs:.3f} "
            f"of the MACs")
        plan = replace(plan, ratio=ratio)
    work.ratio = None if cfg.layer_ratios else plan.ratio
    return plan, groups


def step_row(work: Work, step: int, top1_pruned: float, fit_result: FitResult | None) -> dict[str, Any]:
    from resopt.models import count_macs, count_params

    params, nonzero = count_params(work.model)
    row = {"step": step, "params": params, "nonzero_params": nonzero,
           "macs": count_macs(work.model, work.input_size), "val_top1_pruned": round(top1_pruned, 3)}
    if fit_result is not None:
        row["val_top1_finetuned"] = round(fit_result.best_top1, 3)
    return row


def run_structured(work: Work) -> None:
    import warnings

    from resopt.prune.structured import make_pruner

    plan, groups = plan_structured(work)
    n = work.cfg.n_steps
    if n > 1 and work.cfg.finetune_epochs < 1:
        warn("--iterative without --finetune-epochs prunes in steps with nothing in between: the same as one-shot")
    pruner = make_pruner(work.model, plan, groups, work.input_size, steps=n)
    for k in range(1, n + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner.step()
        work.top1_pruned = work.top1(work.model)
        label = f"prune step {k}/{n}" if n > 1 else "prune"
        log(f"{label}: val top-1 {work.top1_pruned:.2f}% before fine-tuning")
        fit_result = work.finetuned(f"fine-tune {label}" if n > 1 else "fine-tune")
        work.steps.append(step_row(work, k, work.top1_pruned, fit_result))


def run_sfp(work: Work) -> None:
    from resopt.prune.structured import SoftFilterHook

    plan, groups = plan_structured(work)
    hook = SoftFilterHook(work.model, plan, groups, work.input_size)
    zeroed = hook.zero()
    work.top1_pruned = work.top1(work.model)
    log(f"sfp: {zeroed} channels zeroed, val top-1 {work.top1_pruned:.2f}%; fine-tuning with soft pruning each epoch")
    work.finetuned("fine-tune sfp", (hook,))
    assert work.probe is not None
    diff = hook.remove(work.model, work.probe())
    if diff > 1e-4:
        raise VerificationError(f"removing the soft-pruned channels changed the logits by {diff:.3g}; they were "
                                f"not all-zero")
    work.notes.append(f"soft filter pruning zeroed the lowest-norm channels at the start and after every epoch "
                      f"({hook.epochs_zeroed}), then removed them (logit change {diff:.2g})")


def run_unstructured(work: Work) -> None:
    from resopt.prune.sparse import MaskHook, apply_masks, magnitude_masks

    cfg = work.cfg
    n = cfg.n_steps
    for k in range(1, n + 1):
        sparsity = (cfg.sparsity or 0.0) * k / n
        masks = magnitude_masks(work.model, sparsity, global_=cfg.global_)
        apply_masks(work.model, masks)
        work.top1_pruned = work.top1(work.model)
        label = f"prune step {k}/{n}" if n > 1 else "prune"
        log(f"{label}: {sparsity:.1%} of the weights zeroed, val top-1 {work.top1_pruned:.2f}% before fine-tuning")
        fit_result = work.finetuned(f"fine-tune {label}" if n > 1 else "fine-tune", (MaskHook(work.model, masks),))
        # The masks are not re-applied here: the hook must have kept them through fine-tuning.
        modules = dict(work.model.named_modules())
        regrown = [name for name, mask in masks.items() if bool((modules[name].weight[~mask] != 0).any())]
        if regrown:
            raise VerificationError(f"{len(regrown)} layers regrew pruned weights during fine-tuning "
                                    f"({', '.join(regrown[:3])})")
        work.steps.append(step_row(work, k, work.top1_pruned, fit_result))
    work.notes.append(DENSE_NOTE)


def run_24(work: Work) -> None:
    from resopt.prune.sparse import MaskHook, apply_masks, nm_masks, nm_violations

    masks, skipped = nm_masks(work.model)
    if not masks:
        raise UsageError("no conv or linear layer of this model has a multiple of 4 input channels; 2:4 does "
                         "not apply")
    work.skipped = [{"layer": s.name, "reason": s.reason} for s in skipped]
    if skipped:
        log(f"2:4: {len(masks)} layers sparsified, {len(skipped)} skipped: " +
            ", ".join(f"{s.name} ({s.reason})" for s in skipped))
    apply_masks(work.model, masks)
    work.top1_pruned = work.top1(work.model)
    fit_result = work.finetuned("fine-tune 2:4", (MaskHook(work.model, masks),))
    bad = nm_violations(work.model)
    if bad:
        raise VerificationError(f"the 2:4 pattern does not hold after fine-tuning in {len(bad)} layers "
                                f"({', '.join(bad[:3])})")
    work.steps.append(step_row(work, 1, work.top1_pruned, fit_result))
    work.notes.append(NM_NOTE + DENSE_NOTE)


RUNNERS: dict[str, Callable[[Work], None]] = {
    "l1-struct": run_structured, "l2-struct": run_structured, "l1-unstruct": run_unstructured, "2:4": run_24,
    "sfp": run_sfp,
}
