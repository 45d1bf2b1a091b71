"""The numeric options' valid ranges, declared once: ``RANGES`` by parameter name (the same name means the same
thing in every command and in every ``*Config``). The commands check what they received with ``check_options``
as their first line, before any data or model is read; each ``*Config.validate`` checks its fields against the
same table with ``check_fields``, so a library caller is refused with the same line as a user of the command."""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any, NamedTuple

from resopt.errors import UsageError


class Range(NamedTuple):
    lo: float | None  # None: unbounded
    hi: float | None
    lo_in: bool = True  # the bound itself is valid
    hi_in: bool = True
    note: str = ""  # why the bounds are what they are, in brackets after them ("uint8 indices")


# NaN and infinities are never a valid value.
RANGES: dict[str, Range] = {
    "epochs": Range(1, None, True, False),
    "finetune_epochs": Range(0, None, True, False),
    "batch_size": Range(1, 65_536),
    "lr": Range(0, 10, False, True),
    "momentum": Range(0, 1, True, False),
    "weight_decay": Range(0, 1),
    "warmup_epochs": Range(0, None, True, False),
    "label_smoothing": Range(0, 1, True, False),
    "width": Range(0, 16, False, True),
    "input_size": Range(8, 4096),
    "resize": Range(8, 8192),
    "limit_per_class": Range(1, None, True, False),
    "val_split": Range(0, 1, False, False),
    "time_budget": Range(0, None, False, False),
    "workers": Range(0, 256),
    "seed": Range(0, 2**63 - 1),
    "alpha": Range(0, 1),
    "temperature": Range(0, 1000, False, True),
    "sparsity": Range(0, 1, False, False),
    "target_macs": Range(0, 1, False, False),
    "steps": Range(1, 1000),
    "round_to": Range(1, None, True, False),
    "blocks": Range(1, None, True, False),  # at most the model's removable blocks: checked on the model
    "analyze_images": Range(1, None, True, False),
    "num_verify": Range(2, None, True, False),
    "tolerance": Range(0, None, False, False),
    "num_calib": Range(1, None, True, False),
    "min_agreement": Range(0, 100),
    "max_drop": Range(0, 100),
    "max_exclude": Range(0, None, True, False),
    "clusters": Range(2, 256, note="uint8 indices"),
    "bits": Range(2, 8),
    "act_bits": Range(2, 8),
    "threads": Range(1, None, True, False),
    "warmup": Range(0, None, True, False),
    "iters": Range(1, None, True, False),
    "min_time": Range(0, 86_400),
    "rounds": Range(1, None, True, False),
    "calib_batch": Range(1, 4096),
    "min_batch": Range(1, None, True, False),
    "opt_batch": Range(1, None, True, False),
    "max_batch": Range(1, None, True, False),
}


def check_range(name: str, value: float, *, flag: str | None = None) -> None:
    """``value`` of option ``name`` inside ``RANGES[name]``, else a ``UsageError`` (exit 2) naming both."""
    flag = flag or "--" + name.replace("_", "-")
    lo, hi, lo_in, hi_in, note = RANGES[name]
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if (lo is not None and (value < lo if lo_in else value <= lo)) or \
            (hi is not None and (value > hi if hi_in else value >= hi)):
        if hi is None:
            want = f"at least {_num(lo)}" if lo_in else "a positive number" if lo == 0 else f"above {_num(lo)}"
        else:
            want = f"in {'[' if lo_in else '('}{_num(lo)}, {_num(hi)}{']' if hi_in else ')'}"
        raise UsageError(f"{flag} must be {want}{f' ({note})' if note else ''}, got {value}")


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_options(values: dict[str, Any], **flags: str) -> None:
    """Range-check every numeric value in ``values`` (a command passes ``locals()``) whose name has a range;
    ``flags`` renames a parameter's flag where the command spells it differently."""
    for name, value in values.items():
        if name in RANGES and _numeric(value):
            check_range(name, value, flag=flags.get(name))


def check_fields(config: Any, **names: str) -> None:
    """Range-check every numeric field of the dataclass ``config`` whose name has a range (None: unset, not
    checked); ``names`` maps a field to the option name it holds where the two differ (``min_seconds="min_time"``)."""
    assert is_dataclass(config)
    check_options({names.get(f.name, f.name): getattr(config, f.name) for f in fields(config)})


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:g}" if isinstance(x, float) else str(x)
