"""TensorRT code paths through a stand-in ``tensorrt`` module, on a machine without TensorRT or a GPU.

The stand-in records every call and behaves as the bindings document (TensorRT 10.x/11.x Python API):
``IBuilderConfig.set_timing_cache(cache, ignore_mismatch)`` returns False for a cache made on another
device and then leaves the config without one (``get_timing_cache()`` is None); the builder calls the
calibrator's ``read_calibration_cache``, then ``get_batch`` until it returns None, then
``write_calibration_cache``, and swallows any exception a Python override raises (one in ``get_batch``
reads as "no more batches"). What it cannot do is build a real engine: the plan it returns is a marker.
"""

from __future__ import annotations

import ctypes
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from resopt.build import (
    BatchProfile,
    BuildConfig,
    CalibrationFeeder,
    InputSpec,
    calibration_batch,
    make_entropy_calibrator,
    plan_build,
)
from resopt.build.engine import _serialize_engine
from resopt.errors import OutputError, UsageError

THIS_GPU = b"GPU-A"


class _Severity:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


class _ILogger:
    Severity = _Severity

    def __init__(self) -> None:
        pass


class _Calibrator:
    def __init__(self) -> None:
        pass


class _TimingCache:
    def __init__(self, blob: bytes) -> None:
        self.device = blob.split(b":")[0] if blob else THIS_GPU

    def serialize(self) -> bytes:
        return self.device + b":tactics"


class _Profile:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
        self.calls.append(("profile.set_shape", name, lo, opt, hi))


class _Config:
    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.int8_calibrator: Any = None
        self._cache: _TimingCache | None = None

    def set_flag(self, flag: str) -> None:
        self.calls.append(("set_flag", flag))

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.calls.append(("set_memory_pool_limit", pool, size))

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.calls.append(("add_optimization_profile",))
        return 0

    def set_calibration_profile(self, profile: _Profile) -> bool:
        self.calls.append(("set_calibration_profile",))
        return True

    def create_timing_cache(self, blob: bytes) -> _TimingCache:
        self.calls.append(("create_timing_cache", bytes(blob)))
        return _TimingCache(bytes(blob))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        # As documented: a cache from another device is refused unless ignore_mismatch, and nothing is set.
        ok = cache.device == THIS_GPU or ignore_mismatch
        self.calls.append(("set_timing_cache", cache.device, ignore_mismatch, ok))
        self._cache = cache if ok else None
        return ok

    def get_timing_cache(self) -> _TimingCache | None:
        return self._cache


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags


class _Builder:
    def __init__(self, trt: Any, logger: Any) -> None:
        self.trt, self.calls = trt, trt.calls

    def create_network(self, flags: int) -> _Network:
        self.calls.append(("create_network", flags))
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config(self.calls)

    def create_optimization_profile(self) -> _Profile:
        return _Profile(self.calls)

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
        cal = config.int8_calibrator
        if cal is not None:
            def swallowed(fn: Any, *args: Any) -> Any:  # the bindings catch what a Python override raises
                try:
                    return fn(*args)
                except Exception as e:  # noqa: BLE001
                    self.calls.append(("swallowed", type(e).__name__))
                    return None

            if swallowed(cal.read_calibration_cache) is None:
                size = cal.get_batch_size()
                while (ptrs := swallowed(cal.get_batch, ["input"])) is not None:
                    arr = np.ctypeslib.as_array((ctypes.c_float * (size * 3 * 32 * 32)).from_address(ptrs[0]))
                    self.calls.append(("get_batch", size, float(arr.sum())))
                swallowed(cal.write_calibration_cache, b"calibration table")
        self.calls.append(("build_serialized_network",))
        return b"PLAN"


class _Parser:
    num_errors = 0

    def __init__(self, network: _Network, logger: Any) -> None:
        pass

    def parse(self, data: bytes, path: str) -> bool:
        return True


