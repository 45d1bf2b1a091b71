"""The checks that make an ONNX graph an image classifier resopt can run: one NCHW image input, one
(batch, classes) output, a dynamic batch axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resopt.errors import InputFileError


def image_input(model: Any, path: object) -> Any:
    """The graph's one image input (``ValueInfoProto``), NCHW: graph inputs that are initializers (old
    exporters list the weights as inputs) are not inputs. Anything else is one ``InputFileError`` line."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputFileError(f"{path} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); an image "
                             f"classifier takes one NCHW image tensor")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise InputFileError(f"{path} input {inputs[0].name!r} has rank {len(dims)}; expected NCHW images")
    return inputs[0]


def check_single_output(model: Any, path: object) -> None:
    if len(model.graph.output) != 1:
        raise InputFileError(f"{path} has {len(model.graph.output)} outputs; an image classifier has one output "
                             f"of (batch, classes) logits")


def check_classifier_graph(model: Any, path: object, *, image_size: int | None = None) -> None:
    """Refuse an ONNX that resopt cannot run as an image classifier, with one line saying why.

    resopt feeds one NCHW float batch of any size and reads one (batch, classes) output, so the graph needs
    exactly one image input with a dynamic batch axis (``resopt export`` writes one) and one rank-2 output.
    """
    inp = image_input(model, path)
    check_single_output(model, path)
    dims = inp.type.tensor_type.shape.dim
    if dims[0].HasField("dim_value"):
        raise InputFileError(f"{path} input {inp.name!r} has a fixed batch of {dims[0].dim_value}; resopt "
                             f"needs a dynamic batch axis",
                             hint="export it with `resopt export MODEL.pt`, or make its batch dynamic: `resopt import`")
    size = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    if size[0] not in (3, None) or (image_size is not None and size[1:] not in ([image_size] * 2, [None, None])):
        raise InputFileError(f"{path} input {inp.name!r} has shape (N, {', '.join(map(str, size))}); its "
                             f"metadata says 3 x {image_size} x {image_size} images")
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) != 2:
        raise InputFileError(f"{path} output {model.graph.output[0].name!r} has rank {len(out_dims)}; a classifier "
                             f"outputs (batch, classes)")


def tensor_dims(value_info: Any) -> list[int | str]:
    """A value's dimensions: sizes where fixed, the symbolic name (or "?") where not."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def graph_input(model: Any, path: Path) -> Any:
    """The one real input (initializers listed as inputs by old exporters are not inputs)."""
    import onnx

    inp = image_input(model, path)
    dims = tensor_dims(inp)
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise InputFileError(f"{path}: input {inp.name} has element type {inp.type.tensor_type.elem_type}; "
                             f"expected a float32 NCHW tensor")
    if isinstance(dims[1], int) and dims[1] not in (1, 3):
        raise InputFileError(f"{path}: input {inp.name} has shape {dims}; expected NCHW with 3 (or 1) channels "
                             f"in dimension 1")
    return inp
