"""k-means clustering, fixed point and QAT on real CIFAR-10 images, from .onnx and .pt inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import copy_to
from onnx import numpy_helper

from resopt.artifacts import read_onnx_meta, sha256_file, stamp_onnx
from resopt.quantize.fixed import fixed_format, to_fixed
from resopt.quantize.kmeans import distinct_values_per_weight, kmeans_1d


@pytest.fixture(scope="module")
def fp32_onnx(r20_onnx_session: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's exported model, copied: tests here write their results next to it."""
    return copy_to(r20_onnx_session, tmp_path_factory.mktemp("modes"))


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


# ------------------------------------------------------------------------------------------ kmeans


def test_kmeans_1d_is_optimal_on_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([-1.0, 0.0, 0.5, 2.0])
    x = (centers[rng.integers(0, 4, 4000)] + rng.normal(0, 0.01, 4000)).astype(np.float32)
    codebook, idx = kmeans_1d(x, 4)
    np.testing.assert_allclose(np.sort(codebook), centers, atol=0.01)
    assert idx.dtype == np.uint8 and np.abs(codebook[idx.astype(int)] - x).max() < 0.06
    few = np.array([0.5, -0.5, 0.5], np.float32)  # fewer distinct values than clusters: exact
    cb, ix = kmeans_1d(few, 8)
    np.testing.assert_array_equal(cb[ix.astype(int)], few)


@pytest.mark.parametrize("k", [16, 256])
def test_kmeans_at_most_k_values_per_layer_and_4x_smaller(cli, fp32_onnx, cifar_small, workdir, k):
    r = cli("quantize", fp32_onnx, "--mode", "kmeans", "--clusters", k, "-o", f"km{k}.onnx", "--data",
            cifar_small, "--limit-per-class", "10", "--min-agreement", "0", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    model = onnx.load(f"km{k}.onnx")
    distinct = distinct_values_per_weight(model)
    assert all(2 <= v <= k for v in distinct.values())
    w = _weights(model)
    layer_weights = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layer_weights) == 22
    for name in layer_weights:  # every layer is clustered, unless it has no more than k weights anyway
        assert name in distinct or (name in w and w[name].size <= k)
    assert len(distinct) >= 20
    for name in distinct:
        assert w[f"{name}__index"].dtype == np.uint8 and w[f"{name}__codebook"].shape[0] <= k
    fp32 = _weights(onnx.load(str(fp32_onnx)))
    assert sum(fp32[n].nbytes for n in distinct) == 4 * sum(w[f"{n}__index"].nbytes for n in distinct)
    # Codebooks (k floats per layer) are the overhead; on this 68k-parameter model 256 of them weigh 1 KB
    # against layers of 1-9k weights, on a full-size ResNet they vanish (see scripts/bench_quant.py).
    fp32_bytes = sum(a.nbytes for a in fp32.values() if a.ndim >= 2)
    km_bytes = sum(a.nbytes for n, a in w.items() if a.ndim >= 2 or n.endswith("__codebook"))
    assert fp32_bytes / km_bytes > (3.8 if k == 16 else 3.0)
    assert d["result"]["size_bytes"] < d["parent"]["size_bytes"] / 2.5
    if k == 256:  # 256 shared values per layer barely change a network
        assert d["agreement"] >= 95.0
    assert d["agreement_images"] == 100 and read_onnx_meta(f"km{k}.onnx")["quantization"]["clusters"] == k


