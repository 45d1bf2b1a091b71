"""scripts/gpu_proof.sh in its CPU smoke mode (GPU_PROOF_SMOKE=1): every step of the GPU proof runs end to
end on a few images, so the script that will run on the GPU machine is known to work before it gets there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_proof.sh"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update({"OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
                "PYTHONPATH": str(REPO), **extra})
    return env


def _whole_images(top1: float, images: int) -> bool:
    """Whether ``top1`` (percent, maybe rounded to 2 decimals) is k of ``images`` correct for a whole k."""
    k = top1 * images / 100.0
    return abs(k - round(k)) < images * 0.005 / 100.0 + 1e-9


def test_gpu_proof_smoke_end_to_end(cifar_small: Path, tmp_path: Path) -> None:
    from resopt.artifacts import load_checkpoint

    env = _env(tmp_path, GPU_PROOF_SMOKE="1", GPU_PROOF_SKIP_INSTALL="1", GPU_PROOF_DATA=str(cifar_small),
               GPU_PROOF_ARCHS="resnet56")
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_proof.json", "gpu_proof.log", "resnet56.pt", "steps.tar"]
    d = json.loads((out / "gpu_proof.json").read_text())
    assert d["smoke"] is True and d["goals"] == {} and d["seconds"] > 0
    m = d["models"]["resnet56"]
    tr = m["train"]
    assert tr["epochs"] == 1 and tr["device"] == "cpu" and tr["data_path"] == "fast"
    assert tr["train_images"] == 50 and tr["eval_images"] == 50  # --limit-per-class 5 on both splits
    assert len(tr["epoch_images_per_sec"]) == 1 and tr["epoch_images_per_sec"][0] > 0
    # top-1 over 50 images is a whole number of them: k/50, a multiple of 2 points (a mean over some other
    # count, or a fraction instead of a percentage, is not).
    assert _whole_images(tr["top1"], 50) and 0.0 <= tr["top1"] <= 100.0, tr["top1"]
    assert [(row["variant"], row["batch"]) for row in m["gpu_bench"]] == [("fp32", 1), ("fp32", 8)]
    assert all(row["img_per_s"] > 0 for row in m["gpu_bench"])
    assert m["export"]["verification"]["top1_agreement"] == 100.0
    assert m["quantize"]["parent"]["top1"] == tr["top1"]  # the same 50 test images, FP32 ONNX = the .pt
    assert _whole_images(m["quantize"]["result"]["top1"], 50), m["quantize"]["result"]
    assert {(row["file"], row["batch"]) for row in m["cpu_bench"]} == {
        ("resnet56.onnx", 1), ("resnet56.onnx", 8), ("resnet56.int8.onnx", 1), ("resnet56.int8.onnx", 8)}
    import torch

    assert d["env"]["torch"] == torch.__version__  # the torch this very run used, not just any string
    ckpt = load_checkpoint(out / "resnet56.pt")
    opts = ckpt["lineage"][-1]["options"]
    assert ckpt["arch"] == "resnet56" and opts["time_budget"] == 600 and opts["data_path"] == "fast"
    with tarfile.open(out / "steps.tar") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"env.json", "train-resnet56.json", "bench-gpu-resnet56.json", "export-resnet56.json",
            "quantize-resnet56.json", "bench-cpu-resnet56.json"} <= names
    log = (out / "gpu_proof.log").read_text()
    assert "train resnet56" in log and "=== quantize-resnet56" in log and "| resnet56 | 1 |" in log


def test_gpu_proof_needs_the_carried_wheels(tmp_path: Path) -> None:
    """Without wheels in the carry folder (and without GPU_PROOF_SKIP_INSTALL) it stops at once, one line."""
    (tmp_path / "carry").mkdir()
    r = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, GPU_PROOF_CARRY=str(tmp_path / "carry")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"Error: no wheels in {tmp_path / 'carry'}/wheels" in r.stderr
    assert not (tmp_path / "out" / "gpu_proof.json").exists()


def test_summary_fraction_of_bf16_peak() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from gpu_proof_summary import BF16_PEAK_FLOPS, _bench_rows
    finally:
        sys.path.pop(0)
    report = {"models": [{"name": "r18.pt", "kind": "pt", "variant": "fp16-channels-last", "device": "cuda",
                          "macs": 556_000_000, "accuracy": None,
                          "batches": [{"batch_size": 4096, "p50_ms": 40.96, "p99_ms": 41.0,
                                       "throughput_ips": 100_000.0, "peak_device_memory_bytes": 2**30}]}]}
    (row,) = _bench_rows(report, peak=True)
    assert row["variant"] == "fp16-channels-last" and row["gpu_memory_bytes"] == 2**30
    assert row["bf16_peak_fraction"] == round(100_000 * 2 * 556e6 / BF16_PEAK_FLOPS, 4) == 0.1408
