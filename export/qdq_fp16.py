"""FP16 high-precision parts for an INT8 Q/DQ graph: the form TensorRT's strongly typed build wants.

``quantize.quantize_int8`` quantizes the *fp32* graph, so in its Q/DQ output everything left out
of INT8 - LayerNorm, Softmax, GELU, the residual and bias adds, the attention core, the FtZ
fusion modules and the projector (kept out by policy) - is typed fp32. TensorRT 10.3+ / 11
builds a strongly typed network from the types written in the ONNX, so all of that would run in
FP32, and its fused attention kernels take only FP16 / INT8 inputs. NVIDIA ModelOpt's ONNX INT8
PTQ ends the same way with ``high_precision_dtype="fp16"``: after quantizing it converts the
float parts to FP16. :func:`qdq_to_fp16_high_precision` does that to a finished Q/DQ graph:

* the bulk is ONNX Runtime's float16 converter (``convert_float_to_float16``), fp32 graph
  inputs / outputs, with ``quantize.DEFAULT_FP32_OPS`` (LayerNorm and the other overflow-prone
  ops) kept FP32 behind Casts, exactly as ``quantize.convert_fp16`` does for the FP16 graph;
* Q/DQ nodes are converted with the rest: their scales become fp16, so a DequantizeLinear
  *outputs* fp16 (its output type is its scale's type) and still feeds its MatMul / Gemm / Conv
  directly - the pattern TensorRT fuses into an INT8 kernel. A Cast between a DQ and its
  MatMul would break that fusion;
* the fix-ups written here are what the converter does not do (each says why where it is done):
  the opset bump to 19 that fp16 scales need, folding int32 bias DQs, keeping a Q/DQ pair in
  FP32 with the node it feeds when that node is kept FP32, collapsing the fp32 -> fp16 -> fp32
  Cast pairs the converter leaves between two FP32 nodes, and a topological order.

Graphs of any size: types are inferred file to file (``infer_shapes_path``), the converter runs
with its in-memory inference off, and ``onnx_io.save`` writes ``<name>.data`` above the limit.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ftz_edge.atomic import work_folder  # scratch folders that a killed export does not leak
from ftz_edge.export import onnx_io
from ftz_edge.export.quantize import (
    DEFAULT_FP32_OPS,
    _consumers,
    _fp16_converter,
    _producers,
    cpu_session,
    load_with_inferred_shapes,
    quantized_nodes,
)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QDQ_FP16_OPSET = 19  # DequantizeLinear / QuantizeLinear take fp16 scales from opset 19 (fp32 only before)

# Every default-domain op that has a new version at opset 19, and why an opset-18 graph means the
# same at 19 (onnx's operator changelog). Bumping the opset import changes no semantics for these;
# any other op with a version-19 schema would be refused. Opset 19 also stays inside TensorRT 10's
# ONNX parser range (opsets 9-20; ModelOpt goes to 21 for NVFP4, which this graph does not need).
_SAME_MEANING_AT_19 = {
    "Cast": "adds float8 types and 'saturate', which applies to float8 targets only",
    "CastLike": "adds float8 types and 'saturate', which applies to float8 targets only",
    "QuantizeLinear": "adds float8 types and fp16 / bf16 scales",
    "DequantizeLinear": "adds float8 types and fp16 / bf16 scales",
    "Constant": "adds float8 types",
    "Identity": "adds float8 types",
    "If": "adds float8 types",
    "Loop": "adds float8 types",
    "Scan": "adds float8 types",
    "Reshape": "adds float8 types",
    "Shape": "adds float8 types",
    "Size": "adds float8 types",
    "Equal": "adds string inputs",
    "Pad": "adds mode 'wrap'",
    "AveragePool": "adds 'dilations' (default 1)",
    "Resize": "adds coordinate mode 'half_pixel_symmetric'",
    "DeformConv": "new at 19",
}

# Half an int8 step: a scale rounded to fp16 by more than this moves values as much as the
# quantization itself. Normal fp16 rounds by <= 2**-11; only subnormal scales (< 6.1e-5, i.e. a
# weight column whose largest |w| is under 0.0078) get near it.
_SCALE_WARN_REL_ERROR = 2.0 ** -9


def _default_opset(model: onnx.ModelProto) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _bump_opset(model: onnx.ModelProto, target: int = QDQ_FP16_OPSET) -> int:
    """Raise the default-domain opset import to ``target`` where it is 18; returns the old one.

    Done by hand, not with ``onnx.version_converter``: that serialises the model in memory (the
    2 GB limit) and would rewrite nodes that need no rewriting. Only 18 -> 19 is taken: from 17
    and below, ops did change meaning (ReduceMean's axes became an input at 18, for one).
    """
    before = _default_opset(model)
    if before >= target:
        return before
    if before != target - 1:
        raise ValueError(f"opset {before}: fp16 Q/DQ scales need opset {target}; export the graph at opset "
                         f"{target - 1} or {target} (only {target - 1} -> {target} is bumped here)")
    changed = sorted({
        n.op_type for n in model.graph.node
        if n.domain in ("", "ai.onnx") and onnx.defs.get_schema(n.op_type, target).since_version == target
    })
    unknown = [op for op in changed if op not in _SAME_MEANING_AT_19]
    if unknown:
        raise ValueError(f"ops {unknown} change at opset {target}; not bumping the opset of this graph")
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = target
    model.ir_version = max(model.ir_version, 9)  # opset 19 came with IR version 9
    return before


def _fold_bias_dequantize(model: onnx.ModelProto) -> int:
    """Replace DequantizeLinear nodes of int32 initializers (a quantized Conv / Gemm bias) by the
    float values they stand for; returns how many.

    ORT's quantizer writes a Conv's bias as int32 with scale = input scale x weight scale. As an
    fp16 scale that product (~1e-7 and below) is subnormal or flushed, and TensorRT's parser
    takes int8 / int4 / fp8 into DequantizeLinear anyway, not int32: its Conv reads a float bias.
    The folded values are fp32 here and become fp16 with the other float constants.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    folded = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        if inits[node.input[0]].data_type != TensorProto.INT32 or node.input[1] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        zero = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
                if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
        if scale.ndim == 1 and q.ndim > 0:  # per-channel along `axis` (default 1; a bias has one axis)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis % q.ndim] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        values = ((q - zero) * scale).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for t in [t for t in graph.initializer if t.name not in used and t.name in {i for n in folded for i in n.input}]:
        graph.initializer.remove(t)
    return len(folded)


def _qdq_feeding_blocked(graph: onnx.GraphProto, blocked_ops: set[str], blocked_nodes: set[str]) -> list[str]:
    """Q/DQ nodes that feed only FP32 (blocked) nodes, to be kept FP32 with them.

    The converter would make such a DQ output fp16 and then cast it back to fp32 for its
    reader: a Cast between the DQ and its MatMul (no INT8 fusion in TensorRT) and an fp16
    rounding of the dequantized values. Keeping the pair fp32 keeps DQ -> MatMul direct.
    """
    consumers = _consumers(graph)
    producers = _producers(graph)
    graph_outputs = {o.name for o in graph.output}

    def blocked(node: onnx.NodeProto) -> bool:
        return node.op_type in blocked_ops or node.name in blocked_nodes

    dqs = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] in graph_outputs:
            continue
        readers = consumers.get(node.output[0], [])
        if readers and all(blocked(r) for r in readers):
            dqs.append(node)
    chosen = {id(n) for n in dqs}
    qs = []
    for dq in dqs:
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and all(id(r) in chosen for r in consumers[q.output[0]]):
            qs.append(q)
    kept = [*dqs, *qs]
    for k, node in enumerate(kept):
        if not node.name:  # the converter blocks nodes by name
            node.name = f"{node.op_type}_fp32_{k}"
    _own_scales(graph, kept, consumers)
    return list(dict.fromkeys(n.name for n in kept))


