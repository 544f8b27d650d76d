"""Vision backends: the exported tower + projector, run by ONNX Runtime or a TensorRT engine,
and the one rule for which ONNX Runtime providers the vision graph and the LLM decoder get.

Both backends take the preprocessed pixel arrays by input name and return ``image_embeds``
(B, T, D), and say how many image tokens their graph emits (``num_tokens``, None when the
graph leaves it dynamic) so a bundle whose manifest disagrees is refused at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ftz_edge.runtime import device

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
# Preference order when nothing is asked for: the fastest provider that is actually present.
PROVIDER_PREFERENCE = (TENSORRT, CUDA, CPU)
# ORT's TensorRT provider implements neither GroupQueryAttention nor MatMulNBits (nor the
# simplified LayerNorms) of the GenAI builder's decoder: given it first, ORT splits the decoder
# into fragments and rebuilds TensorRT engines as the sequence grows (onnxruntime#13559).
# Decoders run on the CUDA provider (its GQA kernels) and the CPU.
NOT_FOR_DECODERS = (TENSORRT,)


def choose_providers(requested: Optional[Sequence[str]] = None,
                     available: Optional[Sequence[str]] = None) -> List[str]:
    """Execution providers for a session: ``requested`` (checked against what this onnxruntime
    has), else the best available ones, always ending with the CPU."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(f"execution provider(s) {missing} are not in this onnxruntime ({list(available)}); "
                             "install onnxruntime-gpu (Jetson: the Jetson AI Lab index) or pick from the list")
        chosen = list(requested)
    else:
        chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    return chosen if CPU in chosen else chosen + [CPU]


@dataclass(frozen=True)
class ProviderPlan:
    """The provider lists one runtime uses: ``vision`` for the vision graph, ``decoder`` for the LLM."""

    vision: List[str]
    decoder: List[str]


