"""The quantize configuration: the options every mode shares (``QuantizeConfig``) and one options dataclass per
mode for the options only that mode takes (``KmeansOptions``, ``FixedOptions``, ``QatOptions``; ``NoOptions``
for a mode without any). Which mode uses which option is listed once, in the mode registry
(``resopt.quantize.modes.MODES``), which imports this module; nothing here looks the registry up (the checks that
need a mode's entry are ``modes.check_config``), so the imports point one way."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, Union

from resopt.errors import UsageError, choice_error
from resopt.quantize.ort import CALIB_METHODS, TARGETS
from resopt.ranges import check_fields

if TYPE_CHECKING:
    from resopt.train import TrainConfig

_O = TypeVar("_O")

DEFAULT_NUM_CALIB = 320
DEFAULT_QAT_LR = 1e-3

# Options of the shared config that only some modes use: config field -> CLI flag (which modes take them: each
# ``Mode.shared``). The other shared options (--calib-data, --num-calib, --data, --limit-per-class, --min-agreement,
# --exclude, --save-calib, --seed) apply to every mode: without --data, every mode is verified on the calibration
# images.
SHARED_FIELDS = {"target": "--target", "calib_method": "--calib-method", "per_channel": "--per-tensor",
                 "reduce_range": "--reduce-range", "max_drop": "--max-drop", "max_exclude": "--max-exclude",
                 "ptq": "--ptq"}


@dataclass(frozen=True)
class NoOptions:
    """A mode with no options of its own (int8, int8-dynamic, fp16 use only shared options)."""

    def validate(self, cfg: QuantizeConfig) -> None:
        return None


@dataclass(frozen=True)
class KmeansOptions:
    clusters: int = 256  # shared values per layer (uint8 indices)

    def validate(self, cfg: QuantizeConfig) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FixedOptions:
    bits: int = 8  # weight bits
    act_bits: int | None = None  # activation bits (None: activations stay float)

    def validate(self, cfg: QuantizeConfig) -> None:
        check_fields(self)


@dataclass(frozen=True)
class W4a8Options:
    int8_ends: bool = True  # the first conv and the classifier at 8 bits (they hold few weights and lose most)

    def validate(self, cfg: QuantizeConfig) -> None:
        return None


@dataclass(frozen=True)
class QatOptions:
    """The fine-tuning of ``--mode qat``. The defaults are a short fine-tune at a hundredth of ``train``'s
    learning rate, without warm-up: the weights only need to move by about one quantization step, and with
    frozen BatchNorm lr 0.01 already diverges."""

    epochs: int = 3
    lr: float = DEFAULT_QAT_LR
    batch_size: int = 128
    amp: bool = True
    device: str = "auto"
    data_path: str = "auto"  # the fine-tuning's data path (train's --data-path)
    select: str = "best"  # the epoch kept, as train's --select: best by val top-1, or the last

    def validate(self, cfg: QuantizeConfig) -> None:
        from resopt.data.splits import SELECT

        check_fields(self)  # epochs, lr, batch size
        if self.select not in SELECT:
            raise choice_error("--select", self.select, SELECT)
        if cfg.data is None:
            raise UsageError("--mode qat fine-tunes on the --data train split; pass --data",
                             hint="resopt quantize r20.pt --mode qat --epochs 3 --data cifar10 -o r20.qat.onnx")

    def train_config(self, seed: int) -> TrainConfig:
        from resopt.train import TrainConfig

        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, warmup_epochs=0.0,
                           amp=self.amp, seed=seed, device=self.device, select=self.select)


ModeOptions = Union[NoOptions, KmeansOptions, FixedOptions, QatOptions, W4a8Options]  # noqa: UP007 - a runtime alias


@dataclass(frozen=True)
class QuantizeConfig:
    """Options shared by several modes; ``options`` holds the chosen mode's own (None: its defaults)."""

    mode: str = "int8"
    target: str = "cpu"
    calib_data: str | None = None  # folder, dataset name or saved .npz set; None: the shipped calib/ set
    num_calib: int | None = DEFAULT_NUM_CALIB
    calib_method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool | None = None  # None: only for --target cpu on x86 without VNNI
    seed: int = 0
    data: str | None = None  # report top-1/top-5 on its test split and measure agreement there
    limit_per_class: int | None = None
    min_agreement: float | None = None  # None: the mode's default
    exclude: tuple[str, ...] = ()
    save_calib: Path | None = None
    max_drop: float | None = None  # accuracy guard, top-1 points on the --data test split
    max_exclude: int | None = None  # most layers the guard may keep in FP32 (None: a quarter of them)
    ptq: tuple[str, ...] = ()  # post-training steps before quantizing (resopt.quantize.ptq.PTQ_STEPS)
    options: ModeOptions | None = None

    def mode_options(self, cls: type[_O]) -> _O:
        """The mode's own options, as the class its producer expects: ``options``, or that class's defaults."""
        opts = self.options if self.options is not None else cls()
        if not isinstance(opts, cls):
            raise UsageError(f"--mode {self.mode} takes {cls.__name__}, got {type(opts).__name__}")
        return opts

    def shared_options_given(self) -> list[str]:
        """The flags of the shared mode-specific options set away from their defaults (for a library caller,
        "given" means "not the default"; the CLI asks click which options the user typed)."""
        defaults = {f.name: f.default for f in fields(QuantizeConfig)}
        return [flag for name, flag in SHARED_FIELDS.items() if getattr(self, name) != defaults[name]]

    def calib_options_given(self) -> list[str]:
        """``--calib-data`` / ``--num-calib`` when set away from their defaults (see ``shared_options_given``)."""
        return [flag for flag, value, default in (("--calib-data", self.calib_data, None),
                                                  ("--num-calib", self.num_calib, DEFAULT_NUM_CALIB))
                if value != default]

    def weights_reduce_range(self) -> bool:
        """7-bit weights: as asked, else only for ``--target cpu`` on an x86 host without VNNI. A ``trt``
        graph never depends on the host that wrote it: TensorRT accumulates INT8 products in int32."""
        from resopt.quantize.ort import default_reduce_range

        if self.reduce_range is not None:
            return self.reduce_range
        return self.target == "cpu" and default_reduce_range()

    def validate(self) -> None:
        """The checks of the shared options that need no mode's entry; ``modes.check_config`` runs these and the
        mode's own (which options it takes, its options dataclass)."""
        if self.target not in TARGETS:
            raise choice_error("target", self.target, TARGETS)
        if self.calib_method not in CALIB_METHODS:
            raise choice_error("calibration method", self.calib_method, CALIB_METHODS)
        check_fields(self)  # calibration count, agreement, guard bounds, ... against resopt.ranges
        if self.limit_per_class is not None and self.data is None:
            raise UsageError("--limit-per-class limits the --data test split; pass --data")
        if self.max_drop is not None:
            if self.data is None:
                raise UsageError("--max-drop measures the top-1 drop on the --data validation split; pass --data",
                                 hint="resopt quantize m.onnx --mode int8 --max-drop 0.5 --data cifar10")
        if self.max_exclude is not None and self.max_drop is None:
            raise UsageError("--max-exclude bounds the accuracy guard: a number >= 0, with --max-drop")
        if self.ptq:
            from resopt.quantize.ptq import parse_ptq

            parse_ptq(self.ptq)
