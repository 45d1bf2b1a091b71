"""``bench`` options: ``BenchConfig``, the batch sizes, runtimes, precisions and ``.pt`` variants it accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from resopt.backends import ONNX_RUNTIMES, runtime_record
from resopt.envinfo import available_cores
from resopt.errors import UsageError
from resopt.ranges import check_fields

DEVICES = ("cpu", "gpu")
# How a .pt runs: eager FP32 as trained, and the usual GPU speed-ups (TorchRunner keyword arguments).
PT_VARIANTS: dict[str, dict[str, bool]] = {
    "fp32": {}, "channels-last": {"channels_last": True}, "fp16": {"fp16": True},
    "fp16-channels-last": {"fp16": True, "channels_last": True},
}
DEFAULT_PT_VARIANTS = {"cpu": ("fp32",), "gpu": ("fp32", "fp16", "fp16-channels-last")}


def parse_batch_sizes(text: str | int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``; a one-line UsageError naming the bad item otherwise."""
    if isinstance(text, int):
        items: list[Any] = [text]
    elif isinstance(text, (tuple, list)):
        items = list(text)
    else:
        items = [t.strip() for t in str(text).split(",")]
    sizes: list[int] = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise UsageError(f"--batch-size {text!r}: {item!r} is not a whole number; give one or a "
                             f"comma-separated list of positive integers like 1,8,32") from None
        if value < 1:
            raise UsageError(f"--batch-size {text!r}: batch sizes must be at least 1, got {value}")
        if value not in sizes:
            sizes.append(value)
    if not sizes:
        raise UsageError("--batch-size is empty; give one or a list like 1,8,32")
    return tuple(sizes)


def parse_pt_variants(text: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...] | None:
    """``"fp32,fp16"`` -> ``("fp32", "fp16")``; None stays None (the device's default)."""
    if text is None:
        return None
    return parse_choices("--pt-variants", text, tuple(PT_VARIANTS), what=".pt variant")


def parse_choices(option: str, text: str | tuple[str, ...] | list[str], allowed: tuple[str, ...], *,
                  what: str = "value") -> tuple[str, ...]:
    """``"ort,openvino"`` -> ``("ort", "openvino")``, each checked against ``allowed``, duplicates dropped."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    for item in items:
        if item not in allowed:
            raise UsageError(f"{option}: unknown {what} {item!r}; choose one or more of: {', '.join(allowed)}")
    if not items:
        raise UsageError(f"{option} is empty; choose one or more of: {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


# bench --runtime and --precision values, from the backends' table: the runtimes .onnx files can be sent to,
# and the precisions those runtimes can be asked for.
RUNTIMES = tuple(ONNX_RUNTIMES)
PRECISIONS = tuple(dict.fromkeys(p for r in RUNTIMES for p in runtime_record(r).precisions))


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    threads: int | None = None  # intra-op threads for torch and onnxruntime; None: all available cores
    warmup: int = 5
    iters: int = 20  # at least this many timed batches per (file, batch size), over all rounds
    min_seconds: float = 2.0  # and at least this much timed work per (file, batch size)
    rounds: int = 3
    device: str = "cpu"
    data: str | None = None  # --data: top-1/top-5 on its test split
    limit_per_class: int | None = None
    eval_batch_size: int = 256
    pt_variants: tuple[str, ...] | None = None  # None: DEFAULT_PT_VARIANTS[device]
    # Runtimes each .onnx file runs on, one row each (ort: onnxruntime; openvino: OpenVINO's CPU plugin), and
    # the inference precisions asked of the runtimes that choose one (OpenVINO), one row each.
    runtimes: tuple[str, ...] = ("ort",)
    precisions: tuple[str, ...] = ("f32",)

    def validate(self) -> None:
        parse_batch_sizes(self.batch_sizes)
        check_fields(self, min_seconds="min_time")  # threads, warmup, iters, ... against resopt.ranges
        if self.device not in DEVICES:
            raise UsageError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        if self.limit_per_class is not None and self.data is None:
            raise UsageError("--limit-per-class needs --data")
        parse_choices("--runtime", self.runtimes, RUNTIMES)
        parse_choices("--precision", self.precisions, PRECISIONS)
        for r in self.runtimes:
            if runtime_record(r).cpu_only and self.device != "cpu":
                raise UsageError(f"--runtime {r} runs on the CPU; use --device cpu")
        choosers = [r for r in RUNTIMES if len(runtime_record(r).precisions) > 1]
        if set(self.precisions) != {"f32"} and not set(choosers) & set(self.runtimes):
            raise UsageError(f"--precision {','.join(self.precisions)} applies to --runtime {','.join(choosers)} "
                             f"(onnxruntime's CPU provider runs each file in its own precision)",
                             hint=f"add --runtime {','.join(RUNTIMES)}")
        fp16 = [v for v in parse_pt_variants(self.pt_variants) or () if PT_VARIANTS[v].get("fp16")]
        if fp16 and self.device != "gpu":
            raise UsageError(f"--pt-variants {fp16[0]} needs --device gpu (FP16 autocast runs on CUDA)")

    @property
    def effective_pt_variants(self) -> tuple[str, ...]:
        return parse_pt_variants(self.pt_variants) or DEFAULT_PT_VARIANTS[self.device]

    @property
    def effective_threads(self) -> int:
        return self.threads or available_cores()
