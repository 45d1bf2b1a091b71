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

# The extras that provide TensorRT (plain PyPI wheels, one per CUDA major: the one torch was built for);
# every "install TensorRT" message quotes this.
TENSORRT_INSTALL = "pip install 'resopt[tensorrt-cu12]' (or 'resopt[tensorrt-cu13]' with a CUDA 13 torch)"


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


# CPU instruction sets that decide which INT8/BF16 kernels onnxruntime and OpenVINO can use, as
# (name shown, /proc/cpuinfo flag). x86: "flags"; Arm (aarch64): "Features".
X86_ISA: tuple[tuple[str, str], ...] = (
    ("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"),
    ("AVX-512 BF16", "avx512_bf16"), ("AVX-512 FP16", "avx512_fp16"), ("AMX-INT8", "amx_int8"),
    ("AMX-BF16", "amx_bf16"), ("AMX-FP16", "amx_fp16"),
)
ARM_ISA: tuple[tuple[str, str], ...] = (
    ("NEON", "asimd"), ("dot product (SDOT/UDOT)", "asimddp"), ("INT8 matrix multiply (I8MM)", "i8mm"),
    ("BF16", "bf16"), ("SVE", "sve"), ("SVE2", "sve2"), ("SME", "sme"),
)


def cpu_isa(flags: set[str] | frozenset[str], machine: str) -> dict[str, bool]:
    """Which of the instruction sets that matter for INT8/BF16 inference the CPU has, from its
    /proc/cpuinfo flags; ``machine`` is ``platform.machine()`` (x86_64, aarch64, ...)."""
    table = ARM_ISA if machine.lower() in ("aarch64", "arm64") or machine.lower().startswith("arm") else X86_ISA
    return {name: flag in flags for name, flag in table}


def read_cpu_fields(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The fields of ``path`` (``/proc/cpuinfo``), keys in lower case (``model name``, ``vendor_id``, ``flags``,
    ``cpu mhz``; on Arm ``features``, ``hardware``), each with its first non-empty value: the first processor's,
    and the lines Arm kernels print once after the processors. Empty where the file cannot be read. The one
    reader of that file: ``env``, ``bench``, ``quantize`` (VNNI) and scripts/bench_cpu.py all go through it."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if sep and value and key not in fields:
                    fields[key] = value
    except OSError:
        pass
    return fields


def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str]]:
    """(CPU model name, flags) from ``path``; (None, empty) where there is none."""
    fields = read_cpu_fields(path)
    model = fields.get("model name") or fields.get("hardware")
    return model, set((fields.get("flags") or fields.get("features") or "").split())


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (None where it cannot be told, e.g. not Linux)."""
    fields = read_cpu_fields()
    if not fields:
        return None
    flags = set(fields.get("flags", "").split())
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def openvino_version() -> tuple[str | None, str | None]:
    """(version, None) if ``import openvino`` works, else (None, the reason)."""
    try:
        import openvino as ov
    except ImportError as e:
        return None, f"OpenVINO is not installed ({getattr(e, 'msg', e)})"
    return str(ov.__version__).split("-", 1)[0], None


def cpu_capabilities() -> list[str]:
    """The OpenVINO CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. FP32, BF16, INT8); needs OpenVINO."""
    import openvino as ov

    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


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
    cpu: str | None = None  # model name
    cpu_isa: dict[str, bool] = field(default_factory=dict)  # X86_ISA / ARM_ISA names -> present
    cores_available: int = 1  # cores this process may use (affinity); bench's default thread count
    openvino: str | None = None
    openvino_capabilities: list[str] = field(default_factory=list)  # OpenVINO CPU plugin: FP32, BF16, INT8...
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
            lines = out.strip().splitlines()
            return (lines[0] if lines else None), None
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
    cpu_model, flags = read_cpuinfo()
    isa = cpu_isa(flags, platform.machine()) if flags else {}
    if not flags:
        notes.append("CPU instruction sets unknown (no /proc/cpuinfo flags on this system)")
    ov_v, ov_reason = openvino_version()
    ov_caps = cpu_capabilities() if ov_v else []
    if ov_reason:
        notes.append(f"{ov_reason}; install with: pip install openvino")
    if ort_v and gpus and "CUDAExecutionProvider" not in providers:
        notes.append("onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu for .onnx on the GPU")
    return EnvInfo(
        python=platform.python_version(), platform=platform.platform(terse=True), cpu_count=os.cpu_count() or 1,
        resopt=__version__, torch=torch_v, torch_cuda=torch_cuda, cudnn=cudnn, cuda_available=cuda_available,
        gpus=gpus, driver=driver, cuda_driver=cuda_driver, tensorrt=trt_v, onnxruntime=ort_v,
        ort_providers=providers, onnx=version("onnx"), cpu=cpu_model or platform.processor() or None,
        cpu_isa=isa, cores_available=available_cores(), openvino=ov_v, openvino_capabilities=ov_caps, notes=notes,
    )
