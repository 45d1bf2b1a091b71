"""k-means weight clustering: each layer's weights replaced by K shared values (Han et al., Deep Compression).

The ONNX stores, per weight, a uint8 index tensor of the weight's shape and a float32 codebook of K
entries, decoded by ``Cast -> Gather``. Both inputs are constants, so onnxruntime folds the decode at
session creation: the file is ~4x smaller than FP32 and the model then runs as a plain FP32 graph.

Clustering is 1-D Lloyd's algorithm with linear initialisation between the layer's min and max weight,
which keeps centroids on the rare large weights that matter most (density-based initialisation puts them
all near zero); with sorted values each assignment step is a binary search over centroid midpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import onnx

WEIGHT_SLOTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class ClusteredLayer:
    weight: str
    elements: int
    clusters: int  # distinct values after clustering (<= K)
    sqnr_db: float  # weight SQNR: 10 log10(|w|^2 / |w - w_k|^2)


def kmeans_1d(values: np.ndarray, k: int, *, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(codebook float32 [<=k], indices uint8 of ``values``' shape) minimising the squared error."""
    import numpy as np

    flat = values.astype(np.float64).ravel()
    lo, hi = float(flat.min()), float(flat.max())
    uniq = np.unique(flat)
    if len(uniq) <= k:  # already at most k values: exact
        return uniq.astype(np.float32), np.searchsorted(uniq, flat).astype(np.uint8).reshape(values.shape)
    centroids = np.linspace(lo, hi, k)
    assign = np.zeros(flat.shape, dtype=np.int64)
    for it in range(iters):
        mids = (centroids[1:] + centroids[:-1]) / 2
        new_assign = np.searchsorted(mids, flat)
        if it > 0 and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        counts = np.bincount(assign, minlength=k)
        sums = np.bincount(assign, weights=flat, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled]  # an empty cluster keeps its old centroid
        centroids = np.sort(centroids)
    used = np.unique(assign)  # drop empty clusters so the codebook holds only values in use
    remap = np.zeros(k, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return centroids[used].astype(np.float32), remap[assign].astype(np.uint8).reshape(values.shape)


def cluster_weights(src: Path, dst: Path, *, clusters: int, exclude: tuple[str, ...] = (),
                    only: tuple[str, ...] = ()) -> list[ClusteredLayer]:
    """Write ``src`` with every layer weight (Conv, Gemm, MatMul; not biases) clustered to ``clusters``."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    init = {i.name: i for i in model.graph.initializer}
    targets: dict[str, str] = {}  # weight -> first node using it
    for node in model.graph.node:
        slot = WEIGHT_SLOTS.get(node.op_type)
        if slot is None or len(node.input) <= slot or node.input[slot] not in init:
            continue
        if node.name in exclude or (only and node.name not in only):
            continue
        w = init[node.input[slot]]
        if w.data_type == onnx.TensorProto.FLOAT and int(np.prod(w.dims)) > clusters:
            targets.setdefault(node.input[slot], node.name)

    decode: list[onnx.NodeProto] = []
    report: list[ClusteredLayer] = []
    for name in targets:
        w = numpy_helper.to_array(init[name])
        codebook, idx = kmeans_1d(w, clusters)
        approx = codebook[idx.astype(np.int64)]
        noise = float(np.sum((w.astype(np.float64) - approx) ** 2))
        sqnr = 200.0 if noise == 0 else 10 * np.log10(float(np.sum(w.astype(np.float64) ** 2)) / noise)
        report.append(ClusteredLayer(name, w.size, len(codebook), float(sqnr)))
        model.graph.initializer.remove(init[name])
        model.graph.initializer.extend([numpy_helper.from_array(codebook, f"{name}__codebook"),
                                        numpy_helper.from_array(idx, f"{name}__index")])
        # Gather takes int32/int64 indices only; the Cast is folded with it at session creation.
        decode += [helper.make_node("Cast", [f"{name}__index"], [f"{name}__index_i32"], to=onnx.TensorProto.INT32,
                                    name=f"{name}__kmeans_cast"),
                   helper.make_node("Gather", [f"{name}__codebook", f"{name}__index_i32"], [name], axis=0,
                                    name=f"{name}__kmeans_decode")]
    nodes = decode + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_stale_value_info(model, set(targets))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return report


def _drop_stale_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    keep = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def distinct_values_per_weight(model: onnx.ModelProto) -> dict[str, int]:
    """Decoded distinct values of each k-means weight (for checks): codebook entries actually indexed."""
    import numpy as np
    from onnx import numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for name, arr in init.items():
        if name.endswith("__index"):
            base = name[: -len("__index")]
            out[base] = len(np.unique(init[base + "__codebook"][arr.astype(np.int64)]))
    return out
