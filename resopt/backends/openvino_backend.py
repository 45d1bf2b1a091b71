"""OpenVINO runner for ``.onnx`` files (FP32 and Q/DQ INT8) on OpenVINO's CPU plugin.

The same ONNX file onnxruntime runs is read by OpenVINO's ONNX frontend; a Q/DQ INT8 file becomes
OpenVINO's low-precision graph (u8/i8 convolutions) without any OpenVINO-specific export.

Configuration, chosen so that a row measures latency the way onnxruntime's rows do:

* **static shape per batch size**: the model is reshaped to ``(N, 3, H, W)`` and compiled for the batch
  size it meets (CPU kernels are selected for the exact shape), outside any timed loop and peak-memory
  window (``prepare``); one compiled shape is kept at a time;
* **latency hint, one stream, ``threads`` inference threads**: one request at a time on ``threads``
  cores, as onnxruntime's ``intra_op_num_threads``; no second stream competing for the same cores;
* **explicit inference precision**: OpenVINO picks BF16 by itself on CPUs that have it (AMX or AVX-512
  BF16: on this project's AMD EPYC the CPU plugin's default is ``bf16``), which would silently change the
  numbers. The runner always sets ``INFERENCE_PRECISION_HINT`` (``f32`` unless asked for ``bf16``) and
  reports what the compiled model says it ran, layer by layer (``runtime model``: each executed layer's
  ``runtimePrecision``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from resopt.backends import Runner
from resopt.envinfo import cpu_capabilities, openvino_version
from resopt.errors import InputFileError

# resopt's precision names -> OpenVINO's INFERENCE_PRECISION_HINT values, and the CPU capability each needs
# (ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")).
PRECISIONS: dict[str, tuple[str, str]] = {"f32": ("f32", "FP32"), "bf16": ("bf16", "BF16")}
# Layer types of OpenVINO's CPU runtime model that carry a model's MACs (what "runs in INT8" counts).
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
INT8_PRECISIONS = ("u8", "i8")


def resolve_precision(requested: str, capabilities: list[str] | tuple[str, ...]) -> tuple[str, str | None]:
    """The precision to ask OpenVINO for, and a message when the CPU cannot run ``requested``.

    BF16 needs the CPU plugin's BF16 capability (AVX-512 BF16 or AMX-BF16); without it the runner falls
    back to f32 and says so, instead of failing a whole comparison.
    """
    if requested not in PRECISIONS:
        from resopt.errors import choice_error

        raise choice_error("precision", requested, tuple(PRECISIONS))
    needs = PRECISIONS[requested][1]
    if needs in capabilities:
        return requested, None
    return "f32", (f"this CPU has no {needs} support in OpenVINO (capabilities: {', '.join(capabilities)}), "
                   f"so --precision {requested} runs as f32")


def layer_precisions(compiled: Any) -> dict[str, dict[str, int]]:
    """``{layer type: {runtime precision: count}}`` for the compute layers OpenVINO actually executes."""
    counts: dict[str, Counter[str]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = str(info["layerType"].astype(str)) if "layerType" in info else op.get_type_name()
        if kind not in COMPUTE_LAYERS:
            continue
        prec = str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info else "?"
        counts.setdefault(kind, Counter())[prec] += 1
    return {k: dict(v) for k, v in counts.items()}


def int8_layer_count(precisions: dict[str, dict[str, int]]) -> tuple[int, int]:
    """(compute layers running in u8/i8, all compute layers) of ``layer_precisions``'s result."""
    total = sum(n for per in precisions.values() for n in per.values())
    int8 = sum(n for per in precisions.values() for p, n in per.items() if p in INT8_PRECISIONS)
    return int8, total


def precision_summary(precisions: dict[str, dict[str, int]]) -> str:
    """``"21 u8, 1 f32 layers"``: compute layers by the precision they run in, most common first."""
    total: Counter[str] = Counter()
    for per in precisions.values():
        total.update(per)
    return ", ".join(f"{n} {p}" for p, n in total.most_common()) + " layers" if total else "no compute layers"


