"""The report's figures (matplotlib, Agg backend: no display, no network).

Every scatter uses the same colour per technique and the same marker per file kind, so a point reads the
same in every plot. Labels are placed by trying offsets around each point, nearest first, and keeping the
first whose box overlaps no other label, no point and stays inside the axes; up to ~30 points that
leaves every label readable.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resopt.report.pareto import pareto_front

TECHNIQUE_COLORS = {"baseline": "#1f77b4", "pruned": "#ff7f0e", "distilled": "#2ca02c", "quantized": "#d62728",
                    "combined": "#9467bd"}
KIND_MARKERS = {"pt": "o", "onnx": "s", "engine": "D"}
KIND_NAMES = {"pt": ".pt (PyTorch)", "onnx": ".onnx (onnxruntime)", "engine": ".engine (TensorRT)"}
FIG_SIZE = (9.0, 6.0)  # inches
DPI = 150  # so the PNGs are 1350 x 900 pixels


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float
    technique: str
    kind: str
    measured: bool = True  # False: the accuracy its producing command recorded, not a bench --data run (hollow)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def scatter_plot(points: Sequence[Point], *, xlabel: str, ylabel: str, title: str) -> Any:
    """Accuracy against a cost, the Pareto frontier drawn as a staircase; returns the Figure."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    fig = plt.figure(figsize=FIG_SIZE, dpi=DPI)
    # A fixed layout (no tight/constrained layout afterwards): label boxes are measured in pixels, so the
    # axes must not move once they are placed.
    ax = fig.add_axes((0.09, 0.10, 0.66, 0.80))
    xs = [p.x for p in points]
    ys = [p.y for p in points]
    log_x = len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > 20
    if log_x:
        ax.set_xscale("log")
    for p in points:
        color = TECHNIQUE_COLORS.get(p.technique, "#7f7f7f")
        ax.scatter(p.x, p.y, s=60, facecolors=color if p.measured else "white", marker=KIND_MARKERS.get(p.kind, "X"),
                   edgecolors="white" if p.measured else color, linewidths=0.8 if p.measured else 1.6, zorder=3)
    front = pareto_front([(p.x, p.y) for p in points])
    if front:
        fx = [points[i].x for i in front]
        fy = [points[i].y for i in front]
        ax.plot(fx, fy, drawstyle="steps-post", color="black", linewidth=1.0, linestyle="--", zorder=2)
        ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="black", linewidths=1.0, zorder=4)
    _set_limits(ax, xs, ys, log_x)
    ax.set_xlabel(xlabel + (" (log scale)" if log_x else ""))
    ax.set_ylabel(ylabel)
    # Wrapped to the axes: a centred title longer than them runs off the figure (the legend sits outside).
    ax.set_title(textwrap.fill(title, 72), fontsize=11)
    ax.grid(True, which="both", alpha=0.25)
    _place_labels(fig, ax, points)
    techniques = [t for t in TECHNIQUE_COLORS if any(p.technique == t for p in points)]
    kinds = [k for k in KIND_MARKERS if any(p.kind == k for p in points)]
    handles = [Line2D([], [], linestyle="", marker="o", markersize=8, color=TECHNIQUE_COLORS[t], label=t)
               for t in techniques]
    handles += [Line2D([], [], linestyle="", marker=KIND_MARKERS[k], markersize=8, color="#555555",
                       label=KIND_NAMES[k]) for k in kinds]
    if not all(p.measured for p in points):
        handles.append(Line2D([], [], linestyle="", marker="o", markersize=8, markerfacecolor="white",
                              markeredgecolor="#555555", label="from lineage (†)"))
    if front:
        handles.append(Line2D([], [], linestyle="--", color="black", marker="o", markerfacecolor="none",
                              markersize=10, label="Pareto frontier"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=9,
              title="technique / file", title_fontsize=9)
    return fig


def _set_limits(ax: Any, xs: list[float], ys: list[float], log_x: bool) -> None:
    import math

    if not xs:
        return
    if log_x:
        lo, hi = math.log10(min(xs)), math.log10(max(xs))
        pad = max(0.08, (hi - lo) * 0.12)
        ax.set_xlim(10 ** (lo - pad), 10 ** (hi + pad))
    else:
        lo, hi = min(xs), max(xs)
        pad = (hi - lo) * 0.12 or max(abs(hi) * 0.1, 1e-3)
        ax.set_xlim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.15 or 1.0
    ax.set_ylim(lo - pad, hi + pad)


def _place_labels(fig: Any, ax: Any, points: Sequence[Point]) -> None:
    import numpy as np
    from matplotlib.transforms import Bbox

    if not points:
        return
    renderer = fig.canvas.get_renderer()
    disp = ax.transData.transform(np.column_stack([[p.x for p in points], [p.y for p in points]]))
    obstacles = [Bbox.from_bounds(x - 9, y - 9, 18, 18) for x, y in disp]
    inside = ax.get_window_extent(renderer)
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1),
                  (1, 2), (-1, 2), (1, -2), (-1, -2), (2, 1), (-2, 1), (2, -1), (-2, -1)]
    offsets = [(dx * r, dy * r) for r in (5, 10, 16, 24, 34, 46, 60, 76, 94) for dx, dy in directions]
    placed: list[Bbox] = []
    for p in points:
        best: tuple[float, Any, Bbox] | None = None  # (overlap area, annotation, box) of the least bad spot
        for dx, dy in offsets:
            ann = ax.annotate(
                p.label, (p.x, p.y), xytext=(dx, dy), textcoords="offset points", fontsize=7.5,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="bottom" if dy > 0 else "top" if dy < 0 else "center", zorder=5,
                arrowprops={"arrowstyle": "-", "color": "#888888", "linewidth": 0.6}
                if max(abs(dx), abs(dy)) > 12 else None)
            box = _text_box(ann, renderer).padded(1.5)
            outside = (max(0, inside.x0 - box.x0) + max(0, box.x1 - inside.x1)) * box.height + \
                (max(0, inside.y0 - box.y0) + max(0, box.y1 - inside.y1)) * box.width
            cost = outside + sum(_overlap(box, o) for o in placed + obstacles)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
                if cost == 0:
                    break
            else:
                ann.remove()
        assert best is not None
        placed.append(best[2])


