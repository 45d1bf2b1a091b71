"""TensorRT runner for ``.engine`` files, and the engine sidecar's portability guard.

A serialized TensorRT engine runs only with the TensorRT version and on the GPU model it was built
for. ``build`` records both in the ``.engine.json`` sidecar; every loader calls ``check_engine_env``
first, so an engine from another machine fails with one line naming both environments and the command
that rebuilds it, instead of a deserialization error from deep inside TensorRT.

The runner keeps its device buffers and stream in PyTorch (CUDA tensors, ``torch.cuda.Stream``), so
the only GPU dependency besides TensorRT is the torch that resopt already needs; timing uses CUDA
events. The TensorRT calls are the 10.x/11.x "named tensor" API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``), which both major versions share.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from resopt.artifacts import Preprocess, read_sidecar, sha256_file, validate_sidecar
from resopt.backends import Runner
from resopt.envinfo import TENSORRT_INSTALL, trt_major
from resopt.errors import EnvironmentMismatchError, InputFileError, MissingDependencyError, ResoptError, UsageError

# The TensorRT major versions this code handles (the extras in pyproject.toml are bounded to the same):
# 10 (builder flags, implicit INT8 calibration) and 11 (strongly typed networks only).
MIN_TRT_MAJOR, MAX_TRT_MAJOR = 10, 11


def require_tensorrt() -> Any:
    """The ``tensorrt`` module (10.x or 11.x), or a one-line MissingDependencyError naming the extra."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError("TensorRT is not installed (the `tensorrt` Python package)",
                                     hint=TENSORRT_INSTALL) from None
    except OSError as e:  # wheel present, shared libraries missing or for another CUDA
        raise MissingDependencyError(
            f"TensorRT is installed but cannot load its libraries ({str(e).splitlines()[0][:160]})",
            hint=TENSORRT_INSTALL) from None
    version = str(getattr(trt, "__version__", "0"))
    if trt_major(version) < MIN_TRT_MAJOR:
        raise MissingDependencyError(f"TensorRT {version} is too old; resopt needs TensorRT {MIN_TRT_MAJOR} or newer",
                                     hint=TENSORRT_INSTALL)
    if trt_major(version) > MAX_TRT_MAJOR:
        raise MissingDependencyError(f"TensorRT {version} is newer than resopt knows (it handles {MIN_TRT_MAJOR}.x "
                                     f"and {MAX_TRT_MAJOR}.x)", hint=TENSORRT_INSTALL)
    return trt


def make_logger(trt: Any) -> Any:
    """A TensorRT logger that sends warnings and errors to resopt's stderr log and keeps the errors, so a
    failed parse or build can quote TensorRT's own reason in its one-line message."""
    from resopt.console import log, warn

    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev: Any, msg: str) -> None:
            if sev in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(str(msg))
                log(f"[red]TensorRT:[/red] {msg}")
            elif sev == severity.WARNING:
                warn(f"TensorRT: {msg}")

    return _Logger()


# ------------------------------------------------------------------------------------ portability guard


def tensorrt_cuda() -> str | None:
    """The CUDA major version this TensorRT was built for, where its packaging says so: NVIDIA's wheels are
    named per CUDA major (``tensorrt-cu12``, ``tensorrt_cu13_libs``, ...). None for a TensorRT installed
    another way (a system package reports no CUDA through the Python bindings)."""
    import re
    from importlib import metadata

    for dist in metadata.distributions():
        m = re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_](?:libs|bindings))?", str(dist.name or ""), re.IGNORECASE)
        if m:
            return m.group(1)
    return None


def engine_env_here(trt_version: str) -> dict[str, Any]:
    """The facts a sidecar records and the guard compares, for this machine's first GPU. ``cuda`` is
    TensorRT's CUDA (``tensorrt_cuda``, None where unknown), ``torch_cuda`` the CUDA of the torch that
    moves the buffers."""
    from resopt.backends.cuda import require_cuda
    from resopt.envinfo import driver_versions

    torch = require_cuda("a TensorRT engine")
    props = torch.cuda.get_device_properties(0)
    return {"tensorrt": trt_version, "cuda": tensorrt_cuda(), "torch_cuda": torch.version.cuda,
            "gpu": str(props.name), "compute_capability": f"{props.major}.{props.minor}",
            "driver": driver_versions()[0]}


