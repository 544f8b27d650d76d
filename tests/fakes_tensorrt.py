"""Fakes of TensorRT's Python API and cuda-python's CUDA runtime, as strict as their documentation.

Nothing TensorRT runs where this project is developed, so the code written against it is tested
here. Each fake refuses what the real API refuses, returning what the documentation says it
returns (``None``, ``False``, ``-1``, an error code) rather than accepting anything:

* ``IOptimizationProfile.set_shape`` raises RuntimeError unless min <= opt <= max with one rank
  (pyCore.cpp's ``opt_profile_set_shape``); shapes are ``Dims`` or tuples/lists of ints;
  ``add_optimization_profile`` returns -1 for an empty profile; ``build_serialized_network``
  returns None (and logs why) for a profile that misses a dynamic input, names a tensor the
  network lacks, or disagrees with its rank or static sizes;
* ``create_timing_cache`` returns None for a blob it did not write or one from another TensorRT
  version; ``set_timing_cache(..., ignore_mismatch=False)`` returns False for another GPU's;
* ``OnnxParser.parse_from_file`` reads the real ONNX file and resolves external weights
  (``<name>.data``) beside it; ``parse(bytes)`` without a path cannot;
* the runtime deserializes only engines this fake built, for its version; an engine runs its
  source ONNX on onnxruntime's CPU provider, so its outputs are real;
* ``IExecutionContext.set_input_shape`` returns False outside the profile; ``execute_async_v3``
  checks that every tensor has a shape and an address inside a live device allocation big
  enough for it, on a live stream;
* ``FakeCudart`` hands out device addresses no host pointer can have, checks every copy's
  direction (``cudaMemcpyHostToDevice`` needs a device destination and a host source...), and
  reports double frees; ``live`` lists what was never freed; ``fail_malloc_at`` injects an
  allocation failure.

``install(monkeypatch)`` puts both in ``sys.modules`` as ``tensorrt`` and ``cuda.bindings.runtime``.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import sys
import types
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

ENGINE_MAGIC = b"FAKE-TENSORRT-ENGINE\n"
CACHE_MAGIC = b"FAKE-TENSORRT-TIMING-CACHE\n"
# Above the canonical x86-64 / AArch64 user address space: never a host pointer.
DEVICE_BASE = 0x1000_0000_0000_0000
GPU = {"name": "Orin (nvgpu)", "compute_capability": "8.7", "total_memory": 7 << 30}


# -------------------------------------------------------------------------------- cuda-python

class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStream_t:  # noqa: N801
    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self):
        return self.handle

    def __repr__(self):
        return f"<cudaStream_t 0x{self.handle:x}>"


class FakeCudart(types.ModuleType):
    """cuda-python's ``cuda.bindings.runtime``: every call returns ``(cudaError_t, *values)``."""

    def __init__(self, gpu: Optional[dict] = None, free_memory: int = 5 << 30):
        super().__init__("cuda.bindings.runtime")
        self.cudaError_t, self.cudaMemcpyKind, self.cudaStream_t = cudaError_t, cudaMemcpyKind, cudaStream_t
        self.gpu = dict(GPU if gpu is None else gpu)
        self.free_memory = free_memory
        self.memory: Dict[int, bytearray] = {}  # live device allocations
        self.streams: Dict[int, cudaStream_t] = {}
        self.next_address = DEVICE_BASE
        self.next_stream = 0x5000
        self.mallocs = 0
        self.fail_malloc_at: Optional[int] = None  # the Nth cudaMalloc (1-based) fails
        self.log: list = []  # ("malloc", ptr, n) ("free", ptr) ("HostToDevice", n) ("DeviceToHost", n) ...

    # -- device queries (ftz_edge.runtime.device)
    def cudaGetDeviceCount(self):
        return cudaError_t.cudaSuccess, 1

    def cudaGetDeviceProperties(self, index):
        major, minor = self.gpu["compute_capability"].split(".")
        props = types.SimpleNamespace(name=self.gpu["name"].encode(), major=int(major), minor=int(minor),
                                      totalGlobalMem=self.gpu["total_memory"])
        return (cudaError_t.cudaSuccess, props) if index == 0 else (cudaError_t.cudaErrorInvalidValue, None)

    def cudaMemGetInfo(self):
        return cudaError_t.cudaSuccess, self.free_memory, self.gpu["total_memory"]

    def cudaGetErrorName(self, error):
        return cudaError_t.cudaSuccess, cudaError_t(int(error)).name.encode()

    # -- streams
    def cudaStreamCreate(self):
        self.next_stream += 1
        stream = cudaStream_t(self.next_stream)
        self.streams[stream.handle] = stream
        return cudaError_t.cudaSuccess, stream

    def _stream_ok(self, stream) -> bool:
        return isinstance(stream, cudaStream_t) and self.streams.get(stream.handle) is stream

    def cudaStreamSynchronize(self, stream):
        self.log.append(("sync",))
        return (cudaError_t.cudaSuccess,) if self._stream_ok(stream) else (cudaError_t.cudaErrorInvalidResourceHandle,)

    def cudaStreamDestroy(self, stream):
        if not self._stream_ok(stream):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        del self.streams[stream.handle]
        return (cudaError_t.cudaSuccess,)

    # -- memory
    def cudaMalloc(self, size):
        self.mallocs += 1
        if self.mallocs == self.fail_malloc_at:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        if not isinstance(size, int) or size < 0:
            return cudaError_t.cudaErrorInvalidValue, 0
        address = self.next_address
        self.next_address += max(size, 1) + 256  # aligned, with a gap: an overrun never lands in the next buffer
        self.next_address += -self.next_address % 256
        self.memory[address] = bytearray(size)
        self.log.append(("malloc", address, size))
        return cudaError_t.cudaSuccess, address

    def cudaFree(self, pointer):
        if pointer not in self.memory:  # a double free or a pointer cudaMalloc never gave
            self.log.append(("bad free", pointer))
            return (cudaError_t.cudaErrorInvalidValue,)
        del self.memory[pointer]
        self.log.append(("free", pointer))
        return (cudaError_t.cudaSuccess,)

    def is_device(self, address) -> bool:
        return isinstance(address, int) and address >= DEVICE_BASE

    def device_slice(self, address: int, count: int) -> Optional[tuple]:
        """(buffer, offset) when [address, address + count) lies inside one live allocation."""
        for base, buffer in self.memory.items():
            if base <= address and address + count <= base + len(buffer):
                return buffer, address - base
        return None

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        if not self._stream_ok(stream):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            target = self.device_slice(dst, count)
            if target is None or self.is_device(src) or not isinstance(src, int) or src == 0:
                return (cudaError_t.cudaErrorInvalidValue,)
            buffer, offset = target
            buffer[offset:offset + count] = ctypes.string_at(src, count)
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            source = self.device_slice(src, count)
            if source is None or self.is_device(dst) or not isinstance(dst, int) or dst == 0:
                return (cudaError_t.cudaErrorInvalidValue,)
            buffer, offset = source
            ctypes.memmove(dst, bytes(buffer[offset:offset + count]), count)
        else:  # this project copies host <-> device only
            return (cudaError_t.cudaErrorInvalidValue,)
        self.log.append((cudaMemcpyKind(kind).name.replace("cudaMemcpy", ""), count))
        return (cudaError_t.cudaSuccess,)

    @property
    def live(self) -> list:
        """Device allocations never freed."""
        return sorted(self.memory)

    def copies(self) -> list:
        return [entry for entry in self.log if entry[0] in ("HostToDevice", "DeviceToHost")]


