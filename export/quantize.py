"""Lower-precision variants of the exported vision graph (ftz_edge.export.vision): FP16 and INT8.

Everything numeric is ONNX Runtime's own tooling; this module only decides *what* to convert:

* FP16: ``onnxruntime.transformers.float16.convert_float_to_float16`` with fp32 graph inputs and
  outputs, and an op block list that keeps the overflow-prone reductions in FP32 (LayerNorm
  above all: a naive FP16 ViT built by TensorRT scored cosine 0.14 against FP32, the same
  network with LayerNorm kept in FP32 scored 0.9997).
* INT8: ``onnxruntime.quantization.quantize_static`` in explicit QDQ form (QuantizeLinear /
  DequantizeLinear pairs, symmetric int8 activations, per-channel symmetric int8 weights), which
  is what TensorRT 10+ builds from. Only MatMul / Gemm / Conv are quantized; a
  :class:`MixedPrecisionPolicy` keeps the sensitive ones (patch embeddings, projector, the
  attention-core MatMuls, optionally the fusion modules) out of INT8.
* :func:`sensitivity_report`: quantize one block at a time and measure the damage, to choose or
  check a policy.

Nodes are mapped to the module that made them through the metadata the torch dynamo exporter
writes on every node (``pkg.torch.onnx.name_scopes``: the nn.Module path, e.g.
``vision.anchor.encoder.layers.0.self_attn.q_proj``). Parameter names are the fallback (the
exporter constant-folds the transposed Linear weights into anonymous ``val_N`` initializers, so
the fallback looks at the node's bias ``Add`` too).
"""

from __future__ import annotations

import inspect
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import onnx

from ftz_edge.atomic import work_folder  # scratch folders that a killed export does not leak
from ftz_edge.export import onnx_io
from ftz_edge.export.vision import node_module
from ftz_edge.precision import FP16, FP32, INT8

ModelLike = Union[str, Path, onnx.ModelProto]

# -- FP16 -------------------------------------------------------------------------------------

# Op types kept in FP32 by convert_fp16 (precision, not kernel support):
# * LayerNormalization: mean/variance over the hidden width overflow or lose all precision in
#   FP16 on ViT activations with outlier channels - the TensorRT 0.14 -> 0.9997 case.
# * ReduceMean, Pow, Sqrt: the same LayerNorm when an exporter decomposes it (x - mean, pow 2,
#   mean, sqrt); absent from opset-18 dynamo graphs, where LayerNorm is one op, but kept here so a
#   decomposed graph gets the same treatment. (A tanh-GELU's Pow(x, 3) stays FP32 too; harmless.)
# * Resize: DINOv2's position-embedding interpolation (present only when the image size differs
#   from the pretraining grid); bicubic on a parameter table, cheap, keep it exact.
# Not in the list, deliberately:
# * Softmax: inputs are max-subtracted, so exp() <= 1 and the row sum <= token count; it cannot
#   overflow, and TensorRT / ORT FP16 softmax kernels accumulate in FP32 anyway. Blocking it
#   would add two Casts per attention for nothing (measured: no change on the tiny model).
# * Erf / Sigmoid (GELU, quick-GELU): bounded outputs, FP16 is fine.
DEFAULT_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Resize")


def _load(model: ModelLike) -> onnx.ModelProto:
    """The graph's structure (nodes, initializer names); a large graph's weights stay on disk."""
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)


def _fp16_converter():
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError:  # pragma: no cover - older / slimmer onnxruntime builds
        from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    return convert_float_to_float16, list(DEFAULT_OP_BLOCK_LIST)


