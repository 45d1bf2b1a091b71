"""``resopt bench``: model files -> one comparison table (latency, throughput, size, memory, accuracy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from resopt.cli.common import DataOpt, JsonOpt, LimitOpt, check_options, check_range, emit, human_bytes, human_count


def bench_cmd(
    models: Annotated[list[Path], typer.Argument(help="Model files (.pt, .onnx, .engine); the first is the "
                                                      "baseline of the speed-up column.", show_default=False)],
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="One batch size or a comma-separated "
                                                                       "list, e.g. 1,8,32.")] = "1,8,32",
    threads: Annotated[int | None, typer.Option("--threads", "-t", help="Intra-op threads for PyTorch, "
                                                "onnxruntime and OpenVINO [default: all available cores].")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, or gpu (CUDA: PyTorch, onnxruntime's CUDA "
                                                         "provider, TensorRT engines).")] = "cpu",
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed batches before each batch size.")] = 5,
    iters: Annotated[int, typer.Option("--iters", help="At least this many timed batches per file and "
                                                       "batch size.")] = 20,
    min_time: Annotated[float, typer.Option("--min-time", help="And at least this many seconds of timed "
                                                               "batches per file and batch size.")] = 2.0,
    rounds: Annotated[int, typer.Option("--rounds", help="Split each measurement into this many rounds, "
                                                         "interleaved across files, so drifting machine "
                                                         "load hits every file alike.")] = 3,
    pt_variants: Annotated[str | None, typer.Option("--pt-variants", help="How each .pt runs, one row each: "
                                                    "fp32, fp16 (autocast), channels-last, fp16-channels-last "
                                                    "[default: fp32 on cpu; fp32,fp16,fp16-channels-last on "
                                                    "gpu].")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="CPU runtimes each .onnx file runs on, one row each: "
                                                           "ort (onnxruntime), openvino, or ort,openvino.")] = "ort",
    precision: Annotated[str, typer.Option("--precision", help="Inference precision for the runtimes that choose "
                                                               "one (OpenVINO): f32, bf16 or f32,bf16, one row each; "
                                                               "bf16 falls back to f32, with a warning, on a CPU "
                                                               "without BF16.")] = "f32",
    data: DataOpt = None,
    limit_per_class: LimitOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Benchmark model files side by side: latency p50/p90/p99, throughput, size, params, MACs, peak memory,
    and top-1/top-5 on the test split with --data.

    Each file runs in its own worker process, in interleaved rounds; numbers are medians.

    Example: resopt bench r20.pt r20.onnx r20.int8.onnx --batch-size 1,8,32 --threads 2 --data cifar10

    On the GPU: resopt bench r18.pt r18.onnx r18.fp16.engine --device gpu --batch-size 1,64,256 --data cifar10

    Two CPU runtimes: resopt bench r56.onnx r56.int8.onnx --runtime ort,openvino --precision f32,bf16 -b 1,32
    """
    check_options(locals())
    from resopt.bench import (
        PRECISIONS,
        RUNTIMES,
        BenchConfig,
        bench_models,
        parse_batch_sizes,
        parse_choices,
        parse_pt_variants,
    )

    sizes = parse_batch_sizes(batch_size)
    for b in sizes:
        check_range("batch_size", b)
    cfg = BenchConfig(batch_sizes=sizes, threads=threads, warmup=warmup, iters=iters,
                      min_seconds=min_time, rounds=rounds, device=device, data=data,
                      limit_per_class=limit_per_class, pt_variants=parse_pt_variants(pt_variants),
                      runtimes=parse_choices("--runtime", runtime, RUNTIMES),
                      precisions=parse_choices("--precision", precision, PRECISIONS))
    report = bench_models(models, cfg)
    emit(report.to_dict(), json_out=json_, render=render_bench, min_width=160)


def _ms(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _model_cell(m: dict[str, Any], row: int, rows: int) -> str:
    """File name on the file's first row, its backend under it (on the second row when there is one)."""
    from rich.markup import escape

    name, provider = escape(m["name"]), f"[dim]{escape(m['provider'])}[/dim]"
    if rows == 1:
        return f"{name}\n{provider}"
    return name if row == 0 else provider if row == 1 else ""


def _speedup_cell(b: dict[str, Any]) -> str:
    """``2.31x``, with the range of the per-round ratios when rounds disagree (shared-machine noise)."""
    rounds = b.get("speedup_rounds") or []
    cell = f"{b['speedup']:.2f}x"
    if len(rounds) > 1 and max(rounds) - min(rounds) >= 0.005:
        cell += f" ({min(rounds):.2f}-{max(rounds):.2f})"
    return cell


def _memory_cell(b: dict[str, Any], gpu: bool) -> str:
    host = "?" if b["peak_memory_bytes"] is None else human_bytes(b["peak_memory_bytes"])
    if not gpu:
        return host
    dev = b.get("peak_device_memory_bytes")
    return f"{host} / {'-' if dev is None else human_bytes(dev)}"


def render_bench(d: dict[str, Any]) -> Any:
    """One Rich table: a row per file and batch size; the file's own numbers on its first row."""
    from rich.table import Table

    cfg = d["config"]
    gpu = cfg["device"] == "gpu"
    where = f"gpu: {d['host'].get('gpu', '?')}" if gpu else cfg["device"]
    table = Table(title=f"resopt bench ({where}, {cfg['threads']} thread{'s' * (cfg['threads'] > 1)})",
                  title_justify="left",
                  caption=f"Medians of >= {cfg['iters']} batches / {cfg['min_seconds']:g} s per cell in "
                          f"{cfg['rounds']} interleaved rounds, one process per file; speed-up = throughput "
                          f"over {Path(d['baseline']).name}'s at the same batch size, (low-high) its range "
                          f"over rounds; img/s ± = half the spread of the per-round medians.",
                  caption_justify="left")
    for name, justify in (("model", "left"), ("size", "right"), ("params", "right"), ("non-zero", "right"),
                          ("MACs", "right"), ("test top-1 / top-5", "right"),
                          ("peak mem host / GPU" if gpu else "peak mem", "right"),
                          ("batch", "right"), ("p50 / p90 / p99 ms", "right"), ("img/s", "right"),
                          ("speed-up", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for m in d["models"]:
        params = "?" if m["params"] is None else human_count(m["params"])
        nonzero = "?" if not m["params"] or m["nonzero_params"] is None else \
            f"{100 * m['nonzero_params'] / m['params']:.0f}%"
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']['top1']:.2f} / {m['accuracy']['top5']:.2f}"
        for j, b in enumerate(m["batches"]):
            first = j == 0
            table.add_row(
                _model_cell(m, j, len(m["batches"])),
                human_bytes(m["file_bytes"]) if first else "",
                params if first else "",
                nonzero if first else "",
                ("?" if m["macs"] is None else human_count(m["macs"])) if first else "",
                acc if first else "",
                _memory_cell(b, gpu),
                str(b["batch_size"]),
                f"{_ms(b['p50_ms'])} / {_ms(b['p90_ms'])} / {_ms(b['p99_ms'])}",
                f"{b['throughput_ips']:.1f} ±{b['spread_pct'] / 2:.0f}%",
                _speedup_cell(b),
                end_section=j == len(m["batches"]) - 1,
            )
    return table
