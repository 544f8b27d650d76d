"""FtZ transformers-style (ftz_edge.hf): PretrainedConfig + PreTrainedModel, save_pretrained /
from_pretrained (also of FtZ checkpoint folders), Auto classes, trust_remote_code in a fresh
process, sharding, parity with FtZForCausalLM (logits and greedy generate), ftz-train's final-hf."""

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoModel, AutoModelForImageTextToText, CLIPVisionConfig, Dinov2Config,
                          PreTrainedModel, Qwen2Config)

from conftest import make_config
from ftz_edge import DEFAULT_MODEL, prompt
from ftz_edge.atomic import DestinationError
from ftz_edge.checkpoint import load_checkpoint, save_checkpoint
from ftz_edge.config import CONFIG_NAME
from ftz_edge.hf import FtZForConditionalGeneration, FtZHFConfig, convert_checkpoint, is_hf_folder
from ftz_edge.mllm import IGNORE_INDEX, FtZForCausalLM

EXAMPLE = DEFAULT_MODEL / "examples" / "008000.png"
QUESTION = "What is in the image?"


def trained(components, kind="ftz", **tower):
    model = FtZForCausalLM.from_config(make_config(components, kind, **tower))
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training: every trainable tensor off its init
        for value in model.vision.trainable_state_dict().values():
            value.add_(torch.randn_like(value) * 0.05)
    return model.eval()


def prompt_ids(model, question=QUESTION):
    return model.encode_conversation([prompt.user_turn_with_image(question)])


def pixels(model, n=1, seed=0):
    torch.manual_seed(seed)
    size = model.vision.anchor.config.image_size
    augmenter = None if model.vision.augmenter is None else torch.randn(n, 3, 56, 56)
    return torch.randn(n, 3, size, size), augmenter


@pytest.fixture(scope="module")
def default_pair():
    """The shipped default (an FtZ checkpoint folder) loaded both ways."""
    return load_checkpoint(DEFAULT_MODEL).eval(), FtZForConditionalGeneration.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def default_hf_folder(tmp_path_factory):
    return convert_checkpoint(DEFAULT_MODEL, tmp_path_factory.mktemp("hf") / "ftz-default")


# -- the shipped default: converted on load, parity, round trip --------------------------------
def test_default_model_converts_on_load_with_identical_logits(default_pair):
    old, hf = default_pair
    assert isinstance(hf, PreTrainedModel) and hf.config.model_type == "ftz"
    assert hf.config.to_ftz_config() == old.config
    anchor, augmenter = old.preprocess_images([EXAMPLE])
    ids = prompt_ids(old)
    with torch.no_grad():
        expected = old([ids], anchor, augmenter).logits
        got = hf(input_ids=torch.tensor([ids]), pixel_values=anchor, augmenter_pixel_values=augmenter).logits
    assert torch.equal(got, expected)


def test_default_model_generate_equals_answer(default_pair):
    old, hf = default_pair
    anchor, augmenter = old.preprocess_images([EXAMPLE])
    ids = prompt_ids(old)
    reference = old.generate([ids], anchor, augmenter, max_new_tokens=16, do_sample=False)
    out = hf.generate(torch.tensor([ids]), pixel_values=anchor, augmenter_pixel_values=augmenter, max_new_tokens=16,
                      do_sample=False)
    # transformers' convention: the prompt (image positions as the pad id), then the new tokens
    assert out.shape[1] == len(ids) + reference.shape[1]
    assert torch.equal(out[:, len(ids):], reference)
    assert hf.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip() == old.answer(EXAMPLE, QUESTION, 16)
    assert not (out == prompt.IMAGE_TOKEN_ID).any()
    hf.tokenizer.decode(out[0], skip_special_tokens=True)  # the whole row decodes


def test_default_model_round_trip(default_pair, default_hf_folder):
    old, hf = default_pair
    files = sorted(p.name for p in default_hf_folder.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "configuration_ftz.py",
            "modeling_ftz.py"} <= set(files)
    assert CONFIG_NAME not in files and not any((default_hf_folder / d).is_dir() for d in ("llm", "anchor", "augmenter"))
    assert is_hf_folder(default_hf_folder)
    loaded = FtZForConditionalGeneration.from_pretrained(default_hf_folder)
    expected, got = hf.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() == old.state_dict().keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert loaded.config.to_ftz_config() == old.config
    assert loaded.generation_config.to_dict() == old.llm.generation_config.to_dict()
    anchor, augmenter = old.preprocess_images([EXAMPLE])
    ids = torch.tensor([prompt_ids(old)])
    a = hf.generate(ids, anchor, augmenter, max_new_tokens=12, do_sample=False)
    b = loaded.generate(ids, anchor, augmenter, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)