def _trt_release(version: str) -> tuple[str, ...]:
    """Major.minor.patch: a build number (the 4th field some packages print) does not change the plan format."""
    return tuple(str(version).split(".")[:3])


def describe_env(env: dict[str, Any]) -> str:
    return f"TensorRT {env.get('tensorrt', '?')} on {env.get('gpu', '?')} (compute capability " \
           f"{env.get('compute_capability', '?')})"


def rebuild_command(sidecar: dict[str, Any], engine: Path) -> str:
    """The ``resopt build`` command line that rebuilds ``engine`` from its ONNX with the same options."""
    opts = sidecar.get("build_options", {})
    onnx = sidecar.get("onnx", {}).get("path") or sidecar.get("onnx", {}).get("file") or "MODEL.onnx"
    args = ["resopt", "build", str(onnx), "-o", str(engine)]
    for flag in ("fp16", "int8", "sparsity"):
        if opts.get(flag):
            args.append(f"--{flag}")
    for key, flag in (("calib_data", "--calib-data"), ("workspace", "--workspace"), ("min_batch", "--min-batch"),
                      ("opt_batch", "--opt-batch"), ("max_batch", "--max-batch"),
                      ("timing_cache", "--timing-cache"), ("calib_batch", "--calib-batch"),
                      ("num_calib", "--num-calib")):
        if opts.get(key) is not None:
            args += [flag, str(opts[key])]
    return shlex.join(args)


def check_engine_env(sidecar: dict[str, Any], here: dict[str, Any], *, engine: Path) -> None:
    """Refuse an engine built with another TensorRT release or on another GPU model.

    TensorRT plans are tied to the exact release that serialized them and to the GPU they were tuned
    on (kernels are chosen per SM architecture and device); loading one elsewhere either fails inside
    ``deserialize_cuda_engine`` or runs kernels picked for different hardware.
    """
    built = sidecar["built_with"]
    problems = []
    if _trt_release(built.get("tensorrt", "")) != _trt_release(here.get("tensorrt", "")):
        problems.append("TensorRT version")
    if built.get("gpu") != here.get("gpu") or built.get("compute_capability") != here.get("compute_capability"):
        problems.append("GPU")
    if problems:
        raise EnvironmentMismatchError(
            f"{Path(engine).name} was built with {describe_env(built)}, but this machine has {describe_env(here)}; "
            f"an engine runs only with the {' and '.join(problems)} it was built for",
            hint=f"rebuild it here: {rebuild_command(sidecar, engine)}")


# ---------------------------------------------------------------------------------------------- runner


def engine_runs_here(sidecar: dict[str, Any], engine: Path, *, here: dict[str, Any] | None = None) -> tuple[bool, str]:
    """Whether this machine can run ``engine``, and one line saying why not.

    The checks ``bench`` makes before it loads a plan, in the same order (engine file against its sidecar,
    a CUDA GPU, TensorRT, then the GPU model and TensorRT release the plan was built for), but reported
    instead of raised, so ``info`` describes an engine from any machine. ``here`` replaces this machine's
    facts (GPU, compute capability, TensorRT version), as ``engine_env_here`` returns them.
    """
    recorded = (sidecar.get("engine") or {}).get("sha256")
    if recorded and recorded != sha256_file(engine):
        return False, "no: the engine file does not match its sidecar (sha256 differs); it was replaced after the build"
    try:
        if here is None:
            from resopt.backends.cuda import require_cuda

            require_cuda("a TensorRT engine")  # no GPU: EnvironmentMismatchError
            here = engine_env_here(require_tensorrt().__version__)  # no TensorRT: MissingDependencyError
        check_engine_env(sidecar, here, engine=engine)  # another GPU or TensorRT release
    except ResoptError as e:
        return False, f"no: {e.message}"
    return True, f"yes: built with {describe_env(sidecar['built_with'])}, as this machine has"


