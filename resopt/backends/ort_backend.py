"""onnxruntime runner for ``.onnx`` files: CPU, or the CUDA provider when the installed build has it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resopt.backends import Runner
from resopt.errors import EnvironmentMismatchError, InputFileError


def make_session(path: Path | bytes, *, device: str = "cpu", threads: int | None = None) -> Any:
    """An InferenceSession with full graph optimisation; ``threads`` sets intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
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
        from resopt.artifacts import onnx_preprocess, read_onnx_meta

        self.meta = read_onnx_meta(path)
        self.preprocess = onnx_preprocess(self.meta, path)
        self.input_size = self.preprocess.input_size
        self.session = make_session(path, device=device, threads=threads)
        self.device = "cuda" if device in ("gpu", "cuda") else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.provider = self.session.get_providers()[0]

    def infer(self, batch: Any) -> Any:
        return self.session.run(None, {self.input_name: batch})[0].astype("float32", copy=False)
