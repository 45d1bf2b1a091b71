"""``resopt optimize``: a multi-objective Optuna search over the recipes resopt has, measured on this machine.

Each trial is a chain of resopt's own library calls (``space.STEPS``: prune -> export -> quantize, then a
runtime), its intermediate files cached by content (``cache``), its numbers taken as ``measure`` says: val
top-1 on the validation split the lineage records (every choice is made there), latency at the study's batch
size with bench's worker under the per-host lock, and the file size. The study (``study``) lives in Optuna
storage, so a re-run resumes it and several processes or machines share it. At the end, the Pareto set of the
trials measured on this kind of host is measured once on the test split, and ``outputs`` writes ``DIR``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from resopt.console import log
from resopt.errors import InputFileError, ResoptError, UsageError, choice_error
from resopt.optimize.cache import Cache, cache_key
from resopt.optimize.measure import BenchSettings, device_key, host_facts, lock_path, measure_latency, val_top1
from resopt.optimize.space import QUANT_MODES, STEPS, Context, Planned, Space, describe_trial, sample_chain

__all__ = ["OBJECTIVES", "OptimizeConfig", "OptimizeResult", "optimize_model", "parse_duration"]

OBJECTIVES = ("latency", "size", "balanced")
DEFAULT_STUDY = "optimize"
STATE_FILE = "optimize.json"


def parse_duration(text: str | float | None) -> float | None:
    """``90``, ``90s``, ``30m``, ``1.5h`` -> seconds."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
        if not m:
            raise UsageError(f"--time-budget {text!r} is not a duration", hint="e.g. 600, 90s, 30m or 1.5h")
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if not seconds > 0:
        raise UsageError(f"--time-budget must be positive, got {text}")
    return seconds


@dataclass(frozen=True)
class OptimizeConfig:
    data: str
    out_dir: Path
    trials: int = 20
    time_budget: float | None = None  # seconds of this run; no new trial starts after it
    workers: int = 1
    storage: str | None = None  # None: sqlite:///DIR/study.db
    study: str = DEFAULT_STUDY
    objective: str = "latency"
    max_drop: float | None = None  # val top-1 points below the parent
    max_size: float | None = None  # MB (10**6 bytes)
    max_latency_ms: float | None = None
    device_key: str | None = None  # latencies of trials with this key share one front (default: the host's)
    space: Space = field(default_factory=Space)
    bench: BenchSettings = field(default_factory=BenchSettings)
    limit_per_class: int | None = None
    seed: int = 0
    num_calib: int = 64
    num_verify: int = 64
    lr: float = 0.01
    device: str = "auto"  # fine-tuning device

    def validate(self) -> None:
        from resopt.backends import ONNX_RUNTIMES, backend_available
        from resopt.quantize.ort import CALIB_METHODS

        if self.trials < 1:
            raise UsageError(f"--trials must be at least 1, got {self.trials}")
        if not 1 <= self.workers <= 64:
            raise UsageError(f"--workers must be in [1, 64], got {self.workers}")
        if self.objective not in OBJECTIVES:
            raise choice_error("objective", self.objective, OBJECTIVES)
        for flag, v in (("--max-drop", self.max_drop), ("--max-size", self.max_size),
                        ("--max-latency-ms", self.max_latency_ms)):
            if v is not None and not (v >= 0 if flag == "--max-drop" else v > 0):
                raise UsageError(f"{flag} must be {'>= 0' if flag == '--max-drop' else 'positive'}, got {v}")
        if not self.space.runtimes:
            raise UsageError("--runtime is empty; choose one or more of: " + ", ".join(ONNX_RUNTIMES))
        for r in self.space.runtimes:
            if r not in ONNX_RUNTIMES:
                raise choice_error("runtime", r, tuple(ONNX_RUNTIMES))
            if not backend_available(ONNX_RUNTIMES[r]) or (r == "openvino" and not _has_module("openvino")):
                from resopt.backends import runtime_record
                from resopt.errors import MissingDependencyError

                raise MissingDependencyError(f"--runtime {r} is not installed here", hint=runtime_record(r).hint)
        for m in self.space.quant_modes:
            if m not in QUANT_MODES:
                raise choice_error("quantization", m, QUANT_MODES)
        for m in self.space.calib_methods:
            if m not in CALIB_METHODS:
                raise choice_error("calibration method", m, CALIB_METHODS)
        for ratio in self.space.prune_ratios:
            if not 0 < ratio < 1:
                raise UsageError(f"--prune-ratios must be fractions in (0, 1), got {ratio}")
        for kept in self.space.target_macs:
            if not 0 < kept < 1:
                raise UsageError(f"--target-macs must be fractions of the parent's MACs in (0, 1), got {kept}")
        for e in self.space.finetune_epochs:
            if e < 0:
                raise UsageError(f"--finetune-epochs must be >= 0, got {e}")
        for n in self.space.blocks:
            if n < 1:
                raise UsageError(f"--blocks must be at least 1, got {n}")
        if not self.space.distill:
            raise UsageError("--distill needs on, off or on,off")
        if not self.space.quant_modes or not self.space.calib_methods or not self.space.finetune_epochs:
            raise UsageError("--quantize, --calib-methods and --finetune-epochs need at least one value each")
        if self.bench.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.bench.batch_size}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", self.study):
            raise UsageError(f"--study {self.study!r}: use letters, digits, '.', '_' and '-'")

    def context(self) -> Context:
        return Context(data=self.data, limit_per_class=self.limit_per_class, seed=self.seed, device=self.device,
                       num_calib=self.num_calib, num_verify=self.num_verify, lr=self.lr)


