"""ftz_edge.export.tensorrt and the runtime's TensorRTVision, against fakes as strict as TensorRT's API.

The real TensorRT cannot run here (no GPU, no installable wheel). tests/fakes_tensorrt.py fakes
TensorRT and cuda-python the way their documentation describes them (bad profiles, foreign timing
caches and engines refused; device memory, copy directions and frees checked), and its engines
compute by running their ONNX on onnxruntime, so an engine's output can be checked for real.
"""

import hashlib
import json
import logging
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fakes_tensorrt import FakeTensorRT, install, write_vision_onnx
from ftz_edge.export import tensorrt as T

SHAPES = {"anchor_pixels": (3, 336, 336), "augmenter_pixels": (3, 224, 224)}
SMALL = {"anchor_pixels": (3, 16, 16), "augmenter_pixels": (3, 8, 8)}  # for engines that run
GPU = {"name": "Orin (nvgpu)", "compute_capability": "8.7", "total_memory": 7 << 30, "source": "cuda-python"}


def make_spec(tmp_path, **kw):
    onnx = tmp_path / "vision.onnx"
    if not onnx.exists():
        write_vision_onnx(onnx, SHAPES)
    args = dict(onnx_path=onnx, engine_path=tmp_path / "out" / "vision.engine", precision="fp16",
                input_shapes=dict(SHAPES), batch_min=1, batch_opt=2, batch_max=8, workspace_bytes=1 << 30)
    args.update(kw)
    return T.EngineBuildSpec(**args)


# ---------------------------------------------------------------- spec and profile (pure Python)

@pytest.mark.parametrize("kw, message", [
    (dict(batch_min=0), "1 <= min <= opt <= max"),
    (dict(batch_min=4, batch_opt=2), "min=4 opt=2 max=8"),
    (dict(batch_opt=9, batch_max=8), "opt=9 max=8"),
    (dict(precision="bf16"), "precision must be one of fp32, fp16, int8, got 'bf16'"),
    (dict(input_shapes={}), "input_shapes is empty"),
    (dict(input_shapes={"x": (1, 3, 224, 224)}), "input 'x': shape must be (C, H, W)"),
    (dict(input_shapes={"x": (3, 0, 224)}), "input 'x': shape must be (C, H, W)"),
    (dict(workspace_bytes=0), "workspace_bytes must be positive"),
])
def test_spec_validation(tmp_path, kw, message):
    with pytest.raises(ValueError) as err:
        make_spec(tmp_path, **kw)
    assert message in str(err.value)


def test_spec_defaults_and_paths(tmp_path):
    spec = T.EngineBuildSpec(onnx_path=str(tmp_path / "a.onnx"), engine_path=str(tmp_path / "a.engine"),
                             precision="int8", input_shapes={"x": (3, 8, 8)}, timing_cache_path=str(tmp_path / "t"))
    assert (spec.batch_min, spec.batch_opt, spec.batch_max, spec.workspace_bytes) == (1, 1, 8, 2 << 30)
    assert isinstance(spec.onnx_path, Path) and isinstance(spec.timing_cache_path, Path)


def test_profile_shapes(tmp_path):
    shapes = T.profile_shapes(make_spec(tmp_path, batch_min=1, batch_opt=4, batch_max=16))
    assert shapes == {
        "anchor_pixels": ((1, 3, 336, 336), (4, 3, 336, 336), (16, 3, 336, 336)),
        "augmenter_pixels": ((1, 3, 224, 224), (4, 3, 224, 224), (16, 3, 224, 224)),
    }


def test_record_path():
    assert T.record_path(Path("b/vision.engine")) == Path("b/vision.engine.json")


# ---------------------------------------------------------------- pick_engine, devices, compatibility

def test_importing_the_module_does_not_import_tensorrt():
    import subprocess
    code = "import sys, ftz_edge.export.tensorrt; print('tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pick_engine_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where it exists
    assert not T.tensorrt_available()
    engine, reason = T.pick_engine("auto")
    assert engine == "onnx"
    assert "TensorRT Python bindings are not importable" in reason
    assert T.pick_engine("onnx") == ("onnx", "requested")
    with pytest.raises(T.TensorRTUnavailable) as err:
        T.pick_engine("trt")
    message = str(err.value)
    assert isinstance(err.value, RuntimeError) and "\n" not in message
    for hint in ("not importable", "python3-libnvinfer", "--system-site-packages",
                 "pip install tensorrt --extra-index-url https://pypi.nvidia.com", "--engine onnx"):
        assert hint in message
    with pytest.raises(ValueError, match="auto, onnx or trt"):
        T.pick_engine("tensorrt")