def standin_tensorrt(version: str = "10.8.0") -> Any:
    trt = types.SimpleNamespace(__version__=version, calls=[])
    trt.ILogger = _ILogger
    trt.IInt8EntropyCalibrator2 = _Calibrator
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", SPARSE_WEIGHTS="SPARSE_WEIGHTS")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.Builder = lambda logger: _Builder(trt, logger)
    trt.OnnxParser = _Parser
    return trt


DYNAMIC = InputSpec("input", None, (3, 32, 32))
PROFILE = BatchProfile(1, 64, 256)


def _build(trt: Any, *, spec: InputSpec = DYNAMIC, calibrator: Any = None, cache_in: bytes = b"",
           fp16: bool = False) -> tuple[bytes, bytes, bool]:
    plan = plan_build(trt.__version__, fp16=fp16, int8=calibrator is not None, calibrate=calibrator is not None)
    return _serialize_engine(trt, b"onnx", Path("m.onnx"), plan, spec, PROFILE,
                             BuildConfig(timing_cache=Path("m.cache")), calibrator, cache_in)


# ---------------------------------------------------------------------------------------- timing cache


def test_timing_cache_from_this_gpu_is_reused_and_saved() -> None:
    trt = standin_tensorrt()
    plan, cache, reused = _build(trt, cache_in=b"GPU-A:old")
    assert plan == b"PLAN" and cache == b"GPU-A:tactics" and reused
    assert ("set_timing_cache", b"GPU-A", False, True) in trt.calls


def test_timing_cache_from_another_gpu_is_replaced_not_a_crash() -> None:
    """set_timing_cache returns False for it; before the fix get_timing_cache() was None after the build."""
    trt = standin_tensorrt()
    plan, cache, reused = _build(trt, cache_in=b"GPU-B:tactics")
    assert plan == b"PLAN" and cache == b"GPU-A:tactics" and not reused
    sets = [c for c in trt.calls if c[0] == "set_timing_cache"]
    assert sets == [("set_timing_cache", b"GPU-B", False, False), ("set_timing_cache", b"GPU-A", False, True)]


# ---------------------------------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def preprocess(r20_onnx_session: Path) -> Any:
    from resopt.artifacts import onnx_preprocess, read_onnx_meta

    return onnx_preprocess(read_onnx_meta(r20_onnx_session), r20_onnx_session)


def _feeder(cifar_small: Path, preprocess: Any, batch: int, **kw: Any) -> CalibrationFeeder:
    return CalibrationFeeder(str(cifar_small), preprocess, batch_size=batch, num=40, **kw)


def test_calibration_batch_follows_a_fixed_onnx_batch() -> None:
    assert calibration_batch(None, None) == 32 and calibration_batch(8, None) == 8
    assert calibration_batch(None, 5) == 5 and calibration_batch(5, 5) == 5
    with pytest.raises(UsageError, match="fixed batch of 5, so --calib-batch 32 cannot apply"):
        calibration_batch(32, 5)


@pytest.mark.parametrize("fixed", [5, 48])
def test_fixed_batch_calibration_feeds_batches_of_the_network_batch(cifar_small: Path, preprocess: Any,
                                                                    fixed: int) -> None:
    """Before the fix the calibrator served 32 images per call whatever the ONNX's fixed batch: TensorRT
    read past the buffer (48) or saw 5 of every 32 images while the sidecar counted all of them."""
    trt = standin_tensorrt()
    feeder = CalibrationFeeder(str(cifar_small), preprocess, batch_size=calibration_batch(None, fixed),
                               num=2 * fixed)
    cal = make_entropy_calibrator(trt, feeder, device="cpu")
    _build(trt, spec=InputSpec("input", fixed, (3, 32, 32)), calibrator=cal)
    served = [c for c in trt.calls if c[0] == "get_batch"]
    assert [c[1] for c in served] == [fixed, fixed] and feeder.images == 2 * fixed == feeder.batches_served * fixed
    expected = [float(b.sum()) for b in feeder.batches()]
    assert [c[2] for c in served] == pytest.approx(expected, rel=1e-5)  # the whole batch, nothing past it
    assert ("set_calibration_profile",) not in trt.calls and cal.error is None


