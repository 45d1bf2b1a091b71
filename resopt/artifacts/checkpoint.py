"""The ``.pt`` checkpoint: a plain dict that loads with ``torch.load(weights_only=True)``, and its preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts.files import IMPORT_HINT, atomic_output, require_kind, require_regular
from resopt.artifacts.lineage import jsonable
from resopt.errors import InputFileError
from resopt.models import REGISTRY, model_from_checkpoint

if TYPE_CHECKING:
    from torch import nn

CHECKPOINT_FORMAT = "resopt.checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class Preprocess:
    """How pixels become the model's input: recorded once at train time, read back downstream."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None  # eval-time resize before the center crop (None: no resize, 32x32 data)

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        mr, mg, mb = (float(x) for x in d["mean"])  # three values: resopt.schema validates the length
        sr, sg, sb = (float(x) for x in d["std"])
        return cls(input_size=int(d["input_size"]), mean=(mr, mg, mb), std=(sr, sg, sb), resize=d.get("resize"))


def make_checkpoint(
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    state_dict: dict[str, Any],
    classes: list[str],
    preprocess: Preprocess,
    lineage: list[dict[str, Any]],
    metrics: dict[str, Any] | None = None,
    widths: dict[str, list[int]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "state_dict": state_dict,
        "widths": widths or {},
        "metrics": jsonable(metrics or {}),
        "lineage": lineage,
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def save_checkpoint(ckpt: dict[str, Any], path: Path, *, commit: bool = True) -> None:
    import torch

    with atomic_output(path, commit=commit) as tmp:
        torch.save(ckpt, tmp)


def torch_load_plain(path: Path, *, what: str = "PyTorch checkpoint", device: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with every failure as one ``InputFileError`` line naming ``path``."""
    import pickle

    import torch

    require_regular(path, what)
    try:
        # map_location: checkpoints saved from CUDA (legacy zip-less ones too) must load without a GPU.
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        # The restricted unpickler names the class it refused ("Unsupported global: GLOBAL x.y"); anything
        # else it rejects is not a pickle stream of a checkpoint at all.
        refused = next((ln.split("GLOBAL", 1)[1].split()[0] for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if refused is None:
            raise InputFileError(f"{path} is not a readable {what} (corrupt pickle stream)") from None
        raise InputFileError(
            f"{path} holds pickled Python objects ({refused}), not plain tensors; refusing to load it",
            hint="resopt reads only the plain checkpoints it writes (`resopt train`, `distill`, `prune`)",
        ) from None
    except Exception as e:  # zip errors, truncated files, random bytes
        raise InputFileError(f"{path} is not a readable {what} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else 'corrupt'})") from None


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A ``.pt`` checkpoint's model (eval mode, CPU) and the checkpoint dict."""
    ckpt = load_checkpoint(path)
    try:
        return model_from_checkpoint(ckpt), ckpt
    except KeyError as e:
        raise InputFileError(f"{path} is missing the checkpoint field {e}") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a resopt ``.pt`` with ``weights_only=True`` and check every field it carries.

    Pickled objects are refused, not executed; a field of the wrong type or out of range is an
    ``InputFileError`` naming it (see ``resopt.schema``).
    """
    from resopt.schema import CheckpointSchema, validate

    path = Path(path)
    require_kind(path, "pt")
    ckpt = torch_load_plain(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputFileError(
            f"{path} was not written by resopt (no '{CHECKPOINT_FORMAT}' format tag)",
            hint=IMPORT_HINT.format(path=path),
        )
    version = ckpt.get("format_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > CHECKPOINT_VERSION:
        raise InputFileError(f"{path} uses checkpoint format {ckpt['format_version']}, newer than this "
                             f"resopt understands ({CHECKPOINT_VERSION})", hint="upgrade resopt")
    validate(CheckpointSchema, ckpt, path=path, what="checkpoint")
    _check_finite(ckpt["state_dict"], path)
    if ckpt["arch"] not in REGISTRY:
        raise InputFileError(f"checkpoint {path} has a bad field arch: unknown architecture {ckpt['arch']!r}",
                             hint="resopt info --archs lists the architectures this resopt builds")
    return ckpt


def _check_finite(state_dict: dict[str, Any], path: Path) -> None:
    """NaN or infinite weights make every later number meaningless (export parity, top-1): refuse them here."""
    import torch

    for name, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise InputFileError(f"checkpoint {path} has a bad field state_dict.{name}: {n} NaN or infinite "
                                 f"value{'s' * (n > 1)} (a diverged training?)",
                                 hint="retrain with a lower --lr, or use an earlier checkpoint")
    return


def checkpoint_preprocess(ckpt: dict[str, Any]) -> Preprocess:
    return Preprocess.from_dict(ckpt["preprocess"])
