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
    from resopt.quantize import KmeansOptions, QuantizeConfig

    QuantizeConfig(mode="fp16", calib_method="minmax", target="cpu").validate()  # the defaults: not "given"
    with pytest.raises(UsageError, match="^--calib-method does not apply to --mode fp16"):
        QuantizeConfig(mode="fp16", calib_method="entropy").validate()
    with pytest.raises(UsageError, match="^--per-tensor does not apply to --mode kmeans"):
        QuantizeConfig(mode="kmeans", per_channel=False).validate()
    with pytest.raises(UsageError, match="--mode int8 takes NoOptions, got KmeansOptions"):
        QuantizeConfig(mode="int8", options=KmeansOptions(clusters=16)).validate()
    with pytest.raises(UsageError, match="--clusters must be between 2 and 256"):
        QuantizeConfig(mode="kmeans", options=KmeansOptions(clusters=300)).validate()


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
        "--data-path", "--int8-ends"}
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