def provider_plan(llm_built_for: str, requested: Optional[Sequence[str]] = None,
                  available: Optional[Sequence[str]] = None) -> ProviderPlan:
    """Which providers the runtime gives the vision graph and the decoder, for a decoder built for
    ``llm_built_for`` ("cpu" or "cuda", the manifest's ``llm.execution_provider``). The runtime
    (``FtZRuntime``) and ``ftz-doctor`` both call this, so the doctor tests exactly what runs.

    * vision: ``choose_providers(requested)``;
    * decoder built for the CPU: the CPU only (its int4 MatMulNBits layout is a CPU kernel's);
    * decoder built for CUDA: the vision list without the TensorRT provider; where TensorRT was
      listed and CUDA is available, CUDA takes its place (asking for TensorRT means "the GPU").
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    vision = choose_providers(requested, available)
    if llm_built_for == "cpu":
        return ProviderPlan(vision, [CPU])
    decoder = [p for p in vision if p not in NOT_FOR_DECODERS]
    if TENSORRT in vision and CUDA not in decoder and CUDA in available:
        decoder.insert(0, CUDA)
    return ProviderPlan(vision, decoder)


def vision_file(vision, providers: Sequence[str]) -> str:
    """The vision ONNX graph (relative to the bundle) for the provider list ``providers`` (the
    plan's ``vision``): an INT8 bundle has two forms of the same tower, the Q/DQ graph ``file``
    (symmetric int8, float parts FP16: what TensorRT and the CUDA provider run) and, optionally,
    ``cpu_file`` (dynamic int8, float parts FP32: what ONNX Runtime's CPU kernels run fast). A
    CPU-only list gets ``cpu_file`` when the bundle has one; any GPU provider gets ``file``.
    ``vision``: the manifest's ``VisionSection`` (ftz_edge.manifest)."""
    if vision.cpu_file and providers and all(p == CPU for p in providers):
        return vision.cpu_file
    return vision.file


def _static(dim) -> Optional[int]:
    """A graph dimension as an int, None when symbolic or unknown (ORT: a str or None; TensorRT: -1)."""
    return dim if isinstance(dim, int) and dim >= 0 else None


class OrtVision:
    name = "onnxruntime"
    max_batch: Optional[int] = None  # any batch: the graph's batch axis is dynamic

    def __init__(self, path: Path, providers: Optional[Sequence[str]] = None):
        import onnxruntime as ort

        providers = choose_providers(providers)
        device.preload_gpu_libraries(providers)
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def num_tokens(self) -> Optional[int]:
        """Image tokens per image stated by the graph's output shape (B, T, D), or None."""
        shape = self.session.get_outputs()[0].shape
        return _static(shape[1]) if len(shape) == 3 else None

    def __call__(self, pixels: Dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {name: pixels[name] for name in self.input_names})[0]


def _dims(dims) -> Tuple[int, ...]:
    """A TensorRT ``Dims`` (or any sequence of ints) as a tuple of ints."""
    return tuple(int(d) for d in dims)


class TensorRTVision:
    """A serialized TensorRT engine (built by ``ftz-export --engine trt`` on this device).

    Written against TensorRT's documented Python API (tensors by name, ``set_input_shape``,
    ``set_tensor_address``, ``execute_async_v3``) with cuda-python for device memory, and tested
    against fakes of both (tests/fakes_tensorrt.py): nothing TensorRT runs where this project is
    developed.

    Contract: ``self(pixels)`` takes any number of images. They run in chunks of at most the
    profile's largest batch (``batch_max``, read from the engine); a chunk smaller than its
    smallest batch (a fixed-batch profile) is padded with copies of its last image, whose rows are
    dropped. Device memory is allocated per chunk and freed before returning, also on error.
    ``close()`` releases the CUDA stream.
    """

    name = "tensorrt"
    provider = "TensorRT engine"

    def __init__(self, engine_path: Path):
        trt, why = device.import_tensorrt()  # one import rule: a broken install (no libnvinfer) is an OSError
        if trt is None:
            raise ImportError(f"TensorRT is not importable ({why})")
        cudart = device.cudart()
        if cudart is None:
            raise ImportError("cuda-python is not installed (pip install cuda-python): TensorRT engines need it "
                              "for device memory")
        self.trt, self.cudart, self._call = trt, cudart, device.cuda_call
        self.stream = None
        self.engine_path = Path(engine_path)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path}: not an engine, or built for another GPU "
                               "or TensorRT version? Rebuild it on this device with ftz-export --engine trt")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {engine_path} (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if not self.input_names or not outputs:
            raise RuntimeError(f"{engine_path}: the engine has inputs {self.input_names} and outputs {outputs}; "
                               "a vision engine needs pixel inputs and image_embeds")
        self.output_name = "image_embeds" if "image_embeds" in outputs else outputs[0]
        self.profiles = {name: self._batch_range(name) for name in self.input_names}
        self.batch_min = max(lo for lo, _ in self.profiles.values())
        self.batch_max = min(hi for _, hi in self.profiles.values())
        if not 1 <= self.batch_min <= self.batch_max:
            raise RuntimeError(f"{engine_path}: the inputs' batch ranges {self.profiles} leave no batch size that "
                               "all of them accept; rebuild the engine")
        self.stream = self._call(cudart.cudaStreamCreate(), "cudaStreamCreate")

    @property
    def max_batch(self) -> int:
        return self.batch_max

    def _batch_range(self, name: str) -> Tuple[int, int]:
        """(smallest, largest) batch the engine's profile 0 allows for input ``name``."""
        shape = _dims(self.engine.get_tensor_shape(name))
        if shape and shape[0] >= 0:  # a static batch axis
            return shape[0], shape[0]
        low, _, high = (_dims(d) for d in self.engine.get_tensor_profile_shape(name, 0))
        return low[0], high[0]

    @property
    def num_tokens(self) -> Optional[int]:
        """Image tokens per image stated by the engine's output shape (B, T, D), or None."""
        shape = _dims(self.engine.get_tensor_shape(self.output_name))
        return _static(shape[1]) if len(shape) == 3 else None

    def __call__(self, pixels: Dict[str, np.ndarray]) -> np.ndarray:
        missing = [name for name in self.input_names if name not in pixels]
        if missing:
            raise ValueError(f"the engine needs inputs {self.input_names}; got no {missing}")
        count = len(pixels[self.input_names[0]])
        if count < 1 or any(len(pixels[name]) != count for name in self.input_names):
            raise ValueError(f"every input needs the same number (>= 1) of images, got "
                             f"{ {name: len(pixels[name]) for name in self.input_names} }")
        rows = []
        for start in range(0, count, self.batch_max):
            chunk = {name: pixels[name][start:start + self.batch_max] for name in self.input_names}
            size = len(chunk[self.input_names[0]])
            if size < self.batch_min:  # a fixed-batch profile: pad with the last image, then drop its rows
                chunk = {name: np.concatenate([array, np.repeat(array[-1:], self.batch_min - size, axis=0)])
                         for name, array in chunk.items()}
            rows.append(self._run(chunk)[:size])
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def _device_buffer(self, nbytes: int, name: str, buffers: List[int]) -> int:
        pointer = self._call(self.cudart.cudaMalloc(nbytes), f"cudaMalloc of {nbytes} bytes for {name!r}")
        buffers.append(pointer)  # recorded before anything else can fail: freed below whatever happens
        if not self.context.set_tensor_address(name, pointer):
            raise RuntimeError(f"TensorRT refused the device address of {name!r}")
        return pointer

    def _run(self, pixels: Dict[str, np.ndarray]) -> np.ndarray:
        """One batch within the profile: inputs to the GPU, execute, ``image_embeds`` back (float32)."""
        cudart, trt, call = self.cudart, self.trt, self._call
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        buffers: List[int] = []
        hosts = []  # host arrays stay alive until the stream has finished with them
        finished = False
        try:
            for name in self.input_names:
                array = np.ascontiguousarray(pixels[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                hosts.append(array)
                if not self.context.set_input_shape(name, array.shape):
                    low, high = self.profiles[name]
                    raise RuntimeError(f"TensorRT refused input {name!r} of shape {array.shape} (the engine takes "
                                       f"batches {low}..{high} of its built image size)")
                pointer = self._device_buffer(array.nbytes, name, buffers)
                call(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, to_device, self.stream),
                     f"copying {name!r} to the GPU")
            shape = _dims(self.context.get_tensor_shape(self.output_name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT left the shape of {self.output_name!r} unresolved: {shape}")
            output = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
            hosts.append(output)
            pointer = self._device_buffer(output.nbytes, self.output_name, buffers)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError(f"TensorRT could not run {self.engine_path} (execute_async_v3 failed; see its log)")
            call(cudart.cudaMemcpyAsync(output.ctypes.data, pointer, output.nbytes, to_host, self.stream),
                 f"copying {self.output_name!r} from the GPU")
            call(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            finished = True
            return output.astype(np.float32)
        finally:
            if not finished and buffers:  # let enqueued work drain before its memory is freed
                cudart.cudaStreamSynchronize(self.stream)
            for pointer in buffers:
                cudart.cudaFree(pointer)

    def close(self) -> None:
        """Release the CUDA stream (device buffers never outlive a call)."""
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the driver may be gone already
            pass
