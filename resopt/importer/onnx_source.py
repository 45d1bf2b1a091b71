"""ONNX classifiers made elsewhere: one NCHW float input; stamped, batch made dynamic, opset upgraded.

A fixed batch dimension (often 1) becomes a named dynamic one, and Reshape shapes that hard-code that
batch copy it from their input instead (ONNX Reshape's 0). An opset below 13 is upgraded with onnx's
version converter, because per-channel QuantizeLinear (``resopt quantize``) needs opset 13. The result
is checked against the source on real images: the source one image at a time, the result on the whole
batch, so one comparison covers both the batch axis and the opset upgrade.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from resopt.console import log
from resopt.errors import InputFileError, UsageError, VerificationError
from resopt.importer import ImportConfig, ImportResult, check_not_chance, default_preprocess, resolve_classes
from resopt.onnx_utils import graph_input, tensor_dims
from resopt.verify import parity_of

MIN_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear (axis attribute)
UPGRADE_OPSET = 17


def input_hw(model: Any, path: Path) -> tuple[int, int] | None:
    """The fixed (H, W) of the graph's image input, or None where they are dynamic."""
    dims = tensor_dims(graph_input(model, path))
    return (dims[2], dims[3]) if isinstance(dims[2], int) and isinstance(dims[3], int) and dims[2] > 0 else None


