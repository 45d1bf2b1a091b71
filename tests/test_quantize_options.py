"""Quantize modes as a registry: every option belongs to the modes that use it, and an option the chosen mode
does not use is an error (exit 2, one line naming the option and the modes that take it), never ignored."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from resopt.errors import UsageError


@pytest.mark.parametrize(("args", "expected"), [
    (["--calib-method", "entropy", "--mode", "fp16"],
     "Error: --calib-method does not apply to --mode fp16; it is an option of --mode int8, w4a8"),
    # QAT's fake-quant layers observe min/max ranges, and its ONNX is calibrated to match.
    (["--calib-method", "entropy", "--mode", "qat", "--data", "x"],
     "Error: --calib-method does not apply to --mode qat; it is an option of --mode int8, w4a8"),
    # No calibration, verified on --data: the calibration set is never read.
    (["--mode", "fp16", "--data", "x", "--calib-data", "/does/not/exist", "--num-calib", "7"],
     "Error: --calib-data has no effect: --mode fp16 does not calibrate, and with --data it is verified on the "
     "--data test split; it is an option of --mode int8, qat, fixed with --act-bits, w4a8 (and of every mode "
     "without --data)"),
    (["--mode", "kmeans", "--data", "x", "--num-calib", "7"],
     "Error: --num-calib has no effect: --mode kmeans does not calibrate, and with --data it is verified on the "
     "--data test split; it is an option of --mode int8, qat, fixed with --act-bits, w4a8 (and of every mode "
     "without --data)"),
    (["--clusters", "16", "--mode", "int8"],
     "Error: --clusters does not apply to --mode int8; it is an option of --mode kmeans"),
    (["--epochs", "3", "--mode", "int8"],
     "Error: --epochs does not apply to --mode int8; it is an option of --mode qat"),
    (["--mode", "kmeans", "--act-bits", "4"],
     "Error: --act-bits does not apply to --mode kmeans; it is an option of --mode fixed"),
    (["--mode", "fp16", "--per-tensor"],
     "Error: --per-tensor does not apply to --mode fp16; it is an option of --mode int8, int8-dynamic, qat, "
     "w4a8"),
    (["--mode", "fixed", "--calib-method", "minmax", "--act-bits", "8"],  # fixed calibrates, but always minmax
     "Error: --calib-method does not apply to --mode fixed; it is an option of --mode int8, w4a8"),
    # Typed by the user counts even when it is the default value.
    (["--mode", "fp16", "--target", "cpu"], "Error: --target does not apply to --mode fp16; it is an option of "
                                            "--mode int8, qat"),
    (["--mode", "int8-dynamic", "--no-amp"], "Error: --amp does not apply to --mode int8-dynamic; it is an option "
                                             "of --mode qat"),
    (["--mode", "kmeans", "--max-drop", "1", "--data", "x"],
     "Error: --max-drop does not apply to --mode kmeans; it is an option of --mode int8, fixed"),
])
def test_an_option_the_mode_does_not_use_is_an_error(cli, r20_onnx_session: Path, workdir: Path, args: list[str],
                                                     expected: str) -> None:
    r = cli("quantize", r20_onnx_session, "-o", "x.onnx", *args)
    assert r.code == 2, r.stderr
    assert r.stderr.splitlines()[0] == expected
    assert r.stdout == "" and not Path("x.onnx").exists()


def test_library_callers_get_the_same_check_for_values_away_from_the_default() -> None:
    from resopt.quantize import KmeansOptions, QuantizeConfig, check_config

    check_config(QuantizeConfig(mode="fp16", calib_method="minmax", target="cpu"))  # the defaults: not "given"
    with pytest.raises(UsageError, match="^--calib-method does not apply to --mode fp16"):
        check_config(QuantizeConfig(mode="fp16", calib_method="entropy"))
    with pytest.raises(UsageError, match="^--per-tensor does not apply to --mode kmeans"):
        check_config(QuantizeConfig(mode="kmeans", per_channel=False))
    with pytest.raises(UsageError, match="--mode int8 takes NoOptions, got KmeansOptions"):
        check_config(QuantizeConfig(mode="int8", options=KmeansOptions(clusters=16)))
    with pytest.raises(UsageError, match=r"--clusters must be in \[2, 256\]"):
        check_config(QuantizeConfig(mode="kmeans", options=KmeansOptions(clusters=300)))


def test_the_registry_matches_the_command() -> None:
    """Every mode can run (a producer or a checkpoint entry), its own options are options of the command with
    the same defaults, and every mode-specific flag exists."""
    import inspect

    from resopt.cli.quantize import quantize_cmd
    from resopt.quantize import MODES
    from resopt.quantize.modes import SHARED_FIELDS, mode_specific_flags

    params = inspect.signature(quantize_cmd).parameters
    assert list(MODES) == ["int8", "int8-dynamic", "fp16", "qat", "kmeans", "fixed", "w4a8"]
    for mode in MODES.values():
        assert (mode.produce is None) != (mode.from_checkpoint is None), mode.name
        for f in fields(mode.options):
            assert f.name in params, (mode.name, f.name)
            assert params[f.name].default == f.default, (mode.name, f.name)
    assert set(mode_specific_flags()) == set(SHARED_FIELDS.values()) | {
        "--clusters", "--bits", "--act-bits", "--epochs", "--lr", "--batch-size", "--amp", "--device",
        "--data-path", "--select", "--int8-ends"}
    assert {m for m, e in MODES.items() if e.calibrates.__name__ == "_always"} == {"int8", "qat", "w4a8"}


def test_target_trt_never_depends_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a host without VNNI --target cpu gets 7-bit weights by default; --target trt never does (issue 19: the
    same command wrote a different TensorRT file on another laptop). An explicit choice wins for both."""
    import resopt.quantize.ort as ort
    from resopt.quantize import QuantizeConfig

    for host_lacks_vnni in (True, False):
        monkeypatch.setattr(ort, "default_reduce_range", lambda v=host_lacks_vnni: v)
        assert QuantizeConfig(target="cpu").weights_reduce_range() is host_lacks_vnni
        assert QuantizeConfig(target="trt").weights_reduce_range() is False
        assert QuantizeConfig(target="trt", reduce_range=True).weights_reduce_range() is True


