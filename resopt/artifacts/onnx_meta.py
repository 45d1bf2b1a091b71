"""ONNX metadata: namespaced ``resopt.*`` ``metadata_props``, re-stamped after every rewrite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resopt.artifacts.checkpoint import Preprocess
from resopt.artifacts.files import atomic_output, require_kind
from resopt.artifacts.lineage import jsonable
from resopt.errors import InputFileError

META_PREFIX = "resopt."


def stamp_onnx(model: Any, meta: dict[str, Any]) -> None:
    """Write ``resopt.*`` metadata_props (JSON values), replacing earlier resopt keys."""
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    for key, value in meta.items():
        model.metadata_props.add(key=META_PREFIX + key, value=json.dumps(jsonable(value)))


def read_onnx_meta(model_or_path: Any, *, path: Path | None = None) -> dict[str, Any]:
    """The ``resopt.*`` metadata of an ONNX model (proto or path), JSON-decoded, prefix stripped, checked
    against ``resopt.schema.OnnxMetaSchema`` (``path`` names a proto's file in the error)."""
    from resopt.schema import OnnxMetaSchema, validate

    is_path = isinstance(model_or_path, (str, Path))
    model = load_onnx(model_or_path, load_weights=False) if is_path else model_or_path
    meta = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                meta[p.key[len(META_PREFIX):]] = json.loads(p.value)
            except json.JSONDecodeError:
                meta[p.key[len(META_PREFIX):]] = p.value
    where = Path(model_or_path) if is_path else (path or Path("(ONNX model)"))
    validate(OnnxMetaSchema, meta, path=where, what="ONNX metadata of")
    return meta


def load_onnx(path: Path, *, load_weights: bool = True) -> Any:
    import onnx

    path = Path(path)
    require_kind(path, "onnx")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as e:
        raise InputFileError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None


def save_onnx(model: Any, path: Path) -> None:
    import onnx

    with atomic_output(path) as tmp:
        onnx.save(model, str(tmp))


def onnx_meta_from_checkpoint(ckpt: dict[str, Any], lineage: list[dict[str, Any]]) -> dict[str, Any]:
    """The metadata an ONNX model carries from its checkpoint: enough to preprocess and to trace back."""
    return {
        "arch": ckpt["arch"],
        "classes": ckpt["classes"],
        "preprocess": ckpt["preprocess"],
        "metrics": ckpt.get("metrics", {}),
        "lineage": lineage,
    }


def onnx_preprocess(meta: dict[str, Any], path: Path) -> Preprocess:
    if "preprocess" not in meta:
        raise InputFileError(f"{path} has no resopt preprocessing metadata (was it exported by resopt?)",
                             hint=f"stamp it with `resopt import {path} --mean R,G,B --std R,G,B --classes ... "
                                  f"-o model.onnx`, or export it with `resopt export MODEL.pt`")
    return Preprocess.from_dict(meta["preprocess"])
