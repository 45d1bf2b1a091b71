"""CLI conventions: help order, version, cheap imports, one-line errors, stdout/stderr discipline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from resopt import __version__
from resopt.cli import COMMANDS


def _resopt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resopt", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands_in_pipeline_order_without_importing_torch() -> None:
    code = ("import sys, resopt.cli as c; sys.argv=['resopt','--help']\n"
            "try:\n    c.main()\nexcept SystemExit: pass\n"
            "heavy=[m for m in ('torch','onnxruntime','onnx','tensorrt','torchvision') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in proc.stdout, proc.stdout
    names = [n for n, _, _ in COMMANDS]
    listing = proc.stdout.split("Commands:", 1)[1]
    positions = [listing.index(f"\n  {n} ") for n in names]
    assert positions == sorted(positions), "commands must be listed in pipeline order"


@pytest.mark.parametrize("name", [n for n, _, _ in COMMANDS])
def test_every_command_help_has_an_example_and_imports_nothing_heavy(name: str) -> None:
    """``resopt NAME --help`` as a user runs it: exit 0, an example on stdout, no torch/onnx imported."""
    code = (f"import sys, resopt.cli as c; sys.argv=['resopt', {name!r}, '--help']\n"
            "try:\n    c.main()\nexcept SystemExit as e: rc = e.code\n"
            "heavy=[m for m in ('torch','onnxruntime','onnx','tensorrt','torchvision') if m in sys.modules]\n"
            "print('RC', rc, 'HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.rstrip().endswith("RC 0 HEAVY []"), proc.stdout + proc.stderr
    assert re.search(rf"Examples?:\s+resopt {name} ", proc.stdout), f"resopt {name} --help shows no example"
    assert proc.stderr == ""


def test_version(capsys) -> None:
    from resopt.cli import run

    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"resopt {__version__}"


def test_errors_are_one_line_with_hint_and_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    proc = _resopt("train", "--data", str(tmp_path / "none"), "-o", str(tmp_path / "o.pt"))
    assert proc.returncode == 4
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("Error: data ") and lines[1].startswith("Hint: ") and len(lines) == 2
    assert proc.stdout == ""


def test_debug_env_shows_the_traceback(tmp_path: Path) -> None:
    import os

    proc = subprocess.run([sys.executable, "-m", "resopt", "train", "--data", str(tmp_path / "none")],
                          capture_output=True, text=True, env={**os.environ, "RESOPT_DEBUG": "1"}, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DataError" in proc.stderr
