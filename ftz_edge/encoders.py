"""Loading the frozen encoders and driving their layers one by one.

The tower runs embeddings and layers itself (so it can stop early and fuse between layers),
relying only on the public module structure of transformers' CLIP and DINOv2:
``embeddings`` -> (``pre_layrnorm`` for CLIP) -> ``encoder.layers`` / ``encoder.layer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import (AutoConfig, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                          Dinov2WithRegistersModel)
from transformers.utils import logging as hf_logging

from ftz_edge.preprocess import ImageProcessorSpec, clip_spec, dinov2_spec


class ComponentLoadError(RuntimeError):
    """A component (encoder or LLM) could not be loaded from the given id or folder."""


def resolve_component(name: str, base_dir: Optional[Path] = None) -> str:
    """A local folder (relative paths are tried against ``base_dir`` first) or a hub id as given."""
    if base_dir is not None and (Path(base_dir) / name).is_dir():
        return str(Path(base_dir) / name)
    return name


# The checkpoint types each encoder is loaded from (config.json's model_type) and the class
# that reads it completely; anything else is refused instead of being loaded half-right.
ANCHOR_TYPES = {"clip_vision_model": CLIPVisionModel, "clip": CLIPVisionModel}
AUGMENTER_TYPES = {"dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel}


def _where(path: str) -> str:
    return "local folder" if Path(path).is_dir() else "hub id (no local folder of that name)"


def _model_class(path: str, types: dict, what: str):
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as err:
        first = next(iter(types.values())).__name__
        raise ComponentLoadError(f"cannot load {first} from {path!r} [{_where(path)}]: {err}") from None
    if model_type not in types:
        raise ComponentLoadError(f"{path!r} is a {model_type!r} checkpoint; the {what} must be one of "
                                 f"{', '.join(sorted(types))}")
    return types[model_type], model_type


def _load(model_cls, path: str, dtype: Optional[torch.dtype], quiet: bool = False):
    verbosity = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        return model_cls.from_pretrained(path, dtype=dtype) if dtype else model_cls.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ComponentLoadError(f"cannot load {model_cls.__name__} from {path!r} [{_where(path)}]: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_anchor(name: str, base_dir: Optional[Path] = None, dtype: Optional[torch.dtype] = None) -> CLIPVisionModel:
    """CLIP vision tower from a CLIPVisionModel *or* a full CLIPModel checkpoint (vision part only)."""
    path = resolve_component(name, base_dir)
    model_cls, model_type = _model_class(path, ANCHOR_TYPES, "anchor (a CLIP vision checkpoint)")
    # A full CLIPModel checkpoint carries a text tower we do not load on purpose; transformers
    # lists every skipped text weight, which is noise there, not a problem. Only there.
    return freeze(_load(model_cls, path, dtype, quiet=model_type == "clip"))


def load_augmenter(name: str, base_dir: Optional[Path] = None,
                   dtype: Optional[torch.dtype] = None) -> Dinov2Model | Dinov2WithRegistersModel:
    """DINOv2, with or without registers, each by its own class (a with-registers checkpoint
    read as a plain Dinov2Model would silently lose its register tokens)."""
    path = resolve_component(name, base_dir)
    model_cls, _ = _model_class(path, AUGMENTER_TYPES, "augmenter (a DINOv2 checkpoint)")
    return freeze(_load(model_cls, path, dtype))


def num_register_tokens(augmenter: nn.Module) -> int:
    """Register tokens a DINOv2 emits after its CLS token (0 for a plain DINOv2)."""
    return int(getattr(augmenter.config, "num_register_tokens", 0) or 0)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def anchor_layers(anchor: CLIPVisionModel) -> nn.ModuleList:
    return anchor.encoder.layers


def augmenter_layers(augmenter: Dinov2Model) -> nn.ModuleList:
    return augmenter.encoder.layer


def anchor_embed(anchor: CLIPVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """What CLIP feeds its first layer: patch + position embeddings, then the pre-LayerNorm."""
    dtype = anchor.embeddings.patch_embedding.weight.dtype
    return anchor.pre_layrnorm(anchor.embeddings(pixel_values.to(dtype)))


def augmenter_embed(augmenter: Dinov2Model, pixel_values: torch.Tensor) -> torch.Tensor:
    dtype = augmenter.embeddings.patch_embeddings.projection.weight.dtype
    return augmenter.embeddings(pixel_values.to(dtype))


def run_layer(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    out = layer(hidden_states, None)
    # transformers 4.x layers returned tuples; 5.x return the tensor.
    return out[0] if isinstance(out, tuple) else out


def resolve_layer(index: int, num_layers: int, what: str) -> int:
    """A 1-based layer number from a LLaVA-style index (negative counts from the end, -1 = last)."""
    layer = index if index > 0 else num_layers + 1 + index
    if not 1 <= layer <= num_layers:
        raise ValueError(f"{what} {index} is outside a {num_layers}-layer encoder")
    return layer


def patch_grid(config, pixel_shape: tuple[int, int]) -> tuple[int, int]:
    return pixel_shape[0] // config.patch_size, pixel_shape[1] // config.patch_size


def anchor_spec(anchor_path: Optional[str], config: CLIPVisionConfig) -> ImageProcessorSpec:
    """The checkpoint's own preprocessor_config.json when it has one, else CLIP's standard one."""
    if anchor_path and (Path(anchor_path) / "preprocessor_config.json").is_file():
        return ImageProcessorSpec.from_pretrained_folder(anchor_path)
    return clip_spec(config.image_size)


def augmenter_spec(augmenter_path: Optional[str], config: Dinov2Config) -> ImageProcessorSpec:
    """DINOv2's processor (resize 256, crop 224) scaled to the checkpoint's own size when it has none."""
    if augmenter_path and (Path(augmenter_path) / "preprocessor_config.json").is_file():
        return ImageProcessorSpec.from_pretrained_folder(augmenter_path)
    # DINOv2 configs say image_size 518 (the pretraining size) while its processor crops 224;
    # only a tiny, project-built config states a smaller size that is meant as the crop.
    crop = 224 if config.image_size >= 224 else config.image_size
    return dinov2_spec(crop_size=crop, resize=round(crop * 256 / 224))
