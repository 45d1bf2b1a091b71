"""The content-addressed cache of a study's intermediate artifacts, in ``DIR/cache/``.

A key is the sha256 of (parent file's sha256, step, recipe, options, the chain's fixed settings): trials that
share a pruned, fine-tuned parent reuse it for every quantization and runtime they try. Concurrent workers
are safe: each key is produced under its own lock file (the second worker waits, then finds the file), and
the library writes its output atomically, so a file under its key is always complete. Small JSON results
(a val top-1 per file and runtime) are kept the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from resopt.optimize.space import Context


def cache_key(parent_sha256: str, step: str, recipe: str, options: dict[str, Any], ctx: Context) -> str:
    doc = {"parent": parent_sha256, "step": step, "recipe": recipe, "options": options, "context": asdict(ctx)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with open(self.root / f".{key[:32]}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def artifact(self, key: str, name: str, make: Callable[[Path], None]) -> tuple[Path, bool]:
        """The file under ``key`` (``<key[:12]>.<name>``), made by ``make(path)`` when missing; and whether it
        was already there."""
        from resopt.artifacts import reset_outputs_placed

        path = self.root / f"{key[:12]}.{name}"
        with self._locked(key):
            if path.exists():
                return path, True
            make(path)
            # An intermediate, not the command's result: Ctrl-C must still stop the search after it (the CLI
            # defers signals once a result is in place).
            reset_outputs_placed()
        return path, False

    def value(self, key: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A small JSON result under ``key``, computed by ``make()`` when missing."""
        from resopt.artifacts import write_text_atomic

        path = self.root / f"{key[:12]}.json"
        with self._locked(key):
            if path.exists():
                return dict(json.loads(path.read_text()))
            doc = make()
            write_text_atomic(path, json.dumps(doc, sort_keys=True), commit=False)
        return doc
