"""Pruning: every compression method of the ResNet pruning studies, as real, smaller checkpoints.

- ``l1-struct`` / ``l2-struct``: remove whole channels ranked by the L1 / L2 norm of their channel
  group (Torch-Pruning's dependency graph keeps residual additions, depthwise convs and SE gates
  consistent); one-shot or iterative with fine-tuning between steps; per group, global, per stage /
  block / layer ratios, or a MACs target. The model physically shrinks and the checkpoint records the
  new widths.
- ``sfp``: soft filter pruning: filters are zeroed each epoch of fine-tuning and may grow back; at the
  end the zeroed channels are removed physically.
- ``l1-unstruct``: zero individual weights by magnitude (per layer or global), masks kept through
  fine-tuning and folded into the weights.
- ``2:4``: two of every four consecutive input-channel weights are zero, the layout of TensorRT's
  sparse kernels.
- ``block``: remove whole residual blocks (identity shortcut, never a stage's first), the least important
  by the val loss change when each is bypassed; the checkpoint records the blocks per stage.

Fine-tuning distills from the unpruned parent unless ``--teacher`` names another or ``--no-distill``.

``prune_checkpoint`` is the ``prune`` command's work (each method's runner is in ``methods.RUNNERS``);
``analyze_checkpoint`` its ``--analyze``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.console import log, warn
from resopt.errors import UsageError, VerificationError
from resopt.prune.methods import (
    METHOD_FIELDS,
    METHOD_TABLE,
    RUNNERS,
    Method,
    Work,
    check_flags_apply,
    check_method_flags,
    get_method,
)
from resopt.ranges import check_fields

if TYPE_CHECKING:
    from torch import nn

    from resopt.prune.sensitivity import SensitivityReport
    from resopt.train import DataOptions, FitResult, TrainConfig

METHODS = tuple(METHOD_TABLE)
STRUCTURED = tuple(name for name, m in METHOD_TABLE.items() if m.structured)
DEFAULT_STEPS = 5

__all__ = ["METHODS", "METHOD_TABLE", "STRUCTURED", "Method", "PruneConfig", "PruneResult", "analyze_checkpoint",
           "check_flags_apply", "get_method", "prune_checkpoint"]


@dataclass(frozen=True)
class PruneConfig:
    method: str = "l1-struct"
    sparsity: float | None = None  # structured: fraction of channels removed; unstructured: of weights
    target_macs: float | None = None  # fraction of the parent's MACs to keep (structured only)
    global_: bool = False
    iterative: bool = False
    steps: int | None = None
    round_to: int | str | None = None  # a multiple, or "auto": chosen for --runtime/--precision (resolve_round_to)
    layer_ratios: str | None = None
    finetune_epochs: int = 0
    teacher: Path | None = None
    alpha: float = 0.5
    temperature: float = 4.0
    blocks: int | None = None  # block: how many residual blocks to remove
    distill: bool = True  # fine-tuning distills from the teacher (the parent unless --teacher)
    # Latency (resopt.latency): a target fraction of the parent's measured latency, or milliseconds per batch,
    # on this runtime and precision at this batch size; runtime/precision also drive --round-to auto.
    target_latency: float | None = None
    latency_ms: float | None = None
    runtime: str | None = None
    precision: str | None = None
    latency_batch: int | None = None

    @property
    def multiple(self) -> int | None:
        """``--round-to`` as a number (``auto`` must have been resolved first: ``resolve_round_to``)."""
        if self.round_to == "auto":
            raise AssertionError("--round-to auto is resolved by resolve_round_to before pruning")
        return None if self.round_to is None else int(self.round_to)

    @property
    def latency_target(self) -> bool:
        return self.target_latency is not None or self.latency_ms is not None

    @property
    def n_steps(self) -> int:
        return (self.steps or DEFAULT_STEPS) if self.iterative else 1

    def method_flags_given(self) -> list[str]:
        """The method-specific flags set away from their defaults (for a library caller, "given" means "not the
        default"; the CLI asks click which options the user typed)."""
        defaults = {f.name: f.default for f in fields(PruneConfig)}
        return [flag for name, flag in METHOD_FIELDS.items() if getattr(self, name) != defaults[name]]

    def validate(self) -> None:
        entry = get_method(self.method)
        given = self.method_flags_given()
        check_method_flags(self.method, given)
        entry.check_amount(given)
        if self.sparsity is not None and self.target_macs is not None:
            raise UsageError("--sparsity and --target-macs are alternatives; give one of them")
        check_fields(self)  # sparsity, target MACs, steps, round-to, blocks, ... against resopt.ranges
        if self.steps is not None and not self.iterative:
            raise UsageError("--steps needs --iterative", hint=f"resopt prune ... --iterative --steps {self.steps}")
        if self.iterative and self.n_steps < 2:
            raise UsageError(f"--steps must be at least 2 with --iterative, got {self.n_steps}")
        if self.round_to is not None and self.round_to != "auto" and not isinstance(self.round_to, int):
            raise UsageError(f"--round-to must be a whole number >= 1 or auto, got {self.round_to}")
        self._validate_latency(given)
        if self.layer_ratios is not None:
            for flag in ("--sparsity", "--target-macs", "--global"):
                if flag in given:
                    raise UsageError(f"--layer-ratios sets every layer's ratio; it cannot be combined with {flag}")
        if entry.needs_finetune and self.finetune_epochs < 1:
            raise UsageError(f"--method {self.method} prunes while fine-tuning; it needs --finetune-epochs >= 1")
        if self.teacher is not None and self.finetune_epochs < 1:
            raise UsageError("--teacher distils during fine-tuning; add --finetune-epochs")
        if self.teacher is not None and not self.distill:
            raise UsageError("--teacher does not apply with --no-distill; it names who distils into the fine-tuning",
                             hint="drop --no-distill, or drop --teacher")
        if self.blocks is not None and self.target_macs is not None:
            raise UsageError("--blocks and --target-macs are alternatives; give one of them")

    def _validate_latency(self, given: list[str]) -> None:
        from resopt.latency import check_measured
        from resopt.latency.widths import check_runtime

        amounts = [f for f in ("--sparsity", "--target-macs", "--layer-ratios", "--blocks", "--target-latency",
                               "--latency-ms") if f in given]
        if self.latency_target and len(amounts) > 1:
            raise UsageError(f"{' and '.join(amounts)} are alternatives; give one of them")
        if self.target_latency is not None and not 0.0 < self.target_latency < 1.0:
            raise UsageError(f"--target-latency must be in (0, 1), got {self.target_latency}",
                             hint="it is the fraction of the parent's measured latency to keep: 0.5 halves it")
        if self.latency_ms is not None and not self.latency_ms > 0:
            raise UsageError(f"--latency-ms must be > 0, got {self.latency_ms}")
        for flag, value in (("--runtime", self.runtime), ("--precision", self.precision)):
            if value is not None and not (self.latency_target or self.round_to == "auto"):
                raise UsageError(f"{flag} does not apply without --target-latency, --latency-ms or --round-to auto; "
                                 f"it names what those measure or align for", hint=f"drop {flag}")
        if self.latency_batch is not None and not self.latency_target:
            raise UsageError("--latency-batch does not apply without --target-latency or --latency-ms; it is the "
                             "batch size latency is measured at", hint="drop --latency-batch")
        if self.latency_batch is not None and self.latency_batch < 1:
            raise UsageError(f"--latency-batch must be at least 1, got {self.latency_batch}")
        if self.latency_target or self.round_to == "auto":
            check_runtime(self.runtime or DEFAULT_RUNTIME, self.precision or "f32")
        if self.latency_target:
            check_measured(self.runtime or DEFAULT_RUNTIME, self.precision or "f32")


DEFAULT_RUNTIME = "ort"
DEFAULT_LATENCY_BATCH = 32


def resolve_round_to(cfg: PruneConfig) -> tuple[PruneConfig, dict[str, Any] | None]:
    """``cfg`` with ``--round-to auto`` replaced by the multiple ``resopt.latency.choose_round_to`` picks for its
    runtime and precision (logged on stderr), and that choice as a lineage record; ``cfg`` unchanged otherwise."""
    if cfg.round_to != "auto":
        return cfg, None
    from resopt.latency import choose_round_to

    choice = choose_round_to(cfg.runtime or DEFAULT_RUNTIME, cfg.precision or "f32")
    log(f"--round-to auto: {choice.multiple} ({choice.reason})")
    return replace(cfg, round_to=choice.multiple), choice.to_dict()


@dataclass(frozen=True)
class ModelStats:
    params: int
    nonzero_params: int
    macs: int
    file_bytes: int
    top1: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "top1": round(self.top1, 3)}


