"""What the benchmark scripts (bench_cpu, bench_prune, bench_quant, bench_gpu) share: a result table rendered as
Markdown (the committed ``.md``) or Rich (the terminal), the list of targets met or missed, writing a result
as ``NAME.md`` + ``NAME.json`` with the table on stdout and the "wrote" line on stderr, and ``resopt()``, which
runs one resopt command the way a user does and returns its JSON document.

Imported by the scripts as ``from _table import ...`` (``python scripts/bench_x.py`` puts ``scripts/`` on the
path); it needs nothing beyond the standard library, and Rich only for ``Table.rich``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESOPT = [sys.executable, "-m", "resopt"]


@dataclass
class Table:
    """Columns (right-aligned unless named in ``left``) and rows of already formatted cells."""

    columns: Sequence[str]
    left: Sequence[str] = ()
    rows: list[Sequence[str]] = field(default_factory=list)

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells for {len(self.columns)} columns: {cells}")
        self.rows.append(cells)

    def markdown(self) -> list[str]:
        align = "|" + "".join("---|" if c in self.left else "--:|" for c in self.columns)
        return [_md_row(self.columns), align] + [_md_row(r) for r in self.rows]

    def rich(self, *, title: str = "", caption: str | None = None) -> Any:
        from rich.table import Table as RichTable

        table = RichTable(title=title, title_justify="left", caption=caption, caption_justify="left")
        for c in self.columns:
            table.add_column(c, justify="left" if c in self.left else "right")
        for r in self.rows:
            table.add_row(*r)
        return table


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def verdict_line(label: str, value: str, met: bool, *, after: str = "") -> str:
    """One target as a Markdown bullet: ``- label: **value**after: met`` (or ``NOT met``)."""
    return f"- {label}: **{value}**{after}: {'met' if met else 'NOT met'}"


def exit_code(verdicts: Iterable[dict[str, Any]], *, strict: bool) -> int:
    """1 with ``--strict`` when a target is missed, else 0."""
    return 1 if strict and not all(v["met"] for v in verdicts) else 0


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_result(out: Path, name: str, result: dict[str, Any], md: str) -> None:
    """``out/NAME.md`` and ``out/NAME.json``; the Markdown also goes to stdout, the summary line to stderr."""
    (out / f"{name}.md").write_text(md)
    write_json(out / f"{name}.json", result)
    print(md)
    print(f"{name.replace('-', '_')}: wrote {out / (name + '.md')} and {name}.json in {result['seconds']:.0f} s",
          file=sys.stderr)


def resopt(*args: object, check: bool = True) -> Any:
    """Run ``resopt ARGS --json`` from the repository; its progress goes to our stderr, its one JSON document is
    returned. A failure exits the script with one line naming the command (``check``), or is said on stderr and
    returns None (``check=False``: the caller leaves that row out)."""
    script = Path(sys.argv[0]).stem or "script"
    cmd = [*RESOPT, *map(str, args), "--json"]
    print(f"$ resopt {' '.join(map(str, args))}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode != 0:
        if check:
            sys.exit(f"{script}: `resopt {args[0]}` failed with exit code {proc.returncode}")
        print(f"{script}: `resopt {args[0]}` exited {proc.returncode}; row left out", file=sys.stderr)
        return None
    return json.loads(proc.stdout)
