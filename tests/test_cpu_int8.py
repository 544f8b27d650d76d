"""The CPU form of INT8 (issue 15, item 2): one ``ftz-export --precision int8``, two INT8 graphs.

``vision/vision.onnx`` is TensorRT's form (symmetric int8 Q/DQ, float parts FP16), the slowest
INT8 form on ONNX Runtime's CPU provider; ``vision/vision.cpu-int8.onnx`` is ORT's dynamic INT8
(MatMulInteger with run-time u8 activations, float parts FP32), made by
``quantize.quantize_int8_cpu`` from the same fp32 export with the same mixed-precision policy.
The runtime loads the CPU form when its vision providers are the CPU only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ftz_edge.export import onnx_io
from ftz_edge.export import quantize as q
from protobuf_guard import lower_limit

pytestmark = pytest.mark.slow  # a dynamo export of the tiny tower, and an int8 bundle export

MODEL_DIR = Path(__file__).parents[1] / "ftz_edge" / "default_model"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    """The tiny default model's fp32 tower (one file), its calibration images as graph inputs,
    PyTorch's image embeddings for them, and the CPU form quantized from it."""
    from ftz_edge.checkpoint import load_checkpoint
    from ftz_edge.export.bundle import _pixels, calibration_images
    from ftz_edge.export.vision import export_vision, input_shapes

    model = load_checkpoint(MODEL_DIR).eval().float()
    work = tmp_path_factory.mktemp("cpu-int8")
    fp32 = export_vision(model.vision, input_shapes(model.vision, model.anchor_spec, model.augmenter_spec),
                         work / "vision.fp32.onnx")
    pixels = _pixels(model, calibration_images(None, 8))
    with torch.no_grad():
        reference = model.vision(*[torch.from_numpy(v) for v in pixels.values()]).numpy()
    feeds = [{k: v[i:i + 1] for k, v in pixels.items()} for i in range(len(reference))]
    cpu = work / "vision.cpu-int8.onnx"
    info = q.quantize_int8_cpu(fp32, cpu)
    return {"model": model, "fp32": fp32, "work": work, "pixels": pixels, "feeds": feeds, "reference": reference,
            "cpu": cpu, "info": info}


def _run(path, feeds):
    return q.run_model(path, feeds, optimize=True)  # as the runtime runs it: ORT's CPU integer kernels


def test_cpu_form_matches_pytorch(tower):
    """The default (per-tensor weights) validates at the INT8 target (0.99) against PyTorch fp32,
    image by image and batched (the batch axis stays dynamic; a batch shares one run-time
    activation range per tensor, so a batch's result is not the stack of batch-1 results)."""
    result = q.compare(_run(tower["cpu"], tower["feeds"]), tower["reference"])
    assert result["cosine"] >= 0.99, result
    batched = q.cpu_session(tower["cpu"], optimize=True).run(None, tower["pixels"])[0]
    assert q.compare(batched, tower["reference"])["cosine"] >= 0.99


def test_per_channel_weights_are_an_option(tower, tmp_path):
    """Per-channel weights quantize and run too. Not the default: on this model they validated
    worse batched (cosine min 0.981 vs 0.9987 per tensor over 8-image batches; 32 images one by
    one: min 0.990 vs 0.992); at paper size both gave 0.9999 against fp32."""
    path = tmp_path / "per_channel.onnx"
    info = q.quantize_int8_cpu(tower["fp32"], path, per_channel=True)
    assert info["per_channel"] and "per output channel" in info["weights"]
    assert info["quantized_nodes"] == tower["info"]["quantized_nodes"]
    assert q.compare(_run(path, tower["feeds"]), tower["reference"])["cosine"] >= 0.99


