"""build: version-aware precision paths, profiles, FP16 conversion, calibration feeding and cache, the
engine sidecar's portability guard, and clean failures without TensorRT or a GPU.

Everything here runs on CPU without TensorRT; the tests at the bottom that build and run real engines
mark themselves ``tensorrt``/``gpu`` and skip where those are absent.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from resopt.build import (
    MIN_AGREEMENT,
    BatchProfile,
    BuildConfig,
    CalibrationFeeder,
    agreement_bound,
    interleave_by_class,
    onnx_input_spec,
    onnx_quantization,
    parse_size,
    plan_build,
    resolve_profile,
    sparsity_24,
)
from resopt.errors import (
    DataError,
    EnvironmentMismatchError,
    InputFileError,
    MissingDependencyError,
    UsageError,
    VerificationError,
)
from resopt.fp16 import convert_onnx_fp16
from resopt.verify import Parity, parity_of

TRT_HINT = "pip install 'resopt[tensorrt-cu12]' (or 'resopt[tensorrt-cu13]' with a CUDA 13 torch)"


@pytest.fixture(scope="module")
def r20_onnx(r20_onnx_session: Path) -> Path:
    """The session's narrow ResNet-20, exported (and verified) by resopt's own exporter; read-only."""
    return r20_onnx_session


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import tensorrt`` fails, as on a machine without it (even where it is installed)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def fake_tensorrt(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    """A ``tensorrt`` module that only reports its version: enough to reach the checks that follow the
    import (version path, GPU) on a machine without TensorRT. Nothing is built with it."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))


# ------------------------------------------------------------------------------------- path choice


@pytest.mark.parametrize("version, request_, precision, strongly_typed, convert, flags", [
    ("11.0.0", {}, "fp32", True, False, ()),
    ("11.0.0", {"fp16": True}, "fp16", True, True, ()),
    ("11.4.1", {"has_qdq": True}, "int8", True, False, ()),
    ("11.4.1", {"has_qdq": True, "int8": True}, "int8", True, False, ()),
    ("11.0.0", {"fp16": True, "sparsity": True}, "fp16", True, True, ("SPARSE_WEIGHTS",)),
    ("10.3.0", {}, "fp32", False, False, ()),
    ("10.3.0", {"fp16": True}, "fp16", False, False, ("FP16",)),
    ("10.13.2.6", {"has_qdq": True}, "int8", True, False, ()),
    ("10.3.0", {"has_qdq": True, "fp16": True}, "int8+fp16", False, False, ("INT8", "FP16")),
    ("10.3.0", {"int8": True, "calibrate": True}, "int8-calibrated", False, False, ("INT8",)),
    ("10.3.0", {"int8": True, "calibrate": True, "fp16": True, "sparsity": True}, "int8-calibrated+fp16", False,
     False, ("INT8", "FP16", "SPARSE_WEIGHTS")),
])
def test_plan_build_chooses_the_path_by_tensorrt_version(version: str, request_: dict, precision: str,
                                                         strongly_typed: bool, convert: bool, flags: tuple) -> None:
    plan = plan_build(version, **request_)
    assert (plan.precision, plan.strongly_typed, plan.convert_fp16, plan.builder_flags) == \
        (precision, strongly_typed, convert, flags)
    assert plan.calibrate == bool(request_.get("calibrate"))
    assert plan.description.startswith(f"TensorRT {version}:")
    assert plan.gate in MIN_AGREEMENT


def test_plan_build_says_which_path_it_took() -> None:
    assert "converted to FP16" in plan_build("11.1.0", fp16=True).description
    assert "no FP16 builder flag" in plan_build("11.1.0", fp16=True).description
    assert "BuilderFlag.FP16" in plan_build("10.8.0", fp16=True).description
    assert "IInt8EntropyCalibrator2" in plan_build("10.8.0", int8=True, calibrate=True).description
    assert plan_build("10.8.0", int8=True, calibrate=True).gate == "int8-calibrated"
    assert plan_build("10.8.0", has_qdq=True, fp16=True).gate == "int8"


def test_calibration_is_refused_on_tensorrt_11_with_the_qdq_route() -> None:
    with pytest.raises(EnvironmentMismatchError) as e:
        plan_build("11.0.0", int8=True, calibrate=True)
    assert "TensorRT 11.0.0 removed implicit INT8 calibration" in e.value.message
    assert "resopt quantize MODEL.onnx --target trt --calib-data DIR" in e.value.hint