def cpu_session(model: ModelLike, threads: int = 1, optimize: bool = False):
    """An ORT CPU session. ``optimize=False`` (ORT_DISABLE_ALL) runs a QDQ graph as written:
    Q/DQ as float fake-quantization around float MatMuls, which is what TensorRT's int8 kernels
    compute (exact int32 accumulation). ORT's CPU optimizer would instead fuse Q/DQ into its own
    integer kernels, whose u8 x s8 accumulation saturates on x86 CPUs without VNNI (measured on
    an AVX2 machine: cosine 0.989 instead of 0.9998 for the same graph) - a CPU-kernel artefact,
    not a property of the quantized graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def load_with_inferred_shapes(path: Path) -> onnx.ModelProto:
    """``path`` loaded with ONNX shape/type inference applied, for graphs of any size:
    ``infer_shapes_path`` works file to file (the in-memory ``infer_shapes`` cannot pass
    protobuf's 2 GB), and writing its result beside ``path`` keeps the external weights'
    relative location valid."""
    path = Path(path)
    with work_folder("ftz-infer-") as work:
        inferred = Path(work) / path.name
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
    # The inferred copy names the weights relative to the original graph: read them from there.
    onnx.load_external_data_for_model(model, str(path.parent))
    return model


def _fix_initializer_value_info(model: onnx.ModelProto) -> int:
    """Drop value_info entries that contradict their initializer's type.

    The dynamo exporter writes value_info for initializers too; the converter flips every float
    value_info to float16 but leaves an initializer float32 when only blocked (FP32) nodes read
    it - LayerNorm's weight and bias - so the saved model claims fp16 for fp32 tensors. ORT does
    not mind, ONNX shape inference (and any tool that runs it) rejects the model.
    """
    inits = {t.name: t.data_type for t in model.graph.initializer}
    stale = [v for v in model.graph.value_info if v.name in inits and v.type.tensor_type.elem_type != inits[v.name]]
    for v in stale:
        model.graph.value_info.remove(v)
    return len(stale)


def convert_fp16(src: Path, dst: Path, keep_fp32_op_types: Sequence[str] = DEFAULT_FP32_OPS, check: bool = True) -> dict:
    """FP16 copy of ``src`` at ``dst``: FP32 graph inputs/outputs, ``keep_fp32_op_types`` in FP32.

    ONNX Runtime's converter inserts the Casts around the blocked ops. Its own default block list
    (ops without FP16 kernels: TopK, Range, CumSum, ...) is added to ours, since passing a list
    replaces it. With ``check`` the result is loaded in an ORT CPU session (fails loudly on an op
    with no FP16 kernel). Returns what was kept and what was converted.
    """
    convert, ort_defaults = _fp16_converter()
    src, dst = Path(src), Path(dst)
    # The converter's own type inference is in memory (protobuf's 2 GB limit: the paper-size fp32
    # tower is 2.4 GB), so infer from the file, beside it (its weights file resolves), and
    # convert with inference off.
    model = load_with_inferred_shapes(src)
    ops = Counter(node.op_type for node in model.graph.node)
    block = list(dict.fromkeys([*keep_fp32_op_types, *ort_defaults]))
    half = convert(model, keep_io_types=True, op_block_list=block, disable_shape_infer=True)
    del model
    stale = _fix_initializer_value_info(half)
    if check:  # in memory, before saving (a large model's weights leave it as it is saved)
        if not onnx_io.is_large(onnx_io.weight_bytes(half)):
            onnx.shape_inference.infer_shapes(half, check_type=True, strict_mode=True)
    onnx_io.save(half, dst)
    if check:
        cpu_session(dst)
    kept = {op: ops[op] for op in block if ops.get(op)}
    fp16_inits = sum(1 for t in half.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    fp32_inits = sum(1 for t in half.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return {
        "precision": FP16,
        "converter": convert.__module__,
        "keep_io_types": True,
        "fp32_op_types": sorted(kept),       # op types present in the graph and kept in FP32
        "fp32_op_counts": kept,              # op type -> nodes kept in FP32
        "fp32_nodes": sum(kept.values()),
        "block_list": block,                 # everything that was asked for (incl. ORT's defaults)
        "cast_nodes": sum(1 for n in half.graph.node if n.op_type == "Cast") - ops.get("Cast", 0),
        "stale_value_info_fixed": stale,
        "fp16_initializers": fp16_inits,
        "fp32_initializers": fp32_inits,
        "bytes": dst.stat().st_size,
    }


# -- graph anatomy: which module made which node -------------------------------------------

QUANTIZED_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm", "Conv")

_BLOCK_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("patch_embedding", re.compile(r"^(.*\.patch_embeddings?)(\.|$)")),
    ("fusion", re.compile(r"^(.*\.fusion\.\d+)(\.|$)")),
    ("projector", re.compile(r"^(.*projector)(\.|$)")),
    ("anchor_layer", re.compile(r"^(.*\banchor\.encoder\.layers?\.\d+)(\.|$)")),
    ("augmenter_layer", re.compile(r"^(.*\baugmenter\.encoder\.layers?\.\d+)(\.|$)")),
    ("encoder_layer", re.compile(r"^(.*\.encoder\.layers?\.\d+)(\.|$)")),
)


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs and anything computed from constants only."""
    const = {t.name for t in graph.initializer}
    for node in graph.node:  # graph.node is topologically sorted
        if all((not name) or name in const for name in node.input):
            const.update(node.output)
    return const


def _parameter_module(name: str) -> Optional[str]:
    if "." not in name or re.fullmatch(r"val_\d+", name):
        return None
    return name.rsplit(".", 1)[0]


@dataclass
class _Anatomy:
    """Quantizable nodes of a graph, with their module path and block."""

    nodes: list[str]                       # names of MatMul/Gemm/Conv nodes, graph order
    op_type: dict[str, str]
    module: dict[str, Optional[str]]
    block: dict[str, str]
    kind: dict[str, str]                   # block kind: anchor_layer, fusion, projector, ...
    attention_core: set[str]               # MatMuls with two activation inputs


def _block_of(module: Optional[str], fallback: str) -> tuple[str, str]:
    if module is None:
        return fallback, "other"
    for kind, pattern in _BLOCK_PATTERNS:
        match = pattern.match(module)
        if match:
            return match.group(1), kind
    return module, "other"


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    table: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            table[name].append(node)
    return table


def _anatomy(model: onnx.ModelProto) -> _Anatomy:
    graph = model.graph
    const = _constant_tensors(graph)
    consumers = _consumers(graph)
    out = _Anatomy([], {}, {}, {}, {}, set())
    for node in graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES:
            continue
        if not node.name:
            raise ValueError(f"a {node.op_type} node has no name; nodes must be named to be included or excluded")
        module = node_module(node)
        if module is None:  # no exporter metadata: the node's own parameters, then its bias Add
            candidates = [_parameter_module(n) for n in node.input if n in const]
            for consumer in consumers.get(node.output[0], []):
                if consumer.op_type == "Add":
                    candidates += [_parameter_module(n) for n in consumer.input if n in const]
            module = next((c for c in candidates if c), None)
        block, kind = _block_of(module, node.name)
        activations = [n for n in node.input[:2] if n and n not in const]
        out.nodes.append(node.name)
        out.op_type[node.name] = node.op_type
        out.module[node.name] = module
        out.block[node.name] = block
        out.kind[node.name] = kind
        if node.op_type == "MatMul" and len(activations) == 2:
            out.attention_core.add(node.name)
    return out


def node_modules(model: ModelLike) -> dict[str, dict]:
    """Quantizable node name -> {op_type, module, block, kind, attention_core} (for reports)."""
    a = _anatomy(_load(model))
    return {
        n: {"op_type": a.op_type[n], "module": a.module[n], "block": a.block[n], "kind": a.kind[n],
            "attention_core": n in a.attention_core}
        for n in a.nodes
    }


# -- INT8 -------------------------------------------------------------------------------------


@dataclass
class MixedPrecisionPolicy:
    """What stays out of INT8 (runs in the engine's float precision).

    LayerNormalization, Softmax, GELU etc. are never quantized: only MatMul / Gemm / Conv are in
    ``op_types_to_quantize``. Of those:

    * ``keep_patch_embedding``: the patch-embedding Conv of both encoders (raw pixels in, few
      FLOPs, every token depends on it);
    * ``keep_projector``: the MLP projector(s) that write the LLM's input embeddings;
    * ``keep_attention_core``: the attention score and value MatMuls (Q.K^T, P.V; both inputs are
      activations), as NVIDIA ModelOpt leaves them for ViTs;
    * ``keep_fusion``: the FtZ fusion modules (W_proj + MHCA);
    * ``extra_excluded_nodes``: node names, added as they are.
    """

    keep_patch_embedding: bool = True
    keep_projector: bool = True
    keep_attention_core: bool = True
    keep_fusion: bool = False
    extra_excluded_nodes: list[str] = field(default_factory=list)


def _excluded(a: _Anatomy, policy: MixedPrecisionPolicy) -> list[str]:
    kept_kinds = set()
    if policy.keep_patch_embedding:
        kept_kinds.add("patch_embedding")
    if policy.keep_projector:
        kept_kinds.add("projector")
    if policy.keep_fusion:
        kept_kinds.add("fusion")
    excluded = [
        n for n in a.nodes
        if a.kind[n] in kept_kinds or (policy.keep_attention_core and n in a.attention_core)
    ]
    return list(dict.fromkeys([*excluded, *policy.extra_excluded_nodes]))


def excluded_nodes(model: ModelLike, policy: MixedPrecisionPolicy = MixedPrecisionPolicy()) -> list[str]:
    """The names of the nodes ``policy`` keeps out of INT8 in this graph (graph order, then extras).

    Raises ValueError for an ``extra_excluded_nodes`` name the graph does not have.
    """
    model = _load(model)
    names = {node.name for node in model.graph.node}
    unknown = [n for n in policy.extra_excluded_nodes if n not in names]
    if unknown:
        raise ValueError(f"extra_excluded_nodes not in the graph: {unknown}")
    return _excluded(_anatomy(model), policy)


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def _calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    if method not in table:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    return table[method]


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _check_feeds(samples: Sequence[dict], inputs: list[str], what: str) -> list[dict[str, np.ndarray]]:
    if samples is None or len(samples) == 0:
        raise ValueError(f"{what} is empty: give at least one input dict ({', '.join(inputs)} -> array)")
    checked = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise ValueError(f"{what}[{i}] is a {type(sample).__name__}, not a dict of graph inputs")
        missing = [n for n in inputs if n not in sample]
        extra = [n for n in sample if n not in inputs]
        if missing or extra:
            raise ValueError(f"{what}[{i}] has inputs {sorted(sample)}; the graph takes {inputs}")
        checked.append({n: np.ascontiguousarray(sample[n], dtype=np.float32) for n in inputs})
    return checked


def _data_reader(samples: list[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class _ListReader(CalibrationDataReader):
        def __init__(self, items):
            self._items = list(items)
            self._it = iter(self._items)

        def get_next(self):
            return next(self._it, None)

        def __len__(self):
            return len(self._items)

        def set_range(self, start_index: int, end_index: int):
            self._it = iter(self._items[start_index:end_index])

    return _ListReader(samples)


def _prepare(src: Path, dst: Path, large: bool = False) -> tuple[Path, str]:
    """ORT's quant_pre_process, shape inference only (symbolic + ONNX).

    Its optimisation step is skipped on purpose: ORT's graph optimizer drops the exporter's node
    metadata (the module paths the policy is resolved with) and rewrites the graph toward ORT's
    own kernels, while the QDQ graph is meant for TensorRT, which does its own fusions. Should
    shape inference itself fail on some graph, quantization goes on from the original graph
    (ORT's quantizer runs ONNX shape inference itself) and the info says so.
    """
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:  # pragma: no cover
        from onnxruntime.quantization import quant_pre_process
    try:
        quant_pre_process(str(src), str(dst), skip_optimization=True, save_as_external_data=large,
                          all_tensors_to_one_file=True, external_data_location=onnx_io.data_file(dst).name)
        return dst, "quant_pre_process(skip_optimization=True)"
    except Exception as error:  # noqa: BLE001 - any failure here only costs the pre-processing
        return src, f"skipped ({type(error).__name__}: {str(error)[:200]})"


def _restore_float_consumers(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Give nodes that are not quantized their float input back; drop the Q/DQ pairs left unread.

    ORT's QDQ quantizer also fake-quantizes the *outputs* of the MatMuls it quantizes (read by
    the float bias Add), and when a tensor has a single quantized reader it rewires *every*
    reader to the DQ output (``DedicatedQDQPair`` only splits the case of several quantized
    readers) - so the residual stream feeding a fusion module's q_proj, or an augmenter layer
    output feeding W_proj, reaches the next LayerNorm / residual Add fake-quantized too.
    TensorRT honours every Q/DQ it is given. This module places Q/DQ only in front of the
    quantized ops' inputs, as NVIDIA ModelOpt's default INT8 config does for ViTs: LayerNorm,
    residual adds, bias adds and Softmax stay float. (Accuracy on the tiny model is the same
    either way - cosine 0.99975 vs 0.99992, noise level; the point is a predictable placement.)
    Returns how many inputs were rewired.
    """
    graph = model.graph
    producer = _producers(graph)
    inits = {t.name for t in graph.initializer}
    rewired = 0
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.name in quantized:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
                continue
            node.input[i] = q.input[0]
            rewired += 1
    # Q/DQ pairs nobody reads any more.
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    while True:
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    return rewired


def _drop_unused_initializers(model: onnx.ModelProto) -> int:
    """ORT leaves scale / zero-point initializers for tensors it ended up not quantizing."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return len(unused)


def quantized_nodes(model: ModelLike) -> list[str]:
    """MatMul / Gemm / Conv nodes of a QDQ graph that read at least one DequantizeLinear output."""
    graph = _load(model).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node if n.op_type in QUANTIZED_OP_TYPES and any(i in dq_out for i in n.input)]


# Calibrator settings, per method (ONNX Runtime's create_calibrator options).
# * minmax (the default; NVIDIA ModelOpt's INT8 default, "max", too): running min / max. Never
#   clips; with per-channel weights the activations are the only coarse part. Tiny model: 0.99975.
# * percentile: ORT's defaults (2048 bins of |x|, 99.999th percentile). Tiny model: 0.99981.
#   On a big tower, mind that 0.001 % of a 577 x 1024 activation is ~6 values: about as many
#   as the few huge "massive activations" a ViT has, which it then clips.
# * entropy: ORT's KL search runs on a *signed* histogram, ``num_quantized_bins`` being the
#   levels it models over the whole window. ORT's defaults (128 bins, 128 levels) leave one
#   candidate window, the full range, so "entropy" would silently be min-max; more bins with
#   128 levels model 7 bits and over-clip (tiny model, 256 / 1024 bins: 0.9889 / 0.9886). 255
#   levels is symmetric int8 (-127..127); 512 bins search thresholds from half the observed
#   |max| up to it. ORT's search is pure Python: ~0.2 s per calibrated tensor at 512 bins
#   (minutes for a CLIP-L + DINOv2-L tower), 4x that at 1024. KL is still unreliable here: it
#   weighs values by frequency, so it may clip the rare huge activations the network depends on
#   (the anchor MLP's quick-GELU outliers). Tiny model, shipped images, 255 levels: 320 / 384 /
#   512 / 1024 / 2048 bins gave 0.990 / 0.980 / 0.9998 / 0.9998 / 0.9986. Hence not the default.
DEFAULT_CALIBRATOR_OPTIONS: dict[str, dict] = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 255},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
}


