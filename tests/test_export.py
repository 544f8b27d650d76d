"""ftz-export: vision graphs per tower kind and precision, LLM parity, manifest, bundle, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import make_config
from ftz_edge.checkpoint import save_checkpoint
from ftz_edge.export import bundle as bundle_module
from ftz_edge.export.validate import ValidationReport, validate_vision
from ftz_edge.export.vision import export_vision, input_shapes, layers_in_graph
from ftz_edge.manifest import read_manifest
from ftz_edge.mllm import FtZForCausalLM

DEFAULT = Path(__file__).resolve().parent.parent / "ftz_edge" / "default_model"
EXAMPLES = sorted((DEFAULT / "examples").glob("*.png"))


def pixels_for(model, n=3):
    from ftz_edge.export.bundle import _pixels

    return _pixels(model, (EXAMPLES * 2)[:n])


@pytest.fixture(scope="module")
def trained_models(tiny_components):
    """Each tower kind with non-trivial fusion/projector weights."""
    models = {}
    for kind in ("ftz", "clip", "mof"):
        model = FtZForCausalLM.from_config(make_config(tiny_components, kind, fusion_init="default")).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            for value in model.vision.trainable_state_dict().values():
                value.add_(torch.randn_like(value) * 0.02)
        models[kind] = model
    return models


@pytest.mark.parametrize("kind", ["ftz", "clip", "mof"])
def test_every_tower_kind_exports_at_every_precision(trained_models, tmp_path, kind):
    from ftz_edge.export import quantize

    model = trained_models[kind]
    shapes = input_shapes(model.vision, model.anchor_spec, model.augmenter_spec)
    fp32 = export_vision(model.vision, shapes, tmp_path / "fp32.onnx")
    pixels = pixels_for(model)
    calibration = [{k: v[i:i + 1] for k, v in pixels.items()} for i in range(3)]
    paths = {"fp32": fp32, "fp16": tmp_path / "fp16.onnx", "int8": tmp_path / "int8.onnx"}
    quantize.convert_fp16(fp32, paths["fp16"])
    quantize.quantize_int8(fp32, paths["int8"], calibration, method="minmax")
    for precision, path in paths.items():
        report = ValidationReport()
        validate_vision(path, model.vision, pixels, precision, report)
        judged = [row for row in report.vision if row["target"] is not None]
        assert [row["batch"] for row in judged] == [1, 3]  # the dynamic batch axis
        assert report.passed, report.warnings
        assert judged[0]["cosine"] >= {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}[precision]


def test_pruned_layers_are_absent_from_the_graph(tiny_components, tmp_path):
    model = FtZForCausalLM.from_config(make_config(tiny_components, fusion_layers=[[1, 2]], select_layer=2))
    shapes = input_shapes(model.vision, model.anchor_spec, model.augmenter_spec)
    graph = onnx.load(str(export_vision(model.vision, shapes, tmp_path / "v.onnx")))
    assert layers_in_graph(graph) == {"anchor": {0, 1}, "augmenter": {0, 1}}  # of 4 and 4
    clip_only = FtZForCausalLM.from_config(make_config(tiny_components, "clip", select_layer=-2))  # the last layer unused
    shapes = input_shapes(clip_only.vision, clip_only.anchor_spec, clip_only.augmenter_spec)
    graph = onnx.load(str(export_vision(clip_only.vision, shapes, tmp_path / "c.onnx")))
    assert layers_in_graph(graph) == {"anchor": {0, 1, 2}, "augmenter": set()}
    assert [i.name for i in graph.graph.input] == ["anchor_pixels"]


def test_llm_export_greedy_parity_over_32_steps(tiny_components, tmp_path):
    from ftz_edge.export.llm import export_llm
    from ftz_edge.export.validate import validate_llm
    from ftz_edge.runtime.decoder import OnnxDecoder

    model = FtZForCausalLM.from_config(make_config(tiny_components)).eval()
    info = export_llm(model, tmp_path / "llm", "fp32", "cpu")
    assert info["embeddings_dtype"] == "float32" and (tmp_path / "llm" / "tokenizer.json").is_file()
    report = ValidationReport()
    # No EOS: a random tiny LLM then runs all 32 steps, and every one must match.
    validate_llm(OnnxDecoder(tmp_path / "llm"), model, EXAMPLES[0], "fp32", report, eos_token_ids=[])
    assert report.llm["steps"] == 32 and report.llm["identical"], report.llm
    # The graph returns the last position's logits only (a prefill's full block is ~370 MB for
    # Qwen2.5 with 600 tokens), and they are transformers' last-position logits.
    decoder = OnnxDecoder(tmp_path / "llm")
    shapes = {o.name: o.shape for o in decoder.session.get_outputs()}
    assert shapes["logits"][1] == 1
    ids = [5, 17, 42, 9, 3, 77, 12]
    logits, _ = decoder.forward(decoder.embed(ids)[None], decoder.empty_cache())
    with torch.no_grad():
        expected = model.llm(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(logits[0], expected, atol=1e-4)
    table = np.load(tmp_path / "llm" / "embed_tokens.npy")
    assert np.array_equal(table, model.llm.get_input_embeddings().weight.detach().numpy())


EXPORTED = {}  # what ftz-export handed to write_manifest, and what write_manifest returned


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "int8"
    real = bundle_module.write_manifest

    def recording(bundle, manifest):
        EXPORTED["built"], EXPORTED["written"] = manifest, real(bundle, manifest)
        return EXPORTED["written"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bundle_module, "write_manifest", recording)
        code = bundle_module.main(["--out", str(out), "--engine", "auto", "--precision", "int8", "--llm-precision", "fp32",
                                   "--calib-method", "minmax"])
    assert code == 0
    return out


def test_default_export_writes_a_complete_validated_bundle(int8_bundle):
    manifest = read_manifest(int8_bundle)  # verifies every hash
    assert manifest.vision.engine == "onnx"  # no TensorRT here: auto falls back, and says why
    assert "TensorRT" in manifest.provenance["engine_choice"] or "GPU" in manifest.provenance["engine_choice"]
    assert manifest.vision.precision == "int8"
    assert manifest.vision.num_image_tokens == 16 + 1  # 4x4 anchor patches + CLS
    assert manifest.preprocess.anchor.crop_height == 64
    assert manifest.prompt.image_token_id == -200 and manifest.prompt.eos_token_ids
    assert manifest.llm.precision == "fp32" and manifest.llm.inputs[0].name in ("attention_mask", "inputs_embeds")
    files = set(manifest.files)
    assert {"vision/vision.onnx", "llm/model.onnx", "llm/embed_tokens.npy", "llm/tokenizer.json",
            "reports/validation.json", "reports/int8_sensitivity.md"} <= files
    validation = json.loads((int8_bundle / "reports" / "validation.json").read_text())
    assert validation["passed"] and validation["llm"]["identical"]
    assert all(row["cosine"] >= 0.99 for row in validation["vision"] if row["target"])
    assert {row["evaluated"] for row in validation["vision"]} == {"as written", "onnxruntime CPU int8 kernels",
                                                                  "onnxruntime CPU int8 (cpu form)"}
    assert not [p for p in int8_bundle.parent.iterdir() if ".tmp-" in p.name]


def test_the_exported_manifest_is_what_read_manifest_gives_back(int8_bundle):
    """The BundleManifest ftz-export builds is exactly the one the runtime reads (files and schema
    version are filled in by write_manifest), and the JSON on disk round-trips through the dataclasses."""
    import dataclasses

    from ftz_edge.manifest import SCHEMA_VERSION, BundleManifest, EncoderShape, EncodersSection

    read = read_manifest(int8_bundle)
    assert EXPORTED["written"] == read
    assert dataclasses.replace(EXPORTED["built"], files=read.files) == read  # built with the types read gives back
    on_disk = json.loads((int8_bundle / "manifest.json").read_text())
    assert BundleManifest.from_dict(on_disk, int8_bundle).to_dict() == on_disk == read.to_dict()
    assert on_disk["schema_version"] == SCHEMA_VERSION and not read.extra and not read.vision.extra
    # What ftz-doctor's memory budget needs is recorded, not assumed: the tiny components' sizes.
    config = {part: json.loads((DEFAULT / part / "config.json").read_text()) for part in ("anchor", "augmenter", "llm")}
    a, g, crop = config["anchor"], config["augmenter"], read.preprocess.augmenter
    assert read.vision.encoders == EncodersSection(
        anchor=EncoderShape(tokens=16 + 1, hidden_size=a["hidden_size"], intermediate_size=a["intermediate_size"],
                            num_attention_heads=a["num_attention_heads"],
                            num_layers=a["num_hidden_layers"]),  # select_layer -1: every layer runs
        augmenter=EncoderShape(tokens=(crop.crop_height // g["patch_size"]) * (crop.crop_width // g["patch_size"]) + 1,
                               hidden_size=g["hidden_size"], intermediate_size=g["hidden_size"] * g["mlp_ratio"],
                               num_attention_heads=g["num_attention_heads"],
                               num_layers=max(layer for _, layer in read.vision.fusion_layers)))
    assert (read.llm.num_attention_heads, read.llm.intermediate_size) == (config["llm"]["num_attention_heads"],
                                                                          config["llm"]["intermediate_size"])


def test_export_replaces_an_existing_bundle_atomically(int8_bundle, tmp_path, monkeypatch):
    copy = tmp_path / "bundle"
    shutil.copytree(int8_bundle, copy)
    before = read_manifest(copy)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated crash in the middle of an export")

    monkeypatch.setattr("ftz_edge.export.llm.export_llm", fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        bundle_module.export_bundle(bundle_module.ExportOptions(out=str(copy), precision="fp32", llm_precision="fp32"))
    assert read_manifest(copy) == before  # the old bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/nonexistent/ckpt"], "cannot load checkpoint /nonexistent/ckpt"),
    (["--calib-images", "EMPTY"], "has no readable images"),
    (["--engine", "trt"], "TensorRT"),
    (["--llm-precision", "fp16", "--llm-provider", "cpu"], "LLM precision fp16 can be built for cuda, not cpu"),
    (["--out", "/proc/forbidden/bundle"], "cannot write the bundle"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "broken.png").write_bytes(b"not a png")
    args = [str(tmp_path / "EMPTY") if a == "EMPTY" else a for a in args]
    out = tmp_path / "bundle"
    full = ["--out", str(out), "--llm-precision", "fp32", *args] if "--out" not in args else args
    assert bundle_module.main(full) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ftz-export: error:") and message in err[-1], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_config_weights_mismatch_is_refused(tiny_components, tmp_path, capsys):
    model = FtZForCausalLM.from_config(make_config(tiny_components))
    save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "ftz_config.json").read_text())
    config["tower"]["num_fusion_points"] = 1
    (tmp_path / "ckpt" / "ftz_config.json").write_text(json.dumps(config))
    assert bundle_module.main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "b")]) == 2
    assert "does not match the model its config builds" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_an_existing_folder_that_is_not_a_bundle_is_never_replaced(tmp_path, capsys):
    precious = tmp_path / "Documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    assert bundle_module.main(["--out", str(precious), "--llm-precision", "fp32"]) == 2
    assert "exists and is not an ftz bundle" in capsys.readouterr().err
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_a_web_app_folder_with_a_manifest_json_is_never_replaced(tmp_path, capsys):
    """The adversarial case: a manifest.json that is not ours does not make a folder a bundle."""
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "x"}')
    (webapp / "index.html").write_text("precious")
    assert bundle_module.main(["--out", str(webapp), "--llm-precision", "fp32"]) == 2
    assert "ftz-export: error:" in capsys.readouterr().err
    assert (webapp / "index.html").read_text() == "precious"


@pytest.mark.parametrize("stage_function, error, message", [
    ("convert_fp16", "EncodeError", "FP16 conversion failed: EncodeError: Failed to serialize proto"),
    ("convert_fp16", "MemoryError", "FP16 conversion: out of memory"),
    ("convert_fp16", "OSError", "FP16 conversion: No space left on device"),
])
def test_a_library_failure_inside_a_stage_is_one_line_naming_the_stage(tmp_path, capsys, monkeypatch, stage_function,
                                                                       error, message):
    """What the paper-size export printed was protobuf's traceback; now any stage's failure is one
    line with the stage's name, exit status 2, and nothing written."""
    import errno

    from google.protobuf.message import EncodeError

    from ftz_edge.export import quantize

    raised = {"EncodeError": EncodeError("Failed to serialize proto"), "MemoryError": MemoryError(),
              "OSError": OSError(errno.ENOSPC, "No space left on device")}[error]

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(quantize, stage_function, fail)
    monkeypatch.delenv("FTZ_DEBUG", raising=False)
    out = tmp_path / "bundle"
    assert bundle_module.main(["--out", str(out), "--precision", "fp16", "--llm-precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ftz-export: error:") and message in last, last
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
