"""The training loop every stage reuses: ``fit`` trains any ``nn.Module`` with SGD (momentum, Nesterov) or
AdamW, a per-step cosine schedule with linear warm-up, label smoothing, AMP and channels_last on CUDA, and
evaluates top-1/top-5 on the validation split each epoch, keeping the best weights (or the last); with its
resume state and data-parallel setup."""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from resopt.artifacts import (
    atomic_output,
)
from resopt.backends.cuda import resolve_device
from resopt.console import log, progress
from resopt.data.splits import SELECT
from resopt.errors import InputFileError, UsageError, choice_error
from resopt.metrics import TopK
from resopt.ranges import check_fields

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

OPTIMIZERS = ("sgd", "adamw")
LossFn = Callable[["nn.Module", "torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float | None = None  # None: 0.1 * batch/128 for SGD, 1e-3 for AdamW
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    amp: bool = True  # CUDA only: bf16 where supported, else fp16 with a grad scaler
    channels_last: bool = True  # CUDA only
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    time_budget: float | None = None  # seconds; see fit
    select: str = "best"  # the epoch kept: best by val top-1, or the last (too little data to choose on)

    def validate(self) -> None:
        check_fields(self)  # epochs, batch size, lr, ... against resopt.ranges
        if self.optimizer not in OPTIMIZERS:
            raise choice_error("optimizer", self.optimizer, OPTIMIZERS)
        if self.select not in SELECT:
            raise choice_error("--select", self.select, SELECT)

    def base_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.1 * self.batch_size / 128 if self.optimizer == "sgd" else 1e-3


class Hook(Protocol):
    """Optional callbacks a stage can pass to ``fit``; each method may be absent."""

    def on_step_end(self, model: nn.Module) -> None: ...
    def on_epoch_end(self, model: nn.Module, epoch: int) -> None: ...


@dataclass
class FitResult:
    best_top1: float
    best_top5: float
    best_epoch: int
    last: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_sec: float = 0.0
    device: str = "cpu"
    world_size: int = 1
    data_path: str = "pil"  # "fast" when the training set was a decoded tensor (data.decoded)
    epochs: int = 0  # epochs trained (fewer than asked when a time budget ended training)
    select: str = "best"  # how the kept epoch was chosen: best (by val top-1) or last

    def metrics(self) -> dict[str, Any]:
        """What the lineage records of the fit; the kept epoch's top-1/top-5 were measured on val."""
        return {"best_epoch": self.best_epoch, "select": self.select, "selected_on": "val",
                "train_seconds": round(self.seconds, 1),
                "train_images_per_sec": round(self.images_per_sec, 1), "device": self.device,
                "world_size": self.world_size, "data_path": self.data_path, "epochs": self.epochs}


# ------------------------------------------------------------------------------------------ helpers


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    """Join the process group torchrun set up; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


def evaluate(model: nn.Module, loader: Any, device: torch.device, *, dist: _Dist | None = None,
             channels_last: bool = False) -> TopK:
    """top-1/top-5 and loss of ``model`` over ``loader`` (summed across processes under DDP)."""
    import torch
    import torch.nn.functional as F

    acc = TopK()
    model.eval()
    with torch.no_grad():
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images).float()
            loss = F.cross_entropy(logits, labels.to(device)).item()
            acc.update(logits.cpu().numpy(), labels.cpu().numpy(), loss)
    if dist is not None and dist.world_size > 1:
        import torch.distributed as tdist

        t = torch.tensor([acc.n, acc.correct1, acc.correct5, acc.loss_sum], dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        acc.n, acc.correct1, acc.correct5, acc.loss_sum = int(t[0]), int(t[1]), int(t[2]), float(t[3])
    return acc


def _cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    import torch

    # No weight decay on biases and batch-norm parameters: decaying them only hurts accuracy.
    decay: list[Any] = []
    no_decay: list[Any] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.base_lr())
    return torch.optim.SGD(groups, lr=cfg.base_lr(), momentum=cfg.momentum, nesterov=cfg.nesterov)


# ---------------------------------------------------------------------------------------------- fit


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    *,
    loss_fn: LossFn | None = None,
    hooks: Sequence[Any] = (),
    resume_path: Path | None = None,
    resume: bool = False,
    description: str = "train",
    val_note: str = "",
) -> FitResult:
    """Train ``model`` in place; on return it holds the weights of the epoch ``cfg.select`` keeps: the best by
    top-1 on ``val_set`` (the validation split, never test), or the last (also when there is no val set).
    ``val_note`` says where the validation images came from, for the progress lines.

    ``resume_path``: a file where the full training state is saved after each epoch, so ``resume=True``
    continues an interrupted run from its last finished epoch; it is removed when training completes.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data.distributed import DistributedSampler

    from resopt.data import make_loader
    from resopt.data.decoded import DecodedImages

    cfg.validate()
    device = resolve_device(cfg.device)
    dist = _init_distributed(device)
    seed_everything(cfg.seed + dist.rank)
    use_cuda = device.type == "cuda"
    channels_last = cfg.channels_last and use_cuda
    amp_dtype = None
    if cfg.amp and use_cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if use_cuda:
        # Every batch has the same shape: cuDNN's autotuner pays for itself after a few steps (runs on a GPU
        # are then not bit-reproducible; the same-seed guarantee is for CPU).
        torch.backends.cudnn.benchmark = True
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    sampler: Any = DistributedSampler(train_set, shuffle=True, seed=cfg.seed, drop_last=True) \
        if dist.world_size > 1 else None
    train_loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.workers,
                               drop_last=len(train_set) > cfg.batch_size, sampler=sampler,  # type: ignore
                               device=device)
    eval_loader = None
    if val_set is not None:
        eval_sampler: Any = DistributedSampler(val_set, shuffle=False) if dist.world_size > 1 else None
        eval_loader = make_loader(val_set, max(cfg.batch_size, 256), shuffle=False, workers=cfg.workers,
                                  sampler=eval_sampler, device=device)
    data_path = "fast" if isinstance(train_set, DecodedImages) else "pil"

    net: nn.Module = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if use_cuda else None)

    optimizer = _make_optimizer(model, cfg)
    steps_per_epoch = max(1, len(train_loader))
    # planned["epochs"] is cfg.epochs, or under a time budget the estimate made after the first epoch;
    # the cosine schedule reads it at every step, so it decays to zero at the planned end.
    planned = {"epochs": cfg.epochs}
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch) if cfg.epochs > 1 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine_with_warmup(s, planned["epochs"] * steps_per_epoch, warmup_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    if loss_fn is None:
        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = m(x)
            return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing), logits

    start_epoch = 0
    best: dict[str, Any] = {"top1": -1.0, "top5": 0.0, "epoch": 0, "state": None}
    history: list[dict[str, float]] = []
    if resume and resume_path is not None and resume_path.exists():
        from resopt.artifacts import torch_load_plain
        from resopt.schema import ResumeSchema, validate

        start_over = f"delete {resume_path} to start over"
        state = torch_load_plain(resume_path, what="resume state", device=device)
        validate(ResumeSchema, state, path=resume_path, what="resume state", hint=start_over)
        if state.get("config") != _config_key(cfg):
            raise UsageError(f"{resume_path} was written with other training options; cannot resume",
                             hint=start_over)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise InputFileError(f"resume state {resume_path} does not fit this model "
                                 f"({str(e).splitlines()[0][:120]})", hint=start_over) from None
        start_epoch, history = int(state["epoch"]), list(state["history"])
        planned["epochs"] = int(state.get("planned_epochs", cfg.epochs))
        best = {"top1": state["best_top1"], "top5": state["best_top5"], "epoch": state["best_epoch"],
                "state": state["best_state"]}
        torch.set_rng_state(state["rng_cpu"])
        train_loader.generator.set_state(state["rng_loader"])  # type: ignore[union-attr]
        if dist.main:
            log(f"resuming from {resume_path.name} after epoch {start_epoch}/{cfg.epochs}")
    elif resume and dist.main:
        log(f"nothing to resume ({resume_path} not found); starting from scratch")

    t_start = time.perf_counter()
    images_seen = 0
    for epoch in range(start_epoch, cfg.epochs):
        if epoch >= planned["epochs"]:
            break
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        train_acc = TopK()
        t_epoch = time.perf_counter()
        epoch_images = 0
        with progress(f"{description} epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch) as bar:
            for images, labels in train_loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, logits = loss_fn(net, images, labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                for h in hooks:
                    if hasattr(h, "on_step_end"):
                        h.on_step_end(model)
                if not math.isfinite(loss.item()):
                    raise UsageError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}",
                                     hint="lower --lr")
                train_acc.update(logits.detach().float().cpu().numpy(), labels.cpu().numpy(), loss.item())
                images_seen += len(labels) * dist.world_size
                epoch_images += len(labels) * dist.world_size
                bar.advance(1, loss=train_acc.loss)
        for h in hooks:
            if hasattr(h, "on_epoch_end"):
                h.on_epoch_end(model, epoch)
        train_seconds = time.perf_counter() - t_epoch
        row = {"epoch": epoch + 1, "loss": round(train_acc.loss, 4), "train_top1": round(train_acc.top1, 2),
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(train_seconds, 2),
               "images_per_sec": round(epoch_images / train_seconds, 1) if train_seconds > 0 else 0.0}
        if eval_loader is not None:
            acc = evaluate(model, eval_loader, device, dist=dist, channels_last=channels_last)
            row.update({"val_top1": round(acc.top1, 3), "val_top5": round(acc.top5, 3)})
            if cfg.select == "last":  # the model already holds the last weights: no copy
                best = {"top1": acc.top1, "top5": acc.top5, "epoch": epoch + 1, "state": None}
            elif acc.top1 > best["top1"]:
                best = {"top1": acc.top1, "top5": acc.top5, "epoch": epoch + 1,
                        "state": copy.deepcopy(model.state_dict())}
        else:
            best = {"top1": train_acc.top1, "top5": train_acc.top5, "epoch": epoch + 1, "state": None}
        history.append(row)
        if cfg.time_budget is not None:
            _plan_epochs(planned, cfg, epoch, start_epoch, time.perf_counter() - t_start, dist.world_size)
        if dist.main:
            note = f" ({val_note})" if val_note else ""
            eval_txt = f"  val top-1 {row['val_top1']:.2f}%  top-5 {row['val_top5']:.2f}%{note}" \
                if "val_top1" in row else ""
            log(f"{description} epoch {epoch + 1}/{planned['epochs']}  loss {row['loss']:.4f}  "
                f"train {row['train_top1']:.1f}%{eval_txt}  {row['seconds']:.1f}s  "
                f"{row['images_per_sec']:.0f} img/s")
            if resume_path is not None:
                _save_resume_state(resume_path, cfg, model, optimizer, scheduler, epoch + 1, history, best,
                                   train_loader.generator, planned["epochs"])  # type: ignore[arg-type]

    seconds = time.perf_counter() - t_start
    if dist.main and history:
        why = "no validation split" if eval_loader is None else f"--select {cfg.select}"
        log(f"{description}: best epoch {best['epoch']} (chosen on val)" if cfg.select == "best" and eval_loader
            else f"{description}: kept the last epoch, {best['epoch']} ({why})")
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.to("cpu")
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    if resume_path is not None and resume_path.exists() and dist.main:
        resume_path.unlink()
    last = history[-1] if history else {}
    return FitResult(best_top1=float(best["top1"]), best_top5=float(best["top5"]), best_epoch=int(best["epoch"]),
                     last=last, history=history, seconds=seconds,
                     images_per_sec=images_seen / seconds if seconds > 0 else 0.0,
                     device=str(device), world_size=dist.world_size, data_path=data_path, epochs=len(history),
                     select=cfg.select if eval_loader is not None else "last")


