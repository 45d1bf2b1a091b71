"""Option aliases shared by the commands, and the output sink (results to stdout, nothing else)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

# The numeric options' ranges are declared once, in the library (``resopt.ranges``), and the configs' ``validate``
# read the same table; ``check_options(locals())`` is the first line of a command.
from resopt.ranges import RANGES as RANGES
from resopt.ranges import check_options as check_options
from resopt.ranges import check_range as check_range

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
DataOpt = Annotated[str | None, typer.Option("--data", "-d", help="ImageFolder with train/ and test/, or cifar10/cifar100.")]
LimitOpt = Annotated[int | None, typer.Option("--limit-per-class", help="Use at most N images per class (class-balanced).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (same seed, same result on CPU).")]


def output_opt(help_text: str = "Output file.") -> Any:
    return typer.Option("--output", "-o", help=help_text)


def model_arg(help_text: str) -> Any:
    return typer.Argument(..., help=help_text, show_default=False)


def emit(data: dict[str, Any], *, json_out: bool, render: Any = None, min_width: int | None = None) -> None:
    """Print one result: a JSON document, or whatever ``render(data)`` returns (a Rich renderable).

    ``min_width``: when stdout is not a terminal (a file, a pipe, a CI log), render at least this wide
    instead of Rich's 80 columns, so a wide table is not folded into unreadable cells.
    Under torchrun only rank 0 prints, so a data-parallel command still gives exactly one result.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if json_out or render is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False)
    if min_width and not console.is_terminal and console.width < min_width:
        console = Console(highlight=False, soft_wrap=False, width=min_width)
    console.print(render(data))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def human_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, str(v))
    return table


def split_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows a training command's table shows: val (what the epoch was chosen on) and test (measured
    once, after the choice), each with its image count."""
    val = f"{d['val_top1']:.2f}% / {d['val_top5']:.2f}% ({d['val_images']:,} images)"
    chosen = "last epoch" if d.get("select") == "last" else "best epoch"
    rows = [(f"val top-1 / top-5 ({chosen} {d['best_epoch']})", val)]
    if d.get("test_top1") is not None:
        rows.append(("test top-1 / top-5", f"{d['test_top1']:.2f}% / {d['test_top5']:.2f}% "
                                           f"({d['test_images']:,} images, measured once, after the choice)"))
    else:
        rows.append(("test top-1", "- (the data has no test split)"))
    return rows


def given_flags(ctx: typer.Context) -> list[str]:
    """The flags the user typed (an explicit default counts: ``--target cpu --mode fp16`` is refused too), each
    by its long name. The parameter source is compared by name: typer ships its own copy of click's
    ``ParameterSource``."""
    typed = []
    for p in ctx.command.params:
        if p.param_type_name != "option":  # arguments are always given
            continue
        source = ctx.get_parameter_source(p.name) if p.name else None
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            typed.append(next((o for o in p.opts if o.startswith("--")), p.opts[0]))
    return typed


def default_output(model: Path, suffix: str) -> Path:
    """``r20.pt`` + ``.onnx`` -> ``r20.onnx``; ``r20.onnx`` + ``.int8.onnx`` -> ``r20.int8.onnx``."""
    return model.with_name(model.name[: -len(model.suffix)] + suffix)


# Trainer options shared by the commands that train (train, distill; prune's fine-tuning): same names, same help.
EpochsOpt = Annotated[int, typer.Option("--epochs", help="Training epochs.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Peak learning rate [default: 0.1*batch/128 SGD, 1e-3 AdamW].",
                                             show_default=False)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same command.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Batch size (per process under torchrun).")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd (momentum, Nesterov) or adamw.")]
MomentumOpt = Annotated[float, typer.Option("--momentum", help="SGD momentum.")]
NesterovOpt = Annotated[bool, typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum for SGD.")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", "--wd", help="Weight decay (not on BN/bias).")]
WarmupOpt = Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up before the cosine decay.")]
LabelSmoothingOpt = Annotated[float, typer.Option("--label-smoothing", help="Label smoothing for the cross-entropy.")]
AmpOpt = Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (bf16 or fp16).")]
ChannelsLastOpt = Annotated[bool, typer.Option("--channels-last/--no-channels-last",
                                               help="channels_last memory format on CUDA.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="DataLoader worker processes [default: auto].")]
ValSplitOpt = Annotated[float | None, typer.Option(
    "--val-split", help="Fraction of each class of train held out for validation (every choice is made on "
    "it; test is reported) [default: the data's val/ when it has train/, val/ and test/, else 0.1; a model's "
    "recorded hold-out for its children].", show_default=False)]
SelectOpt = Annotated[str, typer.Option(
    "--select", help="The epoch kept: best (by val top-1) or last (for data too small to choose on).")]
DataPathOpt = Annotated[str, typer.Option(
    "--data-path", help="fast: decode small images once into a tensor and augment batches on the training "
    "device; pil: decode and augment per image every epoch; auto: fast for images up to 64 px when they fit "
    "in a quarter of free RAM (and GPU memory).")]
TimeBudgetOpt = Annotated[float | None, typer.Option(
    "--time-budget", help="Seconds of training: after the first epoch, plan as many epochs as fit (at most "
    "--epochs; the cosine schedule ends there), and stop after any epoch that ends past the budget.",
    show_default=False)]


def train_config(values: dict[str, Any], **overrides: Any) -> Any:
    """The one ``TrainConfig`` builder of the commands that train (train, distill, prune's fine-tuning): every
    field from the command's parameter of the same name (pass ``locals()``), then ``overrides``. A trainer
    option added to ``TrainConfig`` and declared on a command reaches it without another hand-written copy."""
    from dataclasses import fields

    from resopt.train import TrainConfig

    given = {f.name: values[f.name] for f in fields(TrainConfig) if f.name in values}
    return TrainConfig(**{**given, **overrides})
