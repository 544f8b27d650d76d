"""ftz_edge.export.tensorrt: pure-Python parts, and the builder's call sequence against a fake ``tensorrt``.

The real TensorRT cannot run here (no GPU, no installable wheel); the fake records every call so the
tests check what would be asked of TensorRT: a strongly typed network, no precision builder flags,
one profile per spec, the workspace limit and a timing cache read from and written back to disk.
"""

import hashlib
import json
import stat
import sys
import types
from pathlib import Path

import pytest

from ftz_edge.export import tensorrt as T

SHAPES = {"anchor_pixels": (3, 336, 336), "augmenter_pixels": (3, 224, 224)}
GPU = {"name": "Orin (nvgpu)", "compute_capability": "8.7", "total_memory": 64 << 30, "source": "test"}


def make_spec(tmp_path, **kw):
    onnx = tmp_path / "vision.onnx"
    if not onnx.exists():
        onnx.write_bytes(b"not really onnx")
    args = dict(onnx_path=onnx, engine_path=tmp_path / "out" / "vision.engine", precision="fp16",
                input_shapes=dict(SHAPES), batch_min=1, batch_opt=2, batch_max=8, workspace_bytes=1 << 30)
    args.update(kw)
    return T.EngineBuildSpec(**args)


# ---------------------------------------------------------------- spec and profile (pure Python)

@pytest.mark.parametrize("kw, message", [
    (dict(batch_min=0), "1 <= min <= opt <= max"),
    (dict(batch_min=4, batch_opt=2), "min=4 opt=2 max=8"),
    (dict(batch_opt=9, batch_max=8), "opt=9 max=8"),
    (dict(precision="bf16"), "precision must be one of fp16, int8, fp32, not 'bf16'"),
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
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT("10.3.0"))
    monkeypatch.setattr(T, "cuda_device", lambda: dict(GPU))
    assert T.pick_engine("auto") == ("trt", "TensorRT 10.3.0 on Orin (nvgpu) (sm 8.7)")
    assert T.pick_engine("trt")[0] == "trt"
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

class FakeTRT(types.ModuleType):
    """Just the documented TensorRT Python API that build_engine uses; every call lands in ``calls``."""

    def __init__(self, version="10.3.0"):
        super().__init__("tensorrt")
        fake = self
        self.__version__ = version
        self.calls = []
        self.onnx_inputs = {name: (-1, *chw) for name, chw in SHAPES.items()}
        self.parse_errors = []
        self.engine_bytes = b"\x00ENGINE" * 10
        self.accept_cache = True
        major = int(version.split(".")[0])
        # TensorRT 10: EXPLICIT_BATCH = 0 (deprecated), STRONGLY_TYPED = 1; 11: STRONGLY_TYPED = 0, no EXPLICIT_BATCH
        self.NetworkDefinitionCreationFlag = (types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1) if major == 10
                                              else types.SimpleNamespace(STRONGLY_TYPED=0))
        if major == 10:  # still present (deprecated) in 10, removed in 11
            self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", BF16="BF16")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

        class Logger:
            WARNING = "WARNING"

            def __init__(self, severity):
                fake.calls.append(("Logger", severity))

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs = flags, []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, index):
                return self.inputs[index]

        class ParserError:
            def __init__(self, text):
                self.text = text

            def __str__(self):
                return self.text

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                if fake.parse_errors:
                    return False
                self.network.inputs = [Tensor(n, s) for n, s in fake.onnx_inputs.items()]
                return True

            @property
            def num_errors(self):
                return len(fake.parse_errors)

            def get_error(self, index):
                return ParserError(fake.parse_errors[index])

        class Cache:
            def __init__(self, blob):
                self.blob = bytes(blob)

            def serialize(self):
                return self.blob + b"+timings"

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, min, opt, max):
                fake.calls.append(("set_shape", name, min, opt, max))
                self.shapes[name] = (min, opt, max)

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.cache = [], [], None

            def set_flag(self, flag):
                self.flags.append(flag)

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, blob):
                fake.calls.append(("create_timing_cache", bytes(blob)))
                return Cache(blob)

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", cache.blob, ignore_mismatch))
                if cache.blob and not fake.accept_cache and not ignore_mismatch:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                fake.builder = self

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                self.network = Network(flags)
                return self.network

            def create_builder_config(self):
                self.config = Config()
                return self.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network", network is self.network, config is self.config))
                return None if fake.engine_bytes is None else bytearray(fake.engine_bytes)

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser

    def names(self):
        return [call[0] for call in self.calls]


