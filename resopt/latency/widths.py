"""``prune --round-to auto``: the channel multiple the target runtime's kernels fill, from its precision and
this machine's instruction sets (``resopt.envinfo``, the one /proc/cpuinfo reader) or GPU.

The rule: a width runs at full speed when it fills whole vector registers (or matrix tiles) of the kernels
the runtime picks, so the multiple is the register (tile) width in elements of the precision:

==========================  =====  =====  =====  ============================================================
ISA (x86 unless said)       f32    bf16   int8   why
==========================  =====  =====  =====  ============================================================
AMX (amx_int8 / amx_bf16)   16     32     64     a tile row is 64 bytes: 64 int8 or 32 bf16 channels
AVX-512                     16     16     16     16 fp32 lanes per zmm; ORT's NCHWc and oneDNN's nChw16c
                                                 layouts block channels by 16, INT8 kernels too (VNNI)
AVX2                        8      8      8      8 fp32 lanes per ymm: ORT's and oneDNN's 8-channel blocks
Arm NEON / SVE (128 bit)    4      8      16     4 fp32, 8 bf16, 16 int8 (SDOT) per 128-bit register
GPU tensor cores            4      8      16     NVIDIA: TF32 multiples of 4, FP16/BF16 of 8, INT8 of 16
==========================  =====  =====  =====  ============================================================

Measured, not assumed: ``scripts/bench_widths.py`` sweeps one 3x3 convolution's latency against its width on
onnxruntime and OpenVINO, FP32, BF16 and INT8, and its committed result, ``docs/widths/widths.md`` (an AMD EPYC
with AVX-512, VNNI and AVX-512 BF16, no AMX), shows the AVX-512 row: on ORT FP32 widths 16, 32, 48 and 64 cost
1.00-1.22x the best per MAC while 20, 24, 36, 40 and 52 cost 1.5-2.5x; INT8 is cheapest at 48 and 64 and
pays 1.3-1.4x at 36, 52 and 68. The AMX and GPU rows follow the hardware's tile shapes (the issue's
measurement on an AMX Xeon: odd widths fell off the tiles and made INT8 slower); this machine cannot check
them.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from typing import Any

from resopt.errors import UsageError

RESULT = "docs/widths/widths.md"
# Every runtime --round-to auto knows and the precisions it takes (latency tables: resopt.latency.MEASURED).
RUNTIME_PRECISIONS: dict[str, tuple[str, ...]] = {
    "ort": ("f32", "int8"), "openvino": ("f32", "bf16", "int8"), "torch": ("f32", "bf16", "fp16"),
    "tensorrt": ("f32", "fp16", "bf16", "int8"),
}
RUNTIMES = tuple(RUNTIME_PRECISIONS)
PRECISIONS = ("f32", "bf16", "int8", "fp16")

# (ISA class, precision) -> multiple; fp16 on a CPU is taken as bf16 (two bytes per channel).
CPU_RULE: dict[str, dict[str, int]] = {
    "AMX": {"f32": 16, "bf16": 32, "int8": 64},
    "AVX-512": {"f32": 16, "bf16": 16, "int8": 16},
    "AVX2": {"f32": 8, "bf16": 8, "int8": 8},
    "NEON": {"f32": 4, "bf16": 8, "int8": 16},
}
GPU_RULE = {"f32": 4, "bf16": 8, "fp16": 8, "int8": 16}


@dataclass(frozen=True)
class RoundTo:
    """The multiple ``--round-to auto`` chose and why (recorded in the lineage, printed on stderr)."""

    multiple: int
    runtime: str
    precision: str
    basis: str  # the ISA class or "GPU ..." the rule used
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_runtime(runtime: str, precision: str) -> None:
    if runtime not in RUNTIME_PRECISIONS:
        from resopt.errors import choice_error

        raise choice_error("--runtime", runtime, RUNTIMES)
    if precision not in RUNTIME_PRECISIONS[runtime]:
        raise UsageError(f"--precision {precision} does not apply to --runtime {runtime}; it takes "
                         f"{', '.join(RUNTIME_PRECISIONS[runtime])}")


def isa_class(isa: dict[str, bool], machine: str, precision: str) -> str:
    """Which row of ``CPU_RULE`` this CPU falls in for ``precision``."""
    if machine.lower() in ("aarch64", "arm64") or machine.lower().startswith("arm"):
        return "NEON"
    amx = {"int8": "AMX-INT8", "bf16": "AMX-BF16"}.get(precision)
    if amx and isa.get(amx):
        return "AMX"
    if isa.get("AVX-512"):
        return "AVX-512"
    return "AVX2"


def choose_round_to(runtime: str, precision: str, *, isa: dict[str, bool] | None = None, machine: str | None = None,
                    gpu: str | None = None, gpu_cc: tuple[int, int] | None = None) -> RoundTo:
    """The channel multiple for ``runtime``/``precision`` on this machine (``isa``/``machine``/``gpu`` override the
    probes, for tests). TensorRT, and torch where a CUDA GPU is visible, get the tensor-core rule."""
    check_runtime(runtime, precision)
    if runtime in ("tensorrt", "torch") and gpu is None:
        from resopt.envinfo import collect_gpus

        gpus = collect_gpus()
        if gpus:
            from resopt.envinfo import parse_cc

            gpu, gpu_cc = gpus[0].name, parse_cc(gpus[0].compute_capability)
    if runtime == "tensorrt" or (runtime == "torch" and gpu):
        multiple = GPU_RULE[precision]
        where = gpu or "no GPU visible here: the GPU the engine will run on"
        if precision == "f32" and gpu_cc is not None and gpu_cc < (8, 0):
            multiple = 8  # no TF32 before Ampere: FP32 runs on CUDA cores, 8 keeps FP16 fall-backs aligned too
        return RoundTo(multiple, runtime, precision, "GPU tensor cores",
                       f"{runtime} {precision} on {where}: tensor-core kernels take channel multiples of "
                       f"{multiple} ({'TF32: 4' if multiple == 4 else 'FP16/BF16: 8, INT8: 16'}; NVIDIA's "
                       f"performance guide)")
    from resopt.envinfo import cpu_isa, read_cpuinfo

    machine = machine or platform.machine()
    if isa is None:
        isa = cpu_isa(read_cpuinfo()[1], machine)
    cls = isa_class(isa, machine, precision)
    key = "bf16" if precision == "fp16" else precision
    multiple = CPU_RULE[cls][key]
    present = ", ".join(name for name, has in isa.items() if has) or "no vector extensions found"
    return RoundTo(multiple, runtime, precision, cls,
                   f"{runtime} {precision} on this CPU ({present}): {cls} kernels fill {multiple}-channel blocks "
                   f"(measured: {RESULT})")
