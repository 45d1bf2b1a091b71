"""TensorRT 10's implicit INT8 calibration: the batch feeder and cache (``CalibrationFeeder``, plain Python,
tested on CPU) and the ``IInt8EntropyCalibrator2`` subclass that hands its batches to TensorRT.

TensorRT 11 removed implicit calibration (INT8 comes from Q/DQ nodes there), so this module is everything
that goes when TensorRT 10 support is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import atomic_output
from resopt.console import log, warn
from resopt.errors import DataError, UsageError

if TYPE_CHECKING:
    from resopt.artifacts import Preprocess

DEFAULT_CALIB_BATCH = 32


def interleave_by_class(targets: Sequence[int]) -> list[int]:
    """Indices ordered round-robin over classes (first of each class, then second, ...), so that every
    calibration batch - and the dropped remainder - mixes all classes instead of holding one."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    order: list[int] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        order += [q[rank] for q in queues if rank < len(q)]
    return order


class CalibrationFeeder:
    """Calibration batches for TensorRT 10's entropy calibrator, without TensorRT.

    The images are the calibration set ``resopt quantize`` uses (``resopt.calib``: a training folder,
    dataset name or saved ``.npz``, ``num`` images class-balanced and hashed), preprocessed exactly as
    the ONNX's metadata says, in full batches of ``batch_size`` interleaved over classes. The TensorRT
    calibrator class only moves these host batches to the GPU; the cache is read and written here,
    keyed so that a cache made for another model, image set or preprocessing is ignored, not reused.
    """

    def __init__(self, data: str | Path, preprocess: Preprocess, *, batch_size: int = 32, num: int | None = None,
                 classes: Sequence[str] | None = None, seed: int = 0, cache: Path | None = None,
                 model_sha256: str = "") -> None:
        from resopt.calib import load_calib_set
        from resopt.data import check_classes

        if batch_size < 1:
            raise UsageError(f"--calib-batch must be at least 1, got {batch_size}")
        self.calib_set = load_calib_set(data, num=num, seed=seed)
        if classes:
            check_classes(classes, self.calib_set.classes, model_name="the model", data=str(data))
        self.preprocess = preprocess
        self.order = interleave_by_class(self.calib_set.labels)
        self.batch_size = batch_size
        self.num_batches = len(self.order) // batch_size
        if self.num_batches == 0:
            raise DataError(f"calibration data {data} has {len(self.order)} images, fewer than one batch of "
                            f"{batch_size}", hint="add images or lower --calib-batch")
        self.images = self.num_batches * batch_size
        self.cache = Path(cache) if cache is not None else None
        self.key = {"model_sha256": model_sha256, "calib_set_sha256": self.calib_set.sha256, "images": self.images,
                    "batch_size": batch_size, "preprocess": preprocess.to_dict()}
        self._transform: Any = None
        self._next = 0
        self.batches_served = 0
        self.cache_used = False

    def describe(self) -> dict[str, Any]:
        return {**self.calib_set.describe(), "images_used": self.images, "batch_size": self.batch_size}

    def batches(self) -> Iterator[Any]:
        """All full batches as float32 (N, C, H, W) arrays, in the interleaved order."""
        for b in range(self.num_batches):
            yield self._batch(b)

    def batch_labels(self, b: int) -> list[int]:
        return [self.calib_set.labels[i] for i in self.order[b * self.batch_size:(b + 1) * self.batch_size]]

    def _batch(self, b: int) -> Any:
        import io

        import numpy as np
        from PIL import Image

        from resopt.data import eval_transform

        if self._transform is None:
            self._transform = eval_transform(self.preprocess)
        xs = []
        for i in self.order[b * self.batch_size:(b + 1) * self.batch_size]:
            try:
                with Image.open(io.BytesIO(self.calib_set.read(i))) as im:
                    xs.append(self._transform(im.convert("RGB")).numpy())
            except (OSError, ValueError) as e:
                raise DataError(f"{self.calib_set.describe_item(i)} cannot be decoded ({type(e).__name__})") \
                    from None
        return np.stack(xs).astype(np.float32, copy=False)

    def next_batch(self) -> Any | None:
        """The next batch for ``get_batch``, or None when calibration has seen them all."""
        if self._next >= self.num_batches:
            return None
        batch = self._batch(self._next)
        self._next += 1
        self.batches_served += 1
        return batch

    def _key_path(self) -> Path:
        assert self.cache is not None
        return Path(str(self.cache) + ".json")

    def read_cache(self) -> bytes | None:
        """The cached calibration table if it was made for this model, image set and preprocessing."""
        import json

        if self.cache is None or not self.cache.exists() or self.cache.stat().st_size == 0:
            return None
        key_path = self._key_path()
        if key_path.exists():
            try:
                stored = json.loads(key_path.read_text())
            except json.JSONDecodeError:
                stored = None
            if stored != self.key:
                warn(f"calibration cache {self.cache} was made for another model, image set or preprocessing; "
                     f"recalibrating and overwriting it")
                return None
        else:
            log(f"using calibration cache {self.cache} (no {key_path.name} alongside, so it cannot be checked)")
        self.cache_used = True
        return self.cache.read_bytes()

    def write_cache(self, data: bytes) -> None:
        import json

        from resopt.artifacts import write_text_atomic

        if self.cache is None:
            return
        # Written during the build, before the engine: an interrupt must still stop it.
        with atomic_output(self.cache, commit=False) as tmp:
            tmp.write_bytes(bytes(data))
        write_text_atomic(self._key_path(), json.dumps(self.key, indent=2) + "\n", commit=False)


