"""FP16 / INT8 variants of the exported vision graph (ftz_edge.export.quantize), on the shipped
tiny default model and its example images. The graph is exported once for the module."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import onnx
import onnxruntime  # noqa: F401 - the export extra; a missing one must fail, not skip
from onnx import numpy_helper  # noqa: E402

pytestmark = pytest.mark.slow  # one dynamo export (~15 s on 2 cores) + a dozen quantize_static runs

MODEL_DIR = Path(__file__).parents[1] / "ftz_edge" / "default_model"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2", "augmenter_proj")


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    """The tiny model's vision graph, per-image calibration dicts, an evaluation set (the images
    and their mirror images, one batch each) and the fp32 reference output."""
    from ftz_edge.checkpoint import load_checkpoint
    from ftz_edge.export import quantize as q
    from ftz_edge.export.vision import export_vision, input_shapes, layers_in_graph
    from ftz_edge.preprocess import load_image, preprocess_batch

    model = load_checkpoint(MODEL_DIR)
    work = tmp_path_factory.mktemp("quant")
    path = export_vision(model.vision, input_shapes(model.vision, model.anchor_spec, model.augmenter_spec), work / "vision.onnx")
    images = [load_image(p) for p in sorted((MODEL_DIR / "examples").glob("*.png"))]
    anchor = preprocess_batch(images, model.anchor_spec)
    augmenter = preprocess_batch(images, model.augmenter_spec)
    calibration = [{"anchor_pixels": anchor[i:i + 1], "augmenter_pixels": augmenter[i:i + 1]} for i in range(len(images))]
    evaluation = [
        {"anchor_pixels": anchor, "augmenter_pixels": augmenter},
        {"anchor_pixels": np.ascontiguousarray(anchor[..., ::-1]), "augmenter_pixels": np.ascontiguousarray(augmenter[..., ::-1])},
    ]
    exported = onnx.load(str(path))
    return {
        "path": path, "work": work, "model": exported, "layers": layers_in_graph(exported),
        "fusion": sorted({int(m.group(1)) for t in exported.graph.initializer if (m := re.search(r"fusion\.(\d+)\.", t.name))}),
        "calibration": calibration, "evaluation": evaluation,
        "reference": q.run_model(path, evaluation), "images": len(images),
    }


@pytest.fixture(scope="module")
def fp16(tower):
    from ftz_edge.export.quantize import convert_fp16

    dst = tower["work"] / "vision_fp16.onnx"
    return dst, convert_fp16(tower["path"], dst)


@pytest.fixture(scope="module")
def int8(tower):
    from ftz_edge.export.quantize import quantize_int8

    dst = tower["work"] / "vision_int8.onnx"
    return dst, quantize_int8(tower["path"], dst, tower["calibration"])  # defaults: minmax, default policy


def _producers(graph):
    return {out: node for node in graph.node for out in node.output}


def _inits(graph):
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


# -- compare ---------------------------------------------------------------------------------


def test_compare_reports_worst_sample_and_max_error():
    from ftz_edge.export.quantize import compare

    a = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]], dtype=np.float32)
    b = a.copy()
    b[1] = -b[1]  # second sample reversed: cosine -1
    result = compare(a, b)
    assert result["cosine"] == pytest.approx(-1.0)
    assert result["max_abs"] == pytest.approx(8.0)
    same = compare(a, a)
    assert same["cosine"] == pytest.approx(1.0) and same["max_abs"] == 0.0
    c = a.copy()
    c[0, 0, 0] += 1.0  # first sample [2,0,0,1] vs [1,0,0,1]
    assert compare(a, c)["cosine"] == pytest.approx(3 / (np.sqrt(2) * np.sqrt(5)))
    with pytest.raises(ValueError):
        compare(a, a[:1])


# -- FP16 ------------------------------------------------------------------------------------


def test_fp16_weights_half_layernorm_and_io_float(tower, fp16):
    path, info = fp16
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    n_layernorm = sum(n.op_type == "LayerNormalization" for n in tower["model"].graph.node)
    assert n_layernorm > 0
    assert info["fp32_op_types"] == ["LayerNormalization"]
    assert info["fp32_op_counts"] == {"LayerNormalization": n_layernorm}
    assert info["cast_nodes"] > 0

    # Every MatMul weight (and the patch-embedding Conv weights) is stored as fp16.
    weights = [n.input[1] for n in graph.node if n.op_type in ("MatMul", "Conv") and n.input[1] in inits]
    assert len(weights) >= 4 * (len(tower["layers"]["anchor"]) + len(tower["layers"]["augmenter"]))
    assert all(inits[w].data_type == onnx.TensorProto.FLOAT16 for w in weights)

    # Graph IO stays fp32.
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*graph.input, *graph.output])

    # LayerNormalization computes in fp32: fp32 data in (after a Cast), fp32 scale / bias, fp32 out;
    # the rest (e.g. Softmax, MatMul) in fp16.
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    layernorms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert len(layernorms) == n_layernorm
    for node in layernorms:
        assert [types[i] for i in node.input if i] == [onnx.TensorProto.FLOAT] * len([i for i in node.input if i]), node.name
        assert types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    assert softmax and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in softmax)
    matmul_out = [types[n.output[0]] for n in graph.node if n.op_type == "MatMul"]
    assert set(matmul_out) == {onnx.TensorProto.FLOAT16}


def test_fp16_matches_fp32_in_onnxruntime(tower, fp16):
    from ftz_edge.export.quantize import compare, run_model

    out = run_model(fp16[0], tower["evaluation"])
    assert out.dtype == np.float32
    result = compare(tower["reference"], out)
    assert result["cosine"] >= 0.999, result


# -- INT8: the policy ------------------------------------------------------------------------


def test_policy_resolves_to_node_names(tower):
    from ftz_edge.export.quantize import MixedPrecisionPolicy, excluded_nodes, node_modules

    graph = tower["model"]
    by_name = {n.name: n for n in graph.graph.node}
    modules = node_modules(graph)
    default = excluded_nodes(graph)
    kinds = {modules[n]["kind"] for n in default if n in modules}
    assert kinds == {"patch_embedding", "projector", "anchor_layer", "augmenter_layer", "fusion"}
    convs = [n.name for n in graph.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and set(convs) <= set(default)
    projector = [n for n, m in modules.items() if m["kind"] == "projector"]
    assert len(projector) == 2 and set(projector) <= set(default)
    # Attention core: MatMuls whose both inputs are activations (QK^T and PV), two per attention.
    core = [n for n, m in modules.items() if m["attention_core"]]
    n_attention = len(tower["layers"]["anchor"]) + len(tower["layers"]["augmenter"]) + len(tower["fusion"])
    assert len(core) == 2 * n_attention
    assert all(by_name[n].op_type == "MatMul" for n in core) and set(core) <= set(default)
    assert set(default) == set(convs) | set(projector) | set(core)

    # Module paths come from the exporter's metadata.
    q0 = [n for n, m in modules.items() if m["module"] == "vision.anchor.encoder.layers.0.self_attn.q_proj"]
    assert len(q0) == 1 and by_name[q0[0]].op_type == "MatMul"

    fusion_nodes = {n for n, m in modules.items() if m["kind"] == "fusion" and not m["attention_core"]}
    assert len(fusion_nodes) == 5 * len(tower["fusion"])  # W_proj + q, k, v, out
    keep_fusion = excluded_nodes(graph, MixedPrecisionPolicy(keep_fusion=True))
    assert set(keep_fusion) == set(default) | fusion_nodes
    everything = excluded_nodes(graph, MixedPrecisionPolicy(keep_patch_embedding=False, keep_projector=False,
                                                            keep_attention_core=False, extra_excluded_nodes=[q0[0]]))
    assert everything == [q0[0]]
    with pytest.raises(ValueError, match="not in the graph"):
        excluded_nodes(graph, MixedPrecisionPolicy(extra_excluded_nodes=["no_such_node"]))


def test_policy_falls_back_to_parameter_names_without_metadata(tower):
    from ftz_edge.export.quantize import excluded_nodes, node_modules

    stripped = onnx.ModelProto()
    stripped.CopyFrom(tower["model"])
    for node in stripped.graph.node:
        del node.metadata_props[:]
    with_meta, without = node_modules(tower["model"]), node_modules(stripped)
    # The Linear modules are found again through their bias Add, the Convs through their weight.
    for name, info in with_meta.items():
        if info["attention_core"]:
            continue
        assert without[name]["block"] == info["block"], name
    assert set(excluded_nodes(stripped)) == set(excluded_nodes(tower["model"]))


# -- INT8: the quantized graph ---------------------------------------------------------------


def test_int8_qdq_on_layer_linears_only(tower, int8):
    from ftz_edge.export.quantize import node_modules

    path, info = int8
    graph = onnx.load(str(path)).graph
    producer, inits = _producers(graph), _inits(graph)
    modules = node_modules(tower["model"])
    by_name = {n.name: n for n in graph.node}

    assert info["calibration_method"] == "minmax"
    assert info["calibration_samples"] == tower["images"]
    assert info["pre_process"].startswith("quant_pre_process")
    n_layers = len(tower["layers"]["anchor"]) + len(tower["layers"]["augmenter"])
    expected = [n for n, m in modules.items()
                if m["kind"] in ("anchor_layer", "augmenter_layer", "fusion") and not m["attention_core"]]
    assert len(expected) == 6 * n_layers + 5 * len(tower["fusion"])
    assert sorted(info["quantized_nodes"]) == sorted(expected)
    assert not set(info["quantized_nodes"]) & set(info["excluded_nodes"])

    for name in expected:
        node = by_name[name]
        act, weight = (producer.get(i) for i in node.input[:2])
        # Weight: int8 constant -> DequantizeLinear, per output channel (axis 1), zero points 0.
        assert weight is not None and weight.op_type == "DequantizeLinear", name
        q_weight, scale, zero = (inits[i] for i in weight.input)
        axis = {a.name: a.i for a in weight.attribute}.get("axis")
        assert q_weight.dtype == np.int8 and axis == 1, name
        assert scale.shape == (q_weight.shape[1],) and np.all(scale > 0), name
        assert zero.dtype == np.int8 and zero.shape == scale.shape and not zero.any(), name
        assert np.abs(q_weight).max() == 127, name  # symmetric: each column's max maps to 127
        # Activation: QuantizeLinear -> DequantizeLinear, int8, zero point 0 (symmetric).
        assert act is not None and act.op_type == "DequantizeLinear", name
        assert producer[act.input[0]].op_type == "QuantizeLinear", name
        act_zero = inits[act.input[2]]
        assert act_zero.dtype == np.int8 and act_zero.size == 1 and int(act_zero.reshape(-1)[0]) == 0, name


def test_int8_keeps_excluded_and_normalisation_ops_float(tower, int8):
    from ftz_edge.export.quantize import node_modules

    path, info = int8
    graph = onnx.load(str(path)).graph
    producer = _producers(graph)
    by_name = {n.name: n for n in graph.node}
    quantized = set(info["quantized_nodes"])

    def reads_dq(node):
        return any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input)

    assert set(info["excluded_nodes"]) == {
        n.name for n in graph.node
        if n.op_type in ("MatMul", "Conv") and n.name not in quantized
    }
    for name in info["excluded_nodes"]:
        assert not reads_dq(by_name[name]), name
    convs = [n for n in graph.node if n.op_type == "Conv"]
    modules = node_modules(tower["model"])
    projector = [by_name[n] for n, m in modules.items() if m["block"] == "vision.projector"]
    assert len(convs) == 2 and len(projector) == 2
    for node in [*convs, *projector]:
        assert node.name in info["excluded_nodes"] and not reads_dq(node), node.name
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Add", "Mul", "Erf", "Sigmoid"):
            assert not reads_dq(node), f"{node.op_type} {node.name} reads a fake-quantized tensor"
    # Every Q/DQ pair feeds a quantized op: the residual stream itself is never fake-quantized.
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            readers = [n for n in graph.node if node.output[0] in n.input]
            assert readers and all(r.name in quantized for r in readers), node.name
    # Activation scales are all symmetric int8, zero points 0.
    inits = _inits(graph)
    q_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes
    for node in q_nodes:
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name


def test_int8_matches_fp32_on_example_images(tower, int8):
    """Evaluated as TensorRT computes it (Q/DQ as written, see quantize.cpu_session). ORT's own CPU
    int8 kernels (optimize=True) are not asserted: without VNNI their u8 x s8 accumulation
    saturates and costs this model ~0.01 of cosine - a CPU artefact, not the graph's accuracy."""
    from ftz_edge.export.quantize import compare, run_model

    result = compare(tower["reference"], run_model(int8[0], tower["evaluation"]))
    assert result["cosine"] >= 0.99, result