# -------------------------------------------------------------------------------- tensorrt

class Dims:
    """``tensorrt.Dims``: a sequence of ints, not a tuple (code must convert it: ``tuple(dims)``)."""

    def __init__(self, values: Sequence[int] = ()):
        values = tuple(values)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise TypeError(f"Dims takes ints, got {values!r}")
        self._values = tuple(int(v) for v in values)

    def __len__(self):
        return len(self._values)

    def __iter__(self):
        return iter(self._values)

    def __getitem__(self, index):
        return self._values[index]

    def __eq__(self, other):
        return isinstance(other, Dims) and other._values == self._values

    def __hash__(self):
        return hash(self._values)

    def __repr__(self):
        return f"Dims({list(self._values)})"


def as_dims(value) -> Dims:
    """What pybind11 accepts for a Dims argument: Dims, or a tuple / list of ints."""
    if isinstance(value, Dims):
        return value
    if isinstance(value, (tuple, list)):
        return Dims(value)
    raise TypeError(f"incompatible function arguments: expected Dims, tuple or list, got {type(value).__name__}")


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT8 = "int8"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"


ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 7: DataType.INT64,
               9: DataType.BOOL}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


def _onnx_io(model) -> tuple:
    """(inputs, outputs) of an ONNX graph: [(name, DataType, dims with -1 for symbolic axes)]."""
    initializers = {t.name for t in model.graph.initializer}

    def describe(value):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return value.name, ONNX_TO_TRT[tensor.elem_type], dims

    inputs = [describe(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [describe(v) for v in model.graph.output]


def _external_data_problems(model, folder: Optional[Path]) -> list:
    """What keeps the parser from the weights of tensors stored outside the graph file."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    problems = []
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        if folder is None:
            problems.append(f"{tensor.name}: weights in external file {info.location!r}, but the parser was given "
                            "bytes without the model's path")
            continue
        path = folder / info.location
        end = (info.offset or 0) + (info.length or 0)
        if not path.is_file():
            problems.append(f"{tensor.name}: failed to open external weights file {path}")
        elif path.stat().st_size < end:
            problems.append(f"{tensor.name}: external weights file {path} is shorter than offset + length {end}")
    return problems


class FakeTensorRT(types.ModuleType):
    """``tensorrt`` 10.x / 11.x: the builder, the ONNX parser, the runtime, engines and contexts."""

    def __init__(self, version: str = "10.3.0", cudart: Optional[FakeCudart] = None, gpu: Optional[dict] = None):
        super().__init__("tensorrt")
        fake = self
        self.__version__ = version
        self.cudart = cudart
        self.gpu = dict(GPU if gpu is None else gpu)  # the GPU this TensorRT sees: timing caches are per GPU
        self.calls: list = []
        self.log: list = []  # (severity, message): what the real TensorRT would print
        self.build_fails = False  # build_serialized_network returns None (e.g. no tactic, workspace too small)
        self.execute_fails = False  # execute_async_v3 returns False
        self.output_scale = 1.0  # engines built from now on multiply their output (a wrong FP16 engine: -1)
        self.Dims, self.DataType, self.TensorIOMode = Dims, DataType, TensorIOMode
        major = int(version.split(".")[0])
        # TensorRT 10: EXPLICIT_BATCH = 0 (deprecated), STRONGLY_TYPED = 1; 11: STRONGLY_TYPED = 0, no EXPLICIT_BATCH
        self.NetworkDefinitionCreationFlag = (types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1) if major == 10
                                              else types.SimpleNamespace(STRONGLY_TYPED=0))
        if major == 10:  # still present (deprecated) in 10, removed in 11
            self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", BF16="BF16")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

        class Logger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = "INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"

            def __init__(self, severity="WARNING"):
                fake.calls.append(("Logger", severity))

        class Tensor:
            def __init__(self, name, dtype, dims):
                self.name, self.dtype, self.shape = name, dtype, Dims(dims)

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs, self.outputs, self.source = flags, [], [], None

            @property
            def num_inputs(self):
                return len(self.inputs)

            @property
            def num_outputs(self):
                return len(self.outputs)

            def get_input(self, index):
                return self.inputs[index]

            def get_output(self, index):
                return self.outputs[index]

        class ParserError:
            def __init__(self, text):
                self.text = text

            def __str__(self):
                return self.text

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.errors = network, []

            def _load(self, model, folder: Optional[Path], source: Optional[str]) -> bool:
                self.errors = [ParserError(p) for p in _external_data_problems(model, folder)]
                if self.errors:
                    return False
                inputs, outputs = _onnx_io(model)
                self.network.inputs = [Tensor(*spec) for spec in inputs]
                self.network.outputs = [Tensor(*spec) for spec in outputs]
                self.network.source = source
                return True

            def parse_from_file(self, model):
                import onnx

                fake.calls.append(("parse_from_file", model))
                if not isinstance(model, str):
                    raise TypeError("parse_from_file(self, model: str) -> bool")
                try:
                    proto = onnx.load(model, load_external_data=False)
                except Exception as err:  # noqa: BLE001 - the parser reports, it does not raise
                    self.errors = [ParserError(f"Failed to parse ONNX model from file {model}: {err}")]
                    return False
                return self._load(proto, Path(model).parent, model)

            def parse(self, model, path=None):
                import onnx

                fake.calls.append(("parse", path))
                try:
                    proto = onnx.load_from_string(bytes(model))
                except Exception as err:  # noqa: BLE001
                    self.errors = [ParserError(f"Failed to parse ONNX model: {err}")]
                    return False
                return self._load(proto, Path(path).parent if path else None, path)

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, index):
                return self.errors[index]

        class Cache:
            def __init__(self, version, gpu, entries=0):
                self.version, self.gpu, self.entries = version, gpu, entries

            def serialize(self):
                header = json.dumps({"version": self.version, "gpu": self.gpu, "entries": self.entries})
                return bytearray(CACHE_MAGIC + header.encode())

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, input, min, opt, max):  # noqa: A002 - the bindings' argument names
                low, mid, high = as_dims(min), as_dims(opt), as_dims(max)
                fake.calls.append(("set_shape", input, tuple(low), tuple(mid), tuple(high)))
                for label, dims in (("min", low), ("opt", mid), ("max", high)):
                    if len(dims) != len(low) or any(d < 0 for d in dims):
                        raise RuntimeError(f"Shape provided for {label} is inconsistent with other shapes.")
                if any(a > b for a, b in zip(low, mid)):
                    raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
                if any(a > b for a, b in zip(mid, high)):
                    raise RuntimeError("Shape provided for max is inconsistent with other shapes.")
                self.shapes[input] = (low, mid, high)

            def get_shape(self, input):  # noqa: A002
                return list(self.shapes.get(input, ()))

            def __bool__(self):
                return bool(self.shapes)

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.cache, self.pool = [], [], None, {}

            def set_flag(self, flag):
                self.flags.append(flag)

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))
                self.pool[pool] = size

            def add_optimization_profile(self, profile):
                if not isinstance(profile, Profile) or not profile:
                    return -1  # documented: -1 when the profile is not valid
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, serialized_timing_cache):
                blob = bytes(serialized_timing_cache)
                fake.calls.append(("create_timing_cache", blob))
                if not blob:
                    return Cache(fake.__version__, fake.gpu.get("name"))
                if not blob.startswith(CACHE_MAGIC):
                    fake.log.append(("ERROR", "createTimingCache: the timing cache is corrupted"))
                    return None
                header = json.loads(blob[len(CACHE_MAGIC):])
                if header["version"] != fake.__version__:
                    fake.log.append(("ERROR", f"createTimingCache: cache from TensorRT {header['version']}"))
                    return None
                return Cache(header["version"], header["gpu"], header["entries"])

            def set_timing_cache(self, cache, ignore_mismatch):
                if not isinstance(cache, Cache):
                    raise TypeError("set_timing_cache(): incompatible function arguments (cache: ITimingCache)")
                fake.calls.append(("set_timing_cache", cache.gpu, cache.entries, ignore_mismatch))
                if cache.gpu != fake.gpu.get("name") and not ignore_mismatch:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                fake.builder = self

            def create_network(self, flags=0):
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
                problems = fake.profile_problems(network, config)
                for problem in problems:
                    fake.log.append(("ERROR", problem))
                if problems or fake.build_fails:
                    return None
                if config.cache is not None:
                    config.cache.entries += 1  # the build timed some layers
                profile = config.profiles[0] if config.profiles else Profile()
                engine = {
                    "version": fake.__version__, "gpu": fake.gpu.get("name"), "source": network.source,
                    "scale": fake.output_scale,
                    "tensors": [{"name": t.name, "mode": "INPUT", "dtype": t.dtype.name, "shape": list(t.shape)}
                                for t in network.inputs]
                               + [{"name": t.name, "mode": "OUTPUT", "dtype": t.dtype.name, "shape": list(t.shape)}
                                  for t in network.outputs],
                    "profile": {name: [list(d) for d in dims] for name, dims in profile.shapes.items()},
                }
                return bytearray(ENGINE_MAGIC + json.dumps(engine).encode())  # IHostMemory: the buffer protocol

        class Runtime:
            def __init__(self, logger):
                fake.calls.append(("Runtime",))

            def deserialize_cuda_engine(self, serialized_engine):
                blob = bytes(serialized_engine)
                if not blob.startswith(ENGINE_MAGIC):
                    fake.log.append(("ERROR", "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                                              "(Serialization assertion magicTagRead == kMAGIC_TAG failed)"))
                    return None
                description = json.loads(blob[len(ENGINE_MAGIC):])
                if description["version"] != fake.__version__:
                    fake.log.append(("ERROR", f"The engine plan file is not compatible with this version of "
                                              f"TensorRT, expecting {fake.__version__} got {description['version']}"))
                    return None
                return Engine(description)

        class Engine:
            def __init__(self, description):
                self.description = description
                self.tensors = {t["name"]: t for t in description["tensors"]}
                self.names = [t["name"] for t in description["tensors"]]
                self.session = None

            @property
            def num_io_tensors(self):
                return len(self.names)

            def get_tensor_name(self, index):
                return self.names[index]

            def get_tensor_mode(self, name):
                return TensorIOMode[self.tensors[name]["mode"]] if name in self.tensors else TensorIOMode.NONE

            def get_tensor_dtype(self, name):
                return DataType[self.tensors[name]["dtype"]]

            def get_tensor_shape(self, name):
                return Dims(self.tensors[name]["shape"])

            def get_tensor_profile_shape(self, name, profile_index):
                if profile_index != 0 or self.get_tensor_mode(name) != TensorIOMode.INPUT:
                    raise RuntimeError(f"no profile shape for {name!r} in profile {profile_index}")
                if name in self.description["profile"]:
                    return [Dims(d) for d in self.description["profile"][name]]
                static = Dims(self.tensors[name]["shape"])
                return [static, static, static]

            def create_execution_context(self):
                return Context(self)

            def run(self, inputs: Dict[str, np.ndarray]) -> np.ndarray:
                """The engine's computation: its source ONNX on onnxruntime's CPU provider."""
                import onnxruntime as ort

                if self.session is None:
                    self.session = ort.InferenceSession(self.description["source"], providers=["CPUExecutionProvider"])
                output = self.session.run(None, inputs)[0]
                return output * self.description["scale"]

        class Context:
            def __init__(self, engine):
                self.engine, self.shapes, self.addresses = engine, {}, {}
                self.input_shapes_set = []

            def _inputs(self):
                return [n for n in self.engine.names if self.engine.get_tensor_mode(n) == TensorIOMode.INPUT]

            def set_input_shape(self, name, shape):
                dims = tuple(as_dims(shape))
                self.input_shapes_set.append((name, dims))
                if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
                    return False
                static = self.engine.tensors[name]["shape"]
                low, _, high = (tuple(d) for d in self.engine.get_tensor_profile_shape(name, 0))
                if (len(dims) != len(static) or any(s >= 0 and s != d for s, d in zip(static, dims))
                        or any(not lo <= d <= hi for lo, d, hi in zip(low, dims, high))):
                    fake.log.append(("ERROR", f"IExecutionContext::setInputShape: {name} {dims} is outside "
                                              f"the profile [{low}, {high}]"))
                    return False
                self.shapes[name] = dims
                return True

            def get_tensor_shape(self, name):
                tensor = self.engine.tensors[name]
                if tensor["mode"] == "INPUT":
                    return Dims(self.shapes.get(name, tensor["shape"]))
                inputs = self._inputs()
                if any(n not in self.shapes for n in inputs):
                    return Dims(tensor["shape"])  # unresolved: -1 where dynamic
                batch = self.shapes[inputs[0]][0]
                return Dims([batch if d < 0 else d for d in tensor["shape"]])

            def set_tensor_address(self, name, memory):
                if name not in self.engine.tensors or not isinstance(memory, int):
                    return False
                self.addresses[name] = memory
                return True

            def execute_async_v3(self, stream_handle):
                cuda = fake.cudart
                fake.calls.append(("execute_async_v3",))
                if fake.execute_fails or cuda is None or not cuda._stream_ok(stream_handle):
                    return False
                buffers = {}
                for name in self.engine.names:
                    shape = tuple(self.get_tensor_shape(name))
                    dtype = np.dtype(DataType[self.engine.tensors[name]["dtype"]].value)
                    nbytes = int(np.prod(shape)) * dtype.itemsize
                    target = cuda.device_slice(self.addresses.get(name, -1), nbytes)
                    if any(d < 0 for d in shape) or target is None:
                        fake.log.append(("ERROR", f"enqueueV3: {name} has shape {shape} and no valid address"))
                        return False
                    buffers[name] = (target, shape, dtype)
                inputs = {n: np.frombuffer(bytes(b[o:o + int(np.prod(s)) * d.itemsize]), d).reshape(s)
                          for n, ((b, o), s, d) in buffers.items() if n in self._inputs()}
                result = self.engine.run(inputs)
                for name, ((buffer, offset), shape, dtype) in buffers.items():
                    if name not in inputs:
                        data = np.ascontiguousarray(result, dtype=dtype)
                        if data.shape != shape:
                            raise AssertionError(f"fake engine computed {data.shape}, context says {shape}")
                        buffer[offset:offset + data.nbytes] = data.tobytes()
                return True

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime
        self.Profile = Profile

    def nptype(self, dtype):
        return np.dtype(dtype.value).type

    def names(self):
        return [call[0] for call in self.calls]

    def cache_blob(self, gpu: Optional[str] = None, version: Optional[str] = None, entries: int = 3) -> bytes:
        """A timing cache as this fake writes it (another GPU / TensorRT version when asked)."""
        header = {"version": version or self.__version__, "gpu": gpu or self.gpu.get("name"), "entries": entries}
        return CACHE_MAGIC + json.dumps(header).encode()

    @staticmethod
    def profile_problems(network, config) -> list:
        """Why TensorRT would build nothing from this network and profile (its error log)."""
        problems = []
        profile_shapes = config.profiles[0].shapes if config.profiles else {}
        inputs = {t.name: tuple(t.shape) for t in network.inputs}
        if any(-1 in dims for dims in inputs.values()) and not config.profiles:
            problems.append("Network has dynamic or shape inputs, but no optimization profile has been defined.")
        for name in profile_shapes:
            if name not in inputs:
                problems.append(f"optimization profile names {name!r}, which is not a network input")
        for name, dims in inputs.items():
            if name not in profile_shapes:
                if -1 in dims and config.profiles:
                    problems.append(f"{name}: dynamic input is missing dimensions in profile 0.")
                continue
            for shape in profile_shapes[name]:
                if len(shape) != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, shape)):
                    problems.append(f"{name}: profile shape {tuple(shape)} does not match the network's {dims}")
        return problems


def install(monkeypatch, version: str = "10.3.0", gpu: Optional[dict] = None) -> tuple:
    """Put a FakeTensorRT and a FakeCudart in sys.modules (``tensorrt``, ``cuda.bindings.runtime``);
    returns (trt, cudart)."""
    cudart = FakeCudart(gpu)
    trt = FakeTensorRT(version, cudart, gpu)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = cudart, bindings
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", cudart)):
        # A spec without an origin: importlib.util.find_spec (torch._dynamo probes for tensorrt) is satisfied.
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    return trt, cudart


def write_vision_onnx(path: Path, shapes: Dict[str, tuple], tokens: int = 4, width: int = 8,
                      external_data: bool = False, seed: int = 0) -> Path:
    """A tiny vision-like graph: each (N, C, H, W) input averaged to (N, C), concatenated, times a
    random matrix, reshaped to ``image_embeds`` (N, tokens, width); its weights in ``<name>.data``
    with ``external_data``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, pooled = [], []
    for name in shapes:
        nodes += [helper.make_node("GlobalAveragePool", [name], [f"{name}_avg"]),
                  helper.make_node("Flatten", [f"{name}_avg"], [f"{name}_flat"])]
        pooled.append(f"{name}_flat")
    channels = sum(chw[0] for chw in shapes.values())
    weights = numpy_helper.from_array(rng.standard_normal((channels, tokens * width)).astype(np.float32), "W")
    target = numpy_helper.from_array(np.array([0, tokens, width], dtype=np.int64), "shape")
    nodes += [helper.make_node("Concat", pooled, ["features"], axis=1),
              helper.make_node("MatMul", ["features", "W"], ["flat"]),
              helper.make_node("Reshape", ["flat", "shape"], ["image_embeds"])]
    graph = helper.make_graph(
        nodes, "vision",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *chw]) for name, chw in shapes.items()],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", tokens, width])],
        initializer=[weights, target])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def copy_bundle(bundle: Path, dest: Path, edit=None, files: Optional[Dict[str, bytes]] = None) -> Path:
    """A copy of ``bundle`` at ``dest`` with ``files`` (relative path -> bytes) added, its manifest
    changed by ``edit(manifest)`` and re-hashed."""
    import shutil

    from ftz_edge.manifest import BundleManifest, write_manifest

    shutil.copytree(bundle, dest)
    for relative, data in (files or {}).items():
        (dest / relative).write_bytes(data)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"] = {}  # re-hashed by write_manifest
    if edit is not None:
        edit(manifest)
    write_manifest(dest, BundleManifest.from_dict(manifest, dest))
    return dest


