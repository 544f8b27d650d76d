"""The vision side of the model: FtZ tower, or one of the paper's baselines, plus projector(s).

``FtZVision(anchor_pixels, augmenter_pixels)`` returns image embeddings at the LLM's width.
Kinds (``TowerConfig.kind``):

* ``ftz``  - CLIP anchor fused with DINOv2 at the mapped layer pairs (ftz_edge.fusion);
* ``clip`` - CLIP-only baseline (LLaVA);
* ``mof``  - Interleaved-MoF (Tong et al., "Eyes Wide Shut"): CLIP and DINOv2 patch tokens,
  each through its own projector, interleaved token by token. DINOv2's grid is resampled
  (bilinear) to CLIP's grid first so both streams have the same token count.

Dead layers are never run: the anchor stops at the selected feature layer, the augmenter at
the deepest layer anything reads.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ftz_edge import encoders
from ftz_edge.config import TowerConfig
from ftz_edge.fusion import CrossAttentionFusion, authors_fusion_layers, paper_fusion_layers


def mlp_projector(in_width: int, out_width: int, depth: int = 2) -> nn.Sequential:
    """LLaVA's ``mlp{depth}x_gelu`` connector: Linear, then (GELU, Linear) * (depth - 1)."""
    layers: list[nn.Module] = [nn.Linear(in_width, out_width)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_width, out_width)]
    return nn.Sequential(*layers)


