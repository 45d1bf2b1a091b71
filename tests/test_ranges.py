"""The numeric options' ranges, declared once in ``resopt.ranges``: a command refuses a value outside them with
one line and exit 2 before it reads any file, and each ``*Config.validate`` refuses the same value with the same
line, because both read the one table."""

from __future__ import annotations

from pathlib import Path

import pytest

from resopt.errors import UsageError


@pytest.mark.parametrize(("args", "line"), [
    (["quantize", "m.onnx", "--mode", "kmeans", "--clusters", "1"],
     "Error: --clusters must be in [2, 256] (uint8 indices), got 1"),
    (["quantize", "m.onnx", "--mode", "kmeans", "--clusters", "257"],
     "Error: --clusters must be in [2, 256] (uint8 indices), got 257"),
    (["quantize", "m.onnx", "--mode", "fixed", "--bits", "1"], "Error: --bits must be in [2, 8], got 1"),
    (["quantize", "m.onnx", "--mode", "fixed", "--bits", "9"], "Error: --bits must be in [2, 8], got 9"),
    (["quantize", "m.onnx", "--mode", "fixed", "--act-bits", "1"], "Error: --act-bits must be in [2, 8], got 1"),
    (["quantize", "m.onnx", "--mode", "fixed", "--act-bits", "16"], "Error: --act-bits must be in [2, 8], got 16"),
    (["prune", "m.pt", "--method", "block", "--blocks", "0"], "Error: --blocks must be at least 1, got 0"),
    (["prune", "m.pt", "--method", "block", "--blocks", "-2"], "Error: --blocks must be at least 1, got -2"),
])
def test_out_of_range_is_one_line_and_exit_2_before_any_file_is_read(cli, workdir: Path, args: list[str],
                                                                      line: str) -> None:
    # m.onnx / m.pt do not exist: the range is checked first, so the error names the value, not the file.
    r = cli(*args)
    assert r.code == 2, r.stderr
    assert r.stderr.strip().splitlines() == [line], r.stderr
    assert r.stdout == ""


def test_the_configs_refuse_with_the_commands_line() -> None:
    from resopt.distill import DistillConfig
    from resopt.prune import PruneConfig
    from resopt.quantize import FixedOptions, KmeansOptions, QuantizeConfig, check_config
    from resopt.train import TrainConfig

    for cfg, line in [
        (QuantizeConfig(mode="kmeans", options=KmeansOptions(clusters=257)),
         "--clusters must be in [2, 256] (uint8 indices), got 257"),
        (QuantizeConfig(mode="fixed", options=FixedOptions(bits=9)), "--bits must be in [2, 8], got 9"),
        (QuantizeConfig(mode="fixed", options=FixedOptions(act_bits=1)), "--act-bits must be in [2, 8], got 1"),
        (QuantizeConfig(min_agreement=120), "--min-agreement must be in [0, 100], got 120"),
        (PruneConfig(method="block", blocks=0), "--blocks must be at least 1, got 0"),
        (PruneConfig(sparsity=1.5), "--sparsity must be in (0, 1), got 1.5"),
        (PruneConfig(sparsity=0.5, alpha=2.0), "--alpha must be in [0, 1], got 2.0"),
        (TrainConfig(epochs=0), "--epochs must be at least 1, got 0"),
        (TrainConfig(lr=float("nan")), "--lr must be a finite number, got nan"),
        (TrainConfig(time_budget=0), "--time-budget must be a positive number, got 0"),
        (DistillConfig(temperature=0), "--temperature must be in (0, 1000], got 0"),
    ]:
        with pytest.raises(UsageError) as e:  # a quantize config's checks need its mode's entry: check_config
            check_config(cfg) if isinstance(cfg, QuantizeConfig) else cfg.validate()
        assert str(e.value) == line, type(cfg).__name__


def test_one_table_is_the_source(cli, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Narrowing a range in ``RANGES`` narrows the command and the config alike: neither keeps its own copy."""
    from resopt import ranges
    from resopt.quantize import KmeansOptions, QuantizeConfig, check_config

    check_config(QuantizeConfig(mode="kmeans", options=KmeansOptions(clusters=200)))
    monkeypatch.setitem(ranges.RANGES, "clusters", ranges.Range(2, 128))
    with pytest.raises(UsageError, match=r"^--clusters must be in \[2, 128\], got 200$"):
        check_config(QuantizeConfig(mode="kmeans", options=KmeansOptions(clusters=200)))
    r = cli("quantize", "m.onnx", "--mode", "kmeans", "--clusters", "200")
    assert r.code == 2 and r.stderr.strip() == "Error: --clusters must be in [2, 128], got 200"
