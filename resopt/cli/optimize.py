"""``resopt optimize``: MODEL -> DIR with the measured Pareto set and the best deployable file for this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from resopt.cli.common import DataOpt, JsonOpt, LimitOpt, SeedOpt, check_options, emit


def _floats(option: str, text: str) -> tuple[float, ...]:
    from resopt.errors import UsageError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a comma-separated list of numbers") from None


def _ints(option: str, text: str) -> tuple[int, ...]:
    from resopt.errors import UsageError

    try:
        return tuple(dict.fromkeys(int(x) for x in _names(text)))
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a comma-separated list of integers") from None


def _switch(option: str, text: str) -> bool:
    from resopt.errors import choice_error

    if text not in ("on", "off"):
        raise choice_error(option.lstrip("-"), text, ("on", "off"))
    return text == "on"


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def _default_runtimes() -> str:
    from importlib.util import find_spec

    return "ort,openvino" if find_spec("openvino") is not None else "ort"


def optimize_cmd(
    model: Annotated[Path, typer.Argument(help="The model to compress: a .pt checkpoint (searches pruning, "
                                          "quantization and runtime) or an .onnx (quantization and runtime).",
                                          show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the study, its cache and results.",
                                         show_default=False)],
    data: DataOpt = None,
    trials: Annotated[int, typer.Option("--trials", "-n", help="Finished trials the study should hold (a re-run "
                                        "completes the missing ones; a larger N extends it).")] = 20,
    time_budget: Annotated[str | None, typer.Option("--time-budget", help="Wall time of this run (600, 90s, 30m, "
                                                    "1.5h); no trial starts after it.", show_default=False)] = None,
    workers: Annotated[int, typer.Option("--workers", help="Local worker processes sharing the study.")] = 1,
    storage: Annotated[str | None, typer.Option("--storage", help="Optuna RDB URL (postgresql://..., mysql://..., "
                                                "sqlite:///...) or a journal file path [default: DIR/study.db].",
                                                show_default=False)] = None,
    study: Annotated[str, typer.Option("--study", help="Study name in the storage (join it from N machines).")]
    = "optimize",
    objective: Annotated[str, typer.Option("--objective", help="What the single best file optimizes: latency, "
                                           "size or balanced.")] = "latency",
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="At most this many val top-1 points below "
                                                   "the parent.", show_default=False)] = None,
    max_size: Annotated[float | None, typer.Option("--max-size", help="File size limit in MB.",
                                                   show_default=False)] = None,
    max_latency_ms: Annotated[float | None, typer.Option("--max-latency-ms", help="Latency limit at --batch-size.",
                                                         show_default=False)] = None,
    runtime: Annotated[str | None, typer.Option("--runtime", help="Runtimes to search, comma-separated: ort, "
                                                "openvino [default: those installed].", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size latency is measured at.")] = 32,
    threads: Annotated[int | None, typer.Option("--threads", help="Inference threads [default: all cores].",
                                                show_default=False)] = None,
    prune_ratios: Annotated[str, typer.Option("--prune-ratios", help="Channel ratios l1-struct pruning tries.")]
    = "0.25,0.5",
    target_macs: Annotated[str | None, typer.Option("--target-macs", help="Instead of --prune-ratios: fractions of "
                                                    "the parent's MACs to keep (0.5,0.7).", show_default=False)] = None,
    finetune_epochs: Annotated[str, typer.Option("--finetune-epochs", help="Fine-tuning epochs after pruning "
                                                 "to try.")] = "0,1",
    blocks: Annotated[str, typer.Option("--blocks", help="Residual block counts block pruning removes, to try "
                                        "(\"\": no block pruning).")] = "1,2",
    distill: Annotated[str, typer.Option("--distill", help="Fine-tuning to try after pruning: on (distil from the "
                                         "parent), off (labels alone), or both.")] = "on,off",
    quantize: Annotated[str, typer.Option("--quantize", help="Quantization to try: none (FP32), fp16, int8.")]
    = "none,fp16,int8",
    calib_methods: Annotated[str, typer.Option("--calib-methods", help="INT8 calibration methods to try.")]
    = "minmax,entropy,percentile",
    num_calib: Annotated[int, typer.Option("--num-calib", help="Calibration images for INT8.")] = 64,
    min_time: Annotated[float, typer.Option("--min-time", help="Seconds of timed work per latency measurement.")]
    = 1.0,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved rounds per latency measurement.")] = 3,
    device_key: Annotated[str | None, typer.Option("--device-key", help="Trials of hosts with this key share one "
                                                   "front [default: a hash of CPU, ISA, runtime versions and "
                                                   "threads].", show_default=False)] = None,
    limit_per_class: LimitOpt = None,
    seed: SeedOpt = 0,
    json_: JsonOpt = False,
) -> None:
    """Find the best deployable model for this machine: a multi-objective search (Optuna) over pruning,
    quantization and runtime, measured here: val top-1, latency at --batch-size with bench's worker, file
    size. Every choice is made on the validation split; the Pareto set is measured once on test at the end.

    DIR gets study.db (a plain Optuna study), pareto/ (every Pareto-optimal file, with its lineage),
    best.onnx and best.json (--objective), trials.csv, commands.sh (each Pareto point as plain resopt
    commands), bench.*.json and report.md/report.html/plots/. Re-running the same command resumes the study.

    Examples:

      resopt optimize r20.pt --data cifar10 --max-drop 1.0 --objective latency -o r20-opt/

      resopt optimize r20.pt --data cifar10 --trials 40 --time-budget 1h --runtime ort,openvino -o r20-opt/

      resopt optimize r20.onnx --data cifar10 --quantize fp16,int8 --max-size 0.2 -o r20-q/

      resopt optimize r56.pt --data cifar10 --storage postgresql://user@db/resopt --study r56 -o r56-opt/
    """
    check_options(locals())
    from resopt.optimize import OptimizeConfig, optimize_model, parse_duration
    from resopt.optimize.measure import BenchSettings
    from resopt.optimize.space import Space

    if data is None:
        from resopt.calib import lineage_data
        from resopt.errors import UsageError
        from resopt.kinds import read_artifact_info

        found = None
        if model.is_file():
            info = read_artifact_info(model)
            found = lineage_data(list(info.classes), info.lineage)
        if found is None:
            raise UsageError("optimize needs --data: val top-1 chooses, test reports, INT8 calibrates on it",
                             hint="resopt optimize r20.pt --data examples/cifar10-mini -o r20-opt/")
        data = found[0]
    epochs = _ints("--finetune-epochs", finetune_epochs)
    block_counts = _ints("--blocks", blocks)
    distill_choices = tuple(_switch("--distill", x) for x in _names(distill))
    space = Space(prune_ratios=_floats("--prune-ratios", prune_ratios), blocks=block_counts, distill=distill_choices,
                  target_macs=_floats("--target-macs", target_macs) if target_macs else (), finetune_epochs=epochs,
                  quant_modes=_names(quantize), calib_methods=_names(calib_methods),
                  runtimes=_names(runtime if runtime is not None else _default_runtimes()))
    bench = BenchSettings(batch_size=batch_size, threads=threads, min_seconds=min_time, rounds=rounds)
    cfg = OptimizeConfig(data=data, out_dir=output, trials=trials, time_budget=parse_duration(time_budget),
                         workers=workers, storage=storage, study=study, objective=objective, max_drop=max_drop,
                         max_size=max_size, max_latency_ms=max_latency_ms, device_key=device_key, space=space,
                         bench=bench, limit_per_class=limit_per_class, seed=seed, num_calib=num_calib)
    result = optimize_model(model, cfg)
    emit(result.summary(), json_out=json_, render=_render)


def _render(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    from resopt.optimize.space import describe_trial

    t = Table(title=f"Pareto front of study {doc['study']} ({doc['trials']['complete']} trials; parent val "
                    f"top-1 {doc['parent_val_top1']:.2f}%)", title_justify="left",
              caption=f"best ({doc['objective']}): {doc['files']['best']}; reproduce: {doc['files']['commands']}",
              caption_justify="left")
    for h in ("trial", "recipe", "val top-1", "drop", "test top-1", f"ms @ b{doc['batch_size']}", "size kB"):
        t.add_column(h, justify="left" if h == "recipe" else "right")
    for p in doc["pareto"]:
        star = " ★" if p["trial"] == doc["best"]["trial"] else ""
        t.add_row(f"#{p['trial']}{star}", describe_trial({"chain": p["recipe"], "runtime": p["runtime"]}),
                  f"{p['val_top1']:.2f}%", f"{p['drop']:+.2f}" if p["drop"] is not None else "—",
                  "—" if p["test_top1"] is None else f"{p['test_top1']:.2f}%", f"{p['latency_ms']:.3f}",
                  f"{p['size_bytes'] / 1e3:.1f}")
    return t
