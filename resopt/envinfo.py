"""What this machine can run: GPU, compute capability, precision support and library versions.

``resopt env`` prints it; ``build`` and the TensorRT runner use the same facts to record where an engine
was built and to refuse one built elsewhere. Every probe is optional: a machine without a GPU, a
driver or TensorRT gets ``None`` fields and a reason, never an exception.

Precision support is derived from the compute capability (CC), because TensorRT 10.5 deprecated and
TensorRT 11 removed ``Builder.platform_has_fast_fp16/int8/tf32`` in favour of querying CUDA directly:

======================  ===========================================================================
feature                 compute capability (examples)
======================  ===========================================================================
fast FP16               5.3 (Jetson TX1), 6.0 (P100), 6.2 (Jetson TX2), >= 7.0 (V100 onwards).
                        6.1 (GTX 10xx, P4, P40) runs FP16 at 1/64 rate, so it does not count.
INT8                    6.1 (DP4A), >= 7.0 (DP4A; INT8 tensor cores from 7.2/7.5: Xavier, T4).
tensor cores            >= 7.0
TF32                    >= 8.0 (A100, RTX 30xx onwards)
BF16                    >= 8.0
2:4 structured sparsity >= 8.0 (sparse tensor cores, used by TensorRT with ``--sparsity``)
FP8                     >= 8.9 (L4, L40, RTX 40xx), 9.0 (H100)
======================  ===========================================================================
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

# The extra and index that provide TensorRT; every "install TensorRT" message quotes this.
TENSORRT_INSTALL = "pip install --extra-index-url https://pypi.nvidia.com 'resopt[tensorrt]'"


def precision_support(cc: tuple[int, int]) -> dict[str, bool]:
    """Which reduced precisions run fast on a GPU of compute capability ``cc`` (see the module table)."""
    fp16 = cc in ((5, 3), (6, 0), (6, 2)) or cc >= (7, 0)
    return {
        "fp16": fp16,
        "int8": cc == (6, 1) or cc >= (7, 0),
        "tensor_cores": cc >= (7, 0),
        "tf32": cc >= (8, 0),
        "bf16": cc >= (8, 0),
        "sparsity_2_4": cc >= (8, 0),
        "fp8": cc >= (8, 9),
    }


def parse_cc(text: str) -> tuple[int, int]:
    """``"8.6"`` -> ``(8, 6)``."""
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "8.0"
    total_memory: int  # bytes
    multiprocessors: int
    support: dict[str, bool]


@dataclass(frozen=True)
class EnvInfo:
    """Facts about this machine; ``None`` where a library or device is absent (``notes`` says why)."""

    python: str
    platform: str
    cpu_count: int
    resopt: str
    torch: str | None
    torch_cuda: str | None  # the CUDA version torch was built with (None: CPU-only build)
    cudnn: int | None
    cuda_available: bool
    gpus: list[GpuInfo]
    driver: str | None
    cuda_driver: str | None  # highest CUDA version the driver supports, e.g. "12.4"
    tensorrt: str | None
    onnxruntime: str | None
    ort_providers: list[str]
    onnx: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> GpuInfo | None:
        return self.gpus[0] if self.gpus else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensorrt_build_path"] = tensorrt_build_path(self.tensorrt)
        return d


def tensorrt_build_path(version: str | None) -> str | None:
    """How ``resopt build`` sets precision with this TensorRT (a line for ``env``)."""
    if version is None:
        return None
    major = trt_major(version)
    if major >= 11:
        return "strongly typed: FP16 from an FP16-converted ONNX, INT8 from Q/DQ nodes"
    if major == 10:
        return "builder flags (FP16, INT8 calibration) or Q/DQ ONNX"
    return f"TensorRT {version} is older than 10, which resopt does not support"


def trt_major(version: str) -> int:
    """``"10.3.0.26"`` -> 10; 0 for a version string without a leading number."""
    head = str(version).strip().split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def tensorrt_version() -> tuple[str | None, str | None]:
    """(version, None) if ``import tensorrt`` works, else (None, the reason)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return None, f"TensorRT is not installed ({e.msg if hasattr(e, 'msg') else e})"
    except OSError as e:  # the wheel is there but its shared libraries are not
        return None, f"TensorRT is installed but cannot load its libraries ({str(e).splitlines()[0][:160]})"
    return str(getattr(trt, "__version__", "unknown")), None


def driver_versions() -> tuple[str | None, str | None]:
    """(display driver, CUDA driver API version) from NVML (shipped with torch's cuda-bindings), else
    nvidia-smi; (None, None) where neither is present."""
    try:
        from cuda.bindings import nvml

        nvml.init_v2()
        try:
            driver = str(nvml.system_get_driver_version())
            cuda = int(nvml.system_get_cuda_driver_version())
            return driver, f"{cuda // 1000}.{cuda % 1000 // 10}"
        finally:
            nvml.shutdown()
    except Exception:  # no NVML library (no driver), or an older cuda-bindings without nvml
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return (out.strip().splitlines() or [None])[0], None
        except (OSError, subprocess.SubprocessError):
            pass
    return None, None


def collect_gpus() -> list[GpuInfo]:
    """The CUDA devices torch can see (empty without a GPU or with a CPU-only torch)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cc = (int(p.major), int(p.minor))
        gpus.append(GpuInfo(i, str(p.name), f"{cc[0]}.{cc[1]}", int(p.total_memory),
                            int(p.multi_processor_count), precision_support(cc)))
    return gpus


def collect_env() -> EnvInfo:
    """Probe this machine; never raises for a missing library or device."""
    from importlib import metadata

    from resopt import __version__

    notes: list[str] = []

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    torch_v = torch_cuda = None
    cudnn = None
    cuda_available = False
    try:
        import torch

        torch_v, torch_cuda = torch.__version__, torch.version.cuda
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        cuda_available = bool(torch.cuda.is_available())
    except ImportError:
        notes.append("torch is not installed")
    gpus = collect_gpus()
    if not gpus:
        notes.append("no CUDA GPU is visible to PyTorch" if torch_cuda else
                     "this torch build has no CUDA support" if torch_v else "no GPU probe without torch")
    driver, cuda_driver = driver_versions() if gpus or shutil.which("nvidia-smi") else (None, None)
    trt_v, trt_reason = tensorrt_version()
    if trt_reason:
        notes.append(f"{trt_reason}; install with: {TENSORRT_INSTALL}")
    ort_v, providers = None, []
    try:
        import onnxruntime as ort

        ort_v, providers = ort.__version__, list(ort.get_available_providers())
    except ImportError:
        notes.append("onnxruntime is not installed")
    if ort_v and gpus and "CUDAExecutionProvider" not in providers:
        notes.append("onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu for .onnx on the GPU")
    return EnvInfo(
        python=platform.python_version(), platform=platform.platform(terse=True), cpu_count=os.cpu_count() or 1,
        resopt=__version__, torch=torch_v, torch_cuda=torch_cuda, cudnn=cudnn, cuda_available=cuda_available,
        gpus=gpus, driver=driver, cuda_driver=cuda_driver, tensorrt=trt_v, onnxruntime=ort_v,
        ort_providers=providers, onnx=version("onnx"), notes=notes,
    )
