"""``resopt export``: parity with PyTorch on real images, dynamic batch, metadata, lineage, errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import CLASSES, make_subset, randomize_bn
from torch import nn

from resopt.artifacts import (
    Preprocess,
    lineage_entry,
    load_checkpoint,
    make_checkpoint,
    read_onnx_meta,
    save_checkpoint,
    sha256_file,
)
from resopt.export import ExportConfig, export_onnx
from resopt.models import apply_widths, build_model, count_macs, model_widths


def _checkpoint(path: Path, arch: str, *, width: float, size: int, widths: dict | None = None) -> nn.Module:
    """A checkpoint with trained-looking BatchNorm statistics (so folding matters), without training."""
    torch.manual_seed(0)
    model = build_model(arch, len(CLASSES), width=width)
    if widths:
        apply_widths(model, widths)
    randomize_bn(model, seed=1)
    pre = Preprocess(size, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), None if size <= 32 else int(size / 0.875))
    ckpt = make_checkpoint(arch=arch, arch_kwargs={"width": width}, state_dict=model.state_dict(),
                           classes=CLASSES, preprocess=pre, lineage=[lineage_entry("train", options={})],
                           widths=model_widths(model))
    save_checkpoint(ckpt, path)
    return model.eval()


def _folded_params(model: nn.Module) -> int:
    return sum(m.weight.numel() + (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def _ort(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def r20_onnx(tmp_path_factory: pytest.TempPathFactory, trained_pt: Path) -> tuple[Path, Path]:
    """The session's trained ResNet-20 copied and exported with the defaults (verified on calib/)."""
    folder = tmp_path_factory.mktemp("export")
    pt = folder / "r20.pt"
    shutil.copy(trained_pt, pt)
    from resopt.cli import run

    assert run(["export", str(pt)]) == 0  # -o omitted: r20.onnx next to r20.pt
    return pt, folder / "r20.onnx"


def test_default_export_metadata_and_lineage(r20_onnx: tuple[Path, Path]) -> None:
    pt, out = r20_onnx
    assert out.exists()
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert next(o.version for o in model.opset_import if o.domain == "") == 18
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # folded into Conv

    ckpt = load_checkpoint(pt)
    meta = read_onnx_meta(model)
    assert set(meta) >= {"arch", "classes", "preprocess", "metrics", "lineage"}
    assert meta["arch"] == "resnet20" and meta["classes"] == CLASSES
    assert meta["preprocess"] == ckpt["preprocess"]
    assert len(meta["lineage"]) == len(ckpt["lineage"]) + 1
    assert meta["lineage"][:-1] == ckpt["lineage"]
    step = meta["lineage"][-1]
    assert step["command"] == "export"
    assert step["parent"] == {"file": "r20.pt", "sha256": sha256_file(pt)}
    assert step["options"]["exporter"] == "dynamo" and step["options"]["num_verify"] == 100
    # No --data: the data recorded in the checkpoint's train step, which still exists.
    assert step["options"]["data"] == ckpt["lineage"][0]["options"]["data"]
    m = step["metrics"]
    assert m["verify_images"] == 100 and m["opset"] == 18 and m["exporter"] == "dynamo"
    assert 0 <= m["max_abs_diff"] < 1e-4 and m["top1_agreement"] == 100.0
    assert m["macs"] == count_macs(build_model("resnet20", 10, width=0.5), 32)


def test_dynamic_batch_matches_pytorch_on_real_images(r20_onnx: tuple[Path, Path], cifar_small: Path) -> None:
    from resopt.artifacts import load_model
    from resopt.data import load_eval_set, stack_images

    pt, out = r20_onnx
    model, ckpt = load_model(pt)
    images, _ = stack_images(load_eval_set(str(cifar_small), Preprocess.from_dict(ckpt["preprocess"])), 8)
    session = _ort(out)
    with torch.no_grad():
        ref = model(images).numpy()
    for batch in (images[:1], images[1:8]):  # batch 1 and batch 7 through the same graph
        got = session.run(None, {"input": batch.numpy()})[0]
        assert got.shape == (len(batch), 10)
        n0 = 0 if len(batch) == 1 else 1
        np.testing.assert_allclose(got, ref[n0:n0 + len(batch)], atol=1e-4, rtol=0)


