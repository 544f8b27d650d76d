"""What this machine offers the runtime: CUDA GPU, Jetson, TensorRT (torch-free, Python 3.10).

The one place that finds the GPU (cuda-python, else ``nvidia-smi``), a Jetson (device tree and
``/etc/nv_tegra_release``), TensorRT, and whether an engine's build record matches them. The
runtime, ``ftz-doctor`` and ``ftz-export`` all ask here. Nothing is imported until asked:
``tensorrt`` and cuda-python are optional, and a missing or broken driver means "no GPU", never
a crash.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence, Tuple

# 8.x (JetPack 5) has no strongly typed networks; ftz-export's engines need 10 or newer.
MIN_TENSORRT_MAJOR = 10
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
# L4T major release -> JetPack, for the report.
# Every Jetson Orin module has an Ampere GPU of compute capability 8.7.
ORIN_COMPUTE_CAPABILITY = "8.7"
JETPACK_OF_L4T = {35: "JetPack 5 (not supported: needs TensorRT >= 10)", 36: "JetPack 6", 38: "JetPack 7",
                  39: "JetPack 7"}


def cudart():
    """cuda-python's CUDA runtime module, or None where cuda-python is not installed."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # older cuda-python
        return runtime
    except ImportError:
        return None


def cuda_call(result, what: str):
    """The value of a cuda-python call (``(error, *values)``); raises RuntimeError naming ``what``
    and the CUDA error when ``error`` is not cudaSuccess (0)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise RuntimeError(f"CUDA error during {what}: {error_name(error)}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def error_name(error) -> str:
    """``cudaErrorMemoryAllocation (2)``-style text for a cuda-python error code."""
    runtime = cudart()
    try:
        status, name = runtime.cudaGetErrorName(error)
        if int(status) == 0:
            name = name.decode() if isinstance(name, bytes) else str(name)
            return f"{name} ({int(error)})"
    except Exception:  # noqa: BLE001 - the name is a courtesy; the number is enough
        pass
    return f"{getattr(error, 'name', 'error')} ({int(error)})"


def import_tensorrt():
    """(module, None) or (None, why). Broad except: a broken install raises OSError (missing libnvinfer)."""
    try:
        import tensorrt
        return tensorrt, None
    except Exception as err:  # noqa: BLE001
        return None, f"{type(err).__name__}: {err}"


def tensorrt_major(version: Optional[str]) -> Optional[int]:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _device_from_cuda_python() -> Optional[dict]:
    runtime = cudart()
    if runtime is None:
        return None
    ok = runtime.cudaError_t.cudaSuccess
    try:  # a missing or too-old driver must mean "no GPU", not a crash
        err, count = runtime.cudaGetDeviceCount()
        if err != ok or count < 1:
            return None
        err, props = runtime.cudaGetDeviceProperties(0)  # device 0 of CUDA_VISIBLE_DEVICES: the one TensorRT uses
    except Exception:  # noqa: BLE001
        return None
    if err != ok:
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}",
            "total_memory": int(props.totalGlobalMem), "source": "cuda-python"}


def _device_from_nvidia_smi() -> Optional[dict]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        return None
    name, cap, memory = ([part.strip() for part in lines[0].split(",")] + ["", ""])[:3]
    # Jetson's nvidia-smi may print "[N/A]" for fields it cannot read: keep them unknown, not wrong.
    total = int(memory.split()[0]) << 20 if memory.split() and memory.split()[0].isdigit() else None
    return {"name": name, "compute_capability": cap if cap[:1].isdigit() else None,
            "total_memory": total, "source": "nvidia-smi"}


def cuda_python_status() -> dict:
    """What cuda-python says of the CUDA driver, for ``ftz-doctor``: {installed, version, driver
    (the CUDA version the driver supports, "12.4"), device_count, error}. Never raises: a missing or
    too-old driver is reported in ``error`` (e.g. ``cudaErrorInsufficientDriver (35)``)."""
    runtime = cudart()
    status = {"installed": runtime is not None, "version": None, "driver": None, "device_count": None, "error": None}
    if runtime is None:
        return status
    try:
        from importlib import metadata

        status["version"] = metadata.version("cuda-python")
    except Exception:  # noqa: BLE001 - cuda-bindings alone, or a vendored copy: the version is a courtesy
        pass
    try:
        if hasattr(runtime, "cudaDriverGetVersion"):
            version = cuda_call(runtime.cudaDriverGetVersion(), "cudaDriverGetVersion")
            if version:
                status["driver"] = f"{int(version) // 1000}.{int(version) % 1000 // 10}"
        status["device_count"] = int(cuda_call(runtime.cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except Exception as err:  # noqa: BLE001 - no driver, wrong driver: a finding, not a crash
        status["error"] = f"{type(err).__name__}: {err}"
    return status


def cuda_device() -> Optional[dict]:
    """{name, compute_capability "8.7", total_memory bytes, source} of GPU 0, or None without a GPU."""
    return _device_from_cuda_python() or _device_from_nvidia_smi()


def gpu_free_memory(use_nvidia_smi: bool = True) -> Optional[dict]:
    """{free, total, source} bytes of GPU 0: cuda-python, else (``use_nvidia_smi``) nvidia-smi, a
    subprocess too slow to run per request; None when unknown."""
    runtime = cudart()
    if runtime is not None:
        try:
            error, free, total = runtime.cudaMemGetInfo()
            if int(error) == 0:
                return {"free": int(free), "total": int(total), "source": "cuda-python"}
        except Exception:  # noqa: BLE001 - no driver: unknown, not a crash
            pass
    smi = shutil.which("nvidia-smi") if use_nvidia_smi else None
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=15, check=False)
            free, total = (int(part.strip()) << 20 for part in out.stdout.splitlines()[0].split(",")[:2])
            return {"free": free, "total": total, "source": "nvidia-smi"}
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            pass
    return None


def read_text(path: Path) -> Optional[str]:
    """A small system file's text without NULs, or None where it cannot be read."""
    try:
        return path.read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def jetson_info() -> Optional[dict]:
    """{model, l4t, jetpack, release_line} of a Jetson, from the device tree and /etc/nv_tegra_release;
    None elsewhere."""
    model = read_text(DEVICE_TREE_MODEL)
    release = read_text(TEGRA_RELEASE)
    if not release and not (model and "jetson" in model.lower()):
        return None
    l4t = None
    if release:
        match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        if match:
            l4t = f"{match.group(1)}.{match.group(2)}"
    jetpack = JETPACK_OF_L4T.get(int(l4t.split(".")[0])) if l4t else None
    return {"model": model, "l4t": l4t, "jetpack": jetpack,
            "release_line": release.splitlines()[0] if release else None}


