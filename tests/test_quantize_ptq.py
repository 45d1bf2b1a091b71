"""``--ptq`` (resopt.quantize.ptq): each step against an expectation computed here, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from resopt.quantize.ptq import WeightGrid, adaround_layer, apply_ptq, bias_correction, equalize_cross_layer


def _images(n: int = 16, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def prepped(r20_onnx_session: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's trained ResNet-20 after onnxruntime's pre-processing (BatchNorm folded into the convs)."""
    from resopt.quantize.ort import preprocess_model

    out = tmp_path_factory.mktemp("ptq") / "prepped.onnx"
    preprocess_model(r20_onnx_session, out)
    return out


def _w(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _conv_node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def test_cle_keeps_the_function_and_equalizes_ranges(prepped: Path) -> None:
    model = onnx.load(str(prepped))
    x = _images()
    before = _logits(model, x)
    pairs = equalize_cross_layer(model)
    assert len(pairs) == 9  # one Conv-Relu-Conv pair per basic block of a ResNet-20
    np.testing.assert_allclose(_logits(model, x), before, atol=1e-4)
    for p in pairs:
        w1 = _w(model, _conv_node(model, p["first"]).input[1])
        w2 = _w(model, _conv_node(model, p["second"]).input[1])
        r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
        r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(1)
        np.testing.assert_allclose(r1, r2, rtol=1e-3)


def _rtn(w: np.ndarray, qmax: int = 127) -> np.ndarray:
    s = np.abs(w).reshape(w.shape[0], -1).max(1).reshape(-1, 1, 1, 1) / qmax
    return np.clip(np.round(w / s), -qmax, qmax) * s


def _second_conv(model: onnx.ModelProto) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type == "Conv"][1]


def test_bias_correction_zeroes_the_mean_error_on_its_batch(prepped: Path) -> None:
    from resopt.quantize.ptq import conv_inputs

    model = onnx.load(str(prepped))
    node = _second_conv(model)
    x = conv_inputs(model, _images())[node.name]
    w, b = _w(model, node.input[1]), _w(model, node.input[2])
    w_q = _rtn(w, qmax=7).astype(np.float32)  # 4-bit, so the error is large enough to matter
    corrected = b - bias_correction(w, w_q, x, node)
    xt = torch.from_numpy(x)
    ref = F.conv2d(xt, torch.from_numpy(w), torch.from_numpy(b), padding=1).mean(dim=(0, 2, 3))
    plain = F.conv2d(xt, torch.from_numpy(w_q), torch.from_numpy(b), padding=1).mean(dim=(0, 2, 3))
    fixed = F.conv2d(xt, torch.from_numpy(w_q), torch.from_numpy(corrected), padding=1).mean(dim=(0, 2, 3))
    assert float((plain - ref).abs().max()) > 1e-3  # there was an error to correct
    np.testing.assert_allclose(fixed.numpy(), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("qmax", [7, 127])
def test_adaround_is_never_worse_than_nearest_on_its_objective(prepped: Path, qmax: int) -> None:
    from resopt.quantize.ptq import conv_inputs

    model = onnx.load(str(prepped))
    node = _second_conv(model)
    x = conv_inputs(model, _images())[node.name]
    w = _w(model, node.input[1])
    w_a, info = adaround_layer(w, x, node, WeightGrid(qmax), iters=150, seed=0)
    xt = torch.from_numpy(x)
    ref = F.conv2d(xt, torch.from_numpy(w), padding=1)

    def mse(wq: np.ndarray) -> float:
        return float(torch.mean((ref - F.conv2d(xt, torch.from_numpy(wq.astype(np.float32)), padding=1)) ** 2))

    assert mse(w_a) <= mse(_rtn(w, qmax)) * (1 + 1e-5)
    if qmax == 7:  # at 4 bits learned rounding finds a strictly better one
        assert mse(w_a) < 0.95 * mse(_rtn(w, qmax))
        assert info["flipped"] > 0
    # on the grid with the same scales: rounding it to nearest again changes nothing (what onnxruntime does)
    np.testing.assert_allclose(_rtn(w_a, qmax), w_a, atol=1e-6)
    again, _ = adaround_layer(w, x, node, WeightGrid(qmax), iters=150, seed=0)
    np.testing.assert_array_equal(again, w_a)  # seeded: deterministic


def test_apply_ptq_records_each_step(prepped: Path, tmp_path: Path) -> None:
    rec = apply_ptq(prepped, tmp_path / "p.onnx", ("cle", "bias-correction", "adaround"), WeightGrid(), _images(8),
                    seed=1, iters=10)
    assert rec["steps"] == ["cle", "bias-correction", "adaround"] and rec["images"] == 8
    assert len(rec["cle"]) == 9
    convs = [n for n in onnx.load(str(prepped)).graph.node if n.op_type == "Conv"]
    assert len(rec["bias_correction"]) == len(convs) == len(rec["adaround"]["layers"])
    assert all(la["mse_adaround"] <= la["mse_nearest"] for la in rec["adaround"]["layers"])


@pytest.mark.parametrize("args, expected", [
    (["--ptq", "adaround,cle"], "in the order cle,bias-correction,adaround"),
    (["--ptq", "gptq"], "unknown --ptq step 'gptq'"),
    (["--mode", "fp16", "--ptq", "cle"], "--ptq does not apply to --mode fp16"),
])
def test_bad_ptq(cli, r20_onnx_session: Path, workdir: Path, args: list[str], expected: str) -> None:
    r = cli("quantize", r20_onnx_session, "-o", workdir / "q.onnx", *args)
    assert r.code == 2 and expected in r.stderr
    assert not (workdir / "q.onnx").exists()


def test_int8_with_all_steps_end_to_end(cli, r20_onnx_session: Path, cifar_small: Path, workdir: Path) -> None:
    from resopt.artifacts import read_onnx_meta

    out = workdir / "r20.ptq.onnx"
    r = cli("quantize", r20_onnx_session, "-o", out, "--per-tensor", "--ptq", "cle,bias-correction,adaround",
            "--calib-data", cifar_small, "--num-calib", "32", "--json")
    assert r.code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["agreement"] >= 90.0
    step = read_onnx_meta(onnx.load(str(out)), path=out)["lineage"][-1]
    ptq = step["options"]["ptq"]
    assert ptq["steps"] == ["cle", "bias-correction", "adaround"] and ptq["images"] == 32
    assert ptq["per_channel"] is False and len(ptq["cle"]) == 9
    assert all(la["mean_abs_correction"] >= 0 for la in ptq["bias_correction"])
