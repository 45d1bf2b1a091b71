"""onnxruntime runner for ``.onnx`` files: CPU, or the CUDA provider when the installed build has it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from resopt.backends import Runner
from resopt.errors import EnvironmentMismatchError, InputFileError


def onnx_predict(path: Path | bytes) -> Any:
    """``batch -> logits`` of an ONNX model through onnxruntime on CPU (what ``resopt.verify`` compares)."""
    sess = make_session(path)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def make_session(path: Path | bytes, *, device: str = "cpu", threads: int | None = None) -> Any:
    """An InferenceSession with full graph optimisation; ``threads`` sets intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        # The same waiting policy as PyTorch's OpenMP threads (resopt defaults to PASSIVE, see
        # resopt/__init__.py), so bench compares the runtimes under one rule. Spinning pool threads also
        # hurt onnxruntime on a busy machine: resnet18-cifar INT8, batch 8, 2 threads, load average 7 on
        # 2 cores: 108 ms per batch spinning, 68 ms passive.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device in ("gpu", "cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EnvironmentMismatchError(
                "this onnxruntime build has no CUDAExecutionProvider, so .onnx files cannot run on the GPU",
                hint="pip install onnxruntime-gpu (instead of onnxruntime)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=opts,
                                    providers=providers)
    except Exception as e:
        name = "model" if isinstance(path, bytes) else str(path)
        raise InputFileError(f"onnxruntime cannot load {name}: {str(e).splitlines()[0][:200]}") from None


class OrtRunner(Runner):
    kind = "onnx"
    runtime_modules = ("onnxruntime", "onnx")

    def __init__(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> None:
        from resopt.artifacts import load_onnx, onnx_preprocess, read_onnx_meta
        from resopt.onnx_utils import check_classifier_graph

        self.path = Path(path)
        graph = load_onnx(path, load_weights=False)
        self.meta = read_onnx_meta(graph, path=path)
        self.preprocess = onnx_preprocess(self.meta, path) if "preprocess" in self.meta else None
        if self.preprocess is not None:
            check_classifier_graph(graph, path, image_size=self.preprocess.input_size)
        self.session = make_session(path, device=device, threads=threads)
        # An ONNX made elsewhere is timed only, at the graph's own input size (bench checked its batch).
        self.input_size = self.preprocess.input_size if self.preprocess is not None \
            else int(self.session.get_inputs()[0].shape[2])
        self.device = "cuda" if device in ("gpu", "cuda") else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.provider = self.session.get_providers()[0]

    def infer(self, batch: Any) -> Any:
        return self.session.run(None, {self.input_name: batch})[0].astype("float32", copy=False)

    def time_batches(self, batch_size: int, *, warmup: int, iters: int, min_seconds: float = 0.0) -> list[float]:
        if self.device != "cuda":
            return super().time_batches(batch_size, warmup=warmup, iters=iters, min_seconds=min_seconds)
        return self.time_bound(batch_size, "cuda", warmup=warmup, iters=iters, min_seconds=min_seconds)

    def time_bound(self, batch_size: int, device_type: str, *, warmup: int, iters: int,
                   min_seconds: float = 0.0) -> list[float]:
        """Seconds per batch with input and output bound on ``device_type`` (IOBinding), so a GPU timing
        measures the model, not PCIe copies of numpy arrays. The CUDA provider synchronises its stream
        before ``run_with_iobinding`` returns, so host timing is device time plus launch overhead."""
        import time

        import numpy as np
        import onnxruntime as ort

        x = np.random.default_rng(0).standard_normal((batch_size, 3, self.input_size, self.input_size),
                                                     dtype=np.float32)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(x, device_type, 0))
        binding.bind_output(self.session.get_outputs()[0].name, device_type)
        for _ in range(warmup):
            self.session.run_with_iobinding(binding)
        times: list[float] = []
        t_end = time.perf_counter() + min_seconds
        while len(times) < iters or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            self.session.run_with_iobinding(binding)
            times.append(time.perf_counter() - t0)
        return times
