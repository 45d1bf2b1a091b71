"""Knowledge distillation (Hinton et al. 2015): a student learns from labels and a teacher's soft outputs.

``kd_loss`` is the whole method; ``distill_model`` is the ``distill`` command's work (teacher .pt +
student architecture or .pt -> student .pt), and ``load_teacher`` / ``kd_loss_fn`` let ``prune``
fine-tune with a teacher too. Training itself is ``resopt.train.fit`` with a different loss, so every
trainer option (AMP, cosine schedule, seed, resume, DDP under torchrun) applies unchanged.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import (
    Preprocess,
    check_output_path,
    checkpoint_preprocess,
    lineage_entry,
    make_checkpoint,
    require_kind,
    save_checkpoint,
)
from resopt.console import log
from resopt.errors import UsageError
from resopt.ranges import check_fields

if TYPE_CHECKING:
    import torch
    from torch import nn

    from resopt.train import DataOptions, FitResult, LossFn, TrainConfig


@dataclass(frozen=True)
class DistillConfig:
    alpha: float = 0.5  # weight of the hard-label cross-entropy; 1 - alpha weighs the teacher term
    temperature: float = 4.0

    def validate(self) -> None:
        check_fields(self)  # alpha, temperature against resopt.ranges


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, alpha: float,
            temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``, batch mean.

    ``x_T = softmax(logits / T)``; the KL takes the teacher's softened distribution as the target, i.e.
    ``sum_c t_c * (log t_c - log s_c)``. Soft-target gradients shrink as ``1/T^2``; the ``T^2`` factor
    keeps their weight against the cross-entropy the same whatever the temperature (Hinton et al. 2015).
    """
    import torch.nn.functional as F

    t = temperature
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * ce + (1.0 - alpha) * t * t * kl


def kd_loss_fn(teacher: nn.Module, cfg: DistillConfig, *, label_smoothing: float = 0.0) -> LossFn:
    """A ``fit`` loss: the student trains on ``kd_loss``; the teacher runs in eval mode without gradients."""
    import torch

    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = next(teacher.parameters())
        if p.device != x.device:
            teacher.to(x.device)  # fit chooses the device; follow the student there on the first batch
        with torch.no_grad():
            t_logits = teacher(x)
        logits = net(x)
        return kd_loss(logits.float(), t_logits.float(), y, alpha=cfg.alpha, temperature=cfg.temperature,
                       label_smoothing=label_smoothing), logits

    return loss_fn


def load_teacher(path: Path, *, classes: list[str], preprocess: Preprocess, data: str) -> nn.Module:
    """A teacher checkpoint, frozen in eval mode, fed inputs normalized as ``preprocess`` says.

    The teacher must predict the data's classes in the data's order. If its own normalization differs
    from the student's (both are measured on the training images, so they can differ slightly with
    --limit-per-class), a pre-hook re-normalizes the student's batch for it; a different input size
    cannot be reconciled on the same batch and is refused.
    """
    import torch

    from resopt.artifacts import load_model
    from resopt.data import check_classes

    path = Path(path)
    require_kind(path, "pt", hint="the teacher must be a .pt checkpoint (train, prune or distill output)")
    teacher, ckpt = load_model(path)
    check_classes(ckpt["classes"], classes, model_name=f"teacher {path.name}", data=data)
    tpre = checkpoint_preprocess(ckpt)
    if (tpre.input_size, tpre.resize) != (preprocess.input_size, preprocess.resize):
        raise UsageError(f"teacher {path.name} takes {tpre.input_size}px inputs but the student takes "
                         f"{preprocess.input_size}px; they must see the same images",
                         hint="distill into a student trained at the teacher's input size")
    if (tpre.mean, tpre.std) != (preprocess.mean, preprocess.std):
        scale = torch.tensor([s / t for s, t in zip(preprocess.std, tpre.std, strict=True)]).view(1, 3, 1, 1)
        shift = torch.tensor([(ms - mt) / st for ms, mt, st in zip(preprocess.mean, tpre.mean, tpre.std,
                                                                    strict=True)]).view(1, 3, 1, 1)
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t: the raw pixels, normalized the teacher's way.
        teacher.register_forward_pre_hook(lambda _m, args: (args[0] * scale.to(args[0]) + shift.to(args[0]),))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def model_top1(model: nn.Module, dataset: Any, cfg: TrainConfig) -> float:
    """top-1 (%) of ``model`` on ``dataset`` on the training device (``resopt.verify.top1_of`` over the
    eval loader); the model comes back on CPU."""
    import torch

    from resopt.backends.cuda import resolve_device
    from resopt.data import make_loader
    from resopt.verify import top1_of

    device = resolve_device(cfg.device)
    model.to(device).eval()

    def predict(x: Any) -> Any:
        with torch.no_grad():
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()

    loader = make_loader(dataset, max(cfg.batch_size, 256), shuffle=False, workers=cfg.workers)
    try:
        return top1_of(predict, ((x.numpy(), y.numpy()) for x, y in loader))
    finally:
        model.to("cpu")