@dataclass
class PruneResult:
    output: Path
    parent: Path
    method: str
    before: ModelStats
    after: ModelStats
    top1_pruned: float  # after the (last) pruning step, before fine-tuning
    finetune_epochs: int
    channel_sparsity: float  # fraction of conv/linear output channels removed (classifier excluded)
    weight_sparsity: float  # fraction of conv/linear weights that are zero
    val_images: int
    teacher: str | None = None  # who distilled into the fine-tuning (the parent unless --teacher), or None
    test_before: float | None = None  # test top-1 of the parent and of the result, measured once each
    test_after: float | None = None
    test_images: int = 0
    splits: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None  # the channel ratio used (searched when --target-macs)
    steps: list[dict[str, Any]] = field(default_factory=list)
    skipped_layers: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fits: list[FitResult] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # the method's own metrics (block: what it removed)

    def reported(self) -> dict[str, Any]:
        """top-1 of the result and its parent as reported: on test (measured once, after every choice was
        made on val), or on val where the data has no test split."""
        if self.test_after is not None and self.test_before is not None:
            return {"top1": round(self.test_after, 3), "parent_top1": round(self.test_before, 3), "split": "test",
                    "eval_images": self.test_images, "test_top1": round(self.test_after, 3),
                    "test_parent_top1": round(self.test_before, 3), "test_images": self.test_images}
        return {"top1": round(self.after.top1, 3), "parent_top1": round(self.before.top1, 3), "split": "val",
                "eval_images": self.val_images}

    def metrics(self) -> dict[str, Any]:
        return {**self.reported(), "val_top1": round(self.after.top1, 3),
                "val_parent_top1": round(self.before.top1, 3),
                "val_top1_before_finetune": round(self.top1_pruned, 3), "val_images": self.val_images,
                "selected_on": "val", "splits": self.splits, "params": self.after.params,
                "nonzero_params": self.after.nonzero_params, "macs": self.after.macs,
                "parent_params": self.before.params, "parent_macs": self.before.macs, "method": self.method,
                "channel_sparsity": round(self.channel_sparsity, 4),
                "weight_sparsity": round(self.weight_sparsity, 4),
                **({"ratio": round(self.ratio, 4)} if self.ratio else {}), **self.record}

    def summary(self) -> dict[str, Any]:
        return {"output": str(self.output), "parent": str(self.parent), "method": self.method,
                "before": self.before.to_dict(), "after": self.after.to_dict(),
                "val_top1_before_finetune": round(self.top1_pruned, 3), "finetune_epochs": self.finetune_epochs,
                "channel_sparsity": round(self.channel_sparsity, 4),
                "weight_sparsity": round(self.weight_sparsity, 4),
                "ratio": None if self.ratio is None else round(self.ratio, 4), "teacher": self.teacher,
                "macs_fraction": round(self.after.macs / max(1, self.before.macs), 4),
                "params_fraction": round(self.after.params / max(1, self.before.params), 4),
                **self.reported(), "val_images": self.val_images, "steps": self.steps,
                "skipped_layers": self.skipped_layers, "notes": self.notes,
                **({"latency": self.record["latency"]} if "latency" in self.record else {})}


