"""CLI conventions: help order, version, cheap imports, one-line errors, stdout/stderr discipline."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from resopt import __version__
from resopt.cli import COMMANDS


def _resopt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resopt", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands_in_pipeline_order_without_importing_torch() -> None:
    code = ("import sys, resopt.cli as c; sys.argv=['resopt','--help']\n"
            "try:\n    c.main()\nexcept SystemExit: pass\n"
            "heavy=[m for m in ('torch','onnxruntime','onnx','tensorrt','torchvision') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert "HEAVY []" in proc.stdout, proc.stdout
    names = [n for n, _, _ in COMMANDS]
    listing = proc.stdout.split("Commands:", 1)[1]
    positions = [listing.index(f"\n  {n} ") for n in names]
    assert positions == sorted(positions), "commands must be listed in pipeline order"
    assert elapsed < 5  # generous for a loaded CI box; typically ~0.15 s


def test_every_command_help_has_an_example() -> None:
    from resopt.cli import run

    for name, _, _ in COMMANDS:
        proc = _resopt(name, "--help") if name == "train" else None
        if proc is not None:
            assert proc.returncode == 0 and "Example: resopt train" in proc.stdout
    for name, module, func in COMMANDS:
        import importlib

        doc = getattr(importlib.import_module(module), func).__doc__ or ""
        assert f"resopt {name}" in doc and "Example" in doc, f"{name} --help has no example"
    assert run(["--version"]) == 0


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
