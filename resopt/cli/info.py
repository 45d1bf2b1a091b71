"""``resopt info``: what a model file is and the chain of commands that made it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from resopt.cli.common import JsonOpt, emit, human_bytes, human_count, kv_table


def info_cmd(
    model: Annotated[Path | None, typer.Argument(help="A .pt, .onnx or .engine file.", show_default=False)] = None,
    archs: Annotated[bool, typer.Option("--archs", help="List the model architectures instead.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Show a model file's kind, architecture, classes, parameters (non-zero too), MACs, size, input size,
    normalization and lineage (one row per command that shaped it). Engines are read from their JSON
    sidecar (validated like bench does), so no TensorRT is needed, with one line saying whether this
    machine can run the engine and why not; checkpoints are read without unpickling objects.

    Example: resopt info r20.int8.onnx        (or: resopt info --archs)
    """
    from resopt.errors import UsageError

    if archs == (model is not None):
        raise UsageError("info takes a model file or --archs (one of the two)",
                         hint="resopt info r20.onnx, or resopt info --archs")
    if archs:
        from resopt.info import list_archs

        emit({"archs": list_archs()}, json_out=json_, render=_render_archs, min_width=100)
        return
    from resopt.info import describe_model

    assert model is not None
    emit(describe_model(model).summary(), json_out=json_, render=_render, min_width=110)


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) and key in ("params", "nonzero_params", "macs"):
        return human_count(value)
    if key in ("top1_agreement", "agreement") and isinstance(value, (int, float)):
        return f"{value:.4g}%"  # percent of top-1 predictions shared with the parent (resopt.verify)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value).name or value  # paths: the name is what identifies them in a chain
    return str(value)


def _pairs(d: dict[str, Any]) -> str:
    return "\n".join(f"{k}={_fmt(k, v)}" for k, v in d.items()) or "-"


SPLIT_LABELLED = ("top1", "top5", "parent_top1")


def _metric_pairs(step: dict[str, Any]) -> str:
    """The step's metrics, each accuracy labelled with its split: ``top1=83.7 (test, 10,000 images)``,
    ``val_top1=84.1 (val)``; a step written before splits were recorded says ``split unknown``."""
    lines = []
    for k, v in step["metrics"].items():
        text = f"{k}={_fmt(k, v)}"
        if k in SPLIT_LABELLED and step.get("split"):
            n = step.get("split_images")
            text += f" ({step['split']}{f', {n:,} images' if n else ''})"
        elif k.startswith("val_"):
            text += " (val)"
        lines.append(text)
    return "\n".join(lines) or "-"


def _render(d: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    def count(v: int | None) -> str:
        return "unknown" if v is None else f"{human_count(v)} ({v:,})"

    nz = d["nonzero_params"]
    sparsity = f", {100 * (1 - nz / d['params']):.1f}% zero" if d["params"] and nz is not None else ""
    rows: list[tuple[str, Any]] = [
        ("kind", d["format"]),
        ("arch", d["arch"] or "unknown"),
        ("classes", f"{d['num_classes']}" + (f" ({', '.join(d['classes'][:5])}"
                                             f"{', ...' if d['num_classes'] > 5 else ''})" if d["classes"] else "")),
        ("params", count(d["params"])),
        ("non-zero params", count(nz) + sparsity),
        ("MACs / image", count(d["macs"])),
        ("file size", f"{human_bytes(d['file_size'])} (sha256 {d['sha256'][:12]})"),
        ("input size", f"{d['input_size']}x{d['input_size']}" if d["input_size"] else "unknown"),
        ("normalization", f"mean {_floats(d['mean'])}, std {_floats(d['std'])}" if d["mean"] else "unknown"),
    ]
    details = d["details"]
    if "runs_here_reason" in details:
        rows.append(("runs here", details["runs_here_reason"]))
    if "ops" in details:
        rows.append(("ops", ", ".join(f"{k} {v}" for k, v in list(details["ops"].items())[:8])))
    facts = kv_table(escape(d["path"]), [(k, escape(str(v))) for k, v in rows])
    if not d["lineage_steps"]:
        return Group(facts, "no lineage recorded (not written by resopt?)")
    lineage = Table(title="lineage (oldest first)", title_justify="left")
    for col in ("#", "command", "time", "options", "parent", "metrics"):
        lineage.add_column(col, overflow="fold")
    for i, s in enumerate(d["lineage_steps"], 1):
        parent = f"{s['parent_file']} @ {s['parent_sha256'][:12]}" if s["parent_file"] else "-"
        when = s["time"][:16].replace("T", " ") + (" UTC" if s["time"].endswith("+00:00") else "")
        lineage.add_row(str(i), s["command"], when, escape(_pairs(s["options"])),
                        escape(parent), escape(_metric_pairs(s)))
    return Group(facts, lineage)


def _floats(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _render_archs(d: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="architectures (resopt train --arch NAME)", title_justify="left")
    for col in ("name", "input size", "description"):
        table.add_column(col)
    for a in d["archs"]:
        table.add_row(a["name"], str(a["input_size"]), a["description"])
    return table
