"""The Optuna study behind ``resopt optimize``: where it is stored, which model it belongs to, and the trials
that died.

Storage: ``DIR/study.db`` (SQLite) by default; ``--storage`` takes any URL Optuna's RDB storage takes
(``postgresql://``, ``mysql://``, ``sqlite:///``) or a path, which is a journal file (``JournalFileBackend``,
for a shared file system without a database server). RDB storages get Optuna's heartbeat, so a trial whose
worker was killed on any machine goes stale, is failed and re-queued (``RetryFailedTrialCallback``); on every
storage a trial left RUNNING by a process of this host that no longer exists is failed and re-queued too.
A failed trial is never counted as a result: ``--trials N`` counts COMPLETE trials.
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resopt.errors import MissingDependencyError, UsageError

DIRECTIONS = ("maximize", "minimize", "minimize")  # val top-1, latency (ms), file size (bytes)
OBJECTIVES = ("val_top1", "latency_ms", "size_bytes")
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120


@dataclass
class Opened:
    study: Any
    storage: Any
    url: str  # what is shown and recorded (a journal path, or the URL without its password)
    heartbeat: bool


def _shown(url: str) -> str:
    """The URL without a password."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return url


def open_storage(spec: str | None, out_dir: Path) -> tuple[Any, str, bool]:
    """(storage, shown URL, heartbeat) for ``--storage`` (None: ``DIR/study.db``)."""

    quiet_optuna()
    if spec is None:
        spec = f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"
    if "://" not in spec:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(spec)
        if not path.parent.is_dir():
            raise UsageError(f"--storage {spec}: folder {path.parent} does not exist",
                             hint="a journal file on a file system every worker can reach, e.g. /shared/r56.journal")
        try:
            return JournalStorage(JournalFileBackend(str(path))), str(path), False
        except OSError as e:
            raise UsageError(f"--storage {spec}: cannot open the journal file ({e.strerror or e})") from None
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs: dict[str, Any] = {}
    if spec.startswith("sqlite"):
        # Several local workers write one SQLite file: wait for its lock instead of failing at once.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        storage = RDBStorage(spec, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3), **kwargs)
    except ImportError as e:  # Optuna re-raises SQLAlchemy's missing driver as a plain ImportError
        cause = e.__cause__ if isinstance(e.__cause__, ModuleNotFoundError) else e
        name = getattr(cause, "name", None) or "for this URL"
        raise MissingDependencyError(f"--storage {_shown(spec)} needs the database driver {name!r}",
                                     hint="pip install 'psycopg[binary]' (PostgreSQL) or pymysql (MySQL)") from None
    except Exception as e:  # sqlalchemy's OperationalError / ArgumentError: unreachable, refused, malformed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--storage {_shown(spec)} cannot be reached: {first[:200]}",
                         hint="check the URL, that the server runs and accepts this user, and the network") from None
    return storage, _shown(spec), True


def quiet_optuna() -> None:
    """Optuna's chatter off stderr: its INFO lines, and its warnings about features resopt uses on purpose
    (heartbeats with ask-and-tell, experimental callbacks)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


def open_study(storage: Any, name: str, *, seed: int) -> Any:
    import optuna

    quiet_optuna()
    # Constraints are set on each trial (Trial.set_constraint): TPE prefers feasible trials.
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    try:
        return optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS),  # type: ignore[arg-type]
                                   sampler=sampler,
                                   load_if_exists=True)
    except ValueError as e:
        raise UsageError(f"study {name!r} exists with other objectives: {e}",
                         hint="choose another --study name") from None


def check_model(study: Any, model: Path, sha: str, url: str) -> None:
    """Refuse to add trials of one model to a study created for another; claim a new study for this one."""
    attrs = study.user_attrs
    if "model_sha256" not in attrs:
        study.set_user_attr("model_sha256", sha)
        study.set_user_attr("model", Path(model).name)
        return
    if attrs["model_sha256"] != sha:
        raise UsageError(f"study {study.study_name!r} in {url} was created for {attrs.get('model')} (sha256 "
                         f"{attrs['model_sha256']}), not {Path(model).name} (sha256 {sha})",
                         hint="give another --study name, or the model the study was made for")


def pid_alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return started is None or abs(proc.create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def fail_dead_trials(study: Any, storage: Any, heartbeat: bool) -> list[int]:
    """Fail and re-queue the RUNNING trials whose worker is gone; returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    failed: list[int] = []
    if heartbeat:
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        failed += sorted(before - after)
    host = platform.node()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        if a.get("host") != host or "pid" not in a or pid_alive(int(a["pid"]), a.get("pid_started")):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), t.number)
        if storage.set_trial_state_values(trial_id, TrialState.FAIL):
            requeue(study, t.params, t.number)
            failed.append(t.number)
    return failed


def requeue(study: Any, params: dict[str, Any], number: int) -> None:
    if params:
        study.enqueue_trial(params, user_attrs={"retry_of": number}, skip_if_exists=False)


@contextlib.contextmanager
def heartbeat(storage: Any, study: Any, trial: Any, enabled: bool) -> Iterator[None]:
    """Record the trial's heartbeat every few seconds while it runs (the ask-and-tell loop has no thread of
    Optuna's own for it), so that a killed worker's trial goes stale on every machine."""
    if not enabled:
        yield
        return
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                               trial.number)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, daemon=True, name="resopt-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2)


@contextlib.contextmanager
def ask_lock(path: Path) -> Iterator[None]:
    """Local workers count the study's trials and ask for the next one under this lock, so that together
    they start no more trials than ``--trials`` needs."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def study_lock(storage: Any, study_name: str, path: Path) -> Iterator[None]:
    """``ask_lock`` for every process of the study: on PostgreSQL a session advisory lock (MySQL: GET_LOCK)
    named after the study, so that workers on several machines count and ask one at a time too; on SQLite or
    a journal file, the lock file ``path``."""
    engine = getattr(storage, "engine", None)
    dialect = getattr(getattr(engine, "dialect", None), "name", "")
    if engine is None or dialect not in ("postgresql", "mysql"):
        with ask_lock(path):
            yield
        return
    import hashlib

    from sqlalchemy import text

    name = f"resopt-optimize-ask:{study_name}"
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        if dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        else:
            conn.execute(text("SELECT GET_LOCK(:n, -1)"), {"n": name[:64]})
        try:
            yield
        finally:
            if dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            else:
                conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name[:64]})


def process_started() -> float:
    import psutil

    return float(psutil.Process(os.getpid()).create_time())
