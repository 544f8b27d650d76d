"""ftz-doctor's probes of this machine's software: Python and package versions, and every ONNX
Runtime execution provider (a tiny real inference on each, alone, CPU fallback off: on a Jetson
a provider can be listed without working kernels), and the ONNX Runtime builds installed at once
(two distributions of the one ``onnxruntime`` module overwrite each other's files)."""

from __future__ import annotations

import contextlib
import io
import platform
import re
import sys
import time
from importlib import metadata
from typing import Dict, List, Optional, Sequence

import numpy as np

from ftz_edge.doctor.onnx_proto import tiny_model
from ftz_edge.runtime.vision import provider_plan

PACKAGES = ("ftz-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "pillow", "jinja2", "onnx",
            "onnxruntime-genai", "onnxruntime-genai-cuda", "tensorrt", "tensorrt-cu12", "tensorrt-cu13",
            "cuda-python", "psutil", "gradio", "fastapi", "uvicorn")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA, TENSORRT)
# Distributions that all install the one ``onnxruntime`` module: pip lays one over the other, and
# uninstalling either deletes files the other needs. Only one may be installed.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                             "onnxruntime-qnn", "onnxruntime-training")
# The same for ONNX Runtime GenAI's ``onnxruntime_genai`` module (ftz-export's builder; the runtime
# does not import it, so two of them are a warning).
GENAI_DISTRIBUTIONS = ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml")
# And for TensorRT's ``tensorrt`` module: one build per CUDA major (the ``tensorrt`` metapackage
# only pulls one of them in, so it is not counted).
TENSORRT_DISTRIBUTIONS = ("tensorrt-cu11", "tensorrt-cu12", "tensorrt-cu13")


# -- Python and packages --------------------------------------------------------------------------
def distribution_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name`` (importlib.metadata), None where it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_versions(names: Sequence[str]) -> Dict[str, Optional[str]]:
    """Each distribution's installed version, None where it is not installed."""
    return {name: distribution_version(name) for name in names}


def onnxruntime_conflict(versions: Dict[str, Optional[str]]) -> Optional[str]:
    """The problem, with its fix, when more than one ONNX Runtime build is installed; else None.

    onnxruntime (CPU) and onnxruntime-gpu are two distributions of the one ``onnxruntime`` module:
    whichever pip installed last overwrote the other's files, so the module is a mix of both, and
    uninstalling one deletes files the other needs. Both must go, then one comes back."""
    present = [name for name in ONNXRUNTIME_DISTRIBUTIONS if versions.get(name)]
    if len(present) < 2:
        return None
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in present else present[-1]
    listed = ", ".join(f"{name} {versions[name]}" for name in present)
    return (f"{len(present)} ONNX Runtime builds are installed at once ({listed}): they share the one onnxruntime "
            f"module and overwrite each other's files, so what runs is a mix of both. Fix: pip uninstall -y "
            f"{' '.join(present)} && pip install {keep} (on a desktop GPU the version for your CUDA: "
            "docs/desktop-gpu.md; on a Jetson from the Jetson AI Lab index: docs/jetson.md). Something asked for the "
            "other build: the runtime and export extras ask for onnxruntime (CPU), the gpu extra for onnxruntime-gpu")


def python_and_packages() -> dict:
    versions = installed_versions(tuple(dict.fromkeys(PACKAGES + ONNXRUNTIME_DISTRIBUTIONS + GENAI_DISTRIBUTIONS
                                                      + TENSORRT_DISTRIBUTIONS)))
    notes, problems = [], []
    conflict = onnxruntime_conflict(versions)
    if conflict:
        problems.append(conflict)
    genai = [name for name in GENAI_DISTRIBUTIONS if versions.get(name)]
    if len(genai) > 1:
        notes.append(f"{' and '.join(genai)} are installed at once: they share the onnxruntime_genai module (only "
                     f"ftz-export uses it); keep one: pip uninstall -y {' '.join(genai)} && pip install {genai[-1]}")
    tensorrt = [name for name in TENSORRT_DISTRIBUTIONS if versions.get(name)]
    if len(tensorrt) > 1:
        notes.append(f"{' and '.join(tensorrt)} are installed at once: they share the tensorrt module (the `trt` "
                     "extra's tensorrt now means tensorrt-cu13); keep the one for your CUDA driver: pip uninstall -y "
                     f"tensorrt {' '.join(tensorrt)} && pip install 'tensorrt-cu12>=10.3,<11' (docs/desktop-gpu.md)")
    if sys.version_info < (3, 10):
        notes.append("the runtime needs Python 3.10 or newer")
    return {"python": sys.version, "executable": sys.executable, "platform": platform.platform(),
            "machine": platform.machine(), "packages": {k: v for k, v in versions.items() if k in PACKAGES or v},
            "notes": notes, "problems": problems}


