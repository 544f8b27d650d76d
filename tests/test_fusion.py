"""Layer mapping (paper section 3.3) and the authors' layer pairs."""

import pytest

from ftz_edge.fusion import authors_fusion_layers, map_to_augmenter_layer, paper_fusion_layers, uniform_anchor_layers


def test_paper_example_midpoint_maps_to_midpoint():
    # "Layer 6 of 12 would be fused with the layer at the midpoint ... Layer 3 of 6".
    assert map_to_augmenter_layer(6, 12, 6) == 3


def test_uniform_anchor_layers_end_at_the_selected_layer():
    assert uniform_anchor_layers(2, 12) == [6, 12]
    assert uniform_anchor_layers(4, 24) == [6, 12, 18, 24]
    assert uniform_anchor_layers(4, 23) == [6, 12, 17, 23]  # CLIP-L, penultimate-layer features
    assert uniform_anchor_layers(3, 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="cannot place 5 fusion points"):
        uniform_anchor_layers(5, 4)


@pytest.mark.parametrize(
    "augmenter_layers, expected",
    [
        (12, [[6, 3], [12, 6], [17, 8], [23, 11]]),  # DINOv2-S and -B
        (24, [[6, 6], [12, 12], [17, 17], [23, 23]]),  # DINOv2-L
    ],
)
def test_clip_large_mappings(augmenter_layers, expected):
    assert paper_fusion_layers(4, 23, 24, augmenter_layers) == expected


@pytest.mark.parametrize("anchor_layers, augmenter_layers", [(24, 12), (24, 24), (12, 6), (24, 40), (7, 5)])
def test_mapping_minimises_relative_depth_distance(anchor_layers, augmenter_layers):
    for a in range(1, anchor_layers + 1):
        g = map_to_augmenter_layer(a, anchor_layers, augmenter_layers)
        distances = {j: abs(j / augmenter_layers - a / anchor_layers) for j in range(1, augmenter_layers + 1)}
        best = min(distances.values())
        assert distances[g] == pytest.approx(best)
        # ties go to the shallower layer
        assert g == min(j for j, d in distances.items() if d == pytest.approx(best))


def test_mapping_rejects_out_of_range_layer():
    with pytest.raises(ValueError, match="outside 1..24"):
        map_to_augmenter_layer(25, 24, 12)


def test_authors_pairs_match_their_code():
    # Their anchor depth falls back to 12 for a CLIPModel; augmenter gap = layers // 4.
    assert authors_fusion_layers(24) == [[3, 6], [6, 12], [9, 18], [12, 24]]
    assert authors_fusion_layers(12) == [[3, 3], [6, 6], [9, 9], [12, 12]]
