"""The vision side: every tower kind, zero-init equality, pruning, gradients, real-size layer counts."""

import pytest
import torch

from conftest import make_config
from ftz_edge.config import TowerConfig, preset
from ftz_edge.mllm import FtZForCausalLM
from ftz_edge.sizes import build_reference_vision, tower_cost


def pixels(batch=2):
    torch.manual_seed(0)
    return torch.randn(batch, 3, 64, 64), torch.randn(batch, 3, 56, 56)  # anchor 8x8 grid, augmenter 7x7


@pytest.fixture(scope="module")
def models(tiny_components):
    # The FtZ model zero-initialised (the llava preset's choice), so it starts equal to CLIP-only.
    return {
        kind: FtZForCausalLM.from_config(make_config(tiny_components, kind, **({"fusion_init": "zero"} if kind == "ftz" else {})))
        for kind in ("ftz", "clip", "mof")
    }


@pytest.mark.parametrize("kind, select_feature, tokens", [
    ("ftz", "patch", 64), ("clip", "patch", 64), ("mof", "patch", 128),
    ("ftz", "cls_patch", 65), ("clip", "cls_patch", 65), ("mof", "cls_patch", 130),
])
def test_output_shapes(tiny_components, kind, select_feature, tokens):
    model = FtZForCausalLM.from_config(make_config(tiny_components, kind, select_feature=select_feature))
    anchor, augmenter = pixels(batch=3)
    out = model.vision(anchor, augmenter)
    assert out.shape == (3, tokens, model.llm.config.hidden_size)
    assert model.vision.num_image_tokens == tokens
    assert torch.isfinite(out).all()


def test_zero_initialised_ftz_equals_clip_only(models):
    ftz, clip = models["ftz"].vision, models["clip"].vision
    # Same anchor weights (same checkpoint) and the same projector weights:
    clip.projector.load_state_dict(ftz.projector.state_dict())
    anchor, augmenter = pixels()
    with torch.no_grad():
        assert torch.equal(ftz(anchor, augmenter), clip(anchor))
        # ... while a fusion with a non-zero output really changes the features.
        for module in ftz.fusion.values():
            torch.nn.init.normal_(module.out_proj.weight, std=0.1)
        assert not torch.allclose(ftz(anchor, augmenter), clip(anchor))
        for module in ftz.fusion.values():
            torch.nn.init.zeros_(module.out_proj.weight)


