"""env: precision support from compute capability, library probes, and the command on a machine with or
without a GPU and TensorRT."""

from __future__ import annotations

import subprocess
import sys

import pytest

from resopt.envinfo import parse_cc, precision_support, tensorrt_build_path, tensorrt_version, trt_major


@pytest.mark.parametrize("cc, fp16, int8, tf32, sparse, fp8", [
    ((5, 2), False, False, False, False, False),  # Maxwell GM20x
    ((5, 3), True, False, False, False, False),  # Jetson TX1
    ((6, 0), True, False, False, False, False),  # P100
    ((6, 1), False, True, False, False, False),  # GTX 10xx / P4 / P40: FP16 at 1/64 rate, DP4A INT8
    ((7, 0), True, True, False, False, False),  # V100
    ((7, 5), True, True, False, False, False),  # T4
    ((8, 0), True, True, True, True, False),  # A100
    ((8, 6), True, True, True, True, False),  # RTX 30xx, A10
    ((8, 9), True, True, True, True, True),  # L4, L40, RTX 40xx
    ((9, 0), True, True, True, True, True),  # H100, H200
    ((12, 0), True, True, True, True, True),  # Blackwell workstation
])
def test_precision_support_by_compute_capability(cc, fp16, int8, tf32, sparse, fp8) -> None:
    s = precision_support(cc)
    assert (s["fp16"], s["int8"], s["tf32"], s["sparsity_2_4"], s["fp8"]) == (fp16, int8, tf32, sparse, fp8)
    assert s["tensor_cores"] == (cc >= (7, 0)) and s["bf16"] == (cc >= (8, 0))


def test_version_parsing() -> None:
    assert parse_cc("8.6") == (8, 6) and parse_cc("9") == (9, 0)
    assert trt_major("10.3.0.26") == 10 and trt_major("11.0") == 11 and trt_major("rc") == 0
    assert "strongly typed" in tensorrt_build_path("11.2.0")
    assert "builder flags" in tensorrt_build_path("10.3.0")
    assert "does not support" in tensorrt_build_path("8.6.1")
    assert tensorrt_build_path(None) is None


def test_tensorrt_probe_reports_why_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    version, reason = tensorrt_version()
    assert version is None and reason.startswith("TensorRT is not installed")


def test_env_json_matches_this_machine(cli) -> None:
    import onnxruntime as ort
    import torch

    r = cli("env", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["torch"] == torch.__version__ and d["torch_cuda"] == torch.version.cuda
    assert d["cuda_available"] == torch.cuda.is_available()
    assert len(d["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert d["onnxruntime"] == ort.__version__ and d["ort_providers"] == ort.get_available_providers()
    try:
        import tensorrt

        assert d["tensorrt"] == tensorrt.__version__
    except ImportError:
        assert d["tensorrt"] is None and d["tensorrt_build_path"] is None
        assert any("pip install 'resopt[tensorrt-cu12]' (or 'resopt[tensorrt-cu13]'" in n for n in d["notes"])
    for g in d["gpus"]:
        p = torch.cuda.get_device_properties(g["index"])
        assert g["name"] == p.name and g["compute_capability"] == f"{p.major}.{p.minor}"
        assert g["support"] == precision_support((p.major, p.minor))
    if not d["gpus"]:
        assert "no CUDA GPU is visible to PyTorch" in d["notes"]


def test_env_table_without_gpu_or_tensorrt(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    r = cli("env")
    assert r.code == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert any("GPU" in ln and "none visible" in ln for ln in lines)
    assert any("TensorRT " in ln and "not installed" in ln for ln in lines)
    assert "'resopt[tensorrt-cu12]'" in r.stdout  # the install hint survives Rich markup


def test_env_and_build_commands_import_no_heavy_library() -> None:
    code = ("import sys, resopt.cli.env, resopt.cli.build, resopt.cli.bench, resopt.envinfo, resopt.build, "
            "resopt.backends.tensorrt_backend, resopt.backends.openvino_backend; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'openvino') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------- the CPU


def test_cpu_isa_from_flags() -> None:
    from resopt.envinfo import cpu_isa

    sapphire_rapids = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                       "amx_int8", "amx_bf16"}
    isa = cpu_isa(sapphire_rapids, "x86_64")
    assert isa["AMX-INT8"] and isa["AMX-BF16"] and isa["AVX-512 VNNI"] and isa["AVX-512 BF16"]
    assert not isa["AMX-FP16"]
    zen3 = {"avx2", "fma"}
    assert cpu_isa(zen3, "x86_64") == {k: k == "AVX2" for k in isa}
    neoverse_v1 = {"asimd", "asimddp", "i8mm", "bf16", "sve"}
    arm = cpu_isa(neoverse_v1, "aarch64")
    assert arm["dot product (SDOT/UDOT)"] and arm["INT8 matrix multiply (I8MM)"] and arm["SVE"]
    assert not arm["SME"] and "AVX2" not in arm


def test_read_cpuinfo(tmp_path) -> None:
    from resopt.envinfo import read_cpuinfo

    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 amx_int8\n\n"
                 "processor\t: 1\nmodel name\t: Test CPU\nflags\t\t: fpu\n")
    assert read_cpuinfo(str(f)) == ("Test CPU", {"fpu", "avx2", "amx_int8"})
    assert read_cpuinfo(str(tmp_path / "missing")) == (None, set())


def test_env_lists_this_cpus_instruction_sets_and_runtimes(cli) -> None:
    import os
    import platform

    from resopt.envinfo import cpu_isa, read_cpuinfo

    r = cli("env", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    _, flags = read_cpuinfo()
    if flags:
        assert d["cpu_isa"] == cpu_isa(flags, platform.machine())
        if platform.machine() == "x86_64":
            assert d["cpu_isa"]["AVX-512 VNNI"] == ("avx512_vnni" in flags)
            assert d["cpu_isa"]["AMX-INT8"] == ("amx_int8" in flags)
    assert d["cores_available"] == len(os.sched_getaffinity(0))
    try:
        import openvino

        assert openvino.__version__.startswith(d["openvino"]) and "FP32" in d["openvino_capabilities"]
    except ImportError:
        assert d["openvino"] is None
    table = cli("env").stdout
    assert "instruction sets" in table and "CPU runtimes" in table
    if flags and platform.machine() == "x86_64":
        assert f"AVX-512 VNNI {'yes' if 'avx512_vnni' in flags else 'no'}" in table