def _plan_epochs(planned: dict[str, int], cfg: TrainConfig, epoch: int, start_epoch: int, elapsed: float,
                 world_size: int) -> None:
    """Under ``--time-budget``: after the first epoch of this run, plan as many epochs as its duration
    (evaluation included) says fit in the budget (at most ``--epochs``), so the cosine schedule ends where
    training ends; after any later epoch, stop if the budget is spent (the estimate was too short)."""
    assert cfg.time_budget is not None
    done = epoch + 1
    if epoch == start_epoch:
        per_epoch = elapsed / (done - start_epoch)
        fit_epochs = int((cfg.time_budget - elapsed) // per_epoch) + done if elapsed < cfg.time_budget else done
        planned["epochs"] = max(done, min(cfg.epochs, fit_epochs))
    elif elapsed >= cfg.time_budget:
        planned["epochs"] = done
    if world_size > 1:
        # Every process must stop after the same epoch: take rank 0's plan.
        import torch
        import torch.distributed as tdist

        t = torch.tensor([planned["epochs"]], dtype=torch.int64)
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.broadcast(t, src=0)
        planned["epochs"] = int(t.item())


def _config_key(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("workers", None)
    d.pop("device", None)
    return d


def _save_resume_state(path: Path, cfg: TrainConfig, model: nn.Module, optimizer: Any, scheduler: Any,
                       epoch: int, history: list[dict[str, float]], best: dict[str, Any], gen: Any,
                       planned_epochs: int) -> None:
    import torch

    state = {"config": _config_key(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
             "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
             "best_state": best["state"], "rng_cpu": torch.get_rng_state(), "rng_loader": gen.get_state(),
             "planned_epochs": planned_epochs}
    with atomic_output(path, commit=False) as tmp:  # on the way: an interrupt still stops training
        torch.save(state, tmp)


def resume_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".resume")