def test_pick_engine_with_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.3.0"))
    monkeypatch.setattr(T, "cuda_device", lambda: dict(GPU))
    monkeypatch.setattr(T, "cudart", lambda: types.ModuleType("cudart"))
    assert T.pick_engine("auto") == ("trt", "TensorRT 10.3.0 on Orin (nvgpu) (sm 8.7)")
    assert T.pick_engine("trt")[0] == "trt"
    # A GPU seen through nvidia-smi alone: an engine could be built, but never checked or run.
    monkeypatch.setattr(T, "cudart", lambda: None)
    engine, reason = T.pick_engine("auto")
    assert engine == "onnx" and reason.startswith("cuda-python is not installed")
    with pytest.raises(T.TensorRTUnavailable, match="cuda-python is not installed"):
        T.pick_engine("trt")
    monkeypatch.setattr(T, "cudart", lambda: types.ModuleType("cudart"))
    monkeypatch.setattr(T, "cuda_device", lambda: None)
    engine, reason = T.pick_engine("auto")
    assert engine == "onnx" and reason.startswith("no NVIDIA GPU found")
    with pytest.raises(T.TensorRTUnavailable, match="no NVIDIA GPU found"):
        T.pick_engine("trt")


def test_cuda_device_from_cuda_python(monkeypatch):
    class Props:
        name, major, minor, totalGlobalMem = b"NVIDIA H100 80GB HBM3\x00\x00", 9, 0, 85 << 30

    success = object()
    runtime = types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=success),
        cudaGetDeviceCount=lambda: (success, 1),
        cudaGetDeviceProperties=lambda index: (success, Props()) if index == 0 else (None, None),
    )
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    assert T.cuda_device() == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                               "total_memory": 85 << 30, "source": "cuda-python"}
    runtime.cudaGetDeviceCount = lambda: (success, 0)  # driver present, no GPU: falls through to nvidia-smi
    monkeypatch.setenv("PATH", "")
    assert T.cuda_device() is None

    def no_driver():
        raise RuntimeError("libcuda.so.1: cannot open shared object file")

    runtime.cudaGetDeviceCount = no_driver
    assert T.cuda_device() is None