def _activation_scales(path):
    graph = onnx.load(str(path)).graph
    inits = _inits(graph)
    return {n.input[0]: float(inits[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear"}


# Entropy with fewer bins than its default (512) to keep the test quick: ORT's KL search is pure
# Python. 288 bins still searches 18 thresholds (256 would leave only the full range).
@pytest.mark.parametrize("method,options", [("percentile", None), ("entropy", {"num_bins": 288})])
def test_calibration_methods(tower, int8, method, options):
    from ftz_edge.export.quantize import DEFAULT_CALIBRATOR_OPTIONS, compare, quantize_int8, run_model

    dst = tower["work"] / f"vision_int8_{method}.onnx"
    info = quantize_int8(tower["path"], dst, tower["calibration"], method=method, calibrator_options=options)
    assert info["calibration_method"] == method
    assert info["calibrator_options"] == {**DEFAULT_CALIBRATOR_OPTIONS[method], **(options or {})}
    assert info["calibration_samples"] == tower["images"]
    assert sorted(info["quantized_nodes"]) == sorted(int8[1]["quantized_nodes"])
    # The method changes the ranges: histogram methods can only clip relative to min / max.
    minmax, other = _activation_scales(int8[0]), _activation_scales(dst)
    assert minmax.keys() == other.keys()
    ratios = np.array([other[t] / minmax[t] for t in minmax])
    assert np.all(ratios <= 1.0 + 1e-3)
    assert np.any(ratios < 1 - 1e-4), f"{method} gave the min-max ranges"
    # Entropy's result swings with the bin count on 5 images (0.98 to 0.9999, see
    # DEFAULT_CALIBRATOR_OPTIONS); at 288 bins it is 0.9999.
    result = compare(tower["reference"], run_model(dst, tower["evaluation"]))
    assert result["cosine"] >= 0.99, result


def test_int8_rejects_bad_calibration(tower):
    from ftz_edge.export.quantize import quantize_int8

    dst = tower["work"] / "never.onnx"
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize_int8(tower["path"], dst, [])
    with pytest.raises(ValueError, match="graph takes"):
        quantize_int8(tower["path"], dst, [{"anchor_pixels": tower["calibration"][0]["anchor_pixels"]}])
    with pytest.raises(ValueError, match="calibration method"):
        quantize_int8(tower["path"], dst, tower["calibration"], method="kl")
    assert not dst.exists()


# -- sensitivity -----------------------------------------------------------------------------


def test_sensitivity_report(tower, int8):
    from ftz_edge.export.quantize import format_sensitivity, sensitivity_report

    rows = sensitivity_report(tower["path"], tower["calibration"], tower["evaluation"])
    blocks = {r["block"]: r for r in rows}
    expected = {"anchor.embeddings.patch_embedding", "augmenter.embeddings.patch_embeddings", "projector",
                "attention_core", "full policy"}
    expected |= {f"anchor.encoder.layers.{i}" for i in tower["layers"]["anchor"]}
    expected |= {f"augmenter.encoder.layer.{i}" for i in tower["layers"]["augmenter"]}
    expected |= {f"fusion.{i}" for i in tower["fusion"]}
    assert len(rows) == len(blocks) == len(expected)
    assert set(blocks) == expected
    for row in rows:
        assert set(row) == {"block", "kind", "nodes", "cosine", "max_abs", "in_policy"}
        assert -1.0 <= row["cosine"] <= 1.0 and row["max_abs"] >= 0.0
        assert row["nodes"] >= 1
    cosines = [r["cosine"] for r in rows]
    assert cosines == sorted(cosines)
    assert blocks["anchor.encoder.layers.0"]["nodes"] == 6 and blocks["anchor.encoder.layers.0"]["kind"] == "anchor_layer"
    assert blocks["fusion.%d" % tower["fusion"][0]]["nodes"] == 5
    assert blocks["projector"]["nodes"] == 2 and not blocks["projector"]["in_policy"]
    assert blocks["attention_core"]["nodes"] == 2 * (len(tower["layers"]["anchor"]) + len(tower["layers"]["augmenter"]) + len(tower["fusion"]))
    assert not blocks["attention_core"]["in_policy"] and blocks["fusion.%d" % tower["fusion"][0]]["in_policy"]
    # The full-policy row is the model quantize_int8 makes with the same (minmax) calibration.
    full = blocks["full policy"]
    assert full["kind"] == "policy" and full["nodes"] == len(int8[1]["quantized_nodes"])
    assert full["cosine"] >= 0.99
    # Quantizing a single block never hurts more than something drastic.
    assert min(r["cosine"] for r in rows) > 0.9
    table = format_sensitivity(rows)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| block |") and len(lines) == 2 + len(rows)
    assert rows[0]["block"] in lines[2]


def test_graphs_over_the_protobuf_limit_keep_their_weights_in_a_side_file(tower, fp16, int8, tmp_path, monkeypatch):
    """The paper-size fp32 tower (~2.4 GB) is over protobuf's 2 GB. With the limit lowered to one
    byte, the tiny tower goes down the same path: export, FP16, INT8 and a bundle's copy each
    write graph + <name>.data, and each computes what the one-file graph computes."""
    from ftz_edge.checkpoint import load_checkpoint
    from ftz_edge.export import onnx_io
    from ftz_edge.export import quantize as q
    from ftz_edge.export.vision import export_vision, input_shapes

    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1)
    model = load_checkpoint(MODEL_DIR)
    fp32 = export_vision(model.vision, input_shapes(model.vision, model.anchor_spec, model.augmenter_spec),
                         tmp_path / "vision.fp32.onnx")
    assert onnx_io.data_file(fp32).stat().st_size > 0.9 * onnx_io.weight_bytes(tower["model"])
    np.testing.assert_allclose(q.run_model(fp32, tower["evaluation"])[0], tower["reference"][0], atol=1e-5)

    copied = tmp_path / "bundle" / "vision.onnx"
    assert onnx_io.copy(fp32, copied) and onnx_io.data_file(copied).is_file()
    np.testing.assert_allclose(q.run_model(copied, tower["evaluation"])[0], tower["reference"][0], atol=1e-5)

    half = tmp_path / "vision_fp16.onnx"
    q.convert_fp16(fp32, half)
    assert onnx_io.data_file(half).is_file()
    np.testing.assert_allclose(q.run_model(half, tower["evaluation"])[0], q.run_model(fp16[0], tower["evaluation"])[0],
                               atol=1e-6)

    quantized = tmp_path / "vision_int8.onnx"
    info = q.quantize_int8(fp32, quantized, tower["calibration"])
    assert onnx_io.data_file(quantized).is_file() and info["bytes"] == onnx_io.total_bytes(quantized)
    assert info["quantized_nodes"] == int8[1]["quantized_nodes"]
    np.testing.assert_allclose(q.run_model(quantized, tower["evaluation"])[0],
                               q.run_model(int8[0], tower["evaluation"])[0], atol=1e-5)
