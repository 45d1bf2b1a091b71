"""``resopt quantize --mode w4a8``: int4 weights packed in the file, 8-bit activations, the ends at int8, run in
onnxruntime (and OpenVINO where installed) on real CIFAR-10 images, and ``--ptq adaround`` on int4's grid.

Each expectation is computed here from the files themselves: the weight count from the FP32 parent's graph,
the stored bytes from the initializers, agreement by argmax of both models' logits, and AdaRound's objective
(each conv's output error on its FP32 inputs) from the int4 weights as the file stores them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

ITERS = 100  # AdaRound steps per layer here (the command's default is 500): enough to beat nearest at 4 bits


def _meta(path: Path) -> dict[str, Any]:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props if p.key.startswith("resopt")}


@pytest.fixture(scope="module")
def w4a8(r20_onnx_session: Path, cifar_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The session model quantized three ways (default, --int4-ends, --ptq adaround), each with its --json."""
    from conftest import run_captured

    import resopt.quantize.ptq as ptq

    out = tmp_path_factory.mktemp("w4a8")
    common = ["--mode", "w4a8", "--calib-data", str(cifar_small), "--num-calib", "64", "--data", str(cifar_small),
              "--min-agreement", "0", "--json"]
    runs: dict[str, Any] = {}
    apply = ptq.apply_ptq
    ptq.apply_ptq = functools.partial(apply, iters=ITERS)  # type: ignore[assignment]
    try:
        for name, extra in (("rtn", []), ("ends4", ["--int4-ends"]), ("ada", ["--ptq", "adaround"])):
            code, stdout, err = run_captured("quantize", r20_onnx_session, "-o", out / f"{name}.onnx", *common,
                                             *extra)
            assert code == 0, err
            runs[name] = {"path": out / f"{name}.onnx", "json": json.loads(stdout)}
    finally:
        ptq.apply_ptq = apply  # type: ignore[assignment]
    return runs


def _weighted(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    init = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in init]


def _dq_weight(model: onnx.ModelProto, node_name: str) -> tuple[onnx.TensorProto, np.ndarray]:
    """A layer's stored weight initializer and its dequantized value (per-channel scales, zero point 0)."""
    init = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    dq = producer[node.input[1]]
    assert dq.op_type == "DequantizeLinear" and dq.domain in ("", "ai.onnx")
    q = init[dq.input[0]]
    scale = numpy_helper.to_array(init[dq.input[1]]).astype(np.float32)
    zp = numpy_helper.to_array(init[dq.input[2]]).astype(np.float32)
    assert not np.any(zp)  # symmetric
    values = numpy_helper.to_array(q).astype(np.float32)
    return q, values * scale.reshape((-1,) + (1,) * (values.ndim - 1))


def test_file_holds_packed_int4_weights(w4a8: dict[str, Any], r20_onnx_session: Path,
                                        r20_int8_session: Path) -> None:
    parent = onnx.load(str(r20_onnx_session))
    layers = _weighted(parent)
    init = {i.name: numpy_helper.to_array(i) for i in parent.graph.initializer}
    # Expected from the FP32 graph: every weight but the first conv's and the classifier's is 4-bit.
    n4 = sum(init[n.input[1]].size for n in layers[1:-1])
    n8 = init[layers[0].input[1]].size + init[layers[-1].input[1]].size

    model = onnx.load(str(w4a8["rtn"]["path"]))
    assert {(o.domain or "ai.onnx", o.version) for o in model.opset_import} >= {("ai.onnx", 21)}
    int4 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT4]
    weights4 = [i for i in int4 if len(i.dims) > 1]
    assert sum(int(np.prod(i.dims)) for i in weights4) == n4
    for i in weights4:  # packed: two weights a byte, in raw_data
        assert len(i.raw_data) == (int(np.prod(i.dims)) + 1) // 2
    int4_bytes = sum(len(i.raw_data) for i in weights4)
    assert int4_bytes <= n4 / 2 + len(weights4)
    weights8 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) > 1]
    assert sum(int(np.prod(i.dims)) for i in weights8) == n8

    size = w4a8["rtn"]["path"].stat().st_size
    fp32, int8 = r20_onnx_session.stat().st_size, r20_int8_session.stat().st_size
    # The weights' bytes, at 4 bits, are half those of the INT8 file: the file shrinks by about that much.
    assert size < int8 - 0.8 * n4 / 2
    assert size < fp32 / 3  # (at width 0.5 the graph and the metadata are a third of the file)
    got = w4a8["rtn"]["json"]
    assert got["result"]["size_bytes"] == size  # what the report (and bench) count is the file on disk
    meta = _meta(w4a8["rtn"]["path"])["resopt.lineage"][-1]
    assert meta["metrics"]["int4_weights"] == n4 and meta["metrics"]["int8_weights"] == n8
    assert meta["metrics"]["int4_weight_bytes"] == int4_bytes


