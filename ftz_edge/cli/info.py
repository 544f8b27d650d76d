"""``ftz-info``: the shipped default model answering questions, and what FtZ models are made of.

Loads the shipped default (``ftz_edge/default_model``, trained by
``python -m ftz_edge.training.default_model``), prints its tower's shapes and parameter counts
and its answers to the shipped example images. Then builds a tiny FtZ model from random components (written with ``save_pretrained`` and loaded
back through ``from_pretrained``, as real checkpoints are), runs every tower kind on one
preprocessed image and prints output shapes and parameter counts; then the real-size towers
(CLIP ViT-L/14-336 with DINOv2-S/B/L, on the meta device) with their layer pruning.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np


def _tiny_report(workdir: str) -> None:
    import torch
    from PIL import Image
    from transformers.utils import logging

    from ftz_edge import tiny
    from ftz_edge.config import FtZConfig, TowerConfig
    from ftz_edge.mllm import FtZForCausalLM
    from ftz_edge.sizes import count_parameters

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    paths = tiny.build_tiny_components(workdir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    print("Tiny models (random weights), one 96x80 image:")
    print(f"{'tower':6} {'anchor px':>12} {'augmenter px':>13} {'output':>14} {'fusion layers':>16} "
          f"{'encoders':>9} {'fusion':>8} {'projector':>9} {'LLM':>8}")
    for kind in ("ftz", "clip", "mof"):
        tower = TowerConfig(kind=kind, anchor=paths["anchor"], augmenter=None if kind == "clip" else paths["augmenter"],
                            num_fusion_points=2)
        model = FtZForCausalLM.from_config(FtZConfig(tower=tower, llm=paths["llm"]))
        anchor_px, aug_px = model.preprocess_images([image])
        with torch.no_grad():
            out = model.vision(anchor_px, aug_px)
        vision = model.vision
        encoders = count_parameters(vision.anchor) + (count_parameters(vision.augmenter) if vision.augmenter else 0)
        fusion = count_parameters(vision.fusion) if kind == "ftz" else 0
        projector = count_parameters(vision.projector) + (count_parameters(vision.augmenter_projector) if kind == "mof" else 0)
        print(f"{kind:6} {str(tuple(anchor_px.shape)):>12} {str(tuple(aug_px.shape)) if aug_px is not None else '-':>13} "
              f"{str(tuple(out.shape)):>14} {str(vision.fusion_layers or '-'):>16} {encoders:>9,} {fusion:>8,} "
              f"{projector:>9,} {count_parameters(model.llm):>8,}")


def _default_model_report() -> None:
    import json

    import torch
    from transformers.utils import logging

    from ftz_edge import DEFAULT_MODEL
    from ftz_edge.checkpoint import load_checkpoint
    from ftz_edge.sizes import count_parameters

    logging.disable_progress_bar()
    folder = DEFAULT_MODEL
    model = load_checkpoint(folder).eval()
    vision = model.vision
    examples = json.loads((folder / "examples" / "examples.json").read_text())
    anchor_px, aug_px = model.preprocess_images([folder / "examples" / examples[0]["image"]])
    with torch.no_grad():
        embeds = vision(anchor_px, aug_px)
    print(f"Shipped default model ({folder}): tower {vision.config.kind}, fusion layers {vision.fusion_layers}")
    print(f"  anchor pixels {tuple(anchor_px.shape)}, augmenter pixels {tuple(aug_px.shape)} -> image embeddings "
          f"{tuple(embeds.shape)}")
    print(f"  parameters: anchor {count_parameters(vision.anchor):,}, augmenter {count_parameters(vision.augmenter):,}, "
          f"fusion {count_parameters(vision.fusion):,}, projector {count_parameters(vision.projector):,}, "
          f"LLM {count_parameters(model.llm):,}")
    for example in examples:
        reply = model.answer(folder / "examples" / example["image"], example["question"], max_new_tokens=4)
        print(f"  [{example['image']}] {example['question']} -> {reply!r} (expected {example['answer']!r})")
    print()


def _real_size_report() -> None:
    from ftz_edge.config import preset
    from ftz_edge.sizes import build_reference_vision, count_parameters, tower_cost

    print("\nReal-size towers, CLIP ViT-L/14-336 anchor (meta device; GFLOPs per image estimated from configs):")
    print(f"{'preset':8} {'augmenter':13} {'fusion layers (anchor, augmenter)':38} {'anchor run':>10} "
          f"{'augm. run':>9} {'fusion params':>13} {'GFLOPs':>7} {'unpruned':>8} {'saving':>6}")
    rows = [("paper", "dinov2-small"), ("paper", "dinov2-base"), ("paper", "dinov2-large"), ("llava", "dinov2-large"),
            ("authors", "dinov2-large")]
    for name, augmenter in rows:
        tower = preset(name).tower
        vision = build_reference_vision(tower, augmenter, preset=name)
        cost = tower_cost(vision)
        print(f"{name:8} {augmenter:13} {str(vision.fusion_layers):38} "
              f"{cost.anchor_layers_run:>4}/{cost.anchor_layers:<5} {cost.augmenter_layers_run:>4}/{cost.augmenter_layers:<4} "
              f"{count_parameters(vision.fusion) / 1e6:>12.1f}M {cost.gflops:>7.1f} {cost.gflops_unpruned:>8.1f} "
              f"{cost.saving:>6.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftz-info", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-real-size", action="store_true", help="only the tiny models")
    args = parser.parse_args(argv)
    _default_model_report()
    with tempfile.TemporaryDirectory(prefix="ftz-info-") as workdir:
        _tiny_report(workdir)
    if not args.skip_real_size:
        _real_size_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