def profile_slices(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """How ``n`` samples run on an engine whose profile accepts ``min_batch..max_batch``: ``(start, stop, size)``
    per call, slices of at most ``max_batch``; a slice shorter than ``min_batch`` (the last one, or all of a
    small set) runs padded to ``size = min_batch`` and its extra outputs are dropped."""
    if not 1 <= min_batch <= max_batch:
        raise UsageError(f"engine profile {min_batch}..{max_batch} is not a batch range")
    return [(start, min(start + max_batch, n), max(min(max_batch, n - start), min_batch))
            for start in range(0, n, max_batch)]


# I/O types TensorRT has and numpy has not (``trt.nptype`` raises TypeError on them), by DataType name: torch has
# them, and the runner's buffers are torch tensors. TensorRT's FP8 is E4M3.
TORCH_ONLY_TYPES = {"BF16": "bfloat16", "FP8": "float8_e4m3fn"}


def tensor_torch_dtype(trt: Any, trt_dtype: Any, *, tensor: str = "", path: Path | None = None) -> Any:
    """torch dtype of a TensorRT tensor, through numpy (``trt.nptype``) rather than a hand-kept table, except
    the types numpy lacks (``TORCH_ONLY_TYPES``); any other type is refused with one line (InputFileError)."""
    import numpy as np
    import torch

    name = str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1]
    if name in TORCH_ONLY_TYPES:
        return getattr(torch, TORCH_ONLY_TYPES[name])
    try:
        np_type = trt.nptype(trt_dtype)
    except TypeError:
        raise InputFileError(f"{path or 'engine'} tensor {tensor!r} is TensorRT {name}, which resopt cannot feed "
                             f"or read (no numpy or torch type for it)",
                             hint="rebuild it from an ONNX whose input and output are float32 or float16") from None
    return torch.from_numpy(np.empty(0, dtype=np_type)).dtype


