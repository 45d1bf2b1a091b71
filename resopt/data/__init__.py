"""Data: where images come from (``sources``), reading them (``datasets``), the train/val/test splits every
command shares (``splits``), how they become tensors (``transforms``) and batches (``loaders``; the fast
path for small images is ``decoded``).

Every name is importable from ``resopt.data``.
"""

from __future__ import annotations

from resopt.data.datasets import (
    BAD_IMAGE_HINT,
    balanced_indices,
    check_classes,
    check_split_classes,
    classes_of,
    image_folder,
    limit_per_class,
    load_image,
    stack_images,
    targets_of,
)
from resopt.data.loaders import default_workers, make_loader
from resopt.data.sources import IMAGE_SUFFIXES, KNOWN_NAMES, TEST_SPLIT_NAMES, DataSource, data_home, resolve_data
from resopt.data.splits import (
    DEFAULT_VAL_FRACTION,
    SELECT,
    UNKNOWN,
    Splits,
    ValSplit,
    check_val_fraction,
    choose_val_split,
    file_names,
    holdout_indices,
    load_eval_set,
    load_report_set,
    load_val_set,
    make_splits,
    recorded_val_split,
    split_of,
    split_validation,
)
from resopt.data.transforms import (
    compute_normalization,
    decide_input_size,
    eval_transform,
    probe_image_size,
    train_transform,
)

__all__ = [
    "BAD_IMAGE_HINT", "DEFAULT_VAL_FRACTION", "IMAGE_SUFFIXES", "KNOWN_NAMES", "SELECT", "TEST_SPLIT_NAMES",
    "UNKNOWN", "DataSource", "Splits", "ValSplit", "balanced_indices", "check_classes", "check_split_classes",
    "check_val_fraction", "choose_val_split", "classes_of", "compute_normalization", "data_home",
    "decide_input_size", "default_workers", "eval_transform", "file_names", "holdout_indices", "image_folder",
    "limit_per_class", "load_eval_set", "load_image", "load_report_set", "load_val_set", "make_loader", "make_splits",
    "probe_image_size", "recorded_val_split", "resolve_data", "split_of", "split_validation", "stack_images",
    "targets_of", "train_transform",
]
