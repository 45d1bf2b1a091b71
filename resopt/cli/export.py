"""``resopt export``: .pt -> .onnx, verified against PyTorch on real images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from resopt.cli.common import JsonOpt, check_options, default_output, emit, human_bytes, human_count, kv_table


def export_cmd(
    model: Annotated[Path, typer.Argument(help="Checkpoint to export (.pt).", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="ONNX file to write [default: MODEL.onnx "
                                                "next to MODEL.pt].", show_default=False)] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (17 or later; 17 needs --exporter "
                                       "torchscript).")] = 18,
    exporter: Annotated[str, typer.Option("--exporter", help="dynamo (torch.export, the default) or torchscript "
                                          "(the legacy exporter, deprecated by PyTorch).")] = "dynamo",
    data: Annotated[str | None, typer.Option("--data", "-d", help="Real images to verify on: a folder (its "
                                             "test/ split, or class folders directly) or cifar10/cifar100 "
                                             "[default: the repository's calib/ set for the model's classes].",
                                             show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="Split of --data to verify on: test or train.")] = "test",
    num_verify: Annotated[int, typer.Option("--num-verify", help="Images to verify on (class-balanced).")] = 100,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Allowed max |ORT - PyTorch| logit difference, "
                                             "as a fraction of the largest |logit| (at least 1).")] = 1e-3,
    json_: JsonOpt = False,
) -> None:
    """Export a checkpoint to ONNX (dynamic batch axis) and verify it with onnxruntime on real images.

    The graph is cleaned with onnx-graphsurgeon, checked with onnx.checker and shape inference, compared
    with PyTorch (max abs logit difference, top-1 agreement) and stamped with the checkpoint's metadata
    and lineage. A failed comparison exits with code 6 and writes nothing.

    Example: resopt export r20.pt -o r20.onnx --data examples/cifar10-mini
    """
    check_options(locals())
    from resopt.export import ExportConfig, export_onnx

    cfg = ExportConfig(opset=opset, exporter=exporter, data=data, split=split, num_verify=num_verify,
                       tolerance=tolerance)
    result = export_onnx(model, output or default_output(model, ".onnx"), cfg)
    emit(result.summary(), json_out=json_, render=_render)


def _render(d: dict[str, Any]) -> Any:
    v = d["verification"]
    return kv_table(f"exported {d['arch']} -> {d['output']}", [
        ("exporter", f"{d['exporter']} (opset {d['opset']})"),
        ("params", human_count(d["params"])),
        ("MACs", human_count(d["macs"])),
        ("file size", human_bytes(d["file_size"])),
        ("BatchNorm left", d["batchnorm_nodes"]),
        ("verified on", f"{v['images']} images of {v['data']} (batches of {', '.join(map(str, v['batch_sizes']))})"),
        ("max |ORT - PyTorch|", f"{v['max_abs_diff']:.3g} (allowed {v['allowed_abs_diff']:.3g})"),
        ("mean |ORT - PyTorch|", f"{v['mean_abs_diff']:.3g}"),
        ("top-1 agreement", f"{v['top1_agreement']:.1f}%"),
        ("time", f"{d['seconds']:.1f}s"),
    ])