@pytest.fixture
def fake_trt(monkeypatch):
    fake = FakeTRT("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(T, "cuda_device", lambda: dict(GPU))
    return fake


def test_network_flags():
    assert T.network_flags(FakeTRT("10.3.0")) == 1 << 1  # STRONGLY_TYPED only, not EXPLICIT_BATCH (bit 0)
    assert T.network_flags(FakeTRT("11.0.0")) == 1 << 0
    bare = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())
    assert T.network_flags(bare) == 0  # a future TensorRT without the (always-on) flag


def test_build_engine_call_sequence(tmp_path, fake_trt):
    cache = tmp_path / "cache" / "timing.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"old-timings")
    spec = make_spec(tmp_path, timing_cache_path=cache)
    record = T.build_engine(spec)

    builder = fake_trt.builder
    assert builder.network.flags == 1 << 1  # strongly typed: precision comes from the ONNX
    assert builder.config.flags == []  # no FP16 / INT8 / BF16 builder flags, ever
    assert ("parse_from_file", str(spec.onnx_path)) in fake_trt.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 1 << 30) in fake_trt.calls
    assert len(builder.config.profiles) == 1
    assert builder.config.profiles[0].shapes == {
        "anchor_pixels": ((1, 3, 336, 336), (2, 3, 336, 336), (8, 3, 336, 336)),
        "augmenter_pixels": ((1, 3, 224, 224), (2, 3, 224, 224), (8, 3, 224, 224)),
    }
    # the cache on disk is loaded before the build and its grown version written back after it
    names = fake_trt.names()
    assert names.index("create_timing_cache") < names.index("build_serialized_network")
    assert ("create_timing_cache", b"old-timings") in fake_trt.calls
    assert ("set_timing_cache", b"old-timings", False) in fake_trt.calls
    assert ("build_serialized_network", True, True) in fake_trt.calls
    assert cache.read_bytes() == b"old-timings+timings"

    engine = tmp_path / "out" / "vision.engine"
    assert engine.read_bytes() == fake_trt.engine_bytes
    assert sorted(p.name for p in engine.parent.iterdir()) == ["vision.engine", "vision.engine.json"]  # no temp files
    on_disk = json.loads((tmp_path / "out" / "vision.engine.json").read_text())
    assert on_disk == record.to_dict()
    assert on_disk["engine_sha256"] == hashlib.sha256(fake_trt.engine_bytes).hexdigest()
    assert on_disk["engine_bytes"] == len(fake_trt.engine_bytes)
    assert on_disk["onnx_sha256"] == hashlib.sha256(b"not really onnx").hexdigest()
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
    assert cache.read_bytes() == b"+timings"
    assert record.timing_cache_reused is False
    # the second build feeds the first one's cache back in
    fake_trt.calls.clear()
    assert T.build_engine(make_spec(tmp_path, timing_cache_path=cache)).timing_cache_reused is True
    assert ("set_timing_cache", b"+timings", False) in fake_trt.calls


def test_build_engine_refused_cache_starts_fresh(tmp_path, fake_trt):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from-another-gpu")
    fake_trt.accept_cache = False
    record = T.build_engine(make_spec(tmp_path, timing_cache_path=cache))
    assert ("set_timing_cache", b"from-another-gpu", False) in fake_trt.calls  # never ignore_mismatch=True
    assert ("set_timing_cache", b"", False) in fake_trt.calls
    assert record.timing_cache_reused is False and cache.read_bytes() == b"+timings"


