"""``resopt report``: a real chain (train -> prune -> export -> quantize -> bench --json) joined by sha256,
the Pareto set on a hand-made case, valid non-blank plots, an offline HTML page, missing numbers kept
missing, and one-line errors for inputs resopt did not write."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import make_subset
from conftest import run_captured as _run

from resopt.artifacts import sha256_file

CHAIN = ["r20.pt", "r20.onnx", "r20.p50.pt", "r20.p50.onnx", "r20.p50.int8.onnx"]
BENCHED = ["r20.pt", "r20.onnx", "r20.p50.onnx", "r20.p50.int8.onnx"]  # r20.p50.pt left out on purpose




@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny real chain: 200 training / 100 test images, a quarter-width ResNet-20, two epochs."""
    base = tmp_path_factory.mktemp("report")
    data = make_subset(base / "data", 20, 10)
    runs = base / "runs"
    steps = [
        ("train", "--arch", "resnet20", "--width", 0.25, "--data", data, "--epochs", 2, "--batch-size", 50,
         "-o", runs / "r20.pt"),
        ("prune", runs / "r20.pt", "--method", "l1-struct", "--sparsity", 0.5,
         "--finetune-epochs", 1, "--batch-size", 50, "--data", data, "-o", runs / "r20.p50.pt"),
        ("export", runs / "r20.pt", "-o", runs / "r20.onnx", "--data", data, "--num-verify", 20),
        ("export", runs / "r20.p50.pt", "-o", runs / "r20.p50.onnx", "--data", data, "--num-verify", 20),
        ("quantize", runs / "r20.p50.onnx", "--mode", "int8", "-o", runs / "r20.p50.int8.onnx", "--num-calib", 64),
    ]
    for args in steps:
        code, _, err = _run(*args)
        assert code == 0, f"{args[0]}: {err[-2000:]}"
    code, out, err = _run("bench", *(runs / n for n in BENCHED), "--batch-size", "1,4", "--threads", 1, "--warmup", 1,
                          "--iters", 3, "--min-time", 0, "--rounds", 1, "--data", data, "--json")
    assert code == 0, err[-2000:]
    (base / "bench.json").write_text(out)
    return {"runs": runs, "bench": base / "bench.json", "data": data, "base": base}


@pytest.fixture(scope="module")
def full(chain: dict[str, Path]) -> dict:
    out = chain["base"] / "report"
    code, stdout, err = _run("report", chain["runs"], chain["bench"], "-o", out, "--title", "tiny chain", "--json")
    assert code == 0, err
    return {"doc": json.loads(stdout), "out": out, "stderr": err}


def _by_name(doc: dict) -> dict[str, dict]:
    return {r["name"]: r for r in doc["records"]}


