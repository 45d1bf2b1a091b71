"""The quantize modes, listed once (``MODES``), as the commands and the models are: each mode with its own
options dataclass, its producer, whether it calibrates, which shared options it takes, and how its result is
checked. ``quantize_onnx`` looks a mode up here (``check_config``) instead of branching on its name, and hands
the entry to the shared steps in ``pipeline`` (``prepare``, ``verify_and_write``), which the producers here use:
the imports point one way, config <- pipeline <- modes <- the package's entry points.

To add a mode: a producer (``Job`` -> writes ``job.produced.path``) or, for a mode that starts from a ``.pt``,
a ``from_checkpoint`` function; an options dataclass in ``config.py`` (``NoOptions`` if it has none), whose
fields are the mode's own CLI options; and an entry in ``MODES``.

Options a mode does not use are an error, not ignored: ``check_options_apply`` names the option and the modes
that take it. QAT takes no ``--calib-method``: its fake-quant layers observe min/max ranges, and the ONNX it
deploys is calibrated the same way, so that the PyTorch model it is checked against predicts it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.errors import UsageError, choice_error
from resopt.quantize.config import (
    SHARED_FIELDS,
    FixedOptions,
    KmeansOptions,
    ModeOptions,
    NoOptions,
    QatOptions,
    W4a8Options,
)

if TYPE_CHECKING:
    from resopt.quantize.config import QuantizeConfig
    from resopt.quantize.pipeline import Job, QuantizeResult
    from resopt.quantize.ptq import WeightGrid

__all__ = ["CALIB_FLAGS", "MODES", "SHARED_FIELDS", "Mode", "check_config", "check_options_apply", "get_mode",
           "lineage_keys", "mode_help", "mode_specific_flags"]

_CALIB_HINT = ("try --calib-method percentile or entropy, more --num-calib, --max-drop with --data, "
               "--exclude the sensitive layers, or lower --min-agreement")
_PLAIN_HINT = "--exclude the sensitive layers, or lower --min-agreement"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _always(cfg: QuantizeConfig) -> bool:
    return True


def _never(cfg: QuantizeConfig) -> bool:
    return False


@dataclass(frozen=True)
class Mode:
    """One quantization method."""

    name: str
    options: type  # its own options dataclass; the field names are its CLI options
    shared: tuple[str, ...]  # flags of SHARED_FIELDS it takes
    calibrates: Callable[[QuantizeConfig], bool]
    settings: Callable[[QuantizeConfig, bool], dict[str, Any]]  # (cfg, reduce_range) -> what the lineage records
    # Top-1 agreement (percent) with the parent below which a result is refused.
    min_agreement: float
    agreement_hint: str  # what can raise this mode's agreement
    produce: Callable[[Job], None] | None = None  # FP32 ONNX -> result (modes that take an .onnx)
    from_checkpoint: Callable[[Path, Path, QuantizeConfig], QuantizeResult] | None = None  # modes that take a .pt
    exports_pt: bool = False  # also takes a .pt, exported to FP32 ONNX first
    qdq_int8: bool = False  # writes INT8 Q/DQ: linted against --target, INT8 layers counted per runtime
    lints: Callable[[QuantizeConfig], bool] = _never  # report the Q/DQ lint
    calibrates_when: str = ""  # when ``calibrates`` depends on an option: which ("with --act-bits")
    summary: str = ""  # what ``--mode``'s help says of it, in brackets after the name ("static, calibrated, Q/DQ")
    # The lineage option keys (as ``settings`` and the pipeline record them) that ``info`` shows for a step of this
    # mode, and the shorter set ``report`` puts in a result's label: what tells this mode's results apart.
    shown: tuple[str, ...] = ()
    label: tuple[str, ...] = ()
    # --ptq's weight grids (prepped graph, cfg, reduce_range) -> (every conv's, node -> its own); None: int8's
    ptq_grids: Callable[[Path, QuantizeConfig, bool], tuple[WeightGrid, dict[str, WeightGrid]]] | None = None

    def own_flags(self) -> tuple[str, ...]:
        return tuple(_flag(f.name) for f in fields(self.options))

    def takes(self, flag: str) -> bool:
        return flag in self.shared or flag in self.own_flags()

    def options_of(self, cfg: QuantizeConfig) -> ModeOptions:
        """``cfg``'s own options for this mode: ``cfg.options``, or this mode's defaults."""
        opts: ModeOptions = cfg.options if cfg.options is not None else self.options()
        return opts

    def reads_calib_set(self, cfg: QuantizeConfig) -> bool:
        """Whether the calibration set is read at all: to calibrate, to verify on (no ``--data``), to rank
        layers for the accuracy guard, or to be saved (``--save-calib``)."""
        return self.calibrates(cfg) or cfg.data is None or cfg.max_drop is not None or cfg.save_calib is not None

    def agreement_floor(self, cfg: QuantizeConfig) -> float:
        """The top-1 agreement (percent) below which ``cfg``'s result is refused: ``--min-agreement``, else this
        mode's default."""
        return self.min_agreement if cfg.min_agreement is None else cfg.min_agreement


