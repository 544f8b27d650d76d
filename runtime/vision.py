"""Vision backends: the exported tower + projector, run by ONNX Runtime or a TensorRT engine.

Both take the preprocessed pixel arrays by input name and return ``image_embeds`` (B, T, D).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

# Preference order when nothing is asked for: the fastest provider that is actually present.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: Optional[Sequence[str]] = None) -> List[str]:
    """Execution providers for a session: ``requested`` (checked against what this onnxruntime
    has), else the best available ones, always ending with the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(f"execution provider(s) {missing} are not in this onnxruntime ({available}); "
                             "install onnxruntime-gpu (Jetson: the Jetson AI Lab index) or pick from the list")
        chosen = list(requested)
    else:
        chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    return chosen if "CPUExecutionProvider" in chosen else chosen + ["CPUExecutionProvider"]


class OrtVision:
    name = "onnxruntime"

    def __init__(self, path: Path, providers: Optional[Sequence[str]] = None):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=choose_providers(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def __call__(self, pixels: Dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {name: pixels[name] for name in self.input_names})[0]


class TensorRTVision:
    """A serialized TensorRT engine (built by ``ftz-export --engine trt`` on this device).

    Written against TensorRT's documented Python API (tensors by name, ``set_input_shape``,
    ``set_tensor_address``, ``execute_async_v3``) with cuda-python for device memory; it cannot
    be run where this project is developed (no TensorRT, no GPU) and is untested there.
    """

    name = "tensorrt"
    provider = "TensorRT engine"

    def __init__(self, engine_path: Path):
        import tensorrt as trt

        try:
            from cuda.bindings import runtime as cudart
        except ImportError:  # cuda-python before 12.8
            from cuda import cudart
        self.trt, self.cudart = trt, cudart
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path}: built for another GPU or TensorRT version? "
                               "Rebuild it on this device with ftz-export --engine trt")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = self._check(cudart.cudaStreamCreate())

    def _check(self, result):
        error, *values = result if isinstance(result, tuple) else (result,)
        if int(error) != 0:
            raise RuntimeError(f"CUDA error {error}")
        return values[0] if values else None

    def __call__(self, pixels: Dict[str, np.ndarray]) -> np.ndarray:
        cudart, trt = self.cudart, self.trt
        buffers = []
        try:
            for name in self.input_names:
                array = np.ascontiguousarray(pixels[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                self.context.set_input_shape(name, array.shape)
                pointer = self._check(cudart.cudaMalloc(array.nbytes))
                buffers.append(pointer)
                self._check(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                                   cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                self.context.set_tensor_address(name, pointer)
            shape = tuple(self.context.get_tensor_shape(self.output_name))
            output = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
            out_pointer = self._check(cudart.cudaMalloc(output.nbytes))
            buffers.append(out_pointer)
            self.context.set_tensor_address(self.output_name, out_pointer)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execution failed")
            self._check(cudart.cudaMemcpyAsync(output.ctypes.data, out_pointer, output.nbytes,
                                               cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            self._check(cudart.cudaStreamSynchronize(self.stream))
            return output.astype(np.float32)
        finally:
            for pointer in buffers:
                cudart.cudaFree(pointer)
