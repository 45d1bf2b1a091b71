"""The TensorRT Q/DQ flavour, the Q/DQ lint and the accuracy guard, on real CIFAR-10 images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO, copy_to
from onnx import numpy_helper

from resopt.artifacts import read_onnx_meta
from resopt.onnx_utils import onnx_macs
from resopt.quantize.guard import exclusion_steps, sqnr_db
from resopt.quantize.lint import lint_qdq


@pytest.fixture(scope="module")
def fp32_onnx(r20_onnx_session: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's exported model, copied: tests here write their results next to it."""
    return copy_to(r20_onnx_session, tmp_path_factory.mktemp("guard"))


@pytest.fixture(scope="module")
def converged_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converged CIFAR-10 ResNet-20 shipped in models/ (81% top-1), imported and exported by resopt: its
    INT8 result clears the default 90% agreement gate with a wide margin (98% on the 10,000 test images,
    README's import table), where the 3-epoch session model sits on the gate (86-88%)."""
    from conftest import CLASSES

    from resopt.export import ExportConfig, export_onnx
    from resopt.importer import ImportConfig, import_model

    folder = tmp_path_factory.mktemp("converged")
    calib = str(REPO / "calib" / "cifar10")
    import_model(REPO / "models" / "resnet20-cifar10-akamaster.th", folder / "r20.pt",
                 ImportConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), classes=",".join(CLASSES)))
    export_onnx(folder / "r20.pt", folder / "r20.onnx", ExportConfig(data=calib, num_verify=32))
    return folder / "r20.onnx"


@pytest.fixture(scope="module")
def trt_and_cpu(converged_onnx: Path, r20_int8_session: Path) -> tuple[Path, Path]:
    """A TensorRT-flavour INT8 file, gated at the default 90% agreement, and the session's cpu INT8 file."""
    from resopt.quantize import QuantizeConfig, quantize_model

    trt = converged_onnx.with_name("r20.trt.onnx")
    calib = str(REPO / "calib" / "cifar10")
    result = quantize_model(converged_onnx, trt, QuantizeConfig(target="trt", num_calib=64, calib_data=calib,
                                                                min_agreement=90.0))
    assert trt.exists(), result
    return trt, r20_int8_session


def _graph(path: Path):
    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    return model, init, producer


def test_trt_flavour_is_symmetric_int8_and_covers_residual_adds(trt_and_cpu):
    trt, _ = trt_and_cpu
    model, init, producer = _graph(trt)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        zp = init[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), f"{n.name}: TensorRT needs symmetric int8"
    adds = [n for n in model.graph.node if n.op_type == "Add" and all(i not in init for i in n.input)]
    assert len(adds) == 9  # ResNet-20: one residual add per block
    for add in adds:
        assert [producer[i].op_type for i in add.input] == ["DequantizeLinear"] * 2, add.name
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = producer[conv.input[1]]
        assert dq.op_type == "DequantizeLinear" and init[dq.input[1]].shape == (init[dq.input[0]].shape[0],)
        if len(conv.input) > 2:
            assert conv.input[2] in init and init[conv.input[2]].dtype == np.float32, "biases stay FP32"
    lint = lint_qdq(model, target="trt")
    assert lint.issues == () and lint.activation_types == ("int8",)
    meta = read_onnx_meta(trt)
    assert meta["quantization"]["target"] == "trt" and meta["quantization"]["activations"] == "int8 symmetric"


def test_lint_finds_what_breaks_trt_rules(trt_and_cpu):
    _, cpu = trt_and_cpu  # uint8 activations with zero points and int32 bias DQ: not a TensorRT graph
    lint = lint_qdq(onnx.load(str(cpu)), target="trt")
    assert any("uint8 Q/DQ" in i for i in lint.issues)
    assert any("int32 Q/DQ" in i for i in lint.issues)
    assert lint_qdq(onnx.load(str(cpu)), target="cpu").issues == ()


