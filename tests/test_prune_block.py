"""Block (depth) pruning on real CIFAR-10 images: the least important residual blocks leave, the checkpoint
records the blocks per stage and rebuilds from them, and the result takes every later command unchanged."""

from __future__ import annotations

from pathlib import Path

import torch

from resopt.models import build_model, count_macs, model_from_checkpoint, stage_depths
from resopt.prune.block import removable_blocks, score_blocks

FEW = ["--limit-per-class", "5", "--batch-size", "25"]


def _prune(cli, parent: Path, data: Path, out: Path, *args: object) -> dict:
    r = cli("prune", parent, "--data", data, *FEW, "-o", out, "--json", *args)
    assert r.code == 0, r.stderr
    return r.json()


def test_removable_blocks_are_never_a_stages_first() -> None:
    # ResNet-20: 3 stages of 3 blocks; resnet18 (torchvision): 4 of 2, layer1.0 has an identity shortcut too.
    assert [(s, i) for _, s, i in removable_blocks(build_model("resnet20", 10, width=0.25))] == \
        [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]
    assert [f"{n}.{i}" for n, _, i in removable_blocks(build_model("resnet18", 10, width=0.25))] == \
        ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert stage_depths(build_model("resnet50", 10, width=0.25, blocks=[1, 2, 3, 1])) == [1, 2, 3, 1]


def test_score_bypasses_each_block_once() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, width=0.25).eval()
    for m in model.modules():  # undo the zero-init of each branch's last BN: every block then changes the output
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    x, y = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    scores = score_blocks(model, x, y, input_size=32)
    assert len(scores) == 6 and all(b.loss_change != 0 for b in scores)
    assert [b.loss_change for b in scores] == sorted(b.loss_change for b in scores)
    # A block's MACs: two 3x3 convs at its stage's width and resolution (4 channels at 32x32 in stage 1).
    assert next(b for b in scores if b.name == "layer1.1").macs == 2 * 32 * 32 * 4 * 4 * 9


def test_block_prune_exports_quantizes_and_composes(cli, trained_pt: Path, cifar_small: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "b3.pt"
    d = _prune(cli, trained_pt, cifar_small, out, "--method", "block", "--blocks", "3", "--finetune-epochs", "1")
    assert any(n.startswith("removed 3 of 9 blocks (stage 1: ") for n in d["notes"])
    assert d["teacher"] == str(trained_pt)  # distilled from the unpruned parent by default
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    depths = ckpt["arch_kwargs"]["blocks"]
    assert sum(depths) == 6 and all(1 <= k <= 3 for k in depths)
    record = ckpt["metrics"]["blocks"]
    assert len(record["removed"]) == 3 and len(record["importance"]) == 6
    # The three least important by the measured val loss change are the ones removed.
    ranked = sorted(record["importance"], key=lambda b: (b["val_loss_change"], -b["val_top1_change"]))
    assert sorted(record["removed"]) == sorted(b["block"] for b in ranked[:3])
    model = model_from_checkpoint(ckpt)
    assert stage_depths(model) == depths and count_macs(model, 32) == d["after"]["macs"]
    # Each ResNet-20 block past a stage's first has the same MACs: a third of the block MACs are gone.
    assert 0.6 < d["macs_fraction"] < 0.72
    entry = ckpt["lineage"][-1]
    assert entry["options"]["teacher_is_parent"] and entry["options"]["blocks"] == 3

    # Export, quantize and info take it unchanged.
    r = cli("export", out, "-o", tmp_path / "b3.onnx", "--exporter", "torchscript", "--data", cifar_small,
            "--num-verify", 10, "--json")
    assert r.code == 0, r.stderr
    r = cli("quantize", tmp_path / "b3.onnx", "-o", tmp_path / "b3.int8.onnx", "--calib-data", cifar_small,
            "--num-calib", 32, "--data", cifar_small, "--limit-per-class", 4, "--min-agreement", 50)
    assert r.code == 0, r.stderr
    r = cli("info", out, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["details"]["arch_kwargs"]["blocks"] == depths
    r = cli("info", tmp_path / "b3.int8.onnx")
    assert r.code == 0 and "prune" in r.stdout, r.stderr

    # Then channel pruning of the block-pruned model: the depths stay, the widths shrink.
    d2 = _prune(cli, out, cifar_small, tmp_path / "b3.c.pt", "--sparsity", "0.5", "--finetune-epochs", "1",
                "--no-distill")
    ckpt2 = torch.load(tmp_path / "b3.c.pt", map_location="cpu", weights_only=True)
    assert ckpt2["arch_kwargs"]["blocks"] == depths and ckpt2["widths"]["layer1.0.conv1"] == [4, 4, 1]
    assert d2["after"]["macs"] < 0.3 * d["after"]["macs"] and d2["teacher"] is None
    assert stage_depths(model_from_checkpoint(ckpt2)) == depths


def test_block_target_macs_removes_until_reached(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    d = _prune(cli, trained_pt, cifar_small, tmp_path / "m.pt", "--method", "block", "--target-macs", "0.8")
    # A block is ~1/9.4 of ResNet-20's MACs: two blocks reach 0.8, one does not.
    assert 0.7 < d["macs_fraction"] <= 0.8 and any(n.startswith("removed 2 of 9") for n in d["notes"])


def test_block_refusals(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    for args, message in (
        (["--method", "block", "--blocks", "7"], "Error: --blocks 7: this model has 6 removable blocks"),
        (["--method", "block"],
         "Error: --method block needs --blocks, --target-macs, --target-latency or --latency-ms"),
        (["--method", "block", "--sparsity", "0.3"], "Error: --sparsity does not apply to --method block"),
        (["--sparsity", "0.3", "--blocks", "2"], "Error: --blocks does not apply to --method l1-struct; it is an "
         "option of --method block"),
        (["--method", "block", "--blocks", "2", "--target-macs", "0.5"], "--blocks and --target-macs are "
         "alternatives"),
        (["--method", "block", "--target-macs", "0.2"], "Error: --target-macs cannot be reached by removing blocks"),
    ):
        r = cli("prune", trained_pt, "--data", cifar_small, *FEW, "-o", tmp_path / "x.pt", *args)
        # The block count is known once the model is loaded: those two come after the parent's measurement.
        assert r.code == 2 and message in r.stderr and r.stderr.count("Error:") == 1, (args, r.stderr)
        assert not (tmp_path / "x.pt").exists()


def test_distillation_options_depend_on_each_other(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    for args, message in (
        (["--finetune-epochs", "1", "--no-distill", "--alpha", "0.3"], "Error: --alpha does not apply with "
         "--no-distill; it is an option of the distillation during fine-tuning"),
        (["--finetune-epochs", "1", "--no-distill", "--teacher", trained_pt], "Error: --teacher does not apply "
         "with --no-distill"),
        (["--no-distill"], "Error: --no-distill does not apply without --finetune-epochs"),
    ):
        r = cli("prune", trained_pt, "--data", cifar_small, *FEW, "--sparsity", "0.3", "-o", tmp_path / "x.pt",
                *args)
        assert r.code == 2 and r.stderr.startswith(message), (args, r.stderr)