def test_cpu_form_nodes_integer_ops_and_float_exclusions(tower):
    source = onnx.load(str(tower["fp32"]), load_external_data=False)
    graph = onnx.load(str(tower["cpu"])).graph
    info = tower["info"]
    ops = {node.op_type for node in graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert "DequantizeLinear" not in ops and "QuantizeLinear" not in ops  # not the Q/DQ form
    assert q.is_cpu_int8(tower["cpu"]) and not q.is_cpu_int8(tower["fp32"])
    assert info["quantized_nodes"] and info["integer_op_counts"]["MatMulInteger"] == len(info["quantized_nodes"])
    # The policy's exclusions (patch embeddings, projector, attention core, fusion) stay float nodes,
    # reading float tensors: none of their inputs comes from a quantizing op.
    excluded = q.excluded_nodes(source)
    assert info["excluded_nodes"] == excluded
    kinds = {row["kind"] for name, row in q.node_modules(source).items() if name in excluded}
    assert {"patch_embedding", "projector", "fusion"} <= kinds
    assert any(row["attention_core"] for name, row in q.node_modules(source).items() if name in excluded)
    by_name = {node.name: node for node in graph.node}
    producer = {out: node.op_type for node in graph.node for out in node.output}
    for name in excluded:
        node = by_name[name]  # still there, under its own name
        assert node.op_type in ("MatMul", "Conv", "Gemm")
        assert all(producer.get(i) not in ("DynamicQuantizeLinear", "Cast") for i in node.input), name
    assert not set(excluded) & set(info["quantized_nodes"])
    # Float parts stay FP32 (CPU): no FP16 tensor anywhere.
    assert all(t.data_type != onnx.TensorProto.FLOAT16 for t in graph.initializer)
    assert {t.data_type for t in graph.initializer} >= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT8}
    assert info["high_precision"] == "fp32" and not info["external_data"]


def test_cpu_form_of_a_large_graph(tower, monkeypatch, tmp_path):
    """Over protobuf's 2 GB (simulated): the fp32 graph with its weights in a side file, quantized
    without serialising a large ModelProto in memory, written as graph + .data; same result."""
    limit = 100_000
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", limit)  # the export writes the side file, unguarded
    from ftz_edge.export.vision import export_vision, input_shapes

    model = tower["model"]
    fp32 = export_vision(model.vision, input_shapes(model.vision, model.anchor_spec, model.augmenter_spec),
                         tmp_path / "fp32" / "vision.fp32.onnx")
    assert onnx_io.data_file(fp32).is_file()
    lower_limit(monkeypatch, limit)
    dst = tmp_path / "vision.cpu-int8.onnx"
    info = q.quantize_int8_cpu(fp32, dst)
    assert info["external_data"] and onnx_io.data_file(dst).is_file()
    assert info["bytes"] == onnx_io.total_bytes(dst)
    assert info["quantized_nodes"] == tower["info"]["quantized_nodes"]
    np.testing.assert_allclose(_run(dst, tower["feeds"][:2]), _run(tower["cpu"], tower["feeds"][:2]), atol=1e-5)


def test_runtime_vision_file_choice():
    from ftz_edge.manifest import TensorSpec, VisionSection
    from ftz_edge.runtime.vision import provider_plan, vision_file

    def section(**cpu_file):
        io = (TensorSpec("image_embeds", "float32", ("batch", 17, 32)),)
        return VisionSection(file="vision/vision.onnx", engine="onnx", precision="int8", inputs=io, outputs=io,
                             num_image_tokens=17, **cpu_file)

    both = section(cpu_file="vision/vision.cpu-int8.onnx")
    cpu_only = provider_plan("cpu", available=[CPU]).vision
    assert vision_file(both, cpu_only) == both.cpu_file
    for gpu in ([CUDA, CPU], [TENSORRT, CUDA, CPU], [TENSORRT, CPU]):
        assert vision_file(both, provider_plan("cpu", available=gpu).vision) == both.file
    # Asking for the CPU on a GPU machine is a CPU-only list: the CPU form.
    assert vision_file(both, provider_plan("cpu", [CPU], [CUDA, CPU]).vision) == both.cpu_file
    # Bundles without a CPU form (fp32, fp16, int8 --no-cpu-int8, older bundles) load their one graph.
    assert vision_file(section(), cpu_only) == "vision/vision.onnx"
    assert vision_file(section(cpu_file=None), cpu_only) == "vision/vision.onnx"


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    from ftz_edge.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "int8"
    return export_bundle(ExportOptions(out=str(out), precision="int8", llm_precision="int8", max_calib_images=4,
                                       sensitivity="off"))


