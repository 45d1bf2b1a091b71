"""Knowledge distillation: the loss against a hand computation, the frozen teacher, and the distill
command on real CIFAR-10 images (from an architecture and from a student checkpoint), with its errors."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import resnet20_counts

from resopt.artifacts import checkpoint_preprocess, load_checkpoint, save_checkpoint, sha256_file
from resopt.data import load_eval_set, stack_images
from resopt.distill import DistillConfig, kd_loss, kd_loss_fn, load_teacher
from resopt.models import model_from_checkpoint

FEW = ["--limit-per-class", "5", "--batch-size", "25", "--epochs", "1"]


def top1_on(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 in percent, computed here rather than by resopt's evaluation code."""
    with torch.no_grad():
        return 100.0 * float((model.eval()(x).argmax(dim=1) == y).double().mean())


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_hand_computation() -> None:
    s = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, -0.4]]
    t = [[1.0, 1.5, -0.5, 0.2], [-1.0, 0.0, 2.0, 0.5]]
    y = [0, 2]
    alpha, temp = 0.3, 2.5
    ce = [-math.log(_softmax(si)[yi]) for si, yi in zip(s, y, strict=True)]
    kl = []
    for si, ti in zip(s, t, strict=True):
        ps, pt = _softmax([v / temp for v in si]), _softmax([v / temp for v in ti])
        kl.append(sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt, strict=True)))
    hand = alpha * sum(ce) / 2 + (1 - alpha) * temp**2 * sum(kl) / 2
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=alpha, temperature=temp)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    # alpha = 1 is plain cross-entropy; a student equal to its teacher pays nothing with alpha = 0.
    assert kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=1.0, temperature=temp).item() == \
        pytest.approx(sum(ce) / 2, rel=1e-6)
    assert kd_loss(torch.tensor(t), torch.tensor(t), torch.tensor(y), alpha=0.0, temperature=temp).item() == \
        pytest.approx(0.0, abs=1e-7)