def _own_scales(graph: onnx.GraphProto, kept: list[onnx.NodeProto], consumers: dict) -> None:
    """Give kept-FP32 Q/DQ nodes their own copy of a scale they share with converted nodes.

    ORT's quantizer names one scale per tensor, shared by all the Q/DQ pairs of its readers
    (q_proj, k_proj and v_proj read one LayerNorm output). The converter makes a shared
    initializer fp16 and feeds its FP32 readers through a Cast: the kept pair's scale would be
    rounded to fp16 and no longer an initializer."""
    inits = {t.name: t for t in graph.initializer}
    kept_ids = {id(n) for n in kept}
    for node in kept:
        name = node.input[1]
        if name not in inits or all(id(r) in kept_ids for r in consumers[name]):
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}_fp32"
        if copy.name not in inits:
            graph.initializer.append(copy)
            inits[copy.name] = copy
        node.input[1] = copy.name


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _collapse_round_trip_casts(model: onnx.ModelProto) -> int:
    """Rewire readers of ``Cast(to fp32)(Cast(to fp16)(x))`` with fp32 ``x`` to ``x``; returns how many.

    The converter casts every blocked node's fp32 output to fp16 and every fp16 input of a
    blocked node to fp32, even when the two blocked nodes are neighbours (a kept-fp32 DQ and its
    MatMul): the value takes a lossy trip through fp16 for nothing.
    """
    graph = model.graph
    types = _tensor_types(model)
    producers = _producers(graph)
    graph_outputs = {o.name for o in graph.output}

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None)

    replace = {}
    for node in graph.node:
        if node.op_type != "Cast" or cast_to(node) != TensorProto.FLOAT or node.output[0] in graph_outputs:
            continue
        first = producers.get(node.input[0])
        if first is None or first.op_type != "Cast" or cast_to(first) != TensorProto.FLOAT16:
            continue
        if types.get(first.input[0]) == TensorProto.FLOAT:
            replace[node.output[0]] = first.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    _drop_dead_casts(graph)
    return len(replace)