def test_load_checkpoint_reads_the_hf_folder(default_pair, default_hf_folder):
    """ftz-export, ftz-eval, ftz-train --init-from load through load_checkpoint: both formats."""
    old, _ = default_pair
    model = load_checkpoint(default_hf_folder)
    assert isinstance(model, FtZForCausalLM)
    assert model.config == old.config
    assert model.anchor_spec == old.anchor_spec and model.augmenter_spec == old.augmenter_spec
    assert model.chat_template == old.chat_template
    assert model.answer(EXAMPLE, QUESTION, 16) == old.answer(EXAMPLE, QUESTION, 16)
    from ftz_edge.evaluation.predictors import CheckpointPredictor, detect_kind

    assert detect_kind(default_hf_folder) == "checkpoint"  # ftz-eval --model takes it
    predictor = CheckpointPredictor(default_hf_folder, device="cpu")
    assert predictor(EXAMPLE, QUESTION, 16) == old.answer(EXAMPLE, QUESTION, 16)


def test_auto_classes(default_hf_folder):
    config = AutoConfig.from_pretrained(default_hf_folder)
    assert isinstance(config, FtZHFConfig)
    for auto in (AutoModel, AutoModelForImageTextToText):
        assert type(auto.from_pretrained(default_hf_folder)) is FtZForConditionalGeneration
    auto_map = json.loads((default_hf_folder / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_ftz.FtZHFConfig",
                        "AutoModel": "modeling_ftz.FtZForConditionalGeneration",
                        "AutoModelForImageTextToText": "modeling_ftz.FtZForConditionalGeneration"}


REMOTE = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    folder, inputs = sys.argv[1], load_file(sys.argv[2])
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert "ftz_edge.hf" not in sys.modules  # the folder's own copy of the code, not the package's
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                       augmenter_pixel_values=inputs["augmenter_pixel_values"]).logits
    out = model.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                         augmenter_pixel_values=inputs["augmenter_pixel_values"], max_new_tokens=8, do_sample=False)
    assert torch.equal(logits, inputs["logits"]), (logits - inputs["logits"]).abs().max()
    assert torch.equal(out, inputs["generated"])
    print("remote ok", model.tokenizer is not None)
