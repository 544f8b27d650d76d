"""FtZ (Fusion to Enhance): a CLIP anchor fused with a DINOv2 augmenter for small VLMs.

This package root stays torch-free on purpose: the on-device runtime imports the shared
preprocessing and prompt modules through it, and must never pull in torch or transformers.
Import the model pieces from their modules (``ftz_edge.vision`` for the tower, ``ftz_edge.mllm``, ...).
"""

from pathlib import Path

__version__ = "0.1.0"

# The shipped default model (trained by ftz_edge.training.default_model); everything defaults to it.
DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
