"""What ``resopt optimize`` leaves in DIR once the search stops: the Pareto set (measured once on test),
the best file for ``--objective``, ``trials.csv``, ``commands.sh`` and the report.

The front and the best are taken over COMPLETE trials measured on this kind of host (``device_key``) that
meet every constraint; a study on several kinds of machine keeps one front per kind.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.console import log
from resopt.errors import AccuracyGateError
from resopt.optimize.space import STEPS, Planned, describe_trial, shell_line

if TYPE_CHECKING:
    from resopt.optimize import OptimizeConfig, Session


def feasible(t: Any) -> bool:
    return all(c <= 0 for c in t.user_attrs.get("constraints", [0.0]))


def pareto(trials: list[Any]) -> list[Any]:
    """The trials no other trial dominates (higher or equal val top-1, lower or equal latency and size, better in
    one); of trials with the same file on the same runtime only the first."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for t in sorted(trials, key=lambda t: t.number):
        k = (t.user_attrs.get("sha256", str(t.number)), t.user_attrs.get("runtime", ""))
        if k not in seen:
            seen.add(k)
            unique.append(t)

    def dominates(a: Any, b: Any) -> bool:
        va, vb = (-a.values[0], a.values[1], a.values[2]), (-b.values[0], b.values[1], b.values[2])
        return all(x <= y for x, y in zip(va, vb, strict=True)) and va != vb

    return [t for t in unique if not any(dominates(o, t) for o in unique if o is not t)]


def choose_best(front: list[Any], objective: str) -> Any:
    """latency / size: the front's fastest / smallest (ties: higher val top-1); balanced: the point closest to the
    ideal one, each objective scaled to [0, 1] over the front."""
    if not front:
        return None
    if objective == "latency":
        return min(front, key=lambda t: (t.values[1], -t.values[0], t.values[2]))
    if objective == "size":
        return min(front, key=lambda t: (t.values[2], -t.values[0], t.values[1]))

    def scaled(i: int, v: float, better_high: bool) -> float:
        vals = [t.values[i] for t in front]
        lo, hi = min(vals), max(vals)
        if hi == lo:
            return 0.0
        return (hi - v) / (hi - lo) if better_high else (v - lo) / (hi - lo)

    return min(front, key=lambda t: (sum(scaled(i, t.values[i], i == 0) ** 2 for i in range(3)), t.number))


def best_so_far(trials: list[Any], cfg: OptimizeConfig, key: str) -> tuple[Any, int]:
    front = pareto([t for t in trials if t.user_attrs.get("device_key") == key and feasible(t)])
    return choose_best(front, cfg.objective), len(front)


def _closest(trials: list[Any], cfg: OptimizeConfig) -> Any:
    limits = [cfg.max_drop, cfg.max_size, cfg.max_latency_ms]

    def excess(t: Any) -> float:
        cons = t.user_attrs.get("constraints", [0.0, 0.0, 0.0])
        return sum(max(0.0, c) / max(lim or 1.0, 1e-9) for c, lim in zip(cons, limits, strict=False))

    return min(trials, key=excess)


def _slug(t: Any) -> str:
    parts = []
    for p in t.user_attrs.get("chain", []):
        o = p["options"]
        if p["recipe"] == "none" or p["step"] == "export":
            continue
        if p["step"] == "prune":
            amount = f"m{o['target_macs']:g}" if "target_macs" in o else f"b{o['blocks']}" if "blocks" in o \
                else f"s{o['sparsity']:g}"
            parts.append(f"{p['recipe']}-{amount}-ft{o['finetune_epochs']}" + ("-nokd" * (o.get("distill") is False)))
        elif p["recipe"] == "int8":
            parts.append(f"int8-{'pc' if o['per_channel'] else 'pt'}-{o['calib_method']}")
        else:
            parts.append(p["recipe"])
    return ".".join(parts or ["fp32"]) + f".{t.user_attrs.get('runtime')}"


def _name(t: Any) -> str:
    return f"t{t.number:03d}.{_slug(t)}.onnx"


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def commands(t: Any, s: Session) -> list[str]:
    """Plain resopt commands that make trial ``t``'s file from the model and measure it as the trial did."""
    ctx = s.cfg.context()
    lines = []
    parent = s.model.resolve()
    stem = f"t{t.number:03d}"
    for p in t.user_attrs.get("chain", []):
        recipe = next(st for st in STEPS if st.name == p["step"]).recipe(p["recipe"])
        if recipe.command is None:
            continue
        out = Path(f"{stem}.{p['step']}{recipe.suffix}")
        lines.append(shell_line(recipe.command(parent, out, p["options"], ctx)))
        parent = out
    b = s.cfg.bench
    lines.append(shell_line(["resopt", "bench", str(parent), "--runtime", str(t.user_attrs.get("runtime")),
                             "--batch-size", str(b.batch_size), "--data", ctx.data]))
    return lines


