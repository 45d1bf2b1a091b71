"""The report's files: plots (PNG and SVG), ``report.md`` and a self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

from resopt.artifacts import write_text_atomic
from resopt.report.records import Record

if TYPE_CHECKING:
    from resopt.report import Report

MISSING = "—"


# ---------------------------------------------------------------------------------------------- cells


def fmt_mb(n: int | None) -> str:
    return MISSING if n is None else f"{n / 1e6:.3f}" if n < 1e7 else f"{n / 1e6:.1f}"


def fmt_count(n: int | None) -> str:
    if n is None:
        return MISSING
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def fmt_pct(v: float | None) -> str:
    return MISSING if v is None else f"{v:.2f}"


def vs_root_cell(r: Record, by_sha: dict[str, Record]) -> str:
    if r.root == r.sha256:
        return "reference"
    v = r.vs_root
    parts = [f"{v['smaller']:.2f}x smaller" if v.get("smaller") else f"{MISSING} size",
             f"{v['faster']:.2f}x faster" if v.get("faster") else f"{MISSING} speed",
             f"{v['points']:+.2f} pts" if v.get("points") is not None else f"{MISSING} pts"]
    return f"vs {by_sha[r.root].name}: " + ", ".join(parts)


def table(report: Report, *, all_latencies: bool = True) -> tuple[list[str], list[list[str]]]:
    """The report table as text cells: one row per artifact, in pipeline order."""
    coords = report.coordinates if all_latencies else \
        ([(report.device, report.batch_size)] if report.device is not None else [])
    header = ["#", "model", "made by", "technique", "size (MB)", "params", "non-zero", "MACs",
              "top-1 (%)", "top-5 (%)", "split"]
    header += [f"{d} b{b} p50 ms (img/s)" for d, b in coords]
    header += ["vs reference", "Pareto"]
    by_sha = {r.sha256: r for r in report.records}
    rows = []
    for i, r in enumerate(report.records, 1):
        lineage_acc = r.accuracy_source is not None and r.accuracy_source.startswith("lineage")
        mark = "†" if lineage_acc else ""
        nonzero = MISSING if not r.params or r.nonzero_params is None else \
            f"{100 * r.nonzero_params / r.params:.0f}%"
        row = [str(i), ("  " * r.depth) + r.name, r.step, r.technique, fmt_mb(r.file_bytes), fmt_count(r.params),
               nonzero, fmt_count(r.macs), fmt_pct(r.top1) + (mark if r.top1 is not None else ""),
               fmt_pct(r.top5) + (mark if r.top5 is not None else ""),
               r.accuracy_split or MISSING]
        for d, b in coords:
            c = r.latency_at(str(d), int(b or 0))
            row.append(MISSING if c is None else f"{c.p50_ms:.3g} ({c.throughput_ips:.0f})")
        row += [vs_root_cell(r, by_sha), ("★ " + ", ".join(r.pareto)) if r.pareto else ""]
        rows.append(row)
    return header, rows


def legend_lines(report: Report) -> list[str]:
    lines = [f"{MISSING}: not recorded by any input (never estimated).",
             "†: the accuracy the producing command recorded (no `bench --data` measurement of this file among "
             "the inputs); other accuracies were measured by `resopt bench --data`. split: what the accuracy was "
             "measured on (test; val where the data has no test split; \"split unknown\" for artifacts written "
             "before resopt recorded it).",
             f"★ Pareto: no other row has at least the {report.metric_name} and at most the file size (size) or "
             "the p50 latency per batch of N on that device (DEVICE bN), and is better in one of the two.",
             "vs reference: file size and p50 latency ratios against the reference row, and the difference in "
             f"{report.metric_name} points" + (f" (latency at {report.device} batch {report.batch_size})."
                                               if report.device else ".")]
    return lines


# ---------------------------------------------------------------------------------------------- plots


def _measured(r: Record) -> bool:
    return not (r.accuracy_source or "").startswith("lineage")


def pruning_series(records: list[Record], metric: str) -> list[tuple[str, list[tuple[float, float]]]]:
    """(parent / method, [(% non-zero parameters removed, accuracy)]) per pruning sweep, the parent at 0.

    Only files measured by ``bench --data``, on their first runtime, without a quantization step, so each
    point is one model's float accuracy; a sweep is every pruned model sharing a parent and a method.
    """
    def nonzero(r: Record) -> int | None:
        return r.nonzero_params if r.nonzero_params is not None else r.params

    by_sha = {r.sha256: r for r in records}
    float_rows = [r for r in records if _measured(r) and r.same_file_as is None and r.metric(metric) is not None
                  and nonzero(r) and not any(e.get("command") == "quantize" for e in r.lineage)]
    float_shas = {r.sha256 for r in float_rows}
    by_lineage = {json.dumps(r.lineage[:-1], sort_keys=True, default=str): r for r in float_rows
                  if r.lineage and r.lineage[-1].get("command") == "export"}
    series: dict[str, list[tuple[float, float]]] = {}
    parents: dict[str, Record] = {}
    for r in float_rows:
        k = max((i for i, e in enumerate(r.lineage) if e.get("command") == "prune"), default=None)
        if k is None:
            continue
        step = r.lineage[k]
        opts = step.get("options") or {}
        # The parent as measured: the file pruned, or the measured export of it.
        src = (step.get("parent") or {}).get("sha256")
        parent = by_sha[src] if src in float_shas else \
            by_lineage.get(json.dumps(r.lineage[:k], sort_keys=True, default=str))
        if parent is None or not nonzero(parent):
            continue
        method = str(opts.get("method", "?")) + (" iterative" if opts.get("iterative") else "") + \
            (" global" if opts.get("global") else "")
        name = f"{parent.name} / {method}"
        removed = 100.0 * (1.0 - (nonzero(r) or 0) / (nonzero(parent) or 1))
        series.setdefault(name, []).append((removed, float(r.metric(metric) or 0.0)))
        parents[name] = parent
    for name, pts in series.items():
        pts.append((0.0, float(parents[name].metric(metric) or 0.0)))
    return sorted(series.items())


def make_plots(report: Report, plots_dir: Path) -> list[tuple[str, Path]]:
    """Draw every plot the inputs have numbers for; returns (caption, png path) pairs."""
    from resopt.report.plots import Point, curves_plot, save_figure, scatter_plot, sweep_plot, tree_plot

    metric = report.config.metric
    label = f"{report.metric_name} accuracy (%)"
    out: list[tuple[str, Path]] = []
    title = report.config.title
    pts = [Point(r.name, r.file_bytes / 1e6, float(r.metric(metric) or 0), r.technique, r.kind, _measured(r))
           for r in report.records if r.file_bytes and r.metric(metric) is not None]
    if pts:
        png = plots_dir / f"{metric}_vs_size.png"
        save_figure(scatter_plot(pts, xlabel="file size (MB)", ylabel=label,
                                 title=f"{title}: {report.metric_name} vs file size"), png)
        out.append((f"{report.metric_name} vs file size", png))
    for device, bs in report.coordinates:
        pts = []
        for r in report.records:
            c = r.latency_at(device, bs)
            if c is not None and r.metric(metric) is not None:
                pts.append(Point(r.name, c.p50_ms, float(r.metric(metric) or 0), r.technique, r.kind, _measured(r)))
        if not pts:
            continue
        png = plots_dir / f"{metric}_vs_latency_{device}_b{bs}.png"
        save_figure(scatter_plot(pts, xlabel=f"p50 latency per batch of {bs} on {device} (ms)", ylabel=label,
                                 title=f"{title}: {report.metric_name} vs latency ({device}, batch {bs})"), png)
        out.append((f"{report.metric_name} vs latency, {device}, batch {bs}", png))
    series = pruning_series(report.records, metric)
    if series:
        png = plots_dir / f"{metric}_vs_pruning.png"
        save_figure(sweep_plot(series, xlabel="non-zero parameters removed (% of the parent's)", ylabel=label,
                               title=f"{title}: {report.metric_name} vs pruning"), png)
        out.append((f"{report.metric_name} vs pruning", png))
    nodes = [(r.name, r.depth, r.technique, r.edge) for r in report.records]
    png = plots_dir / "lineage.png"
    save_figure(tree_plot(nodes, title=f"{title}: lineage (each file <- the commands that made it from its parent)"),
                png)
    out.append(("lineage", png))
    if report.runs:
        png = plots_dir / "curves.png"
        save_figure(curves_plot(report.runs, title=f"{title}: training and fine-tuning curves"), png)
        out.append(("training and fine-tuning curves", png))
    return out


# ---------------------------------------------------------------------------------------------- files


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("  ", "&nbsp;&nbsp;")


def render_markdown(report: Report, plots: list[tuple[str, Path]], out_dir: Path) -> str:
    header, rows = table(report)
    lines = [f"# {report.config.title}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    lines += [""] + [f"- {line}" for line in legend_lines(report)]
    if report.notes:
        lines += ["", "## Missing numbers", ""] + [f"- {n}" for n in report.notes]
    if plots:
        lines += ["", "## Plots", ""]
        for caption, png in plots:
            rel = png.relative_to(out_dir).as_posix()
            lines += [f"![{caption}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;
white-space:nowrap}th{background:#f3f3f3}td:nth-child(2),td:nth-child(3),td:nth-child(4),td:last-child,
td:nth-last-child(2){text-align:left}tr.pareto td{background:#fffbe6}img{max-width:100%;border:1px solid #eee;
margin:8px 0}li{margin:3px 0}code{background:#f5f5f5}"""