# ------------------------------------------------------------------------------------------ producers


def _int8_settings(cfg: QuantizeConfig, reduce_range: bool) -> dict[str, Any]:
    weights = "int8 per-channel" if cfg.per_channel else "int8 per-tensor"
    acts = "int8 symmetric" if cfg.target == "trt" else "uint8 asymmetric"
    return {"format": "QDQ", "target": cfg.target, "activations": acts, "weights": weights + " symmetric",
            "calib_method": cfg.calib_method, "reduce_range": reduce_range, "preprocessed": True}


def _produce_int8(job: Job) -> None:
    from resopt.quantize.pipeline import guard, static_builder

    assert job.ranges is not None
    build = static_builder(job.prepped, job.ranges, job.cfg, job.tmp, job.reduce_range)
    if job.cfg.max_drop is None:
        build(job.produced.path, exclude=job.cfg.exclude)
    else:
        guard(job.produced, build, job.src, job.prepped, job.cfg, job.cs, job.val_evals, job.tmp)


def _dynamic_settings(cfg: QuantizeConfig, reduce_range: bool) -> dict[str, Any]:
    weights = "uint8 per-channel" if cfg.per_channel else "uint8 per-tensor"
    return {"weights": weights, "activations": "uint8 dynamic", "reduce_range": reduce_range}


def _produce_dynamic(job: Job) -> None:
    from resopt.quantize import ort as q

    q.dynamic_int8(job.prepped, job.produced.path, per_channel=job.cfg.per_channel, reduce_range=job.reduce_range,
                   exclude=job.cfg.exclude)


def _fp16_settings(cfg: QuantizeConfig, reduce_range: bool) -> dict[str, Any]:
    return {"weights": "float16", "activations": "float16", "io": "float32"}


def _produce_fp16(job: Job) -> None:
    from resopt.quantize import ort as q

    job.produced.extra["fp16_conversion"] = q.float16(job.prepped, job.produced.path,
                                                      exclude=job.cfg.exclude).to_dict()


def _kmeans_settings(cfg: QuantizeConfig, reduce_range: bool) -> dict[str, Any]:
    opts = cfg.mode_options(KmeansOptions)
    return {"clusters": opts.clusters, "weights": "uint8 indices + float32 codebook", "activations": "float32"}


def _produce_kmeans(job: Job) -> None:
    from resopt.quantize.kmeans import cluster_weights

    opts = job.cfg.mode_options(KmeansOptions)
    layers = cluster_weights(job.prepped, job.produced.path, clusters=opts.clusters, exclude=job.cfg.exclude)
    job.produced.metrics["weight_sqnr_db_min"] = round(min((la.sqnr_db for la in layers), default=0.0), 2)
    job.produced.extra["clustered"] = [{"weight": la.weight, "elements": la.elements, "clusters": la.clusters,
                                        "sqnr_db": round(la.sqnr_db, 2)} for la in layers]


def _fixed_settings(cfg: QuantizeConfig, reduce_range: bool) -> dict[str, Any]:
    opts = cfg.mode_options(FixedOptions)
    return {"bits": opts.bits, "weights": f"{opts.bits}-bit fixed point per layer",
            "activations": f"{opts.act_bits}-bit fixed point per layer" if opts.act_bits else "float32",
            **({"calib_method": "minmax"} if opts.act_bits else {})}


def _fixed_calibrates(cfg: QuantizeConfig) -> bool:
    return cfg.mode_options(FixedOptions).act_bits is not None


