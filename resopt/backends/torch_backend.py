"""PyTorch runner for ``.pt`` checkpoints (eager; CPU, or CUDA with optional FP16 autocast and channels_last).

On CUDA, ``time_batches`` times device-resident batches with CUDA events (host timing would measure the
kernel launches, not the GPU), and the peak device memory is PyTorch's own allocator peak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resopt.backends import Runner


class TorchRunner(Runner):
    kind = "pt"
    runtime_modules = ("torch", "torchvision", "resopt.train", "resopt.models")

    def __init__(self, path: Path, *, device: str = "cpu", threads: int | None = None, fp16: bool = False,
                 channels_last: bool = False, model: Any = None, checkpoint: dict | None = None) -> None:
        import torch

        from resopt.artifacts import checkpoint_preprocess, load_model
        from resopt.backends.cuda import resolve_device

        if model is None:
            model, checkpoint = load_model(path)
        if threads:
            torch.set_num_threads(threads)
        self.torch_device = resolve_device("cuda" if device == "gpu" else device)
        self.device = self.torch_device.type
        # Keep the checkpoint's metadata but not its state_dict: the model already holds the weights, and a
        # second copy would double the memory that ``bench`` reports for a .pt.
        self.checkpoint = {k: v for k, v in (checkpoint or {}).items() if k != "state_dict"}
        if "preprocess" in self.checkpoint:
            self.preprocess = checkpoint_preprocess(self.checkpoint)
            self.input_size = self.preprocess.input_size
        self.fp16 = fp16 and self.device == "cuda"
        self.channels_last = channels_last
        self.model = model.eval().to(self.torch_device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.provider = "torch eager" + (" fp16" if self.fp16 else "") + (" channels_last" if channels_last else "")

    def infer(self, batch: Any) -> Any:
        import torch

        x = torch.from_numpy(batch).to(self.torch_device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x).float().cpu().numpy()

    def _forward(self, x: Any) -> Any:
        import torch

        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.float16, enabled=self.fp16):
            return self.model(x)

    def time_batches(self, batch_size: int, *, warmup: int, iters: int, min_seconds: float = 0.0) -> list[float]:
        if self.device != "cuda":
            return super().time_batches(batch_size, warmup=warmup, iters=iters, min_seconds=min_seconds)
        import torch

        from resopt.backends.cuda import cuda_event_times

        # cuDNN autotuning picks the fastest convolution per input shape during the warm-up, as a deployed
        # model would; without it the first algorithm found is timed.
        torch.backends.cudnn.benchmark = True
        gen = torch.Generator(device=self.torch_device).manual_seed(0)
        x = torch.randn((batch_size, 3, self.input_size, self.input_size), generator=gen, device=self.torch_device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return cuda_event_times(lambda: self._forward(x), stream=torch.cuda.current_stream(self.torch_device),
                                warmup=max(warmup, 1), iters=iters, min_seconds=min_seconds)

    def reset_peak_device_memory(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def peak_device_memory(self) -> int | None:
        """Peak bytes held by PyTorch's allocator (weights, activations, cuDNN workspace) since the reset."""
        if self.device != "cuda":
            return None
        import torch

        return int(torch.cuda.max_memory_allocated(self.torch_device))