def _drop_dead_casts(graph: onnx.GraphProto) -> None:
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def _drop_initializer_value_info(model: onnx.ModelProto) -> int:
    """Drop value_info entries of initializers (an initializer carries its own type).

    The converter flips every float value_info to fp16, also those of initializers it leaves
    fp32 because only FP32 nodes read them (LayerNorm's weight and bias): the graph would then
    claim fp16 for fp32 tensors, which ONNX's type inference rejects.
    """
    inits = {t.name for t in model.graph.initializer}
    stale = [v for v in model.graph.value_info if v.name in inits]
    for v in stale:
        model.graph.value_info.remove(v)
    return len(stale)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Order ``graph.node`` so that every input is produced before it is read, keeping the
    original order otherwise: each node is emitted after what it reads, in a depth-first walk
    over the original order. The converter appends its Casts at the end of the list; ORT sorts
    for itself, ONNX's checker and other tools expect the order."""
    nodes = list(graph.node)
    produced_by = {out: k for k, node in enumerate(nodes) for out in node.output if out}
    deps = [[produced_by[name] for name in node.input if name in produced_by] for node in nodes]
    state = [0] * len(nodes)  # 0 new, 1 on the walk's path, 2 emitted
    order = []
    for root in range(len(nodes)):
        if state[root]:
            continue
        stack = [(root, 0)]
        state[root] = 1
        while stack:
            k, i = stack.pop()
            if i < len(deps[k]):
                stack.append((k, i + 1))
                d = deps[k][i]
                if state[d] == 1:
                    raise ValueError(f"the graph has a cycle through {nodes[d].name or nodes[d].op_type}")
                if state[d] == 0:
                    state[d] = 1
                    stack.append((d, 0))
            else:
                state[k] = 2
                order.append(k)
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)


def _scale_inputs(graph: onnx.GraphProto, inits: dict[str, TensorProto]) -> set[str]:
    return {n.input[1] for n in graph.node if n.op_type in QDQ_OPS and n.input[1] in inits}