def test_every_row_joins_its_file_parent_and_bench_row(full: dict, chain: dict[str, Path]) -> None:
    doc = full["doc"]
    recs = _by_name(doc)
    assert [r["name"] for r in doc["records"]] == ["r20.pt", "r20.onnx", "r20.p50.pt", "r20.p50.onnx",
                                                   "r20.p50.int8.onnx"]  # pipeline order: parents first
    sha = {n: sha256_file(chain["runs"] / n) for n in CHAIN}
    for n in CHAIN:
        assert recs[n]["sha256"] == sha[n] and recs[n]["path"] == str(chain["runs"] / n)
        assert recs[n]["file_bytes"] == (chain["runs"] / n).stat().st_size
    parents = {"r20.pt": None, "r20.onnx": "r20.pt", "r20.p50.pt": "r20.pt", "r20.p50.onnx": "r20.p50.pt",
               "r20.p50.int8.onnx": "r20.p50.onnx"}
    for n, p in parents.items():
        assert recs[n]["parent_sha256"] == (None if p is None else sha[p]), n
        assert recs[n]["root_sha256"] == sha["r20.pt"]
    assert recs["r20.p50.pt"]["edge"].startswith("prune method=l1-struct sparsity=0.5")
    assert recs["r20.p50.int8.onnx"]["step"].startswith("quantize mode=int8")
    assert {n: r["technique"] for n, r in recs.items()} == {
        "r20.pt": "baseline", "r20.onnx": "baseline", "r20.p50.pt": "pruned", "r20.p50.onnx": "pruned",
        "r20.p50.int8.onnx": "combined"}

    bench = json.loads(chain["bench"].read_text())
    for m in bench["models"]:
        r = recs[m["name"]]
        assert m["sha256"] == r["sha256"]
        assert r["top1"] == m["accuracy"]["top1"] and r["accuracy_source"].startswith("bench --data")
        cells = {(c["device"], c["batch_size"]): c["p50_ms"] for c in r["latency"]}
        assert cells == {("cpu", b["batch_size"]): b["p50_ms"] for b in m["batches"]}
    # Not benchmarked: no latency, and the top-1 its prune step recorded, marked as such.
    p50 = recs["r20.p50.pt"]
    assert p50["latency"] == [] and p50["accuracy_source"] == "lineage: prune, test"
    assert p50["accuracy_split"] == "test" and r["accuracy_split"] == "test"
    # Against the root: size and speed ratios and points of top-1, from the joined numbers themselves.
    root = recs["r20.pt"]
    q = recs["r20.p50.int8.onnx"]
    assert q["vs_root"]["smaller"] == pytest.approx(root["file_bytes"] / q["file_bytes"])
    lat = {r["name"]: {c["batch_size"]: c["p50_ms"] for c in r["latency"]} for r in doc["records"]}
    assert q["vs_root"]["faster"] == pytest.approx(lat["r20.pt"][1] / lat["r20.p50.int8.onnx"][1])
    assert q["vs_root"]["points"] == pytest.approx(q["top1"] - root["top1"], abs=1e-3)
    assert doc["latency_coordinate"] == {"device": "cpu", "batch_size": 1}
    # The curves come from the history train and prune recorded in the checkpoints.
    runs = {c["run"]: c["history"] for c in doc["curves"]}
    assert [len(runs["train -> r20.pt"]), len(runs["prune -> r20.p50.pt"])] == [2, 1]
    assert {"loss", "train_top1", "val_top1"} <= set(runs["train -> r20.pt"][0])


def _dominated(p: tuple[float, float], points: list[tuple[float, float]]) -> bool:
    """The definition, written here: some other point costs no more, scores no less, and differs."""
    return any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points)


def test_pareto_marks_agree_with_the_numbers(full: dict) -> None:
    recs = full["doc"]["records"]
    scored = [r for r in recs if r["top1"] is not None]
    points = [(r["file_bytes"], r["top1"]) for r in scored]
    # The expected frontier by brute force over every pair, not through resopt's pareto_front.
    front = {r["name"] for r, p in zip(scored, points, strict=True) if not _dominated(p, points)}
    assert front, "no frontier: the chain's records carry no top-1"
    assert {r["name"] for r in recs if "size" in r["pareto"]} == front
    assert not any("size" in r["pareto"] for r in recs if r["top1"] is None)


def test_report_names_files_relative_to_its_folder(full: dict, chain: dict[str, Path]) -> None:
    """The inputs were given as absolute paths; the report (in base/report/) names r20.p50.pt, the file left
    out of the bench, as ../runs/r20.p50.pt: a committed report carries no path of the machine that made it."""
    md = (full["out"] / "report.md").read_text()
    assert str(chain["base"]) not in md and str(chain["base"]) not in " ".join(full["doc"]["notes"])
    latency_note = next(n for n in full["doc"]["notes"] if n.startswith("no latency for"))
    assert "resopt bench ../runs/r20.p50.pt --batch-size 1,4" in latency_note
    assert "../runs/r20.p50.pt" in md


def test_pareto_front_hand_made() -> None:
    from resopt.report import pareto_front

    # (cost, accuracy): b dominates c (cheaper, as accurate); d is dominated by a; e ties a exactly.
    pts = [(1.0, 80.0), (2.0, 90.0), (3.0, 90.0), (1.5, 70.0), (1.0, 80.0), (4.0, 91.0), (0.5, 60.0)]
    assert pareto_front(pts) == [6, 0, 4, 1, 5]
    assert pareto_front([]) == []
    assert pareto_front([(2.0, 50.0)]) == [0]