@pytest.mark.parametrize("version, request_, match", [
    ("10.3.0", {"int8": True}, "--int8 needs a Q/DQ ONNX or --calib-data"),
    ("11.0.0", {"int8": True}, "--int8 needs a Q/DQ ONNX or --calib-data"),
    ("10.3.0", {"calibrate": True}, "add --int8"),
    ("10.3.0", {"int8": True, "calibrate": True, "has_qdq": True}, "already quantized"),
    ("11.0.0", {"has_qdq": True, "fp16": True}, "--fp16 cannot be added to a Q/DQ model"),
])
def test_plan_build_refuses_impossible_requests(version: str, request_: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        plan_build(version, **request_)


def test_plan_build_refuses_tensorrt_older_than_10() -> None:
    with pytest.raises(MissingDependencyError, match="TensorRT 8.6.1 is too old"):
        plan_build("8.6.1", fp16=True)


# ------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("given, expected", [
    ({}, (1, 64, 256)),
    ({"max_batch": 32}, (1, 32, 32)),
    ({"min_batch": 8}, (8, 64, 256)),
    ({"opt_batch": 512}, (1, 512, 512)),
    ({"min_batch": 4, "opt_batch": 4, "max_batch": 4}, (4, 4, 4)),
    ({"min_batch": 300}, (300, 300, 300)),
])
def test_resolve_profile_fills_unset_batches_from_the_set_ones(given: dict, expected: tuple) -> None:
    p = resolve_profile(**given)
    assert (p.min, p.opt, p.max) == expected
    assert p.shapes((3, 32, 32)) == tuple((b, 3, 32, 32) for b in expected)


