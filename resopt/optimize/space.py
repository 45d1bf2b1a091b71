"""The search space of ``resopt optimize``: a table of steps, each a table of recipes.

A trial walks ``STEPS`` in order. Each step applies to the kind of file the chain holds at that point (prune
to a ``.pt``, export turns it into an ``.onnx``, quantize takes the ``.onnx``), and the trial picks one of the
step's recipes. A recipe is one record: the options it samples from the ``Space`` the user gave, the resopt
library call that produces its output (``None``: the step passes its input through), and the plain ``resopt``
command line that does the same, for ``commands.sh``. A new pruning method (as block removal was, or a latency
target) or a new quantization mode is one more ``Recipe`` in its step's tuple; nothing else branches on the names.

The runtime the final ``.onnx`` is measured on is sampled last, from ``Space.runtimes`` (bench's runtime table).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Suggests(Protocol):
    """What a recipe samples with: an Optuna trial (``suggest_categorical``)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class Space:
    """The values the search may take, from the command's options."""

    prune_ratios: tuple[float, ...] = (0.25, 0.5)
    target_macs: tuple[float, ...] = ()  # given: channel pruning searches MACs targets instead of ratios
    finetune_epochs: tuple[int, ...] = (0, 1)
    blocks: tuple[int, ...] = (1, 2)  # residual blocks block pruning removes; () : no block pruning
    distill: tuple[bool, ...] = (True, False)  # fine-tuning distils from the parent, or learns the labels alone
    quant_modes: tuple[str, ...] = ("none", "fp16", "int8")
    calib_methods: tuple[str, ...] = ("minmax", "entropy", "percentile")
    per_channel: tuple[bool, ...] = (True, False)
    runtimes: tuple[str, ...] = ("ort",)


@dataclass(frozen=True)
class Context:
    """What every producer needs besides its input: the data and the fixed settings of the chain."""

    data: str
    limit_per_class: int | None = None
    seed: int = 0
    device: str = "cpu"
    num_calib: int = 64
    num_verify: int = 64
    lr: float = 0.01
    batch_size: int = 128  # fine-tuning batch size

    def data_flags(self) -> list[str]:
        flags = ["--data", self.data]
        if self.limit_per_class is not None:
            flags += ["--limit-per-class", str(self.limit_per_class)]
        return flags


Produce = Callable[[Path, Path, dict[str, Any], Context], None]
Command = Callable[[Path, Path, dict[str, Any], Context], list[str]]


@dataclass(frozen=True)
class Recipe:
    name: str
    sample: Callable[[Suggests, Space], dict[str, Any]]
    produce: Produce | None  # None: the step passes its input through unchanged
    command: Command | None
    suffix: str = ""  # of the produced file
    offered: Callable[[Space], bool] = lambda space: True


@dataclass(frozen=True)
class Step:
    name: str
    takes: tuple[str, ...]  # the artifact kinds (pt, onnx) this step applies to
    recipes: tuple[Recipe, ...]
    yields: str = ""  # the kind after the step ("" : unchanged)
    choices: Callable[[Space], tuple[str, ...]] | None = None  # the recipes offered, in the user's order

    def offered(self, space: Space) -> tuple[Recipe, ...]:
        by_name = {r.name: r for r in self.recipes}
        names = self.choices(space) if self.choices else tuple(by_name)
        return tuple(by_name[n] for n in names if n in by_name and by_name[n].offered(space))

    def recipe(self, name: str) -> Recipe:
        return next(r for r in self.recipes if r.name == name)


def _none(trial: Suggests, space: Space) -> dict[str, Any]:
    return {}


# ------------------------------------------------------------------------------------------------ prune


def _sample_finetune(trial: Suggests, space: Space, method: str) -> dict[str, Any]:
    """Fine-tuning epochs, and with any: distillation from the parent or the labels alone."""
    opts: dict[str, Any] = {"finetune_epochs": int(trial.suggest_categorical(f"prune.{method}.finetune_epochs",
                                                                             list(space.finetune_epochs)))}
    if opts["finetune_epochs"] > 0:
        opts["distill"] = bool(trial.suggest_categorical(f"prune.{method}.distill", list(space.distill)))
    return opts


