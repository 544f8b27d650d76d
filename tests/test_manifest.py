"""The bundle manifest: one validated contract (every field the runtime reads, paths confined to
the bundle), and the rule for which folders an export may replace (issue 13, items 1 and 5)."""

import dataclasses
import json
from pathlib import Path

import pytest

from ftz_edge.atomic import DestinationError, atomic_folder
from ftz_edge.manifest import (
    MANIFEST_NAME, SCHEMA_VERSION, BundleError, BundleManifest, EncoderShape, TensorSpec, check_replaceable, is_bundle,
    read_manifest, write_manifest,
)
from ftz_edge.preprocess import clip_spec, dinov2_spec

FILES = {"vision/vision.onnx": b"graph", "llm/model.onnx": b"decoder", "llm/embed_tokens.npy": b"table",
         "llm/genai_config.json": b"{}", "llm/tokenizer.json": b"{}", "reports/validation.json": b"{}"}


ENCODER = {"tokens": 17, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_layers": 3}


def content(tokens: int = 17) -> dict:
    """The sections ftz-export writes (export/bundle.py), with small made-up values."""
    io = lambda name, shape: {"name": name, "dtype": "float32", "shape": shape}  # noqa: E731
    return {
        "vision": {"file": "vision/vision.onnx", "engine": "onnx", "precision": "fp32",
                   "inputs": [io("anchor_pixels", ["batch", 3, 64, 64])], "outputs": [io("image_embeds", ["batch", tokens, 128])],
                   "num_image_tokens": tokens, "tower_kind": "ftz", "fusion_layers": [[2, 2]], "tensorrt": None,
                   "encoders": {"anchor": ENCODER, "augmenter": {**ENCODER, "tokens": 50, "num_layers": 2}}},
        "llm": {"file": "model.onnx", "genai_config": "genai_config.json", "embeddings": "embed_tokens.npy",
                "tokenizer": "tokenizer.json", "precision": "fp32", "execution_provider": "cpu", "hidden_size": 128,
                "num_layers": 2, "num_kv_heads": 2, "head_size": 32, "vocab_size": 383, "context_length": 1024,
                "num_attention_heads": 4, "intermediate_size": 512, "folder": "llm", "inputs": [io("inputs_embeds", ["batch_size", "sequence_length", 128])],
                "outputs": [io("logits", ["batch_size", 1, 383])]},
        "preprocess": {"anchor": clip_spec(64).to_dict(), "augmenter": dinov2_spec(56, 64).to_dict()},
        "prompt": {"chat_template": "{{ messages }}", "bos_token": "", "eos_token": "<|im_end|>", "eos_token_ids": [2],
                   "pad_token_id": 0, "image_placeholder": "<image>", "image_token_id": -200,
                   "tokenizer": "llm/tokenizer.json", "max_length": 256},
        "provenance": {"checkpoint": "/somewhere", "tools": {"ftz-edge": "0.1.0"}},
        "validation": {"file": "reports/validation.json", "passed": True},
    }


def typed(sections: dict, folder: Path) -> BundleManifest:
    """The sections as the BundleManifest ftz-export builds (files are filled in by write_manifest)."""
    return BundleManifest.from_dict({**sections, "files": {}}, folder)


def make_bundle(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for relative, data in FILES.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    write_manifest(folder, typed(content(**changes), folder))
    return folder


def edit(bundle: Path, change) -> None:
    """Change the written manifest by hand (as a tamperer or a broken exporter would)."""
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    change(manifest)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_manifest_round_trip_and_tamper_detection(tmp_path):
    # Moved from test_export.py, with a complete manifest (read_manifest now validates it).
    bundle = make_bundle(tmp_path / "b")
    (bundle / "notes.txt").write_text("x")
    written = write_manifest(bundle, typed(content(), bundle))
    read = read_manifest(bundle)
    assert read == written and set(read.files) == {*FILES, "notes.txt"}
    (bundle / "vision" / "vision.onnx").write_bytes(b"grapH")  # same size, other bytes
    with pytest.raises(BundleError, match="vision/vision.onnx does not match its sha256"):
        read_manifest(bundle)
    (bundle / "vision" / "vision.onnx").unlink()
    with pytest.raises(BundleError, match="vision/vision.onnx is missing"):
        read_manifest(bundle)
    edit(bundle, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="schema version 99"):
        read_manifest(bundle, verify=False)


def _drop(section, key=None):
    return lambda m: m.pop(section) if key is None else m[section].pop(key)


def _set(section, key, value):
    return lambda m: m[section].__setitem__(key, value)


@pytest.mark.parametrize("change, message", [
    (_drop("llm"), r"llm is missing"),
    (_drop("prompt"), r"prompt is missing"),
    (_drop("vision", "num_image_tokens"), r"vision.num_image_tokens is missing"),
    (_drop("llm", "context_length"), r"llm.context_length is missing"),
    (_drop("prompt", "eos_token_ids"), r"prompt.eos_token_ids is missing"),
    (_drop("preprocess", "anchor"), r"preprocess.anchor is missing"),
    (_drop("preprocess", "augmenter"), r"preprocess.augmenter is missing"),  # null is fine (a clip tower), absent is not
    (lambda m: m.__setitem__("llm", []), r"llm must be an object, not list"),
    (_set("llm", "context_length", "1024"), r"llm.context_length must be a positive integer"),
    (_set("vision", "num_image_tokens", True), r"vision.num_image_tokens must be a positive integer"),
    (_set("vision", "num_image_tokens", 18), r"vision.num_image_tokens is 18 but the vision graph's output image_embeds has 17"),
    (_set("vision", "engine", "tflite"), r"vision.engine must be one of onnx, trt"),
    (_set("vision", "outputs", []), r"vision.outputs must be a non-empty list"),
    (_set("vision", "inputs", [{"name": "x"}]), r"vision.inputs\[0\] must be"),
    (_set("prompt", "eos_token_ids", []), r"prompt.eos_token_ids must be a non-empty list of integers"),
    (_set("preprocess", "anchor", {"crop": 3}), r"preprocess.anchor is not a valid ImageProcessorSpec"),
    (_set("vision", "tensorrt", {"record": {}}), r"vision.tensorrt.file must be a relative path"),
    (lambda m: m["files"]["llm/model.onnx"].pop("sha256"), r"files\['llm/model.onnx'\] must be"),
    (lambda m: m.pop("files"), r"files is missing"),
    # nested fields: one error naming the whole path
    (lambda m: m["vision"].__setitem__("tensorrt", {"file": "vision/vision.onnx", "record": "x"}),
     r"vision.tensorrt.record must be an object, got str"),
    (lambda m: m["vision"]["encoders"]["anchor"].__setitem__("hidden_size", "64"),
     r"vision.encoders.anchor.hidden_size must be a positive integer, got '64'"),
    (lambda m: m["vision"]["encoders"]["augmenter"].pop("num_layers"), r"vision.encoders.augmenter.num_layers is missing"),
    (lambda m: m["vision"]["encoders"].__setitem__("augmenter", None),
     r"vision.encoders.augmenter must be given exactly when preprocess.augmenter is"),
    (lambda m: m["llm"]["outputs"][0].__setitem__("shape", []), r"llm.outputs\[0\] must be"),
    (_set("vision", "fusion_layers", [[1]]), r"vision.fusion_layers must be a list of \[anchor layer, augmenter layer\]"),
    (_set("llm", "num_attention_heads", 0), r"llm.num_attention_heads must be a positive integer"),
    (_set("validation", "passed", "yes"), r"validation.passed must be true or false"),
    (_set("prompt", "chat_template", 3), r"prompt.chat_template must be a string, got int"),
    # the runtime splices images at ftz_edge.prompt's sentinel, behind its placeholder: the bundle must agree
    (_set("prompt", "image_token_id", -201), r"prompt.image_token_id is -201, but this ftz-edge marks image positions "
                                            r"with -200"),
    (_set("prompt", "image_placeholder", "<img>"), r"prompt.image_placeholder is '<img>'"),
])
def test_a_malformed_manifest_is_one_error_naming_the_field(tmp_path, change, message):
    bundle = make_bundle(tmp_path / "b")
    edit(bundle, change)
    with pytest.raises(BundleError, match=message):
        read_manifest(bundle, verify=False)


@pytest.mark.parametrize("field, value", [
    ("vision.file", "../../../etc/passwd"),
    ("vision.file", "/etc/passwd"),
    ("llm.folder", ".."),
    ("llm.embeddings", "../../outside.npy"),
    ("prompt.tokenizer", "llm/../../x.json"),
    ("validation.file", "../x"),
    ("files", "../../etc/passwd"),
])
def test_paths_must_stay_inside_the_bundle(tmp_path, field, value):
    bundle = make_bundle(tmp_path / "b")

    def change(m):
        if field == "files":
            m["files"][value] = {"bytes": 1, "sha256": "0" * 64}
        else:
            section, key = field.split(".")
            m[section][key] = value

    edit(bundle, change)
    with pytest.raises(BundleError, match=rf"{field.replace('files', 'files.*')}.*(inside the bundle|leads outside)"):
        read_manifest(bundle, verify=False)


def test_a_symbolic_link_out_of_the_bundle_is_refused(tmp_path):
    secret = tmp_path / "secret.onnx"
    secret.write_bytes(b"not yours")
    bundle = make_bundle(tmp_path / "b")
    (bundle / "vision" / "vision.onnx").unlink()
    (bundle / "vision" / "vision.onnx").symlink_to(secret)
    with pytest.raises(BundleError, match="vision.file must stay inside the bundle"):
        read_manifest(bundle, verify=False)
    (bundle / "vision").rename(bundle / "vision-real")
    (bundle / "vision").symlink_to(tmp_path)  # a linked folder, same story
    with pytest.raises(BundleError, match="vision.file must stay inside the bundle"):
        read_manifest(bundle, verify=False)


def test_optional_and_nullable_fields(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    edit(bundle, lambda m: (m["preprocess"].__setitem__("augmenter", None), m.pop("provenance"), m.pop("validation"),
                            m["llm"].pop("genai_config"), m["vision"].pop("tensorrt"),
                            m["vision"]["encoders"].__setitem__("augmenter", None)))
    manifest = read_manifest(bundle, verify=False)
    assert manifest.preprocess.augmenter is None and manifest.vision.tensorrt is None and manifest.validation is None
    assert manifest.llm.genai_config is None and manifest.provenance == {}


def test_a_bundle_from_before_the_recorded_sizes_still_loads(tmp_path):
    """Bundles exported before vision.encoders, llm.num_attention_heads and llm.intermediate_size
    were recorded load with those None (ftz-doctor then falls back to its assumptions)."""
    bundle = make_bundle(tmp_path / "b")
    edit(bundle, lambda m: (m["vision"].pop("encoders"), m["llm"].pop("num_attention_heads"),
                            m["llm"].pop("intermediate_size"), m["vision"].__setitem__("dynamic_axes", {"x": {"0": "batch"}})))
    manifest = read_manifest(bundle, verify=False)
    assert manifest.vision.encoders is None and manifest.llm.num_attention_heads is None
    assert manifest.llm.intermediate_size is None
    assert manifest.vision.extra == {"dynamic_axes": {"x": {"0": "batch"}}}  # no longer written; kept, never read


def test_typed_sections_and_the_json_round_trip(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    on_disk = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest = read_manifest(bundle)
    assert BundleManifest.from_dict(on_disk, bundle).to_dict() == on_disk == manifest.to_dict()
    assert BundleManifest.from_dict(manifest.to_dict(), bundle) == manifest
    # attribute names are the JSON keys; sequences are tuples; specs are the preprocess dataclass
    assert manifest.vision.outputs[0] == TensorSpec("image_embeds", "float32", ("batch", 17, 128))
    assert manifest.vision.fusion_layers == ((2, 2),) and manifest.prompt.eos_token_ids == (2,)
    assert manifest.preprocess.anchor == clip_spec(64) and manifest.preprocess.augmenter == dinov2_spec(56, 64)
    assert manifest.vision.encoders.anchor == EncoderShape(**ENCODER)
    assert manifest.files["llm/model.onnx"].bytes == len(FILES["llm/model.onnx"])
    assert manifest.schema_version == SCHEMA_VERSION and manifest.llm.execution_provider == "cpu"
    # keys this ftz-edge does not know (a newer exporter's) are kept and written back, never read
    edit(bundle, lambda m: (m["llm"].__setitem__("future_key", [1, 2]), m.__setitem__("notes", "hand-written")))
    newer = read_manifest(bundle, verify=False)
    assert newer.llm.extra == {"future_key": [1, 2]} and newer.extra == {"notes": "hand-written"}
    rewritten = write_manifest(bundle, newer)
    assert json.loads((bundle / MANIFEST_NAME).read_text())["llm"]["future_key"] == [1, 2]
    assert rewritten == read_manifest(bundle)


def test_write_manifest_refuses_what_the_runtime_could_not_read(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    broken = content()
    broken["llm"].pop("folder")
    with pytest.raises(BundleError, match="llm.folder is missing"):  # a manifest is built through the same checks
        typed(broken, bundle)
    manifest = typed(content(), bundle)
    # A BundleManifest built in Python is checked through its JSON form before anything is written.
    for section, change, message in [
        ("llm", {"folder": None}, r"llm.folder must be a relative path inside the bundle, got None"),
        ("llm", {"folder": "../elsewhere"}, r"llm.folder must stay inside the bundle"),
        ("llm", {"context_length": 0}, r"llm.context_length must be a positive integer, got 0"),
        ("prompt", {"eos_token_ids": ()}, r"prompt.eos_token_ids must be a non-empty list of integers"),
    ]:
        before = (bundle / MANIFEST_NAME).read_text()
        bad = dataclasses.replace(manifest, **{section: dataclasses.replace(getattr(manifest, section), **change)})
        with pytest.raises(BundleError, match=message):
            write_manifest(bundle, bad)
        assert (bundle / MANIFEST_NAME).read_text() == before  # nothing written
    with pytest.raises(TypeError, match="BundleManifest"):
        write_manifest(bundle, content())


def test_the_runtime_reports_a_missing_section_not_a_key_error(tmp_path):
    from ftz_edge.runtime.engine import FtZRuntime

    bundle = make_bundle(tmp_path / "b")
    edit(bundle, _drop("llm"))
    with pytest.raises(BundleError, match="llm is missing"):
        FtZRuntime(bundle, verify=False)


# -- which folders an export may replace -----------------------------------------------------------
def test_only_a_provable_bundle_is_replaceable(tmp_path):
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / MANIFEST_NAME).write_text('{"name": "x"}')
    (webapp / "index.html").write_text("precious")
    assert not is_bundle(webapp)
    with pytest.raises(BundleError, match="not an ftz-edge manifest"):
        check_replaceable(webapp)
    with pytest.raises(DestinationError, match="exists and is not an ftz bundle"), \
            atomic_folder(webapp, check_replaceable, "an ftz bundle") as tmp:
        (tmp / "x").write_text("new")
    assert (webapp / "index.html").read_text() == "precious"

    bundle = make_bundle(tmp_path / "bundle")
    assert is_bundle(bundle)
    with atomic_folder(bundle, check_replaceable, "an ftz bundle") as tmp:
        (tmp / "x").write_text("new")
    assert sorted(p.name for p in bundle.iterdir()) == ["x"]


def test_a_bundle_holding_unlisted_files_is_not_replaced(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "my-notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="files its manifest does not list.*my-notes.txt"):
        check_replaceable(bundle)


@pytest.mark.parametrize("manifest, replaceable", [
    ({"schema_version": SCHEMA_VERSION + 1, "files": {}, "provenance": {"tools": {"ftz-edge": "9.0"}}}, True),
    ({"schema_version": 0, "files": {}, "provenance": {"tools": {"ftz-edge": "0.0.1"}}}, True),
    ({"schema_version": 2, "files": {}}, False),
    ([1, 2], False),
    ("not json", False),
])
def test_a_bundle_of_another_schema_version_may_be_replaced(tmp_path, manifest, replaceable):
    """A re-export must be able to replace an outdated bundle (the runtime tells users to do so)."""
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / MANIFEST_NAME).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    assert is_bundle(folder) == replaceable


def test_shipped_modules_stay_python_3_10_and_torch_free():
    """manifest.py and atomic.py are device code (JetPack 6: Python 3.10, no torch)."""
    import ast

    root = Path(__file__).resolve().parent.parent / "ftz_edge"
    for name in ("manifest.py", "atomic.py"):
        tree = ast.parse((root / name).read_text(), feature_version=(3, 10))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"torch", "transformers", "safetensors"}, (name, imported)
