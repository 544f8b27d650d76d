"""FtZ, transformers-style: ``FtZHFConfig`` + ``FtZForConditionalGeneration`` (see docs/model.md).

Importing this package registers model_type ``"ftz"`` with ``AutoConfig`` and the model with
``AutoModel`` and ``AutoModelForImageTextToText``, and registers both classes for the Auto
classes, so ``save_pretrained`` writes ``auto_map`` and copies configuration_ftz.py and
modeling_ftz.py into the folder: ``AutoModelForImageTextToText.from_pretrained(folder,
trust_remote_code=True)`` then works in a process that never imported ftz_edge (the copied code
imports ftz_edge for the tower: ``pip install ftz-edge`` is still needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_ftz import FtZHFConfig
from .modeling_ftz import FtZForConditionalGeneration, FtZPreTrainedModel, check_hf_folder, is_hf_folder

AutoConfig.register(FtZHFConfig.model_type, FtZHFConfig, exist_ok=True)
AutoModel.register(FtZHFConfig, FtZForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(FtZHFConfig, FtZForConditionalGeneration, exist_ok=True)
FtZHFConfig.register_for_auto_class("AutoConfig")
FtZForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


def convert_checkpoint(old: str | Path, new: str | Path, max_shard_size: Optional[str | int] = None) -> Path:
    """An FtZ checkpoint folder (ftz_config.json + components) -> one transformers-format folder
    (written atomically; an existing FtZ model folder at ``new`` is replaced)."""
    model = FtZForConditionalGeneration.from_pretrained(old)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    return model.save_pretrained(new, **kwargs)


__all__ = ["FtZHFConfig", "FtZForConditionalGeneration", "FtZPreTrainedModel", "convert_checkpoint", "is_hf_folder",
           "check_hf_folder"]