def make_entropy_calibrator(trt: Any, feeder: CalibrationFeeder, *, device: str = "cuda") -> Any:
    """A ``trt.IInt8EntropyCalibrator2`` (TensorRT 10 only) that feeds ``feeder``'s batches from a ``device`` tensor.

    The bindings catch any exception raised in a Python override: one in ``get_batch`` reads as "no more
    batches" (calibration ends early and the build succeeds), one in ``write_calibration_cache`` is only
    printed. So every override keeps its first exception in ``error``, and ``_serialize_engine`` re-raises
    it once the build returns.
    """
    import torch

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._device_batch: Any = None  # referenced until the next call: TensorRT reads it asynchronously
            self.error: BaseException | None = None

        def _keep(self, e: BaseException) -> None:
            if self.error is None:
                self.error = e

        def get_batch_size(self) -> int:
            return feeder.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.error is not None:
                return None
            try:
                batch = feeder.next_batch()
                if batch is None:
                    return None
                self._device_batch = torch.from_numpy(batch).to(device).contiguous()
                return [int(self._device_batch.data_ptr())]
            except BaseException as e:  # noqa: BLE001 - kept and re-raised after the build
                self._keep(e)
                return None

        def read_calibration_cache(self) -> bytes | None:
            try:
                return feeder.read_cache()
            except BaseException as e:  # noqa: BLE001 - kept and re-raised after the build
                self._keep(e)
                return None

        def write_calibration_cache(self, cache: Any) -> None:
            try:
                feeder.write_cache(bytes(cache))
            except BaseException as e:  # noqa: BLE001 - kept and re-raised after the build
                self._keep(e)

    return _EntropyCalibrator()


def calibration_batch(calib_batch: int | None, static_batch: int | None) -> int:
    """The calibration batch size: ``--calib-batch`` (default 32) for a dynamic batch axis; an ONNX with a
    fixed batch calibrates in batches of exactly that size (TensorRT reads ``get_batch_size`` images per call
    into the network's fixed input), so another ``--calib-batch`` is refused rather than ignored."""
    if static_batch is None:
        return DEFAULT_CALIB_BATCH if calib_batch is None else calib_batch
    if calib_batch is not None and calib_batch != static_batch:
        raise UsageError(f"the ONNX input has a fixed batch of {static_batch}, so --calib-batch {calib_batch} "
                         f"cannot apply (calibration batches must be {static_batch} images)",
                         hint="drop --calib-batch, or export the model with a dynamic batch axis")
    return static_batch

