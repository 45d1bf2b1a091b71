"""OpenVINO as the second CPU runtime: the runner on FP32 and Q/DQ INT8 files at several batch sizes, its
agreement with onnxruntime on real CIFAR-10 images, the precision it reports (BF16 where the CPU has it,
f32 with a message where not), ``bench --runtime/--precision``, quantize's per-runtime INT8 layer count,
and the one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_captured as _run

pytest.importorskip("openvino")

from resopt.backends import open_runner  # noqa: E402
from resopt.backends.openvino_backend import (  # noqa: E402
    int8_layer_count,
    precision_summary,
    resolve_precision,
)
from resopt.envinfo import cpu_capabilities  # noqa: E402


@pytest.fixture(scope="module")
def fp32_onnx(trained_pt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resopt.export import ExportConfig, export_onnx

    out = tmp_path_factory.mktemp("openvino") / "r20.onnx"
    export_onnx(trained_pt, out, ExportConfig(num_verify=20))
    return out


@pytest.fixture(scope="module")
def int8_onnx(fp32_onnx: Path) -> tuple[Path, dict]:
    out = fp32_onnx.with_name("r20.int8.onnx")
    code, stdout, err = _run("quantize", fp32_onnx, "-o", out, "--num-calib", 100, "--json")
    assert code == 0, err
    return out, json.loads(stdout)


@pytest.fixture(scope="module")
def test_images(cifar_small: Path, fp32_onnx: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 200 test JPEGs of ``cifar_small``, preprocessed as the model records it."""
    import torch

    from resopt.artifacts import onnx_preprocess, read_onnx_meta
    from resopt.data import load_eval_set

    ds = load_eval_set(str(cifar_small), onnx_preprocess(read_onnx_meta(fp32_onnx), fp32_onnx))
    images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(images).numpy(), np.asarray(labels)


def _logits(runner, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.infer(images[i:i + batch]) for i in range(0, len(images), batch)])


# --------------------------------------------------------------------------------------------- runner


def test_fp32_agrees_with_onnxruntime_at_several_batch_sizes(fp32_onnx, test_images) -> None:
    images, _ = test_images
    ort = _logits(open_runner(fp32_onnx, threads=2), images, 64)
    ov = open_runner(fp32_onnx, threads=2, runtime="openvino", precision="f32")
    assert ov.details["precision"] == "f32" and ov.details["int8_layers"] == 0
    assert ov.provider.startswith("OpenVINO ") and " f32 (" in ov.provider
    for batch in (1, 7, 32):  # 7: a last partial batch, so three static shapes per run
        got = _logits(ov, images, batch)
        assert got.shape == ort.shape == (200, 10)
        agreement = float((got.argmax(1) == ort.argmax(1)).mean())
        assert agreement >= 0.99, f"batch {batch}: top-1 agreement {agreement:.3f}"
        assert np.abs(got - ort).max() <= 1e-3 * np.abs(ort).max()
        assert list(ov._compiled) == [200 % batch or batch]  # one compiled shape at a time: the last one


def test_int8_runs_every_conv_in_int8_and_agrees(fp32_onnx, int8_onnx, test_images) -> None:
    images, labels = test_images
    path, _ = int8_onnx
    ov = open_runner(path, threads=2, runtime="openvino", precision="f32")
    n_conv = sum(n.op_type == "Conv" for n in onnx.load(str(fp32_onnx)).graph.node)
    assert ov.details["layer_precisions"]["Convolution"] == {"u8": n_conv}
    assert ov.details["int8_layers"] == ov.details["compute_layers"] == n_conv + 1  # + the classifier
    assert f"{n_conv + 1} u8 layers" in ov.provider
    ov_int8 = {b: _logits(ov, images, b) for b in (1, 50)}
    assert np.array_equal(ov_int8[1].argmax(1), ov_int8[50].argmax(1))
    ort_int8 = _logits(open_runner(path, threads=2), images, 50)
    ort_fp32 = _logits(open_runner(fp32_onnx, threads=2), images, 50)
    # Two INT8 kernels round differently, but they run the same scales: most predictions coincide, and
    # OpenVINO's INT8 is as close to the FP32 parent as onnxruntime's is (within 3 points of agreement).
    assert (ov_int8[50].argmax(1) == ort_int8.argmax(1)).mean() >= 0.9
    agree_ov = (ov_int8[50].argmax(1) == ort_fp32.argmax(1)).mean()
    agree_ort = (ort_int8.argmax(1) == ort_fp32.argmax(1)).mean()
    assert agree_ov >= agree_ort - 0.03
    assert abs((ov_int8[50].argmax(1) == labels).mean() - (ort_int8.argmax(1) == labels).mean()) <= 0.03


