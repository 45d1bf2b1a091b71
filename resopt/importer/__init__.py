"""``resopt import``: a model trained elsewhere becomes a resopt artifact that every command takes.

PyTorch sources (``.pt .pth .th .ckpt .tar``) become a resopt ``.pt`` checkpoint: the state dict is
mapped onto a registry architecture (``statedict``). ONNX sources become a stamped ``.onnx``: batch axis
made dynamic, old opsets upgraded (``onnx_source``). Both get the classes, the preprocessing (input size,
mean, std, resize policy) and a lineage step ``import`` naming the source file, its sha256, its format
and the mapping used. With ``--data`` the result's top-1/top-5 on the test split are measured, and a
mapping that gives near-chance accuracy is refused instead of written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import FOREIGN_PT_SUFFIXES, Preprocess
from resopt.console import log
from resopt.errors import DataError, InputFileError, UsageError, VerificationError

if TYPE_CHECKING:
    from torch import nn



@dataclass(frozen=True)
class Source:
    """One format ``resopt import`` reads: everything the command needs to know about it, in one record."""

    format: str  # the lineage's "format"
    suffixes: tuple[str, ...]  # of the source file
    output_suffixes: tuple[str, ...]  # what -o may be
    default_output: str  # next to the source, from its stem
    producer: str  # "module:function" (source, output, ImportConfig) -> ImportResult, imported when used


# The one table of import formats. Adding one: a module with its producer and an entry here. The PyTorch
# suffixes are artifacts' (whose "bring it in with `resopt import`" hint names the same files).
SOURCES: tuple[Source, ...] = (
    Source("pytorch", FOREIGN_PT_SUFFIXES, (".pt", ".pth"), "{stem}.pt", "resopt.importer:import_pytorch"),
    Source("onnx", (".onnx",), (".onnx",), "{stem}.resopt.onnx", "resopt.importer.onnx_source:import_onnx"),
)


@dataclass(frozen=True)
class ImportConfig:
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: int | None = None
    resize: int | None = None
    classes: str | None = None  # comma list or a text file, one name per line
    data: str | None = None
    limit_per_class: int | None = None
    arch: str | None = None
    renames: tuple[str, ...] = ()
    num_verify: int = 64  # ONNX: images on which batch 1 and batch N (and the upgraded opset) are compared
    tolerance: float = 1e-4  # ONNX: allowed max |result - source| logit difference, relative to the largest
    batch_size: int = 200

    def validate(self) -> None:
        for name, v in (("--mean", self.mean), ("--std", self.std)):
            if v is not None and len(v) != 3:
                raise UsageError(f"{name} takes 3 values (R,G,B), got {len(v)}: {','.join(map(str, v))}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise UsageError(f"--std values must be positive, got {','.join(map(str, self.std))}")
        if self.input_size is not None and not 8 <= self.input_size <= 2048:
            raise UsageError(f"--input-size must be between 8 and 2048, got {self.input_size}")
        if self.resize is not None and self.input_size is not None and self.resize < self.input_size:
            raise UsageError(f"--resize {self.resize} is smaller than --input-size {self.input_size}; "
                             f"resize then center crop needs resize >= input size")
        if self.limit_per_class is not None and self.data is None:
            raise UsageError("--limit-per-class limits the --data test split; pass --data too")


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"0.485,0.456,0.406"`` -> floats; a one-line error naming the option otherwise."""
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers (R,G,B), got {text!r}") from None


@dataclass
class ImportResult:
    output: Path
    source: Path
    sha256: str
    format: str
    arch: str
    num_classes: int
    classes_from: str
    preprocess: Preprocess
    details: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"output": str(self.output), "source": str(self.source), "sha256": self.sha256,
                "format": self.format, "arch": self.arch, "num_classes": self.num_classes,
                "classes_from": self.classes_from, "preprocess": self.preprocess.to_dict(), **self.details,
                "metrics": self.metrics, "seconds": round(self.seconds, 2)}


# ---------------------------------------------------------------------------------------- shared parts


