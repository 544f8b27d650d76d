"""The precision names every ftz-* tool, option and file uses: one vocabulary (stdlib only).

The names are plain strings, as they are written in manifests, reports and benchmark rows::

    vision tower (ftz-export --precision)       fp32  fp16  int8
    LLM decoder (ftz-export --llm-precision)    fp32  fp16  int8  int4  int8-dynamic
    PyTorch checkpoints (bench, evaluation)     fp32  bf16  fp16

``int8`` is the tower's Q/DQ graph (TensorRT's form); ``int8-dynamic`` is ONNX Runtime's dynamic
INT8 (the CPU form of an int8 tower, ``vision.cpu-int8.onnx``; a benchmark row of its own). For the
LLM, ``int8``/``int4`` are MatMulNBits block-wise weights, and ``int8-dynamic`` a CPU decoder with
per-channel int8 MatMul weights and activations quantized at run time (fast prefill).
``q8_0`` / ``q4_0`` are llama.cpp's GGUF quantizations (benchmark baselines only).

Torch-free: the runtime, ftz-doctor and ftz-serve import it on the device.
"""

from __future__ import annotations

from typing import Dict, Iterable, Literal, Tuple

FP32, FP16, BF16, INT8, INT4 = "fp32", "fp16", "bf16", "int8", "int4"
INT8_DYNAMIC = "int8-dynamic"
Q8_0, Q4_0 = "q8_0", "q4_0"

VisionPrecision = Literal["fp32", "fp16", "int8"]
LlmPrecision = Literal["fp32", "fp16", "int8", "int4", "int8-dynamic"]

VISION_PRECISIONS: Tuple[str, ...] = (FP32, FP16, INT8)
LLM_PRECISIONS: Tuple[str, ...] = (FP32, FP16, INT8, INT4, INT8_DYNAMIC)
TORCH_DTYPES: Tuple[str, ...] = (FP32, BF16, FP16)
GGUF_QUANTS: Tuple[str, ...] = (Q8_0, Q4_0)

DEFAULT_VISION_PRECISION = FP16
DEFAULT_LLM_PRECISION = INT4

# The execution providers ONNX Runtime GenAI's model builder makes a loadable decoder for, per LLM
# precision (the first is the default). Its own table also lists fp32 for cuda, but that graph
# does not load in onnxruntime ("Graph output (present.0.key) does not exist", onnxruntime-genai
# 0.18), so it is left out (export/llm.py refuses it, saying why).
# int8-dynamic: ONNX Runtime's dynamic quantization of the fp32 CPU decoder (its integer kernels are
# the CPU provider's; export/llm.py).
LLM_PROVIDERS: Dict[str, Tuple[str, ...]] = {FP32: ("cpu",), FP16: ("cuda",), INT8: ("cpu", "cuda"),
                                             INT4: ("cpu", "cuda"), INT8_DYNAMIC: ("cpu",)}

# Bytes per weight of the exported vision tower. int8: Q/DQ weights with per-channel scales, the
# FtZ fusion modules and embeddings kept FP16 by default (export/quantize.py): about 1.1 on average.
VISION_BYTES_PER_WEIGHT: Dict[str, float] = {FP32: 4.0, FP16: 2.0, INT8: 1.1}
# Bits per MatMul weight of the exported LLM decoder, before block scales / zero points (int8 and
# int4 are MatMulNBits blocks: ftz_edge.doctor.memory_budget.llm_bytes_per_weight adds those).
LLM_WEIGHT_BITS: Dict[str, int] = {FP32: 32, FP16: 16, INT8: 8, INT4: 4, INT8_DYNAMIC: 8}  # per-channel scales: ~0
QUANTIZED_LLM: Tuple[str, ...] = (INT8, INT4)  # MatMulNBits blocks (int8-dynamic: per-channel scales)
# Weights per quantization scale of those (MatMulNBits ``block_size``, ftz-export --llm-block-size).
# 32 is ONNX Runtime GenAI's builder default and llama.cpp Q4_0's block; 128 (the usual GPTQ/AWQ
# group) prefilled 1.3x and decoded 1.4-1.6x faster than 32 for Qwen2.5-0.5B on a 2-core Zen 5, at
# a larger weight error (docs/export.md has the figures): a speed/quality choice left to the user.
LLM_BLOCK_SIZES: Tuple[int, ...] = (16, 32, 64, 128, 256)
DEFAULT_LLM_BLOCK_SIZE = 32


class PrecisionError(ValueError):
    """A precision name that is not one of the valid ones (the message lists them)."""


def parse(value: object, valid: Iterable[str], what: str = "precision") -> str:
    """``value`` if it is one of ``valid``, else PrecisionError: ``WHAT must be one of a, b, c, got 'x'``."""
    valid = tuple(valid)
    if isinstance(value, str) and value in valid:
        return value
    raise PrecisionError(f"{what} must be one of {', '.join(valid)}, got {value!r}")


def parse_vision(value: object, what: str = "vision precision") -> str:
    return parse(value, VISION_PRECISIONS, what)


def parse_llm(value: object, what: str = "LLM precision") -> str:
    return parse(value, LLM_PRECISIONS, what)


def parse_torch_dtype(value: object, what: str = "torch dtype") -> str:
    return parse(value, TORCH_DTYPES, what)
