"""The FtZ fusion (paper section 3.3): which layers meet, and how the anchor queries the augmenter.

Layer indices are 1-based indices of layer *outputs*, as in transformers' ``hidden_states``
(``hidden_states[0]`` is the embedding output, ``hidden_states[i]`` the output of layer i).
A fusion point ``(a, g)`` adds ``MHCA(anchor_out_a, W_proj(augmenter_out_g))`` to the anchor's
layer-``a`` output, which then enters anchor layer ``a + 1``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn


def uniform_anchor_layers(num_points: int, depth: int) -> list[int]:
    """``num_points`` anchor layers spread evenly over layers 1..depth, the last one at ``depth``.

    ``depth`` is the number of anchor layers whose output is used (the selected feature layer),
    so no fusion point lands after the features are read: with CLIP-L's penultimate layer
    (depth 23) and 4 points this gives 6, 12, 17, 23. Steps of at least one layer never collide.
    """
    if not 1 <= num_points <= depth:
        raise ValueError(
            f"cannot place {num_points} fusion points in the {depth} anchor layers that feed the selected "
            "features; lower num_fusion_points or give fusion_layers explicitly"
        )
    # Round half up, exactly (Fraction), so 11.5 -> 12 regardless of float representation.
    return [math.floor(Fraction(k * depth, num_points) + Fraction(1, 2)) for k in range(1, num_points + 1)]


def map_to_augmenter_layer(anchor_layer: int, anchor_layers: int, augmenter_layers: int) -> int:
    """The augmenter layer at the most similar relative depth to ``anchor_layer``.

    Minimises ``|g / augmenter_layers - a / anchor_layers|`` over g in 1..augmenter_layers, the
    paper's "most similar relative position": layer 6 of 12 maps to layer 3 of 6. An exact tie
    (e.g. 17 of 24 -> 8.5 of 12) goes to the shallower layer, which is also the cheaper one to run.
    """
    if not 1 <= anchor_layer <= anchor_layers:
        raise ValueError(f"anchor layer {anchor_layer} is outside 1..{anchor_layers}")
    target = Fraction(anchor_layer * augmenter_layers, anchor_layers)
    shallower_on_tie = math.ceil(target - Fraction(1, 2))
    return min(max(shallower_on_tie, 1), augmenter_layers)


def paper_fusion_layers(num_points: int, anchor_depth: int, anchor_layers: int, augmenter_layers: int) -> list[list[int]]:
    """Uniform anchor layers up to ``anchor_depth``, each paired by relative depth (paper text)."""
    return [
        [a, map_to_augmenter_layer(a, anchor_layers, augmenter_layers)]
        for a in uniform_anchor_layers(num_points, anchor_depth)
    ]


def authors_fusion_layers(augmenter_layers: int, num_points: int = 4) -> list[list[int]]:
    """The pairs the authors' code produces: anchor ``3i`` (its anchor depth falls back to 12 for
    a CLIPModel, 12 // 4 = 3), augmenter ``(augmenter_layers // 4) * i``; i = 1..4.
    With DINOv2-L that is (3, 6), (6, 12), (9, 18), (12, 24)."""
    anchor_gap, augmenter_gap = 12 // num_points, augmenter_layers // num_points
    return [[anchor_gap * i, augmenter_gap * i] for i in range(1, num_points + 1)]


class CrossAttentionFusion(nn.Module):
    """W_proj + multi-head cross-attention, added residually to the anchor stream.

    Q comes from the anchor tokens, K and V from the augmenter tokens projected to the anchor
    width, so the two encoders may have any token counts and grids. ``init="random"`` is
    nn.MultiheadAttention's own init (the paper's "randomly initialized" FtE modules, the authors'
    code). With ``init="zero"`` the output projection starts at zero and an untrained tower is
    exactly the plain anchor; the price is that the first backward pass gives W_proj and the
    Q/K/V projections exactly zero gradient (everything behind a zero matrix), so they only start
    to learn once the output projection has moved.
    """

    def __init__(self, anchor_width: int, augmenter_width: int, num_heads: int, init: str = "random"):
        super().__init__()
        if anchor_width % num_heads:
            raise ValueError(f"anchor width {anchor_width} is not divisible by {num_heads} fusion heads")
        self.num_heads = num_heads
        self.augmenter_proj = nn.Linear(augmenter_width, anchor_width)  # W_proj in the paper
        self.q_proj = nn.Linear(anchor_width, anchor_width)
        self.k_proj = nn.Linear(anchor_width, anchor_width)
        self.v_proj = nn.Linear(anchor_width, anchor_width)
        self.out_proj = nn.Linear(anchor_width, anchor_width)
        self._init_like_multihead_attention(anchor_width, num_heads)
        if init == "zero":
            nn.init.zeros_(self.out_proj.weight)
            nn.init.zeros_(self.out_proj.bias)
        elif init != "random":
            raise ValueError(f"unknown fusion init {init!r}")

    @torch.no_grad()
    def _init_like_multihead_attention(self, width: int, num_heads: int) -> None:
        # The authors use nn.MultiheadAttention; take its freshly initialised parameters (packed
        # Xavier in-projection, zero biases) so "random" init is theirs by construction.
        reference = nn.MultiheadAttention(width, num_heads, batch_first=True)
        for proj, weight, bias in zip(
            (self.q_proj, self.k_proj, self.v_proj),
            reference.in_proj_weight.chunk(3),
            reference.in_proj_bias.chunk(3),
        ):
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
        self.out_proj.weight.copy_(reference.out_proj.weight)
        self.out_proj.bias.copy_(reference.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, anchor_states: torch.Tensor, augmenter_states: torch.Tensor) -> torch.Tensor:
        keys_values = self.augmenter_proj(augmenter_states.to(anchor_states.dtype))
        q = self._split_heads(self.q_proj(anchor_states))
        k = self._split_heads(self.k_proj(keys_values))
        v = self._split_heads(self.v_proj(keys_values))
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(anchor_states.shape)
        return anchor_states + self.out_proj(attended)
