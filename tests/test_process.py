"""The contracts that live at the process boundary, checked as a user meets them: ``python -m resopt`` in a
subprocess, for every command in the registry.

- exit status: 0 on success, the README's code per kind of failure (2 options, 3 model file, 4 data,
  5 missing dependency, 6 parity, 7 accuracy guard, 8 hardware);
- stdout: exactly one JSON document with ``--json`` (``json.loads`` refuses anything more or less), and
  nothing at all when the command fails (the error is on stderr, one ``Error:`` line and a hint);
- files: a successful command adds exactly its output; a failed one leaves the folder as it was, an
  existing ``-o`` file byte for byte, and no temporary file behind.

In-process tests (``cli`` fixture) cannot see these: they share one interpreter, one file descriptor 1
and no exit status, and bench's workers are separate processes whose output only a real run shows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CLASSES, make_subset

from resopt.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
SHIPPED_R20 = REPO / "models" / "resnet20-cifar10-akamaster.th"  # the foreign checkpoint `make demo` imports
SENTINEL = b"an earlier result that a failed command must leave alone\n"
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resopt(*args: object, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300,
           runner: tuple[str, ...] = (sys.executable, "-m", "resopt")) -> subprocess.CompletedProcess:
    """``resopt ARGS`` as a user runs it, importing this checkout (PYTHONPATH) whatever is installed."""
    base = {k: v for k, v in os.environ.items() if k not in ("RESOPT_DEBUG", "OMP_WAIT_POLICY")}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([*runner, *map(str, args)], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (recursively) with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(tmp: Path) -> list[str]:
    """What resopt left in its TMPDIR: its scratch folders are named resopt-*, its atomic writes *.tmp.
    Libraries keep files of their own there (a telemetry session file ``.ses``), not resopt's to remove."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("resopt") or p.suffix == ".tmp")


def one_json_document(stdout: str) -> dict:
    doc = json.loads(stdout)  # raises on an empty stdout and on anything after the first document
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, cifar_small: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("process_data")
    return {"tiny": make_subset(root / "tiny", 3, 2),  # 30 train / 20 test images, all 10 classes
            "three": make_subset(root / "three", 2, 2, classes=CLASSES[:3]), "small": cifar_small}


@pytest.fixture(scope="module")
def models(trained_pt: Path, r20_onnx_session: Path, r20_int8_session: Path) -> dict[str, Path]:
    return {"pt": trained_pt, "onnx": r20_onnx_session, "int8": r20_int8_session}


def test_every_registered_command_is_covered() -> None:
    names = [n for n, _, _ in COMMANDS]
    assert sorted(SUCCESS) == sorted(set(names))
    assert sorted({c for c, *_ in FAILURES}) == sorted(set(names))
    assert {code for _, _, code, _ in FAILURES} >= {2, 3, 4, 5, 6, 7, 8} - ({5} if HAS_TRT else set())


# ----------------------------------------------------------------------------------------------- success

