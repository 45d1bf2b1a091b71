"""``resopt env``: what this machine can run (GPU, precisions, CPU instruction sets, driver, CUDA, TensorRT,
onnxruntime, OpenVINO, torch)."""

from __future__ import annotations

from typing import Any

from resopt.cli.common import JsonOpt, emit, human_bytes


def env_cmd(json_: JsonOpt = False) -> None:
    """Show the GPU, its compute capability and precision support, the CPU's instruction sets (AVX-512, VNNI,
    BF16, AMX; on Arm dot product and matrix extensions) and cores in use, and the driver, CUDA, TensorRT,
    onnxruntime, OpenVINO and torch versions. Works (and says so) on a machine without a GPU.

    Example: resopt env --json
    """
    from resopt.envinfo import collect_env

    emit(collect_env().to_dict(), json_out=json_, render=_render, min_width=120)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _render(d: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    from resopt.cli.common import kv_table

    none = "-"
    gpu_rows: list[tuple[str, Any]] = []
    if not d["gpus"]:
        gpu_rows.append(("GPU", "none visible"))
    for g in d["gpus"]:
        s = g["support"]
        gpu_rows += [
            (f"GPU {g['index']}", f"{g['name']} ({human_bytes(g['total_memory'])}, {g['multiprocessors']} SMs)"),
            ("compute capability", g["compute_capability"]),
            ("FP16 / INT8", f"{_yes(s['fp16'])} / {_yes(s['int8'])}"),
            ("TF32 / BF16 / FP8", f"{_yes(s['tf32'])} / {_yes(s['bf16'])} / {_yes(s['fp8'])}"),
            ("2:4 sparsity", _yes(s["sparsity_2_4"])),
        ]
    isa = d.get("cpu_isa") or {}
    cpu_rows: list[tuple[str, Any]] = [
        ("CPU", f"{d.get('cpu') or none}, {d['cores_available']} of {d['cpu_count']} cores available"),
        ("instruction sets", ", ".join(f"{k} {_yes(v)}" for k, v in isa.items()) or "unknown"),
        ("CPU runtimes", f"onnxruntime {d['onnxruntime'] or 'not installed'}, OpenVINO "
                         f"{d.get('openvino') or 'not installed'}"
                         + (f" ({', '.join(d['openvino_capabilities'])})" if d.get("openvino_capabilities") else "")),
    ]
    rows = gpu_rows + cpu_rows + [
        ("driver", d["driver"] or none),
        ("CUDA (driver supports)", d["cuda_driver"] or none),
        ("torch", f"{d['torch'] or none} (CUDA build {d['torch_cuda'] or 'none'}, cuDNN {d['cudnn'] or none})"),
        ("TensorRT", d["tensorrt"] or "not installed"),
        ("TensorRT precision path", d["tensorrt_build_path"] or none),
        ("onnxruntime", f"{d['onnxruntime'] or none} ({', '.join(d['ort_providers']) or 'no providers'})"),
        ("onnx", d["onnx"] or none),
        ("python", f"{d['python']} on {d['platform']}, {d['cpu_count']} CPUs"),
        ("resopt", d["resopt"]),
    ]
    parts: list[Any] = [kv_table("environment", [(k, escape(str(v))) for k, v in rows])]
    if d["notes"]:
        notes = Table(show_header=False, box=None, title="notes", title_justify="left")
        notes.add_column()
        for n in d["notes"]:
            notes.add_row(f"- {escape(n)}")
        parts.append(notes)
    return Group(*parts)