def test_int8_bundle_carries_the_validated_cpu_form(int8_bundle):
    from ftz_edge.export.bundle import CPU_INT8_EVALUATED
    from ftz_edge.manifest import read_manifest

    manifest = read_manifest(int8_bundle)  # verifies every hash, and cpu_file as a path inside the bundle
    vision = manifest.vision
    assert vision.file == "vision/vision.onnx" and vision.cpu_file == "vision/vision.cpu-int8.onnx"
    assert {"vision/vision.onnx", "vision/vision.cpu-int8.onnx"} <= set(manifest.files)
    assert not q.is_cpu_int8(int8_bundle / vision.file) and q.is_cpu_int8(int8_bundle / vision.cpu_file)
    details = vision.cpu_precision_details
    assert details["precision"] == "int8" and details["high_precision"] == "fp32" and details["quantized_nodes"]
    assert details["excluded_nodes"] == vision.precision_details["excluded_nodes"]  # one policy, both forms
    validation = json.loads((int8_bundle / "reports" / "validation.json").read_text())
    rows = [row for row in validation["vision"] if row["evaluated"] == CPU_INT8_EVALUATED]
    assert sorted(row["batch"] for row in rows) == [1, 4]
    assert all(row["target"] == 0.99 and row["ok"] and row["cosine"] >= 0.99 for row in rows)
    assert validation["passed"]


def _recording_sessions(monkeypatch, available):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(available))
    sessions = []
    real = onnxruntime.InferenceSession

    def recording(model, sess_options=None, providers=None, **kwargs):
        sessions.append((Path(str(model)).relative_to(Path(str(model)).parents[1]).as_posix(), list(providers)))
        return real(model, sess_options=sess_options, providers=[CPU], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    return sessions


def test_runtime_loads_the_cpu_form_on_a_cpu(int8_bundle, monkeypatch):
    from ftz_edge.runtime.engine import FtZRuntime
    from ftz_edge.runtime.generation import GenerationConfig

    sessions = _recording_sessions(monkeypatch, [CPU])
    runtime = FtZRuntime(int8_bundle)
    assert runtime.vision_file == "vision/vision.cpu-int8.onnx"
    assert [path for path, _ in sessions if path.startswith("vision/")] == ["vision/vision.cpu-int8.onnx"]
    answer = runtime.answer(str(sorted((MODEL_DIR / "examples").glob("*.png"))[0]), "What is in the image?",
                            GenerationConfig(max_new_tokens=4))
    assert isinstance(answer, str) and answer.strip()


@pytest.mark.parametrize("available", [[CUDA, CPU], [TENSORRT, CUDA, CPU]])
def test_runtime_loads_the_qdq_graph_on_a_gpu(int8_bundle, monkeypatch, available):
    from ftz_edge.runtime.engine import FtZRuntime

    sessions = _recording_sessions(monkeypatch, available)
    runtime = FtZRuntime(int8_bundle)
    assert runtime.vision_file == "vision/vision.onnx"
    assert [(path, providers) for path, providers in sessions if path.startswith("vision/")] == \
        [("vision/vision.onnx", available)]


def test_no_cpu_int8_flag(monkeypatch, tmp_path):
    from ftz_edge.export import bundle as bundle_module

    seen = []

    def fake_export(options):
        seen.append(options)
        return tmp_path

    monkeypatch.setattr(bundle_module, "export_bundle", fake_export)
    monkeypatch.setattr(bundle_module, "summary", lambda out: "")
    assert bundle_module.main(["--out", str(tmp_path / "b"), "--precision", "int8", "--no-cpu-int8"]) == 0
    assert bundle_module.main(["--out", str(tmp_path / "b"), "--precision", "int8"]) == 0
    assert [options.cpu_int8 for options in seen] == [False, True]


def test_the_bench_times_the_cpu_form_ftz_export_writes(int8_bundle, tmp_path, monkeypatch):
    """One builder, not two: ftz-bench's int8-dynamic tower of the default model is the graph an
    int8 bundle ships as vision.cpu-int8.onnx (same nodes, same excluded nodes, same weights)."""
    monkeypatch.setenv("FTZ_EDGE_CACHE", str(tmp_path))
    from ftz_edge.bench import artifacts

    artifacts.build_vision_onnx("default", None, "int8-dynamic")
    benched = onnx.load(str(artifacts.vision_onnx("default", None, "int8-dynamic")))
    shipped = onnx.load(str(int8_bundle / "vision" / "vision.cpu-int8.onnx"))
    assert [(n.op_type, n.name) for n in benched.graph.node] == [(n.op_type, n.name) for n in shipped.graph.node]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in shipped.graph.initializer}
    for tensor in benched.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), weights[tensor.name])
