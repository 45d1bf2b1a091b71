"""The prune command on real CIFAR-10 images: every method shrinks (or sparsifies) the model it claims to,
the checkpoint rebuilds from its recorded widths, and bad requests fail with one line and the right code.

Each run fine-tunes at most an epoch or two on 8 images per class of the ``cifar_small`` subset: the
point is what pruning does to the network's shape and weights, which short runs show exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import resnet20_counts

from resopt.artifacts import load_checkpoint, make_checkpoint, save_checkpoint, sha256_file
from resopt.models import build_model, count_macs, count_params, model_from_checkpoint

FEW = ["--limit-per-class", "5", "--batch-size", "25"]


def _prune(cli, parent: Path, data: Path, out: Path, *args: object) -> dict:
    r = cli("prune", parent, "--data", data, *FEW, "-o", out, "--json", *args)
    assert r.code == 0, r.stderr
    return r.json()


def _reload(path: Path) -> tuple[torch.nn.Module, dict]:
    # weights_only=True: the pruned checkpoint is plain tensors and primitives, no pickled modules.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return model_from_checkpoint(ckpt), ckpt


def test_l1_struct_one_shot_shrinks_reloads_and_exports(cli, trained_pt: Path, cifar_small: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "p50.pt"
    d = _prune(cli, trained_pt, cifar_small, out, "--sparsity", "0.5", "--finetune-epochs", "1")
    b, a = d["before"], d["after"]
    # ResNet-20 at width 0.5 has 8/16/32-channel groups: halving each one leaves a quarter of the MACs.
    assert d["channel_sparsity"] == pytest.approx(0.5)
    assert 0.2 < a["macs"] / b["macs"] < 0.3 and 0.2 < a["params"] / b["params"] < 0.3
    # Counted by hand: the parent is ResNet-20 with base width 8, the child exactly base width 4.
    assert (b["params"], b["macs"]) == (resnet20_counts(8)["params"], resnet20_counts(8)["macs"])
    assert (a["params"], a["macs"]) == (resnet20_counts(4)["params"], resnet20_counts(4)["macs"])
    assert b["file_bytes"] == trained_pt.stat().st_size and a["file_bytes"] == out.stat().st_size
    assert a["file_bytes"] < 0.5 * b["file_bytes"]
    assert d["eval_images"] == 50 and d["finetune_epochs"] == 1
    assert any(n.startswith("7 conv layers now have widths that are not multiples of 8 (conv1: 4)") for n in d["notes"])

    model, ckpt = _reload(out)
    assert count_params(model)[0] == a["params"] and count_macs(model, 32) == a["macs"]
    assert ckpt["widths"]["layer1.0.conv1"] == [4, 4, 1] and ckpt["widths"]["layer3.2.conv2"] == [16, 16, 1]
    assert ckpt["widths"]["fc"] == [16, 10]  # the classifier keeps its 10 classes
    last = ckpt["lineage"][-1]
    assert last["command"] == "prune" and last["parent"]["sha256"] == sha256_file(trained_pt)
    assert ckpt["lineage"][0]["command"] == "train"
    assert ckpt["metrics"]["val_top1"] == a["top1"] and ckpt["metrics"]["val_parent_top1"] == b["top1"]
    # Reported: test, measured once for the parent before pruning and once for the result at the end.
    assert ckpt["metrics"]["split"] == "test" and ckpt["metrics"]["test_images"] == 50
    assert ckpt["metrics"]["top1"] == d["top1"] == d["test_top1"] and ckpt["metrics"]["parent_top1"] == d["parent_top1"]

    # The pruned checkpoint goes through `resopt export` (dynamo, the default) like any .pt, verified
    # against PyTorch on real images; its graph holds the pruned widths (BatchNorm folded).
    r = cli("export", out, "-o", tmp_path / "p50.onnx", "--data", cifar_small, "--num-verify", 20, "--json")
    assert r.code == 0, r.stderr
    e = r.json()
    assert e["verification"]["top1_agreement"] == 100.0 and e["verification"]["max_abs_diff"] < 1e-4
    from resopt.info import describe_model

    onnx_info = describe_model(tmp_path / "p50.onnx")
    assert (onnx_info.params, onnx_info.macs) == (resnet20_counts(4)["folded_params"], resnet20_counts(4)["macs"])


def test_iterative_reaches_the_requested_sparsity(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    d = _prune(cli, trained_pt, cifar_small, tmp_path / "it.pt", "--iterative", "--steps", "2",
               "--sparsity", "0.5", "--finetune-epochs", "1")
    steps = d["steps"]
    assert [s["step"] for s in steps] == [1, 2] and all("val_top1_finetuned" in s for s in steps)
    # Two steps towards half the channels: each step removes some, and the last step's model is the result.
    assert d["before"]["params"] > steps[0]["params"] > steps[1]["params"] == d["after"]["params"]
    assert d["channel_sparsity"] == pytest.approx(0.5)
    _, ckpt = _reload(tmp_path / "it.pt")
    assert ckpt["widths"]["layer2.1.conv1"] == [8, 8, 1]
    assert ckpt["lineage"][-1]["options"]["steps"] == 2


def test_target_macs_global_l2(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    d = _prune(cli, trained_pt, cifar_small, tmp_path / "m.pt", "--method", "l2-struct", "--target-macs", "0.5",
               "--global")
    # The searched ratio keeps at most half the MACs, and not much less.
    assert 0.42 < d["macs_fraction"] <= 0.5
    assert 0 < d["ratio"] < 0.95
    model, _ = _reload(tmp_path / "m.pt")
    assert count_macs(model, 32) == d["after"]["macs"]


def test_round_to_and_named_layer_ratios(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    _prune(cli, trained_pt, cifar_small, tmp_path / "r.pt", "--sparsity", "0.3", "--round-to", "4")
    _, ckpt = _reload(tmp_path / "r.pt")
    convs = {k: v for k, v in ckpt["widths"].items() if len(v) == 3}
    assert all(v[1] % 4 == 0 for v in convs.values()), convs
    assert convs["layer3.0.conv1"][1] == 20  # 32 * 0.7 = 22.4 -> 22 -> rounded down to 20

    # name=ratio pairs: a stage prefix covers every group in the stage, a layer name only its own group.
    _prune(cli, trained_pt, cifar_small, tmp_path / "n.pt", "--layer-ratios", "layer3=0.5,layer2.1.conv1=0.25")
    _, ckpt = _reload(tmp_path / "n.pt")
    w = ckpt["widths"]
    assert w["layer3.0.conv1"][1] == w["layer3.2.conv2"][1] == 16 and w["layer2.1.conv1"][1] == 12
    assert w["layer2.2.conv1"][1] == 16 and w["conv1"][1] == 8


def test_l1_unstruct_zeroes_weights_and_keeps_them_zero(cli, trained_pt: Path, cifar_small: Path,
                                                        tmp_path: Path) -> None:
    d = _prune(cli, trained_pt, cifar_small, tmp_path / "u.pt", "--method", "l1-unstruct", "--sparsity", "0.6",
               "--finetune-epochs", "1")
    assert d["after"]["params"] == d["before"]["params"] and d["after"]["macs"] == d["before"]["macs"]
    assert d["weight_sparsity"] == pytest.approx(0.6, abs=0.002)
    assert d["after"]["nonzero_params"] < 0.45 * d["before"]["nonzero_params"]
    assert any("no faster" in n for n in d["notes"])
    model, ckpt = _reload(tmp_path / "u.pt")
    parent = load_checkpoint(trained_pt)["state_dict"]
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight.detach()
            # Every layer lost 60% of its weights (per-layer ranking), after a real fine-tuning epoch
            # changed the surviving ones.
            assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=0.02), name
            assert not torch.equal(w[w != 0], parent[f"{name}.weight"][w != 0]), name


@pytest.mark.slow
def test_pruned_checkpoint_chains_into_export_quantize_info(cli, trained_pt: Path, cifar_small: Path,
                                                            tmp_path: Path) -> None:
    from resopt.artifacts import read_onnx_meta

    pt, onnx, int8 = tmp_path / "l2.pt", tmp_path / "l2.onnx", tmp_path / "l2.int8.onnx"
    d = _prune(cli, trained_pt, cifar_small, pt, "--method", "l2-struct", "--sparsity", "0.4")
    r = cli("export", pt, "-o", onnx, "--exporter", "torchscript", "--data", cifar_small, "--num-verify", "20")
    assert r.code == 0, r.stderr  # export compares onnxruntime with PyTorch on real images itself
    r = cli("quantize", onnx, "-o", int8, "--num-calib", "40", "--json")
    assert r.code == 0, r.stderr
    r = cli("info", int8, "--json")
    assert r.code == 0, r.stderr
    info = r.json()
    assert info["macs"] == d["after"]["macs"] < 0.5 * d["before"]["macs"]
    assert [e["command"] for e in read_onnx_meta(int8)["lineage"]] == ["train", "prune", "export", "quantize"]


def _nm_ok(w: torch.Tensor) -> bool:
    rows = (w.permute(0, 2, 3, 1) if w.ndim == 4 else w).reshape(-1, 4)
    return bool(((rows != 0).sum(1) <= 2).all())


def test_2to4_pattern_holds_after_finetuning(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    d = _prune(cli, trained_pt, cifar_small, tmp_path / "24.pt", "--method", "2:4", "--finetune-epochs", "1")
    assert d["skipped_layers"] == [{"layer": "conv1", "reason": "3 input channels, not a multiple of 4"}]
    assert d["after"]["macs"] == d["before"]["macs"]
    model, _ = _reload(tmp_path / "24.pt")
    parent = load_checkpoint(trained_pt)["state_dict"]
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and name != "conv1":
            assert _nm_ok(m.weight.detach()), name
            assert not torch.equal(m.weight.detach(), parent[f"{name}.weight"])  # fine-tuning did move them
            checked += 1
    assert checked == 21
    assert d["weight_sparsity"] > 0.49


def test_sfp_removes_the_zeroed_filters(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    d = _prune(cli, trained_pt, cifar_small, tmp_path / "sfp.pt", "--method", "sfp", "--sparsity", "0.3",
               "--finetune-epochs", "1")
    assert d["after"]["params"] < 0.6 * d["before"]["params"] and d["channel_sparsity"] >= 0.3
    assert any("after every epoch (1)" in n for n in d["notes"])
    model, ckpt = _reload(tmp_path / "sfp.pt")
    assert ckpt["widths"]["layer3.0.conv1"][1] == 22  # int(32 * 0.7) channels stay
    # No all-zero filter survives: the soft-pruned channels left the model.
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            assert bool((m.weight.detach().flatten(1).abs().sum(1) > 0).all()), name


def test_teacher_finetuning_names_the_teacher(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    d = _prune(cli, trained_pt, cifar_small, tmp_path / "kd.pt", "--sparsity", "0.25", "--finetune-epochs", "1",
               "--teacher", trained_pt, "--alpha", "0.3")
    assert d["after"]["params"] < d["before"]["params"]
    _, ckpt = _reload(tmp_path / "kd.pt")
    entry = ckpt["lineage"][-1]
    assert entry["teacher"]["sha256"] == sha256_file(trained_pt) and entry["options"]["alpha"] == 0.3


@pytest.mark.parametrize("arch", ["resnet20-ds", "resnet20-se"])
def test_variants_prune_through_depthwise_and_se(arch: str, cli, trained_pt: Path, cifar_small: Path,
                                                 tmp_path: Path) -> None:
    base = load_checkpoint(trained_pt)
    torch.manual_seed(0)
    model = build_model(arch, 10, width=0.5)
    parent = tmp_path / f"{arch}.pt"
    save_checkpoint(make_checkpoint(arch=arch, arch_kwargs={"width": 0.5}, state_dict=model.state_dict(),
                                    classes=base["classes"], preprocess=_pre(base), lineage=[]), parent)
    d = _prune(cli, parent, cifar_small, tmp_path / "p.pt", "--sparsity", "0.5")
    # Depthwise MACs fall linearly with the channels, dense ones quadratically.
    assert 0.2 < d["macs_fraction"] < (0.4 if arch == "resnet20-ds" else 0.3)
    pruned, ckpt = _reload(tmp_path / "p.pt")
    w = ckpt["widths"]
    if arch == "resnet20-ds":
        # Depthwise convs keep groups == channels after pruning: 8 -> 4 residual channels in layer1.
        assert w["layer1.0.conv1.dw"] == [4, 4, 4] and w["layer2.0.conv2.dw"] == [8, 8, 8]
    else:
        # The SE gate's expand conv follows its block's width, and its squeeze width is pruned too.
        assert w["layer1.0.se.fc2"] == [2, 4, 1] and w["layer3.0.se.fc2"][1] == w["layer3.0.conv2"][1] == 16
    x = torch.randn(2, 3, 32, 32)
    assert pruned(x).shape == (2, 10)
    # And it exports like any checkpoint: onnxruntime gives PyTorch's logits on real images (else exit 6).
    r = cli("export", tmp_path / "p.pt", "-o", tmp_path / "p.onnx", "--exporter", "torchscript",
            "--data", cifar_small, "--num-verify", 10, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["verification"]["max_abs_diff"] < 1e-3


def _pre(ckpt: dict):
    from resopt.artifacts import checkpoint_preprocess

    return checkpoint_preprocess(ckpt)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, code, message", [
    (["--sparsity", "1.5"], 2, "--sparsity must be in (0, 1), got 1.5"),
    (["--sparsity", "0"], 2, "--sparsity must be in (0, 1), got 0.0"),
    (["--sparsity", "0.5", "--target-macs", "0.5"], 2, "--sparsity and --target-macs are alternatives"),
    (["--sparsity", "0.5", "--steps", "3"], 2, "--steps needs --iterative"),
    (["--method", "l3-struct", "--sparsity", "0.5"], 2,
     "unknown pruning method 'l3-struct'; choose one of: l1-struct, l2-struct, l1-unstruct, 2:4, sfp, block"),
    (["--method", "2:4", "--sparsity", "0.5"], 2, "Error: --sparsity does not apply to --method 2:4 (it fixes its "
     "pattern: 2 of every 4 weights); it is an option of --method l1-struct, l2-struct, l1-unstruct, sfp"),
    (["--method", "sfp", "--sparsity", "0.3"], 2, "it needs --finetune-epochs >= 1"),
    (["--method", "l1-unstruct", "--target-macs", "0.5"], 2, "Error: --target-macs does not apply to --method "
     "l1-unstruct (zeroed weights leave the MACs of dense kernels unchanged); it is an option of --method "
     "l1-struct, l2-struct, sfp, block"),
    (["--method", "sfp", "--sparsity", "0.3", "--iterative", "--finetune-epochs", "1"], 2,
     "Error: --iterative does not apply to --method sfp (it already prunes gradually, during fine-tuning); it is "
     "an option of --method l1-struct, l2-struct, l1-unstruct"),
    # Options that depend on another are refused without it, before any work (issue 19).
    (["--sparsity", "0.3", "--alpha", "0.3"], 2, "Error: --alpha does not apply without --finetune-epochs "
     "(nothing is trained); it is an option of the fine-tuning"),
    (["--sparsity", "0.3", "--temperature", "2"], 2, "Error: --temperature does not apply without "
     "--finetune-epochs"),
    (["--sparsity", "0.3", "--analyze-images", "50"], 2, "Error: --analyze-images does not apply without "
     "--analyze; it is an option of --analyze"),
    (["--sparsity", "0.3", "--analyze-ratios", "0.5"], 2, "Error: --analyze-ratios does not apply without "
     "--analyze"),
    (["--sparsity", "0.3", "--lr", "0.1"], 2, "Error: --lr does not apply without --finetune-epochs (nothing is "
     "trained); it is an option of the fine-tuning"),
    (["--layer-ratios", "0.1,0.2", "--sparsity", "0.5"], 2, "cannot be combined with --sparsity"),
    ([], 2, "--method l1-struct needs --sparsity, --target-macs or --layer-ratios"),
])
def test_bad_options_fail_with_one_line(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path, args: list,
                                        code: int, message: str) -> None:
    r = cli("prune", trained_pt, "--data", cifar_small, "-o", tmp_path / "x.pt", *args)
    assert r.code == code and message in r.stderr, r.stderr
    assert r.stderr.startswith("Error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("extra", [["--global"], ["--iterative"], ["--teacher", "t.pt"], ["--finetune-epochs", "3"],
                                   ["-o", "x.pt"], ["--layer-ratios", "0.5"], ["--data-path", "pil"],
                                   ["--device", "cpu"], ["--lr", "0.1"]])
def test_analyze_refuses_what_only_pruning_reads(cli, trained_pt: Path, cifar_small: Path, workdir: Path,
                                                 extra: list[str]) -> None:
    """--analyze writes no model and trains nothing (issue 19: it took all of these and ignored them)."""
    r = cli("prune", trained_pt, "--analyze", "--sparsity", "0.3", "--data", cifar_small, *extra)
    flag = "--output" if extra[0] == "-o" else extra[0]
    assert r.code == 2, r.stderr
    assert r.stderr.splitlines()[0] == f"Error: {flag} does not apply to --analyze, which measures and writes no " \
                                       f"model; it is an option of prune without --analyze"
    assert r.stdout == "" and not list(workdir.iterdir())


def test_analyze_ranks_only_by_channel_norms(cli, trained_pt: Path, cifar_small: Path) -> None:
    r = cli("prune", trained_pt, "--analyze", "--method", "sfp", "--sparsity", "0.3", "--data", cifar_small)
    assert r.code == 2
    assert r.stderr.splitlines()[0] == "Error: --method sfp does not apply to --analyze; it is an option of prune " \
                                       "without --analyze (--analyze ranks channels as --method l1-struct, l2-struct)"


def test_layer_ratio_count_must_fit_the_model(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    r = cli("prune", trained_pt, "--data", cifar_small, *FEW, "-o", tmp_path / "x.pt", "--layer-ratios", "0.1,0.2")
    assert r.code == 2
    assert "--layer-ratios has 2 values; this model takes 3 (one per stage: layer1, layer2, layer3) or 9 (one " \
           "per residual block) or 12 (one per prunable layer)" in r.stderr


def test_onnx_input_and_foreign_teacher_are_refused(cli, trained_pt: Path, cifar_small: Path,
                                                    tmp_path: Path) -> None:
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not needed: the suffix alone decides")
    r = cli("prune", onnx_file, "--data", cifar_small, "--sparsity", "0.5")
    assert r.code == 3 and "m.onnx is a .onnx file; this command takes .pt" in r.stderr
    assert "Hint: prune the .pt checkpoint" in r.stderr

    # A teacher that predicts other classes than the data has (here: the same names, another order).
    ckpt = load_checkpoint(trained_pt)
    ckpt["classes"] = list(reversed(ckpt["classes"]))
    teacher = tmp_path / "other.pt"
    save_checkpoint(ckpt, teacher)
    r = cli("prune", trained_pt, "--data", cifar_small, *FEW, "--sparsity", "0.5", "--finetune-epochs", "1",
            "--teacher", teacher, "-o", tmp_path / "x.pt")
    assert r.code == 4 and "teacher other.pt was trained on classes ['truck'" in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_output_may_not_overwrite_the_parent(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    parent = tmp_path / "p.pt"
    shutil.copy(trained_pt, parent)
    before = sha256_file(parent)
    r = cli("prune", parent, "--data", cifar_small, "--sparsity", "0.5", "-o", parent)
    assert r.code == 2 and "is the same file as the input" in r.stderr
    assert sha256_file(parent) == before


def test_same_seed_same_pruned_weights(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    for name, seed in (("a.pt", 5), ("b.pt", 5), ("c.pt", 6)):
        _prune(cli, trained_pt, cifar_small, tmp_path / name, "--sparsity", "0.5", "--finetune-epochs", "1",
               "--seed", seed)
    a, b, c = (load_checkpoint(tmp_path / n)["state_dict"] for n in ("a.pt", "b.pt", "c.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a), "another seed must give other fine-tuned weights"
