"""``resopt train``: data -> .pt"""

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


def train_cmd(
    data: DataOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.pt).")] = Path("model.pt"),
    arch: Annotated[str, typer.Option("--arch", "-a", help="Architecture (see `resopt info --archs`).")] = "resnet20",
    epochs: EpochsOpt = 30,
    time_budget: TimeBudgetOpt = None,
    batch_size: BatchSizeOpt = 128,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = "sgd",
    momentum: MomentumOpt = 0.9,
    nesterov: NesterovOpt = True,
    weight_decay: WeightDecayOpt = 5e-4,
    warmup_epochs: WarmupOpt = 1.0,
    label_smoothing: LabelSmoothingOpt = 0.0,
    amp: AmpOpt = True,
    channels_last: ChannelsLastOpt = True,
    width: Annotated[float, typer.Option(help="Channel width multiplier (e.g. 0.25 for quick runs).")] = 1.0,
    pretrained: Annotated[bool, typer.Option(help="Start from torchvision ImageNet weights (needs network).")] = False,
    input_size: Annotated[int | None, typer.Option(help="Input resolution [default: native for <=64px images, else 224].")] = None,
    limit_per_class: LimitOpt = None,
    val_split: ValSplitOpt = None,
    select: SelectOpt = "best",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    data_path: DataPathOpt = "auto",
    resume: ResumeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Train a classifier from scratch (or from ImageNet weights) and write a .pt checkpoint.

    Keeps the best epoch by top-1 on the validation split (the data's val/, or 10% of train held out),
    then measures test top-1 once. Runs data-parallel under torchrun.

    Example: resopt train --arch resnet20 --data cifar10 --epochs 30 -o r20.pt
    """
    check_options(locals())
    from resopt.train import DataOptions, train_model, training_data

    data = training_data(data, needs="train needs --data (a folder with train/ and test/, or cifar10/cifar100)",
                         hint="resopt train --arch resnet20 --data examples/cifar10-mini -o r20.pt")
    cfg = train_config(locals())
    result = train_model(arch, DataOptions(data, limit_per_class, val_split, seed, data_path), cfg, output, width=width,
                         pretrained=pretrained, input_size=input_size, resume=resume)
    emit(result.summary(), json_out=json_, render=_render)


def _render(d: dict[str, Any]) -> Any:
    return kv_table(f"trained {d['arch']} -> {d['output']}", [
        ("params", human_count(d["params"])), ("MACs", human_count(d["macs"])),
        *split_rows(d),
        ("time", f"{d['train_seconds']:.1f}s, {d['epochs']} epochs ({d['train_images_per_sec']:.0f} img/s on "
                 f"{d['device']}, {d['data_path']} data path)"),
    ])