def resolve_classes(cfg: ImportConfig, num_outputs: int | None) -> tuple[list[str], str]:
    """Class names from ``--classes`` or ``--data``'s folders, checked against the model's output count."""
    from_opt: list[str] | None = None
    if cfg.classes is not None:
        p = Path(cfg.classes)
        if p.is_file():
            from_opt = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
            where = f"--classes file {p}"
        else:
            from_opt = [c.strip() for c in cfg.classes.split(",") if c.strip()]
            where = "--classes"
        if len(set(from_opt)) != len(from_opt):
            raise UsageError(f"{where} names a class twice")
    from_data: list[str] | None = None
    if cfg.data is not None:
        from resopt.data import classes_of, resolve_data

        data_source = resolve_data(cfg.data)
        from_data = classes_of(data_source.dataset("test" if data_source.has_test else "train"))
    if from_opt is not None and from_data is not None and from_opt != from_data:
        raise DataError(f"--classes ({', '.join(from_opt[:4])}, ...) differ from the class folders of --data "
                        f"{cfg.data} ({', '.join(from_data[:4])}, ...)",
                        hint="drop --classes: with --data the class names come from its folders")
    classes = from_opt if from_opt is not None else from_data
    if classes is None:
        raise UsageError("the model's class names are needed: pass --classes (a comma list or a text file, one "
                         "name per line) or --data (a folder whose class folders name them)")
    source = where if from_opt is not None else f"class folders of {cfg.data}"
    if num_outputs is not None and len(classes) != num_outputs:
        err = DataError if from_opt is None else UsageError
        raise err(f"the model has {num_outputs} outputs but {source} gives {len(classes)} classes",
                  hint="pass the classes the model was trained on, in its output order")
    return classes, source


def check_not_chance(top1: float, num_classes: int, source: Path) -> None:
    """A mapping or preprocessing that is wrong gives near-chance accuracy: refuse it."""
    chance = 100.0 / num_classes
    if top1 < 2 * chance:
        raise VerificationError(
            f"{source} imported with top-1 {top1:.1f}% on the test data, near chance ({chance:.1f}%); "
            f"the key mapping, shortcut style, class order or normalization is wrong",
            hint="check --mean/--std and the class order; force --arch or map keys with --rename OLD=NEW")


def default_preprocess(cfg: ImportConfig, *, input_size: int) -> Preprocess:
    if cfg.mean is None or cfg.std is None:
        raise UsageError("pass --mean R,G,B and --std R,G,B: the normalization the model was trained with "
                         "(e.g. ImageNet's 0.485,0.456,0.406 and 0.229,0.224,0.225)")
    # Inputs above 64 px are evaluated resize-then-center-crop at size/0.875, as resopt trains them.
    resize = cfg.resize if cfg.resize is not None else (None if input_size <= 64 else round(input_size / 0.875))
    return Preprocess(input_size=input_size, mean=tuple(cfg.mean), std=tuple(cfg.std),  # type: ignore[arg-type]
                      resize=resize)


def source_of(path: Path) -> Source:
    """The import format of ``path``, by its suffix; one line listing every readable suffix otherwise."""
    suffix = path.suffix.lower()
    for source in SOURCES:
        if suffix in source.suffixes:
            return source
    raise InputFileError(f"{path} is not a model file `resopt import` reads (suffix {suffix or 'none'!r}); "
                         f"expected one of: {', '.join(x for source in SOURCES for x in source.suffixes)}")


def source_format(path: Path) -> str:
    return source_of(path).format


def default_output(source: Path) -> Path:
    """``r56.th`` -> ``r56.pt``; ``model.onnx`` -> ``model.resopt.onnx`` (next to the source)."""
    return source.with_name(source_of(source).default_output.format(stem=source.stem))


def import_model(source: Path, output: Path | None, cfg: ImportConfig) -> ImportResult:
    """Turn ``source`` (a foreign PyTorch checkpoint or ONNX classifier) into a resopt artifact."""
    import importlib

    from resopt.artifacts import check_output_path

    source = Path(source)
    if not source.exists():
        raise InputFileError(f"{source} does not exist")
    if source.is_dir():
        raise InputFileError(f"{source} is a folder, not a model file")
    fmt = source_of(source)
    cfg.validate()
    output = Path(output) if output is not None else default_output(source)
    check_output_path(output, source, suffixes=fmt.output_suffixes)
    module, func = fmt.producer.split(":")
    result: ImportResult = getattr(importlib.import_module(module), func)(source, output, cfg)
    return result


# --------------------------------------------------------------------------------------------- PyTorch