def test_build_engine_without_timing_cache(tmp_path, fake_trt):
    record = T.build_engine(make_spec(tmp_path))
    assert "create_timing_cache" not in fake_trt.names()
    assert record.timing_cache is None and record.timing_cache_reused is False


def test_build_engine_on_tensorrt_11(tmp_path, monkeypatch):
    fake = FakeTRT("11.2.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(T, "cuda_device", lambda: None)
    record = T.build_engine(make_spec(tmp_path, precision="int8"))
    assert not hasattr(fake, "BuilderFlag") and fake.builder.network.flags == 1
    assert (record.tensorrt_version, record.gpu_name, record.precision) == ("11.2.0", None, "int8")


def test_parser_errors_are_listed(tmp_path, fake_trt):
    fake_trt.parse_errors = ["node /attn/Foo: unsupported op Foo", "In node 7: invalid weights"]
    with pytest.raises(T.EngineBuildError) as err:
        T.build_engine(make_spec(tmp_path))
    message = str(err.value)
    assert "could not parse" in message and str(tmp_path / "vision.onnx") in message
    assert "unsupported op Foo | In node 7: invalid weights" in message
    assert "build_serialized_network" not in fake_trt.names()
    assert not (tmp_path / "out").exists()


def test_no_engine_from_the_builder(tmp_path, fake_trt):
    fake_trt.engine_bytes = None
    cache = tmp_path / "timing.cache"
    with pytest.raises(T.EngineBuildError) as err:
        T.build_engine(make_spec(tmp_path, timing_cache_path=cache))
    assert "build_serialized_network returned None" in str(err.value)
    assert "1024 MiB" in str(err.value)
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []  # no engine, no record, no temp file
    assert not cache.exists()


def test_spec_must_match_the_onnx(tmp_path, fake_trt):
    fake_trt.onnx_inputs = {"pixel_values": (-1, 3, 336, 336)}
    with pytest.raises(T.EngineBuildError, match=r"ONNX inputs \['pixel_values'\] != spec inputs"):
        T.build_engine(make_spec(tmp_path))
    fake_trt.onnx_inputs = {"anchor_pixels": (-1, 3, 336, 336), "augmenter_pixels": (-1, 3, 448, 448)}
    with pytest.raises(T.EngineBuildError, match=r"'augmenter_pixels' is \(-1, 3, 448, 448\)"):
        T.build_engine(make_spec(tmp_path))
    fake_trt.onnx_inputs = {"anchor_pixels": (2, 3, 336, 336), "augmenter_pixels": (2, 3, 224, 224)}
    with pytest.raises(T.EngineBuildError, match="fixed batch of 2"):
        T.build_engine(make_spec(tmp_path))
    T.build_engine(make_spec(tmp_path, batch_min=2, batch_opt=2, batch_max=2))  # a static batch that matches
    assert "build_serialized_network" in fake_trt.names()


def test_build_engine_refusals(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(T.TensorRTUnavailable, match="python3-libnvinfer"):
        T.build_engine(make_spec(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT("8.6.1"))
    with pytest.raises(T.TensorRTUnavailable, match="8.6.1 is too old"):
        T.build_engine(make_spec(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT("10.3.0"))
    with pytest.raises(FileNotFoundError, match="no ONNX at"):
        T.build_engine(make_spec(tmp_path, onnx_path=tmp_path / "missing.onnx"))


# ---------------------------------------------------------------- the real TensorRT, where there is one

def test_real_tensorrt_builds_a_tiny_engine(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here: it needs an NVIDIA GPU and "
                                                 "NVIDIA's packages (apt python3-libnvinfer or pypi.nvidia.com)")
    onnx = pytest.importorskip("onnx")
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
