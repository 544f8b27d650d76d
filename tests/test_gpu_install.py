"""The extras a desktop NVIDIA GPU installs (pyproject.toml) never bring two ONNX Runtime builds.

onnxruntime (CPU) and onnxruntime-gpu are two distributions of the one ``onnxruntime`` module:
pip lays one over the other. These tests resolve each extra's requirements within the project
(``ftz-edge[train]`` inside ``export`` is followed) and check that the ``gpu`` install set has
onnxruntime-gpu and never the CPU build, that ``runtime`` alone is the CPU build, and that the
install commands docs/desktop-gpu.md gives stay GPU-only. Nothing here installs anything: a GPU
install was never run where this project is developed (docs/desktop-gpu.md says so).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*([^;]*)")
CPU_BUILDS = {"onnxruntime", "onnxruntime-genai"}  # onnxruntime-genai requires onnxruntime (CPU)
GPU_BUILDS = {"onnxruntime-gpu", "onnxruntime-genai-cuda"}  # onnxruntime-genai-cuda requires onnxruntime-gpu


def normalize(name: str) -> str:
    """PEP 503: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


SELF = normalize(PROJECT["name"])


def parse(requirement: str) -> tuple:
    """(name, extras, version specifier) of a PEP 508 requirement (markers dropped)."""
    match = REQUIREMENT.match(requirement)
    assert match, requirement
    name, extras, spec = match.groups()
    return normalize(name), [normalize(e) for e in (extras or "").split(",") if e.strip()], spec.strip()


def install_set(extras, with_base: bool = True) -> dict:
    """{distribution: [specifiers]} that ``pip install "ftz-edge[<extras>]"`` asks for directly or
    through the project's own extras (``ftz-edge[train]``, transitively); other packages' own
    dependencies are not followed (see KNOWN_DEPENDENCIES)."""
    by_name = {normalize(name): reqs for name, reqs in EXTRAS.items()}
    wanted, seen, out = [normalize(e) for e in extras], set(), {}
    requirements = list(PROJECT["dependencies"]) if with_base else []
    while True:
        for requirement in requirements:
            name, sub_extras, spec = parse(requirement)
            if name == SELF:
                wanted += sub_extras
            else:
                out.setdefault(name, []).append(spec)
        wanted = [e for e in wanted if e not in seen]
        if not wanted:
            return out
        extra = wanted.pop(0)
        seen.add(extra)
        assert extra in by_name, f"no extra {extra!r} in pyproject.toml"
        requirements = by_name[extra]


# What PyPI's metadata says of the packages that decide which ONNX Runtime gets installed (read
# with `pip install --dry-run --no-deps --report`): onnxruntime-genai 0.9.2 and 0.18.0 require
# onnxruntime (the CPU build); onnxruntime-genai-cuda 0.9.2 and 0.18.0 require onnxruntime-gpu.
KNOWN_DEPENDENCIES = {"onnxruntime-genai": {"onnxruntime"}, "onnxruntime-genai-cuda": {"onnxruntime-gpu"}}


def names(extras) -> set:
    found = set(install_set(extras))
    for name in list(found):
        found |= KNOWN_DEPENDENCIES.get(name, set())
    return found


def test_the_resolver_follows_the_projects_own_extras():
    assert "torch" in names(["export"])  # through ftz-edge[train]
    assert {"torch", "onnx", "gradio", "pytest", "onnxruntime"} <= names(["dev"])
    assert "tensorrt-cu12" in names(["gpu"])  # through ftz-edge[trt-cu12]
    assert {"numpy", "tokenizers"} <= names([])  # the base install


def test_the_base_install_has_no_onnxruntime():
    assert not names([]) & (CPU_BUILDS | GPU_BUILDS)


def test_runtime_alone_is_the_cpu_build():
    found = names(["runtime"])
    assert "onnxruntime" in found and not found & GPU_BUILDS


@pytest.mark.parametrize("extras", [["gpu"], ["gpu", "demo"], ["gpu", "serve"], ["gpu", "demo", "serve"],
                                    ["gpu", "demo", "serve", "eval"]])
