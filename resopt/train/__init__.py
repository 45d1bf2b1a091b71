"""Training: ``fit`` (the loop every stage reuses) and ``train_model`` (the ``train`` command's work).

``fit`` trains any ``nn.Module`` with SGD (momentum, Nesterov) or AdamW, a per-step cosine schedule with
linear warm-up, label smoothing, AMP and channels_last on CUDA, and evaluates top-1/top-5 each epoch,
keeping the best weights. Distillation, pruning fine-tunes and QAT plug in through ``loss_fn`` (a
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
    from torch.utils.data import Dataset

__all__ = [
    "OPTIMIZERS", "DataOptions", "FitResult", "Hook", "LossFn", "PreparedData", "TrainConfig", "TrainResult",
    "evaluate", "fit", "prepare_data", "resume_path_for", "seed_everything", "train_model",
]


@dataclass(frozen=True)
class DataOptions:
    """How a command reads ``--data``."""

    data: str
    limit_per_class: int | None = None
    val_split: float | None = None  # hold out this fraction of train; else evaluate on the test split
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
    eval_images: int
    eval_split: str

    def summary(self) -> dict[str, Any]:
        return {"output": str(self.output), "arch": self.arch, "params": self.params, "macs": self.macs,
                "train_images": self.train_images, "eval_images": self.eval_images, "eval_split": self.eval_split,
                **self.fit.metrics(), "history": self.fit.history}


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset | None
    classes: list[str]
    preprocess: Preprocess
    eval_split: str
    data_path: str = "pil"  # the path taken: "fast" (decoded tensors) or "pil"


def prepare_data(opts: DataOptions, *, preprocess: Preprocess | None = None, input_size: int | None = None,
                 arch_default_size: int = 32, device: str = "auto") -> PreparedData:
    """Resolve ``--data`` into train/eval datasets with augmentation; decide preprocessing if not given.

    Small images take the fast path (decoded once into tensors, ``data.decoded``) when ``opts.data_path``
    asks for it, or by default when they fit in memory (on ``device`` when that is a GPU)."""
    from resopt.data import (
        compute_normalization,
        decide_input_size,
        eval_transform,
        limit_per_class,
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
    if preprocess is None:
        size, resize = decide_input_size(source, input_size, arch_default_size)
        raw = limit_per_class(source.dataset("train"), opts.limit_per_class, seed=opts.seed)
        mean, std = compute_normalization(raw, seed=opts.seed)
        preprocess = Preprocess(input_size=size, mean=mean, std=std, resize=resize)
    main = int(os.environ.get("RANK", "0")) == 0
    if opts.data_path == "fast" or (opts.data_path == "auto" and fast_path_applies(preprocess)):
        decode = decode_transform(preprocess)
        train_set, eval_set, classes, split = _splits(source, opts, decode, decode)
        n = len(train_set) + (len(eval_set) if eval_set is not None else 0)  # type: ignore[arg-type]
        # Raises for --data-path fast on large images; auto falls back to PIL when over the memory budget.
        choice = choose_data_path(opts.data_path, preprocess, n, device=resolve_device(device))
        if choice.path == "fast":
            if main:
                log(f"data path: fast ({choice.reason}; decoding once, augmenting per batch)")
            train = decode_images(train_set, preprocess, classes, augment=True, what="train")
            ev = decode_images(eval_set, preprocess, classes, augment=False, what=split) \
                if eval_set is not None else None
            return PreparedData(train, ev, classes, preprocess, split, "fast")
        if main:
            log(f"data path: pil ({choice.reason})")
    train_set, eval_set, classes, split = _splits(source, opts, train_transform(preprocess),
                                                  eval_transform(preprocess))
    return PreparedData(train_set, eval_set, classes, preprocess, split, "pil")


def _splits(source: Any, opts: DataOptions, train_tf: Any, eval_tf: Any) -> tuple[
        Dataset, Dataset | None, list[str], str]:
    """(train, eval, classes, eval split name) of ``source`` with these transforms, limited and split."""
    from resopt.data import check_split_classes, classes_of, limit_per_class, split_validation

    train_full = source.dataset("train", train_tf)
    classes = classes_of(train_full)
    train_full = limit_per_class(train_full, opts.limit_per_class, seed=opts.seed)
    eval_set: Dataset | None
    if opts.val_split:
        eval_full = source.dataset("train", eval_tf)
        eval_full = limit_per_class(eval_full, opts.limit_per_class, seed=opts.seed)
        train_set, _ = split_validation(train_full, opts.val_split, seed=opts.seed)
        _, eval_set = split_validation(eval_full, opts.val_split, seed=opts.seed)
        return train_set, eval_set, classes, "val"
    eval_set = source.dataset("test", eval_tf) if source.test_dir or source.kind == "torchvision" else None
    if eval_set is not None:
        check_split_classes(classes, classes_of(eval_set), data=opts.data)
        eval_set = limit_per_class(eval_set, opts.limit_per_class, seed=opts.seed)
    return train_full, eval_set, classes, "test" if eval_set is not None else "none"


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
    if int(os.environ.get("RANK", "0")) == 0:
        log(f"training {arch} ({len(prepared.classes)} classes, input {pre.input_size}px) on "
            f"{len(prepared.train)} images; evaluating on {len(prepared.eval) if prepared.eval else 0} "  # type: ignore
            f"{prepared.eval_split} images")
    result = fit(model, prepared.train, prepared.eval, cfg, resume_path=resume_path_for(output), resume=resume,
                 description=f"train {arch}")
    params, _ = count_params(model)
    macs = count_macs(model, pre.input_size)
    metrics = {**result.metrics(), "eval_split": prepared.eval_split, "params": params, "macs": macs}
    opts = {"arch": arch, "width": width, "pretrained": pretrained, "data": data.data,
            "limit_per_class": data.limit_per_class, "val_split": data.val_split, "data_path": data.data_path,
            **asdict(cfg),
            **(options or {})}
    ckpt = make_checkpoint(arch=arch, arch_kwargs={"width": width}, state_dict=model.state_dict(),
                           classes=prepared.classes, preprocess=pre,
                           lineage=[lineage_entry("train", options=opts,
                                                 metrics={**metrics, "history": result.history})],
                           metrics=metrics, widths=model_widths(model))
    if int(os.environ.get("RANK", "0")) == 0:
        save_checkpoint(ckpt, output)
    return TrainResult(output=output, arch=arch, params=params, macs=macs, preprocess=pre, fit=result,
                       train_images=len(prepared.train), eval_images=len(prepared.eval or []),  # type: ignore
                       eval_split=prepared.eval_split)