@pytest.mark.parametrize("given, match", [
    ({"min_batch": 0}, "--min-batch must be at least 1, got 0"),
    ({"max_batch": -4}, "--max-batch must be at least 1, got -4"),
    ({"opt_batch": 512, "max_batch": 256}, "min <= opt <= max, got min 1, opt 512, max 256"),
    ({"min_batch": 64, "opt_batch": 8}, "min <= opt <= max, got min 64, opt 8"),
    ({"static_batch": 1, "max_batch": 8}, "fixed batch of 1, so --max-batch 8"),
])
def test_resolve_profile_validates(given: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        resolve_profile(**given)


def test_static_batch_profile() -> None:
    assert resolve_profile(static_batch=16) == BatchProfile(16, 16, 16)
    assert resolve_profile(static_batch=16, max_batch=16) == BatchProfile(16, 16, 16)


@pytest.mark.parametrize("text, expected", [
    ("512M", 512 * 2**20), ("4G", 4 * 2**30), ("4GiB", 4 * 2**30), ("1.5GB", 1_500_000_000), ("64", 64 * 2**20),
    ("256k", 256 * 1024), (" 2 g ", 2 * 2**30),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "0", "-1G", "4X", "", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="is not a size"):
        parse_size(text)


def test_build_config_validates_before_tensorrt() -> None:
    with pytest.raises(UsageError, match="--num-calib must be at least 1"):
        BuildConfig(int8=True, calib_data="x", num_calib=0).validate()
    with pytest.raises(UsageError, match=r"--min-agreement must be in \[0, 100\], got 120"):
        BuildConfig(min_agreement=120).validate()
    with pytest.raises(UsageError, match="add --int8"):
        BuildConfig(calib_data="calib/cifar10").validate()
    BuildConfig(fp16=True, workspace="2G", max_batch=8).validate()


# ---------------------------------------------------------------------------------- ONNX checks


def _qdq_model(zero_point: np.ndarray | None, *, op: str = "QuantizeLinear") -> object:
    """x -> QuantizeLinear -> DequantizeLinear -> y, with the given zero point (None: input omitted)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "scale")]
    q_inputs = ["x", "scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "zp"))
        q_inputs.append("zp")
    nodes = [helper.make_node("QuantizeLinear", q_inputs, ["q"], name="q0"),
             helper.make_node("DequantizeLinear", ["q", "scale"] + q_inputs[2:], ["y"], name="dq0")]
    if op != "QuantizeLinear":
        nodes.append(helper.make_node(op, ["y"], ["z"], name="extra"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y" if op == "QuantizeLinear" else "z",
                                                             TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])


def test_onnx_quantization_accepts_symmetric_int8_qdq() -> None:
    assert onnx_quantization(_qdq_model(np.array(0, np.int8))) == "qdq"
    assert onnx_quantization(_qdq_model(None)) == "qdq"


@pytest.mark.parametrize("zp, shown", [(np.array(128, np.uint8), "zero point [128] of type uint8"),
                                       (np.array(3, np.int8), "zero point [3] of type int8")])
def test_onnx_quantization_refuses_asymmetric_or_uint8(zp: np.ndarray, shown: str) -> None:
    with pytest.raises(InputFileError) as e:
        onnx_quantization(_qdq_model(zp), "m.onnx")
    assert e.value.message == f"m.onnx has QuantizeLinear 'q0' with {shown}; TensorRT needs symmetric int8 " \
                              f"quantization (int8, zero point 0)"
    assert "--target trt" in e.value.hint


def test_onnx_quantization_refuses_qoperator_models(r20_onnx: Path, tmp_path: Path) -> None:
    """onnxruntime's dynamic quantization writes ConvInteger/MatMulInteger nodes, which TensorRT cannot parse."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    out = tmp_path / "dyn.onnx"
    quantize_dynamic(str(r20_onnx), str(out))
    with pytest.raises(InputFileError, match="QOperator nodes .*(ConvInteger|MatMulInteger|DynamicQuantizeLinear)"):
        onnx_quantization(onnx.load(str(out)), out)
    assert onnx_quantization(onnx.load(str(r20_onnx))) == "none"


@pytest.mark.parametrize("target", ["trt", "cpu"])
def test_quantize_target_trt_is_what_build_accepts(r20_onnx: Path, cifar_small: Path, tmp_path: Path,
                                                   target: str) -> None:
    """The two flavours of `resopt quantize`: --target trt (symmetric int8) builds, the CPU one (uint8
    activations with zero points) is refused before TensorRT is needed."""
    import onnx

    from resopt.quantize import QuantizeConfig, quantize_onnx

    out = tmp_path / f"r20.int8.{target}.onnx"
    quantize_onnx(r20_onnx, out, QuantizeConfig(target=target, calib_data=str(cifar_small), num_calib=40))
    model = onnx.load(str(out))
    if target == "trt":
        assert onnx_quantization(model, out) == "qdq"
    else:
        # ORT's CPU flavour: uint8 activations with zero points and int32 biases behind DequantizeLinear.
        with pytest.raises(InputFileError, match=r"of type (uint8|int32); TensorRT needs symmetric int8"):
            onnx_quantization(model, out)


def test_onnx_input_spec_of_an_exported_model(r20_onnx: Path) -> None:
    import onnx

    spec = onnx_input_spec(onnx.load(str(r20_onnx)), r20_onnx)
    assert spec.batch is None  # resopt export writes a dynamic batch axis
    assert spec.sample_shape == (3, 32, 32)
    assert spec.name == onnx.load(str(r20_onnx)).graph.input[0].name


def test_sparsity_24_counts_layers_whose_weights_follow_the_pattern(r20_onnx: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(r20_onnx))
    dense = sparsity_24(model)
    assert dense["layers"] >= 20 and dense["eligible_layers"] == 0 and dense["groups_2_4"] < 0.05
    # Zero 2 of every 4 consecutive input channels of every conv: all conv layers become eligible.
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    for init in model.graph.initializer:
        if init.name in conv_weights:
            w = numpy_helper.to_array(init).copy()
            w[:, 0::4] = 0
            w[:, 1::4] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    sparse = sparsity_24(model)
    assert sparse["eligible_layers"] == len(conv_weights)  # the classifier Gemm stays dense
    assert sparse["layers"] == dense["layers"]


# ------------------------------------------------------------------------------- FP16 conversion


def _logits(path_or_bytes: Path | bytes, images: np.ndarray) -> np.ndarray:
    from resopt.backends.ort_backend import make_session

    s = make_session(path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes))
    return np.concatenate([s.run(None, {s.get_inputs()[0].name: images[i:i + 50]})[0]
                           for i in range(0, len(images), 50)])


def test_fp16_conversion_keeps_io_fp32_and_agrees_with_fp32_on_real_images(r20_onnx: Path, cifar_small: Path) -> None:
    import onnx
    from onnx import TensorProto

    from resopt.artifacts import onnx_preprocess, read_onnx_meta
    from resopt.data import load_eval_set, stack_images

    model = onnx.load(str(r20_onnx))
    converted, info = convert_onnx_fp16(model)
    # Inputs and outputs stay float32; conv weights are stored in FP16; the caller's model is untouched.
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    conv_w = {n.input[1] for n in converted.graph.node if n.op_type == "Conv"}
    assert {i.data_type for i in converted.graph.initializer if i.name in conv_w} == {TensorProto.FLOAT16}
    assert {i.data_type for i in model.graph.initializer if i.name in conv_w} == {TensorProto.FLOAT}
    # The global average pool (a ReduceMean from the dynamo exporter) accumulates 64 values: kept FP32.
    pool_ops = {n.op_type for n in model.graph.node} & {"ReduceMean", "GlobalAveragePool"}
    assert pool_ops and set(info.kept_fp32) == pool_ops
    assert info.fp16_nodes >= 40 and info.casts >= 2

    pre = onnx_preprocess(read_onnx_meta(model), r20_onnx)
    images, labels = stack_images(load_eval_set(str(cifar_small), pre, split="test"))
    ref = _logits(r20_onnx, images.numpy())
    out = _logits(converted.SerializeToString(), images.numpy())
    assert out.dtype == np.float32
    m = parity_of(ref, out, labels.numpy(), source="cifar_small")
    assert m.images == 200
    assert m.top1_agreement >= 98.0, m
    assert 0 < m.max_abs_diff < 0.05 * m.logit_scale, m  # FP16, not bit-exact FP32
    assert abs(m.top1 - m.parent_top1) <= 1.0, m
    assert m.check(what="fp16", against="fp32", min_agreement=agreement_bound("fp16")).min_agreement == \
        MIN_AGREEMENT["fp16"]


def test_check_parity_fails_with_the_numbers() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 10)).astype(np.float32)
    out = ref.copy()
    out[:20] = -out[:20]  # flips the argmax of half the rows
    m = parity_of(ref, out, ref.argmax(1), source="noise")
    assert m.top1_agreement == 50.0 and m.parent_top1 == 100.0 and m.top1 == 50.0
    with pytest.raises(VerificationError, match=r"e agrees with its ONNX \(fp16\) on only 50.00% of top-1 .*need "
                                                r">= 98%\) on 40 images of noise; max \|diff\| .*top-1 50.00% vs 100"):
        m.check(what="e", against="its ONNX (fp16)", min_agreement=agreement_bound("fp16"))
    checked = m.check(what="e", against="its ONNX", min_agreement=agreement_bound("fp16", 40.0))
    assert checked.min_agreement == 40.0 and checked.metrics()["min_agreement"] == 40.0


