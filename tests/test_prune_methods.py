"""The pruning methods' table (resopt.prune.methods.RUNNERS) lists exactly the methods `prune --method` takes."""

from __future__ import annotations


def test_every_method_has_one_runner() -> None:
    from resopt.prune import METHODS, STRUCTURED
    from resopt.prune.methods import RUNNERS, run_sfp, run_structured

    assert list(RUNNERS) == ["l1-struct", "l2-struct", "l1-unstruct", "2:4", "sfp", "block"]
    assert set(RUNNERS) == set(METHODS) and set(STRUCTURED) <= set(RUNNERS)
    assert RUNNERS["l1-struct"] is RUNNERS["l2-struct"] is run_structured and RUNNERS["sfp"] is run_sfp