@dataclass
class DistillResult:
    output: Path
    teacher: Path
    student_arch: str
    student_source: str  # "scratch" or the student checkpoint's file name
    teacher_top1: float
    student_top1_before: float | None
    teacher_params: int
    teacher_macs: int
    student_params: int
    student_macs: int
    fit: FitResult
    train_images: int
    metrics: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"output": str(self.output), "teacher": str(self.teacher), "student_arch": self.student_arch,
                "student_source": self.student_source, "teacher_val_top1": round(self.teacher_top1, 3),
                "student_val_top1_before": None if self.student_top1_before is None
                else round(self.student_top1_before, 3),
                "teacher_params": self.teacher_params, "teacher_macs": self.teacher_macs,
                "student_params": self.student_params, "student_macs": self.student_macs,
                "train_images": self.train_images, **self.metrics, "history": self.fit.history}


def _is_checkpoint_arg(student: str) -> bool:
    return Path(student).suffix.lower() in (".pt", ".pth", ".onnx", ".engine", ".plan") or Path(student).is_file()


def distill_model(
    teacher: Path,
    student: str,
    data: DataOptions,
    cfg: TrainConfig,
    dcfg: DistillConfig,
    output: Path,
    *,
    width: float = 1.0,
    resume: bool = False,
    options: dict[str, Any] | None = None,
) -> DistillResult:
    """Train ``student`` (an architecture name, from scratch, or a .pt) against ``teacher`` on ``data``."""
    from resopt.artifacts import load_model
    from resopt.data import check_classes
    from resopt.models import build_model, count_macs, count_params, get_spec, model_widths
    from resopt.train import fit, measure_test, prepare_data, resume_path_for, seed_everything, split_metrics

    cfg.validate()
    dcfg.validate()
    teacher = Path(teacher)
    output = check_output_path(Path(output), teacher, data.data, student, suffixes=(".pt", ".pth"))
    check_output_path(resume_path_for(output), teacher, data.data, student, option="resume file")
    require_kind(teacher, "pt", hint="the teacher must be a .pt checkpoint (train, prune or distill output)")
    from resopt.artifacts import load_checkpoint

    t_ckpt = load_checkpoint(teacher)
    t_pre = checkpoint_preprocess(t_ckpt)

    student_ckpt: dict[str, Any] | None = None
    if _is_checkpoint_arg(student):
        s_path = Path(student)
        check_output_path(output, s_path)
        require_kind(s_path, "pt", hint="the student must be an architecture name or a .pt checkpoint")
        model, student_ckpt = load_model(s_path)
        arch, arch_kwargs = student_ckpt["arch"], dict(student_ckpt.get("arch_kwargs", {}))
        pre = checkpoint_preprocess(student_ckpt)
        if student_ckpt["classes"] != t_ckpt["classes"]:
            from resopt.errors import DataError

            raise DataError(f"student {s_path.name} predicts {len(student_ckpt['classes'])} classes "
                            f"{student_ckpt['classes'][:3]}... but teacher {teacher.name} predicts "
                            f"{len(t_ckpt['classes'])} {t_ckpt['classes'][:3]}...",
                            hint="teacher and student must be trained on the same classes")
    else:
        get_spec(student)  # unknown names fail here, listing the registry
        arch, arch_kwargs, pre = student, {"width": width}, t_pre
        model = None

    # The student keeps the validation split of its own lineage, else its teacher's.
    lineage_of_split = (student_ckpt or {}).get("lineage") or t_ckpt.get("lineage")
    prepared = prepare_data(data, preprocess=pre, device=cfg.device, lineage=lineage_of_split)
    check_classes(t_ckpt["classes"], prepared.classes, model_name=f"teacher {teacher.name}", data=data.data)
    t_model = load_teacher(teacher, classes=prepared.classes, preprocess=pre, data=data.data)
    if model is None:
        seed_everything(cfg.seed)
        model = build_model(arch, len(prepared.classes), width=width)
    else:
        check_classes(student_ckpt["classes"], prepared.classes, model_name=f"student {Path(student).name}",  # type: ignore[index]
                      data=data.data)

    main = int(os.environ.get("RANK", "0")) == 0
    teacher_top1 = model_top1(t_model, prepared.val, cfg)
    before = model_top1(model, prepared.val, cfg) if student_ckpt is not None else None
    if main:
        log(f"distilling {teacher.name} (val top-1 {teacher_top1:.2f}%) into {arch}"
            f"{'' if student_ckpt is None else f' from {Path(student).name} (val top-1 {before:.2f}%)'} on "
            f"{len(prepared.train)} images; alpha {dcfg.alpha}, temperature {dcfg.temperature}; choosing on "  # type: ignore
            f"val ({prepared.val_note})")
    result = fit(model, prepared.train, prepared.val, cfg,
                 loss_fn=kd_loss_fn(t_model, dcfg, label_smoothing=cfg.label_smoothing),
                 resume_path=resume_path_for(output), resume=resume, description=f"distill {arch}",
                 val_note=prepared.val_note)
    test = measure_test(model, prepared, cfg, what=f"distill {arch}")
    t_model.to("cpu")
    t_params, _ = count_params(t_model)
    s_params, _ = count_params(model)
    t_macs, s_macs = count_macs(t_model, pre.input_size), count_macs(model, pre.input_size)
    metrics = {**split_metrics(result, (result.best_top1, result.best_top5), test, prepared),
               "params": s_params, "macs": s_macs, "teacher_val_top1": round(teacher_top1, 3),
               "teacher_params": t_params, "teacher_macs": t_macs}
    if before is not None:
        metrics["val_top1_before"] = round(before, 3)
    opts = {"teacher": str(teacher), "student": student, "width": width, "data": data.data,
            "limit_per_class": data.limit_per_class, "val_split": prepared.val_split.fraction,
            "data_path": data.data_path, **asdict(dcfg), **asdict(cfg),
            **(options or {})}
    parent = Path(student) if student_ckpt is not None else None
    lineage = list(student_ckpt.get("lineage", [])) if student_ckpt is not None else []
    lineage.append(lineage_entry("distill", options=opts, parent=parent,
                                 metrics={**metrics, "history": result.history},
                                 extra_parents={"teacher": teacher}))
    ckpt = make_checkpoint(arch=arch, arch_kwargs=arch_kwargs, state_dict=model.state_dict(),
                           classes=prepared.classes, preprocess=pre, lineage=lineage, metrics=metrics,
                           widths=model_widths(model))
    if main:
        save_checkpoint(ckpt, output)
    return DistillResult(output=output, teacher=teacher, student_arch=arch,
                         student_source="scratch" if student_ckpt is None else Path(student).name,
                         teacher_top1=teacher_top1, student_top1_before=before, teacher_params=t_params,
                         teacher_macs=t_macs, student_params=s_params, student_macs=s_macs, fit=result,
                         train_images=len(prepared.train), metrics=metrics)  # type: ignore[arg-type]