# ------------------------------------------------------------------------- calibration feeding


def test_interleave_by_class_round_robins() -> None:
    assert interleave_by_class([0, 0, 0, 1, 1, 2]) == [0, 3, 5, 1, 4, 2]
    assert interleave_by_class([2, 1, 0]) == [2, 1, 0]
    assert interleave_by_class([]) == []


@pytest.fixture(scope="module")
def r20_preprocess(r20_onnx: Path):
    from resopt.artifacts import onnx_preprocess, read_onnx_meta

    return onnx_preprocess(read_onnx_meta(r20_onnx), r20_onnx)


def test_calibration_feeder_serves_class_balanced_preprocessed_batches(cifar_small: Path, r20_onnx: Path,
                                                                      r20_preprocess) -> None:
    from PIL import Image

    from resopt.artifacts import read_onnx_meta
    from resopt.data import eval_transform

    classes = read_onnx_meta(r20_onnx)["classes"]
    feeder = CalibrationFeeder(str(cifar_small), r20_preprocess, batch_size=8, num=44, classes=classes)
    assert feeder.calib_set.kind == "folder" and len(feeder.calib_set) == 44  # 44 = 4 per class + 4 more
    assert (feeder.num_batches, feeder.images) == (5, 40)  # the last 4 do not fill a batch
    # Every batch mixes classes: the first 10 images in feed order are one per class.
    first = feeder.batch_labels(0) + feeder.batch_labels(1)[:2]
    assert sorted(first) == list(range(10))
    batches = list(feeder.batches())
    assert len(batches) == 5 and all(b.shape == (8, 3, 32, 32) and b.dtype == np.float32 for b in batches)
    # Preprocessing is the ONNX's own (mean/std from its metadata), image for image.
    import io

    i0 = feeder.order[0]
    with Image.open(io.BytesIO(feeder.calib_set.read(i0))) as im:
        expected = eval_transform(r20_preprocess)(im.convert("RGB")).numpy()
    np.testing.assert_allclose(batches[0][0], expected, rtol=0, atol=1e-6)
    assert abs(float(np.mean(np.stack(batches)))) < 0.5  # normalised, not raw [0, 1] pixels
    # next_batch walks the same batches once, then signals the end to TensorRT with None.
    served = [feeder.next_batch() for _ in range(6)]
    assert served[-1] is None and feeder.batches_served == 5
    np.testing.assert_array_equal(served[2], batches[2])


def test_calibration_feeder_checks_classes_and_size(cifar_small: Path, r20_preprocess) -> None:
    with pytest.raises(DataError, match="predicts 2 classes but data"):
        CalibrationFeeder(str(cifar_small), r20_preprocess, classes=["cat", "dog"])
    with pytest.raises(DataError, match="has 400 images, fewer than one batch of 1000"):
        CalibrationFeeder(str(cifar_small), r20_preprocess, batch_size=1000)