def _text_box(ann: Any, renderer: Any) -> Any:
    """The label's own box: an Annotation's extent also spans its leader line, which is not laid out yet."""
    from matplotlib.text import Text

    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def _overlap(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def label_boxes(fig: Any) -> list[Any]:
    """The pixel boxes of a scatter's point labels (for checking that none overlap)."""
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    return [_text_box(t, renderer) for t in ax.texts]


def sweep_plot(series: Sequence[tuple[str, list[tuple[float, float]]]], *, xlabel: str, ylabel: str,
               title: str) -> Any:
    """Accuracy against how much was pruned, one line per (parent, method): the sweeps of a study."""
    plt = _pyplot()
    fig = plt.figure(figsize=FIG_SIZE, dpi=DPI)
    ax = fig.add_axes((0.09, 0.10, 0.62, 0.80))
    cmap = plt.get_cmap("tab10")
    markers = "osD^v<>phX"
    for k, (name, pts) in enumerate(series):
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, marker=markers[k % len(markers)], color=cmap(k % 10), linewidth=1.4, markersize=6,
                label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 72), fontsize=11)
    ax.grid(True, alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8, title="parent / method",
              title_fontsize=9)
    return fig


def tree_plot(nodes: Sequence[tuple[str, int, str, str]], *, title: str) -> Any:
    """The lineage as an indented tree. ``nodes``: (name, depth, technique, edge command), pipeline order."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    n = max(1, len(nodes))
    height = max(2.5, 0.42 * n + 1.2)
    fig = plt.figure(figsize=(12.0, height), dpi=DPI)
    ax = fig.add_axes((0.01, 0.02, 0.98, 1 - 1.0 / height))
    ax.set_axis_off()
    ax.set_xlim(-0.2, 12.0)
    ax.set_ylim(-n + 0.4, 0.8)
    step = 0.45  # x per generation, in the axes' units (inches, roughly)
    last_at_depth: dict[int, float] = {}
    for i, (name, depth, technique, edge) in enumerate(nodes):
        y = -i
        x = depth * step
        if depth > 0 and depth - 1 in last_at_depth:
            px = (depth - 1) * step + 0.08
            ax.plot([px, px, x - 0.03], [last_at_depth[depth - 1] - 0.25, y, y], color="#888888", linewidth=0.9)
        last_at_depth[depth] = y
        for d in [d for d in last_at_depth if d > depth]:
            del last_at_depth[d]
        text = ax.text(x, y, f" {name} ", fontsize=9, va="center", ha="left", family="monospace",
                       bbox={"boxstyle": "round,pad=0.25", "facecolor": TECHNIQUE_COLORS.get(technique, "#cccccc"),
                             "alpha": 0.25, "edgecolor": TECHNIQUE_COLORS.get(technique, "#888888")})
        if edge:
            renderer = fig.canvas.get_renderer()
            box = text.get_window_extent(renderer).transformed(ax.transData.inverted())
            ax.text(box.x1 + 0.1, y, f"<- {edge if len(edge) <= 110 else edge[:107] + '...'}", fontsize=8,
                    va="center", ha="left", color="#444444", clip_on=False)
    ax.set_title(title, fontsize=11, loc="left")
    techniques = list(dict.fromkeys(t for _, _, t, _ in nodes))
    ax.legend(handles=[Patch(facecolor=TECHNIQUE_COLORS.get(t, "#cccccc"), alpha=0.5, label=t) for t in techniques],
              loc="upper right", fontsize=8)
    return fig


def curves_plot(runs: Sequence[tuple[str, list[dict[str, Any]]]], *, title: str) -> Any:
    """Loss, train top-1 and val top-1 per epoch, one line per training or fine-tuning run."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14.0, 4.6), dpi=DPI)
    fig.subplots_adjust(left=0.05, right=0.98, top=0.80, bottom=0.13, wspace=0.22)
    # Epochs are chosen on val, so val is what each epoch records; runs written before splits were recorded
    # have "top1" instead, on a split the file does not say.
    panels = (("loss", "training loss"), ("train_top1", "train top-1 (%)"),
              ("val_top1", "val top-1 (%) (older runs: split unknown)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, rows in runs:
            pts = [(i + 1, r.get(key, r.get("top1") if key == "val_top1" else None)) for i, r in enumerate(rows)]
            pts = [p for p in pts if p[1] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch of the run")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.25)
        if not ax.lines:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="#888888")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(4, len(handles)), fontsize=8,
                   bbox_to_anchor=(0.5, 0.95))
    fig.suptitle(title, fontsize=11, y=0.995)
    return fig


def save_figure(fig: Any, path_png: Path) -> list[Path]:
    """Write ``path_png`` and the SVG beside it, atomically; close the figure."""
    from resopt.artifacts import atomic_output

    written = []
    for suffix in (".png", ".svg"):
        out = path_png.with_suffix(suffix)
        with atomic_output(out) as tmp:
            fig.savefig(tmp, format=suffix[1:], dpi=DPI)
        written.append(out)
    _pyplot().close(fig)
    return written
