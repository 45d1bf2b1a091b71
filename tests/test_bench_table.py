"""scripts/_table.py, the table and result helper the four benchmark scripts share."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _table import Table, exit_code, resopt, verdict_line, write_result  # noqa: E402


def test_markdown_table_aligns_named_columns_left_and_checks_row_width() -> None:
    t = Table(["model", "runtime", "img/s"], left=("model", "runtime"))
    t.add_row("r18 (32px)", "ort", "1,234")
    t.add_row("r50", "openvino", "56")
    assert t.markdown() == ["| model | runtime | img/s |", "|---|---|--:|",
                            "| r18 (32px) | ort | 1,234 |", "| r50 | openvino | 56 |"]
    with pytest.raises(ValueError, match="a row of 2 cells for 3 columns"):
        t.add_row("r56", "ort")


def test_rich_table_has_the_same_cells_and_alignment() -> None:
    from rich.console import Console

    t = Table(["model", "img/s"], left=("model",))
    t.add_row("r18", "1,234")
    rich = t.rich(title="bench", caption="note")
    assert [c.justify for c in rich.columns] == ["left", "right"]
    console = Console(width=60, record=True, file=io.StringIO())
    console.print(rich)
    text = console.export_text()
    assert "bench" in text and "r18" in text and "1,234" in text and "note" in text


def test_verdicts_and_exit_code() -> None:
    assert verdict_line("r18: top-1 drop", "0.7 points", False, after=" on 200 test images") == \
        "- r18: top-1 drop: **0.7 points** on 200 test images: NOT met"
    assert verdict_line("INT8 speed-up", "2.1x", True) == "- INT8 speed-up: **2.1x**: met"
    verdicts = [{"met": True}, {"met": False}]
    assert (exit_code(verdicts, strict=True), exit_code(verdicts, strict=False)) == (1, 0)
    assert exit_code([{"met": True}], strict=True) == 0


def test_write_result_writes_md_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = {"seconds": 12.4, "rows": [{"file": tmp_path / "m.onnx"}]}
    write_result(tmp_path, "bench-quant", result, "# table\n")
    assert (tmp_path / "bench-quant.md").read_text() == "# table\n"
    assert json.loads((tmp_path / "bench-quant.json").read_text()) == {"seconds": 12.4,
                                                                       "rows": [{"file": str(tmp_path / "m.onnx")}]}
    out, err = capsys.readouterr()
    assert out == "# table\n\n"
    assert err == f"bench_quant: wrote {tmp_path / 'bench-quant.md'} and bench-quant.json in 12 s\n"


def test_resopt_returns_the_json_document_or_exits_with_one_line(monkeypatch, capsys) -> None:
    """The one helper the benchmark scripts run resopt through: a real command's document comes back; a failed
    one exits the script naming the command, or with check=False is said on stderr and gives None."""
    import pytest

    monkeypatch.setattr(sys, "argv", ["scripts/bench_x.py"])
    archs = resopt("info", "--archs")
    assert "resnet20" in {a["name"] for a in archs["archs"]}
    with pytest.raises(SystemExit) as e:
        resopt("info", "/nonexistent/m.onnx")
    assert e.value.code == "bench_x: `resopt info` failed with exit code 3"
    assert resopt("info", "/nonexistent/m.onnx", check=False) is None
    assert "bench_x: `resopt info` exited 3; row left out" in capsys.readouterr().err
