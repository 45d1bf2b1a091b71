"""``resopt bench``: JSON structure and internal consistency of the numbers, accuracy against the training
run's own evaluation, .pt/.onnx agreement, and the one-line errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from conftest import make_subset, resnet20_counts
from conftest import run_captured as _run


@pytest.fixture(scope="module")
def r20_onnx(r20_onnx_session: Path) -> Path:
    """The session's exported model (read-only)."""
    return r20_onnx_session


@pytest.fixture(scope="module")
def bench_json(trained_pt: Path, r20_onnx: Path, cifar_small: Path) -> dict:
    """One real two-file run with tiny iteration counts, shared by the structure/consistency tests."""
    import time

    t0 = time.perf_counter()
    code, out, err = _run("bench", trained_pt, r20_onnx, "--batch-size", "1,4", "--threads", 1, "--warmup", 1,
                          "--iters", 4, "--min-time", 0, "--rounds", 2, "--data", cifar_small, "--json")
    wall = time.perf_counter() - t0
    assert code == 0, err
    return {"doc": json.loads(out), "stderr": err, "wall_s": wall}  # json.loads: exactly one document


def test_json_structure(bench_json: dict, trained_pt: Path, r20_onnx: Path) -> None:
    d = bench_json["doc"]
    assert d["baseline"] == str(trained_pt)
    assert d["config"]["batch_sizes"] == [1, 4] and d["config"]["threads"] == 1 and d["config"]["rounds"] == 2
    assert [m["name"] for m in d["models"]] == ["r20.pt", "r20.onnx"]
    assert [m["kind"] for m in d["models"]] == ["pt", "onnx"]
    assert d["models"][0]["provider"].startswith("torch eager")
    assert d["models"][1]["provider"] == "CPUExecutionProvider"
    for m, path in zip(d["models"], (trained_pt, r20_onnx), strict=True):
        assert m["file_bytes"] == os.path.getsize(path)
        assert m["input_size"] == 32 and m["device"] == "cpu"
        assert [b["batch_size"] for b in m["batches"]] == [1, 4]
    assert "one worker process per file" in bench_json["stderr"]


def test_latency_numbers_are_consistent(bench_json: dict) -> None:
    models = bench_json["doc"]["models"]
    for m in models:
        for b in m["batches"]:
            assert 0 < b["min_ms"] <= b["p50_ms"] <= b["p90_ms"] <= b["p99_ms"]
            assert b["samples"] >= 4  # --iters is a minimum over all rounds
            assert len(b["round_p50_ms"]) == 2
            assert b["throughput_ips"] == pytest.approx(b["batch_size"] / (b["p50_ms"] / 1000), rel=1e-9)
            # Units, from outside the code: 10.3M MACs per image take far more than 20 us on 2 CPU cores
            # (a latency in seconds labelled ms would be ~1000x smaller), and the worker holds at least the
            # model's FP32 weights (68,394 x 4 bytes) but not gigabytes (kB or MB labelled bytes would fail).
            assert b["min_ms"] > 0.02
            assert 68_394 * 4 <= b["peak_memory_bytes"] < 2e9
        assert m["peak_memory_bytes"] == max(b["peak_memory_bytes"] for b in m["batches"])
    # Every timed batch happened inside this test's wall-clock window (ms labelled as us would not fit).
    timed = sum(b["samples"] * b["min_ms"] for m in models for b in m["batches"]) / 1000
    assert timed < bench_json["wall_s"]
    first, second = models
    for b0, b1 in zip(first["batches"], second["batches"], strict=True):
        assert b0["speedup"] == 1.0
        assert b1["speedup"] == pytest.approx(b1["throughput_ips"] / b0["throughput_ips"], rel=1e-9)
        assert b0["speedup_rounds"] == [1.0, 1.0]
        assert b1["speedup_rounds"] == pytest.approx([p0 / p1 for p0, p1 in zip(b0["round_p50_ms"],
                                                                                b1["round_p50_ms"], strict=True)])


