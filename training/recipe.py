"""Training settings: one dataclass per stage, and named recipe files that hold the paper's runs.

A recipe (``training/recipes/NAME.yaml``) has a ``model`` section (FtZConfig fields, tower fields
under ``tower``) and a ``stages`` section with ``pretrain`` and ``finetune`` settings
(TrainConfig fields). Data paths in recipes are relative to ``--data-root``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from ftz_edge.config import FtZConfig
from ftz_edge.prompt import PROMPT_FORMATS

STAGES = ("pretrain", "finetune")
RECIPE_DIR = "recipes"


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # "pretrain": fusion + W_proj + projector; "finetune": + the LLM
    data_path: str = ""
    image_folder: Optional[str] = None
    output_dir: str = "runs/ftz"
    init_from: Optional[str] = None  # an FtZ checkpoint to start from (finetune: the pretrain result)
    global_batch_size: int = 256
    per_device_batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    num_epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides num_epochs when set
    mixed_precision: str = "bf16"  # "bf16", "fp16" or "no"; used on CUDA only
    gradient_checkpointing: bool = True
    save_every: int = 500  # optimizer steps; a checkpoint is also written at the end
    keep_last: int = 2
    log_every: int = 10
    seed: int = 42
    max_length: int = 2048
    strict: bool = False
    num_workers: int = 2
    save_encoders: bool = False  # copy the encoders into the final checkpoint (self-contained)
    # Also write the final model in the transformers format (``final-hf/``: config.json + model.safetensors,
    # FtZForConditionalGeneration.from_pretrained / AutoModelForImageTextToText; ftz_edge.hf). It holds
    # every weight, the frozen encoders too (paper size: ~4.5 GB in fp32).
    save_hf: bool = True
    # This stage's prompt format (ftz_edge.prompt.PROMPT_FORMATS); None: the model's own
    # (FtZConfig.prompt_format). The checkpoint it saves records the format it trained with.
    # The authors: "plain" to pretrain, "llama" for SFT (TinyLLaVA Factory's conversations).
    prompt_format: Optional[str] = None

    def __post_init__(self) -> None:
        if self.prompt_format is not None and self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS} (or unset), got {self.prompt_format!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.mixed_precision not in ("bf16", "fp16", "no"):
            raise ValueError(f"mixed_precision must be bf16, fp16 or no, got {self.mixed_precision!r}")
        for name in ("global_batch_size", "per_device_batch_size", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def gradient_accumulation(self, num_processes: int) -> int:
        per_step = self.per_device_batch_size * num_processes
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global batch {self.global_batch_size} is not a multiple of per-device batch "
                f"{self.per_device_batch_size} x {num_processes} processes"
            )
        return self.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def available_recipes() -> list[str]:
    folder = resources.files("ftz_edge.training").joinpath(RECIPE_DIR)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} not found")
        text = path.read_text()
    else:
        entry = resources.files("ftz_edge.training").joinpath(RECIPE_DIR, f"{name_or_path}.yaml")
        if not entry.is_file():
            raise ValueError(f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(available_recipes())}")
        text = entry.read_text()
    recipe = yaml.safe_load(text)
    if not isinstance(recipe, dict) or set(recipe) - {"description", "model", "stages"}:
        raise ValueError(f"recipe {name_or_path}: expected keys description, model, stages")
    return recipe


def recipe_model_config(recipe: dict[str, Any]) -> FtZConfig:
    return FtZConfig.from_dict(recipe.get("model", {}))


def recipe_stage_config(recipe: dict[str, Any], stage: str, data_root: str | Path = ".", output_dir: Optional[str] = None,
                        **overrides: Any) -> TrainConfig:
    settings = dict(recipe.get("stages", {}).get(stage, {}))
    unknown = set(settings) - _fields(TrainConfig)
    if unknown:
        raise ValueError(f"recipe stage {stage}: unknown settings {sorted(unknown)}")
    for key in ("data_path", "image_folder"):
        if settings.get(key):
            settings[key] = str(Path(data_root) / settings[key])
    if output_dir:
        settings["output_dir"] = str(Path(output_dir) / stage)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(stage=stage, **settings)
