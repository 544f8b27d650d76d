"""The tower's precision forms, written from its fp32 ONNX: one function for ftz-export and
ftz-bench, so the benchmark times the very files a bundle ships (not a look-alike of its own).

Forms: ``fp16`` (FP16 with the overflow-prone ops in FP32: TensorRT's FP16 input), ``int8``
(calibrated symmetric Q/DQ: TensorRT's INT8 input) and ``int8-dynamic`` (the CPU form a bundle
ships as ``vision/vision.cpu-int8.onnx``: int8 weights, activations quantized at run time, the
float parts FP32). Both INT8 forms keep the same nodes float (``MixedPrecisionPolicy``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ftz_edge import precision as P

CPU_INT8 = P.INT8_DYNAMIC  # the CPU form's name in the precision vocabulary (ftz-bench's rows)
DEFAULT_CALIB_METHOD = "minmax"


def int8_policy(quantize_fusion: bool = False):
    """Which nodes stay float in both INT8 forms; the fusion modules do unless asked otherwise."""
    from ftz_edge.export.quantize import MixedPrecisionPolicy

    return MixedPrecisionPolicy(keep_fusion=not quantize_fusion)


def write_form(fp32_path: Path, dst: Path, form: str, calibration: Optional[Sequence[dict]] = None,
               calib_method: str = DEFAULT_CALIB_METHOD, quantize_fusion: bool = False) -> dict:
    """Write the tower's ``form`` (fp16 / int8 / int8-dynamic) of ``fp32_path`` at ``dst``;
    returns the converter's report (what stayed float, op counts). ``calibration``: batch-1 pixel
    dicts, needed by the Q/DQ form only."""
    from ftz_edge.export import quantize

    if form == P.FP16:
        return quantize.convert_fp16(fp32_path, dst)
    if form == P.INT8:
        if not calibration:
            raise ValueError("the INT8 Q/DQ form needs calibration images")
        return quantize.quantize_int8(fp32_path, dst, calibration, method=calib_method,
                                      policy=int8_policy(quantize_fusion))
    if form == CPU_INT8:
        return quantize.quantize_int8_cpu(fp32_path, dst, policy=int8_policy(quantize_fusion))
    raise ValueError(f"no tower form {form!r}: {P.FP16}, {P.INT8} or {CPU_INT8}")
