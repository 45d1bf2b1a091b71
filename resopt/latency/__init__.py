"""Latency on this machine's runtime, for pruning that pays there: the width rule behind ``--round-to auto``
(``widths``), latency tables of a network's residual blocks per width, cached per machine, and the predictor
``--target-latency`` / ``--latency-ms`` choose against (``table``), measured with bench's workers on small
ONNX files (``measure``; the cache and its machine key: ``cache``).

For another pruning method (block removal): ``build_predictor(parent, size, runtime=..., precision=...,
batch=...)`` then ``predictor.predict(predictor.parent.without([(stage, index), ...]))`` in ms per batch, or
``predictor.fraction(...)`` of the parent's measured latency.
"""

from resopt.latency.cache import MachineKey, cache_dir, cache_path, load_cached, machine_key, save_cached
from resopt.latency.measure import MEASURED, Timing, check_measured
from resopt.latency.table import (
    FRACTIONS,
    ArchDescription,
    BlockShape,
    Conv,
    LatencyTable,
    Predictor,
    build_predictor,
    describe_model,
    measure_models,
    scaled_block,
)
from resopt.latency.widths import RoundTo, choose_round_to

__all__ = [
    "FRACTIONS", "MEASURED", "ArchDescription", "BlockShape", "Conv", "LatencyTable", "MachineKey", "Predictor",
    "RoundTo", "Timing", "build_predictor", "cache_dir", "cache_path", "check_measured", "choose_round_to",
    "describe_model", "load_cached", "machine_key", "measure_models", "save_cached", "scaled_block",
]