def evaluate_torch(model: nn.Module, cfg: ImportConfig, pre: Preprocess, classes: list[str]) -> dict[str, Any]:
    from resopt.backends.cuda import resolve_device
    from resopt.data import check_classes, classes_of, load_report_set, make_loader
    from resopt.train import evaluate

    assert cfg.data is not None
    ds, split = load_report_set(cfg.data, pre, per_class=cfg.limit_per_class)
    check_classes(classes, classes_of(ds), model_name="the imported model", data=cfg.data)
    log(f"measuring top-1 on {len(ds)} {split} images of {cfg.data}")  # type: ignore[arg-type]
    acc = evaluate(model, make_loader(ds, cfg.batch_size, shuffle=False), resolve_device("cpu"))
    return {"top1": acc.top1, "top5": acc.top5, "eval_images": acc.n, "split": split, "data": cfg.data}


def import_pytorch(source: Path, output: Path, cfg: ImportConfig) -> ImportResult:
    from resopt.artifacts import (
        CHECKPOINT_FORMAT,
        lineage_entry,
        make_checkpoint,
        save_checkpoint,
        sha256_file,
        torch_load_plain,
    )
    from resopt.importer import statedict as S
    from resopt.models import build_model, count_macs, count_params, get_spec, model_widths

    t0 = time.perf_counter()
    obj = torch_load_plain(source)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        raise InputFileError(f"{source} is already a resopt checkpoint; there is nothing to import",
                             hint=f"use it directly: resopt info {source}")
    raw, container = S.unwrap_state_dict(obj, str(source))
    sd, prefixes = S.strip_prefixes(raw)
    renames = S.parse_renames(cfg.renames)
    renamed_view = {}
    for k, v in sd.items():
        for pattern, repl in renames:
            k = pattern.sub(repl, k)
        renamed_view[k] = v
    guess = S.infer_arch(renamed_view, cfg.arch, str(source))
    classes, classes_from = resolve_classes(cfg, guess.num_classes)
    spec = get_spec(guess.arch)
    pre = default_preprocess(cfg, input_size=cfg.input_size or spec.default_input_size)
    model = build_model(guess.arch, guess.num_classes, width=guess.width)
    mapping, conversion_diff = S.build_state_dict(model, sd, guess, renames=renames, source=str(source))
    counts = mapping.rule_counts()
    log(f"{source.name}: {len(sd)} tensors ({container}{', prefix ' + ''.join(prefixes) if prefixes else ''}) "
        f"-> {guess.arch} at width {guess.width:g} ({guess.reason}); mapped by "
        + ", ".join(f"{rule} {n}" for rule, n in counts.items()))
    shortcut = ("option A (zero-padding identity) converted exactly to 1x1 projection + identity BatchNorm"
                if guess.option_a else "as in the source")
    if conversion_diff is not None:
        log(f"option-A shortcuts converted; max |projection - zero padding| = {conversion_diff:.3g}")
        if conversion_diff > 1e-6:
            raise VerificationError(f"the converted option-A shortcuts differ from zero padding by "
                                    f"{conversion_diff:.3g}")
    metrics: dict[str, Any] = {}
    if cfg.data is not None:
        metrics.update(evaluate_torch(model, cfg, pre, classes))
        log(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}% on {metrics['eval_images']} images")
        check_not_chance(metrics["top1"], len(classes), source)
    params, _ = count_params(model)
    metrics.update({"params": params, "macs": count_macs(model, pre.input_size)})
    details = {"container": container, "prefixes_stripped": prefixes, "arch_reason": guess.reason,
               "width": guess.width, "shortcuts": shortcut, "mapping_rules": counts,
               "option_a_conversion_max_abs_diff": conversion_diff, "renames": list(cfg.renames)}
    entry = lineage_entry("import", parent=source, metrics=metrics, options={
        "source": source.name, "format": "pytorch", "arch": guess.arch, "width": guess.width,
        "data": cfg.data, "classes_from": classes_from, **pre.to_dict(),
        **{k: v for k, v in details.items() if k != "mapping_rules"}, "mapping_rules": counts})
    entry["mapping"] = mapping.table()
    entry["metrics"]["seconds"] = round(time.perf_counter() - t0, 2)
    ckpt = make_checkpoint(arch=guess.arch, arch_kwargs={"width": guess.width}, state_dict=model.state_dict(),
                           classes=classes, preprocess=pre, lineage=[entry], metrics=metrics,
                           widths=model_widths(model))
    save_checkpoint(ckpt, output)
    return ImportResult(output, source, entry["parent"]["sha256"] if "parent" in entry else sha256_file(source),
                        "pytorch", guess.arch, len(classes), classes_from, pre, details, metrics,
                        time.perf_counter() - t0)