def test_dynamic_batch_calibration_sets_a_calibration_profile(cifar_small: Path, preprocess: Any) -> None:
    trt = standin_tensorrt()
    cal = make_entropy_calibrator(trt, _feeder(cifar_small, preprocess, 8), device="cpu")
    _build(trt, calibrator=cal)
    assert ("set_calibration_profile",) in trt.calls
    assert ("profile.set_shape", "input", (8, 3, 32, 32), (8, 3, 32, 32), (8, 3, 32, 32)) in trt.calls
    assert len([c for c in trt.calls if c[0] == "get_batch"]) == 5


def test_an_exception_in_get_batch_fails_the_build_instead_of_ending_calibration(cifar_small: Path,
                                                                                 preprocess: Any) -> None:
    trt = standin_tensorrt()
    feeder = _feeder(cifar_small, preprocess, 8)
    real = feeder.next_batch

    def oom_on_the_second() -> Any:
        if feeder.batches_served == 1:
            raise RuntimeError("CUDA out of memory")
        return real()

    feeder.next_batch = oom_on_the_second  # type: ignore[method-assign]
    cal = make_entropy_calibrator(trt, feeder, device="cpu")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        _build(trt, calibrator=cal)
    # The stand-in builder went on as the bindings do (1 batch, then "no more"), and built a plan.
    assert len([c for c in trt.calls if c[0] == "get_batch"]) == 1 and ("build_serialized_network",) in trt.calls


def test_a_failing_write_calibration_cache_fails_the_build(cifar_small: Path, preprocess: Any,
                                                           tmp_path: Path) -> None:
    trt = standin_tensorrt()
    (tmp_path / "a-file").write_text("not a folder")
    feeder = _feeder(cifar_small, preprocess, 8, cache=tmp_path / "a-file" / "m.calib.cache")
    # The bindings only print it; the build must fail with resopt's one-line output error instead.
    with pytest.raises(OutputError, match="cannot write .*m.calib.cache"):
        _build(trt, calibrator=make_entropy_calibrator(trt, feeder, device="cpu"))


# ------------------------------------------------------------------------------------ short batches


def test_profile_slices_pad_short_batches_to_the_minimum() -> None:
    from resopt.backends.tensorrt_backend import profile_slices

    assert profile_slices(10, 1, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert profile_slices(10, 16, 64) == [(0, 10, 16)]
    assert profile_slices(70, 16, 64) == [(0, 64, 64), (64, 70, 16)]
    assert profile_slices(7, 4, 4) == [(0, 4, 4), (4, 7, 4)]  # a fixed batch of 4
    with pytest.raises(UsageError):
        profile_slices(7, 5, 4)


class _SumContext:
    """An execution context whose "network" outputs each sample's sum, read from the bound addresses."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi, self.shapes, self.addr = lo, hi, [], {}

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.shapes.append(shape)
        return self.lo <= shape[0] <= self.hi

    def get_tensor_shape(self, name: str) -> tuple:
        return (self.shapes[-1][0], 1)

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addr[name] = ptr

    def execute_async_v3(self, stream: Any) -> bool:
        n = self.shapes[-1][0]
        x = np.ctypeslib.as_array((ctypes.c_float * (n * 3 * 4 * 4)).from_address(self.addr["in"])).reshape(n, -1)
        y = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addr["out"]))
        y[:] = x.sum(1)
        return True


@pytest.mark.parametrize("lo, hi", [(16, 64), (4, 4), (1, 8)])
def test_trt_runner_infer_pads_a_short_batch_and_trims_its_output(lo: int, hi: int) -> None:
    """Before the fix a last batch below the profile's minimum (--min-batch > 8, or a fixed batch) failed."""
    import torch

    from resopt.backends.tensorrt_backend import TrtRunner

    runner = object.__new__(TrtRunner)
    runner.context = _SumContext(lo, hi)
    runner.input_name, runner.output_name = "in", "out"
    runner.input_dtype = runner.output_dtype = torch.float32
    runner.min_batch, runner.max_batch, runner.sample_shape = lo, hi, (3, 4, 4)
    runner.torch_device, runner.stream = torch.device("cpu"), None
    runner.memory = types.SimpleNamespace(sample=lambda: None)
    runner._enqueue = lambda: runner.context.execute_async_v3(None)
    batch = np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float32)
    out = runner.infer(batch)
    assert out.shape == (10, 1)
    np.testing.assert_allclose(out[:, 0], batch.reshape(10, -1).sum(1), rtol=1e-5)
    assert all(lo <= s[0] <= hi for s in runner.context.shapes)