def test_markdown_table_and_stdout_table(full: dict, chain: dict[str, Path]) -> None:
    md = (full["out"] / "report.md").read_text()
    assert md.startswith("# tiny chain\n")
    rows = [ln for ln in md.splitlines() if re.match(r"\| \d+ \|", ln)]
    assert len(rows) == 5
    header = next(ln for ln in md.splitlines() if ln.startswith("| # |"))
    assert "cpu b1 p50 ms (img/s)" in header and "cpu b4 p50 ms (img/s)" in header
    p50_row = next(r for r in rows if "r20.p50.pt" in r)
    assert "—" in p50_row and "†" in p50_row  # no latency; top-1 from its own lineage
    for png in ("top1_vs_size.png", "top1_vs_latency_cpu_b1.png", "top1_vs_latency_cpu_b4.png", "top1_vs_pruning.png",
                "lineage.png", "curves.png"):
        assert f"(plots/{png})" in md
    code, out, err = _run("report", chain["runs"], chain["bench"], "-o", chain["base"] / "report-table")
    assert code == 0, err
    assert "r20.p50.int8.onnx" in out and "cpu b1 p50 ms" in out and "cpu b4 p50" not in out
    assert "wrote" in err and "wrote" not in out


def test_plots_are_valid_images_of_the_stated_size(full: dict) -> None:
    import numpy as np
    from PIL import Image

    plots = full["out"] / "plots"
    for name in ("top1_vs_size", "top1_vs_latency_cpu_b1", "top1_vs_latency_cpu_b4", "top1_vs_pruning", "lineage",
                 "curves"):
        with Image.open(plots / f"{name}.png") as im:
            im.verify()
        with Image.open(plots / f"{name}.png") as im:
            px = np.asarray(im.convert("RGB"))
            if name.startswith("top1"):
                assert im.size == (1350, 900)  # 9 x 6 in at 150 dpi, as the README says
        colors = np.unique((px[..., 0].astype(np.int32) << 16) | (px[..., 1].astype(np.int32) << 8) | px[..., 2])
        assert px.std() > 10 and len(colors) > 50, f"{name}.png looks blank"
        ET.parse(plots / f"{name}.svg")  # well-formed SVG beside every PNG
    # The technique colours are the documented ones: the pruned orange and the combined purple are drawn.
    px = np.asarray(Image.open(plots / "top1_vs_size.png").convert("RGB")).reshape(-1, 3)
    for color in ((0xff, 0x7f, 0x0e), (0x94, 0x67, 0xbd), (0x1f, 0x77, 0xb4)):
        assert (px == color).all(axis=1).sum() > 20, color


def test_the_pruning_sweep_is_measured_against_the_parent_it_was_pruned_from(full: dict) -> None:
    """The accuracy-vs-pruning plot's points: the pruned ONNX against the file it was pruned from (benched
    here; otherwise its measured export), the parent at 0; quantized files stay out."""
    from resopt.report import ReportConfig, build_report
    from resopt.report.writers import pruning_series

    recs = _by_name(full["doc"])
    report = build_report([Path(recs["r20.pt"]["path"]).parent, full["out"].parent / "bench.json"], ReportConfig(),
                          skip=full["out"])
    series = pruning_series(report.records, "top1")
    assert [name for name, _ in series] == ["r20.pt / l1-struct"]
    pts = sorted(series[0][1])
    kept = recs["r20.p50.onnx"]["nonzero_params"] / recs["r20.pt"]["nonzero_params"]
    assert pts == [(0.0, recs["r20.pt"]["top1"]), (pytest.approx(100 * (1 - kept)), recs["r20.p50.onnx"]["top1"])]
    # Without the parent's own bench row, the measured export of it stands in.
    onnx_only = [r for r in report.records if r.name != "r20.pt"]
    assert [name for name, _ in pruning_series(onnx_only, "top1")] == ["r20.onnx / l1-struct"]