def add_engine(bundle: Path, batch_min: int = 1, batch_opt: int = 1, batch_max: int = 8,
               workspace_bytes: int = 1 << 30) -> dict:
    """Build an engine from ``bundle``'s vision ONNX with ftz-export's own builder (against the
    installed fakes) and record it in the manifest as ftz-export does; returns the record."""
    import dataclasses

    from ftz_edge.export import tensorrt as T
    from ftz_edge.manifest import TensorRTEngine, read_manifest, write_manifest

    manifest = read_manifest(bundle, verify=False)
    vision = manifest.vision
    spec = T.EngineBuildSpec(
        onnx_path=bundle / vision.file, engine_path=bundle / "vision" / "vision.engine",
        precision=vision.precision, input_shapes={i.name: tuple(i.shape[1:]) for i in vision.inputs},
        batch_min=batch_min, batch_opt=batch_opt, batch_max=batch_max, workspace_bytes=workspace_bytes)
    record = T.build_engine(spec).to_dict()  # also writes vision/vision.engine.json, as in ftz-export's bundles
    engine = TensorRTEngine(file="vision/vision.engine", record=record)
    write_manifest(bundle, dataclasses.replace(manifest, vision=dataclasses.replace(vision, engine="trt", tensorrt=engine)))
    return record
