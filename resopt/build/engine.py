"""The build itself: parse and build with TensorRT, check the engine against its ONNX on real images, write
the engine and its sidecar (``EngineSidecar``)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import (
    EngineSidecar,
    atomic_output,
    check_output_path,
    lineage_entry,
    onnx_preprocess,
    read_onnx_meta,
    require_kind,
    sha256_file,
    sidecar_path,
    write_sidecar,
)
from resopt.build.calibrator import CalibrationFeeder, calibration_batch, make_entropy_calibrator
from resopt.build.onnx_checks import InputSpec, onnx_input_spec, onnx_quantization, sparsity_24
from resopt.build.plan import BatchProfile, BuildConfig, BuildPlan, check_request, plan_build, resolve_profile
from resopt.console import log, warn
from resopt.errors import InputFileError
from resopt.fp16 import convert_onnx_fp16
from resopt.kinds import onnx_model_stats

if TYPE_CHECKING:
    from resopt.artifacts import Preprocess
    from resopt.verify import Parity

# Minimum top-1 agreement (%) between the engine and its ONNX on real images, per precision. INT8 from a
# TensorRT calibration is compared with the FP32 ONNX, so it gets the loosest bound.
MIN_AGREEMENT: dict[str, float] = {"fp32": 99.0, "fp16": 98.0, "int8": 95.0, "int8-calibrated": 90.0}


def agreement_bound(gate: str, min_agreement: float | None = None) -> float:
    """The minimum top-1 agreement (%) with the ONNX: ``--min-agreement`` or the precision's default."""
    return MIN_AGREEMENT[gate] if min_agreement is None else min_agreement


def compare_with_onnx(runner: Any, onnx_path: Path, dataset: Any, *, source: str, batch_size: int = 64) -> Parity:
    """``runner`` (the candidate) against onnxruntime on CPU (the reference) on the same labelled images."""
    from resopt.backends.ort_backend import make_session
    from resopt.data import make_loader
    from resopt.verify import compare

    session = make_session(onnx_path)
    name = session.get_inputs()[0].name
    loader = make_loader(dataset, min(batch_size, getattr(runner, "max_batch", None) or batch_size), shuffle=False)
    return compare(lambda x: session.run(None, {name: x})[0], runner.infer,
                   ((x.numpy(), y.numpy()) for x, y in loader), source=source)


@dataclass(frozen=True)
class BuildResult:
    output: Path
    sidecar: Path
    precision: str
    build_path: str
    tensorrt: str
    gpu: str
    compute_capability: str
    profile: dict[str, int]
    engine_bytes: int
    onnx_bytes: int
    build_seconds: float
    verification: dict[str, Any]
    fp16_conversion: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    timing_cache: dict[str, Any] | None = None
    sparsity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"], d["sidecar"] = str(self.output), str(self.sidecar)
        return d


def _timing_cache_bytes(path: Path | None) -> bytes:
    return path.read_bytes() if path is not None and path.exists() else b""


def _serialize_engine(trt: Any, onnx_bytes: bytes, onnx_path: Path, plan: BuildPlan, spec: InputSpec,
                      profile: BatchProfile, cfg: BuildConfig, calibrator: Any,
                      cache_in: bytes) -> tuple[bytes, bytes, bool]:
    """The TensorRT part: parse, configure, build. Returns (serialized plan, serialized timing cache, whether
    the given timing cache was used)."""
    from resopt.backends.tensorrt_backend import make_logger

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and plan.trt_major < 11:
        # 11.x is always strongly typed and ignores (deprecates) the flag, so it is passed on 10.x only.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes, str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise InputFileError(f"TensorRT cannot parse {onnx_path}: {(errors or logger.errors or ['unknown error'])[0]}")
    config = builder.create_builder_config()
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if cfg.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    if spec.batch is None:
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(spec.name, *profile.shapes(spec.sample_shape))
        config.add_optimization_profile(opt_profile)
    if calibrator is not None:
        config.int8_calibrator = calibrator
        if spec.batch is None:
            # Calibration runs at one shape; TensorRT 10 needs a profile for it when the batch is dynamic.
            # With a fixed batch the feeder's batch is that batch (``calibration_batch``), so no profile.
            calib_profile = builder.create_optimization_profile()
            b = calibrator.get_batch_size()
            calib_profile.set_shape(spec.name, *((b, *spec.sample_shape),) * 3)
            config.set_calibration_profile(calib_profile)
    cache_reused = bool(cache_in)
    # ignore_mismatch=False: a cache made on another GPU or TensorRT is refused - set_timing_cache returns
    # False and leaves the config without a cache - so the build starts from an empty one instead.
    if not config.set_timing_cache(config.create_timing_cache(cache_in), False):
        if cache_in:
            warn(f"timing cache {cfg.timing_cache} was made on another GPU or TensorRT version; building without "
                 f"it and overwriting it")
        cache_reused = False
        if not config.set_timing_cache(config.create_timing_cache(b""), False):
            raise InputFileError(f"TensorRT refused an empty timing cache while building {onnx_path}")
    serialized = builder.build_serialized_network(network, config)
    error = getattr(calibrator, "error", None)
    if error is not None:  # the bindings swallowed it (see make_entropy_calibrator); the engine is not trusted
        raise error
    if serialized is None:
        raise InputFileError(f"TensorRT could not build an engine from {onnx_path}: "
                             f"{(logger.errors or ['see the TensorRT log above'])[-1]}")
    cache = config.get_timing_cache()
    return bytes(serialized), (bytes(cache.serialize()) if cache is not None else b""), cache_reused


