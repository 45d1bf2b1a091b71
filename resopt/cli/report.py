"""``resopt report``: artifacts + bench JSON -> one table, the Pareto plots, the lineage tree and curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from resopt.cli.common import JsonOpt, check_options, emit


def report_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Artifacts (.pt, .onnx, .engine), folders of them, and "
                                                      "`resopt bench --json` files.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.md, report.html and "
                                                                "plots/.")] = Path("report"),
    baseline: Annotated[list[Path] | None, typer.Option(
        "--baseline", help="The reference row every other is compared with; repeat it to give each lineage "
                           "tree its own (e.g. one per architecture) [default: each row's root model].",
        show_default=False)] = None,
    metric: Annotated[str, typer.Option("--metric", help="Accuracy axis: top1 or top5.")] = "top1",
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Batch size of the latency "
                                                   "columns compared [default: the smallest measured].",
                                                   show_default=False)] = None,
    device: Annotated[str | None, typer.Option("--device", help="Device of the latency compared: cpu or gpu "
                                               "[default: cpu when measured].", show_default=False)] = None,
    title: Annotated[str, typer.Option("--title", help="Title of the report and its plots.")] = "resopt report",
    json_: JsonOpt = False,
) -> None:
    """Join artifacts and benchmarks by sha256 into one table (how each file was made, size, params, MACs,
    top-1/top-5, latency per batch size and device, change against its root, Pareto-optimal rows) and
    plots: accuracy vs file size and vs latency with the Pareto frontier, the lineage tree, and the
    training and fine-tuning curves recorded in checkpoints.

    Example: resopt report runs/ runs/bench.json -o runs/report/

    The bench JSON comes from: resopt bench runs/*.pt runs/*.onnx --data cifar10 --batch-size 1,32 --json
    One checkpoint's training curves: resopt report r20.pt -o r20-report/
    """
    check_options(locals())
    from resopt.console import log
    from resopt.errors import UsageError
    from resopt.report import ReportConfig, build_report, write_report

    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; give a folder for report.md, report.html and plots/")
    cfg = ReportConfig(title=title, metric=metric, device=device, batch_size=batch_size,
                       baseline=tuple(baseline or ()))
    report = build_report(inputs, cfg, skip=output)
    written = write_report(report, output)
    for note in report.notes:
        log(f"[yellow]note:[/yellow] {note}")
    log(f"report: {len(report.records)} artifacts; wrote {output / 'report.md'}, {output / 'report.html'} and "
        f"{sum(1 for p in written if p.suffix == '.png')} plots in {output / 'plots'}")
    emit(report.to_dict(), json_out=json_, render=lambda _d: _render(report), min_width=180)


def _render(report: Any) -> Any:
    from rich.markup import escape
    from rich.table import Table

    from resopt.report.writers import table

    header, rows = table(report, all_latencies=False)
    t = Table(title=escape(report.config.title), title_justify="left",
              caption="— not recorded; † accuracy recorded by the producing command (not bench --data); "
                      "★ Pareto-optimal (size, or latency at DEVICE bN)", caption_justify="left")
    for h in header:
        t.add_column(escape(h), justify="left" if h in ("model", "made by", "technique", "vs reference", "Pareto")
                     else "right", overflow="fold", no_wrap=h == "model")
    for row in rows:
        t.add_row(*(escape(c) for c in row))
    return t
