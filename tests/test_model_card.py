"""Model cards: the Hub's README.md (YAML front matter + Markdown), written from what a checkpoint
or a bundle records and nothing else."""

import json
import re

import pytest
import yaml

from conftest import make_config
from ftz_edge import DEFAULT_MODEL
from ftz_edge.config import FtZConfig, TowerConfig
from ftz_edge.model_card import CARD_NAME, bundle_card, checkpoint_card, write_card

REQUIRED = {"library_name", "license", "tags", "pipeline_tag"}


def split(card: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", card, re.S)
    assert match, "the card must start with YAML front matter between --- lines"
    return yaml.safe_load(match.group(1)), match.group(2)


def pairs_in(body: str) -> list[list[int]]:
    line = next(line for line in body.splitlines() if line.startswith("- **fusion points**"))
    return [[int(a), int(g)] for a, g in re.findall(r"(\d+) ↔ (\d+)", line)]


@pytest.fixture(scope="module")
def default_model():
    from ftz_edge.checkpoint import load_checkpoint

    return load_checkpoint(DEFAULT_MODEL)


def test_the_shipped_default_models_card(default_model):
    meta, body = split(checkpoint_card(DEFAULT_MODEL))
    assert REQUIRED <= set(meta) and meta["pipeline_tag"] == "image-text-to-text"
    assert {"vision-language", "ftz"} <= set(meta["tags"])
    assert "base_model" not in meta and meta["license"] == "apache-2.0"  # every part stored and trained here
    for section in ("## Model description", "## Training", "## Evaluation", "## Intended use and limitations",
                    "## How to use"):
        assert section in body
    # The fusion pairs are the ones the built tower runs, and the other settings the config's.
    assert pairs_in(body) == default_model.vision.fusion_layers
    config = json.loads((DEFAULT_MODEL / "ftz_config.json").read_text())
    assert f"{default_model.vision.num_image_tokens} image tokens per image" in body
    assert f"{config['tower']['fusion_heads']} MHCA heads" in body and f"`{config['preset']}`" in body
    assert "tiny model trained on synthetic data" in body
    # Every accuracy in the card is eval.json's, row for row.
    evaluation = json.loads((DEFAULT_MODEL / "eval.json").read_text())
    for name, result in evaluation["results"].items():
        section = body.split(f"### {name}\n", 1)[1].split("\n\n", 1)[0]
        rows = {**result["per_type"], "**overall**": result["overall"]}
        for qtype, row in rows.items():
            assert f"| {qtype} | {row['n']} | {row['correct']} | {row['accuracy']:.3f} | {row['chance']:.3f} | " \
                   f"{row['majority']:.3f} |" in section
    train = json.loads((DEFAULT_MODEL / "train_config.json").read_text())
    assert f"| max_steps | {train['max_steps']} |" in body and f"| stage | {train['stage']} |" in body


def test_a_card_from_the_model_is_the_card_from_its_folder(default_model):
    assert checkpoint_card(default_model, folder=DEFAULT_MODEL) == checkpoint_card(DEFAULT_MODEL)


def test_hub_components_are_base_models_and_nothing_is_invented(tmp_path):
    config = FtZConfig(tower=TowerConfig(anchor="openai/clip-vit-large-patch14-336", augmenter="facebook/dinov2-large"),
                       llm="Qwen/Qwen2.5-0.5B-Instruct")
    config.save(tmp_path)
    meta, body = split(checkpoint_card(tmp_path))
    assert meta["base_model"] == ["openai/clip-vit-large-patch14-336", "facebook/dinov2-large",
                                  "Qwen/Qwen2.5-0.5B-Instruct"]
    assert meta["license"] == "other"  # each base model's own
    assert "Not evaluated" in body and "No training record" in body
    assert "4 points (paper preset), resolved from the encoders' depths" in body  # not downloaded to resolve
    assert not re.search(r"\d\.\d{3}", body)  # no accuracy anywhere

    explicit = FtZConfig(tower=TowerConfig(anchor="openai/clip-vit-large-patch14-336", augmenter="facebook/dinov2-large",
                                           fusion_layers=[[6, 6], [12, 12], [18, 18], [24, 24]]),
                         llm="Qwen/Qwen2.5-0.5B-Instruct")
    explicit.save(tmp_path)
    assert pairs_in(split(checkpoint_card(tmp_path))[1]) == [[6, 6], [12, 12], [18, 18], [24, 24]]


@pytest.mark.parametrize("kind", ["ftz", "clip", "mof"])
def test_cards_of_each_tower_kind_from_a_model(tiny_components, kind):
    from ftz_edge.mllm import FtZForCausalLM

    model = FtZForCausalLM.from_config(make_config(tiny_components, kind))
    meta, body = split(checkpoint_card(model))
    assert REQUIRED <= set(meta) and kind in meta["tags"]
    assert "base_model" not in meta  # local folders are not Hub ids
    assert f"`{kind}`" in body and "Not evaluated" in body
    assert ("**augmenter**" in body) == (kind != "clip")
    if kind == "ftz":
        assert pairs_in(body) == model.vision.fusion_layers


def test_write_card_is_atomic_and_replaces(tmp_path):
    write_card(tmp_path, "old\n")
    path = write_card(tmp_path, "---\nlicense: apache-2.0\n---\nnew\n")
    assert path == tmp_path / CARD_NAME and path.read_text() == "---\nlicense: apache-2.0\n---\nnew\n"
    assert [p.name for p in tmp_path.iterdir()] == [CARD_NAME]


def _manifest(**prompt) -> dict:
    return {
        "vision": {"file": "vision/vision.onnx", "engine": "onnx", "precision": "int8", "num_image_tokens": 17,
                   "tower_kind": "ftz", "fusion_layers": [[2, 2], [4, 4]], "cpu_file": "vision/vision.cpu-int8.onnx",
                   "encoders": {"anchor": {"tokens": 17, "hidden_size": 64, "intermediate_size": 256,
                                           "num_attention_heads": 4, "num_layers": 4}, "augmenter": None}},
        "llm": {"precision": "int4", "execution_provider": "cpu", "num_layers": 24, "hidden_size": 896,
                "vocab_size": 151936, "context_length": 2048},
        "prompt": {"format": "llama", **prompt},
        "provenance": {"checkpoint": "/runs/ftz-qwen", "created": "2026-12-01T08:00:00Z",
                       "ftz_config": {"preset": "paper", "llm": "Qwen/Qwen2.5-0.5B-Instruct",
                                      "tower": {"kind": "ftz", "anchor": "openai/clip-vit-large-patch14-336",
                                                "augmenter": "facebook/dinov2-large"}}},
    }


def test_bundle_card_from_a_manifest_and_report():
    validation = {"vision": [{"precision": "int8", "evaluated": "as written", "batch": 1, "cosine": 0.9987654,
                              "max_abs": 0.0123, "target": 0.99, "ok": True}],
                  "llm": {"precision": "int4", "steps": 32, "matching_prefix": 30, "target_identical": False, "ok": True},
                  "warnings": [], "passed": True}
    meta, body = split(bundle_card(_manifest(), validation))
    assert REQUIRED <= set(meta) and {"vision-language", "ftz", "onnx"} <= set(meta["tags"])
    assert meta["base_model"] == ["openai/clip-vit-large-patch14-336", "facebook/dinov2-large",
                                  "Qwen/Qwen2.5-0.5B-Instruct"]
    assert pairs_in(body) == [[2, 2], [4, 4]] and "17 per image" in body and "`llama`" in body
    assert "| vision | int8 | as written | 1 | 0.998765 | 1.230e-02 | 0.99 | yes |" in body
    assert "greedy tokens equal: 30/32" in body and "passed" in body
    assert "| question type |" not in body  # no accuracy without the checkpoint's eval.json
    _, unvalidated = split(bundle_card(_manifest(), None))
    assert "Not evaluated" in unvalidated


def test_every_exported_bundle_carries_its_card(default_bundle):
    from ftz_edge.manifest import read_manifest

    manifest = read_manifest(default_bundle)  # every hash verified: the card was written before the manifest
    assert CARD_NAME in manifest.files
    meta, body = split((default_bundle / CARD_NAME).read_text())
    assert REQUIRED <= set(meta) and "onnx" in meta["tags"]
    assert pairs_in(body) == [list(p) for p in manifest.vision.fusion_layers]
    validation = json.loads((default_bundle / "reports" / "validation.json").read_text())
    for row in validation["vision"]:
        assert f"| {row['cosine']:.6f} | {row['max_abs']:.3e} |" in body
    # The source checkpoint's own accuracy (the shipped default's eval.json), labelled as such.
    overall = json.loads((DEFAULT_MODEL / "eval.json").read_text())["results"]["ftz"]["overall"]
    assert "Accuracy of the source checkpoint in PyTorch" in body
    assert f"| **overall** | {overall['n']} | {overall['correct']} | {overall['accuracy']:.3f} |" in body


def test_the_card_save_checkpoint_should_write(tiny_components, tmp_path):
    """What the one-line hook in save_checkpoint would do (write_card(tmp, checkpoint_card(model, folder=tmp)),
    after the extra files): the card reads the training record, and the folder stays a loadable,
    replaceable checkpoint."""
    from ftz_edge.checkpoint import load_checkpoint, save_checkpoint
    from ftz_edge.mllm import FtZForCausalLM
    from ftz_edge.training.recipe import TrainConfig

    model = FtZForCausalLM.from_config(make_config(tiny_components))
    train = TrainConfig(stage="finetune", data_path="data/train.json", max_steps=7, prompt_format="llama")
    folder = save_checkpoint(model, tmp_path / "ckpt", include_encoders=True,
                             extra_files={"train_config.json": json.dumps(train.to_dict())})
    write_card(folder, checkpoint_card(model, folder=folder))
    meta, body = split((folder / CARD_NAME).read_text())
    assert REQUIRED <= set(meta) and "| max_steps | 7 |" in body and "| prompt_format | llama |" in body
    assert "| data_path | data/train.json |" in body and "Not evaluated" in body
    assert pairs_in(body) == model.vision.fusion_layers == pairs_in(split(checkpoint_card(folder))[1])
    assert load_checkpoint(folder).vision.fusion_layers == model.vision.fusion_layers
    save_checkpoint(model, folder)  # a checkpoint with a card is still one that may be replaced