def _csv(trials: list[Any], front: set[int], tests: dict[int, float | None], key: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", "recipe", "runtime", "val_top1", "drop", "latency_ms", "size_bytes", "feasible",
                "pareto", "test_top1", "device_key", "host", "seconds", "retry_of", "error"])
    for t in sorted(trials, key=lambda t: t.number):
        a = t.user_attrs
        v = t.values if t.values else [None, None, None]
        w.writerow([t.number, t.state.name, " -> ".join(Planned(**p).label() for p in a.get("chain", [])),
                    a.get("runtime", ""), "" if v[0] is None else round(v[0], 3), a.get("drop", ""),
                    "" if v[1] is None else round(v[1], 4), "" if v[2] is None else int(v[2]),
                    int(feasible(t)) if t.values else "", int(t.number in front), tests.get(t.number, "") or "",
                    a.get("device_key", ""), a.get("host", ""), a.get("seconds", ""), a.get("retry_of", ""),
                    a.get("error", "")])
    return buf.getvalue()


def _point(t: Any, test: float | None = None) -> dict[str, Any]:
    a = t.user_attrs
    return {"trial": t.number, "recipe": a.get("chain"), "runtime": a.get("runtime"), "val_top1": round(t.values[0], 3),
            "drop": a.get("drop"), "latency_ms": round(t.values[1], 4), "size_bytes": int(t.values[2]),
            "test_top1": test, "sha256": a.get("sha256"), "host": a.get("host"), "bench_lock": a.get("bench_lock"),
            "isa": a.get("isa"), "versions": a.get("versions"), "threads": a.get("threads")}


def finish(s: Session, counts: dict[str, int], *, seconds: float) -> dict[str, Any]:
    """Write DIR's results; raise AccuracyGateError (exit 7) when no trial meets the constraints."""
    from optuna.trial import TrialState

    from resopt.artifacts import write_text_atomic

    cfg, out = s.cfg, s.cfg.out_dir
    trials = s.study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    ours = [t for t in complete if t.user_attrs.get("device_key") == s.key]
    others = len(complete) - len(ours)
    if others:
        log(f"optimize: {others} trials were measured on another kind of host (device key); they are not in this "
            f"front (--device-key makes hosts of one kind share it)")
    ok = [t for t in ours if feasible(t)]
    front = sorted(pareto(ok), key=lambda t: t.values[1])
    front_numbers = {t.number for t in front}
    if not ok:
        write_text_atomic(out / "trials.csv", _csv(trials, set(), {}, s.key), commit=False)
        if not ours:
            raise AccuracyGateError(f"no trial of study {cfg.study!r} finished on this host (key {s.key})",
                                    hint="run with more --trials or a longer --time-budget")
        c = _closest(ours, cfg)
        a = c.user_attrs
        raise AccuracyGateError(
            f"no trial meets the constraints ({_limits(cfg)}); closest: trial #{c.number} "
            f"({describe_trial(c.user_attrs)}): val "
            f"{c.values[0]:.2f}% (drop {a.get('drop', 0):.2f}), {c.values[1]:.3g} ms, {c.values[2] / 1e6:.3g} MB",
            hint="relax --max-drop / --max-size / --max-latency-ms, or add fine-tuning epochs (see trials.csv)")
    best = choose_best(front, cfg.objective)

    # pareto/: a fresh copy of every front file, named by trial and recipe; their lineage is the chain's own.
    tmp = out / ".pareto.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for t in front:
        shutil.copy2(t.user_attrs["artifact"], tmp / _name(t))
    _replace_dir(tmp, out / "pareto")

    # The test split, once, at the end: bench measures each front file on its runtime with --data.
    tests, bench_files = _measure_test(s, front)
    best_file = out / "best.onnx"
    shutil.copy2(out / "pareto" / _name(best), out / ".best.onnx.tmp")
    (out / ".best.onnx.tmp").replace(best_file)
    points = [_point(t, tests.get(t.number)) for t in front]
    best_doc = {**_point(best, tests.get(best.number)), "objective": cfg.objective, "file": str(best_file),
                "pareto_file": str(out / "pareto" / _name(best)), "parent_val_top1": round(s.parent_val, 3),
                "commands": commands(best, s)}
    write_text_atomic(out / "best.json", json.dumps(best_doc, indent=2) + "\n", commit=False)
    write_text_atomic(out / "trials.csv", _csv(trials, front_numbers, tests, s.key), commit=False)
    lines = ["#!/bin/sh", f"# Each Pareto point of study {cfg.study!r} ({s.model.name}) as plain resopt commands.",
             "set -e"]
    for t in front:
        lines += ["", f"# trial #{t.number}: {describe_trial(t.user_attrs)}; val {t.values[0]:.2f}%, "
                      f"{t.values[1]:.3g} ms at batch "
                      f"{cfg.bench.batch_size}, {t.values[2] / 1e3:.1f} kB"
                      + (" (best)" if t is best else ""), *commands(t, s)]
    write_text_atomic(out / "commands.sh", "\n".join(lines) + "\n", commit=False)
    (out / "commands.sh").chmod(0o755)
    report_files = _report(s, bench_files)
    doc = {"study": cfg.study, "storage": s.url, "model": str(s.model), "model_sha256": s.model_sha,
           "objective": cfg.objective, "constraints": _limits(cfg) or None, "device_key": s.key,
           "parent_val_top1": round(s.parent_val, 3), "batch_size": cfg.bench.batch_size,
           "trials": {"target": cfg.trials, "complete": len(complete),
                      "failed": sum(t.state == TrialState.FAIL for t in trials), "this_run": counts,
                      "other_hosts": others},
           "seconds": round(seconds, 1), "pareto": points, "best": best_doc,
           "files": {"pareto": str(out / "pareto"), "best": str(best_file), "trials": str(out / "trials.csv"),
                     "commands": str(out / "commands.sh"), "report": [str(p) for p in report_files],
                     "bench": [str(p) for p in bench_files]}}
    test = tests.get(best.number)
    log(f"optimize: {len(complete)} trials; {len(front)} on the Pareto front (val top-1 vs latency vs size); best "
        f"({cfg.objective}): #{best.number} {describe_trial(best.user_attrs)}: val {best.values[0]:.2f}%, test "
        f"{'—' if test is None else format(test, '.2f') + '%'}, {best.values[1]:.3g} ms at batch "
        f"{cfg.bench.batch_size}, {best.values[2] / 1e3:.1f} kB -> {best_file}")
    return doc