def compile_onnx(path: Path, batch_size: int, input_size: int, *, threads: int | None, precision: str,
                 core: Any = None) -> Any:
    """An OpenVINO CompiledModel of ``path`` for a static ``(batch_size, 3, input_size, input_size)`` input."""
    import openvino as ov

    core = core or ov.Core()
    try:
        model = core.read_model(str(path))
        model.reshape({model.inputs[0].get_any_name(): [batch_size, 3, input_size, input_size]})
    except RuntimeError as e:
        raise InputFileError(f"OpenVINO cannot read {path}: {str(e).strip().splitlines()[0][:200]}") from None
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": PRECISIONS[precision][0]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return core.compile_model(model, "CPU", config)


class OpenVinoRunner(Runner):
    kind = "onnx"
    runtime_modules = ("openvino", "onnx")

    def __init__(self, path: Path, *, device: str = "cpu", threads: int | None = None,
                 precision: str = "f32") -> None:
        version, reason = openvino_version()
        if version is None:
            from resopt.errors import MissingDependencyError

            raise MissingDependencyError(f"cannot run {path} on OpenVINO: {reason}", hint="pip install openvino")
        import openvino as ov

        from resopt.artifacts import onnx_preprocess, read_onnx_meta

        if device not in ("cpu",):
            from resopt.errors import UsageError

            raise UsageError(f"the OpenVINO runtime runs on the CPU here, not --device {device}")
        self.path = Path(path)
        self.meta = read_onnx_meta(path)
        if "preprocess" in self.meta:
            self.preprocess = onnx_preprocess(self.meta, path)
            self.input_size = self.preprocess.input_size
        else:  # an ONNX made elsewhere, timed only: the graph's own input size (bench checked it is square)
            from resopt.artifacts import load_onnx
            from resopt.onnx_utils import image_input

            self.preprocess = None
            dims = image_input(load_onnx(path, load_weights=False), path).type.tensor_type.shape.dim
            self.input_size = int(dims[2].dim_value)
        self.threads = threads
        self.core = ov.Core()
        self.requested_precision = precision
        self.precision, self.note = resolve_precision(precision, cpu_capabilities())
        self._compiled: dict[int, tuple[Any, Any]] = {}
        # Compile once now: a file OpenVINO cannot read fails at load, and the provider line can name what ran.
        compiled, _ = self._request(1)
        self.ran_precision = str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
        self.layers = layer_precisions(compiled)
        int8, total = int8_layer_count(self.layers)
        self.details = {"runtime": "openvino", "openvino": version,
                        "precision_requested": precision, "precision": self.ran_precision,
                        "int8_layers": int8, "compute_layers": total, "layer_precisions": self.layers,
                        "note": self.note}
        self.provider = f"OpenVINO {self.details['openvino']} CPU {self.ran_precision} " \
                        f"({precision_summary(self.layers)})"

    @classmethod
    def load_runtime(cls) -> None:
        """Import OpenVINO and load its CPU plugin (a shared library OpenVINO opens on first use), so that
        bench's peak memory of a row counts the model, not the plugin."""
        import openvino as ov

        super().load_runtime()
        ov.Core().get_property("CPU", "FULL_DEVICE_NAME")

    def _request(self, batch_size: int) -> tuple[Any, Any]:
        if batch_size not in self._compiled:
            # One compiled shape at a time: each holds its own copy of the weights, and bench's peak memory
            # of a row should be one model's, not one per batch size seen so far.
            self._compiled.clear()
            compiled = compile_onnx(self.path, batch_size, self.input_size, threads=self.threads,
                                    precision=self.precision, core=self.core)
            self._compiled[batch_size] = (compiled, compiled.create_infer_request())
        return self._compiled[batch_size]

    def infer(self, batch: Any) -> Any:
        import numpy as np

        _, request = self._request(int(batch.shape[0]))
        request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)
        # The output tensor is reused by the next inference on this request: hand back a copy.
        return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def prepare(self, batch_size: int) -> None:
        self._request(batch_size)

    def time_batches(self, batch_size: int, *, warmup: int, iters: int, min_seconds: float = 0.0) -> list[float]:
        self._request(batch_size)  # compile outside the timed loop, even with --warmup 0
        return super().time_batches(batch_size, warmup=warmup, iters=iters, min_seconds=min_seconds)

    def close(self) -> None:
        self._compiled.clear()