def test_ends_at_8_bits_by_default_and_recorded(w4a8: dict[str, Any], r20_onnx_session: Path) -> None:
    parent = onnx.load(str(r20_onnx_session))
    layers = [n.name for n in _weighted(parent)]
    first, last = layers[0], layers[-1]
    model = onnx.load(str(w4a8["rtn"]["path"]))
    for name in layers:
        q, _ = _dq_weight(model, name)
        assert q.data_type == (TensorProto.INT8 if name in (first, last) else TensorProto.INT4), name
    step = _meta(w4a8["rtn"]["path"])["resopt.lineage"][-1]
    assert step["options"]["mode"] == "w4a8" and step["options"]["int8_layers"] == [first, last]
    assert step["options"]["layer_bits"] == {n: 8 if n in (first, last) else 4 for n in layers}
    assert step["options"]["weights"].startswith("int4 per-channel symmetric")

    ends4 = onnx.load(str(w4a8["ends4"]["path"]))
    assert all(_dq_weight(ends4, n)[0].data_type == TensorProto.INT4 for n in layers)
    assert _meta(w4a8["ends4"]["path"])["resopt.lineage"][-1]["options"]["int8_layers"] == []
    assert w4a8["ends4"]["path"].stat().st_size < w4a8["rtn"]["path"].stat().st_size


def _test_batches(cifar_small: Path, pre: Any) -> np.ndarray:
    from resopt.data import load_eval_set, make_loader

    ds = load_eval_set(str(cifar_small), pre, split="test", per_class=None, seed=0)
    return np.concatenate([x.numpy() for x, _ in make_loader(ds, 100, shuffle=False)])


def test_runs_in_onnxruntime_and_agrees_with_its_parent(w4a8: dict[str, Any], r20_onnx_session: Path,
                                                         cifar_small: Path) -> None:
    from resopt.artifacts import onnx_preprocess, read_onnx_meta

    pre = onnx_preprocess(read_onnx_meta(onnx.load(str(r20_onnx_session))), r20_onnx_session)
    x = _test_batches(cifar_small, pre)

    def top1(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)

    parent = top1(r20_onnx_session)
    for name, floor in (("rtn", 60.0), ("ada", 75.0)):
        agreement = 100 * float(np.mean(top1(w4a8[name]["path"]) == parent))
        print(name, f"agreement {agreement:.1f}%", w4a8[name]["json"]["result"]["top1"],
              w4a8[name]["json"]["parent"]["top1"])
        assert agreement >= floor, (name, agreement)
        assert agreement == pytest.approx(w4a8[name]["json"]["agreement"], abs=0.01)
    # onnxruntime runs the 8-bit ends as integer kernels, the int4 convolutions in float on dequantized weights
    assert w4a8["rtn"]["json"]["runtime_int8"]["onnxruntime"]["int8"] == 2


def test_openvino_runs_it_like_onnxruntime(w4a8: dict[str, Any], r20_onnx_session: Path, cifar_small: Path) -> None:
    ov = pytest.importorskip("openvino")
    from resopt.artifacts import onnx_preprocess, read_onnx_meta

    pre = onnx_preprocess(read_onnx_meta(onnx.load(str(r20_onnx_session))), r20_onnx_session)
    x = _test_batches(cifar_small, pre)[:64]
    path = w4a8["rtn"]["path"]
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = np.asarray(compiled(x)[0]).argmax(1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)
    assert np.mean(got == ref) >= 0.95
    # the int4 convolutions run in float on decompressed weights, the int8 ends in u8
    assert w4a8["rtn"]["json"]["runtime_int8"]["openvino"]["int8"] == 2