CALIBRATION_CHUNK = 2  # samples per calibrator call (see _calibrate)


def _calibrate(prepared: Path, samples: list[dict], method: str, options: dict, cache: Path, large: bool = False) -> None:
    """Run ORT's calibrator for ``method`` and write its ranges to ``cache`` (ORT's JSON format)."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    with work_folder("ftz-calib-") as work:
        calibrator = create_calibrator(
            Path(prepared), list(QUANTIZED_OP_TYPES), augmented_model_path=str(Path(work) / "augmented.onnx"),
            calibrate_method=_calibration_method(method), extra_options=options, use_external_data_format=large,
        )
        # A few samples per call: ORT's histogram calibrators hold every calibrated tensor of
        # every sample of a call in memory (~1.3 GB per image for the paper-size tower, where all
        # 32 shipped images at once exceeded a 24 GB machine); the ranges / histograms merge
        # across calls.
        for start in range(0, len(samples), CALIBRATION_CHUNK):
            calibrator.collect_data(_data_reader(samples[start:start + CALIBRATION_CHUNK]))
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache)


def _has_calibration_cache() -> bool:
    """ORT >= 1.2x: quantize_static(calibration_cache_path=...) and calibrate.save_tensors_data."""
    from onnxruntime.quantization import calibrate, quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters and hasattr(calibrate, "save_tensors_data")


def _quantize(prepared: Path, dst: Path, method: str, exclude: list[str], per_channel: bool,
              cache: Optional[Path], samples: Optional[list[dict]] = None, large: bool = False) -> list[str]:
    """quantize_static from the calibration ``cache`` (or, on an ORT without caches, ``samples``)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    extra_options = {
        "ActivationSymmetric": True,   # int8 activations with zero point 0 (all TensorRT takes)
        "WeightSymmetric": True,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # (in, out) weights: a scale per output column
        "DedicatedQDQPair": True,      # one Q/DQ per quantized reader (see _restore_float_consumers)
        "QuantizeBias": False,         # no int32 bias DequantizeLinear: TensorRT's parser does not take one
    }
    kwargs = {}
    if cache is not None:
        kwargs["calibration_cache_path"] = str(cache)
        reader = None
    else:  # old ORT: its calibrator runs inside quantize_static with its default settings
        reader = _data_reader(samples)
        extra_options["CalibPercentile"] = DEFAULT_CALIBRATOR_OPTIONS["percentile"]["percentile"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=per_channel, reduce_range=False,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
        calibrate_method=_calibration_method(method), extra_options=extra_options, use_external_data_format=large,
        **kwargs,
    )
    model = onnx.load(str(dst))
    quantized = quantized_nodes(model)
    _restore_float_consumers(model, set(quantized))
    _drop_unused_initializers(model)
    onnx_io.save(model, dst)  # one file, or the graph + <name>.data when still over 2 GB
    return quantized


