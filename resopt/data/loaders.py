"""DataLoaders: worker counts, seeded shuffling, and the fast path's tensor batches."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.utils.data import Dataset


def default_workers(n_items: int) -> int:
    """Worker processes for a DataLoader: none for small sets (spawning costs more than decoding)."""
    if n_items < 4000:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, workers: int | None = None,
                drop_last: bool = False, sampler: Any = None, device: Any = "cpu") -> Any:
    """A DataLoader, or for decoded images (the fast path) their ``TensorBatches`` on ``device``; a
    ``DistributedSampler`` given as ``sampler`` decides the shard (its rank and world size)."""
    import torch
    from torch.utils.data import DataLoader

    from resopt.data.decoded import DecodedImages, TensorBatches

    if isinstance(dataset, DecodedImages):
        rank, world = (sampler.rank, sampler.num_replicas) if sampler is not None else (0, 1)
        return TensorBatches(dataset, batch_size, shuffle=shuffle, seed=seed, device=device, rank=rank,
                             world_size=world, drop_last=drop_last or bool(getattr(sampler, "drop_last", False)))
    n_workers = default_workers(len(dataset)) if workers is None else workers  # type: ignore[arg-type]
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=n_workers, generator=gen, drop_last=drop_last,
                      persistent_workers=n_workers > 0, pin_memory=False)