def test_teacher_is_frozen_and_renormalized(trained_pt: Path, cifar_small: Path) -> None:
    ckpt = load_checkpoint(trained_pt)
    pre = checkpoint_preprocess(ckpt)
    x, y = stack_images(load_eval_set(cifar_small, pre, per_class=2))
    teacher = load_teacher(trained_pt, classes=ckpt["classes"], preprocess=pre, data=str(cifar_small))
    student = model_from_checkpoint(ckpt).train()
    loss, logits = kd_loss_fn(teacher, DistillConfig(alpha=0.5, temperature=4.0))(student, x, y)
    loss.backward()
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert logits.shape == (20, 10)

    # A student normalized with other statistics: the teacher is fed the same pixels, normalized its own way.
    other = replace(pre, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    shifted = load_teacher(trained_pt, classes=ckpt["classes"], preprocess=other, data=str(cifar_small))
    mean_t, std_t = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    raw = x * std_t + mean_t
    with torch.no_grad():
        torch.testing.assert_close(shifted((raw - 0.5) / 0.25), teacher(x), atol=1e-4, rtol=1e-4)


def test_distill_from_an_architecture(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "kd.pt"
    r = cli("distill", "--teacher", trained_pt, "--student", "resnet20", "--width", "0.25", "--data", cifar_small,
            *FEW, "--alpha", "0.7", "--temperature", "3", "-o", out, "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    ckpt = load_checkpoint(trained_pt)
    pre = checkpoint_preprocess(ckpt)
    x, y = stack_images(load_eval_set(cifar_small, pre, per_class=5))
    assert d["eval_images"] == d["test_images"] == 50 and d["train_images"] == 50
    # The teacher is measured on the validation images its own lineage records (re-derived here).
    from resopt.data import load_val_set

    xv, yv = stack_images(load_val_set(cifar_small, pre, lineage=ckpt["lineage"], per_class=5)[0])
    assert d["val_images"] == len(yv) == 40  # cifar_small: 10% of 40 per class held out, 4 per class
    assert d["teacher_val_top1"] == pytest.approx(top1_on(model_from_checkpoint(ckpt), xv, yv))
    assert d["student_source"] == "scratch" and d["student_val_top1_before"] is None
    assert (d["student_params"], d["teacher_params"]) == (resnet20_counts(4)["params"], resnet20_counts(8)["params"])

    student = load_checkpoint(out)
    assert student["arch"] == "resnet20" and student["arch_kwargs"] == {"width": 0.25}
    assert student["preprocess"] == ckpt["preprocess"]  # the teacher's, never recomputed
    assert student["metrics"]["top1"] == d["top1"] == pytest.approx(top1_on(model_from_checkpoint(student), x, y))
    (entry,) = student["lineage"]
    assert entry["command"] == "distill" and "parent" not in entry
    assert entry["teacher"] == {"file": trained_pt.name, "sha256": sha256_file(trained_pt)}
    assert entry["options"]["alpha"] == 0.7 and entry["options"]["temperature"] == 3.0


def test_distill_into_a_student_checkpoint(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    student = tmp_path / "student.pt"
    shutil.copy(trained_pt, student)
    r = cli("distill", "--teacher", trained_pt, "--student", student, "--data", cifar_small, *FEW,
            "-o", tmp_path / "kd.pt", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    # The student starts as a copy of the teacher: same top-1 on the same images before training.
    assert d["student_val_top1_before"] == d["teacher_val_top1"]
    assert d["student_params"] == d["teacher_params"] == resnet20_counts(8)["params"]  # by hand: 68,786
    out = load_checkpoint(tmp_path / "kd.pt")
    assert [e["command"] for e in out["lineage"]] == ["train", "distill"]
    assert out["lineage"][-1]["parent"]["sha256"] == sha256_file(student)
    assert out["metrics"]["val_top1_before"] == d["student_val_top1_before"]


def test_distill_errors(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    base = ["distill", "--data", cifar_small, "-o", tmp_path / "x.pt"]
    r = cli(*base, "--teacher", trained_pt, "--student", "resnet21")
    assert r.code == 2 and "unknown architecture 'resnet21'; choose one of:" in r.stderr and "resnet20-se" in r.stderr
    r = cli(*base, "--teacher", trained_pt, "--student", "resnet20", "--alpha", "1.5")
    assert r.code == 2 and "--alpha must be in [0, 1], got 1.5" in r.stderr
    onnx_teacher = tmp_path / "t.onnx"
    onnx_teacher.write_bytes(b"x")
    r = cli(*base, "--teacher", onnx_teacher, "--student", "resnet20")
    assert r.code == 3 and "t.onnx is a .onnx file; this command takes .pt" in r.stderr

    # A teacher trained on other classes than the data, and a student that predicts other classes.
    ckpt = load_checkpoint(trained_pt)
    ckpt["classes"] = ckpt["classes"][::-1]
    other = tmp_path / "other.pt"
    save_checkpoint(ckpt, other)
    r = cli(*base, "--teacher", other, "--student", "resnet20", *FEW)
    assert r.code == 4 and "teacher other.pt was trained on classes ['truck'" in r.stderr
    r = cli(*base, "--teacher", trained_pt, "--student", other, *FEW)
    assert r.code == 4 and "student other.pt predicts 10 classes ['truck'" in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_same_seed_same_student(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    args = ["distill", "--teacher", trained_pt, "--student", "resnet20", "--width", "0.25", "--data", cifar_small,
            *FEW]
    for name, seed in (("a.pt", 5), ("b.pt", 5), ("c.pt", 6)):
        r = cli(*args, "--seed", seed, "-o", tmp_path / name)
        assert r.code == 0, r.stderr
    a, b, c = (load_checkpoint(tmp_path / n)["state_dict"] for n in ("a.pt", "b.pt", "c.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a), "another seed must give other weights"


def test_distill_takes_the_time_budget(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    """distill shares train's trainer options (issue 23: it had no --time-budget): the first epoch alone exceeds
    a 1 ms budget, so 1 of the 50 epochs runs."""
    out = tmp_path / "kd.pt"
    r = cli("distill", "--teacher", trained_pt, "--student", "resnet20", "--width", "0.25", "--data", cifar_small,
            "--limit-per-class", "5", "--batch-size", "25", "--epochs", "50", "--time-budget", "0.001", "-o", out,
            "--json")
    assert r.code == 0, r.stderr
    assert len(load_checkpoint(out)["lineage"][0]["metrics"]["history"]) == 1
    r = cli("distill", "--teacher", trained_pt, "--student", "resnet20", "--data", cifar_small, "--time-budget", "-1",
            "-o", tmp_path / "n.pt")
    assert r.code == 2 and "--time-budget must be" in r.stderr