class _Calibration:
    """Calibrate once (ORT calibrator -> ORT cache file), quantize many times from the cache."""

    def __init__(self, prepared: Path, samples: list[dict], method: str, options: Optional[dict], work: Path,
                 large: bool = False):
        self.options = {**DEFAULT_CALIBRATOR_OPTIONS[method], **(options or {})}
        self.samples = samples
        self.cache: Optional[Path] = None
        if _has_calibration_cache():
            self.cache = work / "calibration.json"
            _calibrate(prepared, samples, method, self.options, self.cache, large)
        else:  # pragma: no cover - old onnxruntime
            self.options = {"note": "ORT without calibration caches: quantize_static's own calibrator defaults"}


def quantize_int8(
    src: Path,
    dst: Path,
    calibration: list[dict[str, np.ndarray]],
    method: str = "minmax",
    policy: MixedPrecisionPolicy = MixedPrecisionPolicy(),
    per_channel: bool = True,
    calibrator_options: Optional[dict] = None,
    fp16_high_precision: bool = True,
) -> dict:
    """INT8 QDQ copy of ``src`` at ``dst``, calibrated on ``calibration`` (graph-input dicts).

    With ``fp16_high_precision`` (default) everything left unquantized computes in FP16 except
    the overflow-prone ops of ``DEFAULT_FP32_OPS`` (LayerNorm above all), with FP16 Q/DQ scales
    (opset 19), so a strongly typed TensorRT network runs it as INT8 + FP16
    (``ftz_edge.export.qdq_fp16``); without, the float parts stay FP32.

    ``method``: minmax (default), entropy or percentile, ONNX Runtime's calibrators with
    ``DEFAULT_CALIBRATOR_OPTIONS[method]`` updated by ``calibrator_options`` (e.g.
    ``{"num_bins": 256}`` for a faster entropy search; see DEFAULT_CALIBRATOR_OPTIONS for why
    entropy is not the default). Weights: int8, symmetric, one scale per
    output channel (``per_channel``); activations: int8, symmetric (zero point 0). Returns the
    calibration method and settings, sample count, and the quantized and excluded node names.
    """
    _calibration_method(method)
    src, dst = Path(src), Path(dst)
    samples = _check_feeds(calibration, _graph_inputs(_load(src)), "calibration")
    # Graphs over protobuf's 2 GB (the paper-size fp32 tower) go through every step with their
    # weights in side files.
    large = onnx_io.is_large(onnx_io.total_bytes(src))
    with work_folder("ftz-quant-") as work:
        prepared, pre = _prepare(src, Path(work) / "prepared.onnx", large)
        exclude = excluded_nodes(prepared, policy)
        calib = _Calibration(prepared, samples, method, calibrator_options, Path(work), large)
        # TensorRT builds a Q/DQ graph strongly typed: what is not quantized runs in the graph's own
        # float type. Made FP16 here (LayerNorm kept FP32), as NVIDIA ModelOpt's INT8 PTQ does;
        # without that step the FP32-float graph is written straight to ``dst``.
        qdq_fp32 = Path(work) / "qdq_fp32.onnx" if fp16_high_precision else dst
        quantized = _quantize(prepared, qdq_fp32, method, exclude, per_channel, calib.cache, samples, large)
        high_precision = None
        if fp16_high_precision:
            from ftz_edge.export.qdq_fp16 import qdq_to_fp16_high_precision  # lazy: it imports this module

            high_precision = qdq_to_fp16_high_precision(qdq_fp32, dst)
    return {
        "precision": INT8,
        "format": "QDQ",
        "calibration_method": method,
        "calibrator_options": calib.options,
        "calibration_samples": len(samples),
        "per_channel": per_channel,
        "activation_symmetric": True,
        "policy": asdict(policy),
        "pre_process": pre,
        "quantized_nodes": quantized,
        "excluded_nodes": exclude,
        "high_precision": FP16 if fp16_high_precision else FP32,
        "high_precision_details": high_precision,
        "bytes": onnx_io.total_bytes(dst),
    }