def _sample_channel(method: str) -> Callable[[Suggests, Space], dict[str, Any]]:
    def sample(trial: Suggests, space: Space) -> dict[str, Any]:
        opts: dict[str, Any] = {"method": method}
        if space.target_macs:
            opts["target_macs"] = float(trial.suggest_categorical(f"prune.{method}.target_macs",
                                                                  list(space.target_macs)))
        else:
            opts["sparsity"] = float(trial.suggest_categorical(f"prune.{method}.sparsity", list(space.prune_ratios)))
        return {**opts, **_sample_finetune(trial, space, method)}
    return sample


def _sample_block(trial: Suggests, space: Space) -> dict[str, Any]:
    return {"method": "block", "blocks": int(trial.suggest_categorical("prune.block.blocks", list(space.blocks))),
            **_sample_finetune(trial, space, "block")}


def _produce_prune(parent: Path, output: Path, opts: dict[str, Any], ctx: Context) -> None:
    from resopt.prune import PruneConfig, prune_checkpoint
    from resopt.train import DataOptions, TrainConfig

    ft = int(opts["finetune_epochs"])
    cfg = PruneConfig(method=opts["method"], sparsity=opts.get("sparsity"), target_macs=opts.get("target_macs"),
                      blocks=opts.get("blocks"), finetune_epochs=ft, distill=bool(opts.get("distill", True)))
    # The fine-tuning settings are `resopt prune`'s defaults except those named in _prune_command, so that the
    # command in commands.sh reproduces this call.
    train = TrainConfig(epochs=max(1, ft), batch_size=ctx.batch_size, lr=ctx.lr, warmup_epochs=0.0, seed=ctx.seed,
                        device=ctx.device)
    prune_checkpoint(parent, cfg, data=DataOptions(ctx.data, ctx.limit_per_class, None, ctx.seed), train=train,
                     output=output)


def _prune_command(parent: Path, output: Path, opts: dict[str, Any], ctx: Context) -> list[str]:
    amount = ["--target-macs", str(opts["target_macs"])] if "target_macs" in opts else \
        ["--blocks", str(opts["blocks"])] if "blocks" in opts else ["--sparsity", str(opts["sparsity"])]
    distill = [] if opts.get("distill", True) else ["--no-distill"]
    return ["resopt", "prune", str(parent), "--method", opts["method"], *amount, "--finetune-epochs",
            str(opts["finetune_epochs"]), *distill, "--lr", str(ctx.lr), "--batch-size", str(ctx.batch_size), "--seed",
            str(ctx.seed), "--device", ctx.device, *ctx.data_flags(), "-o", str(output)]


# ----------------------------------------------------------------------------------------------- export


def _produce_export(parent: Path, output: Path, opts: dict[str, Any], ctx: Context) -> None:
    from resopt.export import ExportConfig, export_onnx

    export_onnx(parent, output, ExportConfig(data=ctx.data, num_verify=ctx.num_verify))


def _export_command(parent: Path, output: Path, opts: dict[str, Any], ctx: Context) -> list[str]:
    return ["resopt", "export", str(parent), "--data", ctx.data, "--num-verify", str(ctx.num_verify), "-o",
            str(output)]


# --------------------------------------------------------------------------------------------- quantize


def _sample_int8(trial: Suggests, space: Space) -> dict[str, Any]:
    return {"mode": "int8",
            "per_channel": bool(trial.suggest_categorical("quantize.int8.per_channel", list(space.per_channel))),
            "calib_method": str(trial.suggest_categorical("quantize.int8.calib_method", list(space.calib_methods)))}


def _sample_fp16(trial: Suggests, space: Space) -> dict[str, Any]:
    return {"mode": "fp16"}


def _quantize_config(opts: dict[str, Any], ctx: Context) -> Any:
    from resopt.quantize import QuantizeConfig

    extra = {"per_channel": opts["per_channel"], "calib_method": opts["calib_method"]} if opts["mode"] == "int8" \
        else {}
    return QuantizeConfig(mode=opts["mode"], calib_data=ctx.data, num_calib=ctx.num_calib, seed=ctx.seed, **extra)


