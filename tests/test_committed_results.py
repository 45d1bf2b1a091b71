"""The committed results (studies/results/, docs/) carry no absolute path of the machine that made them:
every file is named relative to the file that names it, or as it was given on the command line."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import REPO

# /a/b... not preceded by a word character, a dot, a colon or another slash (so "top-1/top-5", "plots/x.png",
# "../runs/x.pt" and https://host/path are not matches), and a Windows drive path.
ABSOLUTE = re.compile(r"(?<![\w.:/~\\-])/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+|\b[A-Za-z]:\\[A-Za-z0-9_.-]+")
TEXT_SUFFIXES = (".md", ".txt", ".json", ".html", ".svg", ".csv")


def _committed(*folders: str) -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--", *folders], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return [f for f in out.splitlines() if f.endswith(TEXT_SUFFIXES)]


def test_the_pattern_finds_absolute_paths_and_nothing_else() -> None:
    for hit in ["measure it with: resopt bench /work/main/studies/runs/r20.pt", '"file": "/tmp/x/r56.onnx"',
                "data C:\\Users\\me\\cifar", "(/home/u/data)"]:
        assert ABSOLUTE.search(hit), hit
    for fine in ["top-1/top-5", "plots/top1_vs_size.png", "../../runs/cpu/r20.pt", "https://pypi.nvidia.com/x/y",
                 "b1 / b32 img/s", "studies/runs/cpu/data", "0.5 MB / 84.72%", "~/.cache/resopt/data"]:
        assert not ABSOLUTE.search(fine), fine


def test_no_absolute_path_in_committed_results() -> None:
    files = _committed("studies/results", "docs")
    assert files, "no committed results found"
    found = []
    for name in files:
        for n, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1):
            m = ABSOLUTE.search(line)
            if m:
                found.append(f"{name}:{n}: {m.group(0)}")
    assert not found, "absolute paths in committed results:\n" + "\n".join(found[:20])


def test_converged_cifar_verdicts_are_what_the_script_computes_from_the_committed_bench() -> None:
    """The study's target verdicts are computed (studies/tools/verdicts.py, against the FP32 ResNet-56 on
    onnxruntime that the targets are stated for), not typed: the committed verdicts.md is its output."""
    import sys

    folder = REPO / "studies" / "results" / "converged-cifar"
    r = subprocess.run([sys.executable, str(REPO / "studies" / "tools" / "verdicts.py"), "bench.json"], cwd=folder,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (folder / "verdicts.md").read_text()
    # Checked by hand from bench.json: r56.onnx @ ort is 84.72%; the 0.29 MB r20.m70.int8.onnx is 82.29%.
    assert "top-1 84.72%" in r.stdout
    assert "no file of at most 0.5 MB comes within 0.5 point" in r.stdout and "-2.43 points" in r.stdout
