"""FtZ checkpoint folders: exact round trip, self-contained folders, mismatch errors, atomic writes."""

import json
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_config
from ftz_edge import checkpoint
from ftz_edge.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ftz_edge.config import CONFIG_NAME, FtZConfig, preset
from ftz_edge.mllm import FtZForCausalLM


def trained_model(components, kind="ftz", **tower):
    model = FtZForCausalLM.from_config(make_config(components, kind, **tower))
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training: move every trainable tensor off its init
        for value in model.vision.trainable_state_dict().values():
            value.add_(torch.randn_like(value) * 0.05)
    return model


def outputs(model):
    torch.manual_seed(7)
    anchor, augmenter = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        return model.vision(anchor, augmenter)


@pytest.mark.parametrize("kind", ["ftz", "clip", "mof"])
def test_round_trip_is_exact(tiny_components, tmp_path, kind):
    model = trained_model(tiny_components, kind)
    save_checkpoint(model, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    # frozen parts referenced, not copied; README.md is the model card (ftz_edge.model_card)
    assert files == ["README.md", CONFIG_NAME, checkpoint.WEIGHTS_NAME]
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: image-text-to-text" in card
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    for name, value in model.vision.trainable_state_dict().items():
        assert torch.equal(loaded.vision.trainable_state_dict()[name], value), name
    assert torch.equal(outputs(loaded), outputs(model))


def test_self_contained_checkpoint_with_trained_llm(tiny_components, tmp_path):
    model = trained_model(tiny_components)
    model.config.llm_trained = True
    with torch.no_grad():
        model.llm.lm_head.weight.mul_(1.5)
    save_checkpoint(model, tmp_path / "ckpt", include_encoders=True)
    saved = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert (saved["tower"]["anchor"], saved["tower"]["augmenter"], saved["llm"]) == ("anchor", "augmenter", "llm")
    moved = tmp_path / "moved"
    (tmp_path / "ckpt").rename(moved)  # relative component paths: the folder can move
    loaded = load_checkpoint(moved)
    assert torch.equal(outputs(loaded), outputs(model))
    assert torch.equal(loaded.llm.lm_head.weight, model.llm.lm_head.weight)
    assert loaded.anchor_spec == model.anchor_spec and loaded.augmenter_spec == model.augmenter_spec
    ids = model.encode_conversation([{"role": "user", "content": "<image>\nHi"}])
    assert loaded.encode_conversation([{"role": "user", "content": "<image>\nHi"}]) == ids


def test_weights_are_safetensors_with_only_trainable_parts(tiny_components, tmp_path):
    save_checkpoint(trained_model(tiny_components), tmp_path / "ckpt")
    keys = load_file(tmp_path / "ckpt" / checkpoint.WEIGHTS_NAME).keys()
    assert keys and all(k.startswith(("fusion.", "projector.")) for k in keys)
    assert any(".augmenter_proj." in k for k in keys)


def test_config_weights_mismatch_is_a_clear_error(tiny_components, tmp_path):
    save_checkpoint(trained_model(tiny_components), tmp_path / "ckpt")
    config = FtZConfig.load(tmp_path / "ckpt")
    config.tower.num_fusion_points = 1  # the weights hold two fusion points
    config.save(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="does not match the model its config builds"):
        load_checkpoint(tmp_path / "ckpt")


def test_wrong_shape_is_a_clear_error(tiny_components, tmp_path):
    save_checkpoint(trained_model(tiny_components), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / checkpoint.WEIGHTS_NAME
    weights = load_file(path)
    weights["projector.0.bias"] = torch.zeros(3)
    save_file(weights, path)
    with pytest.raises(CheckpointError, match=r"projector.0.bias has shape \(3,\)"):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "ftz_config.json is missing"),
    (lambda d: (d.mkdir(), (d / CONFIG_NAME).write_text("{")), "ftz_weights.safetensors is missing"),
])
def test_not_a_checkpoint(tmp_path, setup, message):
    setup(tmp_path / "x")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "x")


def test_malformed_config_is_a_clear_error(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text('{"tower": {"kind": "concat"}}')
    (folder / checkpoint.WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(CheckpointError, match="tower kind must be one of"):
        load_checkpoint(folder)


def test_interrupted_save_keeps_the_previous_checkpoint(tiny_components, tmp_path):
    model = trained_model(tiny_components)
    save_checkpoint(model, tmp_path / "ckpt")
    before = outputs(load_checkpoint(tmp_path / "ckpt"))
    with torch.no_grad():
        model.vision.projector[0].bias.add_(1.0)
    with mock.patch.object(checkpoint, "save_file", side_effect=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left behind
    assert torch.equal(outputs(load_checkpoint(tmp_path / "ckpt")), before)


def test_preset_config_round_trips_through_json(tmp_path):
    config = preset("authors", llm="some/llm", anchor="a", augmenter="b")
    config.save(tmp_path)
    assert FtZConfig.load(tmp_path) == config
    assert config.tower.fusion_init == "random" and config.tower.select_layer == -1


def test_an_existing_folder_that_is_not_a_checkpoint_is_never_replaced(tiny_components, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="exists and is not an FtZ checkpoint"):
        save_checkpoint(trained_model(tiny_components), precious)
    assert (precious / "todo.txt").read_text() == "keep me"


def test_saved_folders_are_readable_by_others(tiny_components, tmp_path):
    import os
    import stat

    save_checkpoint(trained_model(tiny_components), tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("config_text, weights", [
    ('{"name": "my app"}', True),  # a config file, but not an FtZConfig
    ("[1, 2]", True),
    ('{"llm": "some/llm"}', False),  # an FtZConfig, but no weights: not a checkpoint either
])
def test_only_a_provable_checkpoint_is_replaced(tiny_components, tmp_path, config_text, weights):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(config_text)
    if weights:
        (folder / checkpoint.WEIGHTS_NAME).write_bytes(b"")
    (folder / "notes.txt").write_text("keep me")
    assert not checkpoint.is_checkpoint(folder)
    with pytest.raises(CheckpointError, match="exists and is not an FtZ checkpoint"):
        save_checkpoint(trained_model(tiny_components), folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("remove, role", [("llm", "llm"), ("anchor", "anchor"), ("augmenter", "augmenter")])
def test_a_checkpoint_missing_a_stored_component_says_what_is_missing(tiny_components, tmp_path, remove, role):
    """Without this, a config naming "llm" (stored inside the checkpoint) sent loading to the model hub."""
    import shutil

    model = trained_model(tiny_components)
    model.config.llm_trained = True
    save_checkpoint(model, tmp_path / "ckpt", include_encoders=True)
    shutil.rmtree(tmp_path / "ckpt" / remove)
    with pytest.raises(CheckpointError, match=rf"incomplete: its {role} is stored in {remove}/.*{remove} is missing"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_trained_llm_must_be_in_the_checkpoint(tiny_components, tmp_path):
    save_checkpoint(trained_model(tiny_components), tmp_path / "ckpt")
    config = FtZConfig.load(tmp_path / "ckpt")
    config.llm_trained, config.llm = True, "Qwen/not-here"  # says trained, names a hub id
    config.save(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="LLM was trained .* the trained weights belong in"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_save_sweeps_the_leftovers_of_a_killed_save(tiny_components, tmp_path):
    import subprocess
    import sys

    from ftz_edge import atomic

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    stale = tmp_path / f".ckpt.tmp-{atomic.host_tag()}-{process.pid}-abcd"
    stale.mkdir()
    (stale / checkpoint.WEIGHTS_NAME).write_bytes(b"half")
    save_checkpoint(trained_model(tiny_components), tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
