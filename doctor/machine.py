"""ftz-doctor's view of this machine's hardware: GPU, Jetson, TensorRT (all detected by
``ftz_edge.runtime.device``, the one place that knows how) and memory (psutil, else /proc/meminfo);
and whether TensorRT's Python API really builds and runs a tiny network here (``tensorrt_check``)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ftz_edge.doctor import memory_budget as mb
from ftz_edge.doctor.onnx_proto import tiny_model
from ftz_edge.doctor.probes import one_line
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


TRT_WORKSPACE_BYTES = 64 << 20  # the tiny network needs next to nothing; bounded so a small GPU is not asked for more


def tensorrt_check(trt=None) -> dict:
    """Does TensorRT's Python API work here, not just import? Written against TensorRT 10's documented
    API (the path ``ftz-export --engine trt`` takes): a ``Builder`` (the real one fails without a
    usable CUDA device), the doctor's tiny ONNX model (``y = x @ W + b``) parsed from a file into a
    network, an engine built with a 64 MiB workspace, then deserialized and run once by the runtime's
    own ``TensorRTVision`` (which needs cuda-python for device memory) and its output compared.

    Returns {version, steps: [{step, ok, detail}], ok, error}: ``ok`` None where TensorRT is not
    importable (nothing tried), True when every step passed, False at the first that failed (its
    one-line reason in ``error``); a run skipped for want of cuda-python leaves ``ok`` True with the
    skip in that step's detail. Never raises."""
    from ftz_edge.runtime import device

    why = None
    if trt is None:
        trt, why = device.import_tensorrt()
    result = {"version": getattr(trt, "__version__", None) if trt else None, "steps": [], "ok": None,
              "error": None if trt else why}
    if trt is None:
        return result
    steps = result["steps"]

    def fail(step: str, err) -> dict:
        reason = one_line(err) if isinstance(err, BaseException) else str(err)
        steps.append({"step": step, "ok": False, "detail": reason})
        result.update(ok=False, error=f"{step}: {reason}")
        return result

    steps.append({"step": "import", "ok": True, "detail": f"tensorrt {result['version']}"})
    try:
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)  # pybind11 raises TypeError ("returned nullptr") without a CUDA device
        if builder is None:
            raise RuntimeError("trt.Builder returned None")
    except Exception as err:  # noqa: BLE001 - a broken install is a finding, not a crash
        return fail("builder", err)
    steps.append({"step": "builder", "ok": True, "detail": "trt.Builder created"})

    model, feeds, expected = tiny_model()
    engine = None
    with tempfile.TemporaryDirectory(prefix="ftz-doctor-trt-") as folder:
        onnx_path, engine_path = Path(folder) / "tiny.onnx", Path(folder) / "tiny.engine"
        onnx_path.write_bytes(model)
        start = time.perf_counter()
        try:
            # STRONGLY_TYPED where the enum has it (TensorRT 10; 11 always is), as ftz-export builds
            flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
            network = builder.create_network(0 if flag is None else 1 << int(flag))
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no details"]
                raise RuntimeError("the ONNX parser refused the tiny model: " + " | ".join(errors))
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, TRT_WORKSPACE_BYTES)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise RuntimeError("build_serialized_network returned None (see TensorRT's log)")
            engine_path.write_bytes(bytes(serialized))
        except Exception as err:  # noqa: BLE001
            return fail("tiny network build", err)
        steps.append({"step": "tiny network build", "ok": True,
                      "detail": f"{engine_path.stat().st_size} bytes in {(time.perf_counter() - start) * 1e3:.0f} ms"})

        if device.cudart() is None:
            steps.append({"step": "engine run", "ok": None, "detail": "skipped: cuda-python is not installed (the "
                          "runtime's TensorRT backend needs it for device memory: pip install 'cuda-python>=12,<13')"})
            result["ok"] = True
            return result
        from ftz_edge.runtime.vision import TensorRTVision

        start = time.perf_counter()
        try:
            engine = TensorRTVision(engine_path)
            output = engine(feeds)
            error = float(np.max(np.abs(output - expected))) if output.shape == expected.shape else None
            if error is None or error > 1e-2:
                raise RuntimeError(f"wrong result: output {output.shape}, expected {expected.shape}"
                                   + ("" if error is None else f", max abs error {error:.3g}"))
        except Exception as err:  # noqa: BLE001
            return fail("engine run", err)
        finally:
            if engine is not None:
                engine.close()
    steps.append({"step": "engine run", "ok": True,
                  "detail": f"deserialized and run in {(time.perf_counter() - start) * 1e3:.0f} ms, output right"})
    result["ok"] = True
    return result
