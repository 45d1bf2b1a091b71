"""studies/: every study's Makefile runs end to end at SCALE=smoke (a few images, one epoch) with the real
resopt commands, writes its report, bench JSON, commands and machine, and a second run does nothing. The
cpu and full scales are checked as dry runs (every variable resolves, every command is a resopt one)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, require_shared

STUDIES_DIR = REPO / "studies"
STUDIES = ["cifar10-resnet18", "methods-matrix", "kd-prune-quant", "pruning-effects", "layer-importance",
           "converged-cifar"]
R56 = REPO.parent / "shared" / "models" / "resnet56-4bfd9763.th"



@pytest.fixture(autouse=True)
def _make_tool() -> None:
    """The studies are makefiles: without GNU make they skip, or fail with CI=true."""
    require_shared(Path(shutil.which("make") or "/usr/bin/make"), "GNU make")


def _make(*args: str, cwd: Path = STUDIES_DIR, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    resopt = f"{sys.executable} -m resopt"
    return subprocess.run(["make", "--no-print-directory", *args, f"RESOPT={resopt}", f"PYTHON={sys.executable}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_list_names_every_study() -> None:
    r = _make("list")
    assert r.returncode == 0, r.stderr
    for s in STUDIES:
        assert s in r.stdout
        assert (STUDIES_DIR / f"{s}.mk").is_file()


@pytest.mark.parametrize("scale", ["cpu", "full"])
def test_every_scale_plans_only_resopt_steps(scale: str, tmp_path: Path) -> None:
    for s in STUDIES:
        r = _make("-s", "-f", f"{s}.mk", "-n", "all", f"SCALE={scale}", f"WORK={tmp_path}", f"RESULTS={tmp_path}/r",
                  "IMAGENET=/data/imagenet")
        assert r.returncode == 0, f"{s}: {r.stderr}"
        steps = [line for line in r.stdout.splitlines() if "-m resopt " in line]
        assert len(steps) >= 6, s
        commands = {line.split("-m resopt ")[1].split()[0] for line in steps}
        assert commands <= {"import", "train", "distill", "prune", "export", "quantize", "bench", "report", "env"}, s


def test_a_scale_other_than_cpu_full_smoke_is_refused() -> None:
    r = _make("-f", "converged-cifar.mk", "-n", "all", "SCALE=huge")
    assert r.returncode != 0 and "SCALE must be cpu, full or smoke" in r.stderr


@pytest.mark.slow
def test_every_study_runs_end_to_end_at_smoke_scale(tmp_path: Path) -> None:
    require_shared(R56, "the shared ResNet-56")
    work = tmp_path / "work"
    r = _make("-j2", "all", "SCALE=smoke", f"WORK={work}", timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    for s in STUDIES:
        res = work / s / "results"
        report = (res / "report.md").read_text()
        bench = json.loads((res / "bench.json").read_text())
        assert len(bench["models"]) >= 2, s
        assert all(m["accuracy"]["top1"] is not None for m in bench["models"]), s
        assert "| 1 |" in report and "(SCALE=smoke)" in report, s
        assert (res / "plots").is_dir() and any((res / "plots").glob("*.png")), s
        # commands.txt is the log of what ran (tools/logged-shell): every line with its exit code and wall time,
        # the bench and the report among them, all of them exit 0 (the run succeeded).
        lines = (res / "commands.txt").read_text().splitlines()
        assert lines and all(re.search(r"\t# exit 0, \d+\.\d s, \d{4}-\d\d-\d\dT", ln) for ln in lines), s
        assert any("-m resopt bench " in ln for ln in lines) and any("-m resopt report " in ln for ln in lines), s
        assert not (res / "machine.json").exists()  # the machine is recorded for committed (cpu) results only
        # The dependencies are complete: a second run has nothing to do.
        q = _make("-q", "-f", f"{s}.mk", "all", "SCALE=smoke", f"WORK={work}")
        assert q.returncode == 0, f"{s} is not up to date after a full run: {q.stdout[-500:]}"
    assert (work / "layer-importance" / "results" / "sensitivity-r18.txt").read_text().strip()
    conv = json.loads((work / "converged-cifar" / "results" / "bench.json").read_text())
    assert {m["runtime"] for m in conv["models"]} == {"ort", "openvino"}
    # Nothing was written to the committed results.
    assert not any(p.stat().st_mtime > work.stat().st_mtime for p in (STUDIES_DIR / "results").rglob("*")
                   if p.is_file()) if (STUDIES_DIR / "results").exists() else True
