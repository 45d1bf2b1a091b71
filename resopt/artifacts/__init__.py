"""Artifact formats: the ``.pt`` checkpoint dict, lineage records, ONNX metadata, engine sidecars.

Every artifact says what produced it. A lineage is a list of entries, oldest first; each command copies
its parent's lineage and appends its own entry (command, options, parent sha256, library versions,
metrics), so ``resopt info`` can print the whole chain from any file.

Checkpoints are plain dicts of tensors and primitives so that ``torch.load(weights_only=True)`` reads
them: a file that needs the unpickler to build Python objects is refused, never executed.

The package: ``files`` (hashing, atomic writes, output checks, kinds by suffix), ``lineage``, ``checkpoint``,
``onnx_meta``, ``sidecar`` (the engine sidecar record); every name is re-exported here.
"""

from __future__ import annotations

from resopt.artifacts.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    Preprocess,
    checkpoint_preprocess,
    load_checkpoint,
    load_model,
    make_checkpoint,
    save_checkpoint,
    torch_load_plain,
)
from resopt.artifacts.files import (
    FOREIGN_PT_SUFFIXES,
    IMPORT_HINT,
    KIND_BY_SUFFIX,
    artifact_kind,
    atomic_output,
    check_output_path,
    outputs_placed,
    require_kind,
    require_regular,
    reset_outputs_placed,
    sha256_file,
    write_text_atomic,
)
from resopt.artifacts.lineage import jsonable, library_versions, lineage_entry
from resopt.artifacts.onnx_meta import (
    META_PREFIX,
    load_onnx,
    onnx_meta_from_checkpoint,
    onnx_preprocess,
    read_onnx_meta,
    save_onnx,
    stamp_onnx,
)
from resopt.artifacts.sidecar import (
    ENGINE_SIDECAR_FORMAT,
    ENGINE_SIDECAR_VERSION,
    MAX_SIDECAR_BYTES,
    EngineSidecar,
    read_sidecar,
    sidecar_path,
    validate_sidecar,
    write_sidecar,
)

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "ENGINE_SIDECAR_FORMAT", "ENGINE_SIDECAR_VERSION",
    "FOREIGN_PT_SUFFIXES", "IMPORT_HINT", "KIND_BY_SUFFIX", "MAX_SIDECAR_BYTES", "META_PREFIX", "EngineSidecar",
    "Preprocess", "artifact_kind", "atomic_output", "check_output_path", "checkpoint_preprocess", "jsonable",
    "library_versions", "lineage_entry", "load_checkpoint", "load_model", "load_onnx", "make_checkpoint",
    "onnx_meta_from_checkpoint", "onnx_preprocess", "outputs_placed", "read_onnx_meta", "read_sidecar",
    "require_kind", "require_regular", "reset_outputs_placed", "save_checkpoint", "save_onnx", "sha256_file",
    "sidecar_path", "stamp_onnx", "torch_load_plain", "validate_sidecar", "write_sidecar", "write_text_atomic",
]