def render_html(report: Report, plots: list[tuple[str, Path]]) -> str:
    """One page, no external resources: the plots are PNGs inlined as base64 data URIs."""
    header, rows = table(report)
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{e(report.config.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{e(report.config.title)}</h1>", "<table><thead><tr>"]
    parts += [f"<th>{e(h)}</th>" for h in header]
    parts.append("</tr></thead><tbody>")
    for r, row in zip(report.records, rows, strict=True):
        cls = " class=\"pareto\"" if r.pareto else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{e(c).replace('  ', '&nbsp;&nbsp;')}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table><ul>")
    parts += [f"<li>{e(line)}</li>" for line in legend_lines(report)]
    parts.append("</ul>")
    if report.notes:
        parts.append("<h2>Missing numbers</h2><ul>")
        parts += [f"<li><code>{e(n)}</code></li>" for n in report.notes]
        parts.append("</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for caption, png in plots:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt=\"{e(caption)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_all(report: Report, out_dir: Path) -> list[Path]:
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(report, plots_dir)
    md, page = out_dir / "report.md", out_dir / "report.html"
    write_text_atomic(md, render_markdown(report, plots, out_dir))
    write_text_atomic(page, render_html(report, plots))
    return [md, page] + [p for _, png in plots for p in (png, png.with_suffix(".svg"))]