def test_kmeans_from_checkpoint_exports_first(cli, trained_pt, workdir):
    r = cli("quantize", trained_pt, "--mode", "kmeans", "-o", "kmpt.onnx", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["parent"]["file"].endswith("r20.pt (as FP32 ONNX)")
    lineage = read_onnx_meta("kmpt.onnx")["lineage"]
    assert [e["command"] for e in lineage] == ["train", "export", "quantize"]
    assert lineage[-1]["parent"]["sha256"] == sha256_file(trained_pt)
    assert distinct_values_per_weight(onnx.load("kmpt.onnx"))


@pytest.mark.parametrize("clusters", ["1", "257"])
def test_clusters_out_of_range(cli, fp32_onnx, workdir, clusters):
    r = cli("quantize", fp32_onnx, "--mode", "kmeans", "--clusters", clusters, "-o", "x.onnx")
    assert r.code == 2
    assert r.stderr.startswith(f"Error: --clusters must be in [2, 256] (uint8 indices), got {clusters}")


# -------------------------------------------------------------------------------------- fixed point


def test_fixed_format_choice():
    f = fixed_format(0.9, 8, signed=True)  # |x| < 1: no integer bits, 7 fractional bits
    assert (f.frac, f.qmin, f.qmax) == (7, -128, 127)
    assert fixed_format(3.2, 8, signed=False).frac == 6  # 2 integer bits of 8
    assert fixed_format(3.2, 4, signed=True).frac == 1
    x = np.array([0.3, -0.9, 5.0])
    np.testing.assert_array_equal(to_fixed(x, f), [38, -115, 127])


def test_fixed_point_weights_and_activations(cli, fp32_onnx, cifar_small, workdir):
    common = ["--data", cifar_small, "--limit-per-class", "10", "--json"]
    r8 = cli("quantize", fp32_onnx, "--mode", "fixed", "--bits", "8", "-o", "fx8.onnx", *common)
    r4 = cli("quantize", fp32_onnx, "--mode", "fixed", "--bits", "4", "--act-bits", "6", "-o", "fx4.onnx", *common)
    assert r8.code == 0 and r4.code == 0, r8.stderr + r4.stderr
    d8, d4 = r8.json(), r4.json()
    assert d8["agreement"] > d4["agreement"] and d8["agreement"] >= 90.0
    model = onnx.load("fx4.onnx")
    w = _weights(model)
    weights = [n for n in w if n.endswith("__fixed")]
    assert len(weights) == 22
    for n in weights:
        q, scale = w[n], float(w[n + "_scale"])
        assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7, "4-bit values"
        assert np.log2(scale) == int(np.log2(scale)), "the scale is a power of two"
    clips = [n for n in model.graph.node if n.op_type == "Clip" and n.name.endswith("__fx_clip")]
    assert len(clips) >= 20
    for c in clips:
        lo, hi, scale = (float(w[i]) for i in (c.input[1], c.input[2], c.name[:-len("_clip")] + "_scale"))
        assert hi / scale in (31.0, 63.0) and lo / scale in (-32.0, 0.0), "6-bit range"
    assert d4["lint"]["counts"]["Conv"] == [21, 21]
    assert all(fmt["weight"].startswith("s4.") for fmt in d4["formats"].values())
    r = cli("quantize", fp32_onnx, "--mode", "fixed", "--bits", "9", "-o", "x.onnx")
    assert r.code == 2 and r.stderr.startswith("Error: --bits must be in [2, 8], got 9")


# ---------------------------------------------------------------------------------------------- QAT


@pytest.mark.slow
def test_qat_onnx_matches_its_fake_quant_model(cli, trained_pt, cifar_small, workdir):
    r = cli("quantize", trained_pt, "--mode", "qat", "--epochs", "1", "--batch-size", "64", "--data", cifar_small,
            "--limit-per-class", "10", "-o", "qat.onnx", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    qat = d["qat"]
    assert d["agreement_with"] == "fake-quant PyTorch model" and d["agreement"] >= 90.0
    # The deployed INT8 ONNX reproduces the PyTorch fake-quant model it was trained as.
    assert abs(d["result"]["top1"] - qat["top1_qat_fakequant"]) <= 3.0
    assert d["parent"]["top1"] == qat["top1_fp32"] and 0.0 < qat["top1_ptq"] <= 100.0
    model = onnx.load("qat.onnx")
    assert d["lint"]["counts"]["Conv"] == [21, 21]
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    import onnxruntime as ort

    sess = ort.InferenceSession("qat.onnx", providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 10)
    entry = read_onnx_meta("qat.onnx")["lineage"][-1]
    assert entry["options"]["mode"] == "qat" and entry["options"]["train"]["epochs"] == 1
    assert entry["metrics"]["top1_ptq"] == qat["top1_ptq"]


@pytest.mark.slow
def test_qat_same_seed_same_weights(cli, trained_pt, cifar_small, workdir):
    args = ["quantize", trained_pt, "--mode", "qat", "--epochs", "1", "--batch-size", "50", "--data", cifar_small,
            "--limit-per-class", "5", "--num-calib", "20"]
    for name in ("a.onnx", "b.onnx"):  # two runs of 20 s each on 2 cores: no third run with another seed
        r = cli(*args, "--seed", 1, "-o", name)
        assert r.code == 0, r.stderr
    a, b = (_weights(onnx.load(n)) for n in ("a.onnx", "b.onnx"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_qat_select_keeps_the_last_epoch_as_train_does(cli, trained_pt, cifar_small, workdir):
    """``--select`` is train's: ``last`` keeps the last of the 2 epochs (not the best on val), and is recorded."""
    r = cli("quantize", trained_pt, "--mode", "qat", "--epochs", "2", "--batch-size", "50", "--data", cifar_small,
            "--limit-per-class", "3", "--num-calib", "20", "--select", "last", "-o", "last.onnx", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["qat"]["best_epoch"] == 2
    assert read_onnx_meta("last.onnx")["lineage"][-1]["options"]["train"]["select"] == "last"
    r = cli("quantize", trained_pt, "--mode", "qat", "--data", cifar_small, "--select", "worst", "-o", "x.onnx")
    assert r.code == 2 and r.stderr.startswith("Error: unknown --select 'worst'"), r.stderr
    r = cli("quantize", trained_pt, "--mode", "kmeans", "--select", "last", "-o", "x.onnx")
    assert r.code == 2 and r.stderr.startswith("Error: --select does not apply to --mode kmeans"), r.stderr


def test_qat_needs_a_checkpoint_and_data(cli, fp32_onnx, trained_pt, workdir):
    r = cli("quantize", fp32_onnx, "--mode", "qat", "--data", "x", "-o", "x.onnx")
    assert r.code == 2 and r.stderr.startswith("Error: --mode qat fine-tunes in PyTorch; it takes the .pt")
    r = cli("quantize", trained_pt, "--mode", "qat", "-o", "x.onnx")
    assert r.code == 2 and r.stderr.startswith("Error: --mode qat fine-tunes on the --data train split")


def test_static_int8_without_a_matching_calibration_set(cli, fp32_onnx, workdir):
    model = onnx.load(str(fp32_onnx))
    meta = read_onnx_meta(model)
    meta["classes"] = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    stamp_onnx(model, meta)
    onnx.save(model, "other.onnx")
    r = cli("quantize", "other.onnx", "-o", "x.onnx")
    assert r.code == 4
    assert r.stderr.startswith("Error: no shipped calibration set matches the model's 10 classes (a, b, c, d, ...)")
    assert "Hint: pass --calib-data" in r.stderr


def test_qat_model_simulates_the_exported_graph(trained_pt):
    """With fake quantization off, the QAT model (folded Conv+BN, wrapped layers) computes the checkpoint's
    function; its state dict is a plain checkpoint of the original architecture."""
    import torch

    from resopt.artifacts import load_model
    from resopt.quantize.qat import calibrate_ranges, export_state_dict, prepare_qat

    model, _ = load_model(trained_pt)
    qm = prepare_qat(model, symmetric_acts=False, per_channel=True)
    assert len(qm.folded) == 21 and len(qm.weight_quant) == 22  # every conv has a BN; + the classifier
    x = torch.randn(4, 3, 32, 32)
    qm.enable(acts=False, weights=False)
    with torch.no_grad():
        torch.testing.assert_close(qm.module.eval()(x), model.eval()(x), atol=1e-4, rtol=1e-4)
    calibrate_ranges(qm, [(x.numpy(), None)])
    with torch.no_grad():
        fq = qm.module(x)
    assert not torch.allclose(fq, model(x)), "fake quantization changes the logits"
    state = export_state_dict(qm)
    assert state.keys() == model.state_dict().keys()