def test_bf16_reports_what_ran(fp32_onnx, test_images) -> None:
    images, _ = test_images
    ov = open_runner(fp32_onnx, threads=2, runtime="openvino", precision="bf16")
    has_bf16 = "BF16" in cpu_capabilities()
    assert ov.details["precision_requested"] == "bf16"
    assert ov.details["precision"] == ("bf16" if has_bf16 else "f32")
    convs = ov.details["layer_precisions"]["Convolution"]
    assert convs == {"bf16" if has_bf16 else "f32": sum(convs.values())}
    assert (ov.details["note"] is None) == has_bf16
    ort = _logits(open_runner(fp32_onnx, threads=2), images, 50)
    assert (_logits(ov, images, 50).argmax(1) == ort.argmax(1)).mean() >= 0.97  # bf16 keeps 8 mantissa bits


def test_precision_falls_back_where_the_cpu_lacks_bf16() -> None:
    assert resolve_precision("bf16", ["FP32", "BF16", "INT8"]) == ("bf16", None)
    assert resolve_precision("f32", ["FP32", "BF16", "INT8"]) == ("f32", None)
    ran, note = resolve_precision("bf16", ["FP32", "INT8"])
    assert ran == "f32" and "no BF16 support" in note and "runs as f32" in note
    with pytest.raises(Exception, match="unknown precision 'fp8'; choose one of: f32, bf16"):
        resolve_precision("fp8", ["FP32"])


def test_layer_count_helpers() -> None:
    layers = {"Convolution": {"u8": 20, "f32": 1}, "FullyConnected": {"i8": 1}}
    assert int8_layer_count(layers) == (21, 22)
    assert precision_summary(layers) == "20 u8, 1 f32, 1 i8 layers"


# ---------------------------------------------------------------------------------------------- bench


def test_bench_both_runtimes_and_precisions(fp32_onnx, int8_onnx, cifar_small) -> None:
    path, _ = int8_onnx
    code, out, err = _run("bench", fp32_onnx, path, "--runtime", "ort,openvino", "--precision", "f32,bf16",
                          "--batch-size", "1,16", "--threads", 2, "--warmup", 1, "--iters", 3, "--min-time", 0,
                          "--rounds", 1, "--data", cifar_small, "--json")
    assert code == 0, err
    d = json.loads(out)
    has_bf16 = "BF16" in cpu_capabilities()
    precisions = ["f32", "bf16"] if has_bf16 else ["f32"]
    rows = [(m["name"], m["runtime"], m["details"].get("precision", "")) for m in d["models"]]
    assert rows == [(f, "ort", "") for f in ["r20.onnx"]] + [("r20.onnx", "openvino", p) for p in precisions] + \
        [("r20.int8.onnx", "ort", "")] + [("r20.int8.onnx", "openvino", p) for p in precisions]
    for m in d["models"]:
        assert [b["batch_size"] for b in m["batches"]] == [1, 16]
        assert all(b["throughput_ips"] > 0 and b["peak_memory_bytes"] for b in m["batches"])
        assert m["accuracy"]["images"] == 200
        if m["runtime"] == "openvino":
            assert m["provider"].startswith(f"OpenVINO {m['details']['openvino']} CPU {m['details']['precision']}")
    by = {(m["name"], m["runtime"], m["details"].get("precision")): m for m in d["models"]}
    ort_fp32, ov_fp32 = by[("r20.onnx", "ort", None)], by[("r20.onnx", "openvino", "f32")]
    assert abs(ort_fp32["accuracy"]["top1"] - ov_fp32["accuracy"]["top1"]) <= 1.0  # >= 99% agreement
    assert by[("r20.int8.onnx", "openvino", "f32")]["details"]["int8_layers"] > 0
    if not has_bf16:
        assert "no BF16 support in OpenVINO" in err


