"""Export: a ``.pt`` checkpoint -> a verified, cleaned, stamped ``.onnx``.

``export_onnx`` rebuilds the model from the checkpoint (pruned widths included), exports it with a dynamic
batch axis (input ``input``, output ``logits``), drops stale value_info, folds constants and removes dead
nodes with onnx-graphsurgeon, runs ``onnx.checker`` and shape inference, and then compares onnxruntime
with PyTorch on real images before anything is written. Both exporters fold BatchNorm into the preceding
Conv in eval mode; the result records how many BatchNormalization nodes are left (0 for every registry
architecture).

Tolerance
---------
``tolerance`` bounds ``max |logits_ort - logits_torch|`` *relative to the logit scale*
``max(1, max |logits_torch|)``. Two FP32 runtimes that compute the same function differ by rounding
only: folding BatchNorm and a different convolution algorithm reorder the sums. Measured on every
registry architecture (width 0.25, trained-like BatchNorm statistics, real CIFAR images), that moved the
logits by 1e-7 to 1.5e-6 of their magnitude, and 1.4e-5 for the deepest (ResNet-56 with SE gates), so
the default 1e-3 leaves a margin of about two orders of magnitude for bigger models and other CPUs.
A real export bug (a wrong
BatchNorm fold, a lost bias, a mis-ordered channel) changes logits by a sizeable fraction of their
magnitude and lands far above it. Scaling by the logits keeps one number meaningful for a model whose
logits are of size 3 and one whose logits are of size 300. Top-1 agreement is reported but not gated
separately: an argmax can only flip where two logits are within twice the max difference of each other,
so a passing max difference already limits disagreements to near-ties.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.artifacts import (
    check_output_path,
    lineage_entry,
    onnx_meta_from_checkpoint,
    require_kind,
    save_onnx,
    stamp_onnx,
)
from resopt.console import log
from resopt.errors import DataError, InputFileError, UsageError, choice_error
from resopt.ranges import check_fields
from resopt.verify import Parity

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

EXPORTERS = ("dynamo", "torchscript")
MIN_OPSET = 17
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportConfig:
    opset: int = DEFAULT_OPSET
    exporter: str = "dynamo"
    data: str | None = None  # verification images; None: the repository's calib/ set for the model's classes
    split: str = "test"
    num_verify: int = 100
    tolerance: float = 1e-3  # max |ORT - PyTorch| relative to max(1, max |PyTorch logit|)
    verify_batch: int = 16  # > 1, so the dynamic batch axis is exercised; the last batch is usually smaller

    def validate(self) -> None:
        import onnx

        if self.exporter not in EXPORTERS:
            raise choice_error("exporter", self.exporter, EXPORTERS)
        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= self.opset <= newest:
            raise UsageError(f"--opset {self.opset} is outside the supported range {MIN_OPSET}..{newest}")
        if self.exporter == "dynamo" and self.opset < 18:
            # torch's dynamo exporter writes opset 18+ and silently keeps 18 when down-conversion fails.
            raise UsageError(f"--opset {self.opset} needs --exporter torchscript; the dynamo exporter writes "
                             f"opset 18 or later")
        check_fields(self)  # --num-verify, --tolerance against resopt.ranges
        if self.verify_batch < 2:
            raise UsageError(f"verify_batch must be at least 2, got {self.verify_batch}")
        if self.split not in ("test", "train"):
            raise choice_error("split", self.split, ("test", "train"))


@dataclass(frozen=True)
class ExportResult:
    output: Path
    checkpoint: Path
    arch: str
    opset: int
    exporter: str
    params: int
    macs: int
    file_size: int
    batchnorm_nodes: int
    ops: dict[str, int]
    verification: Parity  # onnxruntime (candidate) vs PyTorch (reference), checked against --tolerance
    verify_batch_sizes: tuple[int, ...]
    seconds: float

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"], d["checkpoint"] = str(self.output), str(self.checkpoint)
        d["verification"] = {**self.verification.metrics(), "batch_sizes": list(d.pop("verify_batch_sizes"))}
        return d


# ------------------------------------------------------------------------------------- data lookup


def load_verify_images(ckpt: dict[str, Any], cfg: ExportConfig) -> tuple[torch.Tensor, str]:
    """``num_verify`` class-balanced real images with the checkpoint's eval preprocessing."""
    from torch.utils.data import Subset

    from resopt.artifacts import checkpoint_preprocess
    from resopt.calib import default_data
    from resopt.data import balanced_indices, check_classes, classes_of, load_eval_set, stack_images, targets_of

    spec = cfg.data if cfg.data is not None else default_data(list(ckpt["classes"]), ckpt.get("lineage", []))
    dataset = load_eval_set(spec, checkpoint_preprocess(ckpt), split=cfg.split)
    check_classes(ckpt["classes"], classes_of(dataset), model_name="the checkpoint", data=spec)
    per_class = math.ceil(cfg.num_verify / max(1, len(ckpt["classes"])))
    idx = balanced_indices(targets_of(dataset), per_class)[: cfg.num_verify]
    if len(idx) < 2:
        raise DataError(f"data {spec} has {len(idx)} {cfg.split} image(s); verification needs at least 2")
    images, _ = stack_images(Subset(dataset, idx))
    return images, spec