def test_accuracy_matches_training_and_onnx(bench_json: dict, trained_pt: Path) -> None:
    from resopt.artifacts import load_checkpoint

    pt, onnx = (m["accuracy"] for m in bench_json["doc"]["models"])
    assert pt["images"] == onnx["images"] == 200  # cifar_small's test split: 20 per class
    assert pt["split"] == onnx["split"] == "test"
    # Same images, same recorded preprocessing as `train`'s one test measurement of the epoch it kept.
    metrics = load_checkpoint(trained_pt)["metrics"]
    assert metrics["split"] == "test" and metrics["test_images"] == 200
    assert pt["top1"] == pytest.approx(metrics["test_top1"], abs=1e-6)
    assert abs(pt["top1"] - onnx["top1"]) <= 100 / 200 + 1e-9  # within one image
    assert abs(pt["top5"] - onnx["top5"]) <= 100 / 200 + 1e-9
    assert pt["top5"] >= pt["top1"] > 10.0  # better than chance on 10 classes


def test_model_statistics(bench_json: dict) -> None:
    pt, ox = bench_json["doc"]["models"]
    hand = resnet20_counts(8)  # the session model: ResNet-20 at --width 0.5, counted by hand
    assert (pt["params"], pt["nonzero_params"], pt["macs"]) == (hand["params"], hand["params"], hand["macs"])
    assert ox["macs"] == hand["macs"]
    # Export folds every BatchNorm into the bias-free conv before it: its scale and shift (2 x channels)
    # become the conv's bias (1 x channels); everything else is the same weights.
    assert ox["params"] == hand["folded_params"] == 68_394


def test_table_output(cli, r20_onnx: Path) -> None:
    r = cli("bench", r20_onnx, "--batch-size", "2", "--warmup", "0", "--iters", "2", "--min-time", "0",
            "--rounds", "1", "--threads", "1")
    assert r.code == 0, r.stderr
    assert "r20.onnx" in r.stdout and "CPUExecutionProvider" in r.stdout and "1.00x" in r.stdout
    assert "p50 / p90 / p99 ms" in r.stdout
    assert "bench:" not in r.stdout  # progress and logs stay on stderr


def test_runner_keeps_one_copy_of_the_weights(trained_pt: Path) -> None:
    from resopt.backends import open_runner

    runner = open_runner(trained_pt, threads=1)
    assert "state_dict" not in runner.checkpoint
    assert runner.preprocess is not None and runner.preprocess.input_size == 32


# ----------------------------------------------------------------------------------------------- units


def test_parse_batch_sizes() -> None:
    from resopt.bench import parse_batch_sizes
    from resopt.errors import UsageError

    assert parse_batch_sizes("1, 8,32") == (1, 8, 32)
    assert parse_batch_sizes("8,8,1") == (8, 1)
    assert parse_batch_sizes(4) == (4,)
    for bad in ("1,x", "0", "", "1,,2", "-3"):
        with pytest.raises(UsageError):
            parse_batch_sizes(bad)


def test_latency_stats_and_speedups() -> None:
    from resopt.bench import ModelBench, latency_stats, with_speedups

    s = latency_stats(4, [[0.001, 0.002, 0.003], [0.004]], peak_memory=10)
    assert s.samples == 4 and s.p50_ms == pytest.approx(2.5) and s.min_ms == pytest.approx(1.0)
    assert s.round_p50_ms == pytest.approx((2.0, 4.0)) and s.spread_pct == pytest.approx(80.0)
    assert s.throughput_ips == pytest.approx(4 / 0.0025) and s.peak_memory_bytes == 10
    fast = latency_stats(4, [[0.001]])

    def mb(stats):
        return ModelBench(Path("m.onnx"), "onnx", "", "cpu", 1, None, None, None, 32, (stats,))

    out = with_speedups([mb(s), mb(fast)])
    assert out[0].batches[0].speedup == 1.0 and out[1].batches[0].speedup == pytest.approx(2.5)
    assert out[1].batches[0].speedup_rounds == pytest.approx((2.0,))  # round 1 only: 2 ms vs 1 ms
    assert math.isclose(out[1].at(4).throughput_ips, 4000.0)