class FtZVision(nn.Module):
    def __init__(
        self,
        config: TowerConfig,
        anchor: nn.Module,
        augmenter: Optional[nn.Module],
        llm_width: int,
        projector_depth: int = 2,
        preset: str = "paper",
    ):
        super().__init__()
        if config.uses_augmenter and augmenter is None:
            raise ValueError(f"tower kind {config.kind!r} needs an augmenter model")
        self.config = config
        self.anchor = encoders.freeze(anchor)
        self.augmenter = encoders.freeze(augmenter) if config.uses_augmenter else None
        # DINOv2 with registers: tokens are [CLS, registers..., patches...].
        self.augmenter_registers = encoders.num_register_tokens(augmenter) if self.augmenter is not None else 0
        anchor_cfg = anchor.config
        self.anchor_total_layers = anchor_cfg.num_hidden_layers
        self.anchor_depth = encoders.resolve_layer(config.select_layer, self.anchor_total_layers, "select_layer")

        self.fusion_layers: list[list[int]] = []
        self.augmenter_depth = 0
        if config.kind == "ftz":
            aug_cfg = augmenter.config
            self.fusion_layers = self._fusion_layers(config, preset, aug_cfg.num_hidden_layers)
            self.fusion = nn.ModuleDict(
                {
                    str(a): CrossAttentionFusion(anchor_cfg.hidden_size, aug_cfg.hidden_size, config.fusion_heads, config.fusion_init)
                    for a, _ in self.fusion_layers
                }
            )
            self.augmenter_depth = max(g for _, g in self.fusion_layers)
        elif config.kind == "mof":
            aug_cfg = augmenter.config
            self.augmenter_depth = encoders.resolve_layer(
                config.augmenter_select_layer, aug_cfg.num_hidden_layers, "augmenter_select_layer"
            )
            self.augmenter_projector = mlp_projector(aug_cfg.hidden_size, llm_width, projector_depth)
        self.projector = mlp_projector(anchor_cfg.hidden_size, llm_width, projector_depth)
        # Recompute anchor layers in the backward pass instead of keeping their activations
        # (set by training; the anchor is frozen but gradients flow through it to earlier MHCAs).
        self.gradient_checkpointing = False

    def _fusion_layers(self, config: TowerConfig, preset: str, augmenter_total: int) -> list[list[int]]:
        if config.fusion_layers is not None:
            pairs = [list(p) for p in config.fusion_layers]
        elif preset == "authors":
            pairs = authors_fusion_layers(augmenter_total, config.num_fusion_points)
        else:
            pairs = paper_fusion_layers(config.num_fusion_points, self.anchor_depth, self.anchor_total_layers, augmenter_total)
        anchors = [a for a, _ in pairs]
        if len(set(anchors)) != len(anchors):
            raise ValueError(f"fusion layers {pairs}: each anchor layer may be fused once")
        for a, g in pairs:
            if not 1 <= a <= self.anchor_depth:
                raise ValueError(
                    f"fusion at anchor layer {a} is outside the {self.anchor_depth} anchor layers that feed "
                    f"the selected features (select_layer={config.select_layer}); it would never be read"
                )
            if not 1 <= g <= augmenter_total:
                raise ValueError(f"fusion with augmenter layer {g} is outside 1..{augmenter_total}")
        return sorted(pairs)

    # -- frozen encoders stay in eval mode whatever the parent does ------------------------
    def train(self, mode: bool = True) -> "FtZVision":
        super().train(mode)
        self.anchor.eval()
        if self.augmenter is not None:
            self.augmenter.eval()
        return self

    @property
    def num_image_tokens(self) -> int:
        image_size = self.anchor.config.image_size
        grid = image_size // self.anchor.config.patch_size
        tokens = grid * grid + (1 if self.config.select_feature == "cls_patch" else 0)
        return 2 * tokens if self.config.kind == "mof" else tokens

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen encoders: fusion modules (W_proj + MHCA) and projector(s)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("anchor.", "augmenter."))}

    # -- forward -------------------------------------------------------------------------
    def _augmenter_states(self, pixel_values: torch.Tensor, wanted: set[int]) -> dict[int, torch.Tensor]:
        """Hidden states of the wanted augmenter layers; runs layers 1..max(wanted) only."""
        # The augmenter is frozen and nothing before it trains, so no graph is kept through it.
        with torch.no_grad():
            hidden = encoders.augmenter_embed(self.augmenter, pixel_values)
            states = {}
            for index, layer in enumerate(encoders.augmenter_layers(self.augmenter)[: max(wanted)], start=1):
                hidden = encoders.run_layer(layer, hidden)
                if index in wanted:
                    states[index] = hidden
        if self.augmenter_registers and self.config.kind == "ftz" and self.config.augmenter_registers == "drop":
            skip = 1 + self.augmenter_registers
            states = {index: torch.cat([state[:, :1], state[:, skip:]], dim=1) for index, state in states.items()}
        return states

    def anchor_features(self, anchor_pixels: torch.Tensor, augmenter_pixels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The selected anchor hidden state (fused for kind ``ftz``), all tokens, CLS first."""
        augmenter_states = {}
        if self.config.kind == "ftz":
            if augmenter_pixels is None:
                raise ValueError("an FtZ tower needs augmenter_pixels (DINOv2-preprocessed images)")
            augmenter_states = self._augmenter_states(augmenter_pixels, {g for _, g in self.fusion_layers})
        fusion_at = {a: g for a, g in self.fusion_layers}
        hidden = encoders.anchor_embed(self.anchor, anchor_pixels)
        for index, layer in enumerate(encoders.anchor_layers(self.anchor)[: self.anchor_depth], start=1):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(encoders.run_layer, layer, hidden, use_reentrant=False)
            else:
                hidden = encoders.run_layer(layer, hidden)
            if index in fusion_at:
                hidden = self.fusion[str(index)](hidden, augmenter_states[fusion_at[index]])
        return hidden

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.config.select_feature == "cls_patch" else hidden[:, 1:]

    def forward(self, anchor_pixels: torch.Tensor, augmenter_pixels: Optional[torch.Tensor] = None) -> torch.Tensor:
        anchor_hidden = self.anchor_features(anchor_pixels, augmenter_pixels)
        if self.config.kind != "mof":
            return self.projector(self._select(anchor_hidden))
        if augmenter_pixels is None:
            raise ValueError("an Interleaved-MoF tower needs augmenter_pixels (DINOv2-preprocessed images)")
        aug_hidden = self._augmenter_states(augmenter_pixels, {self.augmenter_depth})[self.augmenter_depth]
        anchor_grid = encoders.patch_grid(self.anchor.config, tuple(anchor_pixels.shape[-2:]))
        aug_grid = encoders.patch_grid(self.augmenter.config, tuple(augmenter_pixels.shape[-2:]))
        # Patch tokens only: MoF interleaves by position, and registers have none.
        aug_patches = _resample_grid(aug_hidden[:, 1 + self.augmenter_registers:], aug_grid, anchor_grid)
        anchor_tokens = self.projector(anchor_hidden[:, 1:])
        aug_tokens = self.augmenter_projector(aug_patches.to(anchor_hidden.dtype))
        batch, tokens, width = anchor_tokens.shape
        # Interleave spatially: CLIP patch i, DINOv2 patch i, CLIP patch i+1, ...
        mixed = torch.stack([anchor_tokens, aug_tokens], dim=2).reshape(batch, 2 * tokens, width)
        if self.config.select_feature == "cls_patch":
            cls = torch.stack(
                [self.projector(anchor_hidden[:, 0]), self.augmenter_projector(aug_hidden[:, 0].to(anchor_hidden.dtype))], dim=1
            )
            mixed = torch.cat([cls, mixed], dim=1)
        return mixed


def _resample_grid(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) patch tokens on ``grid`` -> (B, H*W, C) on ``target``, bilinear."""
    if grid == target:
        return tokens
    batch, _, channels = tokens.shape
    image = tokens.transpose(1, 2).reshape(batch, channels, *grid)
    image = F.interpolate(image.float(), size=target, mode="bilinear", align_corners=False)
    return image.reshape(batch, channels, -1).transpose(1, 2)