def test_bench_runtime_option_errors(fp32_onnx, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = _run("bench", fp32_onnx, "--runtime", "tvm")
    assert code == 2 and "Error: --runtime: unknown value 'tvm'; choose one or more of: ort, openvino" in err
    code, _, err = _run("bench", fp32_onnx, "--precision", "bf16")
    assert code == 2 and "Error: --precision bf16 applies to --runtime openvino" in err
    code, _, err = _run("bench", fp32_onnx, "--runtime", "openvino", "--device", "gpu")
    assert code == 2 and "--runtime openvino runs on the CPU" in err
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    code, out, err = _run("bench", fp32_onnx, "--runtime", "ort,openvino")
    assert code == 5 and out == ""
    assert err.splitlines() == [err.splitlines()[0], "Hint: pip install openvino"]
    assert err.startswith("Error: --runtime openvino: OpenVINO is not installed")


# ------------------------------------------------------------------------------------------- quantize


def test_quantize_reports_int8_layers_per_runtime(fp32_onnx, int8_onnx, workdir) -> None:
    _, d = int8_onnx
    n_layers = sum(n.op_type in ("Conv", "Gemm") for n in onnx.load(str(fp32_onnx)).graph.node)
    assert d["runtime_int8"]["onnxruntime"]["int8"] == d["runtime_int8"]["onnxruntime"]["layers"] == n_layers
    assert d["runtime_int8"]["openvino"]["int8"] == d["runtime_int8"]["openvino"]["layers"] == n_layers
    # One conv kept in FP32 in the file: OpenVINO runs it in f32. onnxruntime may not: its
    # WeightBiasQuantization transformer quantizes the FP32 weights of a conv whose input and output are Q/DQ'd,
    # so onnxruntime 1.32 runs all 22 in INT8. The count reports what each runtime does, not what the file says.
    middle = [n.name for n in onnx.load(str(fp32_onnx)).graph.node if n.op_type == "Conv"][5]
    code, out, err = _run("quantize", fp32_onnx, "-o", "ex.onnx", "--exclude", middle, "--num-calib", 40, "--json")
    assert code == 0, err
    counts = json.loads(out)["runtime_int8"]
    assert counts["openvino"]["int8"] == n_layers - 1 and counts["openvino"]["layers"] == n_layers
    assert counts["openvino"]["precisions"]["Convolution"] == {"u8": n_layers - 2, "f32": 1}
    assert counts["onnxruntime"]["layers"] == n_layers and counts["onnxruntime"]["int8"] in (n_layers - 1, n_layers)
    code, out, err = _run("quantize", fp32_onnx, "-o", "ex2.onnx", "--exclude", middle, "--num-calib", 40)
    assert code == 0, err
    assert f"conv/matmul layers executed in INT8: onnxruntime {counts['onnxruntime']['int8']}/{n_layers}, " \
           f"openvino {n_layers - 1}/{n_layers}" in out


def test_runner_without_openvino_is_a_one_line_error(fp32_onnx, monkeypatch: pytest.MonkeyPatch) -> None:
    from resopt.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingDependencyError, match="OpenVINO is not installed") as e:
        open_runner(fp32_onnx, runtime="openvino")
    assert e.value.hint == "pip install openvino" and e.value.exit_code == 5
