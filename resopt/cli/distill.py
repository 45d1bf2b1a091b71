"""``resopt distill``: teacher .pt + student (architecture or .pt) -> student .pt trained on the teacher's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from resopt.cli.common import (
    AmpOpt,
    BatchSizeOpt,
    ChannelsLastOpt,
    DataOpt,
    DataPathOpt,
    DeviceOpt,
    EpochsOpt,
    JsonOpt,
    LabelSmoothingOpt,
    LimitOpt,
    LrOpt,
    MomentumOpt,
    NesterovOpt,
    OptimizerOpt,
    ResumeOpt,
    SeedOpt,
    SelectOpt,
    TimeBudgetOpt,
    ValSplitOpt,
    WarmupOpt,
    WeightDecayOpt,
    WorkersOpt,
    check_options,
    emit,
    human_count,
    kv_table,
    split_rows,
    train_config,
)


def distill_cmd(
    teacher: Annotated[Path, typer.Option("--teacher", "-t", help="Teacher checkpoint (.pt).", show_default=False)],
    student: Annotated[str, typer.Option("--student", "-s", help="Student: an architecture name (trained from "
                                         "scratch; see `resopt info --archs`) or a .pt to continue from.",
                                         show_default=False)],
    data: DataOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Student checkpoint to write (.pt).")]
    = Path("student.pt"),
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the label cross-entropy; 1 - alpha weighs "
                                         "the teacher term.")] = 0.5,
    temperature: Annotated[float, typer.Option("--temperature", "-T", help="Softmax temperature of the teacher "
                                               "term.")] = 4.0,
    width: Annotated[float, typer.Option("--width", help="Channel width multiplier of a student built from an "
                                         "architecture name.")] = 1.0,
    epochs: EpochsOpt = 30,
    lr: LrOpt = None,
    limit_per_class: LimitOpt = None,
    val_split: ValSplitOpt = None,
    batch_size: BatchSizeOpt = 128,
    optimizer: OptimizerOpt = "sgd",
    momentum: MomentumOpt = 0.9,
    nesterov: NesterovOpt = True,
    weight_decay: WeightDecayOpt = 5e-4,
    warmup_epochs: WarmupOpt = 1.0,
    label_smoothing: LabelSmoothingOpt = 0.0,
    amp: AmpOpt = True,
    channels_last: ChannelsLastOpt = True,
    select: SelectOpt = "best",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    data_path: DataPathOpt = "auto",
    time_budget: TimeBudgetOpt = None,
    resume: ResumeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Distil a teacher into a student: loss = alpha*CE + (1-alpha)*T^2*KL(teacher_T || student_T).

    The teacher runs in eval mode without gradients; the student trains with every trainer option of
    `train` (AMP, cosine schedule, seed, resume, DDP under torchrun). The student's lineage names the
    teacher by file and sha256.

    Example: resopt distill --teacher r56.pt --student resnet20 --alpha 0.5 --temperature 4 --epochs 30
    --data cifar10 -o r20.kd.pt
    """
    check_options(locals())
    from resopt.distill import DistillConfig, distill_model
    from resopt.train import DataOptions, training_data

    data = training_data(data, recorded_in=teacher, needs="distill needs --data (the images the teacher was trained on)",
                         hint="resopt distill --teacher r56.pt --student resnet20 --data cifar10 -o r20.kd.pt")
    cfg = train_config(locals())
    result = distill_model(teacher, student, DataOptions(data, limit_per_class, val_split, seed, data_path), cfg,
                           DistillConfig(alpha=alpha, temperature=temperature), output, width=width, resume=resume)
    emit(result.summary(), json_out=json_, render=_render)


def _render(d: dict[str, Any]) -> Any:
    rows = [
        ("teacher", f"{Path(d['teacher']).name}: {human_count(d['teacher_params'])} params, "
                    f"{human_count(d['teacher_macs'])} MACs"),
        ("student", f"{d['student_arch']} ({d['student_source']}): {human_count(d['student_params'])} params, "
                    f"{human_count(d['student_macs'])} MACs"),
        ("teacher val top-1", f"{d['teacher_val_top1']:.2f}%"),
    ]
    if d["student_val_top1_before"] is not None:
        rows.append(("student val top-1 before", f"{d['student_val_top1_before']:.2f}%"))
    rows += [
        *split_rows(d),
        ("time", f"{d['train_seconds']:.1f}s ({d['train_images_per_sec']:.0f} img/s on {d['device']})"),
    ]
    return kv_table(f"distilled -> {d['output']}", rows)