def test_cli_json_is_the_only_stdout(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "r20.onnx"
    r = cli("export", trained_pt, "-o", out, "--data", cifar_small, "--num-verify", 30, "--tolerance", 0.01,
            "--json")
    assert r.code == 0, r.stderr
    d = r.json()  # what resopt writes to sys.stdout is one JSON document (the process's fd 1: test_process)
    v = d["verification"]
    assert v["images"] == 30 and v["batch_sizes"] == [16, 14]
    assert v["max_abs_diff"] <= v["allowed_abs_diff"] == pytest.approx(0.01 * max(1.0, v["logit_scale"]))
    assert v["max_abs_diff"] < 1e-4 and v["top1_agreement"] == 100.0
    assert v["data"] == str(cifar_small)
    assert d["output"] == str(out) and d["file_size"] == out.stat().st_size
    assert d["batchnorm_nodes"] == 0 and d["ops"]["Conv"] == 21
    assert "verified on 30 images" in r.stderr


def test_torchscript_exporter_at_opset_17(cli, trained_pt: Path, tmp_path: Path) -> None:
    out = tmp_path / "ts.onnx"
    r = cli("export", trained_pt, "-o", out, "--exporter", "torchscript", "--opset", 17, "--num-verify", 20,
            "--json")
    assert r.code == 0, r.stderr
    assert "DeprecationWarning" not in r.stderr
    model = onnx.load(out)
    assert next(o.version for o in model.opset_import if o.domain == "") == 17
    assert r.json()["verification"]["max_abs_diff"] < 1e-4
    assert read_onnx_meta(model)["lineage"][-1]["metrics"]["exporter"] == "torchscript"


@pytest.mark.parametrize(("arch", "width", "size"), [("resnet18-cifar", 0.25, 32), ("resnet50", 0.25, 32)])
def test_other_architectures_export_with_parity(arch: str, width: float, size: int, tmp_path: Path) -> None:
    pt = tmp_path / f"{arch}.pt"
    model = _checkpoint(pt, arch, width=width, size=size)
    res = export_onnx(pt, tmp_path / f"{arch}.onnx", ExportConfig(num_verify=20))
    v = res.verification
    assert v.max_abs_diff / v.logit_scale < 1e-5 and v.top1_agreement == 100.0
    assert res.params == _folded_params(model)
    assert res.macs == count_macs(model, size)
    assert res.batchnorm_nodes == 0


def test_pruned_widths_export(tmp_path: Path) -> None:
    base = build_model("resnet20", 10, width=0.5)
    widths = model_widths(base)
    # Prune the first block's inner channels from 8 to 5, as structured pruning would.
    widths["layer1.0.conv1"] = [widths["layer1.0.conv1"][0], 5, 1]
    widths["layer1.0.bn1"] = [5]
    widths["layer1.0.conv2"] = [5, widths["layer1.0.conv2"][1], 1]
    pt = tmp_path / "pruned.pt"
    model = _checkpoint(pt, "resnet20", width=0.5, size=32, widths=widths)
    res = export_onnx(pt, tmp_path / "pruned.onnx", ExportConfig(num_verify=20, exporter="torchscript"))
    assert res.verification.max_abs_diff < 1e-4
    assert res.params == _folded_params(model) < _folded_params(base)
    w = {t.name: tuple(t.dims) for t in onnx.load(tmp_path / "pruned.onnx").graph.initializer}
    assert (5, 8, 3, 3) in w.values() and (8, 5, 3, 3) in w.values()


def test_exporter_chatter_goes_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    from resopt.export import stdout_to_stderr

    with stdout_to_stderr():
        print("python-level chatter")
        os.write(1, b"C-level chatter\n")  # what a C++ exporter writes straight to file descriptor 1
    print("result")
    out, err = capfd.readouterr()
    assert out == "result\n"
    assert "python-level chatter" in err and "C-level chatter" in err


def test_failed_verification_exits_6_and_writes_nothing(cli, trained_pt: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import resopt.export as export_mod

    real_clean = export_mod.clean_onnx

    def broken_clean(model: onnx.ModelProto) -> onnx.ModelProto:
        """An export bug: the classifier's bias is lost."""
        cleaned = real_clean(model)
        gemm = next(n for n in cleaned.graph.node if n.op_type == "Gemm")
        del gemm.input[2]
        return cleaned

    monkeypatch.setattr(export_mod, "clean_onnx", broken_clean)
    out = tmp_path / "bad.onnx"
    r = cli("export", trained_pt, "-o", out, "--num-verify", 20)
    assert r.code == 6
    assert r.stderr.splitlines()[-2].startswith("Error: onnxruntime differs from PyTorch by up to ")
    assert "on 20 images of" in r.stderr
    assert "> allowed" in r.stderr and "top-1 agreement" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".bad.onnx.*"))


