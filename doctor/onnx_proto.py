"""A tiny ONNX model (``y = x @ W + b``) for ftz-doctor's provider probe, encoded by hand.

Why by hand: the device install (the ``runtime`` extra, JetPack's Python 3.10) has onnxruntime
but no ``onnx`` package, and ftz-doctor must not need one. An ONNX model is a protobuf message,
and this one needs only two wire types (varint and length-delimited), so it is written directly
in protobuf's wire format below (field numbers from onnx.proto: ModelProto, GraphProto, NodeProto,
TensorProto, ValueInfoProto, TypeProto). tests/test_doctor.py checks it with the real ``onnx``
package (``onnx.checker``) where that is installed.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # wire type 2: length-delimited
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:  # wire type 0: varint
    return _varint(number << 3) + _varint(value)


def _value_info(name: str, shape: Sequence[int]) -> bytes:
    dims = b"".join(_field(1, _int_field(1, d)) for d in shape)  # Dimension.dim_value
    tensor_type = _int_field(1, 1) + _field(2, dims)  # elem_type FLOAT, shape
    return _field(1, name.encode()) + _field(2, _field(1, tensor_type))  # name, TypeProto.tensor_type


def _initializer(name: str, array: np.ndarray) -> bytes:
    dims = b"".join(_int_field(1, d) for d in array.shape)
    return dims + _int_field(2, 1) + _field(8, name.encode()) + _field(9, array.astype("<f4").tobytes())


def tiny_model() -> tuple[bytes, Dict[str, np.ndarray], np.ndarray]:
    """(ModelProto bytes, feeds, expected output) of ``y = x @ W + b`` (IR 8, opset 13), encoded by
    hand in protobuf's wire format so no onnx package is needed on the device."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = (_field(1, _field(1, b"x") + _field(1, b"W") + _field(2, b"xw") + _field(3, b"matmul") + _field(4, b"MatMul"))
             + _field(1, _field(1, b"xw") + _field(1, b"b") + _field(2, b"y") + _field(3, b"add") + _field(4, b"Add")))
    graph = (nodes + _field(2, b"ftz-doctor") + _field(5, _initializer("W", w)) + _field(5, _initializer("b", b))
             + _field(11, _value_info("x", x.shape)) + _field(12, _value_info("y", (2, 4))))
    model = (_int_field(1, 8) + _field(2, b"ftz-doctor") + _field(7, graph)
             + _field(8, _field(1, b"") + _int_field(2, 13)))
    return model, {"x": x}, x @ w + b