""")


def test_trust_remote_code_in_a_fresh_process(default_pair, default_hf_folder, tmp_path):
    old, hf = default_pair
    anchor, augmenter = old.preprocess_images([EXAMPLE])
    ids = torch.tensor([prompt_ids(old)])
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=anchor, augmenter_pixel_values=augmenter).logits
    generated = hf.generate(ids, anchor, augmenter, max_new_tokens=8, do_sample=False)
    save_file({"input_ids": ids, "pixel_values": anchor, "augmenter_pixel_values": augmenter, "logits": logits,
               "generated": generated}, tmp_path / "inputs.safetensors")
    (tmp_path / "remote.py").write_text(REMOTE)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(tmp_path / "remote.py"), str(default_hf_folder),
                          str(tmp_path / "inputs.safetensors")], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "remote ok True" in run.stdout
    assert "Do you wish to run the custom code" not in run.stdout + run.stderr


# -- tiny random models: every tower kind, padding, loss, sharding, atomic writes ---------------
@pytest.mark.parametrize("kind", ["ftz", "clip", "mof"])
def test_tiny_round_trip_and_parity(tiny_components, tmp_path, kind):
    old = trained(tiny_components, kind)
    hf = FtZForConditionalGeneration.from_ftz(old)
    hf.save_pretrained(tmp_path / "hf")
    loaded = FtZForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert loaded.config.to_ftz_config() == old.config
    assert (loaded.vision.augmenter is None) == (kind == "clip")
    assert loaded.config.image_seq_length == old.vision.num_image_tokens
    state, reloaded = old.state_dict(), loaded.state_dict()
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)
    ids = prompt_ids(old)
    anchor, augmenter = pixels(old)
    with torch.no_grad():
        expected = old([ids], anchor, augmenter).logits
        got = loaded(input_ids=torch.tensor([ids]), pixel_values=anchor, augmenter_pixel_values=augmenter).logits
    assert torch.equal(got, expected)
    reference = old.generate([ids], anchor, augmenter, max_new_tokens=6, do_sample=False)
    out = loaded.generate(torch.tensor([ids]), anchor, augmenter, max_new_tokens=6, do_sample=False)
    assert torch.equal(out[:, len(ids):], reference)


def test_padded_batch_forward_loss_and_generate(tiny_components):
    old = trained(tiny_components)
    hf = FtZForConditionalGeneration.from_ftz(old)
    rows = [prompt_ids(old, "What color is the circle?"), prompt_ids(old, "How many?")]
    anchor, augmenter = pixels(old, 2)
    longest, pad = max(map(len, rows)), old.tokenizer.pad_token_id
    # right padding: positions line up with the ragged rows FtZForCausalLM pads itself
    input_ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    labels = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    with torch.no_grad():
        expected = old(rows, anchor, augmenter, labels=rows)
        got = hf(input_ids=input_ids, pixel_values=anchor, augmenter_pixel_values=augmenter, attention_mask=mask,
                 labels=labels)
    valid = mask.bool()
    assert torch.equal(got.logits[valid], expected.logits[valid])
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-6)
    # left padding (how a processor pads for generation): the same tokens as FtZForCausalLM
    left_ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
    left_mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    reference = old.generate(rows, anchor, augmenter, max_new_tokens=5, do_sample=False)
    out = hf.generate(left_ids, anchor, augmenter, attention_mask=left_mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, longest:], reference)
    # labels at image positions never count
    with torch.no_grad():
        masked = hf(input_ids=input_ids, pixel_values=anchor, augmenter_pixel_values=augmenter, attention_mask=mask,
                    labels=torch.where(input_ids == prompt.IMAGE_TOKEN_ID, torch.full_like(labels, 7), labels))
    torch.testing.assert_close(masked.loss, got.loss, rtol=0, atol=0)


def test_image_count_is_checked(tiny_components):
    hf = FtZForConditionalGeneration.from_ftz(trained(tiny_components))
    ids = torch.tensor([prompt_ids(hf.to_ftz())])
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        hf(input_ids=ids)


def test_sharded_save(tiny_components, tmp_path):
    old = trained(tiny_components)
    FtZForConditionalGeneration.from_ftz(old).save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "hf" / s).is_file() for s in shards)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    loaded = FtZForConditionalGeneration.from_pretrained(tmp_path / "hf")
    state = old.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    assert isinstance(load_checkpoint(tmp_path / "hf"), FtZForCausalLM)


def test_save_is_atomic_and_replaces_only_ftz_folders(tiny_components, tmp_path):
    hf = FtZForConditionalGeneration.from_ftz(trained(tiny_components))
    hf.save_pretrained(tmp_path / "hf")
    before = load_file(tmp_path / "hf" / "model.safetensors")
    with torch.no_grad():
        hf.vision.projector[0].bias.add_(1.0)
    with mock.patch.object(PreTrainedModel, "save_pretrained", side_effect=KeyboardInterrupt), \
            pytest.raises(KeyboardInterrupt):
        hf.save_pretrained(tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left
    after = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    hf.save_pretrained(tmp_path / "hf")  # an FtZ model folder is replaced
    assert not torch.equal(load_file(tmp_path / "hf" / "model.safetensors")["vision.projector.0.bias"],
                           before["vision.projector.0.bias"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DestinationError, match="refusing to replace"):
        hf.save_pretrained(tmp_path / "mine")


def test_old_format_round_trip_after_hf(tiny_components, tmp_path):
    """An HF folder -> FtZForCausalLM -> save_checkpoint -> load_checkpoint: the same model."""
    old = trained(tiny_components)
    FtZForConditionalGeneration.from_ftz(old).save_pretrained(tmp_path / "hf")
    model = load_checkpoint(tmp_path / "hf")
    save_checkpoint(model, tmp_path / "ckpt")
    again = load_checkpoint(tmp_path / "ckpt")
    state = old.state_dict()
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())


def test_built_from_config_alone(tiny_components):
    """No component folders: sub-configs in, random weights (zero-init fusion is exactly CLIP-only)."""
    from ftz_edge import tiny

    text = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, tie_word_embeddings=True)
    config = FtZHFConfig(anchor_config=tiny.clip_vision_config(), augmenter_config=tiny.dinov2_config(), text_config=text,
                         num_fusion_points=2, fusion_heads=4, fusion_init="zero", select_feature="cls_patch")
    model = FtZForConditionalGeneration(config).eval()
    assert config.image_seq_length == model.vision.num_image_tokens == 65
    for fusion in model.vision.fusion.values():
        assert not fusion.out_proj.weight.any() and not fusion.out_proj.bias.any()
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    ids = torch.tensor([[1, 2] + [prompt.IMAGE_TOKEN_ID] * 65 + [3]])
    anchor, augmenter = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert model(input_ids=ids, pixel_values=anchor, augmenter_pixel_values=augmenter).logits.shape == (1, 68, 64)
    assert FtZHFConfig(kind="clip", anchor_config=CLIPVisionConfig(), text_config=text).augmenter_config is None
    assert isinstance(FtZHFConfig().augmenter_config, Dinov2Config)  # the paper's defaults
    with pytest.raises(ValueError, match="tower kind must be one of"):
        FtZHFConfig(kind="concat")


def test_paper_size_model_on_the_meta_device():
    """The paper's sizes (CLIP-L/336 + DINOv2-L + Qwen2.5-0.5B: the config's defaults) without memory."""
    from ftz_edge.config import TowerConfig
    from ftz_edge.sizes import build_reference_vision, count_parameters, reference_config

    with torch.device("meta"):
        model = FtZForConditionalGeneration(FtZHFConfig())
        from transformers import AutoModelForCausalLM

        llm = AutoModelForCausalLM.from_config(reference_config("qwen2.5-0.5b"))
    vision = build_reference_vision(TowerConfig())
    assert model.config.image_seq_length == 576 and model.vision.fusion_layers == vision.fusion_layers
    assert count_parameters(model.vision) == count_parameters(vision)
    assert count_parameters(model) == count_parameters(vision) + count_parameters(llm)


def test_ftz_train_writes_final_hf(tiny_components, tmp_path):
    from test_training import stage_config

    from ftz_edge.training.train import HF_FINAL, train

    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 48), "red").save(data / "0.png")
    records = [{"id": "r0", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}] * 4
    (data / "train.json").write_text(json.dumps(records))
    final = train(stage_config(data, tmp_path, "finetune", max_steps=1), make_config(tiny_components), progress=False)
    folder = final.parent / HF_FINAL
    assert is_hf_folder(folder)
    old = load_checkpoint(final).eval()
    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert hf.config.llm_trained and hf.config.to_ftz_config().max_length == old.config.max_length
    state = old.state_dict()
    assert all(torch.equal(state[k], v) for k, v in hf.state_dict().items())
    ids = prompt_ids(old)
    anchor, augmenter = pixels(old)
    reference = old.generate([ids], anchor, augmenter, max_new_tokens=4, do_sample=False)
    assert torch.equal(hf.generate(torch.tensor([ids]), anchor, augmenter, max_new_tokens=4, do_sample=False)[:, len(ids):],
                       reference)


def test_ftz_export_reads_the_hf_folder(default_hf_folder, tmp_path):
    """from_pretrained folder -> ftz-export (load_checkpoint reads both formats)."""
    from ftz_edge.export import bundle as bundle_module
    from ftz_edge.manifest import read_manifest

    out = bundle_module.export_bundle(bundle_module.ExportOptions(
        checkpoint=str(default_hf_folder), out=str(tmp_path / "bundle"), precision="fp32", llm_precision="fp32",
        validation_images=2))
    manifest = read_manifest(out)  # every file's sha256 checked
    assert manifest.vision.num_image_tokens == FtZHFConfig.from_pretrained(default_hf_folder).image_seq_length
    validation = json.loads((out / "reports" / "validation.json").read_text())
    assert validation["passed"] and validation["llm"]["identical"]
