"""``resopt build``: .onnx -> TensorRT .engine (+ .engine.json sidecar), checked against the ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from resopt.cli.common import DataOpt, JsonOpt, LimitOpt, check_options, emit, human_bytes, kv_table


def build_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX model (FP32, or Q/DQ INT8 from `resopt quantize --target trt`).",
                                          show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Engine to write (.engine) [default: MODEL "
                                                "with .engine, or .fp16.engine with --fp16].")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 engine: TensorRT 11 converts the ONNX to FP16 first "
                                       "(IO and sensitive ops stay FP32); TensorRT 10 sets the FP16 flag.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 engine: from a Q/DQ ONNX, or with --calib-data "
                                       "(TensorRT 10 only). A Q/DQ ONNX builds INT8 without this flag.")] = False,
    calib_data: Annotated[str | None, typer.Option("--calib-data", help="Images for TensorRT 10's entropy "
                                                   "calibrator (train split, class-balanced).")] = None,
    calib_cache: Annotated[Path | None, typer.Option("--calib-cache", help="Calibration cache to reuse/write "
                                                     "[default: OUTPUT with .calib.cache].")] = None,
    calib_batch: Annotated[int | None, typer.Option("--calib-batch", help="Calibration batch size [default: 32, "
                                                   "or the ONNX's fixed batch].")] = None,
    num_calib: Annotated[int | None, typer.Option("--num-calib", help="Calibration images, class-balanced "
                                                  "[default: the whole set].")] = None,
    sparsity: Annotated[bool, typer.Option("--sparsity", help="Let TensorRT use 2:4 sparse kernels (compute "
                                           "capability >= 8.0, weights pruned to a 2:4 pattern).")] = False,
    workspace: Annotated[str | None, typer.Option("--workspace", help="Workspace memory limit, e.g. 512M or 4G "
                                                  "(bare number: MiB) [default: TensorRT's].")] = None,
    min_batch: Annotated[int | None, typer.Option("--min-batch", help="Smallest batch the engine accepts "
                                                  "[default: 1].")] = None,
    opt_batch: Annotated[int | None, typer.Option("--opt-batch", help="Batch TensorRT tunes kernels for "
                                                  "[default: 64, within min..max].")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="Largest batch the engine accepts "
                                                  "[default: 256].")] = None,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="Tactic timing cache file: read if "
                                                      "present, written after the build (fast, repeatable "
                                                      "rebuilds).")] = None,
    data: DataOpt = None,
    limit_per_class: LimitOpt = None,
    min_agreement: Annotated[float | None, typer.Option("--min-agreement", help="Fail below this top-1 agreement "
                                                       "(%) with the ONNX [default: 99 fp32, 98 fp16, 95 int8, "
                                                       "90 calibrated int8].")] = None,
    json_: JsonOpt = False,
) -> None:
    """Build a TensorRT engine from an ONNX model and check it against the ONNX on real images.

    Writes MODEL.engine and MODEL.engine.json (TensorRT/CUDA versions, GPU, precision, profile, source
    hash); loaders refuse the engine on another GPU or TensorRT version. The check runs on the test split
    of --data, or on the calib/ set with the model's classes. Needs TensorRT and an NVIDIA GPU.

    Example: resopt build r18.onnx --fp16 -o r18.fp16.engine --data cifar10
    """
    check_options(locals())
    from resopt.build import BuildConfig, build_engine
    from resopt.cli.common import default_output

    if output is None:
        output = default_output(model, ".fp16.engine" if fp16 else ".engine")
    cfg = BuildConfig(fp16=fp16, int8=int8, calib_data=calib_data, calib_cache=calib_cache, calib_batch=calib_batch,
                      num_calib=num_calib, sparsity=sparsity, workspace=workspace, min_batch=min_batch,
                      opt_batch=opt_batch, max_batch=max_batch, timing_cache=timing_cache, data=data,
                      verify_per_class=limit_per_class or 20, min_agreement=min_agreement)
    result = build_engine(model, output, cfg)
    emit(result.summary(), json_out=json_, render=_render, min_width=120)


def _render(d: dict[str, Any]) -> Any:
    v = d["verification"]
    check = "not run (pass --data)" if not v["verified"] else \
        f"{v['top1_agreement']:.2f}% top-1 agreement, max |diff| {v['max_abs_diff']:.3g} on {v['images']} images " \
        f"(engine top-1 {v['top1']:.2f}%, ONNX {v['parent_top1']:.2f}%)"
    p = d["profile"]
    rows: list[tuple[str, Any]] = [
        ("precision", d["precision"]),
        ("path", d["build_path"]),
        ("GPU", f"{d['gpu']} (compute capability {d['compute_capability']})"),
        ("profile", f"batch {p['min']}..{p['max']}, tuned for {p['opt']}"),
        ("size", f"{human_bytes(d['engine_bytes'])} (ONNX {human_bytes(d['onnx_bytes'])})"),
        ("check", check),
        ("build time", f"{d['build_seconds']:.1f}s"),
    ]
    if d["fp16_conversion"]:
        c = d["fp16_conversion"]
        kept = ", ".join(f"{k} x{n}" for k, n in c["kept_fp32"].items()) or "none"
        rows.append(("FP16 conversion", f"{c['fp16_nodes']} nodes FP16, kept FP32: {kept}"))
    if d["calibration"]:
        c = d["calibration"]
        rows.append(("calibration", f"{c['images']} images in batches of {c['batch_size']}"
                                    + (f", cache {c['cache']} reused" if c["cache_used"] else f" -> {c['cache']}")))
    if d["timing_cache"]:
        t = d["timing_cache"]
        rows.append(("timing cache", f"{t['file']} ({human_bytes(t['loaded_bytes'])} in, "
                                     f"{human_bytes(t['saved_bytes'])} out)"))
    for note in d["notes"]:
        rows.append(("note", note))
    from rich.markup import escape

    return kv_table(f"built {escape(Path(d['output']).name)} (TensorRT {d['tensorrt']}) + "
                    f"{escape(Path(d['sidecar']).name)}", [(k, escape(str(v))) for k, v in rows])