def test_anchor_features_equal_transformers_hidden_state(models):
    """Driving the layers ourselves gives exactly CLIPVisionModel's hidden_states[select_layer]
    (the paper's default: -1, the last layer's output before the post-LayerNorm)."""
    vision = models["clip"].vision
    assert vision.config.select_layer == -1
    anchor, _ = pixels()
    with torch.no_grad():
        ours = vision.anchor_features(anchor)
        reference = vision.anchor(anchor, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def count_layer_calls(vision):
    calls = {"anchor": 0, "augmenter": 0}
    hooks = [layer.register_forward_hook(lambda *_: calls.__setitem__("anchor", calls["anchor"] + 1))
             for layer in vision.anchor.encoder.layers]
    if vision.augmenter is not None:
        hooks += [layer.register_forward_hook(lambda *_: calls.__setitem__("augmenter", calls["augmenter"] + 1))
                  for layer in vision.augmenter.encoder.layer]
    return calls, hooks


@pytest.mark.parametrize("kind, tower, expected", [
    ("ftz", dict(fusion_layers=[[1, 2]], select_layer=2), {"anchor": 2, "augmenter": 2}),
    ("ftz", dict(fusion_layers=[[1, 1], [2, 3]], select_layer=-1), {"anchor": 4, "augmenter": 3}),
    ("clip", dict(select_layer=-2), {"anchor": 3, "augmenter": 0}),
    ("mof", dict(augmenter_select_layer=2), {"anchor": 4, "augmenter": 2}),
    ("mof", dict(augmenter_select_layer=2, select_layer=-2), {"anchor": 3, "augmenter": 2}),
])
def test_dead_layers_are_not_run(tiny_components, kind, tower, expected):
    vision = FtZForCausalLM.from_config(make_config(tiny_components, kind, **tower)).vision
    calls, hooks = count_layer_calls(vision)
    anchor, augmenter = pixels()
    with torch.no_grad():
        vision(anchor, augmenter)
    for hook in hooks:
        hook.remove()
    assert calls == expected


def test_fusion_after_selected_layer_is_refused(tiny_components):
    with pytest.raises(ValueError, match="would never be read"):
        FtZForCausalLM.from_config(make_config(tiny_components, fusion_layers=[[4, 4]], select_layer=-2))


def test_gradients_reach_only_fusion_and_projector(tiny_components):
    model = FtZForCausalLM.from_config(make_config(tiny_components, "ftz", fusion_init="default"))
    model.set_trainable(train_llm=False)
    model.train()
    anchor, augmenter = pixels()
    model.vision(anchor, augmenter).pow(2).mean().backward()
    for name, param in model.named_parameters():
        trainable = name.startswith(("vision.fusion.", "vision.projector."))
        assert param.requires_grad == trainable, name
        if trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    # W_proj (augmenter_proj) of the first fusion point is reached through later anchor layers.
    assert any("augmenter_proj" in n for n, p in model.named_parameters() if p.grad is not None)
    assert not model.vision.anchor.training and not model.vision.augmenter.training


def test_mof_needs_augmenter_pixels(models):
    anchor, _ = pixels()
    with pytest.raises(ValueError, match="augmenter_pixels"):
        models["mof"].vision(anchor)


def test_tower_config_errors():
    with pytest.raises(ValueError, match="needs an augmenter"):
        TowerConfig(kind="ftz", augmenter=None)
    with pytest.raises(ValueError, match="tower kind must be one of"):
        TowerConfig(kind="concat")


@pytest.mark.parametrize("augmenter, pairs, augmenter_run", [
    ("dinov2-small", [[6, 3], [12, 6], [18, 9], [24, 12]], 12),
    ("dinov2-base", [[6, 3], [12, 6], [18, 9], [24, 12]], 12),
    ("dinov2-large", [[6, 6], [12, 12], [18, 18], [24, 24]], 24),
])
def test_real_size_paper_towers(augmenter, pairs, augmenter_run):
    """The paper's final-layer features: fusion points spread over all 24 anchor layers, every
    layer of both encoders runs."""
    vision = build_reference_vision(preset("paper").tower, augmenter)  # meta device: shapes only
    assert vision.fusion_layers == pairs
    cost = tower_cost(vision)
    assert (cost.anchor_layers_run, cost.augmenter_layers_run) == (24, augmenter_run)
    assert cost.saving == 0
    assert vision.num_image_tokens == 576


@pytest.mark.parametrize("augmenter, pairs, anchor_run, augmenter_run", [
    ("dinov2-small", [[6, 3], [12, 6], [17, 8], [23, 11]], 23, 11),
    ("dinov2-base", [[6, 3], [12, 6], [17, 8], [23, 11]], 23, 11),
    ("dinov2-large", [[6, 6], [12, 12], [17, 17], [23, 23]], 23, 23),
])
def test_real_size_llava_towers(augmenter, pairs, anchor_run, augmenter_run):
    """LLaVA's penultimate layer: the points stop at layer 23 and the dead layers are not run."""
    vision = build_reference_vision(preset("llava").tower, augmenter)
    assert vision.fusion_layers == pairs
    cost = tower_cost(vision)
    assert (cost.anchor_layers_run, cost.augmenter_layers_run) == (anchor_run, augmenter_run)
    assert 0 < cost.saving < 0.1
    assert vision.num_image_tokens == 576


def test_authors_preset_reproduces_their_tower():
    config = preset("authors")
    vision = build_reference_vision(config.tower, "dinov2-large", preset="authors")
    assert vision.fusion_layers == [[3, 6], [6, 12], [9, 18], [12, 24]]
    assert vision.anchor_depth == 24  # last-layer features
    assert tower_cost(vision).saving == 0
    assert all(m.num_heads == 8 for m in vision.fusion.values())


def test_anchor_from_full_clip_checkpoint_is_its_vision_tower(tiny_components, models):
    from transformers import CLIPModel

    full = CLIPModel.from_pretrained(tiny_components["anchor"])
    anchor, _ = pixels()
    with torch.no_grad():
        expected = full.vision_model(anchor, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(models["clip"].vision.anchor_features(anchor), expected, rtol=0, atol=0)


def test_unknown_component_is_a_clear_error(tiny_components):
    from ftz_edge.encoders import ComponentLoadError

    config = make_config(tiny_components)
    config.tower.augmenter = "no-such-org/no-such-dinov2"
    with pytest.raises(ComponentLoadError, match="cannot load Dinov2Model from 'no-such-org/no-such-dinov2'"):
        FtZForCausalLM.from_config(config)


def test_authors_init_is_not_zero(tiny_components):
    config = make_config(tiny_components, fusion_init="default")
    vision = FtZForCausalLM.from_config(config).vision
    assert all(m.out_proj.weight.abs().sum() > 0 for m in vision.fusion.values())