def test_adaround_on_int4_is_not_worse_than_nearest(w4a8: dict[str, Any], r20_onnx_session: Path,
                                                    cifar_small: Path, tmp_path: Path) -> None:
    """AdaRound's objective, each conv's output MSE on its FP32 inputs (the first 64 calibration images, which
    AdaRound learned on), from the weights the two files store: the learned rounding reproduced by
    onnxruntime's quantizer, never worse than its round-to-nearest, and better in total."""
    from resopt.artifacts import onnx_preprocess, read_onnx_meta
    from resopt.calib import calib_batches, load_calib_set
    from resopt.quantize.ort import preprocess_model
    from resopt.quantize.ptq import conv_inputs

    pre = onnx_preprocess(read_onnx_meta(onnx.load(str(r20_onnx_session))), r20_onnx_session)
    cs = load_calib_set(str(cifar_small), num=64, seed=0)
    images = np.concatenate([x for x, _ in calib_batches(cs, pre, batch_size=32, limit=128)])
    preprocess_model(r20_onnx_session, tmp_path / "prepped.onnx")
    fp32 = onnx.load(str(tmp_path / "prepped.onnx"))
    inputs = conv_inputs(fp32, images)
    init = {i.name: numpy_helper.to_array(i).copy() for i in fp32.graph.initializer}
    rtn, ada = onnx.load(str(w4a8["rtn"]["path"])), onnx.load(str(w4a8["ada"]["path"]))
    recorded = {la["layer"]: la for la in _meta(w4a8["ada"]["path"])["resopt.lineage"][-1]["options"]["ptq"]
                ["adaround"]["layers"]}
    total_rtn = total_ada = 0.0
    for node in (n for n in fp32.graph.node if n.op_type == "Conv"):
        x, w = torch.from_numpy(inputs[node.name]), torch.from_numpy(init[node.input[1]])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        pads, stride = attrs.get("pads", [0, 0, 0, 0]), attrs.get("strides", [1, 1])
        assert pads[:2] == pads[2:]

        def mse(wq: np.ndarray, x: torch.Tensor = x, w: torch.Tensor = w, p: list = pads, s: list = stride) -> float:
            ref = F.conv2d(x, w, padding=tuple(p[:2]), stride=tuple(s))
            return float(torch.mean((ref - F.conv2d(x, torch.from_numpy(wq), padding=tuple(p[:2]),
                                                    stride=tuple(s))) ** 2))

        q_rtn, w_rtn = _dq_weight(rtn, node.name)
        q_ada, w_ada = _dq_weight(ada, node.name)
        assert q_ada.data_type == q_rtn.data_type
        e_rtn, e_ada = mse(w_rtn), mse(w_ada)
        assert e_ada <= e_rtn * (1 + 1e-4), node.name
        assert recorded[node.name]["bits"] == (8 if q_ada.data_type == TensorProto.INT8 else 4)
        # what the lineage says AdaRound reached is what the file holds
        assert e_ada == pytest.approx(recorded[node.name]["mse_adaround"], rel=1e-2)
        total_rtn += e_rtn
        total_ada += e_ada
    print(f"objective: nearest {total_rtn:.4g}, adaround {total_ada:.4g}")
    assert total_ada < 0.9 * total_rtn


def test_w4a8_refuses_what_it_does_not_take(cli, r20_onnx_session: Path, workdir: Path) -> None:
    r = cli("quantize", r20_onnx_session, "--mode", "w4a8", "--target", "trt", "-o", workdir / "q.onnx")
    assert r.code == 2 and "--target does not apply to --mode w4a8" in r.stderr
    r = cli("quantize", r20_onnx_session, "--mode", "int8", "--int4-ends", "-o", workdir / "q.onnx")
    assert r.code == 2 and "--int8-ends does not apply to --mode int8" in r.stderr
    assert not (workdir / "q.onnx").exists()
