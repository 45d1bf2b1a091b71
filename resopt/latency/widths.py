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

Measured where this machine can: ``scripts/bench_widths.py`` sweeps one 3x3 convolution's latency against its
width on onnxruntime and OpenVINO, FP32, BF16 and INT8, and its committed result (``docs/widths/widths.md``,
rows in ``widths.json``: an AMD EPYC with AVX-512, VNNI and AVX-512 BF16, no AMX, measured with other work on
the cores) replaces the AVX-512 row on a CPU of that class: ``MEASURED_RULE``, derived by ``derive_multiple``
(per map size, the smallest multiple whose widths' median cost per MAC is within 10% of the best multiple's;
the largest over map sizes). It gives 16 for ORT FP32 and INT8 and OpenVINO FP32 (ORT FP32 at 32x32:
multiples of 16 cost a median 1.06x the best width per MAC, other multiples of 8 1.58x, of 4 1.85x) and 8 for
OpenVINO BF16 and INT8, where the sweep's columns are too noisy to tell 8 from 16. The AMX, AVX2, Arm and GPU
rows follow the hardware's register and tile shapes (the issue's measurement on an AMX Xeon: odd widths fell
off the tiles and made INT8 slower); this machine cannot check them.
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

# What the committed sweep (RESULT; its rows in docs/widths/widths.json) says for the ISA class it was measured
# on, per (runtime, precision): ``derive_multiple`` over its columns. It replaces CPU_RULE on a CPU of that
# class; tests/test_latency.py re-derives it from the JSON, so the two cannot drift apart.
MEASURED_ON = "AVX-512"
MEASURED_RULE: dict[tuple[str, str], int] = {
    ("ort", "f32"): 16, ("ort", "int8"): 16, ("openvino", "f32"): 16, ("openvino", "bf16"): 8,
    ("openvino", "int8"): 8,
}
CANDIDATES = (4, 8, 16, 32)
TOLERANCE = 1.10


def derive_multiple(rows: list[dict[str, Any]], runtime: str, precision: str, *,
                    candidates: tuple[int, ...] = CANDIDATES, tolerance: float = TOLERANCE) -> int:
    """The channel multiple a width sweep supports for ``runtime``/``precision``: per map size, the median cost
    per MAC (``relative_cost_per_mac``) of the widths (>= 16) that are multiples of each candidate, and the
    smallest candidate within ``tolerance`` of the best candidate's median; over the map sizes, the largest of
    those (a network has every map size, so its widths must pay at all of them). Medians, because a sweep on a
    busy machine has outliers."""
    import statistics

    maps = sorted({r["map"] for r in rows if (r["runtime"], r["precision"]) == (runtime, precision)})
    if not maps:
        raise UsageError(f"the width sweep has no {runtime} {precision} rows")
    picks = []
    for size in maps:
        col = [(r["width"], r["relative_cost_per_mac"]) for r in rows
               if (r["runtime"], r["precision"], r["map"]) == (runtime, precision, size) and r["width"] >= 16]
        median = {m: statistics.median(c for w, c in col if w % m == 0) for m in candidates
                  if any(w % m == 0 for w, _ in col)}
        best = min(median.values())
        picks.append(min(m for m, v in median.items() if v <= tolerance * best))
    return max(picks)


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
    present = ", ".join(name for name, has in isa.items() if has) or "no vector extensions found"
    if cls == MEASURED_ON and (runtime, key) in MEASURED_RULE:
        multiple = MEASURED_RULE[(runtime, key)]
        return RoundTo(multiple, runtime, precision, cls,
                       f"{runtime} {precision} on this CPU ({present}): widths that are multiples of {multiple} "
                       f"cost the least per MAC in the {cls} width sweep ({RESULT})")
    multiple = CPU_RULE[cls][key]
    sweep = f"has no {runtime} {precision} column" if cls == MEASURED_ON else f"measured {MEASURED_ON} only"
    return RoundTo(multiple, runtime, precision, cls,
                   f"{runtime} {precision} on this CPU ({present}): {cls} kernels fill {multiple}-channel blocks "
                   f"(the register or tile width; {RESULT} {sweep})")