def _fake_smi(tmp_path, monkeypatch, line, rc=0):
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir(exist_ok=True)
    script.write_text(f"#!/bin/sh\necho '{line}'\nexit {rc}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(script.parent))
    monkeypatch.setitem(sys.modules, "cuda", None)  # no cuda-python: the nvidia-smi path is taken


def test_cuda_device_from_nvidia_smi(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "NVIDIA GeForce RTX 4090, 8.9, 24564 MiB")
    assert T.cuda_device() == {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9",
                               "total_memory": 24564 << 20, "source": "nvidia-smi"}
    _fake_smi(tmp_path, monkeypatch, "Orin (nvgpu), [N/A], [N/A]")  # what Jetson may print
    assert T.cuda_device() == {"name": "Orin (nvgpu)", "compute_capability": None, "total_memory": None,
                               "source": "nvidia-smi"}
    _fake_smi(tmp_path, monkeypatch, "NVIDIA-SMI has failed", rc=9)
    assert T.cuda_device() is None


def test_cuda_device_without_anything(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setenv("PATH", "")
    assert T.cuda_device() is None


RECORD = {"tensorrt_version": "10.3.0", "compute_capability": "8.7", "gpu_name": "Orin (nvgpu)"}


def test_engine_compatible():
    ok, reason = T.engine_compatible(RECORD, GPU, "10.3.0")
    assert ok and reason == "same compute capability 8.7 and TensorRT 10.3.0"
    ok, reason = T.engine_compatible(RECORD, {**GPU, "name": "Orin NX"}, "10.3.0")
    assert ok and "tuned on Orin (nvgpu)" in reason
    ok, reason = T.engine_compatible(RECORD, {**GPU, "compute_capability": "11.0", "name": "Thor"}, "10.3.0")
    assert not ok and "compute capability 8.7 (Orin (nvgpu)), this GPU is 11.0 (Thor)" in reason
    assert "TensorRT" not in reason.split(":")[0]
    ok, reason = T.engine_compatible(RECORD, GPU, "10.16.1")
    assert not ok and "built with TensorRT 10.3.0, this machine has 10.16.1" in reason
    assert "compute capability" not in reason
    ok, reason = T.engine_compatible(RECORD, {**GPU, "compute_capability": "9.0"}, "11.0.0")
    assert not ok and "compute capability" in reason and "TensorRT 10.3.0" in reason
    assert T.engine_compatible(RECORD, GPU, None) == (False, "TensorRT is not installed here")
    assert T.engine_compatible(RECORD, None, "10.3.0") == (False, "no NVIDIA GPU found")


# ---------------------------------------------------------------- the builder, against a fake tensorrt

@pytest.fixture
def fake_trt(monkeypatch):
    trt, _ = install(monkeypatch, "10.3.0")
    return trt


def profile_of(config):
    return {name: tuple(tuple(d) for d in dims) for name, dims in config.profiles[0].shapes.items()}


def test_network_flags():
    assert T.network_flags(FakeTensorRT("10.3.0")) == 1 << 1  # STRONGLY_TYPED only, not EXPLICIT_BATCH (bit 0)
    assert T.network_flags(FakeTensorRT("11.0.0")) == 1 << 0
    bare = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())
    assert T.network_flags(bare) == 0  # a future TensorRT without the (always-on) flag


def test_build_engine_call_sequence(tmp_path, fake_trt):
    cache = tmp_path / "cache" / "timing.cache"
    cache.parent.mkdir()
    cache.write_bytes(fake_trt.cache_blob(entries=3))  # a cache an earlier build on this GPU wrote
    spec = make_spec(tmp_path, timing_cache_path=cache)
    record = T.build_engine(spec)

    builder = fake_trt.builder
    assert builder.network.flags == 1 << 1  # strongly typed: precision comes from the ONNX
    assert builder.config.flags == []  # no FP16 / INT8 / BF16 builder flags, ever
    assert ("parse_from_file", str(spec.onnx_path)) in fake_trt.calls and "parse" not in fake_trt.names()
    assert ("set_memory_pool_limit", "WORKSPACE", 1 << 30) in fake_trt.calls
    assert len(builder.config.profiles) == 1
    assert profile_of(builder.config) == {
        "anchor_pixels": ((1, 3, 336, 336), (2, 3, 336, 336), (8, 3, 336, 336)),
        "augmenter_pixels": ((1, 3, 224, 224), (2, 3, 224, 224), (8, 3, 224, 224)),
    }
    # the cache on disk is loaded before the build and its grown version written back after it
    names = fake_trt.names()
    assert names.index("create_timing_cache") < names.index("build_serialized_network")
    assert ("create_timing_cache", fake_trt.cache_blob(entries=3)) in fake_trt.calls
    assert ("set_timing_cache", "Orin (nvgpu)", 3, False) in fake_trt.calls  # never ignore_mismatch=True
    assert ("build_serialized_network", True, True) in fake_trt.calls
    assert cache.read_bytes() == fake_trt.cache_blob(entries=4)

    engine = tmp_path / "out" / "vision.engine"
    data = engine.read_bytes()
    assert fake_trt.Runtime(None).deserialize_cuda_engine(data) is not None  # a real (fake) engine, not a stub
    assert sorted(p.name for p in engine.parent.iterdir()) == ["vision.engine", "vision.engine.json"]  # no temp files
    on_disk = json.loads((tmp_path / "out" / "vision.engine.json").read_text())
    assert on_disk == record.to_dict()
    assert on_disk["engine_sha256"] == hashlib.sha256(data).hexdigest()
    assert on_disk["engine_bytes"] == len(data)
    assert on_disk["onnx_sha256"] == hashlib.sha256(spec.onnx_path.read_bytes()).hexdigest()
    assert (on_disk["tensorrt_version"], on_disk["gpu_name"], on_disk["compute_capability"]) == ("10.3.0", "Orin (nvgpu)", "8.7")
    assert on_disk["precision"] == "fp16" and on_disk["workspace_bytes"] == 1 << 30
    assert on_disk["profile_shapes"]["augmenter_pixels"] == {"min": [1, 3, 224, 224], "opt": [2, 3, 224, 224],
                                                             "max": [8, 3, 224, 224]}
    assert on_disk["timing_cache"] == str(cache) and on_disk["timing_cache_reused"] is True
    assert on_disk["built_at"].endswith("+00:00")
    assert T.engine_compatible(on_disk, GPU, "10.3.0")[0]


def test_build_engine_starts_a_timing_cache(tmp_path, fake_trt):
    cache = tmp_path / "timing.cache"
    record = T.build_engine(make_spec(tmp_path, timing_cache_path=cache))
    assert ("create_timing_cache", b"") in fake_trt.calls
    assert cache.read_bytes() == fake_trt.cache_blob(entries=1)
    assert record.timing_cache_reused is False
    # the second build feeds the first one's cache back in
    fake_trt.calls.clear()
    assert T.build_engine(make_spec(tmp_path, timing_cache_path=cache)).timing_cache_reused is True
    assert ("set_timing_cache", "Orin (nvgpu)", 1, False) in fake_trt.calls
    assert cache.read_bytes() == fake_trt.cache_blob(entries=2)


def test_build_engine_refused_cache_starts_fresh(tmp_path, fake_trt, caplog):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(fake_trt.cache_blob(gpu="NVIDIA H100 80GB HBM3"))
    with caplog.at_level(logging.WARNING, logger="ftz_edge.export.tensorrt"):
        record = T.build_engine(make_spec(tmp_path, timing_cache_path=cache))
    assert ("set_timing_cache", "NVIDIA H100 80GB HBM3", 3, False) in fake_trt.calls  # never ignore_mismatch=True
    assert ("set_timing_cache", "Orin (nvgpu)", 0, False) in fake_trt.calls
    assert record.timing_cache_reused is False and cache.read_bytes() == fake_trt.cache_blob(entries=1)
    assert "another GPU" in caplog.text and "starting a fresh one" in caplog.text


@pytest.mark.parametrize("blob, why", [
    (FakeTensorRT("10.16.1").cache_blob(gpu="Orin (nvgpu)"), "another version"),  # create_timing_cache -> None
    (b"old-timings", "damaged"),
])
def test_build_engine_unreadable_cache_starts_fresh(tmp_path, fake_trt, caplog, blob, why):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(blob)
    with caplog.at_level(logging.WARNING, logger="ftz_edge.export.tensorrt"):
        record = T.build_engine(make_spec(tmp_path, timing_cache_path=cache))
    assert ("create_timing_cache", blob) in fake_trt.calls and ("create_timing_cache", b"") in fake_trt.calls
    assert record.timing_cache_reused is False and cache.read_bytes() == fake_trt.cache_blob(entries=1)
    assert "not readable by TensorRT 10.3.0" in caplog.text and why in caplog.text


def test_build_engine_without_timing_cache(tmp_path, fake_trt):
    record = T.build_engine(make_spec(tmp_path))
    assert "create_timing_cache" not in fake_trt.names()
    assert record.timing_cache is None and record.timing_cache_reused is False


def test_build_engine_on_tensorrt_11(tmp_path, monkeypatch):
    fake, _ = install(monkeypatch, "11.2.0")
    monkeypatch.setattr(T, "cuda_device", lambda: None)
    record = T.build_engine(make_spec(tmp_path, precision="int8"))
    assert not hasattr(fake, "BuilderFlag") and fake.builder.network.flags == 1
    assert (record.tensorrt_version, record.gpu_name, record.precision) == ("11.2.0", None, "int8")


def test_build_from_an_onnx_with_external_weights(tmp_path, fake_trt):
    onnx_path = write_vision_onnx(tmp_path / "big" / "vision.onnx", SHAPES, external_data=True)
    assert (tmp_path / "big" / "vision.onnx.data").is_file()
    T.build_engine(make_spec(tmp_path, onnx_path=onnx_path))
    assert ("parse_from_file", str(onnx_path)) in fake_trt.calls and "parse" not in fake_trt.names()
    # The same graph as bytes, without its path, cannot reach its weights: the path is what makes it work.
    parser = fake_trt.OnnxParser(fake_trt.Builder(None).create_network(0), None)
    assert not parser.parse(onnx_path.read_bytes())
    assert "without the model's path" in str(parser.get_error(0))


def test_parser_errors_are_listed(tmp_path, fake_trt):
    onnx_path = write_vision_onnx(tmp_path / "vision.onnx", SHAPES, external_data=True)
    (tmp_path / "vision.onnx.data").unlink()  # the weights file did not come along
    with pytest.raises(T.EngineBuildError) as err:
        T.build_engine(make_spec(tmp_path, onnx_path=onnx_path))
    message = str(err.value)
    assert "could not parse" in message and str(tmp_path / "vision.onnx") in message
    assert "W: failed to open external weights file" in message and " | shape: failed to open" in message
    assert "\n" not in message
    assert "build_serialized_network" not in fake_trt.names()
    assert not (tmp_path / "out").exists()


def test_no_engine_from_the_builder(tmp_path, fake_trt):
    fake_trt.build_fails = True
    cache = tmp_path / "timing.cache"
    with pytest.raises(T.EngineBuildError) as err:
        T.build_engine(make_spec(tmp_path, timing_cache_path=cache))
    assert "build_serialized_network returned None" in str(err.value)
    assert "1024 MiB" in str(err.value)
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []  # no engine, no record, no temp file
    assert not cache.exists()


def test_spec_must_match_the_onnx(tmp_path, fake_trt):
    write_vision_onnx(tmp_path / "other.onnx", {"pixel_values": (3, 336, 336)})
    with pytest.raises(T.EngineBuildError, match=r"ONNX inputs \['pixel_values'\] != spec inputs"):
        T.build_engine(make_spec(tmp_path, onnx_path=tmp_path / "other.onnx"))
    write_vision_onnx(tmp_path / "448.onnx", {"anchor_pixels": (3, 336, 336), "augmenter_pixels": (3, 448, 448)})
    with pytest.raises(T.EngineBuildError, match=r"'augmenter_pixels' is \(-1, 3, 448, 448\)"):
        T.build_engine(make_spec(tmp_path, onnx_path=tmp_path / "448.onnx"))
    fixed = write_vision_onnx(tmp_path / "fixed.onnx", SHAPES)
    import onnx

    model = onnx.load(str(fixed))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 2  # a static batch of 2
    onnx.save(model, str(fixed))
    with pytest.raises(T.EngineBuildError, match="fixed batch of 2"):
        T.build_engine(make_spec(tmp_path, onnx_path=fixed))
    T.build_engine(make_spec(tmp_path, onnx_path=fixed, batch_min=2, batch_opt=2, batch_max=2))  # a static batch that matches
    assert "build_serialized_network" in fake_trt.names()


def test_a_refused_profile_is_an_engine_build_error(tmp_path, fake_trt, monkeypatch):
    spec = make_spec(tmp_path)
    real = T.profile_shapes
    # min > max: TensorRT's bindings raise RuntimeError from set_shape
    monkeypatch.setattr(T, "profile_shapes", lambda s: {n: (hi, opt, lo) for n, (lo, opt, hi) in real(s).items()})
    with pytest.raises(T.EngineBuildError, match=r"refused the profile of input 'anchor_pixels' .*inconsistent"):
        T.build_engine(spec)
    # a profile TensorRT finds invalid as a whole: add_optimization_profile returns -1
    monkeypatch.setattr(T, "profile_shapes", lambda s: {})
    monkeypatch.setattr(T, "_check_inputs", lambda network, s: None)
    with pytest.raises(T.EngineBuildError, match="add_optimization_profile returned -1"):
        T.build_engine(spec)
    assert "build_serialized_network" not in fake_trt.names()
    assert not (tmp_path / "out").exists()


def test_the_fake_builder_is_as_strict_as_tensorrt(tmp_path, fake_trt):
    """The fakes must refuse what TensorRT refuses, or the tests above prove nothing."""
    builder = fake_trt.Builder(None)
    profile = builder.create_optimization_profile()
    with pytest.raises(RuntimeError, match="opt is inconsistent"):
        profile.set_shape("x", (2, 3), (1, 3), (4, 3))
    with pytest.raises(RuntimeError, match="inconsistent"):
        profile.set_shape("x", (1, 3), (1, 3, 1), (4, 3))
    with pytest.raises(TypeError):
        profile.set_shape("x", np.array([1, 3]), (1, 3), (4, 3))
    profile.set_shape("x", fake_trt.Dims([1, 3]), [2, 3], (4, 3))  # Dims, lists and tuples, as pybind11 takes them
    config = builder.create_builder_config()
    assert config.add_optimization_profile(builder.create_optimization_profile()) == -1  # empty
    assert config.create_timing_cache(b"not a cache") is None
    assert config.create_timing_cache(FakeTensorRT("10.16.1").cache_blob()) is None
    assert config.set_timing_cache(config.create_timing_cache(fake_trt.cache_blob(gpu="Thor")), False) is False

    network = builder.create_network(0)
    parser = fake_trt.OnnxParser(network, None)
    assert parser.parse_from_file(str(write_vision_onnx(tmp_path / "v.onnx", SHAPES)))
    assert tuple(network.get_input(0).shape) == (-1, 3, 336, 336)
    for shapes, problem in [({}, "no optimization profile"),
                            ({"anchor_pixels": [(1, 3, 336, 336)] * 3}, "augmenter_pixels: dynamic input is missing"),
                            ({**{n: [(1, *c)] * 3 for n, c in SHAPES.items()}, "ghost": [(1, 3)] * 3}, "'ghost'"),
                            ({n: [(1, 3, 8, 8)] * 3 for n in SHAPES}, "does not match the network")]:
        config = builder.create_builder_config()
        if shapes:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            assert config.add_optimization_profile(profile) == 0
        assert builder.build_serialized_network(network, config) is None
        assert problem in fake_trt.log[-1][1], (problem, fake_trt.log[-1])


def test_build_engine_refusals(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(T.TensorRTUnavailable, match="python3-libnvinfer"):
        T.build_engine(make_spec(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("8.6.1"))
    with pytest.raises(T.TensorRTUnavailable, match="8.6.1 is too old"):
        T.build_engine(make_spec(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.3.0"))
    with pytest.raises(FileNotFoundError, match="no ONNX at"):
        T.build_engine(make_spec(tmp_path, onnx_path=tmp_path / "missing.onnx"))


# ---------------------------------------------------------------- the runtime's TensorRTVision, against fakes

def small_engine(tmp_path, batch_min=1, batch_opt=1, batch_max=2, tokens=4, width=8, name="vision"):
    """An engine the fake builder made from a tiny vision ONNX (its path, the ONNX's path)."""
    onnx_path = write_vision_onnx(tmp_path / f"{name}.onnx", SMALL, tokens, width)
    spec = T.EngineBuildSpec(onnx_path=onnx_path, engine_path=tmp_path / f"{name}.engine", precision="fp32",
                             input_shapes=SMALL, batch_min=batch_min, batch_opt=batch_opt, batch_max=batch_max)
    T.build_engine(spec)
    return spec.engine_path, onnx_path


def pixels(count, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((count, *chw)).astype(np.float32) for name, chw in SMALL.items()}


def onnxruntime_of(onnx_path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_tensorrt_vision_runs_the_engine(tmp_path, monkeypatch):
    from ftz_edge.runtime.vision import TensorRTVision

    trt, cuda = install(monkeypatch)
    engine_path, onnx_path = small_engine(tmp_path, batch_max=4)
    vision = TensorRTVision(engine_path)
    assert (vision.batch_min, vision.batch_max, vision.num_tokens, vision.output_name) == (1, 4, 4, "image_embeds")
    feeds = pixels(3)
    out = vision(feeds)
    np.testing.assert_allclose(out, onnxruntime_of(onnx_path, feeds), rtol=1e-5, atol=1e-6)
    assert out.dtype == np.float32 and out.shape == (3, 4, 8)
    # each input copied host -> device, the output device -> host, and nothing else
    nbytes = {n: a.nbytes for n, a in feeds.items()}
    assert cuda.copies() == [("HostToDevice", nbytes["anchor_pixels"]), ("HostToDevice", nbytes["augmenter_pixels"]),
                             ("DeviceToHost", out.nbytes)]
    mallocs = [entry[1] for entry in cuda.log if entry[0] == "malloc"]
    assert len(mallocs) == 3 and cuda.live == []  # every buffer freed after the call
    assert [entry[1] for entry in cuda.log if entry[0] == "free"] == mallocs
    assert len(cuda.streams) == 1
    vision.close()
    assert cuda.streams == {}


def test_tensorrt_vision_splits_batches_over_the_profile(tmp_path, monkeypatch):
    """More images than the profile's batch_max run in chunks; set_input_shape's refusal is never ignored."""
    from ftz_edge.runtime.vision import TensorRTVision

    trt, cuda = install(monkeypatch)
    engine_path, onnx_path = small_engine(tmp_path, batch_max=2)
    vision = TensorRTVision(engine_path)
    feeds = pixels(5)
    out = vision(feeds)
    np.testing.assert_allclose(out, onnxruntime_of(onnx_path, feeds), rtol=1e-5, atol=1e-6)
    batches = [dims[0] for name, dims in vision.context.input_shapes_set if name == "anchor_pixels"]
    assert batches == [2, 2, 1] and cuda.live == []


def test_tensorrt_vision_pads_to_a_fixed_batch(tmp_path, monkeypatch):
    from ftz_edge.runtime.vision import TensorRTVision

    install(monkeypatch)
    engine_path, onnx_path = small_engine(tmp_path, batch_min=2, batch_opt=2, batch_max=2)
    vision = TensorRTVision(engine_path)
    feeds = pixels(3)
    out = vision(feeds)
    assert out.shape == (3, 4, 8)
    np.testing.assert_allclose(out, onnxruntime_of(onnx_path, feeds), rtol=1e-5, atol=1e-6)
    assert [dims[0] for name, dims in vision.context.input_shapes_set if name == "anchor_pixels"] == [2, 2]


@pytest.mark.parametrize("failure, message", [
    ("malloc 1", "cudaErrorMemoryAllocation"),  # the first input's buffer
    ("malloc 3", "cudaErrorMemoryAllocation"),  # the output's, after both inputs were copied
    ("execute", "execute_async_v3 failed"),
    ("image size", "refused input 'augmenter_pixels' of shape (1, 3, 9, 9)"),
])
def test_tensorrt_vision_frees_device_memory_on_error(tmp_path, monkeypatch, failure, message):
    from ftz_edge.runtime.vision import TensorRTVision

    trt, cuda = install(monkeypatch)
    vision = TensorRTVision(small_engine(tmp_path)[0])
    feeds = pixels(1)
    if failure.startswith("malloc"):
        cuda.fail_malloc_at = cuda.mallocs + int(failure.split()[1])
    elif failure == "execute":
        trt.execute_fails = True
    else:
        feeds["augmenter_pixels"] = np.zeros((1, 3, 9, 9), np.float32)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        vision(feeds)
    assert cuda.live == [] and not any(entry[0] == "bad free" for entry in cuda.log)
    trt.execute_fails, cuda.fail_malloc_at = False, None
    assert vision(pixels(1)).shape == (1, 4, 8)  # the engine still works after the error


def test_tensorrt_vision_refuses_foreign_engines(tmp_path, monkeypatch):
    from ftz_edge.runtime.vision import TensorRTVision

    install(monkeypatch)
    zeros = tmp_path / "zeros.engine"
    zeros.write_bytes(b"\0" * 4096)
    with pytest.raises(RuntimeError, match="could not deserialize"):
        TensorRTVision(zeros)
    engine_path, _ = small_engine(tmp_path)
    install(monkeypatch, "10.16.1")  # the same file on a machine with another TensorRT
    with pytest.raises(RuntimeError, match="another GPU or TensorRT version"):
        TensorRTVision(engine_path)
    monkeypatch.setitem(sys.modules, "cuda", None)  # TensorRT without cuda-python
    for name in ("cuda.bindings", "cuda.bindings.runtime"):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match="cuda-python"):
        TensorRTVision(engine_path)


# ---------------------------------------------------------------- check_engine: the built engine against onnxruntime

def test_check_engine_passes_a_right_engine_and_fails_a_wrong_one(tmp_path, monkeypatch):
    trt, cuda = install(monkeypatch)
    engine_path, onnx_path = small_engine(tmp_path, batch_max=2)
    row = T.check_engine(engine_path, onnx_path, pixels(5), "fp16", target=0.999)
    assert row["ok"] is True and row["cosine"] > 0.99999 and row["max_abs"] < 1e-4
    assert (row["precision"], row["batch"], row["target"]) == ("fp16", 5, 0.999)
    assert "TensorRT engine" in row["evaluated"] and "<= 2" in row["evaluated"]
    assert cuda.live == [] and cuda.streams == {}  # the engine's memory and stream released
    assert T.check_engine(engine_path, onnx_path, pixels(2), "fp16")["ok"] is None  # no target: reported only

    trt.output_scale = -1.0  # an engine that computes something else (TensorRT 10.3's wrong FP16 ViTs)
    wrong, _ = small_engine(tmp_path, batch_max=2, name="wrong")
    row = T.check_engine(wrong, onnx_path, pixels(3), "fp16", target=0.999)
    assert row["ok"] is False and row["cosine"] < -0.99


def test_check_engine_refuses_an_engine_that_does_not_load(tmp_path, monkeypatch):
    install(monkeypatch)
    _, onnx_path = small_engine(tmp_path)
    zeros = tmp_path / "zeros.engine"
    zeros.write_bytes(b"\0" * 4096)
    with pytest.raises(T.EngineBuildError, match="does not load: TensorRT could not deserialize"):
        T.check_engine(zeros, onnx_path, pixels(1), "fp16", target=0.999)
    other_tokens, _ = small_engine(tmp_path, tokens=5, name="other")
    with pytest.raises(T.EngineBuildError, match=r"outputs \(1, 5, 8\), onnxruntime \(1, 4, 8\)"):
        T.check_engine(other_tokens, onnx_path, pixels(1), "fp16")


# ---------------------------------------------------------------- the real TensorRT, where there is one

def test_real_tensorrt_builds_a_tiny_engine(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here: it needs an NVIDIA GPU and "
                                                 "NVIDIA's packages (apt python3-libnvinfer or pypi.nvidia.com)")
    import onnx
    from onnx import TensorProto, helper

    if T.cuda_device() is None:
        pytest.skip("TensorRT is installed but no NVIDIA GPU was found")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "tiny.onnx"))
    spec = T.EngineBuildSpec(onnx_path=tmp_path / "tiny.onnx", engine_path=tmp_path / "tiny.engine", precision="fp32",
                             input_shapes={"x": (3, 8, 8)}, batch_max=4, workspace_bytes=64 << 20,
                             timing_cache_path=tmp_path / "timing.cache")
    record = T.build_engine(spec)
    assert record.tensorrt_version == trt.__version__
    assert (tmp_path / "timing.cache").stat().st_size > 0
    io = {t["name"]: t for t in T.inspect_engine(spec.engine_path)}
    assert io["x"]["mode"] == "input" and io["y"]["mode"] == "output"
    assert io["x"]["shape"] == (-1, 3, 8, 8)
    assert T.engine_compatible(record.to_dict(), T.cuda_device(), trt.__version__)[0]
    # the runtime's TensorRTVision on the real engine: more images than the profile's batch_max of 4
    from ftz_edge.runtime.vision import TensorRTVision

    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    vision = TensorRTVision(spec.engine_path)
    try:
        assert vision.batch_max == 4
        np.testing.assert_allclose(vision({"x": x}), np.maximum(x, 0), rtol=1e-6, atol=1e-6)
    finally:
        vision.close()
    row = T.check_engine(spec.engine_path, spec.onnx_path, {"x": x}, "fp32", target=0.9999)
    assert row["ok"] and row["batch"] == 6


# -- ftz-export --engine trt, end to end on the fakes -----------------------------------------------


@pytest.mark.slow
def test_ftz_export_builds_checks_and_records_an_engine(tmp_path, monkeypatch, capsys):
    """The whole command with --engine trt: engine built from the bundle's ONNX, run against
    onnxruntime fp32 on the validation images, its row in validation.json, the engine and its
    build record in the manifest; a wrong engine is a warning, and an error under --strict."""
    from ftz_edge.export import bundle as B
    from ftz_edge.manifest import read_manifest

    trt, cuda = install(monkeypatch, gpu=dict(GPU))
    monkeypatch.setattr(T, "cuda_device", lambda: dict(GPU))
    out = tmp_path / "bundle"
    args = ["--engine", "trt", "--precision", "fp16", "--llm-precision", "fp32", "--validation-images", "2",
            "--batch-max", "2"]
    assert B.main(["--out", str(out), *args]) == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    assert manifest.vision.engine == "trt"
    assert manifest.vision.tensorrt.file == "vision/vision.engine" and (out / "vision" / "vision.engine").is_file()
    assert manifest.vision.tensorrt.record["workspace_bytes"] > 0  # the build record travels with the engine
    rows = [r for r in json.loads((out / "reports" / "validation.json").read_text())["vision"]
            if "TensorRT engine" in r["evaluated"]]
    assert len(rows) == 1 and rows[0]["ok"] is True and rows[0]["cosine"] > 0.999
    assert cuda.live == []  # the check released its device memory

    trt.output_scale = -1.0  # an engine that computes something else (TensorRT 10.3's wrong FP16 ViTs)
    wrong = tmp_path / "wrong"
    assert B.main(["--out", str(wrong), *args]) == 0
    assert "TensorRT engine: cosine" in capsys.readouterr().err
    assert json.loads((wrong / "reports" / "validation.json").read_text())["passed"] is False
    strict = tmp_path / "strict"
    assert B.main(["--out", str(strict), *args, "--strict"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ftz-export: error: validation targets missed (--strict)") and "TensorRT engine" in last
    assert not strict.exists()
