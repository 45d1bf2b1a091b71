"""The worker process: one per benchmarked row, spawned fresh, serving timing and accuracy requests over a pipe
(see the package doc for why), and the parent's handle on it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from resopt.errors import ResoptError


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Give freed heap back to the OS so resident size reflects live memory, not glibc's free lists."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker_main(conn: Any, path: str, device: str, threads: int, options: dict[str, Any] | None = None,
                 backend: str = "") -> None:
    """Runs in a fresh process: open one runner, then serve timing and accuracy requests until "stop"."""
    # Before torch or onnxruntime is imported: their OpenMP pools read these once.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import traceback

    runner = None
    try:
        from resopt.artifacts import artifact_kind
        from resopt.backends import runner_class

        cls = runner_class(backend or artifact_kind(Path(path)))
        cls.load_runtime()
        import numpy  # every runner returns numpy

        _release_free_memory()
        baseline = _proc_status("VmRSS")
        t0 = time.perf_counter()
        runner = cls(Path(path), device=device, threads=threads, **(options or {}))
        load_s = time.perf_counter() - t0
        _release_free_memory()
        conn.send(("ready", {"provider": runner.provider, "device": runner.device,
                             "input_size": runner.input_size, "load_seconds": load_s,
                             "details": dict(runner.details)}))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "time":
                _, batch, warmup, iters, min_s = msg
                runner.prepare(batch)
                can_reset = _reset_peak_rss()
                runner.reset_peak_device_memory()
                times = runner.time_batches(batch, warmup=warmup, iters=iters, min_seconds=min_s)
                hwm = _proc_status("VmHWM")
                peak = hwm - baseline if can_reset and hwm is not None and baseline is not None else None
                conn.send(("times", times, peak, runner.peak_device_memory()))
            elif msg[0] == "infer":
                # Accuracy: the parent decodes each batch once and hands it to every file that takes the same
                # preprocessing, so a worker never imports torch or torchvision only to read images.
                images = msg[1]
                step = runner.max_batch or len(images)
                conn.send(("logits", numpy.concatenate([runner.infer(images[j:j + step])
                                                        for j in range(0, len(images), step)])))
    except ResoptError as e:
        conn.send(("error", type(e).__name__, e.message, e.hint))
    except BaseException:  # a bug or a runtime failure: hand the traceback to the parent to show
        conn.send(("crash", traceback.format_exc()))
    finally:
        if runner is not None:
            runner.close()
        conn.close()


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, ctx: Any, path: Path, device: str, threads: int, options: dict[str, Any] | None = None,
                 backend: str = "") -> None:
        self.path = path
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, str(path), device, threads, options, backend),
                                daemon=True,
                                name=f"resopt-bench-{path.name}")
        self.proc.start()
        child.close()

    def request(self, *msg: Any) -> tuple[Any, ...]:
        self.conn.send(msg)
        return self.receive()

    def receive(self) -> tuple[Any, ...]:
        try:
            reply = self.conn.recv()
        except (EOFError, ConnectionResetError):
            self.proc.join(5)
            code = self.proc.exitcode
            why = " (killed: out of memory?)" if code in (-9, 137) else ""
            raise ResoptError(f"the benchmark worker for {self.path} died with exit code {code}{why}",
                              hint="run it alone with a smaller --batch-size") from None
        if reply[0] == "error":
            import resopt.errors as errors

            cls = getattr(errors, reply[1], ResoptError)
            raise (cls if isinstance(cls, type) and issubclass(cls, ResoptError) else ResoptError)(
                reply[2], hint=reply[3])
        if reply[0] == "crash":
            raise RuntimeError(f"benchmark worker for {self.path} failed:\n{reply[1]}")
        return reply

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("stop",))
            self.proc.join(10)
        except (OSError, BrokenPipeError):
            pass
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()