def _inferred_types(path: Path) -> dict[str, int]:
    """Tensor element types of the graph at ``path`` after ONNX type inference with type checks,
    file to file (any size; the weights are not read)."""
    path = Path(path)
    with work_folder(".ftz-qdq16-", path.parent) as work:
        inferred = Path(work) / path.name
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
        return _tensor_types(onnx.load(str(inferred), load_external_data=False))


def qdq_to_fp16_high_precision(
    src: Path,
    dst: Path,
    keep_fp32_op_types: Sequence[str] = DEFAULT_FP32_OPS,
    keep_fp32_nodes: Sequence[str] = (),
    check: bool = True,
) -> dict:
    """Copy of the INT8 Q/DQ graph ``src`` at ``dst`` whose float compute is FP16.

    Kept FP32: the graph inputs and outputs, the ops in ``keep_fp32_op_types`` (default
    ``quantize.DEFAULT_FP32_OPS``: LayerNorm first) and the nodes named in ``keep_fp32_nodes``,
    each behind Casts. Q/DQ scales become fp16 (weights' and activations'), so every quantized
    MatMul / Gemm / Conv still reads its DequantizeLinear outputs directly; a Q/DQ pair that
    feeds a kept-FP32 node stays fp32 with it. The default-domain opset goes from 18 to 19
    (fp16 scales need it; other opsets are refused). ``src`` may be ``dst``.

    The saved graph is type-checked by ONNX inference (from the file) and its placements
    counted; with ``check`` a misplacement (a quantized node not reading its DQ directly, a DQ
    without the fp16 scale, a kept-FP32 node reading fp16) raises RuntimeError and the graph is
    loaded in an ORT CPU session. Returns what was done: opset before / after, fp16 nodes (by op
    type), fp32 nodes kept (by op type), Q/DQ nodes with fp16 and fp32 scales, Casts added,
    int32 bias DQs folded, the largest relative change of a scale by its fp16 rounding, and the
    output's size.
    """
    convert, ort_defaults = _fp16_converter()
    src, dst = Path(src), Path(dst)
    model = load_with_inferred_shapes(src)  # types for the converter, inferred from the file (any size)
    graph = model.graph
    if not any(n.op_type == "DequantizeLinear" for n in graph.node):
        raise ValueError(f"{src} has no DequantizeLinear: not a Q/DQ graph (quantize.convert_fp16 makes FP16 graphs)")
    large_src = onnx_io.is_large(onnx_io.weight_bytes(model))
    quantized_before = quantized_nodes(model)
    unknown = sorted(set(keep_fp32_nodes) - {n.name for n in graph.node})
    if unknown:
        raise ValueError(f"keep_fp32_nodes not in the graph: {unknown}")
    ops_before = Counter(n.op_type for n in graph.node)
    opset_before = _bump_opset(model)  # before converting: a graph it refuses costs nothing more

    folded = _fold_bias_dequantize(model)
    block_ops = list(dict.fromkeys([*keep_fp32_op_types, *ort_defaults]))
    block_nodes = list(keep_fp32_nodes)
    block_nodes += _qdq_feeding_blocked(graph, set(block_ops), set(block_nodes))
    inits = {t.name: t for t in graph.initializer}
    scales_before = {name: numpy_helper.to_array(inits[name]).astype(np.float64)
                     for name in _scale_inputs(graph, inits)}
    kept = Counter(n.op_type for n in graph.node if n.op_type in block_ops or n.name in block_nodes)

    half = convert(model, keep_io_types=True, op_block_list=block_ops, node_block_list=block_nodes,
                   disable_shape_infer=True)
    del model
    collapsed = _collapse_round_trip_casts(half)
    _drop_initializer_value_info(half)
    _topological_sort(half.graph)

    inits = {t.name: t for t in half.graph.initializer}
    rel_errors = []
    subnormal = 0
    for name, before in scales_before.items():
        after = numpy_helper.to_array(inits[name]).astype(np.float64)
        if inits[name].data_type == TensorProto.FLOAT16:
            subnormal += int(np.sum(np.abs(after) < np.finfo(np.float16).tiny))
        if before.size:
            moved = np.abs(after - before) / np.maximum(np.abs(before), np.finfo(np.float64).tiny)
            rel_errors.append(float(moved.max()))
    worst = max(rel_errors, default=0.0)
    if worst > _SCALE_WARN_REL_ERROR:
        warnings.warn(f"a Q/DQ scale moved by {worst:.2g} (relative) in fp16 ({subnormal} subnormal fp16 scale "
                      "values): that quantization is coarser than int8", stacklevel=2)
    qdq_scale_types = Counter((n.op_type, inits[n.input[1]].data_type) for n in half.graph.node
                              if n.op_type in QDQ_OPS and n.input[1] in inits)
    ops_after = Counter(n.op_type for n in half.graph.node)
    casts_added = ops_after["Cast"] - ops_before["Cast"]
    external = onnx_io.save(half, dst)  # a large model's weights leave `half` here: nothing reads them after
    del half

    info = {
        "precision": "int8",
        "high_precision_dtype": "fp16",
        "converter": convert.__module__,
        "keep_io_types": True,
        "opset_before": opset_before,
        "opset_after": max(opset_before, QDQ_FP16_OPSET),
        "fp32_op_counts": dict(kept),
        "fp32_nodes": sum(kept.values()),
        "block_list": block_ops,
        "blocked_nodes": block_nodes,
        "qdq_fp16_scales": sum(c for (op, t), c in qdq_scale_types.items() if t == TensorProto.FLOAT16),
        "qdq_fp32_scales": sum(c for (op, t), c in qdq_scale_types.items() if t == TensorProto.FLOAT),
        "casts_added": casts_added,
        "round_trip_casts_removed": collapsed,
        "bias_dequantize_folded": folded,
        "scale_max_rel_error": worst,
        "fp16_subnormal_scales": subnormal,
        "quantized_nodes": len(quantized_before),
        "large_input": large_src,
        "external_data": external,
        "bytes": onnx_io.total_bytes(dst),
    }
    counts, problems = _placements(dst, quantized_before, set(block_ops), set(block_nodes))
    info.update(counts)
    if check:
        if problems:
            raise RuntimeError("Q/DQ fp16 conversion: " + "; ".join(problems[:10]))
        cpu_session(dst)
    return info