# ------------------------------------------------------------------------------------------ export


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout, from Python or from C++, to stderr for the duration.

    stdout carries only results (``resopt export ... --json | jq``); exporters print progress there.
    """
    sys.stdout.flush()
    fd = saved = None
    try:
        fd, err_fd = sys.__stdout__.fileno(), sys.__stderr__.fileno()  # type: ignore[union-attr]
        saved = os.dup(fd)
        os.dup2(err_fd, fd)
    except (OSError, ValueError, AttributeError):  # no real stdout/stderr (embedded interpreter)
        if saved is not None:
            os.close(saved)
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None and fd is not None:
            sys.__stdout__.flush()  # type: ignore[union-attr]
            os.dup2(saved, fd)
            os.close(saved)


def _torch_export(model: nn.Module, example: torch.Tensor, cfg: ExportConfig) -> onnx.ModelProto:
    import io

    import onnx
    import torch

    with stdout_to_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the user asked for the legacy exporter
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if cfg.exporter == "dynamo":
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, opset_version=cfg.opset, input_names=["input"],
                output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                optimize=True)
            if program is None:  # only when an output file is given, which this call does not
                raise InputFileError("the dynamo exporter returned no program", hint="try --exporter torchscript")
            return program.model_proto
        buf = io.BytesIO()
        # torch.onnx.export writes to a file object as well as to a path (its stub says path only).
        torch.onnx.export(model, (example,), buf, dynamo=False,  # type: ignore[arg-type]
                          opset_version=cfg.opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True, verbose=False)
        return onnx.load_from_string(buf.getvalue())


def clean_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, drop dead nodes and sort; then check the graph and re-infer its shapes."""
    import onnx
    import onnx_graphsurgeon as gs

    # Exporters store value_info for initializers; it goes stale when a later rewrite (onnxruntime's
    # quantizer transposes Gemm weights) changes an initializer's shape, and shape inference then fails.
    del model.graph.value_info[:]
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup().toposort()
    cleaned = gs.export_onnx(graph, do_type_check=True)
    cleaned.producer_name, cleaned.producer_version = model.producer_name, model.producer_version
    try:
        onnx.checker.check_model(cleaned, full_check=True)
        return onnx.shape_inference.infer_shapes(cleaned, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise InputFileError(f"the exported graph does not pass onnx.checker: {str(e).splitlines()[0][:200]}",
                             hint="try --exporter torchscript") from None


def verify_onnx(model: nn.Module, onnx_bytes: bytes, images: torch.Tensor, *, batch_size: int, data: str) -> Parity:
    """Run the same batches through PyTorch (the reference) and onnxruntime and compare the logits."""
    import torch

    from resopt.backends.ort_backend import make_session
    from resopt.verify import compare

    session = make_session(onnx_bytes)
    name = session.get_inputs()[0].name

    def pytorch(x: Any) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    batches = ((images[s:s + batch_size].numpy(), None) for s in range(0, len(images), batch_size))
    return compare(pytorch, lambda x: session.run(None, {name: x})[0], batches, source=data)


def export_onnx(checkpoint: Path, output: Path, cfg: ExportConfig | None = None) -> ExportResult:
    """Export ``checkpoint`` to ONNX at ``output``, verified against PyTorch on real images."""
    import torch

    from resopt.artifacts import load_model
    from resopt.kinds import onnx_model_stats

    cfg = cfg or ExportConfig()
    cfg.validate()
    checkpoint, output = Path(checkpoint), Path(output)
    require_kind(checkpoint, "pt", hint=f"{checkpoint.name} is already exported; see `resopt info {checkpoint}`")
    check_output_path(output, checkpoint, cfg.data, suffixes=(".onnx",))
    t0 = time.perf_counter()
    model, ckpt = load_model(checkpoint)
    images, data = load_verify_images(ckpt, cfg)

    log(f"exporting {ckpt['arch']} with the {cfg.exporter} exporter (opset {cfg.opset})")
    size = int(ckpt["preprocess"]["input_size"])
    try:
        proto = _torch_export(model, torch.zeros(2, 3, size, size), cfg)
    except Exception as e:  # torch.export / TorchScript failures: a model these exporters cannot handle
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        other = "torchscript" if cfg.exporter == "dynamo" else "dynamo"
        raise InputFileError(f"the {cfg.exporter} exporter failed on {checkpoint.name}: {first}",
                             hint=f"try --exporter {other}; RESOPT_DEBUG=1 shows the traceback") from e
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset != cfg.opset:
        raise UsageError(f"the {cfg.exporter} exporter wrote opset {opset}, not the requested {cfg.opset}",
                         hint=f"use --opset {opset}")
    proto = clean_onnx(proto)

    parity = verify_onnx(model, proto.SerializeToString(), images, batch_size=cfg.verify_batch, data=data)
    allowed = cfg.tolerance * parity.logit_scale
    log(f"verified on {parity.images} images of {data}: max |ORT - PyTorch| = {parity.max_abs_diff:.3g} "
        f"(allowed {allowed:.3g}), top-1 agreement {parity.top1_agreement:.1f}%")
    verification = parity.check(
        what="onnxruntime", against="PyTorch", allowed_abs_diff=allowed,
        hint=f"try --exporter {'torchscript' if cfg.exporter == 'dynamo' else 'dynamo'}, or raise "
             f"--tolerance (now {cfg.tolerance:g} x the logit scale) if the difference is expected")
    sizes = tuple(sorted({min(cfg.verify_batch, len(images) - s) for s in range(0, len(images), cfg.verify_batch)},
                         reverse=True))

    counts = onnx_model_stats(proto, require_macs=True)
    params, macs = counts.params, counts.macs
    assert params is not None and macs is not None  # require_macs: an unknown count raised
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    bn_nodes = ops.get("BatchNormalization", 0)
    if bn_nodes:
        log(f"[yellow]note:[/yellow] {bn_nodes} BatchNormalization node(s) were not folded into a Conv")
    checked = verification.metrics()
    metrics = {**{k: checked[k] for k in ("max_abs_diff", "mean_abs_diff", "logit_scale", "allowed_abs_diff",
                                          "top1_agreement")},
               "verify_images": verification.images, "opset": opset, "exporter": cfg.exporter,
               "params": params, "macs": macs, "batchnorm_nodes": bn_nodes}
    options = {"opset": cfg.opset, "exporter": cfg.exporter, "data": data, "split": cfg.split,
               "num_verify": cfg.num_verify, "tolerance": cfg.tolerance}
    lineage = list(ckpt.get("lineage", [])) + [
        lineage_entry("export", options=options, parent=checkpoint, metrics=metrics)]
    stamp_onnx(proto, onnx_meta_from_checkpoint(ckpt, lineage))
    save_onnx(proto, output)
    return ExportResult(output=output, checkpoint=checkpoint, arch=ckpt["arch"], opset=opset,
                        exporter=cfg.exporter, params=params, macs=macs, file_size=output.stat().st_size,
                        batchnorm_nodes=bn_nodes, ops=dict(sorted(ops.items(), key=lambda kv: -kv[1])),
                        verification=verification, verify_batch_sizes=sizes, seconds=time.perf_counter() - t0)