# ---------------------------------------------------------------------------------------------- errors


def _err(r) -> str:
    assert "Traceback" not in r.stderr
    return r.stderr.splitlines()[0] if r.stderr else ""


@pytest.mark.parametrize("args, code, line", [
    (["--batch-size", "1,x"], 2, "Error: --batch-size '1,x': 'x' is not a whole number; give one or a comma-separated "
                                      "list of positive integers like 1,8,32"),
    (["--batch-size", "0"], 2, "Error: --batch-size '0': batch sizes must be at least 1, got 0"),
    (["--threads", "0"], 2, "Error: --threads must be at least 1, got 0"),
    (["--device", "tpu"], 2, "Error: unknown device 'tpu'; choose one of: cpu, gpu"),
    (["--limit-per-class", "5"], 2, "Error: --limit-per-class needs --data"),
    (["--rounds", "0"], 2, "Error: --rounds must be at least 1, got 0"),
])
def test_option_errors(cli, r20_onnx: Path, args: list[str], code: int, line: str) -> None:
    r = cli("bench", r20_onnx, *args)
    assert (r.code, _err(r)) == (code, line)


def test_file_errors(cli, workdir: Path, r20_onnx: Path) -> None:
    r = cli("bench", r20_onnx, "nope.onnx")
    assert (r.code, _err(r)) == (3, "Error: nope.onnx does not exist")
    Path("notes.txt").write_text("hi")
    r = cli("bench", "notes.txt")
    assert r.code == 3 and "notes.txt is not a model file resopt knows (suffix '.txt')" in _err(r)
    Path("junk.onnx").write_bytes(os.urandom(256))
    r = cli("bench", "junk.onnx")
    assert r.code == 3 and _err(r).startswith("Error: junk.onnx is not a readable ONNX model")
    Path("r.engine").write_bytes(b"plan")
    r = cli("bench", "r.engine")
    assert (r.code, _err(r)) == (2, "Error: r.engine is a TensorRT engine, which runs only on the GPU; "
                                    "add --device gpu")


def test_gpu_without_cuda(cli, r20_onnx: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    r = cli("bench", r20_onnx, "--device", "gpu")
    assert (r.code, _err(r)) == (8, "Error: --device gpu was asked for but no CUDA GPU is visible to PyTorch")


def test_missing_backend(cli, r20_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resopt import backends

    monkeypatch.setitem(backends.BACKENDS, "onnx", ("resopt.backends.no_such_backend", "Runner"))
    r = cli("bench", r20_onnx)
    assert r.code == 5
    assert _err(r) == (f"Error: cannot bench {r20_onnx}: the .onnx backend (resopt.backends.no_such_backend) "
                       f"is not installed")
    assert r.stderr.splitlines()[1].startswith("Hint: pip install onnxruntime")


def test_class_mismatch(cli, r20_onnx: Path, tmp_path: Path) -> None:
    three = make_subset(tmp_path / "three", 1, 2, classes=["airplane", "automobile", "bird"])
    r = cli("bench", r20_onnx, "--data", three)
    assert r.code == 4
    assert _err(r) == f"Error: {r20_onnx} predicts 10 classes but data {three} has 3"


def test_worker_error_is_one_line(cli, r20_onnx: Path, tmp_path: Path) -> None:
    """A failure inside a worker process comes back as the same one-line error, not a traceback."""
    import onnx

    from resopt.artifacts import save_onnx

    proto = onnx.load(str(r20_onnx))
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "NoSuchOp", "com.example"
    proto.opset_import.add(domain="com.example", version=1)
    bad = tmp_path / "bad.onnx"
    save_onnx(proto, bad)
    r = cli("bench", bad, "--batch-size", "1", "--iters", "1", "--min-time", "0", "--warmup", "0")
    assert r.code == 3 and "Traceback" not in r.stderr
    assert r.stderr.startswith("Warning: MACs of bad.onnx unknown: cannot infer the shapes")
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: onnxruntime cannot load {bad}")