class TrtRunner(Runner):
    """Runs a serialized engine on the first GPU. ``infer`` takes host float32 NCHW batches (split to fit
    the engine's profile); ``time_batches`` times device-resident batches with CUDA events."""

    kind = "engine"
    runtime_modules = ("tensorrt", "torch")
    min_batch: int  # the engine's profile (a fixed batch: both the same)
    max_batch: int

    def __init__(self, path: Path | None = None, *, device: str = "gpu", threads: int | None = None,
                 plan: bytes | None = None, sidecar: dict[str, Any] | None = None) -> None:
        if device not in ("gpu", "cuda"):
            raise UsageError(f"TensorRT engines run only on the GPU, not on {device!r}; use --device gpu")
        trt = require_tensorrt()
        from resopt.backends.cuda import DeviceMemoryWindow

        if plan is None:
            if path is None:
                raise UsageError("TrtRunner needs an engine path or a serialized plan")
            path = Path(path)
            sidecar = read_sidecar(path)
            validate_sidecar(sidecar, path)
            check_engine_env(sidecar, engine_env_here(trt.__version__), engine=path)
            recorded = sidecar.get("engine", {}).get("sha256")
            if recorded and recorded != sha256_file(path):
                raise InputFileError(f"{path} does not match its sidecar (sha256 differs): the engine was "
                                     f"replaced after it was built",
                                     hint=f"rebuild it: {rebuild_command(sidecar, path)}")
            plan = path.read_bytes()
        elif sidecar is None:
            raise UsageError("TrtRunner from a plan needs the sidecar dict that describes it")
        import torch

        from resopt.backends.cuda import require_cuda

        require_cuda("a TensorRT engine")
        self.trt, self.sidecar, self.path = trt, sidecar, path
        self.memory = DeviceMemoryWindow()
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            reason = self.logger.errors[-1] if self.logger.errors else "unknown reason"
            raise InputFileError(f"TensorRT could not load {path or 'the built engine'}: {reason}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise InputFileError(f"{path or 'engine'} has {len(inputs)} inputs and {len(outputs)} outputs; "
                                 f"resopt runs single-input, single-output classifiers")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = tensor_torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name),
                                              tensor=self.input_name, path=path)
        self.output_dtype = tensor_torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name),
                                               tensor=self.output_name, path=path)
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if shape[0] == -1:  # dynamic batch: the profile bounds it
            lo, _opt, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        else:
            self.min_batch = self.max_batch = int(shape[0])
        self.sample_shape = tuple(int(d) for d in shape[1:])
        self.preprocess = Preprocess.from_dict(sidecar["preprocess"])
        self.input_size = self.preprocess.input_size
        self.classes = list(sidecar.get("classes", []))
        self.device = "cuda"
        self.torch_device = torch.device("cuda", 0)
        self.stream = torch.cuda.Stream(self.torch_device)
        self.provider = f"TensorRT {trt.__version__} {sidecar.get('precision', '')}".strip()
        self._bound: tuple[int, int, int] | None = None  # (batch, input ptr, output ptr) last bound

    def _bind(self, x: Any) -> Any:
        """Set the input shape and both addresses for ``x`` (a device tensor); returns the output tensor."""
        import torch

        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise UsageError(f"engine rejects input shape {tuple(x.shape)} (profile batch {self.min_batch}.."
                             f"{self.max_batch}, sample {self.sample_shape})")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                          device=self.torch_device)
        self.context.set_tensor_address(self.input_name, int(x.data_ptr()))
        self.context.set_tensor_address(self.output_name, int(out.data_ptr()))
        return out

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            reason = self.logger.errors[-1] if self.logger.errors else "see the TensorRT log above"
            raise InputFileError(f"TensorRT execution failed: {reason}")

    def _check_batch(self, n: int) -> None:
        if not self.min_batch <= n <= self.max_batch:
            raise UsageError(f"batch size {n} is outside the engine's profile ({self.min_batch}..{self.max_batch})",
                             hint=f"rebuild with --max-batch {n}: "
                                  f"{rebuild_command(self.sidecar, self.path or Path('MODEL.engine'))}")

    def infer(self, batch: Any) -> Any:
        import numpy as np
        import torch

        if batch.shape[1:] != self.sample_shape:
            raise UsageError(f"engine expects samples of shape {self.sample_shape}, got {tuple(batch.shape[1:])}")
        results = []
        # Any batch size runs: slices of at most the profile's maximum, a short one padded to its minimum
        # (with copies of its last sample) and trimmed, so accuracy code need not know the profile.
        for start, stop, size in profile_slices(len(batch), self.min_batch, self.max_batch):
            part = np.ascontiguousarray(batch[start:stop])
            if size > len(part):
                part = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)])
            with torch.cuda.stream(self.stream):
                x = torch.from_numpy(np.ascontiguousarray(part)).to(self.torch_device, non_blocking=False)
                x = x.to(self.input_dtype)
                out = self._bind(x)
                self._enqueue()
                host = out.float().cpu()  # waits on this stream
            results.append(host.numpy()[:stop - start])
        self.memory.sample()
        return np.concatenate(results) if len(results) > 1 else results[0]

    def time_batches(self, batch_size: int, *, warmup: int, iters: int, min_seconds: float = 0.0) -> list[float]:
        import torch

        from resopt.backends.cuda import cuda_event_times

        self._check_batch(batch_size)
        gen = torch.Generator(device=self.torch_device).manual_seed(0)
        x = torch.randn((batch_size, *self.sample_shape), generator=gen, device=self.torch_device).to(self.input_dtype)
        self._out = self._bind(x)  # keep the output buffer alive while TensorRT writes to it
        # x and the output were made on the default stream; TensorRT runs on self.stream.
        torch.cuda.synchronize(self.torch_device)
        times = cuda_event_times(self._enqueue, stream=self.stream, warmup=warmup, iters=iters,
                                 min_seconds=min_seconds)
        self.memory.sample()
        return times

    def reset_peak_device_memory(self) -> None:
        self.memory.reset()

    def peak_device_memory(self) -> int | None:
        return self.memory.held()

    def close(self) -> None:
        # Context before engine before runtime: TensorRT objects must not outlive their parents.
        for attr in ("context", "engine", "runtime"):
            if hasattr(self, attr):
                delattr(self, attr)
