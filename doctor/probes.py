"""ftz-doctor's probes of this machine's software: Python and package versions, and every ONNX
Runtime execution provider (a tiny real inference on each, alone, CPU fallback off: on a Jetson
a provider can be listed without working kernels)."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from typing import Dict, List, Optional, Sequence

import numpy as np

from ftz_edge.doctor.onnx_proto import tiny_model
from ftz_edge.runtime.vision import provider_plan

PACKAGES = ("ftz-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "pillow", "jinja2", "onnx",
            "onnxruntime-genai", "tensorrt", "cuda-python", "psutil", "gradio", "fastapi", "uvicorn")
CPU = "CPUExecutionProvider"


# -- Python and packages --------------------------------------------------------------------------
def installed_versions(names: Sequence[str]) -> Dict[str, Optional[str]]:
    """Each distribution's installed version, None where it is not installed."""
    versions: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def python_and_packages() -> dict:
    versions = installed_versions(PACKAGES)
    notes = []
    if versions["onnxruntime"] and versions["onnxruntime-gpu"]:
        notes.append("both onnxruntime and onnxruntime-gpu are installed: they share one module and overwrite "
                     "each other; keep one (pip uninstall onnxruntime, then reinstall onnxruntime-gpu)")
    if sys.version_info < (3, 10):
        notes.append("the runtime needs Python 3.10 or newer")
    return {"python": sys.version, "executable": sys.executable, "platform": platform.platform(),
            "machine": platform.machine(), "packages": versions, "notes": notes}


# -- execution providers --------------------------------------------------------------------------
def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def run_on_provider(model, provider: str, feeds: Dict[str, np.ndarray], check) -> dict:
    """Run ``model`` (bytes or a path) on ``provider`` alone; ``check(outputs)`` returns None or a problem."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failing provider is reported by us, once
    if provider != CPU:
        # Without this, ONNX Runtime quietly runs unsupported nodes on the CPU and the check proves nothing.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    result = {"provider": provider, "ok": False, "error": None, "load_ms": None, "run_ms": None}
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                       providers=[provider])
        result["load_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        if session.get_providers()[0] != provider:
            raise RuntimeError(f"the session runs on {session.get_providers()}, not {provider}")
        start = time.perf_counter()
        outputs = session.run(None, feeds)
        result["run_ms"] = round((time.perf_counter() - start) * 1e3, 2)
        problem = check(outputs)
        if problem:
            raise RuntimeError(problem)
        result["ok"] = True
    except Exception as err:  # noqa: BLE001 - every failure of a provider is a finding, not a crash
        result["error"] = one_line(err)
    return result


def available_providers() -> List[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def needed_providers(available: Sequence[str]) -> List[str]:
    """Every provider the runtime gives a session by default (``provider_plan``, for a decoder built
    for either device): each must work."""
    needed: List[str] = []
    for built_for in ("cuda", "cpu"):
        plan = provider_plan(built_for, available=available)
        needed += [p for p in plan.vision + plan.decoder if p not in needed]
    return needed


def check_providers() -> dict:
    try:
        available = available_providers()
    except ImportError as err:
        return {"available": [], "needed": [CPU], "results": [], "error": f"onnxruntime is not importable ({err}); "
                "pip install -e '.[runtime]' (Jetson: onnxruntime-gpu from the Jetson AI Lab index)"}
    model, feeds, expected = tiny_model()

    def check(outputs):
        if outputs[0].shape != expected.shape:
            return f"output shape {outputs[0].shape}, expected {expected.shape}"
        error = float(np.max(np.abs(outputs[0] - expected)))
        return None if error < 1e-2 else f"wrong result: max abs error {error:.3g}"

    needed = needed_providers(available)
    results = []
    for provider in available:
        result = run_on_provider(model, provider, feeds, check)
        result["needed"] = provider in needed
        results.append(result)
    return {"available": available, "needed": needed, "results": results, "error": None,
            "model": "y = x @ W + b, 2x8 @ 8x4 (hand-encoded ONNX), CPU fallback off"}