@pytest.mark.parametrize(("args", "code", "line"), [
    (["--opset", "17"], 2, "Error: --opset 17 needs --exporter torchscript"),
    (["--opset", "16", "--exporter", "torchscript"], 2, "Error: --opset 16 is outside the supported range 17.."),
    (["--exporter", "jit"], 2, "Error: unknown exporter 'jit'; choose one of: dynamo, torchscript"),
    (["--num-verify", "1"], 2, "Error: --num-verify must be at least 2"),
    (["--tolerance", "0"], 2, "Error: --tolerance must be a positive number"),
    (["-o", "x.pt"], 2, "Error: output x.pt must end in .onnx"),
])
def test_option_errors(cli, trained_pt: Path, workdir: Path, args: list[str], code: int, line: str) -> None:
    r = cli("export", trained_pt, *args)
    assert r.code == code
    assert r.stderr.startswith(line), r.stderr
    assert not list(workdir.iterdir())


def test_input_file_errors(cli, workdir: Path, trained_pt: Path) -> None:
    r = cli("export", "missing.pt")
    assert (r.code, r.stderr.splitlines()[0]) == (3, "Error: missing.pt does not exist")

    Path("model.onnx").write_bytes(b"not really")
    r = cli("export", "model.onnx")
    assert r.code == 3 and r.stderr.startswith("Error: model.onnx is a .onnx file; this command takes .pt")
    assert "Hint: model.onnx is already exported" in r.stderr

    Path("corrupt.pt").write_bytes(os.urandom(4096))
    r = cli("export", "corrupt.pt")
    assert r.code == 3 and r.stderr.startswith("Error: corrupt.pt is not a readable PyTorch checkpoint")
    assert not Path("corrupt.onnx").exists()

    # An output that is the input under another name (a symlink) is refused before anything runs.
    shutil.copy(trained_pt, "r20.pt")
    os.symlink("r20.pt", "alias.onnx")
    r = cli("export", "r20.pt", "-o", "alias.onnx")
    assert r.code == 2 and r.stderr.startswith("Error: output alias.onnx is the same file as the input")
    assert load_checkpoint(Path("r20.pt"))["arch"] == "resnet20"


def test_data_errors(cli, trained_pt: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import resopt.calib as calib_mod

    monkeypatch.setattr(calib_mod, "default_calib_dirs", lambda: [])
    monkeypatch.setattr(calib_mod, "_has_classes", lambda spec, classes: False)  # the train data is gone
    r = cli("export", trained_pt, "-o", "x.onnx")
    assert r.code == 4
    assert r.stderr.startswith("Error: no shipped calibration set matches the model's 10 classes"), r.stderr
    assert "looked at: none found" in r.stderr and "Hint: pass --data" in r.stderr

    three = make_subset(workdir / "three", 1, 3, classes=CLASSES[:3])
    r = cli("export", trained_pt, "-o", "x.onnx", "--data", three)
    assert r.code == 4 and r.stderr.startswith(f"Error: the checkpoint predicts 10 classes but data {three} has 3")
    assert not Path("x.onnx").exists()