# -- execution providers --------------------------------------------------------------------------
def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


EP_ERROR = re.compile(r"^EP Error:? (.*?)(?: when using \[.*)?$", re.M)


def _ep_error(printed: str) -> Optional[str]:
    """The reason ONNX Runtime's Python wrapper printed when it fell back from a provider that failed
    to create a session ("EP Error <why> when using [...]"), or None."""
    match = EP_ERROR.search(printed)
    return " ".join(match.group(1).split()) if match else None


def run_on_provider(model, provider: str, feeds: Dict[str, np.ndarray], check) -> dict:
    """Run ``model`` (bytes or a path) on ``provider`` alone; ``check(outputs)`` returns None or a problem.

    ONNX Runtime's Python wrapper, when a provider fails to create a session, prints the error to
    stdout and quietly retries on the CPU (``enable_fallback=0`` turns that off where the wrapper
    knows it, newer than 1.22; older ones ignore it). The print is captured (``--json`` output must
    stay JSON), and the provider's own error is reported, not the retry's."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failing provider is reported by us, once
    if provider != CPU:
        # Without this, ONNX Runtime quietly runs unsupported nodes on the CPU and the check proves nothing.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    result = {"provider": provider, "ok": False, "error": None, "load_ms": None, "run_ms": None}
    start = time.perf_counter()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                           providers=[provider], enable_fallback=0)
        result["load_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        if session.get_providers()[0] != provider:
            reason = _ep_error(printed.getvalue())
            raise RuntimeError(reason or f"the session runs on {session.get_providers()}, not {provider}")
        start = time.perf_counter()
        outputs = session.run(None, feeds)
        result["run_ms"] = round((time.perf_counter() - start) * 1e3, 2)
        problem = check(outputs)
        if problem:
            raise RuntimeError(problem)
        result["ok"] = True
    except Exception as err:  # noqa: BLE001 - every failure of a provider is a finding, not a crash
        # An older wrapper printed the provider's error, retried on the CPU, and that retry failed on our
        # "no CPU fallback" option ("Conflicting session configuration"): the provider's error is the cause.
        cause = err.__cause__ if _ep_error(printed.getvalue()) else None
        result["error"] = one_line(cause if isinstance(cause, Exception) else err)
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


def gpu_provider_states(providers: dict, onnxruntime_version: Optional[str] = None) -> List[dict]:
    """For the CUDA and TensorRT providers: "runs", "fails" (listed but a tiny inference on it alone
    fails: ``detail`` is the one-line reason) or "not listed" by this onnxruntime."""
    results = {r["provider"]: r for r in providers["results"]}
    states = []
    for provider in GPU_PROVIDERS:
        r = results.get(provider)
        if r is None:
            if providers["error"]:
                detail = "onnxruntime is not importable"
            else:
                build = f"onnxruntime {onnxruntime_version}" if onnxruntime_version else "this onnxruntime"
                detail = (f"{build} does not offer it (the CPU build, or a GPU build without this provider): "
                          "install onnxruntime-gpu (docs/desktop-gpu.md; Jetson: docs/jetson.md)")
            states.append({"name": provider, "state": "not listed", "detail": detail, "needed": False})
        elif r["ok"]:
            states.append({"name": provider, "state": "runs", "needed": r["needed"],
                           "detail": f"load {r['load_ms']} ms, run {r['run_ms']} ms"})
        else:
            states.append({"name": provider, "state": "fails", "detail": r["error"], "needed": r["needed"]})
    return states
