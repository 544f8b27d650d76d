"""ftz-doctor's view of this machine's hardware: GPU, Jetson, TensorRT (all detected by
``ftz_edge.runtime.device``, the one place that knows how) and memory (psutil, else /proc/meminfo)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ftz_edge.doctor import memory_budget as mb
from ftz_edge.runtime import device  # GPU, Jetson, TensorRT: tensorrt and cuda-python imported only when asked

MEMINFO = Path("/proc/meminfo")


def meminfo() -> Optional[dict]:
    """Total and available RAM: psutil when installed, else /proc/meminfo."""
    try:
        import psutil

        memory = psutil.virtual_memory()
        return {"total": int(memory.total), "available": int(memory.available), "source": "psutil"}
    except ImportError:
        pass
    text = device.read_text(MEMINFO)
    if not text:
        return None
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024  # kB
    if "MemTotal" not in fields:
        return None
    return {"total": fields["MemTotal"], "available": fields.get("MemAvailable", fields.get("MemFree", 0)),
            "source": str(MEMINFO)}


def machine_info() -> dict:
    trt, why = device.import_tensorrt()
    tensorrt = {"version": getattr(trt, "__version__", None) if trt else None, "error": why}
    jetson = device.jetson_info()
    gpu = device.gpu_here(jetson)
    ram = meminfo()
    gpu_memory = device.gpu_free_memory() if gpu is not None else None
    unified = gpu is None or jetson is not None
    return {"gpu": gpu, "gpu_memory": gpu_memory, "jetson": jetson, "tensorrt": tensorrt, "ram": ram,
            "unified_memory": unified}


def this_machine_target(machine: dict) -> Optional[mb.Target]:
    ram = machine["ram"]
    if ram is None:
        return None
    gpu = machine["gpu"] is not None
    if machine["unified_memory"]:
        kind = "Jetson unified memory" if machine["jetson"] else "CPU only"
        return mb.Target(f"this machine ({kind}, RAM available)", True, ram["available"], gpu=gpu)
    free = machine["gpu_memory"]["free"] if machine["gpu_memory"] else None
    return mb.Target("this machine (GPU free memory + RAM available)", free is None, ram["available"], free, gpu=True)