def _placements(path: Path, quantized: list[str], block_ops: set[str], block_nodes: set[str]) -> tuple[dict, list]:
    """The saved graph's fp16 compute by op type (types from ONNX inference, which also
    type-checks it), and what is out of place: a quantized node that no longer reads a
    DequantizeLinear directly, a DQ in front of an FP16 node without an fp16 scale, a kept-FP32
    node that reads an fp16 tensor.
    """
    types = _inferred_types(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    producers = _producers(graph)
    inits = {t.name: t.data_type for t in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    problems = []
    for name in quantized:
        node = by_name.get(name)
        if node is None:
            problems.append(f"{name}: gone")
            continue
        fp32 = node.op_type in block_ops or node.name in block_nodes
        want = TensorProto.FLOAT if fp32 else TensorProto.FLOAT16
        dqs = [producers.get(i) for i in node.input[:2]]
        if not any(dq is not None and dq.op_type == "DequantizeLinear" for dq in dqs):
            problems.append(f"{name}: reads no DequantizeLinear directly")
        for dq in dqs:
            if dq is not None and dq.op_type == "DequantizeLinear" and inits.get(dq.input[1]) != want:
                scale = TensorProto.DataType.Name(inits.get(dq.input[1], 0))
                problems.append(f"{name}: its DequantizeLinear {dq.name} has a {scale} scale")
    fp16 = Counter()
    for node in graph.node:
        float_inputs = [types[i] for i in node.input if types.get(i) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        if node.op_type in block_ops or node.name in block_nodes:
            if TensorProto.FLOAT16 in float_inputs:
                problems.append(f"{node.name} ({node.op_type}) is kept FP32 but reads an fp16 tensor")
        elif node.op_type not in ("Cast", *QDQ_OPS) and TensorProto.FLOAT16 in float_inputs:
            fp16[node.op_type] += 1
    return {"fp16_nodes": sum(fp16.values()), "fp16_op_counts": dict(fp16)}, problems