def _default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _make_batch_dynamic(model: Any, batch: int) -> int:
    """Name the batch axis of the input and outputs; return how many Reshape shapes were freed of it."""
    import numpy as np
    from onnx import numpy_helper

    for vi in [*model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    shape_inputs = {n.input[1] for n in model.graph.node if n.op_type == "Reshape" and len(n.input) > 1}
    freed = 0
    for init in model.graph.initializer:
        if init.name in shape_inputs:
            arr = numpy_helper.to_array(init)
            if arr.ndim == 1 and arr.size >= 2 and arr[0] == batch:
                arr = arr.copy()
                arr[0] = 0  # Reshape's 0: copy the dimension from the input, i.e. the batch
                init.CopyFrom(numpy_helper.from_array(arr.astype(np.int64), init.name))
                freed += 1
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in shape_inputs:
            for attr in node.attribute:
                if attr.name == "value":
                    arr = numpy_helper.to_array(attr.t)
                    if arr.ndim == 1 and arr.size >= 2 and arr[0] == batch:
                        arr = arr.copy()
                        arr[0] = 0
                        attr.t.CopyFrom(numpy_helper.from_array(arr.astype(np.int64)))
                        freed += 1
    # Shapes inferred for the fixed batch would contradict the dynamic one.
    del model.graph.value_info[:]
    return freed


def _images(cfg: ImportConfig, pre: Any, classes: list[str]) -> tuple[Any, str]:
    """Real images to compare result and source on: ``--data``'s test split, else a shipped calib/ set."""
    import numpy as np

    from resopt.calib import calib_batches, default_calib_dirs, find_default_calib, load_calib_set
    from resopt.errors import DataError

    if cfg.data is not None:
        from resopt.data import load_report_set, stack_images

        ds, split = load_report_set(cfg.data, pre, per_class=max(1, -(-cfg.num_verify // len(classes))))
        x, _ = stack_images(ds, cfg.num_verify)
        return x.numpy(), f"{cfg.data} ({split} split)"
    try:
        folder = find_default_calib(classes)
    except DataError:
        # Any real photos serve to compare two graphs of the same model; the class names do not matter.
        dirs = [d for root in default_calib_dirs() for d in sorted(root.iterdir()) if d.is_dir()]
        if not dirs:
            raise
        folder = dirs[0]
    cs = load_calib_set(folder, num=cfg.num_verify, seed=0)
    return np.concatenate([x for x, _ in calib_batches(cs, pre, batch_size=64)]), str(folder)


def _session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def import_onnx(source: Path, output: Path, cfg: ImportConfig) -> ImportResult:
    import numpy as np
    import onnx

    from resopt.artifacts import lineage_entry, load_onnx, read_onnx_meta, save_onnx, stamp_onnx

    t0 = time.perf_counter()
    model = load_onnx(source)
    if read_onnx_meta(model).get("preprocess"):
        raise InputFileError(f"{source} already carries resopt metadata; there is nothing to import",
                             hint=f"use it directly: resopt info {source}")
    inp = graph_input(model, source)
    if len(model.graph.output) != 1 or len(tensor_dims(model.graph.output[0])) != 2:
        shapes = [tensor_dims(o) for o in model.graph.output]
        raise InputFileError(f"{source} has {len(model.graph.output)} output(s) of shape "
                             f"{shapes}; an image classifier has one [N, classes]")
    dims = tensor_dims(inp)
    out_dims = tensor_dims(model.graph.output[0])
    num_outputs = out_dims[1] if isinstance(out_dims[1], int) and out_dims[1] > 0 else None
    hw = input_hw(model, source)
    if hw is not None and hw[0] != hw[1]:
        raise InputFileError(f"{source} takes {hw[0]}x{hw[1]} images; resopt's preprocessing makes square inputs")
    if hw is not None and cfg.input_size is not None and cfg.input_size != hw[0]:
        raise UsageError(f"--input-size {cfg.input_size} differs from the graph's fixed input {hw[0]}x{hw[1]}")
    size = hw[0] if hw is not None else cfg.input_size
    if size is None:
        raise UsageError(f"{source} has a dynamic image size; pass --input-size N")
    pre = default_preprocess(cfg, input_size=size)
    classes, classes_from = resolve_classes(cfg, num_outputs)
    source_bytes = source.read_bytes()

    opset_from = _default_opset(model)
    opset_to = opset_from
    if opset_from < MIN_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, UPGRADE_OPSET)
        except Exception as e:
            raise InputFileError(f"{source}: upgrading opset {opset_from} to {UPGRADE_OPSET} failed "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
        opset_to = _default_opset(model)
        log(f"upgraded opset {opset_from} -> {opset_to} (per-channel INT8 needs opset {MIN_OPSET})")
    fixed_batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    freed = 0
    if fixed_batch is not None:
        freed = _make_batch_dynamic(model, fixed_batch)
        log(f"batch axis was fixed at {fixed_batch}; made dynamic ({freed} Reshape shape(s) freed of it)")
    try:
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model)
    except Exception as e:
        raise InputFileError(f"{source}: the rewritten graph fails the ONNX checker ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None

    images, images_from = _images(cfg, pre, classes)
    src_sess, src_in = _session(source_bytes), inp.name
    if fixed_batch is not None:
        # The source runs only at its own batch size: whole chunks of it.
        images = images[: max(1, len(images) // fixed_batch) * fixed_batch]
        reference = np.concatenate([src_sess.run(None, {src_in: images[i:i + fixed_batch]})[0]
                                    for i in range(0, len(images), fixed_batch)])
    else:
        reference = src_sess.run(None, {src_in: images})[0]
    try:
        sess = _session(model.SerializeToString())
        batched = sess.run(None, {inp.name: images})[0]
        single = sess.run(None, {inp.name: images[:1]})[0]
    except Exception as e:
        raise VerificationError(f"{source}: the imported graph does not run at batch {len(images)} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); it may hard-code its "
                                f"batch size beyond the input and Reshape shapes") from None
    parity = parity_of(reference, batched, source=images_from)
    allowed = cfg.tolerance * parity.logit_scale
    single_diff = float(np.abs(single - batched[:1]).max())
    log(f"checked on {len(images)} images of {images_from}: max |imported - source| {parity.max_abs_diff:.3g} "
        f"(allowed {allowed:.3g}), top-1 agreement {parity.top1_agreement:.1f}%, batch 1 vs batch {len(images)} "
        f"{single_diff:.3g}")
    parity = parity.check(what=f"{source.name}: the imported graph", against="the source", allowed_abs_diff=allowed)
    if not single_diff <= allowed:
        raise VerificationError(f"{source}: the imported graph gives another answer at batch 1 than at batch "
                                f"{len(images)}: differs by {single_diff:.3g} (allowed {allowed:.3g})")
    metrics: dict[str, Any] = {}
    if cfg.data is not None:
        metrics.update(_evaluate(sess, inp.name, cfg, pre, classes))
        log(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}% on {metrics['eval_images']} images")
        check_not_chance(metrics["top1"], len(classes), source)
    details = {"opset_from": opset_from, "opset_to": opset_to, "fixed_batch": fixed_batch,
               "reshapes_freed": freed, "input_name": inp.name,
               "verification": {**parity.metrics(), "batch1_vs_batchN_max_abs_diff": single_diff}}
    mapping = {"opset": f"{opset_from} -> {opset_to}",
               "batch": f"{fixed_batch} -> dynamic" if fixed_batch is not None else "dynamic (unchanged)",
               "reshapes_freed": freed}
    entry = lineage_entry("import", parent=source, metrics={**metrics, **details["verification"]}, options={
        "source": source.name, "format": "onnx", "data": cfg.data, "classes_from": classes_from,
        **pre.to_dict(), "mapping": mapping})
    entry["metrics"]["seconds"] = round(time.perf_counter() - t0, 2)
    stamp_onnx(model, {"arch": f"onnx:{source.stem}", "classes": classes, "preprocess": pre.to_dict(),
                       "metrics": metrics, "lineage": [entry]})
    save_onnx(model, output)
    return ImportResult(output, source, entry["parent"]["sha256"], "onnx", f"onnx:{source.stem}", len(classes),
                        classes_from, pre, details, metrics, time.perf_counter() - t0)


def _evaluate(sess: Any, input_name: str, cfg: ImportConfig, pre: Any, classes: list[str]) -> dict[str, Any]:
    from resopt.data import check_classes, classes_of, load_report_set, make_loader
    from resopt.metrics import TopK

    assert cfg.data is not None
    ds, split = load_report_set(cfg.data, pre, per_class=cfg.limit_per_class)
    check_classes(classes, classes_of(ds), model_name="the imported model", data=cfg.data)
    acc = TopK()
    for x, y in make_loader(ds, cfg.batch_size, shuffle=False):
        acc.update(sess.run(None, {input_name: x.numpy()})[0], y.numpy())
    return {"top1": acc.top1, "top5": acc.top5, "eval_images": acc.n, "split": split, "data": cfg.data}