def verification_set(cfg: BuildConfig, meta: dict[str, Any], preprocess: Preprocess,
                     onnx_path: Path) -> tuple[str, Any]:
    """The real images the engine is checked on: the test split of ``--data``, else the repository's
    calib/ set whose classes are the model's (as ``export`` does). Loaded before the build, so a missing
    set fails in a second rather than after minutes of kernel tuning."""
    from resopt.calib import default_data
    from resopt.data import check_classes, classes_of, load_eval_set

    classes = list(meta.get("classes", []))
    spec = cfg.data if cfg.data is not None else default_data(classes, meta.get("lineage", []))
    dataset = load_eval_set(spec, preprocess, split="test", per_class=cfg.verify_per_class, seed=cfg.seed)
    if classes:
        check_classes(classes, classes_of(dataset), model_name=onnx_path.name, data=spec)
    return spec, dataset


def _hardware_notes(plan: BuildPlan, here: dict[str, Any], cfg: BuildConfig,
                    sparse_info: dict[str, Any] | None) -> list[str]:
    from resopt.envinfo import parse_cc, precision_support

    support = precision_support(parse_cc(here["compute_capability"]))
    notes = [f"{here['gpu']} (compute capability {here['compute_capability']}) has no fast {key}; TensorRT may "
             f"fall back to slower kernels"
             for wanted, key in (("fp16" in plan.precision, "fp16"), ("int8" in plan.precision, "int8"),
                                 (cfg.sparsity, "sparsity_2_4")) if wanted and not support[key]]
    if sparse_info is not None and sparse_info["eligible_layers"] == 0:
        notes.append(f"--sparsity: none of the {sparse_info['layers']} Conv/Gemm layers has 2:4-sparse weights, "
                     f"so TensorRT has no sparse kernels to pick (prune to a 2:4 pattern first)")
    return notes


