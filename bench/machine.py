"""What machine a run was made on: CPU, cores, RAM, GPU, library versions, and a folder slug.

Torch is only asked about CUDA when it is already importable; nothing here starts a GPU
context otherwise.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
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
    """The first CUDA GPU: through torch when it sees one, else nvidia-smi; None without a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return {"name": props.name, "memory_gib": round(props.total_memory / (1 << 30), 1),
                    "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            if out:
                name, memory = [s.strip() for s in out[0].split(",")]
                return {"name": name, "memory_gib": round(float(memory) / 1024, 1), "count": len(out), "cuda": None}
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return None


def library_versions() -> dict:
    from ftz_edge.doctor.cli import installed_versions

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
