"""Everything resopt says besides results goes to stderr, through here.

Library code logs and shows progress with these helpers; results (tables, JSON) are printed by the CLI to
stdout only. Progress bars are drawn only when stderr is a terminal; otherwise long work reports a plain
line now and then (so CI logs show progress without escape codes), and ``RESOPT_QUIET=1`` silences logs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def err_console() -> Any:
    from rich.console import Console

    # soft_wrap: log lines stay whole in CI logs instead of being folded at 80 columns.
    return Console(stderr=True, highlight=False, soft_wrap=True)


def quiet() -> bool:
    return os.environ.get("RESOPT_QUIET", "") not in ("", "0")


def log(message: str) -> None:
    """A line of chatter on stderr (markup allowed)."""
    if not quiet():
        err_console().print(message)


def warn(message: str) -> None:
    err_console().print(f"[yellow]Warning:[/yellow] {message}")


def interactive() -> bool:
    return sys.stderr.isatty() and not quiet()


class _Task:
    def __init__(self, progress: Any, task_id: Any, total: int | None, description: str) -> None:
        self._progress, self._id, self.total, self.description = progress, task_id, total, description
        self.done = 0
        self._last_line = time.monotonic()

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._id, advance=n, **({"info": _fmt(fields)} if fields else {}))
        elif not quiet() and time.monotonic() - self._last_line > 30:
            # Non-interactive: a line at most every 30 s keeps long CI runs visibly alive.
            self._last_line = time.monotonic()
            total = f"/{self.total}" if self.total else ""
            print(f"  {self.description}: {self.done}{total} {_fmt(fields)}", file=sys.stderr, flush=True)

    def set_info(self, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._id, info=_fmt(fields))


def _fmt(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[_Task]:
    """A progress bar on stderr when it is a terminal; a silent counter otherwise."""
    if not interactive():
        yield _Task(None, None, total, description)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=err_console(), transient=True) as prog:
        task_id = prog.add_task(description, total=total, info="")
        yield _Task(prog, task_id, total, description)