# ------------------------------------------------------------- engine I/O types and TensorRT majors, no TensorRT


def _standin_types() -> Any:
    """A tensorrt module with DataType members and an nptype that, like TensorRT's, knows only the numpy types."""
    numpy_types = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_}

    def nptype(dtype: Any) -> Any:
        if dtype.name not in numpy_types:
            raise TypeError(f"Could not resolve TensorRT datatype to an equivalent numpy datatype. {dtype}")
        return numpy_types[dtype.name]

    names = ("FLOAT", "HALF", "INT8", "INT32", "BOOL", "BF16", "FP8", "INT4", "FP4")
    return types.SimpleNamespace(nptype=nptype, DataType=types.SimpleNamespace(
        **{n: types.SimpleNamespace(name=n) for n in names}))


def test_engine_io_types_numpy_lacks_are_torch_types_or_one_line() -> None:
    import torch

    from resopt.backends.tensorrt_backend import tensor_torch_dtype
    from resopt.errors import InputFileError

    trt = _standin_types()
    dt = trt.DataType
    assert tensor_torch_dtype(trt, dt.FLOAT) == torch.float32
    assert tensor_torch_dtype(trt, dt.HALF) == torch.float16
    assert tensor_torch_dtype(trt, dt.INT8) == torch.int8
    # No numpy type: trt.nptype raises for these, so they must not go through it.
    assert tensor_torch_dtype(trt, dt.BF16) == torch.bfloat16
    assert tensor_torch_dtype(trt, dt.FP8) == torch.float8_e4m3fn
    for name in ("INT4", "FP4"):
        with pytest.raises(InputFileError) as e:
            tensor_torch_dtype(trt, getattr(dt, name), tensor="logits", path=Path("m.engine"))
        assert e.value.message == (f"m.engine tensor 'logits' is TensorRT {name}, which resopt cannot feed or read "
                                   f"(no numpy or torch type for it)")
        assert "\n" not in e.value.message and "float32 or float16" in (e.value.hint or "")


@pytest.mark.parametrize("version,ok", [("9.3.0", False), ("10.0.1", True), ("10.16.1.11", True),
                                        ("11.4.0.106", True), ("12.0.0", False)])
def test_only_the_tensorrt_majors_the_extras_allow_are_accepted(monkeypatch, version: str, ok: bool) -> None:
    import sys

    from resopt.backends.tensorrt_backend import require_tensorrt
    from resopt.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    if ok:
        assert require_tensorrt().__version__ == version
        return
    with pytest.raises(MissingDependencyError) as e:
        require_tensorrt()
    assert version in e.value.message and "resopt[tensorrt-cu12]" in (e.value.hint or "")


def test_the_tensorrt_extras_are_bounded_to_majors_10_and_11() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["tensorrt-cu12"] == ["tensorrt-cu12>=10.0,<12"]
    assert extras["tensorrt-cu13"] == ["tensorrt-cu13>=10.13,<12"]  # the first cu13 wheels on PyPI are 10.13