def test_every_place_that_lists_the_modes_follows_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--mode``'s help, ``info``'s lineage columns and ``report``'s labels come from ``MODES``: the help is built
    from it, and ``info`` / ``report`` (below ``quantize`` in the layer order, so they cannot import it) hold
    literals that must equal what the registry derives. A mode added to ``MODES`` with keys of its own fails here
    until both follow; each mode's keys must be ones its lineage entry records (its ``settings``, plus the
    calibration count and QAT's epochs that the pipeline adds), or the column would always be empty."""
    import typer.main

    from resopt.cli import app
    from resopt.info import KEY_OPTIONS
    from resopt.quantize import MODES, FixedOptions, QuantizeConfig
    from resopt.quantize.modes import Mode, lineage_keys, mode_help
    from resopt.report.records import _STEP_OPTIONS

    cmd = typer.main.get_command(app).commands["quantize"]  # type: ignore[attr-defined]
    help_text = next(p for p in cmd.params if "--mode" in p.opts).help
    # The README's list of modes, written out (an independent literal), in the help's words.
    assert help_text == ("int8 (static, calibrated, Q/DQ), int8-dynamic, fp16, qat, kmeans, fixed or w4a8 (int4 "
                         "weights, 8-bit activations).")
    assert KEY_OPTIONS["quantize"] == lineage_keys("shown")
    assert _STEP_OPTIONS["quantize"] == lineage_keys("label")
    for mode in MODES.values():
        variants = [mode.options()] + ([FixedOptions(act_bits=8)] if mode.options is FixedOptions else [])
        recorded = {"mode"}.union(*(mode.settings(QuantizeConfig(mode=mode.name, options=o), False) for o in variants))
        recorded |= {"num_calib"} if mode.calibrates.__name__ == "_always" else set()
        recorded |= {"qat_epochs"} if mode.from_checkpoint is not None else set()
        recorded |= {"layer_bits", "int8_layers"} if mode.name == "w4a8" else set()  # its producer's plan
        assert set(mode.shown) | set(mode.label) <= recorded, mode.name
        for which in ("shown", "label"):  # a step's keys read in its mode's own order
            merged = lineage_keys(which)
            assert sorted(getattr(mode, which), key=merged.index) == list(getattr(mode, which)), (mode.name, which)

    new = Mode("int4", MODES["int8"].options, (), MODES["int8"].calibrates, MODES["int8"].settings, 90.0, "",
               shown=("int4_groups",), label=("int4_groups",))
    monkeypatch.setitem(MODES, "int4", new)
    assert mode_help().endswith("fixed, w4a8 (int4 weights, 8-bit activations) or int4.")
    assert KEY_OPTIONS["quantize"] != lineage_keys("shown")  # what the assertions above catch for a real mode
    assert _STEP_OPTIONS["quantize"] != lineage_keys("label")