def _produce_fixed(job: Job) -> None:
    from resopt.quantize.fixed import fixed_point
    from resopt.quantize.pipeline import guard

    opts = job.cfg.mode_options(FixedOptions)
    formats: dict[str, dict[str, str]] = {}

    def build_fixed(dst: Path, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> None:
        formats.clear()
        formats.update(fixed_point(job.prepped, dst, bits=opts.bits, act_bits=opts.act_bits, ranges=job.ranges,
                                   exclude=exclude, only=only))

    if job.cfg.max_drop is None:
        build_fixed(job.produced.path, exclude=job.cfg.exclude)
    else:  # fixed point leaves residual adds in float, so the guard does not rank them
        guard(job.produced, build_fixed, job.src, job.prepped, job.cfg, job.cs, job.val_evals, job.tmp,
              skip_ops=("Add",))
    job.produced.extra["formats"] = dict(formats)


def _w4a8_settings(cfg: QuantizeConfig, reduce_range: bool) -> dict[str, Any]:
    from resopt.quantize.w4a8 import settings

    return settings(cfg, reduce_range)


def _produce_w4a8(job: Job) -> None:
    from resopt.quantize.w4a8 import produce

    produce(job)


def _w4a8_grids(prepped: Path, cfg: QuantizeConfig, reduce_range: bool) -> tuple[WeightGrid, dict[str, WeightGrid]]:
    from resopt.quantize.w4a8 import ptq_grids

    return ptq_grids(prepped, cfg, reduce_range)


def _qat(checkpoint: Path, output: Path, cfg: QuantizeConfig) -> QuantizeResult:
    from resopt.quantize.qat import quantize_qat

    return quantize_qat(checkpoint, output, cfg, MODES["qat"])


# 4-bit weights change more predictions than 8-bit ones: a converged ResNet-20 keeps about 90% of its top-1
# predictions with round-to-nearest and more with AdaRound (README, quantize --mode w4a8).
W4A8_MIN_AGREEMENT = 85.0

_INT8_SHARED = ("--target", "--calib-method", "--per-tensor", "--reduce-range")
_GUARD = ("--max-drop", "--max-exclude")

# FP16 changes almost nothing; 8-bit quantization or 256-cluster k-means of a healthy model keeps well above
# 90% agreement. Fixed point is a study tool (at 4 bits most predictions change, by design), so it reports
# without gating. QAT is gated against its fake-quant PyTorch model, which is what its ONNX must reproduce.
MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("int8", NoOptions, _INT8_SHARED + _GUARD + ("--ptq",), _always, _int8_settings, 90.0, _CALIB_HINT,
         produce=_produce_int8, qdq_int8=True, lints=_always, summary="static, calibrated, Q/DQ",
         shown=("calib_method", "weights", "activations", "num_calib"), label=("calib_method",)),
    Mode("int8-dynamic", NoOptions, ("--per-tensor", "--reduce-range"), _never, _dynamic_settings, 90.0,
         _PLAIN_HINT, produce=_produce_dynamic, lints=_always, shown=("weights", "activations")),
    Mode("fp16", NoOptions, (), _never, _fp16_settings, 99.0, _PLAIN_HINT, produce=_produce_fp16,
         shown=("weights", "activations")),
    Mode("qat", QatOptions, ("--target", "--per-tensor", "--reduce-range"), _always, _int8_settings, 90.0,
         _CALIB_HINT, from_checkpoint=_qat, qdq_int8=True, lints=_always,
         shown=("calib_method", "weights", "activations", "num_calib", "qat_epochs"), label=("qat_epochs",)),
    Mode("kmeans", KmeansOptions, (), _never, _kmeans_settings, 90.0,
         "raise --clusters (more values per layer), --exclude the sensitive layers, or lower --min-agreement",
         produce=_produce_kmeans, exports_pt=True, shown=("clusters", "weights"), label=("clusters",)),
    Mode("fixed", FixedOptions, _GUARD, _fixed_calibrates, _fixed_settings, 0.0,
         "raise --bits (or --act-bits), --exclude the sensitive layers, or lower --min-agreement",
         produce=_produce_fixed, exports_pt=True, lints=_fixed_calibrates, calibrates_when="with --act-bits",
         shown=("bits", "weights", "activations"), label=("bits", "calib_method")),
    Mode("w4a8", W4a8Options, ("--calib-method", "--per-tensor", "--reduce-range", "--ptq"), _always, _w4a8_settings,
         W4A8_MIN_AGREEMENT, "add --ptq adaround (learned 4-bit rounding), keep the ends at 8 bits (--int8-ends), "
         "--exclude the sensitive layers, or lower --min-agreement",
         produce=_produce_w4a8, exports_pt=True, ptq_grids=_w4a8_grids, summary="int4 weights, 8-bit activations",
         shown=("calib_method", "weights", "activations", "num_calib", "int8_layers"), label=("calib_method",)),
)}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise choice_error("mode", name, tuple(MODES))
    return MODES[name]