def _has_module(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None


@dataclass
class OptimizeResult:
    doc: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return self.doc


# ------------------------------------------------------------------------------------------------ a run


@dataclass
class Session:
    """One process's view of the study: the opened storage and what every trial of it needs."""

    cfg: OptimizeConfig
    model: Path
    model_sha: str
    kind: str
    study: Any
    storage: Any
    url: str
    heartbeat: bool
    cache: Cache
    parent_val: float
    facts: dict[str, Any]
    key: str

    @property
    def ask_lock(self) -> Path:
        """The lock file of ``study.study_lock`` where the storage has no lock of its own: next to a journal
        file (every process of the study reaches it), else in DIR's cache (the processes of this DIR)."""
        if self.cfg.storage is not None and "://" not in self.cfg.storage:
            journal = Path(self.cfg.storage)
            return journal.with_name(f".{journal.name}.ask.lock")
        return self.cache.root / "ask.lock"


def _state_file_check(cfg: OptimizeConfig, url: str) -> None:
    """A DIR holds one study: refuse another study or storage there."""
    state = cfg.out_dir / STATE_FILE
    if not state.exists():
        return
    try:
        doc = json.loads(state.read_text())
    except (OSError, json.JSONDecodeError):
        raise InputFileError(f"{state} is not an optimize state file", hint="give a new -o folder") from None
    if (doc.get("study"), doc.get("storage")) != (cfg.study, url):
        raise UsageError(f"{cfg.out_dir} holds study {doc.get('study')!r} in {doc.get('storage')}, not study "
                         f"{cfg.study!r} in {url}",
                         hint="give another -o folder, or that study's --storage and --study")


def _open(cfg: OptimizeConfig, model: Path, *, claim: bool) -> Session:
    from resopt.artifacts import artifact_kind, require_regular, sha256_file
    from resopt.optimize.study import check_model, open_storage, open_study

    require_regular(model, "model")
    # Absolute: distillation names the parent in the lineage, and commands.sh runs from any folder.
    model = model.resolve()
    kind = artifact_kind(model)
    if kind not in ("pt", "onnx"):
        raise InputFileError(f"{model} is a .{kind} file; optimize takes a .pt checkpoint or an .onnx model")
    # Read the model before DIR or the study exist: a file that is not one resopt can measure leaves nothing.
    from resopt.kinds import read_artifact_info

    if read_artifact_info(model).preprocess is None:
        raise InputFileError(f"{model} records no preprocessing; optimize cannot measure its top-1",
                             hint="export it with `resopt export`, or stamp it with `resopt import`")
    sha = sha256_file(model)
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file; give a folder for the study and its results")
    default_url = f"sqlite:///{(out / 'study.db').resolve()}"
    if cfg.storage is None and claim:
        _state_file_check(cfg, default_url)
    if cfg.storage is None:
        out.mkdir(parents=True, exist_ok=True)
    storage, url, beat = open_storage(cfg.storage, out)
    if claim:
        _state_file_check(cfg, url)
    seed = cfg.seed + os.getpid()  # each process samples its own startup trials: no two workers propose the same
    study = open_study(storage, cfg.study, seed=seed)
    check_model(study, model, sha, url)
    out.mkdir(parents=True, exist_ok=True)
    if claim:
        from resopt.artifacts import write_text_atomic

        write_text_atomic(out / STATE_FILE, json.dumps({"study": cfg.study, "storage": url, "model": model.name,
                                                        "model_sha256": sha}, indent=2) + "\n", commit=False)
    cache = Cache(out / "cache")
    facts = host_facts(cfg.bench.threads)
    key = cfg.device_key or device_key(facts)
    ctx = cfg.context()
    parent_val = cache.value(hashlib.sha256(f"{sha} parent-val {json.dumps(asdict(ctx), sort_keys=True)}".encode())
                             .hexdigest(), lambda: _parent_val(model, kind, cfg))["val_top1"]
    if claim and not study.user_attrs.get("parent_val_top1"):
        study.set_user_attr("parent_val_top1", parent_val)
    return Session(cfg, model, sha, kind, study, storage, url, beat, cache, float(parent_val), facts, key)


def _parent_val(model: Path, kind: str, cfg: OptimizeConfig) -> dict[str, Any]:
    # A .pt parent runs in PyTorch, an .onnx one on onnxruntime: the reference the drop is measured against.
    top1, n = val_top1(model, None, data=cfg.data, limit_per_class=cfg.limit_per_class, seed=cfg.seed,
                       threads=cfg.bench.threads)
    log(f"optimize: parent {model.name}: val top-1 {top1:.2f}% ({n} validation images)")
    return {"val_top1": top1, "val_images": n}


def run_trial(s: Session, trial: Any) -> tuple[float, float, int]:
    """One trial: sample a chain, produce it (cached), measure it; returns the three objective values."""
    from resopt.artifacts import sha256_file

    cfg, ctx = s.cfg, s.cfg.context()
    chain, runtime = sample_chain(trial, cfg.space, s.kind)
    trial.set_user_attr("chain", [asdict(p) for p in chain])
    trial.set_user_attr("runtime", runtime)
    path, sha = s.model, s.model_sha
    files = []
    for planned in chain:
        step = next(st for st in STEPS if st.name == planned.step)
        recipe = step.recipe(planned.recipe)
        if recipe.produce is None:
            continue
        key = cache_key(sha, planned.step, planned.recipe, planned.options, ctx)
        parent = path
        produce = recipe.produce

        def make(out: Path, parent: Path = parent, produce: Any = produce, planned: Planned = planned) -> None:
            produce(parent, out, planned.options, ctx)

        path, hit = s.cache.artifact(key, f"{planned.step}-{planned.recipe}{recipe.suffix}", make)
        sha = sha256_file(path)
        files.append({"step": planned.step, "file": str(path), "sha256": sha, "cached": hit})
    trial.set_user_attr("files", files)
    trial.set_user_attr("artifact", str(path))
    trial.set_user_attr("sha256", sha)
    val = s.cache.value(hashlib.sha256(f"{sha} {runtime} val {cfg.limit_per_class} {cfg.seed}".encode()).hexdigest(),
                        lambda: dict(zip(("val_top1", "val_images"), val_top1(
                            path, runtime, data=cfg.data, limit_per_class=cfg.limit_per_class, seed=cfg.seed,
                            threads=cfg.bench.threads), strict=True)))
    size = path.stat().st_size
    intervals: list[list[float]] = []
    lat = measure_latency(path, runtime, cfg.bench, lock=lock_path(), intervals=intervals)
    drop = s.parent_val - float(val["val_top1"])
    constraints = [drop - cfg.max_drop if cfg.max_drop is not None else 0.0,
                   size / 1e6 - cfg.max_size if cfg.max_size is not None else 0.0,
                   lat["latency_ms"] - cfg.max_latency_ms if cfg.max_latency_ms is not None else 0.0]
    for k, v in {**val, **lat, "size_bytes": size, "drop": round(drop, 3), "bench_lock": intervals,
                 "constraints": constraints, "batch_size": cfg.bench.batch_size}.items():
        trial.set_user_attr(k, v)
    for name, c in zip(("max_drop", "max_size", "max_latency_ms"), constraints, strict=True):
        trial.set_constraint(name, c)
    return float(val["val_top1"]), float(lat["latency_ms"]), int(size)


def work(cfg: OptimizeConfig, model: Path, *, worker: int = 0, session: Session | None = None,
         started: float | None = None) -> dict[str, int]:
    """Run trials until the study holds ``cfg.trials`` COMPLETE ones (counting those running now) or the time
    budget is spent; returns this process's counts."""
    from optuna.trial import TrialState

    from resopt.optimize.outputs import best_so_far
    from resopt.optimize.study import fail_dead_trials, heartbeat, process_started, requeue, study_lock

    s = session or _open(cfg, model, claim=False)
    t_start = started if started is not None else time.time()
    deadline = None if cfg.time_budget is None else t_start + cfg.time_budget
    done = failed = 0
    pid_started = process_started()
    while True:
        with study_lock(s.storage, cfg.study, s.ask_lock):
            retried = fail_dead_trials(s.study, s.storage, s.heartbeat)
            if retried:
                log(f"optimize: trial{'s' * (len(retried) > 1)} {', '.join(f'#{n}' for n in retried)} lost "
                    f"{'their' if len(retried) > 1 else 'its'} worker: marked failed, queued again")
            trials = s.study.get_trials(deepcopy=False)
            complete = sum(t.state == TrialState.COMPLETE for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if complete + running >= cfg.trials:
                break
            if deadline is not None and time.time() >= deadline:
                log(f"optimize: the time budget ({cfg.time_budget:g} s) is spent; {complete} of {cfg.trials} "
                    f"trials finished (run the command again to continue)")
                break
            if failed >= max(3, cfg.trials):
                log(f"optimize: {failed} trials failed in this run; stopping (see trials.csv, column error)")
                break
            trial = _ask_new(s, trials)
            for k, v in {**s.facts, "pid": os.getpid(), "pid_started": pid_started, "worker": worker,
                         "device_key": s.key}.items():
                trial.set_user_attr(k, v)
        t0 = time.time()
        try:
            with heartbeat(s.storage, s.study, trial, s.heartbeat):
                values = run_trial(s, trial)
        except ResoptError as e:
            # This recipe cannot be made (nothing left to prune, a verification failed): a failed trial, not a
            # result, and not retried.
            trial.set_user_attr("error", e.message)
            s.study.tell(trial, state=TrialState.FAIL)
            failed += 1
            log(f"optimize: trial #{trial.number} failed: {e.message}")
            continue
        except BaseException:
            # Ctrl-C, SIGTERM, a bug: the trial is failed and queued again, never counted.
            s.study.tell(trial, state=TrialState.FAIL)
            requeue(s.study, trial.params, trial.number)
            raise
        trial.set_user_attr("seconds", round(time.time() - t0, 2))
        frozen = s.study.tell(trial, list(values))
        done += 1
        complete_now = sum(t.state == TrialState.COMPLETE for t in s.study.get_trials(deepcopy=False))
        best, front = best_so_far(s.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), cfg, s.key)
        a = frozen.user_attrs
        best_text = f"#{best.number} {_point(best)}" if best is not None else "none within the constraints yet"
        log(f"optimize: trial {complete_now} of {cfg.trials} (#{frozen.number}, {describe_trial(frozen.user_attrs)}): "
            f"{_point(frozen)}{' (drop ' + format(a['drop'], '.2f') + ')' if 'drop' in a else ''}; "
            f"{time.time() - t_start:.0f} s elapsed; best ({cfg.objective}) {best_text}; front {front}")
    return {"finished": done, "failed": failed}


MAX_REPEATS = 20


def _ask_new(s: Session, trials: list[Any]) -> Any:
    """The next trial, with a recipe no finished or running trial has: a repeat is told PRUNED (kept in the
    study as the sampler's record, never counted as a result) and the sampler asked again; after
    ``MAX_REPEATS`` repeats in a row (a small space, exhausted) the repeat is measured again."""
    from optuna.trial import TrialState

    seen = [t.params for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)]
    for _ in range(MAX_REPEATS):
        trial = s.study.ask()
        sample_chain(trial, s.cfg.space, s.kind)  # fixes the trial's parameters; run_trial reads them back
        if trial.params not in seen:
            return trial
        trial.set_user_attr("repeat", True)
        s.study.tell(trial, state=TrialState.PRUNED)
    return trial


