"""``resopt optimize``: a real search on the session's narrow ResNet-20 and real CIFAR-10 images.

The expectations come from outside the code under test: the README's exit codes and error lines (literals),
the Pareto front recomputed by brute force over every pair of trials, sha256 computed here with hashlib,
lock intervals checked pairwise, image counts from how ``cifar_small`` is cut (40 train images per class,
10% held out for val: 40 val images; 20 test images per class: 200), and physical facts the tests make true
(a signal sent while a trial is RUNNING, a second process on the same journal file, a folder that cannot
exist).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_captured

REPO = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", 4, "--threads", 1, "--min-time", 0, "--rounds", 1, "--num-calib", 32]
VAL_IMAGES = 40  # cifar_small: 10% of 40 train images per class held out, 10 classes
TEST_IMAGES = 200  # cifar_small: 20 test images per class


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RESOPT_DEBUG", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(REPO)
    env["RESOPT_BENCH_LOCK"] = str(tmp / "bench.lock")  # the host lock, shared by every process of the test
    return env


def _popen(args: list[object], tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "resopt", "optimize", *map(str, args)], cwd=tmp, env=_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _trials(storage: str, study: str = "optimize") -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "://" not in storage:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        st = JournalStorage(JournalFileBackend(storage))
        return optuna.load_study(study_name=study, storage=st).get_trials()
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def _no_overlap(trials: list) -> list[list[float]]:
    intervals = sorted(iv for t in trials for iv in t.user_attrs.get("bench_lock", []))
    for (a0, a1), (b0, b1) in zip(intervals, intervals[1:], strict=False):
        assert a1 <= b0, f"bench lock held twice at once: [{a0}, {a1}] and [{b0}, {b1}]"
    return intervals


def _nondominated(rows: list[dict]) -> set[int]:
    """Brute force: a row is on the front when no other row is at least as good in all three and better in one."""
    def key(r: dict) -> tuple[float, float, float]:
        return -float(r["val_top1"]), float(r["latency_ms"]), float(r["size_bytes"])

    front = set()
    for r in rows:
        if not any(all(x <= y for x, y in zip(key(o), key(r), strict=True)) and key(o) != key(r) for o in rows):
            front.add(int(r["number"]))
    return front


MAX_DROP = 5.0


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory, trained_pt: Path, cifar_small: Path) -> dict:
    """One search of 4 trials on the .pt (prune: none, l1-struct or block, fine-tuned with or without the parent
    distilling; quantize: none or INT8), shared by the tests that read its DIR."""
    out = tmp_path_factory.mktemp("optimize") / "opt"
    os.environ["RESOPT_BENCH_LOCK"] = str(out.parent / "bench.lock")
    try:
        code, stdout, stderr = run_captured(
            "optimize", trained_pt, "--data", cifar_small, "--trials", 4, "--runtime", "ort", "--prune-ratios", 0.5,
            "--blocks", 1, "--finetune-epochs", 1, "--distill", "on,off", "--quantize", "none,int8",
            "--calib-methods", "minmax", "--max-drop", MAX_DROP, *FAST, "-o", out, "--json")
    finally:
        os.environ.pop("RESOPT_BENCH_LOCK")
    assert code == 0, stderr
    return {"out": out, "doc": json.loads(stdout), "stderr": stderr, "model": trained_pt, "data": cifar_small}


def test_search_writes_the_promised_files(search, cli) -> None:
    out, doc = search["out"], search["doc"]
    for name in ("study.db", "best.onnx", "best.json", "trials.csv", "commands.sh", "report.md", "report.html"):
        assert (out / name).is_file(), name
    assert list((out / "plots").glob("*.png"))
    rows = list(csv.DictReader((out / "trials.csv").open()))
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(complete) == 4 and doc["trials"]["complete"] == 4
    assert len({(r["recipe"], r["runtime"]) for r in complete}) == 4, "a recipe was measured twice"
    # Progress on stderr: trial n of N for each finished trial.
    for n in range(1, 5):
        assert f"optimize: trial {n} of 4 " in search["stderr"]
    # --max-drop: a trial more than MAX_DROP val points below the parent is infeasible, never on the front.
    parent = doc["parent_val_top1"]
    for r in complete:
        assert r["feasible"] == str(int(parent - float(r["val_top1"]) <= MAX_DROP + 1e-6)), r
    feasible = [r for r in complete if r["feasible"] == "1"]
    # The front, recomputed by brute force over the feasible finished trials.
    front = _nondominated(feasible)
    assert {int(r["number"]) for r in complete if r["pareto"] == "1"} == front
    assert sorted(p["trial"] for p in doc["pareto"]) == sorted(front)
    assert all(p["drop"] <= MAX_DROP for p in doc["pareto"]) and doc["best"]["drop"] <= MAX_DROP
    # --objective latency: the fastest point of the front.
    fastest = min((r for r in complete if int(r["number"]) in front), key=lambda r: float(r["latency_ms"]))
    assert doc["best"]["trial"] == int(fastest["number"])
    assert hashlib.sha256((out / "best.onnx").read_bytes()).hexdigest() == doc["best"]["sha256"]
    # Every Pareto artifact is a resopt file with its whole lineage.
    files = sorted((out / "pareto").glob("*.onnx"))
    assert len(files) == len(front)
    for f in files:
        r = cli("info", f, "--json")
        assert r.code == 0, r.stderr
        steps = [s["command"] for s in r.json()["lineage"]]
        assert steps[0] == "train" and "export" in steps


def test_val_chooses_and_test_is_measured_once_on_the_front(search) -> None:
    trials = _trials(f"sqlite:///{search['out'] / 'study.db'}")
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert {t.user_attrs["val_images"] for t in done} == {VAL_IMAGES}
    benches = [json.loads(p.read_text()) for p in search["out"].glob("bench.*.json")]
    rows = [m for b in benches for m in b["models"]]
    assert len(rows) == len(search["doc"]["pareto"])
    assert {m["accuracy"]["images"] for m in rows} == {TEST_IMAGES}
    assert {m["accuracy"]["split"] for m in rows} == {"test"}


def test_trials_store_host_facts_and_never_overlap_on_the_bench_lock(search) -> None:
    import onnxruntime

    done = [t for t in _trials(f"sqlite:///{search['out'] / 'study.db'}") if t.state.name == "COMPLETE"]
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    for t in done:
        a = t.user_attrs
        assert a["threads"] == 1 and a["versions"]["onnxruntime"] == onnxruntime.__version__
        assert ("AVX2" in a["isa"]) == ("avx2" in flags)  # resopt env names it AVX2
        assert len(a["bench_lock"]) == 1
    assert len(_no_overlap(done)) == 4


def test_commands_reproduce_the_best(search, cli, tmp_path, monkeypatch) -> None:
    best = json.loads((search["out"] / "best.json").read_text())
    monkeypatch.chdir(tmp_path)
    made = None
    for line in best["commands"]:
        argv = shlex.split(line)
        assert argv[0] == "resopt"
        if argv[1] == "bench":
            continue
        r = cli(*argv[1:])
        assert r.code == 0, r.stderr
        made = tmp_path / argv[argv.index("-o") + 1]
    from resopt.artifacts import read_onnx_meta

    assert made is not None  # a .pt model's chain always exports
    mine = made
    theirs = read_onnx_meta(search["out"] / "best.onnx")["lineage"]
    again = read_onnx_meta(mine)["lineage"]
    assert [s["command"] for s in again] == [s["command"] for s in theirs]
    for a, b in zip(again, theirs, strict=True):
        assert a["options"] == b["options"], a["command"]
        if a["command"] == "prune":
            assert a["metrics"]["val_top1"] == b["metrics"]["val_top1"]
    import onnx
    from onnx import numpy_helper

    def weights(p: Path) -> dict:
        return {i.name: numpy_helper.to_array(i).tobytes() for i in onnx.load(str(p)).graph.initializer}

    assert weights(mine) == weights(search["out"] / "best.onnx")
    from resopt.optimize.measure import val_top1

    top1, n = val_top1(mine, best["runtime"], data=str(search["data"]), limit_per_class=None, seed=0, threads=1)
    assert n == VAL_IMAGES and round(top1, 3) == best["val_top1"]


def _running(path: Path, after: int) -> list[int]:
    """RUNNING trials >= ``after`` that a process runs (not one the sampler proposed twice, told PRUNED at once),
    read from the SQLite file read-only: opening it through Optuna would create its tables, racing the
    process that is creating them."""
    import sqlite3

    if not path.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute("SELECT t.number FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                               "WHERE t.state = 'RUNNING' AND a.key = 'device_key' AND t.number >= ? ORDER BY t.number",
                               (after,)).fetchall()
        finally:
            con.close()
    except sqlite3.Error:  # the tables are not there yet, or the database is locked for a moment
        return []
    return [r[0] for r in rows]


def _wait_running(db: str, proc: subprocess.Popen, *, after: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    path = Path(db.removeprefix("sqlite:///"))
    while time.monotonic() < deadline and proc.poll() is None:
        running = _running(path, after)
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError(f"no trial >= {after} started; {proc.communicate()[1][-2000:]}")


def test_interrupted_and_killed_trials_are_retried_never_counted(r20_onnx_session, cifar_small, tmp_path) -> None:
    out = tmp_path / "opt"
    db = f"sqlite:///{out / 'study.db'}"
    args = [r20_onnx_session, "--data", cifar_small, "--trials", 2, "--runtime", "ort", "--quantize",
            "none,fp16,int8", "--calib-methods", "minmax,percentile", *FAST, "-o", out]
    first = _popen(args, tmp_path)
    n = _wait_running(db, first, after=1)
    first.send_signal(signal.SIGINT)  # in the middle of trial n
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    second = _popen(args, tmp_path)
    m = _wait_running(db, second, after=n + 1)
    second.kill()  # SIGKILL: nothing of the process runs; the trial is left RUNNING
    second.communicate(timeout=60)
    third = _popen(args, tmp_path)
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    trials = _trials(db)
    by_number = {t.number: t for t in trials}
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert sorted(t.number for t in failed) == [n, m]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 2
    # Each lost trial was queued again with its parameters; the kill's retry finished.
    retries = {t.user_attrs.get("retry_of"): t for t in trials if "retry_of" in t.user_attrs}
    assert retries[n].params == by_number[n].params and retries[n].number == m
    assert retries[m].params == by_number[m].params and retries[m].state.name == "COMPLETE"


POSTGRES = os.environ.get("RESOPT_TEST_POSTGRES")


@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_two_processes_share_one_study_without_sharing_the_bench(kind, r20_onnx_session, cifar_small,
                                                                 tmp_path) -> None:
    if kind == "postgres" and not POSTGRES:
        # .ci/run starts a PostgreSQL server and sets RESOPT_TEST_POSTGRES: in CI a missing server is a failure.
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but RESOPT_TEST_POSTGRES (a PostgreSQL URL) is not set; .ci/run starts the "
                        "server and sets it", pytrace=False)
        pytest.skip("RESOPT_TEST_POSTGRES (a PostgreSQL URL, e.g. postgresql://resopt:resopt@localhost/resopt) "
                    "is not set; CI sets it")
    storage = str(tmp_path / "study.journal") if kind == "journal" else str(POSTGRES)
    study = f"shared-{os.getpid()}-{int(time.time())}"
    procs = [_popen([r20_onnx_session, "--data", cifar_small, "--trials", 4, "--runtime", "ort", "--quantize",
                     "none,fp16,int8", "--calib-methods", "minmax,percentile", *FAST, "--storage", storage,
                     "--study", study, "-o", tmp_path / f"host{i}"], tmp_path) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    trials = _trials(storage, study)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 4
    assert len({t.user_attrs["pid"] for t in complete}) == 2, "both processes ran trials"
    _no_overlap(complete)


def test_infeasible_constraint_is_exit_7_naming_the_closest_trial(r20_onnx_session, cifar_small, cli,
                                                                  tmp_path) -> None:
    out = tmp_path / "opt"
    r = cli("optimize", r20_onnx_session, "--data", cifar_small, "--trials", 2, "--runtime", "ort", "--quantize",
            "none,int8", "--calib-methods", "minmax", *FAST, "--max-size", 0.001, "-o", out)
    assert r.code == 7, r.stderr
    rows = list(csv.DictReader((out / "trials.csv").open()))
    smallest = min((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: int(r["size_bytes"]))
    first = r.stderr.splitlines()[[i for i, ln in enumerate(r.stderr.splitlines()) if ln.startswith("Error:")][0]]
    assert first.startswith("Error: no trial meets the constraints (--max-size 0.001); closest: "
                            f"trial #{smallest['number']} ")
    assert not (out / "pareto").exists() and not (out / "best.onnx").exists()

    # The same DIR: another study there, or this study with another model, is refused and nothing changes.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = cli("optimize", r20_onnx_session, "--data", cifar_small, "--study", "other", "-o", out)
    assert r.code == 2 and r.stderr.startswith(f"Error: {out} holds study 'optimize' in sqlite:///"), r.stderr
    other = tmp_path / "other.onnx"
    import onnx

    m = onnx.load(str(r20_onnx_session))
    m.doc_string = "another model"
    onnx.save(m, str(other))
    r = cli("optimize", other, "--data", cifar_small, "-o", out)
    want = hashlib.sha256(other.read_bytes()).hexdigest()
    have = hashlib.sha256(r20_onnx_session.read_bytes()).hexdigest()
    assert r.code == 2, r.stderr
    assert r.stderr.startswith(f"Error: study 'optimize' in sqlite:///{(out / 'study.db').resolve()} was created "
                               f"for r20.onnx (sha256 {have}), not other.onnx (sha256 {want})"), r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_runtime_and_unreachable_storage_are_one_line_exit_2(r20_onnx_session, cifar_small, cli,
                                                                 tmp_path) -> None:
    r = cli("optimize", r20_onnx_session, "--data", cifar_small, "--runtime", "ort,tensorrt-cpu", "-o",
            tmp_path / "a")
    assert r.code == 2
    assert r.stderr.splitlines()[0] == "Error: unknown runtime 'tensorrt-cpu'; choose one of: ort, openvino"
    assert not (tmp_path / "a").exists()
    r = cli("optimize", r20_onnx_session, "--data", cifar_small, "--storage",
            f"sqlite:///{tmp_path}/no/such/folder/s.db", "-o", tmp_path / "b")
    assert r.code == 2
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"Error: --storage sqlite:///{tmp_path}/no/such/folder/s.db cannot be reached: ")
    assert len(lines) == 2 and lines[1].startswith("Hint: ")
    assert not (tmp_path / "b").exists()
