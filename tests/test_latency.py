"""Latency on this machine (resopt.latency): the --round-to auto rule and the committed width sweep it comes
from, the latency-table cache and its machine key, and prune's latency targets measured with bench's workers
(tiny models, batch 2, one short round: the numbers are noisy, what is checked is that they are measured,
recorded and chosen against)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resopt.latency import choose_round_to, load_cached, machine_key, save_cached
from resopt.latency.cache import MachineKey, cache_path
from resopt.latency.widths import CPU_RULE, MEASURED_ON, MEASURED_RULE, derive_multiple

REPO = Path(__file__).resolve().parents[1]
FEW = ["--limit-per-class", "5", "--batch-size", "25"]
# One round of two batches per file: enough to rank a handful of tiny files, in a few seconds.
FAST = {"RESOPT_LATENCY_TIMING": "1,2,0.02"}


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One latency cache for this module's prune runs (never ~/.cache): a later test reads what an earlier
    one measured, as a second prune on the same machine does."""
    return tmp_path_factory.mktemp("latency_cache")


@pytest.fixture
def latency_env(module_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RESOPT_CACHE_DIR", str(module_cache))
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    return module_cache / "latency"


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RESOPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "latency"


def test_committed_width_sweep_gives_the_measured_rule() -> None:
    rows = json.loads((REPO / "docs" / "widths" / "widths.json").read_text())["rows"]
    host = json.loads((REPO / "docs" / "widths" / "widths.json").read_text())["host"]
    assert MEASURED_ON in host["isa"] and not any(i.startswith("AMX") for i in host["isa"])
    for (runtime, precision), multiple in MEASURED_RULE.items():
        assert derive_multiple(rows, runtime, precision) == multiple, (runtime, precision)
    # ORT FP32, the cleanest columns: multiples of 16 are clearly cheaper per MAC than the other multiples of 8.
    for size in (32, 8):
        col = {r["width"]: r["relative_cost_per_mac"] for r in rows
               if (r["runtime"], r["precision"], r["map"]) == ("ort", "f32", size) and r["width"] >= 16}
        by16 = sorted(c for w, c in col.items() if w % 16 == 0)
        by8 = sorted(c for w, c in col.items() if w % 16 == 8)
        assert by16[len(by16) // 2] * 1.2 < by8[len(by8) // 2]


def test_round_to_auto_rule_by_isa_and_runtime() -> None:
    avx512 = {"AVX2": True, "AVX-512": True, "AMX-INT8": False, "AMX-BF16": False}
    amx = {**avx512, "AMX-INT8": True, "AMX-BF16": True}
    avx2 = {"AVX2": True, "AVX-512": False}
    assert choose_round_to("ort", "f32", isa=avx512, machine="x86_64").multiple == MEASURED_RULE[("ort", "f32")]
    assert choose_round_to("openvino", "int8", isa=amx, machine="x86_64").multiple == 64
    assert choose_round_to("openvino", "bf16", isa=amx, machine="x86_64").multiple == 32
    assert choose_round_to("ort", "int8", isa=avx2, machine="x86_64").multiple == CPU_RULE["AVX2"]["int8"] == 8
    assert choose_round_to("ort", "int8", isa={}, machine="aarch64").multiple == 16
    trt = choose_round_to("tensorrt", "fp16", gpu="NVIDIA H200", gpu_cc=(9, 0))
    assert trt.multiple == 8 and trt.basis == "GPU tensor cores"
    assert choose_round_to("tensorrt", "f32", gpu="Tesla T4", gpu_cc=(7, 5)).multiple == 8


def test_cache_from_another_machine_is_never_used(empty_cache: Path) -> None:
    key = machine_key("ort", "f32", batch=2, threads=1)
    other = MachineKey(**{**key.__dict__, "cpu": "Some Other CPU"})
    assert cache_path(other) != cache_path(key)  # another CPU's table has another file name
    save_cached(key, {"model:x": {"ms": 1.0}})
    assert load_cached(key) == ({"model:x": {"ms": 1.0}}, None)
    # The same file name holding another machine's key (copied over from elsewhere): not used.
    path = cache_path(key)
    data = json.loads(path.read_text())
    data["key"]["cpu"] = "Some Other CPU"
    path.write_text(json.dumps(data))
    rows, why = load_cached(key)
    assert rows == {} and why is not None and "measured elsewhere" in why and "Some Other CPU" in why


def test_block_target_latency_predicted_and_measured(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path,
                                                     latency_env: Path) -> None:
    # A planted table under this machine's file name, but stored with another CPU's key: it must be measured
    # again, not read (its 0.001 ms would make every block look free).
    from resopt.envinfo import available_cores

    key = machine_key("ort", "f32", batch=2, threads=available_cores())
    save_cached(key, {})
    planted = json.loads(cache_path(key).read_text())
    planted["key"]["cpu"] = "Elsewhere CPU"
    planted["rows"] = {"model:bogus": {"ms": 0.001}}
    cache_path(key).write_text(json.dumps(planted))

    out = tmp_path / "fast.pt"
    r = cli("prune", trained_pt, "--data", cifar_small, *FEW, "-o", out, "--json", "--method", "block",
            "--target-latency", "0.8", "--latency-batch", "2", "--finetune-epochs", "1")
    assert r.code == 0, r.stderr
    assert "measured elsewhere" in r.stderr and "Elsewhere CPU" in r.stderr
    d = r.json()
    lat = d["latency"]
    assert lat["predicted_fraction"] <= 0.8 and lat["predicted_ms"] <= lat["target_ms"] + 1e-9
    assert lat["measured_ms"] > 0 and lat["measured_parent_ms"] > 0 and isinstance(lat["target_met"], bool)
    assert lat["machine"]["batch"] == 2 and lat["machine"]["runtime"] == "ort"
    assert any(n.startswith("predicted ") and "measured" in n for n in d["notes"])
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert sum(ckpt["arch_kwargs"]["blocks"]) < 9  # blocks were removed
    entry = ckpt["lineage"][-1]
    assert entry["metrics"]["latency"]["predicted_ms"] == lat["predicted_ms"]
    assert entry["options"]["target_latency"] == 0.8 and entry["options"]["latency_batch"] == 2
    # The table is this machine's now, and the next run reads it instead of measuring blocks again.
    stored = json.loads(cache_path(key).read_text())
    assert stored["key"]["cpu"] == key.cpu and "model:bogus" not in stored["rows"]


def test_block_target_out_of_reach_is_refused_from_the_cached_table(cli, trained_pt: Path, cifar_small: Path,
                                                                     tmp_path: Path, latency_env: Path) -> None:
    out = tmp_path / "unreachable.pt"
    r = cli("prune", trained_pt, "--data", cifar_small, *FEW, "-o", out, "--method", "block", "--target-latency",
            "0.05", "--latency-batch", "2")
    assert r.code == 2, r.stderr
    assert "1 widths, cached" in r.stderr  # the previous test's table, not measured again
    assert r.stderr.count("Error:") == 1 and "--target-latency 0.05 is out of reach by removing blocks" in r.stderr
    assert not out.exists()
    r = cli("prune", trained_pt, "--data", cifar_small, *FEW, "-o", out, "--method", "block", "--latency-ms",
            "1000", "--latency-batch", "2")
    assert r.code == 2 and "--latency-ms 1000: the parent already runs in" in r.stderr and not out.exists()


def test_channel_target_latency_with_round_to_auto(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path,
                                                   latency_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESOPT_LATENCY_FRACTIONS", "1,0.5")
    out = tmp_path / "c.pt"
    r = cli("prune", trained_pt, "--data", cifar_small, *FEW, "-o", out, "--json", "--target-latency", "0.95",
            "--latency-batch", "2", "--round-to", "auto", "--runtime", "ort")
    assert r.code == 0, r.stderr
    lat = r.json()["latency"]
    assert lat["predicted_fraction"] <= 0.95 and lat["measured_ms"] > 0
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    choice = ckpt["lineage"][-1]["options"]["round_to_auto"]
    assert choice == choose_round_to("ort", "f32").to_dict()
    assert ckpt["lineage"][-1]["options"]["round_to"] == choice["multiple"]


@pytest.mark.parametrize(("args", "line"), [
    (["--target-latency", "0.5", "--runtime", "torch"], "--runtime torch: latency is measured on ort or openvino"),
    (["--target-latency", "0.5", "--runtime", "tensorrt", "--precision", "fp16"], "--runtime tensorrt"),
    (["--target-latency", "0.5", "--runtime", "ort", "--precision", "bf16"],
     "--precision bf16 does not apply to --runtime ort"),
    (["--sparsity", "0.5", "--round-to", "auto", "--runtime", "openvino", "--precision", "fp16"],
     "--precision fp16 does not apply to --runtime openvino"),
    (["--sparsity", "0.5", "--runtime", "ort"], "--runtime does not apply without --target-latency"),
    (["--target-latency", "0.5", "--sparsity", "0.5"], "--sparsity and --target-latency are alternatives"),
    (["--target-latency", "1.5"], "--target-latency must be in (0, 1)"),
    (["--latency-ms", "1", "--target-latency", "0.5"], "--target-latency and --latency-ms are alternatives"),
    (["--sparsity", "0.5", "--latency-batch", "4"], "--latency-batch does not apply without"),
    (["--method", "l1-unstruct", "--sparsity", "0.5", "--target-latency", "0.5"],
     "--target-latency does not apply to --method l1-unstruct"),
    (["--sparsity", "0.5", "--round-to", "eight"], "--round-to 'eight' is neither a whole number nor auto"),
])
def test_latency_refusals(cli, trained_pt: Path, cifar_small: Path, tmp_path: Path, empty_cache: Path,
                          args: list[str], line: str) -> None:
    out = tmp_path / "x.pt"
    r = cli("prune", trained_pt, "--data", cifar_small, *FEW, "-o", out, *args)
    assert r.code == 2, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("Error: ") and line in first and r.stderr.count("Error:") == 1, r.stderr
    assert not out.exists() and not empty_cache.exists()  # refused before anything was measured
