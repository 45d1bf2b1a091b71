"""Training: ``fit`` (the loop every stage reuses) and ``train_model`` (the ``train`` command's work).

``fit`` trains any ``nn.Module`` with SGD (momentum, Nesterov) or AdamW, a per-step cosine schedule with
linear warm-up, label smoothing, AMP and channels_last on CUDA, and evaluates top-1/top-5 on the
validation split each epoch, keeping the best weights (``--select last``: the last). ``prepare_data`` gives
every training command the same three splits (``resopt.data.splits``); ``measure_test`` measures the kept
model on test once, after the choice. Distillation, pruning fine-tunes and QAT plug in through ``loss_fn`` (a
different loss) and ``hooks`` (re-applying masks after each step, zeroing filters each epoch, ...).

Under ``torchrun`` it trains data-parallel with DistributedDataParallel (NCCL on CUDA, gloo on CPU);
``--batch-size`` is then per process, and only rank 0 logs and writes files.

The package: ``loop`` (``fit``, ``TrainConfig``, ``evaluate``, the resume state); this module prepares the data
and runs the ``train`` command.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import (
    Preprocess,
    check_output_path,
    lineage_entry,
    make_checkpoint,
    save_checkpoint,
)
from resopt.backends.cuda import resolve_device
from resopt.console import log
from resopt.data.splits import ValSplit
from resopt.train.loop import (
    OPTIMIZERS,
    FitResult,
    Hook,
    LossFn,
    TrainConfig,
    evaluate,
    fit,
    resume_path_for,
    seed_everything,
)

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

    from resopt.data import Splits
    from resopt.metrics import TopK

__all__ = [
    "OPTIMIZERS", "DataOptions", "FitResult", "Hook", "LossFn", "PreparedData", "TrainConfig", "TrainResult",
    "evaluate", "fit", "measure_test", "prepare_data", "resume_path_for", "seed_everything", "split_metrics",
    "train_model", "training_data",
]


def training_data(data: str | None, *, recorded_in: Path | None = None, needs: str, hint: str) -> str:
    """The data a command that trains reads: ``--data`` when given; else, for a command that starts from a
    checkpoint (prune, distill: ``recorded_in``), the data its lineage records, when it is still here; else a
    ``UsageError`` (exit 2) that the command ``needs`` --data. No shipped-set fallback: fine-tuning and measuring
    on the 320 calibration images would report top-1 on the training images."""
    from resopt.errors import UsageError

    if data is None and recorded_in is not None:
        from resopt.calib import data_from_checkpoint

        data = data_from_checkpoint(recorded_in)
    if data is None:
        raise UsageError(needs, hint=hint)
    return data


@dataclass(frozen=True)
class DataOptions:
    """How a command reads ``--data``."""

    data: str
    limit_per_class: int | None = None
    val_split: float | None = None  # hold out this fraction of train; None: the data's val/ or the default
    seed: int = 0
    data_path: str = "auto"  # fast (decoded tensors), pil (a DataLoader over PIL transforms) or auto


@dataclass
class TrainResult:
    output: Path
    arch: str
    params: int
    macs: int
    preprocess: Preprocess
    fit: FitResult
    train_images: int
    metrics: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"output": str(self.output), "arch": self.arch, "params": self.params, "macs": self.macs,
                "train_images": self.train_images, **self.metrics, "history": self.fit.history}


@dataclass
class PreparedData:
    train: Dataset
    val: Dataset
    test: Dataset | None
    classes: list[str]
    preprocess: Preprocess
    splits: dict[str, Any]  # what the lineage records (Splits.record)
    val_split: ValSplit
    data_path: str = "pil"  # the path taken: "fast" (decoded tensors) or "pil"

    @property
    def val_note(self) -> str:
        """``40 images held out of train``: where the validation images came from, for progress lines."""
        return self.val_split.describe(len(self.val))  # type: ignore[arg-type]


def prepare_data(opts: DataOptions, *, preprocess: Preprocess | None = None, input_size: int | None = None,
                 arch_default_size: int = 32, device: str = "auto",
                 lineage: list[dict[str, Any]] | None = None) -> PreparedData:
    """Resolve ``--data`` into fit/val/test datasets with augmentation; decide preprocessing if not given.

    ``lineage``: the parent model's, whose recorded validation split is re-derived (``resopt.data.splits``).
    Small images take the fast path (decoded once into tensors, ``data.decoded``) when ``opts.data_path``
    asks for it, or by default when they fit in memory (on ``device`` when that is a GPU)."""
    from resopt.data import (
        choose_val_split,
        compute_normalization,
        decide_input_size,
        eval_transform,
        limit_per_class,
        recorded_val_split,
        resolve_data,
        train_transform,
    )
    from resopt.data.decoded import DATA_PATHS, choose_data_path, decode_images, decode_transform, fast_path_applies

    if opts.data_path not in DATA_PATHS:
        from resopt.errors import choice_error

        raise choice_error("data-path", opts.data_path, DATA_PATHS)
    source = resolve_data(opts.data)
    if source.kind == "folder" and source.train_dir is None:
        from resopt.errors import DataError

        raise DataError(f"data {opts.data} has no train/ folder to train on")
    recorded = recorded_val_split(lineage)
    val_split = choose_val_split(source, requested=opts.val_split, seed=opts.seed, recorded=recorded)
    rec_sha = recorded.get("sha256") if recorded is not None and ValSplit.from_dict(recorded) == val_split else None
    if preprocess is None:
        size, resize = decide_input_size(source, input_size, arch_default_size)
        raw = limit_per_class(source.dataset("train"), opts.limit_per_class, seed=opts.seed)
        mean, std = compute_normalization(raw, seed=opts.seed)
        preprocess = Preprocess(input_size=size, mean=mean, std=std, resize=resize)
    main = int(os.environ.get("RANK", "0")) == 0

    def splits(train_tf: Any, eval_tf: Any) -> Splits:
        from resopt.data import make_splits

        return make_splits(source, val_split, train_tf=train_tf, eval_tf=eval_tf, per_class=opts.limit_per_class,
                           seed=opts.seed, recorded_sha256=rec_sha)

    if opts.data_path == "fast" or (opts.data_path == "auto" and fast_path_applies(preprocess)):
        decode = decode_transform(preprocess)
        sp = splits(decode, decode)
        n = sum(len(d) for d in (sp.fit, sp.val, sp.test) if d is not None)  # type: ignore[arg-type, misc]
        # Raises for --data-path fast on large images; auto falls back to PIL when over the memory budget.
        choice = choose_data_path(opts.data_path, preprocess, n, device=resolve_device(device))
        if choice.path == "fast":
            if main:
                log(f"data path: fast ({choice.reason}; decoding once, augmenting per batch)")
            classes = sp.classes
            train = decode_images(sp.fit, preprocess, classes, augment=True, what="train")
            val = decode_images(sp.val, preprocess, classes, augment=False, what="val")
            test = decode_images(sp.test, preprocess, classes, augment=False, what="test") \
                if sp.test is not None else None
            return PreparedData(train, val, test, classes, preprocess, sp.record(), val_split, "fast")
        if main:
            log(f"data path: pil ({choice.reason})")
    sp = splits(train_transform(preprocess), eval_transform(preprocess))
    return PreparedData(sp.fit, sp.val, sp.test, sp.classes, preprocess, sp.record(), val_split, "pil")


def split_metrics(fitted: FitResult | None, val: tuple[float, float], test: TopK | None,
                  prepared: PreparedData) -> dict[str, Any]:
    """The metrics every training command records: ``val_*`` (what was chosen on), ``test_*`` (measured once,
    after the choice), and ``top1``/``top5`` with their ``split`` and ``eval_images``: test where the data has
    a test split, else val. ``splits`` says how many images each split had and how val was chosen."""
    n_val = len(prepared.val)  # type: ignore[arg-type]
    d: dict[str, Any] = {"val_top1": round(val[0], 3), "val_top5": round(val[1], 3), "val_images": n_val}
    if fitted is not None:
        d.update(fitted.metrics())
    if test is not None:
        d.update({"test_top1": round(test.top1, 3), "test_top5": round(test.top5, 3), "test_images": test.n,
                  "top1": round(test.top1, 3), "top5": round(test.top5, 3), "split": "test", "eval_images": test.n})
    else:
        d.update({"top1": d["val_top1"], "top5": d["val_top5"], "split": "val", "eval_images": n_val})
    return {**d, "splits": prepared.splits}


def measure_test(model: nn.Module, prepared: PreparedData, cfg: TrainConfig, *, what: str,
                 when: str = "after the choice") -> TopK | None:
    """top-1/top-5 of ``model`` on the test split, once, after every choice was made on val; logged as
    ``test top-1 83.70% (10,000 test images, measured once, after the choice)``."""
    if prepared.test is None:
        if int(os.environ.get("RANK", "0")) == 0:
            log(f"{what}: data has no test split; the val numbers are the ones reported")
        return None
    from resopt.data import make_loader

    device = resolve_device(cfg.device)
    loader = make_loader(prepared.test, max(cfg.batch_size, 256), shuffle=False, workers=cfg.workers, device=device)
    acc = evaluate(model.to(device), loader, device)
    model.to("cpu")
    if int(os.environ.get("RANK", "0")) == 0:
        log(f"{what}: test top-1 {acc.top1:.2f}%  top-5 {acc.top5:.2f}% ({acc.n:,} test images, measured once, "
            f"{when})")
    return acc


def train_model(
    arch: str,
    data: DataOptions,
    cfg: TrainConfig,
    output: Path,
    *,
    width: float = 1.0,
    pretrained: bool = False,
    input_size: int | None = None,
    resume: bool = False,
    options: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``arch`` on ``data`` and write the best checkpoint to ``output``."""
    from resopt.models import build_model, count_macs, count_params, get_spec, model_widths

    spec = get_spec(arch)
    cfg.validate()
    resolve_device(cfg.device)  # fail before the data is read, not after
    output = check_output_path(Path(output), data.data, suffixes=(".pt", ".pth"))
    check_output_path(resume_path_for(output), data.data, option="resume file")
    prepared = prepare_data(data, input_size=input_size, arch_default_size=spec.default_input_size,
                            device=cfg.device)
    pre = prepared.preprocess
    if pretrained:
        # ImageNet weights expect ImageNet statistics, not the ones measured on this data.
        pre = replace(pre, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        prepared = prepare_data(data, preprocess=pre, device=cfg.device)
    seed_everything(cfg.seed)
    model = build_model(arch, len(prepared.classes), width=width, pretrained=pretrained)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        test_txt = f", reporting on {len(prepared.test):,} test images" if prepared.test is not None else ""  # type: ignore[arg-type]
        log(f"training {arch} ({len(prepared.classes)} classes, input {pre.input_size}px) on "
            f"{len(prepared.train):,} images; choosing on val ({prepared.val_note}){test_txt}")  # type: ignore[arg-type]
    result = fit(model, prepared.train, prepared.val, cfg, resume_path=resume_path_for(output), resume=resume,
                 description=f"train {arch}", val_note=prepared.val_note)
    test = measure_test(model, prepared, cfg, what=f"train {arch}")
    params, _ = count_params(model)
    macs = count_macs(model, pre.input_size)
    metrics = {**split_metrics(result, (result.best_top1, result.best_top5), test, prepared),
               "params": params, "macs": macs}
    opts = {"arch": arch, "width": width, "pretrained": pretrained, "data": data.data,
            "limit_per_class": data.limit_per_class, "val_split": prepared.val_split.fraction,
            "data_path": data.data_path, **asdict(cfg), **(options or {})}
    ckpt = make_checkpoint(arch=arch, arch_kwargs={"width": width}, state_dict=model.state_dict(),
                           classes=prepared.classes, preprocess=pre,
                           lineage=[lineage_entry("train", options=opts,
                                                 metrics={**metrics, "history": result.history})],
                           metrics=metrics, widths=model_widths(model))
    if main:
        save_checkpoint(ckpt, output)
    return TrainResult(output=output, arch=arch, params=params, macs=macs, preprocess=pre, fit=result,
                       train_images=len(prepared.train), metrics=metrics)  # type: ignore[arg-type]
