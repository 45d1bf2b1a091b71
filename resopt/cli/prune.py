"""``resopt prune``: .pt -> smaller .pt (structured, soft-filter, unstructured, 2:4 or block), fine-tuned and
verified."""

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
    JsonOpt,
    LabelSmoothingOpt,
    LimitOpt,
    MomentumOpt,
    NesterovOpt,
    OptimizerOpt,
    SeedOpt,
    SelectOpt,
    ValSplitOpt,
    WarmupOpt,
    WeightDecayOpt,
    WorkersOpt,
    check_options,
    default_output,
    emit,
    given_flags,
    human_bytes,
    human_count,
    train_config,
)


def prune_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="Checkpoint to prune (.pt from train, distill or prune).",
                                          show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Pruned checkpoint to write "
                                                "[default: MODEL.pruned.pt].", show_default=False)] = None,
    data: DataOpt = None,
    method: Annotated[str, typer.Option("--method", "-m", help="l1-struct, l2-struct (remove channels), sfp (soft "
                                        "filter pruning), l1-unstruct (zero weights), 2:4 or block (remove "
                                        "residual blocks).")] = "l1-struct",
    sparsity: Annotated[float | None, typer.Option("--sparsity", "-s", help="Fraction removed: of each layer's "
                                                   "channels (structured, or in total with --global), or of the "
                                                   "weights (l1-unstruct).", show_default=False)] = None,
    target_macs: Annotated[float | None, typer.Option("--target-macs", help="Instead of --sparsity: the fraction "
                                                      "of the parent's MACs to keep (0.5 halves them).",
                                                      show_default=False)] = None,
    global_: Annotated[bool, typer.Option("--global", help="Rank channels (or weights) across layers instead of "
                                          "within each layer.")] = False,
    iterative: Annotated[bool, typer.Option("--iterative", help="Prune in --steps steps, fine-tuning "
                                            "--finetune-epochs after each.")] = False,
    steps: Annotated[int | None, typer.Option("--steps", help="Steps for --iterative [default: 5].",
                                              show_default=False)] = None,
    round_to: Annotated[str | None, typer.Option("--round-to", help="Keep pruned channel counts multiples of N "
                                                 "(e.g. 8 for tensor cores), or auto: the multiple --runtime and "
                                                 "--precision fill on this CPU (or GPU).", show_default=False)] = None,
    layer_ratios: Annotated[str | None, typer.Option("--layer-ratios", help="Per-stage, per-block or per-layer "
                                                     "ratios (0.1,0.2,0.3) or name=ratio pairs "
                                                     "(layer3=0.5,conv1=0.1).", show_default=False)] = None,
    target_latency: Annotated[float | None, typer.Option("--target-latency", help="Instead of --sparsity: the "
                                                         "fraction of the parent's latency to keep, measured on "
                                                         "--runtime here (a cached per-block latency table).",
                                                         show_default=False)] = None,
    latency_ms: Annotated[float | None, typer.Option("--latency-ms", help="Instead of --target-latency: "
                                                     "milliseconds per batch of --latency-batch on --runtime.",
                                                     show_default=False)] = None,
    runtime: Annotated[str | None, typer.Option("--runtime", help="What --target-latency, --latency-ms and "
                                                "--round-to auto are for: ort, openvino, torch or tensorrt "
                                                "[default: ort].", show_default=False)] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="Its precision: f32, bf16, int8 or fp16 "
                                                  "[default: f32].", show_default=False)] = None,
    latency_batch: Annotated[int | None, typer.Option("--latency-batch", help="Batch size latency is measured "
                                                      "at [default: 32].", show_default=False)] = None,
    blocks: Annotated[int | None, typer.Option("--blocks", help="--method block: how many residual blocks to "
                                               "remove (the least important on val).", show_default=False)] = None,
    analyze: Annotated[bool, typer.Option("--analyze", help="Measure each layer's top-1 drop at "
                                          "--analyze-ratios, print the table and propose --layer-ratios for "
                                          "--sparsity or --target-macs; writes no model.")] = False,
    analyze_ratios: Annotated[str, typer.Option("--analyze-ratios", help="Ratios --analyze tries per layer.")]
    = "0.25,0.5,0.75",
    analyze_images: Annotated[int, typer.Option("--analyze-images", help="Validation images --analyze uses "
                                                "(class-balanced).")] = 2000,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="Fine-tuning epochs after pruning "
                                                 "(after each step with --iterative).")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="Peak fine-tuning learning rate (cosine decay).")] = 0.01,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="Distil the fine-tuning from this .pt instead "
                                                 "of the unpruned parent.", show_default=False)] = None,
    no_distill: Annotated[bool, typer.Option("--no-distill", help="Fine-tune on the labels alone, without the "
                                             "parent (or --teacher) distilling.")] = False,
    alpha: Annotated[float, typer.Option("--alpha", help="Distillation: weight of the label loss.")] = 0.5,
    temperature: Annotated[float, typer.Option("--temperature", help="Distillation: softmax temperature.")] = 4.0,
    limit_per_class: LimitOpt = None,
    val_split: ValSplitOpt = None,
    select: SelectOpt = "best",
    batch_size: BatchSizeOpt = 128,
    optimizer: OptimizerOpt = "sgd",
    momentum: MomentumOpt = 0.9,
    nesterov: NesterovOpt = True,
    weight_decay: WeightDecayOpt = 5e-4,
    warmup_epochs: WarmupOpt = 0.0,
    label_smoothing: LabelSmoothingOpt = 0.0,
    amp: AmpOpt = True,
    channels_last: ChannelsLastOpt = True,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    data_path: DataPathOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Prune a checkpoint into a smaller one, fine-tune it, and compare it with its parent.

    Structured methods (l1-struct, l2-struct, sfp) remove whole channels through Torch-Pruning's
    dependency graph, so params, MACs and file size fall and the result exports, quantizes and runs
    faster anywhere. l1-unstruct and 2:4 zero weights: fewer non-zeros, but no faster on dense kernels.
    block removes whole residual blocks, the least important on val. Fine-tuning distills from the
    unpruned parent (--teacher names another, --no-distill uses the labels alone).

    Examples:

      resopt prune r20.pt --sparsity 0.5 --finetune-epochs 2 --data cifar10 -o r20.p50.pt

      resopt prune r56.pt --iterative --steps 5 --target-macs 0.5 --finetune-epochs 2 --data cifar10

      resopt prune r18.pt --method 2:4 --finetune-epochs 1 --data cifar10 -o r18.24.pt

      resopt prune r56.pt --method block --blocks 9 --finetune-epochs 2 --data cifar10 -o r56.d18.pt

      resopt prune r20.pt --analyze --sparsity 0.5 --data cifar10
    """
    check_options(locals())
    from resopt.errors import UsageError
    from resopt.prune import check_flags_apply
    from resopt.train import DataOptions, training_data

    # An option that would have no effect is an error, not ignored.
    check_flags_apply(method, given_flags(ctx), analyze=analyze, finetune=finetune_epochs > 0,
                      distill=not no_distill)

    data = training_data(data, recorded_in=model,
                         needs="prune needs --data to measure top-1 before and after (and to fine-tune on)",
                         hint="resopt prune r20.pt --sparsity 0.5 --data examples/cifar10-mini -o r20.p50.pt")
    data_opts = DataOptions(data, limit_per_class, val_split, seed, data_path)
    if analyze:
        from resopt.prune import analyze_checkpoint

        try:
            ratios = tuple(float(r) for r in analyze_ratios.split(",") if r.strip())
        except ValueError:
            raise UsageError(f"--analyze-ratios {analyze_ratios!r} is not a comma-separated list of numbers") \
                from None
        report = analyze_checkpoint(model, data=data_opts, method=method, ratios=ratios, sparsity=sparsity,
                                    target_macs=target_macs, round_to=_analyze_round_to(round_to),
                                    max_images=analyze_images)
        emit(report.to_dict(), json_out=json_, render=_render_analysis)
        return

    from resopt.prune import PruneConfig, prune_checkpoint

    cfg = PruneConfig(method=method, sparsity=sparsity, target_macs=target_macs, global_=global_,
                      iterative=iterative, steps=steps, round_to=_round_to(round_to), layer_ratios=layer_ratios,
                      target_latency=target_latency, latency_ms=latency_ms, runtime=runtime, precision=precision,
                      latency_batch=latency_batch,
                      finetune_epochs=finetune_epochs, teacher=teacher, alpha=alpha, temperature=temperature,
                      blocks=blocks, distill=not no_distill)
    train = train_config(locals(), epochs=max(1, finetune_epochs))
    result = prune_checkpoint(model, cfg, data=data_opts, train=train,
                              output=output or default_output(model, ".pruned.pt"))
    emit(result.summary(), json_out=json_, render=_render)


def _round_to(text: str | None) -> int | str | None:
    """``--round-to``: a whole number, or ``auto`` (resolved by the library for --runtime and --precision)."""
    from resopt.errors import UsageError

    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--round-to {text!r} is neither a whole number nor auto", hint="e.g. --round-to 8") from None
    if value < 1:  # before any file is read, as the range table checks the other numbers
        raise UsageError(f"--round-to must be at least 1, got {value}", hint="e.g. --round-to 8, or auto")
    return value


def _analyze_round_to(text: str | None) -> int | None:
    """--analyze proposes ratios for onnxruntime FP32 here: ``auto`` is the multiple it fills on this CPU."""
    value = _round_to(text)
    if value != "auto":
        return None if value is None else int(value)
    from resopt.console import log
    from resopt.latency import choose_round_to

    choice = choose_round_to("ort", "f32")
    log(f"--round-to auto: {choice.multiple} ({choice.reason})")
    return choice.multiple


def _fraction(after: float, before: float) -> str:
    return f"{after / before:.2f}x" if before else "-"


def _render(d: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    b, a = d["before"], d["after"]
    table = Table(title=f"{d['method']} {d['parent']} -> {d['output']}", title_justify="left")
    for col, justify in (("", "left"), ("parent", "right"), ("pruned", "right"), ("pruned / parent", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for label, key, fmt in (("params", "params", human_count), ("non-zero params", "nonzero_params", human_count),
                            ("MACs", "macs", human_count), ("file size", "file_bytes", human_bytes)):
        table.add_row(label, fmt(b[key]), fmt(a[key]), _fraction(a[key], b[key]))
    val = f"val top-1 ({d['val_images']:,} images)"
    table.add_row(f"{val}, no fine-tuning", f"{b['top1']:.2f}%", f"{d['val_top1_before_finetune']:.2f}%",
                  f"{d['val_top1_before_finetune'] - b['top1']:+.2f} pts")
    if d["finetune_epochs"]:
        table.add_row(f"{val}, fine-tuned {d['finetune_epochs']} epoch{'s' if d['finetune_epochs'] > 1 else ''}",
                      "", f"{a['top1']:.2f}%", f"{a['top1'] - b['top1']:+.2f} pts")
    if d["split"] == "test":
        table.add_row(f"test top-1 ({d['test_images']:,} images, measured once)", f"{d['parent_top1']:.2f}%",
                      f"{d['top1']:.2f}%", f"{d['top1'] - d['parent_top1']:+.2f} pts")
    if d["channel_sparsity"]:
        table.add_row("channels removed", "", f"{d['channel_sparsity']:.1%}", "")
    if d["weight_sparsity"]:
        table.add_row("zero weights", "", f"{d['weight_sparsity']:.1%}", "")
    parts: list[Any] = [table]
    if len(d["steps"]) > 1:
        steps = Table(title="iterative steps", title_justify="left")
        for col in ("step", "params", "MACs", "val top-1 pruned", "val top-1 fine-tuned"):
            steps.add_column(col, justify="right")
        for s in d["steps"]:
            ft = s.get("val_top1_finetuned")
            steps.add_row(str(s["step"]), human_count(s["params"]), human_count(s["macs"]),
                          f"{s['val_top1_pruned']:.2f}%", "-" if ft is None else f"{ft:.2f}%")
        parts.append(steps)
    if d["skipped_layers"]:
        parts.append(Text("skipped: " + ", ".join(f"{s['layer']} ({s['reason']})" for s in d["skipped_layers"])))
    parts += [Text(f"note: {n}") for n in d["notes"]]
    return Group(*parts)


def _render_analysis(d: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    ratios = [f"{r:g}" for r in d["ratios"]]
    table = Table(title=f"top-1 drop (points) per layer pruned alone; baseline {d['baseline_top1']:.2f}% on "
                        f"{d['images']} val images", title_justify="left")
    table.add_column("layer")
    table.add_column("channels", justify="right")
    table.add_column("convs", justify="right")
    for r in ratios:
        table.add_column(f"@{r}", justify="right")
    proposal = d.get("proposal")
    if proposal:
        table.add_column("proposed", justify="right")
    for row in d["layers"]:
        cells = [row["name"], str(row["channels"]), str(row["layers"])] + \
            [f"{row['top1_drop'][r]:+.2f}" for r in ratios]
        if proposal:
            cells.append(f"{proposal['ratios'][row['name']]:g}")
        table.add_row(*cells)
    parts: list[Any] = [table]
    if proposal:
        verdict = "reaches" if proposal["reached"] else "does NOT reach (the measured ratios run out)"
        parts.append(Text(f"proposal {verdict} the target: {proposal['channel_sparsity']:.1%} of the channels "
                          f"removed, {proposal['macs_fraction']:.3f} of the MACs, top-1 {proposal['top1']:.2f}% "
                          f"before fine-tuning"))
        # Folded, not cropped, at the terminal width; the library also logs it unbroken on stderr.
        round_to = f" --round-to {proposal['round_to']}" if proposal.get("round_to") else ""
        parts.append(Text(f"--layer-ratios {proposal['layer_ratios']}{round_to}", overflow="fold"))
    return Group(*parts)

