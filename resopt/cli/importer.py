"""``resopt import``: a model trained elsewhere (PyTorch checkpoint or ONNX) -> a resopt artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from resopt.cli.common import JsonOpt, LimitOpt, check_options, emit, kv_table


def import_cmd(
    source: Annotated[Path, typer.Argument(help="Foreign model: .pt .pth .th .ckpt .tar (state dict) or .onnx.",
                                           show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Artifact to write: .pt for PyTorch "
                                                "sources, .onnx for ONNX ones [default: SOURCE.pt, "
                                                "SOURCE.resopt.onnx].", show_default=False)] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Normalization mean R,G,B the model was trained "
                                             "with (inputs in [0, 1]).", show_default=False)] = None,
    std: Annotated[str | None, typer.Option("--std", help="Normalization std R,G,B.", show_default=False)] = None,
    input_size: Annotated[int | None, typer.Option("--input-size", help="Input size in pixels [default: the "
                                                   "architecture's, or the ONNX graph's].",
                                                   show_default=False)] = None,
    resize: Annotated[int | None, typer.Option("--resize", help="Resize to N, then center-crop --input-size "
                                               "[default: none up to 64 px, else size/0.875].",
                                               show_default=False)] = None,
    classes: Annotated[str | None, typer.Option("--classes", help="Class names in output order: a comma list "
                                                "or a text file, one per line [default: --data's class "
                                                "folders].", show_default=False)] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Data whose class folders name the classes "
                                             "and whose test split measures top-1/top-5.",
                                             show_default=False)] = None,
    limit_per_class: LimitOpt = None,
    arch: Annotated[str | None, typer.Option("--arch", help="Target architecture (resopt info --archs) "
                                             "[default: inferred from the tensor shapes].",
                                             show_default=False)] = None,
    rename: Annotated[list[str] | None, typer.Option("--rename", help="OLD=NEW: a regex substitution on the "
                                                     "source's key names (repeatable).",
                                                     show_default=False)] = None,
    json_: JsonOpt = False,
) -> None:
    """Import a model trained elsewhere: a PyTorch state dict becomes a resopt .pt, an ONNX file a stamped .onnx.

    Keys are mapped onto a registry ResNet by name, common aliases, then module order and shapes;
    zero-padding (option A) CIFAR shortcuts are converted exactly into 1x1 projections. ONNX files get a
    dynamic batch axis and opset >= 13, checked against the source. With --data, top-1/top-5 on its test
    split are measured; near-chance accuracy is an error (exit 6).

    Example: resopt import resnet56.th --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --data cifar10 -o r56.pt
    """
    check_options(locals())
    from resopt.importer import ImportConfig, import_model, parse_floats

    cfg = ImportConfig(mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), input_size=input_size,
                       resize=resize, classes=classes, data=data, limit_per_class=limit_per_class, arch=arch,
                       renames=tuple(rename or ()))
    result = import_model(source, output, cfg)
    emit(result.summary(), json_out=json_, render=_render)


def _render(d: dict[str, Any]) -> Any:
    pre = d["preprocess"]
    rows: list[tuple[str, Any]] = [
        ("source", f"{d['source']} ({d['format']}, sha256 {d['sha256'][:12]})"),
        ("arch", d["arch"] + (f" (width {d['width']:g}; {d['arch_reason']})" if "width" in d else "")),
        ("classes", f"{d['num_classes']} from {d['classes_from']}"),
        ("preprocess", f"{pre['input_size']}px, resize {pre['resize'] or 'none'}, mean {pre['mean']}, "
                       f"std {pre['std']}"),
    ]
    if "mapping_rules" in d:
        rows.append(("key mapping", ", ".join(f"{k} {v}" for k, v in d["mapping_rules"].items())))
        rows.append(("shortcuts", d["shortcuts"]))
    if "opset_from" in d:
        v = d["verification"]
        rows.append(("opset", f"{d['opset_from']} -> {d['opset_to']}"))
        rows.append(("batch", f"{d['fixed_batch']} -> dynamic" if d["fixed_batch"] is not None else "dynamic"))
        rows.append(("checked", f"{v['images']} images: max |imported - source| {v['max_abs_diff']:.3g}, "
                                f"top-1 agreement {v['top1_agreement']:.1f}%"))
    m = d["metrics"]
    if "top1" in m:
        split = m["split"]
        rows.append(("top-1 / top-5", f"{m['top1']:.2f}% / {m['top5']:.2f}% on {m['eval_images']} {split} images"))
    rows.append(("time", f"{d['seconds']:.1f}s"))
    return kv_table(f"imported -> {d['output']}", rows)
