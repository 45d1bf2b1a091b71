"""``resopt quantize``: FP32 .onnx -> INT8 / dynamic INT8 / FP16 .onnx, verified against its parent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from resopt.cli.common import (
    DataOpt,
    JsonOpt,
    LimitOpt,
    SeedOpt,
    check_options,
    default_output,
    emit,
    given_flags,
    human_bytes,
)
from resopt.quantize.modes import mode_help


def quantize_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="FP32 model: .onnx from `resopt export` (a .pt for qat, kmeans, "
                                          "fixed).",
                                          show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="ONNX file to write [default: "
                                                "MODEL.<mode>.onnx next to MODEL].", show_default=False)] = None,
    mode: Annotated[str, typer.Option("--mode", "-m", help=mode_help())] = "int8",
    target: Annotated[str, typer.Option("--target", help="Q/DQ flavour for --mode int8: cpu (onnxruntime on "
                                        "x86: uint8 activations) or trt (TensorRT: symmetric int8).")] = "cpu",
    calib_data: Annotated[str | None, typer.Option("--calib-data", help="Calibration images: a folder (class "
                                                   "subfolders, or a data root whose train/ is used), cifar10/"
                                                   "cifar100, or a saved set (.npz) [default: the repository's "
                                                   "calib/ set for the model's classes].",
                                                   show_default=False)] = None,
    num_calib: Annotated[int, typer.Option("--num-calib", help="Calibration images, sampled class-balanced "
                                           "with --seed.")] = 320,
    calib_method: Annotated[str, typer.Option("--calib-method", help="Activation ranges: minmax, entropy or "
                                              "percentile.")] = "minmax",
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="One scale per weight tensor instead of "
                                             "one per output channel.")] = False,
    reduce_range: Annotated[bool | None, typer.Option("--reduce-range/--no-reduce-range", help="7-bit weights "
                                                      "[default: only for --target cpu on x86 CPUs without "
                                                      "VNNI].",
                                                      show_default=False)] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Keep this node in FP32 (repeat, or "
                                                      "comma-separate).", show_default=False)] = None,
    data: DataOpt = None,
    limit_per_class: LimitOpt = None,
    min_agreement: Annotated[float | None, typer.Option("--min-agreement", help="Fail (exit 6) if fewer than "
                                                        "this percent of images get the parent's top-1 class "
                                                        "[default: 90 for INT8, 99 for FP16].",
                                                        show_default=False)] = None,
    save_calib: Annotated[Path | None, typer.Option("--save-calib", help="Also write the sampled calibration "
                                                    "set to this .npz, for --calib-data later.",
                                                    show_default=False)] = None,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="Accuracy guard (--mode int8/fixed, needs "
                                                   "--data): keep the most sensitive layers in FP32 until top-1 "
                                                   "drops at most this many points; exit 7 if none does.",
                                                   show_default=False)] = None,
    max_exclude: Annotated[int | None, typer.Option("--max-exclude", help="Most layers the guard may keep in "
                                                    "FP32 [default: a quarter of them].",
                                                    show_default=False)] = None,
    ptq: Annotated[str | None, typer.Option("--ptq", help="--mode int8, w4a8: post-training steps before "
                                            "quantizing, any of cle,bias-correction,adaround in that order (cross-layer "
                                            "equalization, bias correction, learned rounding), seeded by --seed.",
                                            show_default=False)] = None,
    clusters: Annotated[int, typer.Option("--clusters", help="--mode kmeans: shared values per layer "
                                          "(2..256).")] = 256,
    bits: Annotated[int, typer.Option("--bits", help="--mode fixed: weight bits (2..8).")] = 8,
    act_bits: Annotated[int | None, typer.Option("--act-bits", help="--mode fixed: also round the inputs of "
                                                 "every layer to this many bits (2..8) [default: float].",
                                                 show_default=False)] = None,
    int8_ends: Annotated[bool, typer.Option("--int8-ends/--int4-ends", help="--mode w4a8: keep the first conv "
                                            "and the classifier at 8 bits (--int4-ends: 4 bits too).")] = True,
    epochs: Annotated[int, typer.Option("--epochs", help="--mode qat: fine-tuning epochs.")] = 3,
    lr: Annotated[float, typer.Option("--lr", help="--mode qat: peak learning rate (cosine decay; BatchNorm is "
                                      "frozen, so keep it small).")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="--mode qat: batch size.")] = 128,
    amp: Annotated[bool, typer.Option(help="--mode qat: mixed precision on CUDA.")] = True,
    device: Annotated[str, typer.Option(help="--mode qat: auto, cpu, cuda or cuda:N.")] = "auto",
    data_path: Annotated[str, typer.Option("--data-path", help="--mode qat: fast (decoded tensors, augmented per "
                                           "batch), pil or auto (fast for small images that fit in memory).")
                         ] = "auto",
    select: Annotated[str, typer.Option("--select", help="--mode qat: the epoch kept: best (by val top-1) or "
                                        "last (for data too small to choose on).")] = "best",
    seed: SeedOpt = 0,
    json_: JsonOpt = False,
) -> None:
    """Quantize a model and verify the result against its parent on real images.

    --mode int8 (default) calibrates activation ranges on real images with the model's own
    preprocessing and writes a Q/DQ ONNX: --target cpu (uint8 activations, int8 per-channel weights,
    onnxruntime pre-processing: the fastest with onnxruntime on x86) or --target trt (symmetric int8,
    residual adds in INT8, for TensorRT). w4a8 stores int4 per-channel weights packed in the file (opset 21
    Q/DQ, about 8x smaller than FP32) with calibrated uint8 activations, the first conv and the classifier at
    int8 (--int4-ends: at 4 bits too). int8-dynamic and fp16 need no calibration. kmeans (--clusters)
    and fixed (--bits, --act-bits) take an .onnx or a .pt (w4a8 too); qat fine-tunes a .pt with fake quantization
    (--epochs, --lr, --data) and exports it. With --data, top-1/top-5 of the result and its parent are
    measured on the test split, and --max-drop keeps the most sensitive layers in FP32 until the drop is
    within bounds (exit 7 when no setting meets it).

    Example: resopt quantize r20.onnx --mode int8 -o r20.int8.onnx --data examples/cifar10-mini
    """
    values = dict(locals())
    check_options(values)
    from dataclasses import fields

    from resopt.quantize import QuantizeConfig, check_options_apply, get_mode, quantize_model

    entry = get_mode(mode)
    cfg = QuantizeConfig(mode=mode, target=target, calib_data=calib_data, num_calib=num_calib,
                         calib_method=calib_method, per_channel=not per_tensor, reduce_range=reduce_range,
                         seed=seed, data=data, limit_per_class=limit_per_class, min_agreement=min_agreement,
                         exclude=_split(exclude), save_calib=save_calib, max_drop=max_drop,
                         max_exclude=max_exclude, ptq=_split([ptq] if ptq else None), options=entry.options(**{f.name: values[f.name]
                                                                          for f in fields(entry.options)}))
    check_options_apply(cfg, given_flags(ctx))  # an option the mode does not use is an error, not ignored
    result = quantize_model(model, output or default_output(model, f".{mode}.onnx"), cfg)
    emit(result.summary(), json_out=json_, render=_render)


def _split(values: list[str] | None) -> tuple[str, ...]:
    return tuple(v.strip() for item in values or [] for v in item.split(",") if v.strip())


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _render(d: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s = d["settings"]
    table = Table(title=f"quantize --mode {d['mode']}: {d['parent']['file']} -> {d['output']}", title_justify="left")
    for col in ("model", "file", "size", "top-1", "top-5"):
        table.add_column(col, justify="left" if col in ("model", "file") else "right")
    p, r = d["parent"], d["result"]
    table.add_row("parent (fp32)", p["file"], human_bytes(p["size_bytes"]), _pct(p["top1"]), _pct(p["top5"]))
    table.add_row(d["mode"], r["file"], f"{human_bytes(r['size_bytes'])} ({d['compression']:.1f}x smaller)",
                  _pct(r["top1"]), _pct(r["top5"]))
    if d.get("qat"):
        qa = d["qat"]
        table.add_row("PTQ int8", "(not written)", "", _pct(qa["top1_ptq"]), "-")
        table.add_row("QAT fake-quant", "(PyTorch)", "", _pct(qa["top1_qat_fakequant"]), "-")
    lines = [f"agreement with {d.get('agreement_with', 'parent')}: {d['agreement']:.2f}% of "
             f"{d['agreement_images']} {d['agreement_on']} images",
             "settings: " + ", ".join(f"{k}={v}" for k, v in s.items())]
    if d.get("lint"):
        lint = d["lint"]
        counts = ", ".join(f"{q}/{t} {op}" for op, (q, t) in lint["counts"].items())
        lines.append(f"INT8: {counts}; {100 * lint['int8_mac_fraction']:.2f}% of MACs")
        for la in lint["not_int8"][:12]:
            lines.append(f"  FP32 {la['op']} {la['name']}: {la['reason']}")
        if len(lint["not_int8"]) > 12:
            lines.append(f"  ... and {len(lint['not_int8']) - 12} more (--json)")
    if d.get("runtime_int8"):
        runs = [f"{name} {c['int8']}/{c['layers']}" if "int8" in c else f"{name} not measured ({c['skipped']})"
                for name, c in d["runtime_int8"].items()]
        lines.append(f"conv/matmul layers executed in INT8: {', '.join(runs)}")
    if d.get("guard"):
        g = d["guard"]
        steps = ", ".join(f"{st['excluded']} in FP32: drop {st['drop']:.2f}" for st in g["steps"])
        lines.append(f"accuracy guard (--max-drop {g['max_drop']:g}): {steps}")
    if d.get("calibration"):
        c = d["calibration"]
        lines.append(f"calibration: {c['images']} images from {c['source']} (sha256 {c['sha256'][:12]})")
    if d.get("w4a8"):
        w = d["w4a8"]
        bits = list(w["layer_bits"].values())
        lines.append(f"weights: {bits.count(4)} layers int4 ({w['int4_weights']:,} weights, packed 2 per byte), "
                     f"{bits.count(8)} int8 ({', '.join(w['int8_layers']) or 'none'})"
                     + (f", {w['float_weights']:,} float" if w["float_weights"] else ""))
    if d.get("clustered"):
        worst = min(d["clustered"], key=lambda c: c["sqnr_db"])
        lines.append(f"k-means: {len(d['clustered'])} weights clustered; lowest weight SQNR "
                     f"{worst['sqnr_db']:.1f} dB ({worst['weight']})")
    lines.append(f"time: {d['seconds']:.1f}s")
    return Group(table, Text("\n".join(lines)))
