"""resopt.verify: the one compare-and-check (units, bounds, errors) and how old lineages still read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from resopt.errors import DataError, VerificationError
from resopt.verify import Parity, agreement_percent, compare, parity_of, top1_of


def _logits(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 10)).astype(np.float32) * 4


def test_parity_is_in_percent_with_accuracies_when_labelled() -> None:
    ref = _logits()
    out = ref.copy()
    out[:10] = -out[:10]  # flips the argmax of a quarter of the rows
    out[10:] += 0.01
    p = parity_of(ref, out, ref.argmax(1), source="noise")
    assert isinstance(p, Parity) and p.images == 40 and p.source == "noise"
    assert p.top1_agreement == 75.0 and p.top1 == 75.0 and p.parent_top1 == 100.0
    assert p.max_abs_diff == pytest.approx(2 * float(np.abs(ref[:10]).max()), rel=1e-6)
    assert p.logit_scale == pytest.approx(float(np.abs(ref).max()))
    assert parity_of(ref, ref, source="same").top1 is None  # no labels, no accuracy
    m = p.metrics()
    assert m["top1_agreement"] == 75.0 and m["images"] == 40 and m["data"] == "noise" and "min_agreement" not in m


def test_check_records_the_bounds_or_fails_with_the_numbers() -> None:
    ref = _logits()
    out = ref + 0.05
    p = parity_of(ref, out, source="noise")
    ok = p.check(what="x", against="y", min_agreement=99.0, allowed_abs_diff=0.1)
    assert (ok.min_agreement, ok.allowed_abs_diff) == (99.0, 0.1) and ok.metrics()["allowed_abs_diff"] == 0.1
    with pytest.raises(VerificationError, match=r"^onnxruntime differs from PyTorch by up to 0.05 > allowed 0.01 "
                                                r"\(logit scale .*\) on 40 images of noise; top-1 agreement 100.00%$"):
        p.check(what="onnxruntime", against="PyTorch", allowed_abs_diff=0.01)
    flipped = parity_of(ref, -ref, source="noise")
    with pytest.raises(VerificationError, match=r"agrees with its parent on only 0.00% of top-1 predictions "
                                                r"\(need >= 95%\) on 40 images"):
        flipped.check(what="the int8 result", against="its parent", min_agreement=95.0)
    nan = out.copy()
    nan[0, 0] = np.nan
    with pytest.raises(VerificationError, match="by up to inf"):
        parity_of(ref, nan, source="noise").check(what="x", against="y", allowed_abs_diff=1.0)


def test_compare_runs_both_models_over_the_batches() -> None:
    ref = _logits(30)
    labels = ref.argmax(1)
    batches = [(ref[i:i + 8], labels[i:i + 8]) for i in range(0, 30, 8)]  # the "images" are the logits
    p = compare(lambda x: x, lambda x: x * 2, batches, source="b")
    assert p.images == 30 and p.top1_agreement == 100.0 and p.top1 == 100.0
    assert p.max_abs_diff == pytest.approx(float(np.abs(ref).max()))
    with pytest.raises(VerificationError, match="returned logits of shapes"):
        compare(lambda x: x, lambda x: x[:, :5], batches, source="b")
    with pytest.raises(DataError, match="no images of b"):
        compare(lambda x: x, lambda x: x, [], source="b")
    assert top1_of(lambda x: x, batches) == 100.0
    assert top1_of(lambda x: -x, batches) < 100.0


@pytest.mark.parametrize(("command", "metrics", "percent"), [
    ("export", {"top1_agreement": 1.0}, 100.0),  # written before resopt.verify: a fraction
    ("import", {"top1_agreement": 0.984375}, 98.438),
    ("export", {"top1_agreement": 100.0}, 100.0),  # written now: percent
    ("export", {"top1_agreement": 96.875}, 96.875),
    ("build", {"top1_agreement": 1.0}, 1.0),  # build always wrote percent
    ("build", {"top1_agreement": 99.5}, 99.5),
    ("quantize", {"agreement": 98.0}, None),
])
def test_agreement_percent_reads_old_and_new_lineage(command: str, metrics: dict, percent: float | None) -> None:
    assert agreement_percent(command, metrics) == percent


def test_info_shows_percent_for_an_old_artifact_that_stored_a_fraction(cli, r20_onnx_session: Path,
                                                                       tmp_path: Path) -> None:
    """An ONNX whose export step was written by an older resopt (top1_agreement as a fraction), then built
    (percent): ``info`` shows both in percent, and the stored lineage is left as it was."""
    import onnx

    from resopt.artifacts import read_onnx_meta, stamp_onnx

    model = onnx.load(str(r20_onnx_session))
    meta = read_onnx_meta(model)
    lineage = meta["lineage"]
    export = lineage[-1]
    assert export["command"] == "export"
    export["metrics"] = {k: v for k, v in export["metrics"].items() if k != "allowed_abs_diff"}
    export["metrics"]["top1_agreement"] = 0.96875  # an old export: 31 of 32 images, as a fraction
    lineage.append({"command": "build", "time": "2026-01-01T00:00:00+00:00", "options": {"precision": "fp16"},
                    "parent": {"file": "old.onnx", "sha256": "0" * 64},
                    "metrics": {"top1_agreement": 99.5, "max_abs_diff": 0.002}})
    stamp_onnx(model, {**meta, "lineage": lineage})
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))

    r = cli("info", old, "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    steps = {s["command"]: s for s in d["lineage_steps"]}
    assert steps["export"]["metrics"]["top1_agreement"] == 96.875
    assert steps["build"]["metrics"]["top1_agreement"] == 99.5
    stored = [e for e in d["lineage"] if e["command"] == "export"][0]
    assert stored["metrics"]["top1_agreement"] == 0.96875  # the file is not rewritten
    text = cli("info", old).stdout
    assert "top1_agreement=96.88%" in text and "top1_agreement=99.5%" in text
    assert json.dumps(d)  # one JSON document