def _limits(cfg: OptimizeConfig) -> str:
    parts = []
    if cfg.max_drop is not None:
        parts.append(f"--max-drop {cfg.max_drop:g}")
    if cfg.max_size is not None:
        parts.append(f"--max-size {cfg.max_size:g}")
    if cfg.max_latency_ms is not None:
        parts.append(f"--max-latency-ms {cfg.max_latency_ms:g}")
    return ", ".join(parts)


def _measure_test(s: Session, front: list[Any]) -> tuple[dict[int, float | None], list[Path]]:
    from resopt.bench import bench_models
    from resopt.optimize.measure import bench_lock, lock_path

    cfg, out = s.cfg, s.cfg.out_dir
    tests: dict[int, float | None] = {}
    files = []
    by_runtime: dict[str, list[Any]] = {}
    for t in front:
        by_runtime.setdefault(t.user_attrs["runtime"], []).append(t)
    for runtime, group in by_runtime.items():
        paths = [out / "pareto" / _name(t) for t in group]
        intervals: list[list[float]] = []
        with bench_lock(lock_path(), intervals):
            report = bench_models(paths, cfg.bench.config(runtime, data=cfg.data, limit_per_class=cfg.limit_per_class))
        doc = report.to_dict()
        for t, row in zip(group, doc["models"], strict=True):
            acc = row.get("accuracy") or {}
            tests[t.number] = None if acc.get("top1") is None else round(float(acc["top1"]), 3)
        path = out / f"bench.{runtime}.json"
        from resopt.artifacts import write_text_atomic

        write_text_atomic(path, json.dumps(doc, indent=2) + "\n", commit=False)
        files.append(path)
    return tests, files


def _report(s: Session, bench_files: list[Path]) -> list[Path]:
    from resopt.report import ReportConfig, build_report, write_report

    cfg = ReportConfig(title=f"resopt optimize {s.model.name}: Pareto front of study {s.cfg.study}",
                       batch_size=s.cfg.bench.batch_size, device="cpu")
    report = build_report([s.cfg.out_dir / "pareto", *bench_files], cfg)
    return write_report(report, s.cfg.out_dir)