def test_calibration_cache_is_reused_only_for_the_same_model_and_images(cifar_small: Path, r20_preprocess,
                                                                        tmp_path: Path) -> None:
    cache = tmp_path / "r20.calib.cache"

    def feeder(**kw) -> CalibrationFeeder:
        args = {"batch_size": 8, "num": 40, "cache": cache, "model_sha256": "aaa"} | kw
        return CalibrationFeeder(str(cifar_small), r20_preprocess, **args)

    first = feeder()
    assert first.read_cache() is None and not first.cache_used
    first.write_cache(b"TRT-8601-EntropyCalibration2\ninput: 3c010a14\n")
    key = json.loads(Path(str(cache) + ".json").read_text())
    assert key["model_sha256"] == "aaa" and key["images"] == 40 and key["calib_set_sha256"] == first.calib_set.sha256

    again = feeder()
    assert again.read_cache() == cache.read_bytes() and again.cache_used
    assert feeder(model_sha256="bbb").read_cache() is None  # another model
    assert feeder(num=20).read_cache() is None  # another image set
    assert feeder(batch_size=4).read_cache() is None
    Path(str(cache) + ".json").unlink()  # a cache from elsewhere (e.g. trtexec): used, with a log line
    assert feeder(model_sha256="ccc").read_cache() == cache.read_bytes()


# ---------------------------------------------------------------------------- portability guard


