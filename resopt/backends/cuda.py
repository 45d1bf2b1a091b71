"""CUDA helpers shared by the GPU runners: the "is there a GPU" check, CUDA-event timing and a
device-memory window. Device buffers and streams are PyTorch's (no pycuda, which compiles from source).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from resopt.errors import EnvironmentMismatchError


def require_cuda(what: str = "this", *,
                 hint: str = "run on a GPU machine (check with `resopt env`), or use --device cpu") -> Any:
    """``torch`` with a visible CUDA device, or a one-line EnvironmentMismatchError (exit 8)."""
    import torch

    if not torch.cuda.is_available():
        reason = "this torch build has no CUDA support" if torch.version.cuda is None else \
            "no CUDA GPU is visible to PyTorch"
        raise EnvironmentMismatchError(f"{what} needs an NVIDIA GPU, but {reason}", hint=hint)
    return torch


def resolve_device(name: str = "auto") -> Any:
    """The ``torch.device`` for ``--device`` (auto: this process's GPU under torchrun, else any GPU, else CPU)."""
    import os

    import torch

    if name == "auto":
        if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EnvironmentMismatchError("--device cuda was asked for but no CUDA GPU is visible to PyTorch",
                                       hint="run on a GPU machine, or use --device cpu")
    return torch.device(name)


def cuda_event_times(run: Callable[[], None], *, stream: Any, warmup: int, iters: int,
                     min_seconds: float = 0.0) -> list[float]:
    """Seconds per call of ``run`` (which enqueues work on ``stream``), measured with CUDA events.

    Calls are enqueued back to back in chunks of ``iters`` and synchronised once per chunk, so the host
    never idles the GPU between calls; each call is bracketed by its own pair of events, which gives a
    per-call distribution (p50/p99), not just a mean. Chunks repeat until ``min_seconds`` of GPU time.
    """
    import torch

    with torch.cuda.stream(stream):
        for _ in range(warmup):
            run()
        stream.synchronize()
        times: list[float] = []
        while len(times) < iters or sum(times) < min_seconds:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(max(iters, 1))]
            for start, end in events:
                start.record(stream)
                run()
                end.record(stream)
            stream.synchronize()
            times += [start.elapsed_time(end) / 1000.0 for start, end in events]
    return times


class DeviceMemoryWindow:
    """GPU memory a runner holds, as the drop in free device memory since ``baseline()``.

    TensorRT allocates engine weights and context activations with its own allocator, outside PyTorch's
    caching allocator, so ``torch.cuda.max_memory_allocated`` would miss them; free device memory sees
    both. The baseline is taken after CUDA initialisation, so the CUDA context itself is not counted.
    """

    def __init__(self, device: int = 0) -> None:
        import torch

        self.device = device
        torch.cuda.init()
        self.free_at_baseline = self._free()
        self.lowest_free = self.free_at_baseline

    def _free(self) -> int:
        import torch

        return int(torch.cuda.mem_get_info(self.device)[0])

    def sample(self) -> None:
        self.lowest_free = min(self.lowest_free, self._free())

    def reset(self) -> None:
        self.lowest_free = self._free()

    def held(self) -> int:
        """Bytes held since the baseline, at the lowest free memory seen (sampled now, too)."""
        self.sample()
        return max(0, self.free_at_baseline - self.lowest_free)
