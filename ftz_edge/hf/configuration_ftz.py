"""``FtZHFConfig``: the FtZ model as a transformers ``PretrainedConfig`` (model_type ``"ftz"``).

Sub-configs, as LLaVA has them: ``anchor_config`` (a ``CLIPVisionConfig``), ``augmenter_config``
(a ``Dinov2Config`` / ``Dinov2WithRegistersConfig``; ``None`` for the CLIP-only kind) and
``text_config`` (any causal LM's config, resolved by its ``model_type`` through AutoConfig). The
other fields are the FtZ settings of ``ftz_edge.config.FtZConfig`` / ``TowerConfig`` (same names,
except ``max_length``, here ``max_sequence_length``: ``max_length`` is a generation parameter to
transformers). ``to_ftz_config`` / ``from_ftz_config`` convert both ways; the component names of
an ``FtZConfig`` (hub ids or folders) are kept as provenance (``*_name_or_path``) only: a model
built from this config needs none of them.

This file is copied into every saved model folder (``trust_remote_code``); it imports
``ftz_edge`` (``pip install ftz-edge``) for the settings' validation.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ftz_edge.config import FtZConfig, TowerConfig
from ftz_edge.prompt import IMAGE_TOKEN_ID


def _reference(name: str) -> dict[str, Any]:
    """A shipped real-size config (ftz_edge/configs/NAME.json) without its model_type."""
    data = json.loads(resources.files("ftz_edge").joinpath("configs", f"{name}.json").read_text())
    data.pop("model_type")
    return data


# The paper's defaults: CLIP ViT-L/14-336, DINOv2-L, Qwen2.5-0.5B (ftz_edge/configs/).
_TOWER_FIELDS = ("kind", "num_fusion_points", "fusion_layers", "fusion_heads", "fusion_init", "select_layer",
                 "select_feature", "augmenter_select_layer", "augmenter_registers")
_MODEL_FIELDS = ("preset", "projector_depth", "prompt_format", "chat_template", "llm_trained")


class FtZHFConfig(PretrainedConfig):
    model_type = "ftz"
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs_defaults = {
        "anchor_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model",
                                       init_kwargs=_reference("clip-vit-large-patch14-336")),
        "augmenter_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2",
                                          init_kwargs=_reference("dinov2-large"), optional=True),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=_reference("qwen2.5-0.5b")),
    }

    anchor_config: dict | PretrainedConfig | None = None
    augmenter_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    # -- the tower (TowerConfig's fields, its defaults: one source for both) ---------------------
    kind: str = TowerConfig.kind
    num_fusion_points: int = TowerConfig.num_fusion_points
    fusion_layers: list | None = TowerConfig.fusion_layers
    fusion_heads: int = TowerConfig.fusion_heads
    fusion_init: str = TowerConfig.fusion_init
    select_layer: int = TowerConfig.select_layer
    select_feature: str = TowerConfig.select_feature
    augmenter_select_layer: int = TowerConfig.augmenter_select_layer
    augmenter_registers: str = TowerConfig.augmenter_registers
    # -- the model (FtZConfig's fields, its defaults) -------------------------------------------
    preset: str = FtZConfig.preset
    projector_depth: int = FtZConfig.projector_depth
    prompt_format: str = FtZConfig.prompt_format
    chat_template: str | None = FtZConfig.chat_template
    max_sequence_length: int = FtZConfig.max_length  # renamed: transformers reads max_length as a generation setting
    llm_trained: bool = FtZConfig.llm_trained
    # -- the splice: image_seq_length copies of image_token_id per image (derived, not a setting) --
    image_token_id: int = IMAGE_TOKEN_ID
    image_seq_length: int | None = None
    # -- preprocessing (preprocessor_config.json form, ftz_edge.preprocess.ImageProcessorSpec) ---
    anchor_image_processor: dict | None = None
    augmenter_image_processor: dict | None = None
    # -- provenance: the FtZConfig's component names (hub ids or folders); never loaded ---------
    anchor_name_or_path: str | None = None
    augmenter_name_or_path: str | None = None
    llm_name_or_path: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.augmenter_config is None and self.kind in ("ftz", "mof"):
            self.augmenter_config = self.sub_configs_defaults["augmenter_config"].default_config
        if self.image_token_id != IMAGE_TOKEN_ID:
            raise ValueError(f"image_token_id is ftz_edge.prompt.IMAGE_TOKEN_ID ({IMAGE_TOKEN_ID}), got {self.image_token_id}")
        self.to_ftz_config()  # validates every FtZ setting with the dataclasses' own checks
        self.image_seq_length = self._image_tokens()
        # Mirrors the LLM's (LLaVA does the same); the tying itself is the LLM's own.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    def _image_tokens(self) -> int:
        """What ``FtZVision.num_image_tokens`` gives for these configs (checked when the model is built)."""
        grid = self.anchor_config.image_size // self.anchor_config.patch_size
        tokens = grid * grid + (1 if self.select_feature == "cls_patch" else 0)
        return 2 * tokens if self.kind == "mof" else tokens

    # -- FtZConfig <-> FtZHFConfig -------------------------------------------------------------
    def to_ftz_config(self) -> FtZConfig:
        """The ``FtZConfig`` everything else in ftz-edge uses (component names from provenance)."""
        tower = TowerConfig(
            **{name: getattr(self, name) for name in _TOWER_FIELDS},
            anchor=self.anchor_name_or_path or TowerConfig.anchor,
            augmenter=self.augmenter_name_or_path if self.augmenter_name_or_path or self.kind == "clip"
            else TowerConfig.augmenter,
        )
        return FtZConfig(tower=tower, llm=self.llm_name_or_path or FtZConfig.llm, max_length=self.max_sequence_length,
                         **{name: getattr(self, name) for name in _MODEL_FIELDS})

    @classmethod
    def from_ftz_config(cls, config: FtZConfig, anchor_config: PretrainedConfig, augmenter_config: PretrainedConfig | None,
                        text_config: PretrainedConfig, anchor_image_processor: dict | None = None,
                        augmenter_image_processor: dict | None = None, **kwargs) -> "FtZHFConfig":
        """The HF config of an ``FtZConfig`` and its components' configs (those of the loaded models)."""
        tower = config.tower
        # The sub-configs are the live models' own: keep their attention implementations (a plain
        # None would be set on every sub-config).
        kwargs.setdefault("attn_implementation", {})
        return cls(
            anchor_config=anchor_config, augmenter_config=augmenter_config if tower.uses_augmenter else None,
            text_config=text_config,
            **{name: getattr(tower, name) for name in _TOWER_FIELDS},
            **{name: getattr(config, name) for name in _MODEL_FIELDS},
            max_sequence_length=config.max_length,
            anchor_image_processor=anchor_image_processor, augmenter_image_processor=augmenter_image_processor,
            anchor_name_or_path=tower.anchor, augmenter_name_or_path=tower.augmenter, llm_name_or_path=config.llm,
            **kwargs,
        )


__all__ = ["FtZHFConfig"]