# -- comparison and sensitivity ------------------------------------------------------------


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Cosine similarity of each sample's flattened output (the minimum over the batch) and the
    largest absolute difference. Axis 0 is the batch."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 0:
        a, b = a.reshape(1, 1), b.reshape(1, 1)
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
    dot = np.sum(a2 * b2, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na == 0) & (nb == 0), 1.0, dot / np.maximum(na * nb, np.finfo(np.float64).tiny))
    return {"cosine": float(np.clip(cos, -1.0, 1.0).min()), "max_abs": float(np.abs(a - b).max()) if a.size else 0.0}


def run_model(model: ModelLike, feeds: Iterable[dict[str, np.ndarray]], optimize: bool = False) -> np.ndarray:
    """ORT CPU outputs (first output) of each feed dict, concatenated along the batch axis.

    Unoptimized by default, so a QDQ graph is evaluated with TensorRT's arithmetic (see
    ``_session``); ``optimize=True`` measures ORT's own CPU int8 kernels instead."""
    session = cpu_session(model, optimize=optimize)
    return np.concatenate([session.run(None, feed)[0] for feed in feeds], axis=0)


def _block_label(block: str) -> str:
    return block[len("vision."):] if block.startswith("vision.") else block


def sensitivity_report(
    src_fp32: Path,
    calibration: list[dict[str, np.ndarray]],
    evaluation: list[dict[str, np.ndarray]],
    method: str = "minmax",
    policy: MixedPrecisionPolicy = MixedPrecisionPolicy(),
    per_channel: bool = True,
    calibrator_options: Optional[dict] = None,
    granularity: str = "blocks",
) -> list[dict]:
    """Quantize one block at a time (everything else FP32) and compare ``image_embeds`` with FP32.

    Each row's graph keeps its float parts FP32 (no ``qdq_to_fp16_high_precision``): a row
    measures what INT8 rounding of that block alone costs; the FP16 rounding the shipped graph
    adds on top shows in the export's validation row, not here.

    ``granularity="kinds"`` groups the blocks by kind (all anchor layers, all augmenter layers,
    the fusion modules, ...): a handful of rows instead of one per layer, for large towers.

    Blocks: each patch embedding, anchor layer, augmenter layer, fusion module and projector,
    by the module path of their weight-carrying MatMul/Gemm/Conv; the attention-core MatMuls
    (activation x activation) are one extra group of their own, ``attention_core``. A last row
    quantizes what ``policy`` quantizes. Rows: block, kind, nodes (quantized), cosine, max_abs,
    in_policy (whether the policy quantizes that block); sorted worst cosine first.
    Calibration runs once (ORT's calibration cache), every row reuses the ranges.
    """
    _calibration_method(method)
    if granularity not in ("blocks", "kinds"):
        raise ValueError(f"granularity must be 'blocks' or 'kinds', got {granularity!r}")
    src_fp32 = Path(src_fp32)
    inputs = _graph_inputs(_load(src_fp32))
    large = onnx_io.is_large(onnx_io.total_bytes(src_fp32))
    samples = _check_feeds(calibration, inputs, "calibration")
    feeds = _check_feeds(evaluation, inputs, "evaluation")
    reference = run_model(src_fp32, feeds)
    rows = []
    with work_folder("ftz-sens-") as work:
        work = Path(work)
        prepared, _ = _prepare(src_fp32, work / "prepared.onnx", large)
        a = _anatomy(onnx.load(str(prepared), load_external_data=False))
        policy_excluded = set(excluded_nodes(prepared, policy))
        groups: dict[str, list[str]] = defaultdict(list)
        kinds: dict[str, str] = {}
        for n in a.nodes:
            kind = "attention_core" if n in a.attention_core else a.kind[n]
            key = kind if granularity == "kinds" or kind == "attention_core" else a.block[n]
            groups[key].append(n)
            kinds[key] = kind
        calib = _Calibration(prepared, samples, method, calibrator_options, work, large)
        runs = [(block, kinds[block], members) for block, members in groups.items()]
        runs.append(("full policy", "policy", [n for n in a.nodes if n not in policy_excluded]))
        for i, (block, kind, members) in enumerate(runs):
            chosen = set(members)
            exclude = [n for n in a.nodes if n not in chosen]
            dst = work / f"q{i}.onnx"
            quantized = _quantize(prepared, dst, method, exclude, per_channel, calib.cache, samples, large)
            row = {"block": _block_label(block) if kind != "policy" else block, "kind": kind,
                   "nodes": len(quantized), **compare(reference, run_model(dst, feeds)),
                   "in_policy": kind == "policy" or any(n not in policy_excluded for n in members)}
            rows.append(row)
    rows.sort(key=lambda r: r["cosine"])
    return rows


