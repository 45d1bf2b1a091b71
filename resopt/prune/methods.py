"""The pruning methods, one record each in ``METHOD_TABLE`` (name -> ``Method``: its runner, the method-specific
options it takes, what it needs): a runner prunes ``work.model`` in place as ``work.cfg`` says, fine-tunes it
through ``work.finetuned`` and records its steps and notes in ``work``. ``prune_checkpoint`` prepares the
``Work`` and writes the result. The option checks (``check_flags_apply``, ``PruneConfig.validate``), the CLI
help and the tests read the table; nothing else lists the methods.

To add a method: a runner here and a ``Method`` in ``METHOD_TABLE``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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
    val_images: Callable[[], tuple[Any, Any]] | None = None  # (images, labels) of the val split, class-balanced
    device: str = "cpu"
    record: dict[str, Any] = field(default_factory=dict)  # method-specific metrics for the lineage

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
    plan = StructuredPlan(p=METHOD_TABLE[cfg.method].norm, ratio=cfg.sparsity or 0.0,
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


def run_block(work: Work) -> None:
    from resopt.models import stage_depths
    from resopt.prune.block import choose_blocks, remove_blocks, removed_summary, score_blocks

    cfg, model = work.cfg, work.model
    assert work.val_images is not None
    images, labels = work.val_images()
    parent_depths = stage_depths(model)
    log(f"block importance: bypassing each removable block once on {len(labels)} val images")
    scores = score_blocks(model, images, labels, input_size=work.input_size, device=work.device)
    target = None if cfg.target_macs is None else int(cfg.target_macs * work.parent_macs)
    chosen = choose_blocks(scores, n=cfg.blocks, target_macs=target, total_macs=work.parent_macs)
    remove_blocks(model, chosen)
    summary = removed_summary(chosen, sum(parent_depths), len(parent_depths))
    log(summary + ": " + ", ".join(f"{b.name} (val loss {b.loss_change:+.4f}, top-1 {b.top1_change:+.2f})"
                                   for b in chosen))
    work.top1_pruned = work.top1(model)
    log(f"prune: val top-1 {work.top1_pruned:.2f}% before fine-tuning")
    fit_result = work.finetuned("fine-tune")
    work.steps.append(step_row(work, 1, work.top1_pruned, fit_result))
    work.notes.append(f"{summary}, ranked by the val loss change when each is bypassed "
                      f"({len(labels)} val images); blocks per stage {parent_depths} -> {stage_depths(model)}")
    work.record["blocks"] = {"removed": [b.name for b in chosen], "parent_depths": parent_depths,
                             "depths": stage_depths(model), "val_images": len(labels),
                             "importance": [b.to_dict() for b in scores]}


# The options only some methods take: PruneConfig field -> flag. Every other option of `prune` applies to every
# method (the fine-tuning, data and output options).
METHOD_FIELDS = {"sparsity": "--sparsity", "target_macs": "--target-macs", "global_": "--global",
                 "iterative": "--iterative", "steps": "--steps", "round_to": "--round-to",
                 "layer_ratios": "--layer-ratios", "blocks": "--blocks"}


@dataclass(frozen=True)
class Method:
    """One pruning method."""

    name: str
    run: Callable[[Work], None]
    takes: tuple[str, ...]  # the flags of METHOD_FIELDS it takes
    amount: tuple[str, ...] = ()  # it needs one of these flags (how much to prune); () when fixed
    structured: bool = False  # removes whole channels (or blocks): params, MACs and the file shrink
    norm: int = 1  # the channel (or weight) norm it ranks by
    needs_finetune: bool = False  # it prunes while fine-tuning
    analyze_takes: tuple[str, ...] = ()  # the flags of METHOD_FIELDS --analyze takes with it; () when it cannot
    why_not: str = ""  # appended to the refusal of a flag it does not take
    example: tuple[str, ...] = ()  # a typical amount, for the help and the tests (``--sparsity 0.3``)

    @property
    def analyzes(self) -> bool:
        """--analyze can rank channels as it does."""
        return bool(self.analyze_takes)

    def check_amount(self, given: Iterable[str]) -> None:
        if self.amount and not set(self.amount) & set(given):
            names = ", ".join(self.amount[:-1]) + (" or " if len(self.amount) > 1 else "") + self.amount[-1]
            raise UsageError(f"--method {self.name} needs {names}",
                             hint=f"e.g. --method {self.name} {' '.join(self.example)}" if self.example else None)


_STRUCT = ("--sparsity", "--target-macs", "--global", "--round-to", "--layer-ratios")
_STRUCT_AMOUNT = ("--sparsity", "--target-macs", "--layer-ratios")
# --analyze proposes --layer-ratios for a --sparsity or --target-macs (rounded with --round-to).
_ANALYZE = ("--sparsity", "--target-macs", "--round-to")

METHOD_TABLE: dict[str, Method] = {m.name: m for m in (
    Method("l1-struct", run_structured, _STRUCT + ("--iterative", "--steps"), _STRUCT_AMOUNT, structured=True,
           norm=1, analyze_takes=_ANALYZE, example=("--sparsity", "0.3")),
    Method("l2-struct", run_structured, _STRUCT + ("--iterative", "--steps"), _STRUCT_AMOUNT, structured=True,
           norm=2, analyze_takes=_ANALYZE, example=("--sparsity", "0.3")),
    Method("l1-unstruct", run_unstructured, ("--sparsity", "--global", "--iterative", "--steps"), ("--sparsity",),
           norm=1, why_not="zeroed weights leave the MACs of dense kernels unchanged", example=("--sparsity", "0.3")),
    Method("2:4", run_24, (), why_not="it fixes its pattern: 2 of every 4 weights"),
    Method("sfp", run_sfp, _STRUCT, _STRUCT_AMOUNT, structured=True, norm=2, needs_finetune=True,
           why_not="it already prunes gradually, during fine-tuning", example=("--sparsity", "0.3")),
    Method("block", run_block, ("--blocks", "--target-macs"), ("--blocks", "--target-macs"), structured=True,
           why_not="it removes whole residual blocks; prune the result's channels with a second prune",
           example=("--blocks", "1")),
)}

RUNNERS: dict[str, Callable[[Work], None]] = {name: m.run for name, m in METHOD_TABLE.items()}

ANALYZE_ONLY = ("--analyze-ratios", "--analyze-images")
# --analyze measures and proposes; it writes no model, so it takes only the method flags the analyzing methods
# name (``Method.analyze_takes``) and these of prune's options.
ANALYZE_TAKES = ("--method", "--analyze", *ANALYZE_ONLY,
                 *dict.fromkeys(f for m in METHOD_TABLE.values() for f in m.analyze_takes),
                 "--data", "--limit-per-class", "--val-split", "--seed", "--json", "--help")
# What only distillation reads: nothing with --no-distill.
DISTILL_ONLY = ("--teacher", "--alpha", "--temperature")
# What only the fine-tuning reads (the training split, the optimizer, the teacher): nothing without
# --finetune-epochs.
FIT_ONLY = ("--lr", "--teacher", "--alpha", "--temperature", "--no-distill", "--optimizer", "--momentum",
            "--nesterov", "--weight-decay", "--warmup-epochs", "--label-smoothing", "--data-path")


def method_users() -> dict[str, list[str]]:
    """Every method-specific flag -> the methods that take it, in table order."""
    users: dict[str, list[str]] = {flag: [] for flag in METHOD_FIELDS.values()}
    for m in METHOD_TABLE.values():
        for flag in m.takes:
            users[flag].append(m.name)
    return users


def get_method(name: str) -> Method:
    from resopt.errors import choice_error

    if name not in METHOD_TABLE:
        raise choice_error("pruning method", name, tuple(METHOD_TABLE))
    return METHOD_TABLE[name]


def check_method_flags(method: str, given: Iterable[str]) -> None:
    """A ``UsageError`` (exit 2) for the first given method-specific flag ``method`` does not take, naming the
    methods that take it."""
    entry = get_method(method)
    users = method_users()
    for flag in given:
        if flag in users and flag not in entry.takes:
            why = f" ({entry.why_not})" if entry.why_not else ""
            raise UsageError(f"{flag} does not apply to --method {method}{why}; it is an option of --method "
                             f"{', '.join(users[flag])}", hint=f"drop {flag}")


def check_flags_apply(method: str, given: Iterable[str], *, analyze: bool, finetune: bool, distill: bool) -> None:
    """Every flag the user typed (``given``) must take effect: a ``UsageError`` (exit 2) naming who takes the
    first one that would not, for ``--analyze``, for the method, and for the options that depend on another
    (the optimizer and the teacher on ``--finetune-epochs``, ``--alpha`` on distillation, ``--analyze-ratios``
    on ``--analyze``)."""
    given = list(given)
    if analyze:
        for flag in given:
            if flag not in ANALYZE_TAKES:
                raise UsageError(f"{flag} does not apply to --analyze, which measures and writes no model; it is "
                                 f"an option of prune without --analyze", hint=f"drop {flag}")
        entry = get_method(method)
        if not entry.analyzes:
            raise UsageError(f"--method {method} does not apply to --analyze; it is an option of prune without "
                             f"--analyze (--analyze ranks channels as --method "
                             f"{', '.join(n for n, m in METHOD_TABLE.items() if m.analyzes)})")
        return
    for flag in given:
        if flag in ANALYZE_ONLY:
            raise UsageError(f"{flag} does not apply without --analyze; it is an option of --analyze",
                             hint=f"add --analyze, or drop {flag}")
        if flag in FIT_ONLY and not finetune:
            raise UsageError(f"{flag} does not apply without --finetune-epochs (nothing is trained); it is an "
                             f"option of the fine-tuning", hint=f"add --finetune-epochs 2, or drop {flag}")
        if flag in DISTILL_ONLY and not distill:
            raise UsageError(f"{flag} does not apply with --no-distill; it is an option of the distillation during "
                             f"fine-tuning (from the parent unless --teacher)",
                             hint=f"drop --no-distill, or drop {flag}")
    check_method_flags(method, given)