# command -> (arguments, given the models, the data and the output folder; the files it must add there)
Args = Callable[[dict[str, Path], dict[str, Path], Path], list[object]]
SUCCESS: dict[str, tuple[Args, tuple[str, ...]]] = {
    "train": (lambda m, d, o: ["--arch", "resnet20", "--width", 0.25, "--epochs", 1, "--batch-size", 16,
                               "--data", d["tiny"], "-o", o / "t.pt"], ("t.pt",)),
    "distill": (lambda m, d, o: ["--teacher", m["pt"], "--student", "resnet20", "--width", 0.25, "--epochs", 1,
                                 "--batch-size", 16, "--data", d["tiny"], "-o", o / "kd.pt"], ("kd.pt",)),
    "import": (lambda m, d, o: [SHIPPED_R20, "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                                "--classes", ",".join(CLASSES), "-o", o / "i.pt"], ("i.pt",)),
    "prune": (lambda m, d, o: [m["pt"], "--sparsity", 0.5, "--finetune-epochs", 1, "--batch-size", 16,
                               "--data", d["tiny"], "-o", o / "p.pt"], ("p.pt",)),
    "export": (lambda m, d, o: [m["pt"], "--exporter", "torchscript", "--data", d["tiny"], "--num-verify", 10,
                                "-o", o / "e.onnx"], ("e.onnx",)),
    "quantize": (lambda m, d, o: [m["onnx"], "--num-calib", 16, "-o", o / "q.onnx"], ("q.onnx",)),
    "build": (lambda m, d, o: [m["onnx"], "--fp16", "--data", d["tiny"], "-o", o / "b.engine"],
              ("b.engine", "b.engine.json")),
    "bench": (lambda m, d, o: [m["onnx"], m["int8"], "--batch-size", "1,2", "--threads", 1, "--warmup", 1,
                               "--iters", 2, "--min-time", 0, "--rounds", 1], ()),
    "report": (lambda m, d, o: [m["pt"], "-o", o / "rep"],
               tuple(f"rep/{f}" for f in ("report.md", "report.html", *(f"plots/{p}.{x}" for p in
                     ("curves", "lineage", "top1_vs_size") for x in ("png", "svg"))))),
    "info": (lambda m, d, o: [m["int8"]], ()),
    "env": (lambda m, d, o: [], ()),
    # One trial (the unchanged model, FP32 on ort): the study, its cache, the front and the report in opt/.
    "optimize": (lambda m, d, o: [m["onnx"], "--data", d["tiny"], "--trials", 1, "--runtime", "ort", "--batch-size",
                                  2, "--threads", 1, "--min-time", 0, "--rounds", 1, "-o", o / "opt"],
                 tuple(f"opt/{f}" for f in ("study.db", "optimize.json", "best.onnx", "best.json", "trials.csv",
                                            "commands.sh", "bench.ort.json", "report.md", "report.html", "pareto/",
                                            "plots/", "cache/"))),
}


def added_only(found: set[str], outputs: tuple[str, ...]) -> bool:
    """``found`` is exactly ``outputs``: the files named, and under each folder named (``x/``) one file or more."""
    files = {o for o in outputs if not o.endswith("/")}
    folders = [o for o in outputs if o.endswith("/")]
    return (files <= found and all(any(f.startswith(d) for f in found) for d in folders)
            and all(f in files or any(f.startswith(d) for d in folders) for f in found))


@pytest.mark.parametrize("command", list(SUCCESS))
def test_success_prints_one_json_document_and_adds_only_its_output(command, models, data, tmp_path) -> None:
    if command == "build" and not (HAS_TRT and has_cuda()):
        pytest.skip("building an engine needs TensorRT and a CUDA GPU")
    args, outputs = SUCCESS[command]
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir(), tmp.mkdir()
    proc = resopt(command, *args(models, data, out), "--json", cwd=out, env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    doc = one_json_document(proc.stdout)
    assert added_only(set(snapshot(out)), outputs), "a successful command adds its output and nothing else"
    assert leftovers(tmp) == [], "temporary files left in TMPDIR"
    assert "Error:" not in proc.stderr
    if command == "bench":  # several worker processes, still one document on stdout
        assert [r["name"] for r in doc["models"]] == ["r20.onnx", "r20.int8.onnx"]
        assert [b["batch_size"] for b in doc["models"][1]["batches"]] == [1, 2]
        # resopt sets OMP_WAIT_POLICY=PASSIVE before torch loads (resopt() removed any inherited value).
        assert doc["host"]["omp_wait_policy"] == "PASSIVE"


def test_table_output_goes_to_stdout_and_progress_to_stderr(models, tmp_path) -> None:
    proc = resopt("info", models["int8"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "r20.int8.onnx" in proc.stdout and "INT8 Q/DQ" in proc.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(proc.stdout)


# ----------------------------------------------------------------------------------------------- failures

# (command, arguments with an -o that already exists where the command writes one, exit code, error text)
# Late failures where one exists (export's parity check, quantize's guard run after the work is done), so
# "nothing half-written" is tested where a half-written file could have appeared.
FAILURES: list[tuple[str, Args, int, str]] = [
    ("train", lambda m, d, o: ["--arch", "resnet20", "--data", o / "missing", "-o", o / "out.pt"], 4,
     "Error: data "),
    ("train", lambda m, d, o: ["--arch", "no-such-net", "--data", d["tiny"], "-o", o / "out.pt"], 2,
     "Error: unknown architecture 'no-such-net'"),
    ("distill", lambda m, d, o: ["--teacher", o / "teacher.pt", "--student", "resnet20", "--data", d["tiny"],
                                 "-o", o / "teacher.pt"], 2, "is the same file as the input"),
    ("distill", lambda m, d, o: ["--teacher", m["pt"], "--student", o / "in.pt", "--data", d["tiny"],
                                 "-o", o / "in.pt"], 2, "is the same file as the input"),
    ("distill", lambda m, d, o: ["--teacher", m["pt"], "--student", "resnet20", "--width", 0.25, "--epochs", 1,
                                 "--data", d["three"], "-o", o / "out.pt"], 4, "Error: "),
    ("import", lambda m, d, o: [SHIPPED_R20, "--mean", "0.485,0.456", "--std", "0.229,0.224,0.225",
                                "-o", o / "out.pt"], 2, "Error: --mean"),
    ("import", lambda m, d, o: [o / "corrupt.pt", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2",
                                "--classes", ",".join(CLASSES), "-o", o / "out.pt"], 3, "Error: "),
    ("prune", lambda m, d, o: [o / "in.pt", "--sparsity", 0.5, "--data", d["tiny"], "-o", o / "in.pt"], 2,
     "is the same file as the input"),
    ("prune", lambda m, d, o: [m["pt"], "--sparsity", 1.5, "--data", d["tiny"], "-o", o / "out.pt"], 2,
     "Error: --sparsity"),
    ("export", lambda m, d, o: [o / "corrupt.pt", "-o", o / "out.onnx"], 3, "Error: "),
    ("export", lambda m, d, o: [m["pt"], "--exporter", "torchscript", "--data", d["tiny"], "--num-verify", 10,
                                "--tolerance", 1e-12, "-o", o / "out.onnx"], 6, "Error: "),
    ("quantize", lambda m, d, o: [m["onnx"], "--mode", "fixed", "--bits", 2, "--data", d["small"],
                                  "--limit-per-class", 10, "--max-drop", 0.5, "--max-exclude", 1,
                                  "-o", o / "out.onnx"], 7, "Error: no setting met --max-drop 0.5"),
    ("quantize", lambda m, d, o: [m["onnx"], "--data", d["three"], "-o", o / "out.onnx"], 4, "Error: "),
    ("build", lambda m, d, o: [m["onnx"], "--fp16", "-o", o / "out.engine"],
     5 if not HAS_TRT else 8, "Error: "),
    ("bench", lambda m, d, o: [m["onnx"], "--batch-size", 1, "--data", d["three"]], 4, "Error: "),
    ("bench", lambda m, d, o: [m["pt"], "--device", "gpu", "--batch-size", 1], 8, "Error: "),
    ("bench", lambda m, d, o: [m["onnx"], "--batch-size", "0"], 2, "Error: "),
    ("report", lambda m, d, o: [o / "corrupt.onnx", "-o", o / "rep"], 3, "Error: "),
    ("info", lambda m, d, o: [o / "corrupt.onnx"], 3, "Error: "),
    ("info", lambda m, d, o: [o / "missing.onnx"], 3, "Error: "),
    ("optimize", lambda m, d, o: [m["onnx"], "--data", d["tiny"], "--runtime", "ort,tensorrt-cpu", "-o", o / "opt"],
     2, "Error: unknown runtime 'tensorrt-cpu'"),
    ("optimize", lambda m, d, o: [o / "corrupt.onnx", "--data", d["tiny"], "-o", o / "opt"], 3, "Error: "),
    ("env", lambda m, d, o: ["--no-such-option"], 2, "No such option"),
]


def _ids() -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for command, _, code, _ in FAILURES:
        seen[command] = seen.get(command, 0) + 1
        out.append(f"{command}-{code}-{seen[command]}")
    return out


@pytest.mark.parametrize(("command", "args", "code", "message"), FAILURES, ids=_ids())
def test_failure_exit_code_empty_stdout_and_nothing_left_behind(command, args, code, message, models, data,
                                                                 tmp_path) -> None:
    if code == 8 and command == "bench" and has_cuda():
        pytest.skip("this machine has a GPU")
    if command == "build" and HAS_TRT and has_cuda():
        pytest.skip("this machine can build engines")
    # What a user's folder could hold: earlier results at the -o paths, and the inputs the cases name.
    for name in ("out.pt", "out.onnx", "out.engine"):
        (tmp_path / name).write_bytes(SENTINEL)
    (tmp_path / "teacher.pt").write_bytes(models["pt"].read_bytes())
    (tmp_path / "in.pt").write_bytes(models["pt"].read_bytes())
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage that is not an ONNX protobuf")
    before = snapshot(tmp_path)
    argv = [command, *args(models, data, tmp_path)]
    if command != "env":
        argv.append("--json")
    scratch = tmp_path.parent / f"{tmp_path.name}-tmpdir"
    scratch.mkdir()
    proc = resopt(*argv, cwd=tmp_path, env={"TMPDIR": str(scratch)})
    assert leftovers(scratch) == [], "temporary files left in TMPDIR"
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "", "a failed command prints nothing on stdout, even with --json"
    assert message in proc.stderr
    if command != "env":  # typer's own usage errors print a usage block; ours are one line and a hint
        lines = proc.stderr.rstrip("\n").splitlines()
        errors = [i for i, ln in enumerate(lines) if ln.startswith("Error: ")]
        assert len(errors) == 1 and lines[errors[0]:] in ([lines[-1]], lines[-2:]), proc.stderr
        assert len(lines) == errors[0] + 1 or lines[-1].startswith("Hint: ")
        assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before, "a failed command must leave every file as it was, and add none"


def test_interrupted_training_leaves_the_old_output_and_only_its_resume_state(data, tmp_path) -> None:
    """Ctrl-C in the middle of training: the existing -o file is untouched; the only new file is the
    resume state (documented: the same command with --resume continues from it), never a partial .pt."""
    out = tmp_path / "out.pt"
    out.write_bytes(SENTINEL)
    base = {k: v for k, v in os.environ.items() if k != "RESOPT_DEBUG"}
    base["PYTHONPATH"] = str(REPO)
    # Epochs to spare and the per-image data path: the fast path finished 200 epochs of these few images
    # before the signal came.
    proc = subprocess.Popen([sys.executable, "-m", "resopt", "train", "--arch", "resnet20", "--width", "0.25",
                             "--epochs", "100000", "--data-path", "pil", "--batch-size", "16", "--data",
                             str(data["tiny"]), "-o", str(out)],
                            cwd=tmp_path, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # SIGINT as a terminal's Ctrl-C finds it, even when the suite runs as a background job
                            # (which starts with SIGINT ignored, inherited by the child).
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    resume = tmp_path / "out.pt.resume"
    deadline = time.monotonic() + 240
    while not resume.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert resume.exists(), "no epoch finished"
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and stdout == ""
    assert out.read_bytes() == SENTINEL
    assert sorted(snapshot(tmp_path)) == ["out.pt", "out.pt.resume"]


# ------------------------------------------------------------------------------------------ environment


def test_the_users_omp_wait_policy_wins(models, tmp_path) -> None:
    """Seen from the bench report (PASSIVE by default: test_success...[bench])."""
    proc = resopt("bench", models["int8"], "--batch-size", 1, "--threads", 1, "--warmup", 1, "--iters", 1,
                  "--min-time", 0, "--rounds", 1, "--json", cwd=tmp_path, env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert proc.returncode == 0, proc.stderr
    assert one_json_document(proc.stdout)["host"]["omp_wait_policy"] == "ACTIVE"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["distill", "prune"])
def test_under_torchrun_only_rank_0_prints(command, models, data, tmp_path) -> None:
    """Two gloo processes on the CPU: stdout is still exactly one JSON document, and one output file."""
    args = {"distill": ["--teacher", models["pt"], "--student", "resnet20", "--width", 0.25, "--epochs", 1],
            "prune": [models["pt"], "--sparsity", 0.5, "--finetune-epochs", 1]}[command]
    proc = resopt(command, *args, "--batch-size", 10, "--data", data["tiny"], "-o", tmp_path / "out.pt", "--json",
                  cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=600,
                  runner=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "resopt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_json_document(proc.stdout)  # two processes, one document
    assert sorted(snapshot(tmp_path)) == ["out.pt"]