def test_lint_counts_match_the_graph(fp32_onnx, trt_and_cpu):
    _, cpu = trt_and_cpu
    model, init, producer = _graph(cpu)
    lint = lint_qdq(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    int8_convs = [n for n in convs if producer.get(n.input[0]) is not None
                  and producer[n.input[0]].op_type == "DequantizeLinear"
                  and producer[n.input[1]].op_type == "DequantizeLinear"]
    assert lint.counts["Conv"] == (len(int8_convs), len(convs)) == (21, 21)
    assert lint.counts["Add"] == (9, 9) and lint.counts["Gemm"] == (1, 1)
    assert lint.total_macs == onnx_macs(onnx.load(str(fp32_onnx)))
    assert lint.int8_mac_fraction == 1.0
    fp32_lint = lint_qdq(onnx.load(str(fp32_onnx)))
    assert fp32_lint.int8_macs == 0 and all("is float" in la.reason for la in fp32_lint.layers)


def test_excluded_layer_is_reported_with_its_reason_and_macs(cli, fp32_onnx, workdir):
    model = onnx.load(str(fp32_onnx))
    first = next(n.name for n in model.graph.node if n.op_type == "Conv")
    r = cli("quantize", fp32_onnx, "-o", "ex.onnx", "--exclude", first, "--num-calib", "32", "--json")
    assert r.code == 0, r.stderr
    lint = r.json()["lint"]
    assert [(la["name"], la["reason"]) for la in lint["not_int8"]] == [(first, "--exclude")]
    row = next(la for la in lint["layers"] if la["name"] == first)
    assert lint["int8_macs"] == lint["total_macs"] - row["macs"]
    assert 0 < lint["int8_mac_fraction"] < 1
    assert read_onnx_meta("ex.onnx")["metrics"]["int8_mac_fraction"] == lint["int8_mac_fraction"]
    r = cli("quantize", fp32_onnx, "-o", "ex2.onnx", "--exclude", first, "--num-calib", "32")
    assert f"FP32 Conv {first}: --exclude" in r.stdout


# ---------------------------------------------------------------------------------------- guard


def test_guard_helpers():
    assert exclusion_steps(10) == [1, 2, 3, 4, 6, 9, 10]
    assert exclusion_steps(1) == [1] and exclusion_steps(0) == []
    x = np.ones((4, 10), np.float32)
    assert sqnr_db(x, x) == 200.0
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0, abs=1e-3)  # noise 0.1 of the signal: 20 dB