# ------------------------------------------------------------------------------------------ helpers


def _load_parent(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from resopt.artifacts import load_model, require_kind

    require_kind(Path(path), "pt", hint="prune the .pt checkpoint, then export the pruned one: "
                                        "resopt prune MODEL.pt -o small.pt && resopt export small.pt")
    return load_model(Path(path))


def _prepare(data: DataOptions, ckpt: dict[str, Any], name: str, *, device: str = "auto") -> Any:
    from resopt.artifacts import checkpoint_preprocess
    from resopt.data import check_classes
    from resopt.train import prepare_data

    # The parent's preprocessing, never recomputed: the pruned model must see what its parent saw; and its
    # validation split, re-derived from its lineage: fine-tuning never trains on the parent's val images.
    prepared = prepare_data(data, preprocess=checkpoint_preprocess(ckpt), device=device,
                            lineage=ckpt.get("lineage"))
    check_classes(ckpt["classes"], prepared.classes, model_name=name, data=data.data)
    return prepared


def _decoded(dataset: Any, input_size: int, *, max_bytes: int = 512 * 2**20) -> Any:
    """``dataset`` as tensors in memory when they fit in ``max_bytes``: pruning evaluates the same
    images several times (parent, pruned, every fine-tuning epoch and step), and decoding JPEGs costs
    more than running a small network on them."""
    from resopt.data.decoded import DecodedImages

    if isinstance(dataset, DecodedImages) or len(dataset) * 3 * input_size * input_size * 4 > max_bytes:
        return dataset
    from torch.utils.data import TensorDataset

    from resopt.data import stack_images

    return TensorDataset(*stack_images(dataset))


def _val_sample(val: Any, limit: int = 2000, *, seed: int = 0) -> tuple[Any, Any]:
    """At most ``limit`` val images (class-balanced when there are more) and their labels, stacked."""
    from torch.utils.data import Subset

    from resopt.data import balanced_indices, stack_images, targets_of

    if len(val) <= limit:
        return stack_images(val)
    targets = val.tensors[1].tolist() if hasattr(val, "tensors") else targets_of(val)
    per_class = max(1, limit // len(set(targets)))
    return stack_images(Subset(val, balanced_indices(targets, per_class, seed=seed)))


def _stats(model: nn.Module, input_size: int, file_bytes: int, top1: float) -> ModelStats:
    from resopt.models import count_macs, count_params

    params, nonzero = count_params(model)
    return ModelStats(params, nonzero, count_macs(model, input_size), file_bytes, top1)


def _weight_sparsity(model: nn.Module) -> float:
    from resopt.prune.sparse import weight_sparsity

    zeros, total = weight_sparsity(model)
    return zeros / max(1, total)


# ----------------------------------------------------------------------------------------- prune


def prune_checkpoint(
    model_path: Path,
    cfg: PruneConfig,
    *,
    data: DataOptions,
    train: TrainConfig,
    output: Path,
    options: dict[str, Any] | None = None,
) -> PruneResult:
    """Prune the checkpoint at ``model_path`` as ``cfg`` says, fine-tune it, verify it, write ``output``."""
    import torch

    from resopt.artifacts import atomic_output, check_output_path, checkpoint_preprocess, lineage_entry, make_checkpoint
    from resopt.backends.cuda import resolve_device
    from resopt.data import stack_images
    from resopt.distill import DistillConfig, kd_loss_fn, load_teacher, model_top1
    from resopt.models import model_from_checkpoint, model_widths, stage_depths
    from resopt.prune.sensitivity import conv_out_channels
    from resopt.train import fit, measure_test

    cfg.validate()
    cfg, round_to_auto = resolve_round_to(cfg)
    model_path = Path(model_path)
    output = check_output_path(Path(output), model_path, data.data, cfg.teacher, suffixes=(".pt", ".pth"))
    model, ckpt = _load_parent(model_path)
    method = METHOD_TABLE[cfg.method]
    if cfg.multiple and method.structured:
        widest = max((w[1] for w in model_widths(model).values() if len(w) == 3), default=0)
        if cfg.multiple >= widest:
            raise UsageError(f"--round-to {cfg.round_to} is not below the widest conv of {model_path.name} "
                             f"({widest} channels): no layer could lose a channel", hint="use --round-to 8 or 16")
    dcfg = DistillConfig(cfg.alpha, cfg.temperature)
    dcfg.validate()
    ft_cfg = replace(train, epochs=max(1, cfg.finetune_epochs))
    ft_cfg.validate()
    pre = checkpoint_preprocess(ckpt)
    # Without fine-tuning the training split is never read: no reason to decode it.
    prepared = _prepare(data if cfg.finetune_epochs > 0 else replace(data, data_path="pil"), ckpt,
                        model_path.name, device=train.device)
    prepared.val = _decoded(prepared.val, pre.input_size)
    loss_fn = None
    # Recovery distills from the unpruned parent (read again from its file: the model below is pruned in
    # place) unless --teacher names another or --no-distill asks for labels only.
    teacher_path = (Path(cfg.teacher) if cfg.teacher is not None else model_path) \
        if cfg.finetune_epochs > 0 and cfg.distill else None
    if teacher_path is not None:
        teacher = load_teacher(teacher_path, classes=prepared.classes, preprocess=pre, data=data.data)
        loss_fn = kd_loss_fn(teacher, dcfg, label_smoothing=ft_cfg.label_smoothing)
        log(f"fine-tuning distills from {'the parent ' if cfg.teacher is None else ''}{teacher_path.name} "
            f"(alpha {cfg.alpha:g}, temperature {cfg.temperature:g})")

    def top1(m: nn.Module) -> float:
        return model_top1(m, prepared.val, ft_cfg)

    def fine_tune(description: str, hooks: tuple[Any, ...] = ()) -> FitResult | None:
        if cfg.finetune_epochs < 1:
            return None
        return fit(model, prepared.train, prepared.val, ft_cfg, loss_fn=loss_fn, hooks=hooks,
                   description=description, val_note=prepared.val_note)

    size = pre.input_size
    parent_widths = model_widths(model)
    before = _stats(model, size, model_path.stat().st_size, top1(model))
    # The parent's test top-1 is measured here, before anything is chosen, and never looked at again.
    parent_test = measure_test(model, prepared, ft_cfg, what=f"parent {model_path.name}", when="before pruning")
    parent_channels = conv_out_channels(model)
    log(f"pruning {model_path.name} ({ckpt['arch']}, val top-1 {before.top1:.2f}% on {prepared.val_note}) "
        f"with {cfg.method}; every choice is made on val")
    work = Work(model=model, cfg=cfg, input_size=size, top1=top1, fine_tune=fine_tune, parent_macs=before.macs,
                probe=lambda: stack_images(prepared.val, 32)[0], val_images=lambda: _val_sample(prepared.val),
                device=str(resolve_device(train.device)))
    parent_depths = stage_depths(model)
    RUNNERS[cfg.method](work)

    model.eval()
    if work.latency:
        work.record["latency"] = _measure_latency(work, model, size)
    if method.structured and not cfg.round_to:
        work.notes += _alignment_note(parent_widths, model_widths(model))
    after_top1 = top1(model) if work.fits or method.needs_finetune else work.top1_pruned
    test = measure_test(model, prepared, ft_cfg, what=f"pruned {output.name}")
    channel_sparsity = 1.0 - conv_out_channels(model) / parent_channels
    result = PruneResult(output=output, parent=model_path, method=cfg.method,
                         before=before, after=_stats(model, size, 0, after_top1), top1_pruned=work.top1_pruned,
                         finetune_epochs=cfg.finetune_epochs, channel_sparsity=channel_sparsity,
                         weight_sparsity=_weight_sparsity(model), val_images=len(prepared.val),  # type: ignore
                         teacher=None if teacher_path is None else str(teacher_path), record=work.record,
                         test_before=None if parent_test is None else parent_test.top1,
                         test_after=None if test is None else test.top1, test_images=0 if test is None else test.n,
                         splits=prepared.splits, ratio=work.ratio, steps=work.steps,
                         skipped_layers=work.skipped, notes=work.notes, fits=work.fits)
    _check_shrunk(result)

    opts = {"method": cfg.method, "sparsity": cfg.sparsity, "target_macs": cfg.target_macs, "global": cfg.global_,
            "iterative": cfg.iterative, "steps": cfg.n_steps, "round_to": cfg.round_to,
            "layer_ratios": cfg.layer_ratios, "finetune_epochs": cfg.finetune_epochs,
            "blocks": cfg.blocks, "distill": teacher_path is not None,
            "teacher": None if teacher_path is None else str(teacher_path),
            "teacher_is_parent": teacher_path is not None and cfg.teacher is None,
            **({"alpha": cfg.alpha, "temperature": cfg.temperature} if teacher_path is not None else {}),
            **({"round_to_auto": round_to_auto} if round_to_auto else {}),
            **({"target_latency": cfg.target_latency, "latency_ms": cfg.latency_ms,
                "runtime": cfg.runtime or DEFAULT_RUNTIME, "precision": cfg.precision or "f32",
                "latency_batch": cfg.latency_batch or DEFAULT_LATENCY_BATCH} if cfg.latency_target else {}),
            "data": data.data, "limit_per_class": data.limit_per_class, "val_split": prepared.val_split.fraction,
            "data_path": data.data_path, **{k: v for k, v in asdict(ft_cfg).items() if k != "epochs"},
            **(options or {})}
    extra = {"teacher": teacher_path} if teacher_path is not None else None
    # The fine-tuning curves (every fine-tune, in order) travel in the lineage for `resopt report`.
    history = [row for f in result.fits for row in f.history]
    arch_kwargs = dict(ckpt.get("arch_kwargs", {}))
    if stage_depths(model) != parent_depths or "blocks" in arch_kwargs:
        arch_kwargs["blocks"] = stage_depths(model)  # block pruning: what model_from_checkpoint rebuilds
    out_ckpt = make_checkpoint(
        arch=ckpt["arch"], arch_kwargs=arch_kwargs, state_dict=model.state_dict(),
        classes=ckpt["classes"], preprocess=pre, metrics=result.metrics(), widths=model_widths(model),
        lineage=list(ckpt.get("lineage", [])) + [lineage_entry("prune", options=opts, parent=model_path,
                                                               metrics={**result.metrics(), "history": history},
                                                               extra_parents=extra)])

    # The checkpoint must rebuild from its recorded widths alone, into the same function.
    images, _ = stack_images(prepared.val, 64)
    with torch.no_grad():
        diff = float((model_from_checkpoint(out_ckpt)(images) - model(images)).abs().max())
    if diff > 1e-4:
        raise VerificationError(f"the pruned checkpoint does not rebuild into the pruned model (max logit "
                                f"difference {diff:.3g} on {len(images)} images)")

    if int(os.environ.get("RANK", "0")) == 0:
        with atomic_output(output) as tmp:
            torch.save(out_ckpt, tmp)
            result.after = replace(result.after, file_bytes=tmp.stat().st_size)
            if method.structured and result.after.file_bytes >= before.file_bytes:
                raise VerificationError(f"the pruned checkpoint ({result.after.file_bytes} bytes) is not smaller "
                                        f"than its parent ({before.file_bytes} bytes)")
    r = result.reported()
    once = ", measured once, after the choice" if r["split"] == "test" else ""
    log(f"wrote {output}: params {before.params} -> {result.after.params}, MACs {before.macs} -> "
        f"{result.after.macs}, {r['split']} top-1 {r['parent_top1']:.2f}% -> {r['top1']:.2f}% "
        f"({r['eval_images']:,} {r['split']} images{once})")
    return result


def _measure_latency(work: Work, model: nn.Module, size: int) -> dict[str, Any]:
    """Measure the pruned model against its parent in one interleaved run of bench's workers and set the
    prediction beside it (on stderr, in the notes, returned for the lineage and --json). A measured miss of
    the target is a warning: the model is written, with the miss recorded (``target_met``)."""
    from resopt.latency import Timing, measure_models

    cfg = work.cfg
    predictor = work.latency["predictor"]
    key = predictor.table.key
    parent_ms, child_ms = measure_models([work.latency["parent"], model], size, runtime=key.runtime,
                                         precision=key.precision, batch=key.batch, threads=key.threads,
                                         timing=Timing.from_env())
    predicted = float(work.latency["predicted_ms"])
    predicted_fraction, measured_fraction = predicted / predictor.parent_ms, child_ms / parent_ms
    if cfg.latency_ms is not None:
        met, asked = child_ms <= cfg.latency_ms, f"--latency-ms {cfg.latency_ms:g}"
    else:
        met, asked = measured_fraction <= (cfg.target_latency or 0.0), f"--target-latency {cfg.target_latency:g}"
    line = (f"predicted {predicted_fraction:.2f}x of the parent's latency ({predicted:.3g} ms); measured "
            f"{measured_fraction:.2f}x ({child_ms:.3g} ms vs the parent's {parent_ms:.3g} ms per batch of "
            f"{key.batch} on {key.runtime} {key.precision}, {key.threads} threads, one interleaved run)")
    log(line)
    work.notes.append(line)
    if not met:
        warn(f"{asked} missed as measured ({measured_fraction:.2f}x, {child_ms:.3g} ms): the table predicted "
             f"{predicted_fraction:.2f}x; a loaded machine measures noisily, re-measure with resopt bench")
    return {"machine": asdict(key), "machine_described": key.describe(),
            "target_ms": round(float(work.latency["target_ms"]), 4), "predicted_ms": round(predicted, 4),
            "predicted_fraction": round(predicted_fraction, 4), "parent_ms_table": round(predictor.parent_ms, 4),
            "measured_parent_ms": round(parent_ms, 4), "measured_ms": round(child_ms, 4),
            "measured_fraction": round(measured_fraction, 4), "target_met": bool(met),
            "error": round(predicted_fraction / measured_fraction - 1.0, 4)}


def _alignment_note(parent: dict[str, list[int]], child: dict[str, list[int]]) -> list[str]:
    """A note when pruning left dense conv widths that are no longer multiples of 8.

    onnxruntime's x86 NCHWc convolutions (and tensor cores) work on blocks of 8 channels; a graph with
    other widths falls back to slower generic kernels (measured in scripts/bench_prune.py: half the MACs
    ran 1.3x faster unaligned, 1.8x with --round-to 8).
    """
    broken = [name for name, w in child.items() if len(w) == 3 and w[2] == 1 and parent[name][1] % 8 == 0
              and w[1] % 8 != 0]
    if not broken:
        return []
    return [f"{len(broken)} conv layers now have widths that are not multiples of 8 ({broken[0]}: "
            f"{child[broken[0]][1]}); onnxruntime's NCHWc kernels and tensor cores need multiples of 8, so "
            f"these run on slower generic kernels. --round-to 8 keeps them aligned."]


def _check_shrunk(result: PruneResult) -> None:
    b, a = result.before, result.after
    if METHOD_TABLE[result.method].structured:
        if not (a.params < b.params and a.macs < b.macs):
            raise UsageError(f"structured pruning removed nothing (params {b.params} -> {a.params}, MACs "
                                    f"{b.macs} -> {a.macs})",
                                    hint="raise --sparsity, or lower --round-to (narrow layers round back up)")
    elif not a.nonzero_params < b.nonzero_params:
        raise VerificationError(f"pruning zeroed nothing (non-zero params {b.nonzero_params} -> {a.nonzero_params})")


# --------------------------------------------------------------------------------------- analyze


def analyze_checkpoint(
    model_path: Path,
    *,
    data: DataOptions,
    method: str = "l1-struct",
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75),
    sparsity: float | None = None,
    target_macs: float | None = None,
    round_to: int | None = None,
    max_images: int = 2000,
) -> SensitivityReport:
    """Per-layer sensitivity of a checkpoint on its validation images, and a ratio proposal for a target."""
    from resopt.artifacts import checkpoint_preprocess
    from resopt.data import balanced_indices, stack_images, targets_of
    from resopt.models import count_macs
    from resopt.prune.sensitivity import analyze_sensitivity
    from resopt.prune.structured import channel_groups

    entry = get_method(method)
    if not entry.analyzes:
        names = " or ".join(n for n, m in METHOD_TABLE.items() if m.analyzes)
        raise UsageError(f"--analyze ranks channels by {names} norms, not {method!r}")
    if round_to is not None and round_to < 1:
        raise UsageError(f"--round-to must be at least 1, got {round_to}")
    if sparsity is not None and target_macs is not None:
        raise UsageError("--sparsity and --target-macs are alternatives; give one of them")
    for flag, v in (("--sparsity", sparsity), ("--target-macs", target_macs)):
        if v is not None and not 0.0 < v < 1.0:
            raise UsageError(f"{flag} must be in (0, 1), got {v}")
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise UsageError(f"--analyze-ratios must be fractions in (0, 1), got {', '.join(map(str, ratios))}")
    model, ckpt = _load_parent(Path(model_path))
    # Only the evaluation images are used (stacked below): no reason to decode the training split.
    prepared = _prepare(replace(data, data_path="pil"), ckpt, Path(model_path).name)
    from torch.utils.data import Subset

    targets = targets_of(prepared.val)
    per_class = max(1, max_images // max(1, len(set(targets))))
    subset = Subset(prepared.val, balanced_indices(targets, per_class, seed=data.seed))
    images, labels = stack_images(subset)
    size = checkpoint_preprocess(ckpt).input_size
    groups = channel_groups(model, size)
    log(f"sensitivity of {len(groups)} channel groups at ratios {', '.join(f'{r:g}' for r in ratios)} on "
        f"{len(labels)} val images ({prepared.val_split.describe(len(prepared.val))})")  # type: ignore[arg-type]
    target = int(target_macs * count_macs(model, size)) if target_macs is not None else None
    report = analyze_sensitivity(model, groups, images, labels, input_size=size, ratios=tuple(sorted(ratios)),
                                 p=entry.norm, target_sparsity=sparsity, target_macs=target, round_to=round_to)
    if report.proposal is not None and report.proposal.layer_ratios():
        log(f"proposed: resopt prune {model_path} --method {method} --layer-ratios "
            f"{report.proposal.layer_ratios()}{f' --round-to {round_to}' if round_to else ''} --data {data.data} ...")
    return report

