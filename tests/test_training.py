"""Training: freezing per stage, overfitting, resume, atomic checkpoints, labels, bad records, recipes."""

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_config
from ftz_edge import prompt
from ftz_edge.checkpoint import load_checkpoint
from ftz_edge.mllm import IGNORE_INDEX, FtZForCausalLM
from ftz_edge.training import train as train_module
from ftz_edge.training.data import DataError, LlavaDataset
from ftz_edge.training.recipe import (
    TrainConfig, available_recipes, load_recipe, recipe_model_config, recipe_stage_config,
)
from ftz_edge.training.train import latest_checkpoint, train


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "images").mkdir()
    colors = ["red", "green", "blue", "yellow"]
    records = []
    for i, color in enumerate(colors * 2):
        Image.new("RGB", (40 + i, 48), color).save(folder / "images" / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the picture?"}, {"from": "gpt", "value": color}]})
    (folder / "train.json").write_text(json.dumps(records))
    return folder


def stage_config(dataset_dir, tmp_path, stage="pretrain", **kw):
    settings = dict(stage=stage, data_path=str(dataset_dir / "train.json"), output_dir=str(tmp_path / stage),
                    global_batch_size=4, per_device_batch_size=2, learning_rate=3e-3, max_steps=4, save_every=100,
                    log_every=1, num_workers=0, gradient_checkpointing=False, max_length=256, warmup_ratio=0.0)
    settings.update(kw)
    return TrainConfig(**settings)


def weights(folder):
    return load_file(folder / "ftz_weights.safetensors")


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_stage_freezing(tiny_components, dataset_dir, tmp_path, stage):
    config = make_config(tiny_components, fusion_init="default")
    before = FtZForCausalLM.from_config(config)
    final = train(stage_config(dataset_dir, tmp_path, stage, max_steps=2), config, progress=False)
    after = load_checkpoint(final)
    b, a = before.state_dict(), after.state_dict()
    for name in b:
        frozen = name.startswith(("vision.anchor.", "vision.augmenter.")) or (stage == "pretrain" and name.startswith("llm."))
        if frozen:
            assert torch.equal(a[name], b[name]), f"frozen {name} changed"
        elif not name.endswith("rotary_emb.inv_freq"):
            assert not torch.equal(a[name], b[name]), f"trainable {name} did not change"
    assert after.config.llm_trained == (stage == "finetune")
    assert (final / "llm").is_dir() == (stage == "finetune")
    assert json.loads((final / "train_config.json").read_text())["stage"] == stage


def test_tiny_model_overfits_a_handful_of_records(tiny_components, dataset_dir, tmp_path):
    cfg = stage_config(dataset_dir, tmp_path, "finetune", max_steps=40, learning_rate=5e-3)
    train(cfg, make_config(tiny_components), progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    assert losses[-1] < 0.25 * losses[0], losses


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_components, dataset_dir, tmp_path):
    config = make_config(tiny_components, fusion_init="default")
    full = train(stage_config(dataset_dir, tmp_path / "a", "finetune", max_steps=6, save_every=3), config, progress=False)
    cfg = stage_config(dataset_dir, tmp_path / "b", "finetune", max_steps=6, save_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, config, progress=False, interrupt_after=4)  # killed one step after checkpoint 3
    assert latest_checkpoint(tmp_path / "b" / "finetune").name == "checkpoint-0000003"
    resumed = train(cfg, config, resume=True, progress=False)
    a, b = weights(full), weights(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    a_llm = load_file(full / "llm" / "model.safetensors")
    b_llm = load_file(resumed / "llm" / "model.safetensors")
    for name in a_llm:
        torch.testing.assert_close(b_llm[name], a_llm[name], rtol=0, atol=1e-6)
    # the logged losses of steps 4..6 are the same too
    log = lambda run: [json.loads(x) for x in (tmp_path / run / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log("a")][-2:] == pytest.approx([r["loss"] for r in log("b")][-2:], abs=1e-5)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tiny_components, dataset_dir, tmp_path):
    cfg = stage_config(dataset_dir, tmp_path, "pretrain", max_steps=4, save_every=2)
    real_save = train_module.save_checkpoint
    calls = {"n": 0}

    def dies_on_second_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while writing")
        return real_save(*args, **kwargs)

    with mock.patch.object(train_module, "save_checkpoint", dies_on_second_save), pytest.raises(KeyboardInterrupt):
        train(cfg, make_config(tiny_components), progress=False)
    out = tmp_path / "pretrain"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-0000002"]
    model = load_checkpoint(out / "checkpoint-0000002" / "model")
    assert isinstance(model, FtZForCausalLM)
    # and training resumes from it
    final = train(cfg, make_config(tiny_components), resume=True, progress=False)
    assert (final / "ftz_weights.safetensors").is_file()


def test_labels_cover_only_assistant_tokens(tiny_components):
    model = FtZForCausalLM.from_config(make_config(tiny_components))
    messages = [{"role": "user", "content": "<image>\nWhat color is the circle?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And the square?"}, {"role": "assistant", "content": "blue"}]
    n_img = model.vision.num_image_tokens
    ids, labels = prompt.encode_supervised(messages, model.tokenizer.backend_tokenizer, model.chat_template,
                                           model.special_tokens, num_image_tokens=n_img)
    assert len(ids) == len(labels)
    supervised = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert [label for label in labels if label != IGNORE_INDEX] == supervised
    assert model.tokenizer.decode(supervised) == "red<|im_end|>\nblue<|im_end|>\n"
    # the prompt part equals what inference tokenises for the same conversation prefix
    inference_ids = model.encode_conversation(messages[:3])
    assert ids[: len(inference_ids)] == inference_ids
    assert ids.count(prompt.IMAGE_TOKEN_ID) == n_img
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels) if i == prompt.IMAGE_TOKEN_ID)