def test_guard_keeps_sensitive_layers_in_fp32_until_the_drop_is_met(cli, fp32_onnx, cifar_small, workdir):
    # 2-bit weights lose most of the accuracy; keeping layers in FP32 recovers it. The allowed drop is half
    # the 2-bit drop, and the guard may keep every layer in FP32 (--max-exclude 22, drop ~0), so it is
    # reachable and needs at least one layer in FP32.
    common = ["--mode", "fixed", "--bits", "2", "--data", cifar_small, "--limit-per-class", "10"]
    r = cli("quantize", fp32_onnx, "-o", "f2.onnx", *common, "--json")
    assert r.code == 0, r.stderr
    base = r.json()
    base_drop = base["parent"]["top1"] - base["result"]["top1"]
    assert base_drop >= 4.0, "2-bit weights must cost accuracy for this test to mean anything"
    allowed = f"{base_drop / 2:.2f}"
    r = cli("quantize", fp32_onnx, "-o", "g.onnx", *common, "--max-drop", allowed, "--max-exclude", "22", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    g = d["guard"]
    assert g["excluded"] and d["excluded"] == g["excluded"]
    assert g["drop"] <= float(allowed)
    # The guard decides on the validation images the model's lineage records (4 per class of cifar_small's
    # train/ held out), never on test: its drops are the ones this test measures itself on those images.
    from resopt.artifacts import Preprocess
    from resopt.backends.ort_backend import onnx_predict
    from resopt.data import load_val_set, stack_images

    meta = read_onnx_meta(fp32_onnx)
    val, _ = load_val_set(cifar_small, Preprocess.from_dict(meta["preprocess"]), lineage=meta["lineage"],
                          per_class=10)
    x, y = (t.numpy() for t in stack_images(val))
    assert len(y) == 40

    def val_top1(path) -> float:
        return 100.0 * float((onnx_predict(path)(x).argmax(1) == y).mean())

    fp32_val = val_top1(fp32_onnx)
    assert g["parent_top1"] == pytest.approx(fp32_val, abs=1e-3)
    assert g["drop"] == pytest.approx(fp32_val - val_top1("g.onnx"), abs=1e-3)
    assert g["steps"][0]["excluded"] == 0
    assert g["steps"][0]["drop"] == pytest.approx(fp32_val - val_top1("f2.onnx"), abs=1e-3)
    m = read_onnx_meta("g.onnx")["metrics"]
    assert (m["guard_split"], m["guard_images"], m["split"], m["eval_images"]) == ("val", 40, "test", 100)
    # Worst first: the excluded layers are the lowest-SQNR ones, in ranking order.
    ranked = [s["node"] for s in g["sensitivity_db"]]
    assert g["excluded"] == ranked[:len(g["excluded"])]
    sqnrs = [s["sqnr_db"] for s in g["sensitivity_db"]]
    assert sqnrs == sorted(sqnrs)
    opts = read_onnx_meta("g.onnx")["lineage"][-1]["options"]
    assert opts["max_drop"] == float(allowed) and opts["guard_excluded"] == g["excluded"]
    model = onnx.load("g.onnx")
    init_names = {i.name for i in model.graph.initializer}
    fp32_layers = {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in init_names}
    assert fp32_layers == set(g["excluded"]), "exactly the excluded layers keep FP32 weights"


def test_guard_fails_with_exit_code_7_when_no_setting_meets_the_drop(cli, fp32_onnx, cifar_small, workdir):
    r = cli("quantize", fp32_onnx, "-o", "g2.onnx", "--mode", "fixed", "--bits", "2", "--data", cifar_small,
            "--limit-per-class", "10", "--max-drop", "0.5", "--max-exclude", "1")
    assert r.code == 7
    line = r.stderr.splitlines()[-2]
    assert line.startswith("Error: no setting met --max-drop 0.5: best top-1 drop ")
    assert "tried 0 in FP32: " in line and "1 in FP32: " in line
    assert r.stderr.splitlines()[-1].startswith("Hint: allow more layers in FP32 (--max-exclude, now 1)")
    assert not Path("g2.onnx").exists()


def test_int8_guard_met_without_exclusions(cli, fp32_onnx, cifar_small, workdir):
    r = cli("quantize", fp32_onnx, "-o", "g3.onnx", "--data", cifar_small, "--limit-per-class", "5",
            "--num-calib", "32", "--max-drop", "100", "--json")
    assert r.code == 0, r.stderr
    g = r.json()["guard"]
    assert len(g["steps"]) == 1 and g["excluded"] == [] and g["sensitivity_db"] == []


@pytest.mark.parametrize(("args", "expected"), [
    (["--max-drop", "1"], "Error: --max-drop measures the top-1 drop on the --data validation split; pass --data"),
    (["--mode", "fp16", "--max-drop", "1", "--data", "x"],
     "Error: --max-drop does not apply to --mode fp16; it is an option of --mode int8, fixed"),
    (["--max-exclude", "2"], "Error: --max-exclude bounds the accuracy guard"),
    (["--mode", "fp16", "--target", "trt"], "Error: --target does not apply to --mode fp16; it is an option of "
                                            "--mode int8, qat"),
])
def test_guard_option_errors(cli, fp32_onnx, workdir, args, expected):
    r = cli("quantize", fp32_onnx, "-o", "x.onnx", *args)
    assert r.code == 2 and r.stderr.startswith(expected), r.stderr


def test_lint_json_roundtrip(trt_and_cpu):
    trt, _ = trt_and_cpu
    s = lint_qdq(onnx.load(str(trt)), target="trt").summary()
    assert json.loads(json.dumps(s))["counts"]["Conv"] == [21, 21]
