"""What machine a run was made on: CPU, cores, RAM, GPU, library versions, and a folder slug.

Torch is only asked about CUDA when it is already importable; nothing here starts a GPU
context otherwise.
"""

from __future__ import annotations

import os
import platform
import re
from typing import Optional

LIBRARIES = ("ftz-edge", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai",
             "tensorrt", "llama-cpp-python", "gguf", "numpy")
CPU_FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd")


def _cpuinfo() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return info
    for key in ("model name", "Model", "Hardware"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        if match:
            info["model"] = match.group(1).strip()
            break
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    if flags:
        present = set(flags.group(1).split())
        info["flags"] = [f for f in CPU_FLAGS_OF_NOTE if f in present]
    return info


def _ram_gib() -> Optional[float]:
    try:
        import psutil

        return psutil.virtual_memory().total / (1 << 30)
    except ImportError:
        pass
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", open("/proc/meminfo").read())
        return int(match.group(1)) / (1 << 20) if match else None
    except OSError:
        return None


def _physical_cores() -> Optional[int]:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def gpu_info() -> Optional[dict]:
    """GPU 0 as ftz_edge.runtime.device finds it (the one place that does: cuda-python, else
    nvidia-smi), with the CUDA version of the torch that the PyTorch baselines run on; None
    without a GPU."""
    from ftz_edge.runtime import device

    found = device.cuda_device()
    if found is None:
        return None
    try:
        import torch

        cuda = torch.version.cuda
    except ImportError:
        cuda = None
    total = found.get("total_memory")
    return {"name": found["name"], "memory_gib": round(total / (1 << 30), 1) if total else None,
            "count": device.cuda_python_status().get("device_count"), "cuda": cuda,
            "compute_capability": found.get("compute_capability")}


def library_versions() -> dict:
    from ftz_edge.doctor.probes import installed_versions

    return installed_versions(LIBRARIES)


def describe_machine() -> dict:
    cpu = _cpuinfo()
    ram = _ram_gib()
    return {
        "cpu": cpu["model"], "cpu_flags": cpu["flags"], "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(), "ram_gib": round(ram, 1) if ram else None,
        "gpu": gpu_info(), "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "libraries": library_versions(),
    }


def _slugify(text: str) -> str:
    text = re.sub(r"\((?:R|TM)\)|CPU|Processor|@.*$", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(machine: dict) -> str:
    """A folder name for the machine: the GPU's name, else the CPU model and core count."""
    if machine.get("gpu"):
        return _slugify(machine["gpu"]["name"])
    return f"{_slugify(machine['cpu'] or 'cpu')}-{machine['logical_cores']}c"


def machine_line(machine: dict) -> str:
    """One line for a report header."""
    parts = [f"{machine['cpu']} ({machine['logical_cores']} logical cores"
             + (f", {', '.join(machine['cpu_flags'])}" if machine.get("cpu_flags") else "") + ")"]
    if machine.get("ram_gib"):
        parts.append(f"{machine['ram_gib']:.0f} GiB RAM")
    gpu = machine.get("gpu")
    parts.append(f"GPU {gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else "no GPU")
    return ", ".join(parts)