def _point(t: Any) -> str:
    v = t.values
    return f"val {v[0]:.2f}%, {v[1]:.3g} ms, {v[2] / 1e3:.1f} kB"


def _worker_entry(cfg: OptimizeConfig, model: Path, worker: int, started: float) -> None:
    import contextlib

    with contextlib.suppress(KeyboardInterrupt):
        work(cfg, model, worker=worker, started=started)


def optimize_model(model: Path, cfg: OptimizeConfig) -> OptimizeResult:
    """Search, then write DIR (see the module doc); the command's work."""
    from resopt.optimize.outputs import finish

    cfg.validate()
    model = Path(model)
    cfg = replace(cfg, out_dir=Path(cfg.out_dir))
    t0 = time.time()
    s = _open(cfg, model, claim=True)
    log(f"optimize: study {cfg.study!r} in {s.url}: {len(s.study.trials)} trials so far; host "
        f"{platform.node()} ({s.facts['cpu']}, {s.facts['threads']} threads, key {s.key})")
    if not s.study.trials:
        from resopt.optimize.space import baseline_params

        s.study.enqueue_trial(baseline_params(cfg.space, s.kind), user_attrs={"baseline": True})
    procs = []
    if cfg.workers > 1:
        ctx = multiprocessing.get_context("spawn")
        for i in range(1, cfg.workers):
            p = ctx.Process(target=_worker_entry, args=(cfg, model, i, t0), name=f"resopt-optimize-{i}")
            p.start()
            procs.append(p)
    try:
        counts = work(cfg, model, worker=0, session=s, started=t0)
    except BaseException:
        import signal

        for p in procs:  # Ctrl-C reaches the whole process group, SIGTERM or a test's signal only this one
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGINT)
        raise
    finally:
        for p in procs:
            p.join()
    return OptimizeResult(finish(s, counts, seconds=time.time() - t0))
