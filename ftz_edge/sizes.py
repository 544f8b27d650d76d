"""Real-size architectures from the shipped config files, and what the tower costs.

``ftz_edge/configs/*.json`` hold the public configs of CLIP ViT-L/14-336, DINOv2-S/B/L,
Qwen2.5-0.5B and TinyLlama-1.1B. Built on the ``meta`` device they cost no memory, which is
enough to count parameters and layers; benchmarks build them with random weights instead
(latency does not depend on the weights' values).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import torch
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, Dinov2Model, PretrainedConfig

from ftz_edge.config import TowerConfig
from ftz_edge.vision import FtZVision

REFERENCE_CONFIGS = ("clip-vit-large-patch14-336", "clip-vit-large-patch14", "dinov2-small", "dinov2-base", "dinov2-large", "qwen2.5-0.5b", "tinyllama-1.1b")


def reference_config(name: str) -> PretrainedConfig:
    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"unknown reference config {name!r}; shipped: {REFERENCE_CONFIGS}")
    data = json.loads(resources.files("ftz_edge").joinpath("configs", f"{name}.json").read_text())
    model_type = data.pop("model_type")
    if model_type == "clip_vision_model":
        return CLIPVisionConfig(**data)
    return AutoConfig.for_model(model_type, **data)


def build_reference_vision(tower: TowerConfig, augmenter: str = "dinov2-large", llm: str = "qwen2.5-0.5b",
                           preset: str = "paper", device: str = "meta", dtype: Optional[torch.dtype] = None) -> FtZVision:
    """FtZ tower of real size with random weights (``meta``: shapes only, no memory). The anchor
    is the tower's own when it names a shipped reference config (``openai/clip-vit-large-patch14``
    for the authors' MoF setting), else CLIP-L/336, the paper's."""
    anchor = tower.anchor.rstrip("/").rsplit("/", 1)[-1]
    anchor = anchor if anchor in REFERENCE_CONFIGS else "clip-vit-large-patch14-336"
    with torch.device(device):
        anchor_model = CLIPVisionModel(reference_config(anchor))
        augmenter_model = Dinov2Model(reference_config(augmenter)) if tower.uses_augmenter else None
        vision = FtZVision(tower, anchor_model, augmenter_model, reference_config(llm).hidden_size, preset=preset)
    return vision.to(dtype) if dtype else vision


@dataclass
class TowerCost:
    anchor_layers_run: int
    anchor_layers: int
    augmenter_layers_run: int
    augmenter_layers: int
    gflops: float  # what the pruned tower runs
    gflops_unpruned: float  # the same tower running every layer of both encoders

    @property
    def saving(self) -> float:
        return 1.0 - self.gflops / self.gflops_unpruned


def _layer_gflops(tokens: int, width: int, mlp: int) -> float:
    # 2 FLOPs per multiply-add: QKV+out projections (4 d^2), MLP (2 d m), attention (2 N d, twice).
    return 2 * tokens * (4 * width * width + 2 * width * mlp + 2 * tokens * width) / 1e9


def _fusion_gflops(anchor_tokens: int, augmenter_tokens: int, anchor_width: int, augmenter_width: int) -> float:
    return 2 * (
        augmenter_tokens * augmenter_width * anchor_width  # W_proj
        + 2 * anchor_tokens * anchor_width * anchor_width  # Q and output projections
        + 2 * augmenter_tokens * anchor_width * anchor_width  # K and V
        + 2 * anchor_tokens * augmenter_tokens * anchor_width  # scores and weighted sum
    ) / 1e9


def tower_cost(vision: FtZVision, augmenter_image_size: int = 224) -> TowerCost:
    """Estimated from the configs (not measured): GFLOPs per image of the vision tower's encoders
    and fusion modules (the projector is the same in both columns and left out)."""
    a = vision.anchor.config
    anchor_tokens = (a.image_size // a.patch_size) ** 2 + 1
    anchor_layer = _layer_gflops(anchor_tokens, a.hidden_size, a.intermediate_size)
    gflops = vision.anchor_depth * anchor_layer
    unpruned = a.num_hidden_layers * anchor_layer
    aug_run = aug_total = 0
    if vision.augmenter is not None:
        g = vision.augmenter.config
        aug_tokens = (augmenter_image_size // g.patch_size) ** 2 + 1
        aug_layer = _layer_gflops(aug_tokens, g.hidden_size, int(g.hidden_size * g.mlp_ratio))
        aug_run, aug_total = vision.augmenter_depth, g.num_hidden_layers
        fusion = len(vision.fusion_layers) * _fusion_gflops(anchor_tokens, aug_tokens, a.hidden_size, g.hidden_size)
        gflops += aug_run * aug_layer + fusion
        unpruned += aug_total * aug_layer + fusion
    return TowerCost(vision.anchor_depth, a.num_hidden_layers, aug_run, aug_total, gflops, unpruned)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- real-format checkpoints with random weights ------------------------------------------------


def save_reference_components(folder, augmenter: str = "dinov2-large", llm: str = "qwen2.5-0.5b", seed: int = 0) -> dict[str, str]:
    """``anchor/``, ``augmenter/`` and ``llm/`` under ``folder``: the real architectures (CLIP
    ViT-L/14-336, DINOv2-*, Qwen2.5-0.5B or TinyLlama-1.1B) with random weights, each written by
    ``save_pretrained`` exactly as a hub checkpoint is, so every loader runs its real path. The
    LLM gets the shipped default model's tokenizer (no hub here; its ids fit any of these
    vocabularies). Returns the three folders, for an FtZConfig."""
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from ftz_edge import DEFAULT_MODEL

    folder = Path(folder)
    torch.manual_seed(seed)
    paths = {"anchor": folder / "anchor", "augmenter": folder / "augmenter", "llm": folder / "llm"}
    CLIPVisionModel(reference_config("clip-vit-large-patch14-336")).save_pretrained(paths["anchor"])
    Dinov2Model(reference_config(augmenter)).save_pretrained(paths["augmenter"])
    AutoModelForCausalLM.from_config(reference_config(llm), dtype=torch.float32).save_pretrained(paths["llm"])
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEFAULT_MODEL / "llm" / name, paths["llm"] / name)
    return {k: str(v) for k, v in paths.items()}


def save_reference_checkpoint(folder, kind: str = "ftz", augmenter: str = "dinov2-large", llm: str = "qwen2.5-0.5b",
                              preset: str = "paper", seed: int = 0):
    """A paper-size FtZ checkpoint (random weights) at ``folder``, self-contained like one that
    ``ftz-train`` writes after SFT: components under ``components/``, the LLM inside the
    checkpoint, fusion modules and projector in safetensors. For paper-size smoke runs of export
    and runtime (tiny models prove logic, not scale)."""
    from pathlib import Path

    from ftz_edge.checkpoint import save_checkpoint
    from ftz_edge.config import FtZConfig, TowerConfig
    from ftz_edge.mllm import FtZForCausalLM

    folder = Path(folder)
    components = save_reference_components(folder.parent / f".{folder.name}-components", augmenter, llm, seed)
    tower = TowerConfig(kind=kind, anchor=components["anchor"], augmenter=components["augmenter"] if kind != "clip" else None)
    config = FtZConfig(tower=tower, llm=components["llm"], preset=preset, llm_trained=True)
    torch.manual_seed(seed)
    model = FtZForCausalLM.from_config(config)
    save_checkpoint(model, folder, include_encoders=True, include_llm=True)
    import shutil

    shutil.rmtree(folder.parent / f".{folder.name}-components")
    return folder