def test_the_gpu_install_set_is_onnxruntime_gpu_only(extras):
    found = names(extras)
    assert "onnxruntime-gpu" in found
    assert not found & CPU_BUILDS, f"{extras} would install {found & CPU_BUILDS} beside onnxruntime-gpu"


def test_no_extra_alone_brings_both_builds():
    for extra in EXTRAS:
        found = names([extra])
        assert not ({"onnxruntime", "onnxruntime-gpu"} <= found), extra


def test_demo_and_serve_bring_no_onnxruntime_of_their_own():
    """So they combine with `gpu` (desktop), `runtime` (CPU) or a Jetson's onnxruntime-gpu alike."""
    for extra in ("demo", "serve"):
        assert not names([extra]) & (CPU_BUILDS | GPU_BUILDS), extra


@pytest.mark.parametrize("extra", ["runtime", "export", "bench", "dev"])
def test_the_extras_that_bring_the_cpu_build_are_the_documented_ones(extra):
    """These must not be combined with `gpu`; pyproject.toml's comment and docs/desktop-gpu.md say so."""
    assert "onnxruntime" in names([extra])
    assert "onnxruntime" in names(["gpu", extra]) and "onnxruntime-gpu" in names(["gpu", extra])
    doc = (ROOT / "docs" / "desktop-gpu.md").read_text()
    assert f"`{extra}`" in doc


def test_gpu_pins_the_cuda_12_builds():
    """onnxruntime-gpu >= 1.27 on PyPI is built for CUDA 13 (nvidia-cuda-runtime~=13.0 in its
    metadata; 1.26.0 asks for nvidia-cuda-runtime-cu12); ONNX Runtime's TensorRT provider loads
    libnvinfer.so.10, which TensorRT 11 no longer is; cuda-python 13 needs a CUDA 13 driver."""
    found = install_set(["gpu"])
    assert any("<1.27" in spec for spec in found["onnxruntime-gpu"]), found["onnxruntime-gpu"]
    assert any("<11" in spec for spec in found["tensorrt-cu12"]), found["tensorrt-cu12"]
    assert any("<13" in spec for spec in found["cuda-python"]), found["cuda-python"]
    assert "tensorrt" not in found  # the metapackage now resolves to tensorrt-cu13 (TensorRT 11, CUDA 13)
    gpu_line = next(r for r in EXTRAS["gpu"] if parse(r)[0] == "onnxruntime-gpu")
    assert set(parse(gpu_line)[1]) == {"cuda", "cudnn"}  # CUDA 12 and cuDNN 9 as pip packages


PIP_EXTRAS = re.compile(r"pip install [^\n]*?(?:ftz-edge|\.)\[([^\]]+)\]")


def test_the_desktop_gpu_guide_installs_only_gpu_sets():
    """Every `pip install ... [extras]` in docs/desktop-gpu.md that asks for `gpu` is GPU-only, and
    every one that asks for the CPU build does not ask for `gpu`."""
    doc = (ROOT / "docs" / "desktop-gpu.md").read_text()
    commands = PIP_EXTRAS.findall(doc)
    assert any("gpu" in [e.strip() for e in c.split(",")] for c in commands), commands
    for command in commands:
        extras = [e.strip() for e in command.split(",")]
        found = names(extras)
        assert not ({"onnxruntime", "onnxruntime-gpu"} <= found), f"docs/desktop-gpu.md installs both builds: {extras}"


def test_the_runtime_preloads_pip_installed_gpu_libraries_only_for_gpu_providers(monkeypatch):
    """onnxruntime.preload_dlls (1.21+) finds the nvidia-* wheels' libraries; CPU sessions skip it."""
    import onnxruntime

    from ftz_edge.runtime import device

    calls = []
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: calls.append("preloaded"), raising=False)
    device.preload_gpu_libraries(["CPUExecutionProvider"])
    assert calls == []
    device.preload_gpu_libraries(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert calls == ["preloaded"]

    def broken():
        raise OSError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(onnxruntime, "preload_dlls", broken)
    device.preload_gpu_libraries(["TensorrtExecutionProvider"])  # never raises: the session reports it