def test_bad_records_are_skipped_and_counted(tiny_components, tmp_path):
    model = FtZForCausalLM.from_config(make_config(tiny_components))
    Image.new("RGB", (32, 32), "red").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "good", "image": "ok.png", "conversations": good},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "missing", "image": "nope.png", "conversations": good},
        {"id": "corrupt", "image": "corrupt.png", "conversations": good},
        {"id": "no-placeholder", "image": "ok.png", "conversations": [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "red"}]},
        {"id": "empty-turn", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": " "}]},
        {"id": "no-answer", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nColor?"}]},
        {"id": "long", "image": "ok.png", "conversations": [*good, {"from": "human", "value": "red " * 300},
                                                             {"from": "gpt", "value": "red"}]},
        {"id": "answer-past-limit", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\n" + "red " * 300}, {"from": "gpt", "value": "red"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    data = LlavaDataset(tmp_path / "data.json", tmp_path, model, max_length=200)
    report = data.report
    assert [item["id"] for item in data.items] == ["good", "text-only", "long"]
    assert (report.total, report.kept, report.truncated) == (9, 3, 1)  # "long" keeps its first answer
    assert dict(report.skipped) == {"image not found": 1, "image unreadable": 1, "image given but no <image> placeholder": 1,
                                    "empty turn": 1, "no gpt turn": 1, "no answer within max_length": 1}
    assert report.examples[0].startswith("missing: image not found") and "nope.png" in report.examples[0]
    with pytest.raises(DataError, match="record missing: image not found"):
        LlavaDataset(tmp_path / "data.json", tmp_path, model, max_length=200, strict=True)


def test_unusable_data_files(tiny_components, tmp_path):
    model = FtZForCausalLM.from_config(make_config(tiny_components))
    with pytest.raises(DataError, match="not found"):
        LlavaDataset(tmp_path / "none.json", None, model, 128)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        LlavaDataset(tmp_path / "bad.json", None, model, 128)


def test_global_batch_must_divide():
    with pytest.raises(ValueError, match="not a multiple"):
        TrainConfig(global_batch_size=256, per_device_batch_size=48).gradient_accumulation(1)
    assert TrainConfig(global_batch_size=256, per_device_batch_size=32).gradient_accumulation(2) == 4


@pytest.mark.parametrize("name", available_recipes())
def test_recipes_parse_and_build_the_intended_models(name):
    from ftz_edge.sizes import build_reference_vision

    recipe = load_recipe(name)
    model = recipe_model_config(recipe)
    kind = name.split("-")[0]
    assert model.tower.kind == ("ftz" if kind == "authors" else kind)
    assert model.preset == ("authors" if kind == "authors" else "paper")
    # mof-authors: the Interleaved-MoF setting the FtZ authors compared against (CLIP-L/14 at 224).
    authors_mof = name.startswith("mof-authors")
    assert model.tower.anchor == ("openai/clip-vit-large-patch14" if authors_mof else "openai/clip-vit-large-patch14-336")
    assert model.llm in ("Qwen/Qwen2.5-0.5B", "TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    pretrain = recipe_stage_config(recipe, "pretrain", "/data")
    finetune = recipe_stage_config(recipe, "finetune", "/data")
    assert (pretrain.global_batch_size, pretrain.learning_rate) == (256, 1e-3)
    assert (finetune.global_batch_size, finetune.learning_rate) == (128, 2e-5)
    assert pretrain.data_path == "/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    vision = build_reference_vision(model.tower, "dinov2-large", preset=model.preset)  # meta device
    # paper: the final layer feeds the projector, so 4 points spread over all 24 anchor layers.
    expected = {"ftz": [[6, 6], [12, 12], [18, 18], [24, 24]], "authors": [[3, 6], [6, 12], [9, 18], [12, 24]]}
    assert vision.fusion_layers == expected.get(kind, [])
    assert vision.num_image_tokens == {"mof": 512 if authors_mof else 1152}.get(kind, 576)


def test_cli_reports_bad_recipe(capsys, tmp_path):
    assert train_module.main(["--recipe", "no-such-recipe", "--output-dir", str(tmp_path)]) == 2
    assert "unknown recipe 'no-such-recipe'" in capsys.readouterr().err


# -- bad records never stop a run (issue 13, item 2) ----------------------------------------------
def test_records_of_any_shape_are_skipped_with_a_reason(tiny_components, tmp_path):
    """Each of these raised (TypeError, or a tokenizer error on a lone surrogate) before."""
    model = FtZForCausalLM.from_config(make_config(tiny_components))
    Image.new("RGB", (32, 32), "red").save(tmp_path / "ok.png")
    good = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "good", "image": "ok.png", "conversations": good},
        {"id": "number", "image": 7, "conversations": good},
        {"id": "list", "image": ["ok.png"], "conversations": good},
        {"id": "dict", "image": {"path": "ok.png"}, "conversations": good},
        {"id": "empty-name", "image": "", "conversations": good},
        {"id": "surrogate-text", "image": "ok.png", "conversations": [good[0], {"from": "gpt", "value": "red \ud800"}]},
        {"id": "surrogate-name", "image": "ok\udc80.png", "conversations": good},
        {"id": "speaker-list", "conversations": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "turn-not-object", "conversations": ["Hi", {"from": "gpt", "value": "Hello"}]},
        {"id": {"not": "a string"}, "conversations": "Hi"},
        "just a string",
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    data = LlavaDataset(tmp_path / "data.json", tmp_path, model, max_length=200)
    assert [item["id"] for item in data.items] == ["good"]
    assert dict(data.report.skipped) == {"image must be a file name": 4, "text is not valid UTF-8": 1,
                                         "image name is not valid UTF-8": 1, "turn speaker must be one of ['gpt', 'human', 'system']": 2,
                                         "no conversations": 1, "not a JSON object": 1}
    assert data.report.examples[0] == "number: image must be a file name (a non-empty string), got int 7 [data.json record #1]"
    data.report.summary().encode("utf-8")  # printable: no lone surrogate reaches a log line
    with pytest.raises(DataError, match=r"\[#1\]: record number: image must be a file name"):
        LlavaDataset(tmp_path / "data.json", tmp_path, model, max_length=200, strict=True)


@pytest.fixture(scope="module")
def truncated_dir(dataset_dir, tmp_path_factory):
    """dataset_dir's records plus a JPEG cut in half at record #3: its header passes the data
    check, it fails only when decoded, inside the data loader."""
    import io
    import shutil

    import numpy as np

    folder = tmp_path_factory.mktemp("truncated")
    shutil.copytree(dataset_dir / "images", folder / "images")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "images" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    records = json.loads((dataset_dir / "train.json").read_text())
    records.insert(3, {"id": "cut", "image": "images/cut.jpg", "conversations": records[0]["conversations"]})
    (folder / "train.json").write_text(json.dumps(records))
    return folder


def test_an_image_that_fails_when_loaded_is_skipped_counted_and_named(tiny_components, truncated_dir, tmp_path, caplog):
    # Two worker processes: the skip must travel from them to the training loop with the batch.
    cfg = stage_config(truncated_dir, tmp_path, "pretrain", max_steps=4, num_workers=2)
    with caplog.at_level("WARNING", logger="ftz_edge.training"):
        final = train(cfg, make_config(tiny_components), progress=False)
    assert (final / "ftz_weights.safetensors").is_file()
    report = json.loads((tmp_path / "pretrain" / "data_report.json").read_text())
    assert (report["total"], report["kept"]) == (9, 9)  # the header was fine when the data set was opened
    (record, reason), = report["skipped_when_loaded"].items()  # counted once, though seen in two epochs
    assert record == "train.json record #3 (id cut)"
    assert reason.startswith("image unreadable when loaded (cannot read image") and "cut.jpg" in reason and "truncated" in reason
    assert "skipped train.json record #3 (id cut): image unreadable when loaded" in caplog.text
    metrics = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_when_loaded"] == 1
    assert all(m["samples_per_s"] > 0 for m in metrics)


def test_strict_stops_at_an_image_that_fails_when_loaded_with_one_line(tiny_components, truncated_dir, tmp_path, capsys):
    import yaml

    recipe = {"model": make_config(tiny_components).to_dict(), "stages": {"pretrain": {
        "data_path": str(truncated_dir / "train.json"), "global_batch_size": 4, "per_device_batch_size": 2,
        "max_steps": 4, "num_workers": 0, "gradient_checkpointing": False, "max_length": 256}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code = train_module.main(["--recipe", str(tmp_path / "recipe.yaml"), "--stage", "pretrain", "--output-dir",
                              str(tmp_path / "run"), "--strict", "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftz-train:")]
    assert code == 2 and lines == [line for line in err.splitlines() if "error" in line.lower()], err
    assert len(lines) == 1 and "train.json record #3 (id cut): image unreadable when loaded" in lines[0]
    assert "cut.jpg" in lines[0] and "Traceback" not in err


# -- resume passes over a damaged checkpoint; pickles load as data (items 5 and 8) ----------------
@pytest.fixture(scope="module")
def uninterrupted(tiny_components, dataset_dir, tmp_path_factory):
    cfg = stage_config(dataset_dir, tmp_path_factory.mktemp("full"), "finetune", max_steps=6, save_every=2)
    return train(cfg, make_config(tiny_components, fusion_init="default"), progress=False)


@pytest.mark.parametrize("damaged", ["state/model.safetensors", "state/optimizer.bin", "trainer_state.json"])
def test_resume_falls_back_past_a_damaged_checkpoint(tiny_components, dataset_dir, tmp_path, uninterrupted, damaged,
                                                     caplog, monkeypatch):
    config = make_config(tiny_components, fusion_init="default")
    cfg = stage_config(dataset_dir, tmp_path, "finetune", max_steps=6, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, config, progress=False, interrupt_after=4)
    out = tmp_path / "finetune"
    assert [p.name for p in train_module.checkpoints(out)] == ["checkpoint-0000002", "checkpoint-0000004"]
    # The pickles of a training checkpoint are exactly accelerate's three; the weights are safetensors.
    state_files = sorted(p.name for p in (out / "checkpoint-0000002" / "state").iterdir())
    assert state_files == ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin"]
    target = out / "checkpoint-0000004" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # a write cut short

    loads = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        result = real_load(f, *args, **kwargs)  # raises for the damaged file: not recorded
        loads.append((Path(f).name, kwargs.get("weights_only")))
        return result

    monkeypatch.setattr(torch, "load", spy)
    with caplog.at_level("WARNING", logger="ftz_edge.training"):
        resumed = train(cfg, config, resume=True, progress=False)
    monkeypatch.undo()
    assert "checkpoint-0000004 cannot be loaded" in caplog.text and "falling back to the previous one" in caplog.text
    assert "resumed from checkpoint-0000002" in caplog.text
    # Loaded as data only (weights_only), and the RNG states did load (accelerate would swallow a failure).
    assert {name for name, _ in loads} >= {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"}
    assert all(weights_only is True for _, weights_only in loads), loads
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-4:] == [3, 4, 5, 6]  # from step 2 on
    # Nothing of the damaged newer state leaked into the run: it ends where an uninterrupted one does.
    a, b = weights(uninterrupted), weights(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def test_resume_with_no_loadable_checkpoint_is_one_clear_error(tiny_components, dataset_dir, tmp_path):
    cfg = stage_config(dataset_dir, tmp_path, "pretrain", max_steps=4, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, make_config(tiny_components), progress=False, interrupt_after=2)
    (tmp_path / "pretrain" / "checkpoint-0000002" / "state" / "model.safetensors").write_bytes(b"garbage")
    from ftz_edge.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be loaded: checkpoint-0000002 \(SafetensorError"):
        train(cfg, make_config(tiny_components), resume=True, progress=False)


def test_a_checkpoint_save_sweeps_killed_runs_leftovers(tiny_components, dataset_dir, tmp_path):
    import subprocess
    import sys

    from ftz_edge import atomic

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    out = tmp_path / "pretrain"
    stale = out / f".checkpoint-0000500.tmp-{atomic.host_tag()}-{process.pid}"
    (stale / "state").mkdir(parents=True)
    (stale / "state" / "optimizer.bin").write_bytes(b"x" * 1000)
    train(stage_config(dataset_dir, tmp_path, "pretrain", max_steps=2, save_every=2), make_config(tiny_components),
          progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