def mode_help() -> str:
    """``--mode``'s help: every mode with its summary, in registry order."""
    names = [f"{m.name} ({m.summary})" if m.summary else m.name for m in MODES.values()]
    return f"{', '.join(names[:-1])} or {names[-1]}."


def lineage_keys(which: str) -> tuple[str, ...]:
    """The lineage option keys of a quantize step worth showing: ``mode`` and then every mode's ``shown``
    (``which="shown"``: the ``info`` lineage table) or ``label`` (``"label"``: ``report``'s labels) keys, merged
    in registry order so that each mode's keys keep that mode's own order (a key new to the list goes before the
    first of its mode's later keys already there): a step reads ``bits=4 calib_method=minmax`` as its mode lists
    them. ``info`` and ``report`` sit below ``quantize`` in the layer order and cannot import this, so they hold
    the result as a literal that ``tests/test_quantize_options.py`` keeps equal to it."""
    keys: list[str] = ["mode"]
    for m in MODES.values():
        own: tuple[str, ...] = getattr(m, which)
        for i, key in enumerate(own):
            if key in keys:
                continue
            later = [keys.index(k) for k in own[i + 1:] if k in keys]
            if later:
                keys.insert(min(later), key)
            else:
                keys.append(key)
    return tuple(keys)


def mode_specific_flags() -> dict[str, list[str]]:
    """Every option that only some modes take -> those modes, in registry order."""
    users: dict[str, list[str]] = {}
    for mode in MODES.values():
        for flag in (*mode.shared, *mode.own_flags()):
            users.setdefault(flag, []).append(mode.name)
    return users


# The calibration set's own options: they matter wherever the set is read (``Mode.reads_calib_set``).
CALIB_FLAGS = ("--calib-data", "--num-calib")


def check_options_apply(cfg: QuantizeConfig, given: Iterable[str]) -> None:
    """A ``UsageError`` (exit 2) for the first of the ``given`` flags that ``cfg.mode`` does not use, naming
    the modes that take it; ``--calib-data``/``--num-calib`` also where the calibration set is never read (a
    mode that does not calibrate, verified on ``--data``). Flags every mode uses pass."""
    entry = get_mode(cfg.mode)
    users = mode_specific_flags()
    for flag in given:
        if flag in users and not entry.takes(flag):
            takers = users[flag]
            raise UsageError(f"{flag} does not apply to --mode {cfg.mode}; it is an option of --mode "
                             f"{', '.join(takers)}",
                             hint=f"drop {flag}, or choose --mode {takers[0]}")
        if flag in CALIB_FLAGS and not entry.reads_calib_set(cfg):
            takers = [f"{m.name} {m.calibrates_when}".strip() for m in MODES.values() if m.calibrates is not _never]
            raise UsageError(f"{flag} has no effect: --mode {cfg.mode} does not calibrate, and with --data it is "
                             f"verified on the --data test split; it is an option of --mode {', '.join(takers)} "
                             f"(and of every mode without --data)",
                             hint=f"drop {flag}, or drop --data to verify on the calibration images")


def check_config(cfg: QuantizeConfig) -> Mode:
    """Every check of ``cfg`` before any file is read, and its mode's entry: an unknown mode (with the list of
    modes), the shared options (``QuantizeConfig.validate``), a shared option set away from its default that the
    mode does not use, options of another mode's dataclass, and the mode's own (its dataclass's ``validate``).
    The library's entry points run it; the CLI also runs ``check_options_apply`` on the flags typed."""
    entry = get_mode(cfg.mode)
    cfg.validate()
    check_options_apply(cfg, cfg.shared_options_given() + cfg.calib_options_given())
    opts = entry.options_of(cfg)
    if not isinstance(opts, entry.options):
        raise UsageError(f"--mode {cfg.mode} takes {entry.options.__name__}, got {type(opts).__name__}")
    opts.validate(cfg)
    return entry