def gpu_here(jetson: Optional[dict] = None) -> Optional[dict]:
    """``cuda_device()``, else, on a Jetson Orin (from ``jetson_info()``) that has neither cuda-python
    nor a working nvidia-smi, its known integrated GPU; None without a GPU."""
    gpu = cuda_device()
    if gpu is None and jetson is not None and "orin" in (jetson.get("model") or "").lower():
        gpu = {"name": f"{jetson['model']} (integrated GPU)", "compute_capability": ORIN_COMPUTE_CAPABILITY,
               "total_memory": None, "source": f"device tree (Orin: compute capability {ORIN_COMPUTE_CAPABILITY})"}
    return gpu


def engine_compatible(record: dict, device: Optional[dict], trt_version: Optional[str]) -> Tuple[bool, str]:
    """Can this machine load the engine ``record`` describes? Engines are per GPU model and TensorRT
    version. The record is a claim: ``ftz-doctor --bundle`` also deserializes and runs the engine."""
    if trt_version is None:
        return False, "TensorRT is not installed here"
    if device is None:
        return False, "no NVIDIA GPU found"
    problems = []
    if record.get("compute_capability") != device.get("compute_capability"):
        problems.append(f"built for compute capability {record.get('compute_capability')} ({record.get('gpu_name')}), "
                        f"this GPU is {device.get('compute_capability')} ({device.get('name')})")
    if record.get("tensorrt_version") != trt_version:
        problems.append(f"built with TensorRT {record.get('tensorrt_version')}, this machine has {trt_version}")
    if problems:
        return False, "; ".join(problems) + ": rebuild the engine on this machine"
    note = "" if record.get("gpu_name") == device.get("name") else f" (tuned on {record.get('gpu_name')})"
    return True, f"same compute capability {device.get('compute_capability')} and TensorRT {trt_version}{note}"


_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def preload_gpu_libraries(providers: Sequence[str]) -> None:
    """Before a session on a GPU provider: let onnxruntime load the CUDA, cuDNN and TensorRT
    libraries that pip installed (the nvidia-* wheels of the ``gpu`` extra live in site-packages,
    where the dynamic loader does not look). ``onnxruntime.preload_dlls`` (1.21+) does exactly that;
    an older onnxruntime, or a system install (JetPack's), finds them on the loader path and needs
    nothing. Never raises: a library it cannot load shows up as the provider's own error."""
    if not any(p in _GPU_PROVIDERS for p in providers):
        return
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception:  # noqa: BLE001 - the session's provider error is the one to report
        pass