def build_engine(onnx_path: Path, output: Path, cfg: BuildConfig) -> BuildResult:
    """ONNX -> TensorRT engine + sidecar, checked against the ONNX on real images.

    Order matters for clean failures: options and the ONNX are checked first (UsageError,
    InputFileError), then TensorRT is loaded (MissingDependencyError), then the GPU is looked for
    (EnvironmentMismatchError). Nothing is written unless the engine passes its check.
    """
    from resopt.artifacts import load_onnx
    from resopt.backends.cuda import require_cuda
    from resopt.backends.tensorrt_backend import TrtRunner, describe_env, engine_env_here, require_tensorrt

    onnx_path, output = Path(onnx_path), Path(output)
    require_kind(onnx_path, "onnx", hint="export a checkpoint first: resopt export MODEL.pt -o MODEL.onnx")
    check_output_path(output, onnx_path, cfg.data, cfg.calib_data, cfg.timing_cache, suffixes=(".engine", ".plan"))
    check_output_path(sidecar_path(output), onnx_path, cfg.data, cfg.calib_data, cfg.timing_cache, option="sidecar")
    if cfg.timing_cache is not None:
        check_output_path(cfg.timing_cache, onnx_path, cfg.data, cfg.calib_data, option="--timing-cache")
    cfg.validate()
    model = load_onnx(onnx_path)
    meta = read_onnx_meta(model, path=onnx_path)
    preprocess = onnx_preprocess(meta, onnx_path)
    spec = onnx_input_spec(model, onnx_path)
    profile = resolve_profile(min_batch=cfg.min_batch, opt_batch=cfg.opt_batch, max_batch=cfg.max_batch,
                              static_batch=spec.batch)
    has_qdq = onnx_quantization(model, onnx_path) == "qdq"
    calibrate = cfg.calib_data is not None
    check_request(int8=cfg.int8, calibrate=calibrate, has_qdq=has_qdq)
    if calibrate:
        calibration_batch(cfg.calib_batch, spec.batch)  # a --calib-batch the ONNX cannot take fails here

    trt = require_tensorrt()
    plan = plan_build(trt.__version__, fp16=cfg.fp16, int8=cfg.int8, calibrate=calibrate, has_qdq=has_qdq,
                      sparsity=cfg.sparsity)
    require_cuda("`resopt build`", hint="build on the machine the engine will run on (engines are GPU-specific; "
                                        "check with `resopt env`)")
    here = engine_env_here(trt.__version__)
    verify_spec, verify_images = verification_set(cfg, meta, preprocess, onnx_path)
    log(f"build path: {plan.description}")
    sparse_info = sparsity_24(model) if cfg.sparsity else None
    notes = _hardware_notes(plan, here, cfg, sparse_info)
    for n in notes:
        warn(n)

    fp16_info = None
    if plan.convert_fp16:
        converted, conversion = convert_onnx_fp16(model)
        fp16_info = conversion.to_dict()
        log(f"converted the ONNX to FP16: {conversion.fp16_nodes} nodes FP16, kept FP32: "
            f"{conversion.kept_fp32 or 'none'}, {conversion.casts} casts")
        onnx_bytes = converted.SerializeToString()
    else:
        onnx_bytes = onnx_path.read_bytes()  # the parser is given the path too, for external weights

    feeder = calibrator = None
    if calibrate:
        feeder = CalibrationFeeder(cfg.calib_data, preprocess,  # type: ignore[arg-type]
                                   batch_size=calibration_batch(cfg.calib_batch, spec.batch),
                                   num=cfg.num_calib, classes=meta.get("classes"), seed=cfg.seed,
                                   cache=cfg.calib_cache or output.with_suffix(".calib.cache"),
                                   model_sha256=sha256_file(onnx_path))
        calibrator = make_entropy_calibrator(trt, feeder)

    cache_in = _timing_cache_bytes(cfg.timing_cache)
    log(f"building {output.name} ({plan.precision}, batch {profile.min}..{profile.max} tuned for {profile.opt}) "
        f"with {describe_env(here)}")
    t0 = time.perf_counter()
    engine_bytes, cache_out, cache_reused = _serialize_engine(trt, onnx_bytes, onnx_path, plan, spec, profile, cfg,
                                                              calibrator, cache_in)
    build_seconds = time.perf_counter() - t0
    calib_info = None if feeder is None else {
        **feeder.describe(), "batches_fed": feeder.batches_served, "cache": str(feeder.cache),
        "cache_used": feeder.cache_used}

    # An engine cannot be inspected layer by layer, so `info` and `bench` read its counts from the sidecar.
    counts = onnx_model_stats(model)
    sidecar = EngineSidecar(
        built_with=here, precision=plan.precision, build_path=plan.description, strongly_typed=plan.strongly_typed,
        builder_flags=list(plan.builder_flags),
        input={"name": spec.name, "sample_shape": list(spec.sample_shape), "dynamic_batch": spec.batch is None},
        profile=profile.to_dict(), build_options=cfg.cli_options(),
        onnx={"file": onnx_path.name, "path": str(onnx_path), "sha256": sha256_file(onnx_path)},
        fp16_conversion=fp16_info, calibration=calib_info, sparsity=sparse_info,
        arch=meta.get("arch"), classes=meta.get("classes", []), preprocess=preprocess.to_dict(),
        params=counts.params, nonzero_params=counts.nonzero_params, macs=counts.macs)

    runner = TrtRunner(plan=engine_bytes, sidecar=sidecar.to_dict())
    try:
        parity = compare_with_onnx(runner, onnx_path, verify_images, source=verify_spec)
    finally:
        runner.close()
    log(f"engine vs ONNX on {parity.images} images: top-1 agreement {parity.top1_agreement:.2f}%, "
        f"max |diff| {parity.max_abs_diff:.4g}, top-1 {parity.top1:.2f}%")
    parity = parity.check(what=output.name, against=f"its ONNX ({plan.gate})",
                          min_agreement=agreement_bound(plan.gate, cfg.min_agreement),
                          hint="check the calibration data, try --fp16 instead of --int8, or lower --min-agreement")
    verification = {"verified": True, **parity.metrics()}

    timing_info = None
    if cfg.timing_cache is not None and cache_out:
        with atomic_output(cfg.timing_cache) as tmp:
            tmp.write_bytes(cache_out)
        timing_info = {"file": str(cfg.timing_cache), "loaded_bytes": len(cache_in), "reused": cache_reused,
                       "saved_bytes": len(cache_out)}
    lineage = list(meta.get("lineage", [])) + [lineage_entry(
        "build", options={**cfg.cli_options(), "precision": plan.precision, "build_path": plan.description},
        parent=onnx_path, metrics=verification)]
    with atomic_output(output) as tmp:
        tmp.write_bytes(engine_bytes)
    write_sidecar(output, replace(
        sidecar, metrics={**meta.get("metrics", {}), "build": verification}, lineage=lineage,
        engine={"file": output.name, "bytes": len(engine_bytes), "sha256": sha256_file(output)}))
    return BuildResult(output=output, sidecar=sidecar_path(output), precision=plan.precision,
                       build_path=plan.description, tensorrt=trt.__version__, gpu=here["gpu"],
                       compute_capability=here["compute_capability"], profile=profile.to_dict(),
                       engine_bytes=len(engine_bytes), onnx_bytes=onnx_path.stat().st_size,
                       build_seconds=round(build_seconds, 2), verification=verification, fp16_conversion=fp16_info,
                       calibration=calib_info, timing_cache=timing_info, sparsity=sparse_info, notes=notes)