def format_sensitivity(rows: list[dict]) -> str:
    """Markdown table of :func:`sensitivity_report` rows."""
    lines = ["| block | kind | INT8 nodes | cosine | max abs err | in policy |", "|---|---|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['kind']} | {r['nodes']} | {r['cosine']:.6f} | {r['max_abs']:.3g} | "
                     f"{'yes' if r['in_policy'] else 'no'} |")
    return "\n".join(lines) + "\n"


# -- INT8 for ONNX Runtime's CPU provider -------------------------------------------------------

# Op types the CPU form quantizes: ORT's dynamic quantizer turns each MatMul with a constant
# weight into DynamicQuantizeLinear (u8 activations, scale and zero point computed per tensor at
# run time) + MatMulInteger (s8 weights) + the float rescale. Gemm has no dynamic integer kernel
# (the dynamo exporter writes Linear as MatMul + Add anyway); Conv is the patch embedding only,
# which the policy keeps float.
CPU_INT8_OP_TYPES: tuple[str, ...] = ("MatMul",)
CPU_INT8_INTEGER_OPS: tuple[str, ...] = ("MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "QLinearMatMul",
                                         "QLinearConv", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")


def quantize_int8_cpu(
    src: Path,
    dst: Path,
    policy: MixedPrecisionPolicy = MixedPrecisionPolicy(),
    per_channel: bool = False,
    reduce_range: bool = False,
) -> dict:
    """The CPU form of INT8: ``onnxruntime.quantization.quantize_dynamic`` of the fp32 graph
    ``src`` at ``dst`` (+ ``<name>.data`` when ``src`` is over protobuf's 2 GB).

    The TensorRT form (:func:`quantize_int8`: symmetric int8 Q/DQ, float parts FP16) is the
    slowest INT8 form on ONNX Runtime's CPU provider (few FP16 kernels there). This one is what
    that provider runs fast: MatMul weights int8 (symmetric; one scale per tensor, or per output
    column with ``per_channel``), activations uint8 quantized at run time (no calibration: the
    range of each activation is measured on the input itself), everything else FP32. The same
    :class:`MixedPrecisionPolicy` keeps nodes float (patch embeddings, projector, attention core,
    fusion), by the same node names; ORT's dynamic mode would leave the attention core's
    activation x activation MatMuls float anyway (``MatMulConstBOnly``).

    ``reduce_range``: 7-bit weights, for x86 CPUs without VNNI, where the u8 x s8 kernels can
    saturate (ORT's advice); off by default (VNNI / AVX-512 / ARM dot-product CPUs do not
    saturate), and the export's validation row measures the result either way.

    Large graphs: ORT loads ``src`` from its path (file-to-file shape inference beside it) and
    writes ``dst`` with its weights in a side file; no large ModelProto is serialised in memory.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    large = onnx_io.is_large(onnx_io.total_bytes(src))
    graph = _load(src)
    anatomy = _anatomy(graph)
    exclude = excluded_nodes(graph, policy)
    dst.parent.mkdir(parents=True, exist_ok=True)
    side = onnx_io.data_file(dst)
    if side.exists():  # ONNX appends to an existing data file: never reuse a stale one
        side.unlink()
    quantize_dynamic(
        str(src), str(dst), op_types_to_quantize=list(CPU_INT8_OP_TYPES), per_channel=per_channel,
        reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
        use_external_data_format=large, extra_options={"MatMulConstBOnly": True},
    )
    out = onnx.load(str(dst), load_external_data=False)
    remaining = {node.name for node in out.graph.node}
    excluded = set(exclude)
    quantized = [n for n in anatomy.nodes if n not in remaining and n not in excluded]
    not_quantized = [n for n in anatomy.nodes if n in remaining and n not in excluded]
    ops = Counter(node.op_type for node in out.graph.node)
    return {
        "precision": INT8,
        "format": "dynamic (QOperator: DynamicQuantizeLinear + MatMulInteger)",
        "quantizer": "onnxruntime.quantization.quantize_dynamic",
        "activations": "uint8, asymmetric, per tensor, quantized at run time",
        "weights": f"int8, symmetric, {'per output channel' if per_channel else 'per tensor'}"
                   f"{', 7-bit (reduce_range)' if reduce_range else ''}",
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "high_precision": FP32,
        "policy": asdict(policy),
        "quantized_nodes": quantized,
        "excluded_nodes": exclude,
        "float_matmuls_left": not_quantized,  # activation x activation MatMuls (MatMulConstBOnly)
        "integer_op_counts": {op: ops[op] for op in CPU_INT8_INTEGER_OPS if ops.get(op)},
        "external_data": onnx_io.data_file(dst).exists(),
        "bytes": onnx_io.total_bytes(dst),
    }


def is_cpu_int8(model: ModelLike) -> bool:
    """Whether a graph is the CPU INT8 form (integer ops, no Q/DQ pairs)."""
    ops = {node.op_type for node in _load(model).graph.node}
    return bool(ops & set(CPU_INT8_INTEGER_OPS)) and "DequantizeLinear" not in ops