def _produce_quantize(parent: Path, output: Path, opts: dict[str, Any], ctx: Context) -> None:
    from resopt.quantize import quantize_model

    quantize_model(parent, output, _quantize_config(opts, ctx))


def _quantize_command(parent: Path, output: Path, opts: dict[str, Any], ctx: Context) -> list[str]:
    extra: list[str] = []
    if opts["mode"] == "int8":
        extra = ["--calib-method", opts["calib_method"]] + ([] if opts["per_channel"] else ["--per-tensor"])
    return ["resopt", "quantize", str(parent), "--mode", opts["mode"], *extra, "--calib-data", ctx.data,
            "--num-calib", str(ctx.num_calib), "--seed", str(ctx.seed), "-o", str(output)]


NO_STEP = "none"

STEPS: tuple[Step, ...] = (
    Step("prune", ("pt",), (
        Recipe(NO_STEP, _none, None, None),
        Recipe("l1-struct", _sample_channel("l1-struct"), _produce_prune, _prune_command, ".pt"),
        Recipe("block", _sample_block, _produce_prune, _prune_command, ".pt", offered=lambda s: bool(s.blocks)),
    )),
    Step("export", ("pt",), (
        Recipe("onnx", _none, _produce_export, _export_command, ".onnx"),
    ), yields="onnx"),
    Step("quantize", ("onnx",), (
        Recipe(NO_STEP, _none, None, None, offered=lambda s: NO_STEP in s.quant_modes),
        Recipe("fp16", _sample_fp16, _produce_quantize, _quantize_command, ".onnx",
               offered=lambda s: "fp16" in s.quant_modes),
        Recipe("int8", _sample_int8, _produce_quantize, _quantize_command, ".onnx",
               offered=lambda s: "int8" in s.quant_modes),
    ), choices=lambda s: s.quant_modes),
)
QUANT_MODES = tuple(r.name for r in STEPS[-1].recipes)


@dataclass(frozen=True)
class Planned:
    """One step of a trial's chain: which recipe, with which options."""

    step: str
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        shown = {k: v for k, v in self.options.items() if k not in ("method", "mode")}
        inner = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"{self.step} {self.recipe}" + (f"({inner})" if inner else "")


def sample_chain(trial: Suggests, space: Space, kind: str) -> tuple[list[Planned], str]:
    """The chain of steps for a model of ``kind`` and the runtime, sampled from ``space``."""
    chain: list[Planned] = []
    for step in STEPS:
        if kind not in step.takes:
            continue
        recipes = step.offered(space)
        name = recipes[0].name if len(recipes) == 1 else str(trial.suggest_categorical(step.name,
                                                                                        [r.name for r in recipes]))
        recipe = step.recipe(name)
        chain.append(Planned(step.name, name, recipe.sample(trial, space)))
        kind = step.yields or kind
    runtime = space.runtimes[0] if len(space.runtimes) == 1 else str(trial.suggest_categorical(
        "runtime", list(space.runtimes)))
    return chain, runtime


def baseline_params(space: Space, kind: str) -> dict[str, Any]:
    """The parameters of the unchanged model (exported as it is, FP32) on the first runtime: the study's first
    trial, so that every front has the parent's own point to compare with."""
    params: dict[str, Any] = {}
    for step in STEPS:
        if kind in step.takes and len(step.offered(space)) > 1:
            names = [r.name for r in step.offered(space)]
            params[step.name] = NO_STEP if NO_STEP in names else names[0]
        kind = step.yields or kind
    if len(space.runtimes) > 1:
        params["runtime"] = space.runtimes[0]
    return params


def shell_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def describe_trial(attrs: dict[str, Any]) -> str:
    """``prune l1-struct(sparsity=0.5, finetune_epochs=1) -> quantize int8(...) on ort`` from a trial's
    recorded chain."""
    chain = [Planned(**p).label() for p in attrs.get("chain", []) if p["recipe"] != NO_STEP and p["step"] != "export"]
    return " -> ".join(chain or ["unchanged"]) + f" on {attrs.get('runtime')}"
