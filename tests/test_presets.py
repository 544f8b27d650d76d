"""Presets say where each default comes from and do it; DINOv2 with registers loads by its own class."""

import pytest
import torch
from conftest import make_config
from transformers import CLIPVisionModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTConfig, ViTModel

from ftz_edge import encoders
from ftz_edge.config import FtZConfig, TowerConfig, preset
from ftz_edge.encoders import ComponentLoadError
from ftz_edge.fusion import CrossAttentionFusion
from ftz_edge.mllm import FtZForCausalLM
from ftz_edge.vision import FtZVision


def test_paper_preset_follows_the_text():
    """Sec. 4.1: randomly initialised FtE modules; sec. 3.4: the final visual tokens (patches)."""
    tower = preset("paper").tower
    assert (tower.fusion_init, tower.select_layer, tower.select_feature) == ("random", -1, "patch")
    assert TowerConfig() == tower  # the dataclass defaults are the paper's


def test_llava_preset_keeps_the_llava_conventions_by_name():
    tower = preset("llava").tower
    assert (tower.fusion_init, tower.select_layer, tower.select_feature) == ("zero", -2, "patch")
    assert preset("llava", select_layer=-3).tower.select_layer == -3  # overrides still win


def test_authors_preset_is_their_code():
    config = preset("authors")
    assert (config.tower.fusion_init, config.tower.select_layer, config.tower.fusion_heads) == ("random", -1, 8)


def test_checkpoints_saying_default_init_still_load_as_random():
    config = FtZConfig.from_dict({"tower": {"fusion_init": "default"}})
    assert config.tower.fusion_init == "random"
    with pytest.raises(ValueError, match="fusion_init must be one of"):
        TowerConfig(fusion_init="xavier")
    with pytest.raises(ValueError, match="augmenter_registers must be one of"):
        TowerConfig(augmenter_registers="some")


def _first_step_grads(init: str) -> dict:
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(16, 8, num_heads=2, init=init)
    anchor, augmenter = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    fusion(anchor, augmenter).square().sum().backward()
    return {name: p.grad.abs().max().item() for name, p in fusion.named_parameters()}


def test_zero_init_gives_exactly_zero_first_gradients_behind_the_output_projection():
    """What zero init costs: W_proj and Q/K/V get no gradient until out_proj has moved."""
    zero, random = _first_step_grads("zero"), _first_step_grads("random")
    behind = [n for n in zero if n.startswith(("augmenter_proj", "q_proj", "k_proj", "v_proj"))]
    assert len(behind) == 8
    assert all(zero[n] == 0.0 for n in behind)
    assert zero["out_proj.weight"] > 0
    assert all(random[n] > 0 for n in random if n.endswith("weight"))


@pytest.fixture(scope="module")
def registers_augmenter(tmp_path_factory):
    config = Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=4,
                                       image_size=56, patch_size=8, num_register_tokens=4)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dinov2-registers")
    Dinov2WithRegistersModel(config).save_pretrained(folder)
    return str(folder)


def test_dinov2_with_registers_loads_by_its_own_class(registers_augmenter):
    model = encoders.load_augmenter(registers_augmenter)
    assert isinstance(model, Dinov2WithRegistersModel)
    assert encoders.num_register_tokens(model) == 4


def test_an_unsupported_encoder_type_is_refused(tmp_path):
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ComponentLoadError, match="'vit' checkpoint; the augmenter .* dinov2, dinov2_with_registers"):
        encoders.load_augmenter(str(tmp_path / "vit"))
    with pytest.raises(ComponentLoadError, match="'vit' checkpoint; the anchor"):
        encoders.load_anchor(str(tmp_path / "vit"))


@pytest.mark.parametrize("registers", ["keep", "drop"])
def test_the_fusion_sees_the_registers_only_when_kept(tiny_components, registers_augmenter, registers):
    anchor = encoders.load_anchor(tiny_components["anchor"])
    augmenter = encoders.load_augmenter(registers_augmenter)
    tower = TowerConfig(anchor=tiny_components["anchor"], augmenter=registers_augmenter, num_fusion_points=2,
                        augmenter_registers=registers)
    vision = FtZVision(tower, anchor, augmenter, llm_width=32)
    pixels = torch.randn(1, 3, 56, 56)
    states = vision._augmenter_states(pixels, {2, 4})
    reference = augmenter(pixel_values=pixels, output_hidden_states=True).hidden_states
    patches = (56 // 8) ** 2
    for layer, state in states.items():
        if registers == "keep":  # CLS + 4 registers + patches, exactly the model's own hidden states
            assert state.shape[1] == 1 + 4 + patches
            torch.testing.assert_close(state, reference[layer])
        else:
            assert state.shape[1] == 1 + patches
            torch.testing.assert_close(state, torch.cat([reference[layer][:, :1], reference[layer][:, 5:]], dim=1))


def test_mof_interleaves_patch_tokens_only_with_registers(tiny_components, registers_augmenter):
    config = make_config({**tiny_components, "augmenter": registers_augmenter}, "mof")
    model = FtZForCausalLM.from_config(config).eval()
    anchor = CLIPVisionModel.from_pretrained(tiny_components["anchor"]).config
    grid = (anchor.image_size // anchor.patch_size) ** 2
    with torch.no_grad():
        out = model.vision(torch.randn(1, 3, anchor.image_size, anchor.image_size), torch.randn(1, 3, 56, 56))
    assert out.shape[1] == model.vision.num_image_tokens == 2 * grid