def _sidecar(**built_with) -> dict:
    built = {"tensorrt": "10.3.0", "cuda": "12.4", "gpu": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}
    return {"format": "resopt.engine", "format_version": 1, "built_with": built | built_with,
            "precision": "fp16", "profile": {"min": 1, "opt": 64, "max": 256},
            "build_options": BuildConfig(fp16=True, max_batch=256, workspace="2G").cli_options(),
            "onnx": {"file": "r18.onnx", "path": "models/r18.onnx", "sha256": "0" * 64},
            "preprocess": {"input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "resize": None},
            "classes": ["a", "b"]}


HERE = {"tensorrt": "10.3.0", "cuda": "12.4", "gpu": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}


def test_guard_accepts_the_same_gpu_and_tensorrt_release() -> None:
    from resopt.backends.tensorrt_backend import check_engine_env

    check_engine_env(_sidecar(), HERE, engine=Path("r18.fp16.engine"))
    check_engine_env(_sidecar(tensorrt="10.3.0.26"), HERE, engine=Path("r18.fp16.engine"))  # build number only
    check_engine_env(_sidecar(cuda="12.6"), HERE, engine=Path("r18.fp16.engine"))


def test_guard_refuses_another_gpu_naming_both_and_the_rebuild_command() -> None:
    from resopt.backends.tensorrt_backend import check_engine_env

    here = HERE | {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    with pytest.raises(EnvironmentMismatchError) as e:
        check_engine_env(_sidecar(), here, engine=Path("out/r18.fp16.engine"))
    assert e.value.exit_code == 8
    assert e.value.message == (
        "r18.fp16.engine was built with TensorRT 10.3.0 on NVIDIA A100-SXM4-40GB (compute capability 8.0), but "
        "this machine has TensorRT 10.3.0 on NVIDIA H100 80GB HBM3 (compute capability 9.0); an engine runs only "
        "with the GPU it was built for")
    assert e.value.hint == ("rebuild it here: resopt build models/r18.onnx -o out/r18.fp16.engine --fp16 "
                            "--workspace 2G --max-batch 256")


def test_guard_refuses_another_tensorrt_release_or_gpu_of_the_same_name() -> None:
    from resopt.backends.tensorrt_backend import check_engine_env

    with pytest.raises(EnvironmentMismatchError, match=r"TensorRT 10\.3\.0 on .* TensorRT 10\.4\.0 on .* TensorRT "
                                                       r"version it was built for"):
        check_engine_env(_sidecar(), HERE | {"tensorrt": "10.4.0"}, engine=Path("m.engine"))
    with pytest.raises(EnvironmentMismatchError, match="TensorRT version and GPU"):
        check_engine_env(_sidecar(), {"tensorrt": "11.0.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"},
                         engine=Path("m.engine"))
    with pytest.raises(EnvironmentMismatchError, match="compute capability 8.6"):
        check_engine_env(_sidecar(), HERE | {"compute_capability": "8.6"}, engine=Path("m.engine"))


def test_sidecar_validation() -> None:
    from resopt.backends.tensorrt_backend import validate_sidecar

    validate_sidecar(_sidecar(), Path("m.engine"))
    with pytest.raises(InputFileError, match="not written by `resopt build`"):
        validate_sidecar(_sidecar() | {"format": "other"}, Path("m.engine"))
    with pytest.raises(InputFileError, match="newer than this resopt"):
        validate_sidecar(_sidecar() | {"format_version": 99}, Path("m.engine"))
    broken = _sidecar()
    del broken["profile"], broken["preprocess"]
    with pytest.raises(InputFileError, match="lacks profile, preprocess"):
        validate_sidecar(broken, Path("m.engine"))


def test_rebuild_command_repeats_every_build_option() -> None:
    from resopt.backends.tensorrt_backend import rebuild_command

    cfg = BuildConfig(int8=True, calib_data="calib/cifar10", sparsity=True, min_batch=2, opt_batch=8, max_batch=16,
                      timing_cache=Path("t.cache"), calib_batch=32, num_calib=320)
    side = {"build_options": cfg.cli_options(), "onnx": {"path": "my model.onnx"}}
    assert rebuild_command(side, Path("m.engine")) == (
        "resopt build 'my model.onnx' -o m.engine --int8 --sparsity --calib-data calib/cifar10 --min-batch 2 "
        "--opt-batch 8 --max-batch 16 --timing-cache t.cache --calib-batch 32 --num-calib 320")


# ------------------------------------------------------------------------- clean failures (CLI)


def test_build_without_tensorrt_names_the_extra(cli, r20_onnx: Path, workdir: Path, no_tensorrt) -> None:
    r = cli("build", r20_onnx, "--fp16", "-o", "r20.fp16.engine")
    assert r.code == 5, r.stderr
    assert r.stderr.splitlines() == ["Error: TensorRT is not installed (the `tensorrt` Python package)",
                                     f"Hint: {TRT_HINT}"]
    assert r.stdout == "" and not (workdir / "r20.fp16.engine").exists()


def test_build_without_a_gpu_says_so(cli, r20_onnx: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    fake_tensorrt(monkeypatch, "10.3.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = cli("build", r20_onnx, "--fp16", "-o", "r20.fp16.engine")
    assert r.code == 8, r.stderr
    assert r.stderr.splitlines()[0] == "Error: `resopt build` needs an NVIDIA GPU, but no CUDA GPU is visible to " \
                                       "PyTorch"
    assert not (workdir / "r20.fp16.engine").exists()


def test_build_calibration_on_tensorrt_11_fails_before_looking_for_a_gpu(cli, r20_onnx: Path, workdir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tensorrt(monkeypatch, "11.0.0")
    r = cli("build", r20_onnx, "--int8", "--calib-data", "calib/cifar10", "-o", "r20.int8.engine")
    assert r.code == 8, r.stderr
    assert r.stderr.startswith("Error: TensorRT 11.0.0 removed implicit INT8 calibration")
    assert "Hint: quantize first: `resopt quantize MODEL.onnx --target trt" in r.stderr


@pytest.mark.parametrize("args, code, line", [
    (["--min-batch", "0"], 2, "Error: --min-batch must be at least 1, got 0"),
    (["--opt-batch", "512", "--max-batch", "256"], 2,
     "Error: batch profile must satisfy min <= opt <= max, got min 1, opt 512, max 256"),
    (["--workspace", "4X"], 2,
     "Error: --workspace '4X' is not a size; use e.g. 512M, 4G or 4GiB (a bare number is MiB)"),
    (["--int8"], 2, "Error: --int8 needs a Q/DQ ONNX or --calib-data DIR (TensorRT 10 only)"),
    (["--calib-data", "calib/cifar10"], 2, "Error: --calib-data calibrates INT8; add --int8 (or drop --calib-data)"),
    (["-o", "r20.onnx.bin"], 2, "Error: output r20.onnx.bin must end in .engine or .plan"),
])
def test_build_usage_errors_come_before_tensorrt(cli, r20_onnx: Path, workdir: Path, no_tensorrt, args: list,
                                                 code: int, line: str) -> None:
    r = cli("build", r20_onnx, *args)
    assert (r.code, r.stderr.splitlines()[0]) == (code, line)


def test_build_refuses_non_onnx_and_unstamped_onnx(cli, trained_pt: Path, workdir: Path, no_tensorrt) -> None:
    import onnx

    r = cli("build", trained_pt)
    assert r.code == 3 and r.stderr.startswith(f"Error: {trained_pt} is a .pt file; this command takes .onnx")
    bare = workdir / "bare.onnx"
    onnx.save(_qdq_model(None), str(bare))  # a valid ONNX that resopt did not export
    r = cli("build", bare)
    assert r.code == 3 and "has no resopt preprocessing metadata" in r.stderr


def test_trt_runner_fails_cleanly_without_tensorrt_or_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from resopt.artifacts import write_sidecar
    from resopt.backends import open_runner

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not a real plan")
    write_sidecar(engine, _sidecar())
    with pytest.raises(UsageError, match="run only on the GPU"):
        open_runner(engine, device="cpu")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed") as e:
        open_runner(engine, device="gpu")
    assert e.value.hint == TRT_HINT
    fake_tensorrt(monkeypatch, "10.3.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EnvironmentMismatchError, match="needs an NVIDIA GPU, but no CUDA GPU is visible"):
        open_runner(engine, device="gpu")


def test_trt_runner_without_sidecar_names_the_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resopt.backends import open_runner

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    fake_tensorrt(monkeypatch, "10.3.0")
    with pytest.raises(InputFileError, match="has no sidecar m.engine.json"):
        open_runner(engine, device="gpu")


def test_trt_runner_refuses_an_engine_replaced_after_its_build(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """bench's loader: a plan whose bytes are not the ones the sidecar recorded is refused (exit 3) before
    TensorRT sees it. A fake TensorRT and this machine's facts taken from the sidecar reach that check
    without a GPU."""
    import resopt.backends.tensorrt_backend as trt_backend
    from resopt.artifacts import sha256_file, write_sidecar
    from resopt.backends import open_runner

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"the plan build wrote")
    built = {"tensorrt": "10.3.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"}
    write_sidecar(engine, {"format": "resopt.engine", "format_version": 1, "built_with": built, "precision": "fp16",
                           "profile": {"min": 1, "opt": 8, "max": 8}, "classes": ["a", "b"],
                           "preprocess": {"input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
                           "engine": {"file": engine.name, "sha256": sha256_file(engine)}})
    engine.write_bytes(b"another plan, copied over it")
    fake_tensorrt(monkeypatch, "10.3.0")
    monkeypatch.setattr(trt_backend, "engine_env_here", lambda version: dict(built))
    with pytest.raises(InputFileError, match="m.engine does not match its sidecar \\(sha256 differs\\)") as e:
        open_runner(engine, device="gpu")
    assert e.value.exit_code == 3 and e.value.hint.startswith("rebuild it: resopt build")


# ------------------------------------------------------------- real TensorRT on a GPU (skipped here)


def _require_trt_gpu():
    trt = pytest.importorskip("tensorrt")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return trt


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_fp16_engine_checks_it_and_the_guard_reads_it(cli, r20_onnx: Path, cifar_small: Path,
                                                            workdir: Path) -> None:
    trt = _require_trt_gpu()
    from resopt.artifacts import read_sidecar
    from resopt.backends import open_runner
    from resopt.backends.tensorrt_backend import engine_env_here

    r = cli("build", r20_onnx, "--fp16", "--data", cifar_small, "--max-batch", "64", "--timing-cache", "tc.cache",
            "-o", "r20.fp16.engine", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["precision"] == "fp16" and d["verification"]["top1_agreement"] >= 98.0
    assert d["timing_cache"]["loaded_bytes"] == 0 and d["timing_cache"]["saved_bytes"] > 0
    side = read_sidecar(workdir / "r20.fp16.engine")
    assert side["built_with"] == engine_env_here(trt.__version__)
    assert side["profile"] == {"min": 1, "opt": 64, "max": 64}
    assert side["lineage"][-1]["command"] == "build"
    assert side["params"] > 0 and side["macs"] > 0  # from the ONNX, for `info` and `bench`
    from resopt.artifacts import sha256_file

    assert side["engine"]["sha256"] == sha256_file(workdir / "r20.fp16.engine")
    assert side["onnx"]["sha256"] == sha256_file(r20_onnx)
    assert (d["fp16_conversion"] is not None) == (int(trt.__version__.split(".")[0]) >= 11)
    # A rebuild reads the timing cache the first build wrote.
    r2 = cli("build", r20_onnx, "--fp16", "--data", cifar_small, "--max-batch", "64", "--timing-cache", "tc.cache",
             "-o", "again.engine", "--json")
    assert r2.code == 0 and r2.json()["timing_cache"]["loaded_bytes"] > 0
    runner = open_runner(workdir / "r20.fp16.engine", device="gpu")
    x = np.random.default_rng(0).standard_normal((100, 3, 32, 32), dtype=np.float32)  # > max batch: sliced
    assert runner.infer(x).shape == (100, 10)
    times = runner.time_batches(64, warmup=3, iters=10)
    assert len(times) == 10 and all(t > 0 for t in times)
    assert runner.peak_device_memory() > 0
    with pytest.raises(UsageError, match="outside the engine's profile"):
        runner.time_batches(65, warmup=0, iters=1)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_exits_6_and_writes_nothing_when_the_engine_disagrees(cli, r20_onnx: Path, cifar_small: Path,
                                                                   workdir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _require_trt_gpu()
    import resopt.build.engine as build_mod  # where build_engine looks the name up

    def disagreeing(*args, **kwargs):  # what a broken engine measures: half its predictions differ
        return Parity(images=20, source="cifar_small", max_abs_diff=3.0, mean_abs_diff=1.0, top1_agreement=50.0,
                      logit_scale=5.0, top1=10.0, parent_top1=30.0)

    monkeypatch.setattr(build_mod, "compare_with_onnx", disagreeing)
    r = cli("build", r20_onnx, "--fp16", "--data", cifar_small, "-o", "bad.engine", "--json")
    assert r.code == 6 and r.stdout == ""
    assert "bad.engine agrees with its ONNX (fp16) on only 50.00% of top-1 predictions" in r.stderr
    assert sorted(p.name for p in workdir.iterdir()) == []


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_calibrated_int8_on_tensorrt_10_writes_and_reuses_its_cache(cli, r20_onnx: Path, cifar_small: Path,
                                                                   workdir: Path) -> None:
    trt = _require_trt_gpu()
    if not trt.__version__.startswith("10."):
        pytest.skip("implicit INT8 calibration exists only in TensorRT 10")
    args = ["build", r20_onnx, "--int8", "--calib-data", cifar_small, "--num-calib", "160", "--data", cifar_small,
            "-o", "r20.int8.engine", "--json"]
    first = cli(*args)
    assert first.code == 0, first.stderr
    c = first.json()["calibration"]
    assert (c["batches_fed"], c["cache_used"]) == (5, False) and Path(c["cache"]).exists()
    again = cli(*args[:-3], "-o", "again.engine", "--json")
    c2 = again.json()["calibration"]
    assert (c2["batches_fed"], c2["cache_used"]) == (0, True)


@pytest.mark.gpu
def test_torch_runner_times_on_cuda_with_fp16_and_channels_last(trained_pt: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from resopt.backends.torch_backend import TorchRunner

    for fp16, cl in ((False, False), (True, True)):
        runner = TorchRunner(trained_pt, device="gpu", fp16=fp16, channels_last=cl)
        runner.reset_peak_device_memory()
        times = runner.time_batches(64, warmup=2, iters=5)
        assert len(times) == 5 and all(t > 0 for t in times)
        assert runner.peak_device_memory() > 0


# ------------------------------------------------------------------------ bench --device gpu additions


def test_ort_bound_timing_uses_iobinding(r20_onnx: Path) -> None:
    """The IOBinding path that times .onnx on the CUDA provider, exercised on the CPU provider here."""
    from resopt.backends.ort_backend import OrtRunner

    runner = OrtRunner(r20_onnx, device="cpu")
    times = runner.time_bound(4, "cpu", warmup=1, iters=3)
    # Seconds per batch of 4 images of 10.3M MACs each: not below 20 us on a CPU, not above 10 s.
    assert len(times) >= 3 and all(2e-5 < t < 10 for t in times)


def test_pt_variants_parse_and_validate() -> None:
    from resopt.bench import BenchConfig, parse_pt_variants

    assert parse_pt_variants("fp32, fp16-channels-last,fp32") == ("fp32", "fp16-channels-last")
    assert parse_pt_variants(None) is None
    with pytest.raises(UsageError, match="unknown .pt variant 'bf16'; choose one or more of: fp32, channels-last"):
        parse_pt_variants("fp32,bf16")
    assert BenchConfig().effective_pt_variants == ("fp32",)
    assert BenchConfig(device="gpu").effective_pt_variants == ("fp32", "fp16", "fp16-channels-last")
    with pytest.raises(UsageError, match="--pt-variants fp16 needs --device gpu"):
        BenchConfig(pt_variants=("fp32", "fp16")).validate()


def test_gpu_preflight_runs_onnx_on_cpu_without_the_cuda_provider(r20_onnx: Path, trained_pt: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import onnxruntime as ort
    import torch

    from resopt.bench import BenchConfig, preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the check; nothing runs on it
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    planned = preflight([trained_pt, r20_onnx], BenchConfig(device="gpu"))
    assert [(p.kind, p.device, p.variant, p.options) for p in planned] == [
        ("pt", "gpu", "fp32", {}), ("pt", "gpu", "fp16", {"fp16": True}),
        ("pt", "gpu", "fp16-channels-last", {"fp16": True, "channels_last": True}), ("onnx", "cpu", "", {})]
    assert "no CUDAExecutionProvider, so .onnx files run on the CPU provider" in capsys.readouterr().err


def test_bench_runs_each_pt_variant_as_a_row(cli, trained_pt: Path) -> None:
    r = cli("bench", trained_pt, "--pt-variants", "fp32,channels-last", "--batch-size", "2", "--iters", "2",
            "--min-time", "0", "--rounds", "1", "--warmup", "1", "--json")
    assert r.code == 0, r.stderr
    models = r.json()["models"]
    assert [(m["variant"], m["provider"]) for m in models] == [("fp32", "torch eager"),
                                                               ("channels-last", "torch eager channels_last")]
    assert all(m["batches"][0]["samples"] >= 2 and m["batches"][0]["peak_device_memory_bytes"] is None
               for m in models)
