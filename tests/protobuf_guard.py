"""Protobuf's 2 GB limit, simulated at a size a tiny model reaches.

A ModelProto over 2 GB cannot be serialised in memory (``EncodeError: Failed to serialize
proto``): every tool that does it - ``onnx.shape_inference.infer_shapes``, ``onnx.save`` without
external data, ``onnx.checker.check_model`` on a proto, an ``InferenceSession`` from bytes -
fails on the paper-size tower. Lowering ``onnx_io.PROTOBUF_LIMIT`` alone does not show that:
the tools themselves would still serialise a tiny "large" graph happily. :func:`lower_limit`
also makes ``ModelProto.SerializeToString`` raise the real error whenever the proto holds more
weight bytes in memory than the lowered limit, so a stage that would break at paper size breaks
here too.
"""

from __future__ import annotations

import onnx
from google.protobuf.message import EncodeError

from ftz_edge.export import onnx_io


def in_memory_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes a serialisation of ``model`` would carry in its initializers (graph and subgraphs
    are enough here: the exported towers have no control flow)."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def lower_limit(monkeypatch, limit: int) -> None:
    """Treat ``limit`` bytes of weights as protobuf's 2 GB, for onnx_io and for protobuf itself."""
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", limit)
    serialize = onnx.ModelProto.SerializeToString

    def guarded(self, *args, **kwargs):
        if in_memory_weight_bytes(self) > limit:
            raise EncodeError("Failed to serialize proto (simulated 2 GB limit: "
                              f"{in_memory_weight_bytes(self)} bytes of weights > {limit})")
        return serialize(self, *args, **kwargs)

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", guarded)