def test_html_is_one_offline_page_with_the_plots(full: dict) -> None:
    page = (full["out"] / "report.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert (full["out"] / "plots" / "top1_vs_size.png").read_bytes() in embedded
    assert not re.search(r'(src|href)="(https?:|//)', page) and "<link" not in page and "<script" not in page
    assert "<td>r20.p50.int8.onnx</td>" in page.replace("&nbsp;", "")
    _assert_balanced_html(page)


def _assert_balanced_html(page: str) -> None:
    """Every element the page opens is closed, in order (what a browser needs to show it as written)."""
    from html.parser import HTMLParser

    void = {"meta", "img", "br", "hr", "link", "input"}

    class Check(HTMLParser):
        stack: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag not in void:
                self.stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            assert self.stack and self.stack.pop() == tag, tag

    checker = Check()
    checker.feed(page)
    checker.close()
    assert checker.stack == []


def test_labels_do_not_overlap_with_30_points() -> None:
    import random

    from resopt.report.plots import Point, label_boxes, scatter_plot

    rng = random.Random(0)
    techniques = ["baseline", "pruned", "distilled", "quantized", "combined"]
    pts = [Point(f"r20.v{i:02d}.int8.onnx", rng.uniform(0.05, 1.2), rng.uniform(88, 92), techniques[i % 5],
                 ("pt", "onnx")[i % 2]) for i in range(30)]
    fig = scatter_plot(pts, xlabel="file size (MB)", ylabel="top-1 accuracy (%)", title="30 points")
    boxes = label_boxes(fig)
    assert len(boxes) == 30
    overlaps = [(i, j) for i in range(30) for j in range(i + 1, 30) if boxes[i].overlaps(boxes[j])]
    assert overlaps == []


def test_missing_numbers_stay_missing(chain: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = _run("report", chain["runs"], "-o", tmp_path / "r", "--json")
    assert code == 0, err
    recs = _by_name(json.loads(out))
    onnx = recs["r20.onnx"]  # export records parity, not accuracy
    assert onnx["top1"] is None and onnx["top5"] is None and onnx["latency"] == []
    assert onnx["vs_root"]["points"] is None and onnx["vs_root"]["faster"] is None
    assert recs["r20.pt"]["top1"] is not None and recs["r20.pt"]["accuracy_source"] == "lineage: train, test"
    md = (tmp_path / "r" / "report.md").read_text()
    # The data folder, named from the report's folder (tmp_path/r): no absolute path in a report.
    rel = os.path.relpath(chain["data"], tmp_path / "r")
    assert rel.startswith("..") and "## Missing numbers" in md and f"--data {rel} " in md
    missing_line = next(ln for ln in md.splitlines() if ln.startswith("- top-1 not recorded"))
    assert "r20.onnx" in missing_line and "resopt bench" in missing_line and "r20.pt," not in missing_line
    assert not (tmp_path / "r" / "plots" / "top1_vs_latency_cpu_b1.png").exists()
    assert "no bench JSON" in err


def test_baseline_metric_and_coordinate_options(chain: dict[str, Path], tmp_path: Path) -> None:
    onnx = chain["runs"] / "r20.onnx"
    code, out, err = _run("report", chain["runs"], chain["bench"], "-o", tmp_path, "--baseline", onnx,
                          "--metric", "top5", "--batch-size", 4, "--device", "cpu", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["metric"] == "top5" and doc["latency_coordinate"] == {"device": "cpu", "batch_size": 4}
    recs = _by_name(doc)
    assert {r["root_sha256"] for r in doc["records"]} == {recs["r20.onnx"]["sha256"]}
    q = recs["r20.p50.int8.onnx"]
    lat = {r["name"]: {c["batch_size"]: c["p50_ms"] for c in r["latency"]} for r in doc["records"]}
    assert q["vs_root"]["faster"] == pytest.approx(lat["r20.onnx"][4] / lat["r20.p50.int8.onnx"][4])
    assert q["vs_root"]["points"] == pytest.approx(q["top5"] - recs["r20.onnx"]["top5"], abs=1e-3)
    assert (tmp_path / "plots" / "top5_vs_size.png").exists()


def test_one_checkpoint_gives_its_training_curves(chain: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = _run("report", chain["runs"] / "r20.pt", "-o", tmp_path, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [r["name"] for r in doc["records"]] == ["r20.pt"]
    assert [c["run"] for c in doc["curves"]] == ["train -> r20.pt"]
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 10_000


def test_a_bench_row_of_an_older_version_is_not_joined(chain: dict[str, Path], tmp_path: Path) -> None:
    doc = json.loads(chain["bench"].read_text())
    row = next(m for m in doc["models"] if m["name"] == "r20.onnx")
    row["sha256"] = "0" * 64  # measured before the file was rewritten
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(doc))
    code, out, err = _run("report", chain["runs"], stale, "-o", tmp_path / "r", "--json")
    assert code == 0, err
    recs = [r for r in json.loads(out)["records"] if r["name"] == "r20.onnx"]
    assert len(recs) == 2
    real = next(r for r in recs if r["path"])
    ghost = next(r for r in recs if not r["path"])
    assert real["latency"] == [] and real["top1"] is None and real["parent_sha256"] is not None
    assert ghost["sha256"] == "0" * 64 and ghost["latency"] and ghost["step"].startswith("?")
    assert "different version" in err


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_inputs_get_one_line_errors(chain: dict[str, Path], tmp_path: Path) -> None:
    import onnx
    import torch
    from onnx import TensorProto, helper

    not_bench = tmp_path / "results.json"
    not_bench.write_text(json.dumps({"accuracy": 91.2}))
    code, out, err = _run("report", chain["runs"] / "r20.pt", not_bench, "-o", tmp_path / "o")
    assert code == 3 and out == "" and "is not `resopt bench --json` output" in _one_error(err)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, _, err = _run("report", broken, "-o", tmp_path / "o")
    assert code == 3 and "is not valid JSON" in _one_error(err)

    foreign_pt = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign_pt)
    code, _, err = _run("report", foreign_pt, "-o", tmp_path / "o")
    assert code == 3 and "was not written by resopt" in _one_error(err)

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    foreign_onnx = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign_onnx))
    code, _, err = _run("report", foreign_onnx, "-o", tmp_path / "o")
    assert code == 3 and "has no resopt metadata" in _one_error(err)

    code, _, err = _run("report", tmp_path / "nope.onnx", "-o", tmp_path / "o")
    assert code == 3 and "does not exist" in _one_error(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run("report", empty, "-o", tmp_path / "o")
    assert code == 3 and "no model files" in _one_error(err)
    assert not (tmp_path / "o" / "report.md").exists()  # a failed report writes nothing


@pytest.mark.parametrize(("args", "line"), [
    (["--metric", "top3"], "unknown --metric 'top3'; choose one of: top1, top5"),
    (["--device", "gpu"], "choose one of: cpu"),
    (["--batch-size", "64"], "choose one of: 1, 4"),
])
def test_option_errors(chain: dict[str, Path], tmp_path: Path, args: list[str], line: str) -> None:
    code, _, err = _run("report", chain["runs"], chain["bench"], "-o", tmp_path, *args)
    assert code == 2 and line in _one_error(err)


def test_output_must_be_a_folder(chain: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    shutil.copy(chain["bench"], target)
    code, _, err = _run("report", chain["runs"], "-o", target)
    assert code == 2 and "is a file" in _one_error(err)


def test_an_engine_joins_through_its_sidecar(chain: dict[str, Path], tmp_path: Path) -> None:
    """No TensorRT here: the engine's bytes are opaque and report reads only its sidecar, as info does."""
    from resopt.artifacts import read_onnx_meta, write_sidecar

    parent = chain["runs"] / "r20.p50.int8.onnx"
    meta = read_onnx_meta(parent)
    engine = tmp_path / "r20.p50.int8.engine"
    engine.write_bytes(b"\x00plan bytes that only TensorRT could read")
    # Every field `resopt build` writes and info/bench validate (no TensorRT here to write a real one).
    write_sidecar(engine, {"format": "resopt.engine", "format_version": 1,
                           "built_with": {"tensorrt": "10.9.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"},
                           "profile": {"min": 1, "opt": 8, "max": 32},
                           "engine": {"file": engine.name, "bytes": engine.stat().st_size,
                                      "sha256": sha256_file(engine)},
                           "arch": meta["arch"], "classes": meta["classes"], "preprocess": meta["preprocess"],
                           "precision": "int8", "lineage": meta["lineage"] + [{
                               "command": "build", "time": "2026-01-01T00:00:00+00:00",
                               "options": {"precision": "int8"},
                               "parent": {"file": parent.name, "sha256": sha256_file(parent)}, "metrics": {}}]})
    sidecar = tmp_path / "r20.p50.int8.engine.json"
    code, out, err = _run("report", chain["runs"], sidecar, "-o", tmp_path / "r", "--json")
    assert code == 0, err
    recs = _by_name(json.loads(out))
    e = recs["r20.p50.int8.engine"]
    assert e["kind"] == "engine" and e["parent_sha256"] == sha256_file(parent)
    assert e["step"] == "build precision=int8" and e["technique"] == "combined"
    assert e["top1"] is None and e["file_bytes"] == engine.stat().st_size


def test_report_into_the_input_folder_twice(chain: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(chain["runs"] / "r20.pt", tmp_path / "r20.pt")
    for _ in range(2):  # the second run finds the first one's files and passes over them
        code, out, err = _run("report", tmp_path, "-o", tmp_path, "--json")
        assert code == 0, err
        assert [r["name"] for r in json.loads(out)["records"]] == ["r20.pt"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "plots" / "curves.png").exists()


def test_lineage_accuracies_are_drawn_hollow() -> None:
    from resopt.report.plots import TECHNIQUE_COLORS, Point, scatter_plot

    fig = scatter_plot([Point("a.pt", 1.0, 90.0, "pruned", "pt", measured=False), Point("b.onnx", 0.5, 89.0,
                                                                                       "pruned", "onnx")],
                       xlabel="file size (MB)", ylabel="top-1 accuracy (%)", title="t")
    hollow, filled = fig.axes[0].collections[:2]
    assert tuple(hollow.get_facecolors()[0][:3]) == (1.0, 1.0, 1.0)
    orange = tuple(int(TECHNIQUE_COLORS["pruned"][i:i + 2], 16) / 255 for i in (1, 3, 5))
    assert tuple(hollow.get_edgecolors()[0][:3]) == pytest.approx(orange)
    assert tuple(filled.get_facecolors()[0][:3]) == pytest.approx(orange)
    assert "from lineage (†)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_a_second_runtime_is_its_own_row_and_each_tree_gets_its_baseline(chain: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """bench --runtime ort,openvino measures one file twice: two deployment points, not one row that keeps
    whichever came first. With two --baseline files, each lineage tree is compared with its own."""
    doc = json.loads(chain["bench"].read_text())
    row = next(m for m in doc["models"] if m["name"] == "r20.p50.int8.onnx")
    alt = json.loads(json.dumps(row))
    alt.update(runtime="openvino", accuracy={"top1": 12.5, "top5": 50.0, "images": 100})
    for b in alt["batches"]:
        b["p50_ms"] /= 2
    doc["models"].append(alt)
    bench = tmp_path / "bench2.json"
    bench.write_text(json.dumps(doc))
    # A second lineage tree: the pruned checkpoint with its history cut to the training step.
    import torch
    ckpt = torch.load(chain["runs"] / "r20.p50.pt", map_location="cpu", weights_only=False)
    ckpt["lineage"] = ckpt["lineage"][:1]
    torch.save(ckpt, tmp_path / "other.pt")
    code, out, err = _run("report", chain["runs"], bench, tmp_path / "other.pt", "-o", tmp_path / "r",
                          "--baseline", chain["runs"] / "r20.onnx", "--baseline", tmp_path / "other.pt", "--json")
    assert code == 0, err
    recs = _by_name(json.loads(out))
    ort, ov = recs["r20.p50.int8.onnx @ ort"], recs["r20.p50.int8.onnx @ openvino"]
    assert ov["parent_sha256"] == ort["sha256"] and ov["same_file_as"] == ort["sha256"]
    assert ov["step"] == "bench on openvino" and ov["top1"] == 12.5 and ort["top1"] != 12.5
    assert ov["latency"][0]["p50_ms"] == pytest.approx(ort["latency"][0]["p50_ms"] / 2)
    assert ov["vs_root"]["faster"] == pytest.approx(2 * ort["vs_root"]["faster"])
    assert ort["root_sha256"] == ov["root_sha256"] == recs["r20.onnx"]["sha256"]
    assert recs["other.pt"]["root_sha256"] == recs["other.pt"]["sha256"] and recs["other.pt"]["parent_sha256"] is None
    assert "r20.onnx" in recs and "r20.onnx @ ort" not in recs  # one runtime: the plain name
