"""Dataclass configs for the FtZ vision tower and the multimodal LM.

A config is saved as JSON next to every checkpoint (``ftz_config.json``), so a checkpoint
folder describes itself. Component fields (``anchor``, ``augmenter``, ``llm``) hold a Hugging
Face hub id or a folder path; relative paths are resolved against the checkpoint folder.

Three presets (every default below says where it comes from):

* ``paper`` (default) follows the paper's text (arXiv 2509.00664): uniformly spaced anchor
  layers mapped to the augmenter by relative depth (sec. 3.3); the fusion modules randomly
  initialised (sec. 4.1: "the randomly initialized parameters of our FtE modules"; the residual
  is the gate, sec. 3.3); the projector fed "the final visual tokens" (sec. 3.4): the anchor's
  last layer output, patch tokens.
* ``llava`` is ``paper`` with LLaVA's conventions instead: the penultimate anchor layer
  (LLaVA's ``mm_vision_select_layer -2``) and a zero-initialised MHCA output projection (our
  choice: an untrained tower is then exactly CLIP-only; note that it also makes the first
  steps' gradients of W_proj and the Q/K/V projections exactly zero).
* ``authors`` reproduces the authors' public code (their TinyLLaVA Factory fork): anchor layers
  3, 6, 9, 12 (their layer count falls back to 12 for a CLIPModel) paired with augmenter layers
  ``(L_aug // 4) * i``, nn.MultiheadAttention's own (random) init, last-layer anchor features,
  8 heads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ftz_edge.prompt import PROMPT_FORMATS

TOWER_KINDS = ("ftz", "clip", "mof")
SELECT_FEATURES = ("patch", "cls_patch")
INIT_STYLES = ("random", "zero")
# Checkpoints written before the init styles were named after what they do.
LEGACY_INIT_STYLES = {"default": "random"}
REGISTER_TOKENS = ("keep", "drop")
PRESETS = ("paper", "llava", "authors")
CONFIG_NAME = "ftz_config.json"


@dataclass
class TowerConfig:
    """The vision side: anchor (CLIP), optional augmenter (DINOv2), fusion and feature choice."""

    kind: str = "ftz"  # "ftz" (fused), "clip" (CLIP-only baseline), "mof" (Interleaved-MoF)
    anchor: str = "openai/clip-vit-large-patch14-336"
    augmenter: Optional[str] = "facebook/dinov2-large"
    # Fusion (kind "ftz" only). Either a count of uniformly spaced anchor layers, or explicit
    # (anchor_layer, augmenter_layer) pairs; layers are 1-based indices of layer *outputs*
    # (hidden_states[i] in transformers), the fusion is applied to that output.
    num_fusion_points: int = 4
    fusion_layers: Optional[list[list[int]]] = None
    fusion_heads: int = 8
    # "random": nn.MultiheadAttention's own init (the paper, sec. 4.1, and the authors' code);
    # "zero": the output projection zeroed, so an untrained tower is exactly the plain anchor.
    fusion_init: str = "random"
    # The features the projector reads: hidden state of this anchor layer (negative counts from
    # the end, -1 = the last layer's output before the post-LayerNorm: the paper's "final visual
    # tokens", sec. 3.4; LLaVA uses -2), patch tokens (the paper, the authors) or CLS + patches.
    select_layer: int = -1
    select_feature: str = "patch"
    # Interleaved-MoF uses the augmenter's hidden state of this layer (LLaVA's -2 convention,
    # as the anchor's in LLaVA; the paper does not say which layer its MoF baseline reads).
    augmenter_select_layer: int = -2
    # A DINOv2-with-registers augmenter (facebook/dinov2-*-with-registers) emits register tokens
    # after its CLS token: "keep" lets the fusion attend to them (they are part of what the
    # encoder outputs), "drop" removes them. Interleaved-MoF always interleaves patch tokens only.
    augmenter_registers: str = "keep"

    def __post_init__(self) -> None:
        if self.kind not in TOWER_KINDS:
            raise ValueError(f"tower kind must be one of {TOWER_KINDS}, got {self.kind!r}")
        if self.kind in ("ftz", "mof") and not self.augmenter:
            raise ValueError(f"tower kind {self.kind!r} needs an augmenter (a DINOv2 checkpoint)")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature must be one of {SELECT_FEATURES}, got {self.select_feature!r}")
        self.fusion_init = LEGACY_INIT_STYLES.get(self.fusion_init, self.fusion_init)
        if self.fusion_init not in INIT_STYLES:
            raise ValueError(f"fusion_init must be one of {INIT_STYLES}, got {self.fusion_init!r}")
        if self.augmenter_registers not in REGISTER_TOKENS:
            raise ValueError(f"augmenter_registers must be one of {REGISTER_TOKENS}, got {self.augmenter_registers!r}")
        if self.num_fusion_points < 1:
            raise ValueError("num_fusion_points must be at least 1")
        if self.fusion_layers is not None:
            self.fusion_layers = [[int(a), int(g)] for a, g in self.fusion_layers]
        if self.select_layer == 0:
            raise ValueError("select_layer 0 is the embedding output; pick a transformer layer (1.. or negative)")

    @property
    def uses_augmenter(self) -> bool:
        return self.kind in ("ftz", "mof")


@dataclass
class FtZConfig:
    """The whole multimodal model: tower + projector + causal LM."""

    tower: TowerConfig = field(default_factory=TowerConfig)
    llm: str = "Qwen/Qwen2.5-0.5B-Instruct"
    preset: str = "paper"
    # 2-layer GELU MLP ("mlp2x_gelu" in LLaVA): vision width -> LLM width -> LLM width.
    projector_depth: int = 2
    # How conversations are rendered (ftz_edge.prompt.PROMPT_FORMATS): "chat" is the LLM tokenizer's
    # own chat template (our choice: the paper does not say); "plain" and "llama" are the authors'
    # pretraining and SFT formats. A training stage may set its own (TrainConfig.prompt_format);
    # the model it saves records it, and the exported bundle renders the same.
    prompt_format: str = "chat"
    # Used when the LLM tokenizer has no chat template of its own (see ftz_edge.prompt).
    chat_template: Optional[str] = None
    max_length: int = 2048
    # Whether the LLM's weights are part of this checkpoint (true after the SFT stage).
    llm_trained: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.tower, dict):
            self.tower = TowerConfig(**self.tower)
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.projector_depth < 1:
            raise ValueError("projector_depth must be at least 1")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")

    # -- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FtZConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FtZ config fields: {sorted(unknown)}")
        tower = data.get("tower", {})
        tower_known = {f.name for f in dataclasses.fields(TowerConfig)}
        if set(tower) - tower_known:
            raise ValueError(f"unknown tower config fields: {sorted(set(tower) - tower_known)}")
        return cls(**{**data, "tower": TowerConfig(**tower)})

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "FtZConfig":
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not an FtZ checkpoint folder")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)


def preset(name: str, **overrides: Any) -> FtZConfig:
    """A named configuration; keyword overrides go to the tower (tower fields) or the model."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}")
    tower_fields = {f.name for f in dataclasses.fields(TowerConfig)}
    tower_kw = {k: v for k, v in overrides.items() if k in tower_fields}
    model_kw = {k: v for k, v in overrides.items() if k not in tower_fields}
    if name == "authors":
        # fusion_layers stays None here: the pairs depend on the augmenter's depth and are
        # resolved by ftz_edge.fusion.authors_fusion_layers when the tower is built.
        tower_kw = {"fusion_init": "random", "select_layer": -1, "fusion_heads": 8, **tower_kw}
    elif name == "llava":
        tower_kw = {"fusion_init": "zero", "select_layer": -2, **tower_kw}
    return FtZConfig(tower=TowerConfig(**tower_kw), preset=name, **model_kw)
