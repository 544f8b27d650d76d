"""FtZ checkpoint folders: a JSON config plus safetensors weights of the trained parts.

Layout::

    ftz_config.json            FtZConfig (component ids/paths, FtZ settings)
    ftz_weights.safetensors    fusion modules (W_proj + MHCA) and projector(s)
    llm/                       the LLM + tokenizer (save_pretrained), when the LLM was trained
    anchor/, augmenter/        the encoders (save_pretrained), when the checkpoint is made
                               self-contained (the shipped default model is)

Component paths inside the config are relative to the folder when the component is stored in
it, so the folder can be moved. Writes go to a temporary sibling folder that is renamed into
place only when complete: an interrupted save never leaves a folder that looks valid. An existing
folder is replaced only when it is an FtZ checkpoint (``check_checkpoint``). Never pickle:
safetensors only (the LLM and encoders too: ``save_pretrained`` writes safetensors).

``load_checkpoint`` also reads a transformers-format FtZ folder (config.json + model.safetensors,
``ftz_edge.hf.FtZForConditionalGeneration.save_pretrained``), so everything that loads a
checkpoint (ftz-export, ftz-eval, ftz-train --init-from, ftz-info) takes either.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ftz_edge import __version__
from ftz_edge.atomic import DestinationError, atomic_folder, check_destination
from ftz_edge.config import CONFIG_NAME, FtZConfig
from ftz_edge.mllm import FtZForCausalLM

WEIGHTS_NAME = "ftz_weights.safetensors"
# The folders save_checkpoint stores components in (the config then names them by these
# relative names); one that is missing means a copied-incomplete checkpoint, not a hub id.
STORED_COMPONENTS = ("llm", "anchor", "augmenter")


class CheckpointError(ValueError):
    """A folder that is not a usable FtZ checkpoint (missing files, config/weights mismatch)."""


def check_checkpoint(folder: str | Path) -> FtZConfig:
    """The config of the FtZ checkpoint ``folder``; CheckpointError unless its ftz_config.json
    parses as an FtZConfig and its weights file is there. Only such a folder may be replaced
    by ``save_checkpoint``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder} is not an FtZ checkpoint: {CONFIG_NAME} is missing")
    if not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} is not an FtZ checkpoint: {WEIGHTS_NAME} is missing")
    try:
        return FtZConfig.load(folder)
    except (ValueError, TypeError, AttributeError, OSError) as err:  # AttributeError: JSON that is not an object
        raise CheckpointError(f"{folder / CONFIG_NAME}: {err}") from None


def is_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` is an FtZ checkpoint (see ``check_checkpoint``)."""
    try:
        check_checkpoint(folder)
    except CheckpointError:
        return False
    return True


def _check_components(config: FtZConfig, folder: Path) -> None:
    """A component stored in the checkpoint (or a trained LLM, which only the checkpoint can
    hold) must be there: otherwise loading would quietly go to the model hub for a name like
    "llm", or load the untrained base LLM."""
    named = {"llm": config.llm, "anchor": config.tower.anchor, "augmenter": config.tower.augmenter}
    for role, name in named.items():
        if name in STORED_COMPONENTS and not (folder / name).is_dir():
            raise CheckpointError(f"{folder} is incomplete: its {role} is stored in {name}/ "
                                  f"({CONFIG_NAME} says {role}={name!r}), but {folder / name} is missing")
    if config.llm_trained and not (folder / config.llm).is_dir() and not Path(config.llm).is_dir():
        raise CheckpointError(f"{folder} is incomplete: its LLM was trained (llm_trained) but {config.llm!r} "
                              f"is not a folder in the checkpoint; the trained weights belong in {folder / 'llm'}")


def save_checkpoint(model: FtZForCausalLM, folder: str | Path, include_encoders: bool = False,
                    include_llm: Optional[bool] = None, state_dict: Optional[dict[str, torch.Tensor]] = None,
                    extra_files: Optional[dict[str, str]] = None) -> Path:
    """Write ``model`` to ``folder`` atomically (replacing an existing checkpoint there).

    ``include_llm`` defaults to ``model.config.llm_trained``: a frozen LLM is referenced by id.
    ``state_dict`` (the whole model's, e.g. gathered by accelerate under DeepSpeed ZeRO-3, where
    the module's own parameters are shards) replaces the module's weights when given.
    ``extra_files`` (name -> text, e.g. the training config) are written inside the same atomic step.
    """
    if state_dict is None:
        llm_weights = None
        trainable = model.vision.trainable_state_dict()
    else:
        llm_weights = {k[len("llm."):]: v for k, v in state_dict.items() if k.startswith("llm.")}
        trainable = {k[len("vision."):]: v for k, v in state_dict.items()
                     if k.startswith("vision.") and not k.startswith(("vision.anchor.", "vision.augmenter."))}
    folder = Path(folder)
    try:
        check_destination(folder, check_checkpoint, "an FtZ checkpoint")
    except DestinationError as err:
        raise CheckpointError(str(err)) from None
    include_llm = model.config.llm_trained if include_llm is None else include_llm
    # A component named by a stored folder's relative name ("anchor", "llm": the model came from a
    # self-contained checkpoint, or a transformers-format folder that recorded those names) exists
    # only inside its source folder: store it here too, or this checkpoint would name a missing folder.
    tower = model.config.tower
    include_llm = include_llm or model.config.llm in STORED_COMPONENTS
    include_encoders = include_encoders or tower.anchor in STORED_COMPONENTS or (
        model.vision.augmenter is not None and tower.augmenter in STORED_COMPONENTS)
    with atomic_folder(folder, check_checkpoint, "an FtZ checkpoint") as tmp:
        config = copy.deepcopy(model.config)
        if include_llm:
            model.llm.save_pretrained(tmp / "llm", state_dict=llm_weights)
            model.tokenizer.save_pretrained(tmp / "llm")
            config.llm = "llm"
        if include_encoders:
            model.vision.anchor.save_pretrained(tmp / "anchor")
            _save_processor_spec(model.anchor_spec, tmp / "anchor")
            config.tower.anchor = "anchor"
            if model.vision.augmenter is not None:
                model.vision.augmenter.save_pretrained(tmp / "augmenter")
                _save_processor_spec(model.augmenter_spec, tmp / "augmenter")
                config.tower.augmenter = "augmenter"
        weights = {k: v.detach().contiguous().cpu() for k, v in trainable.items()}
        save_file(weights, tmp / WEIGHTS_NAME, metadata={"format": "pt", "ftz_edge": __version__})
        config.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if "README.md" not in (extra_files or {}):  # the model card, from the model and the records beside it
            from ftz_edge.model_card import checkpoint_card, write_card

            write_card(tmp, checkpoint_card(model, folder=tmp))
    return folder


def _save_processor_spec(spec, folder: Path) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(spec.to_processor_config(), indent=2) + "\n")


def load_checkpoint(folder: str | Path, dtype: Optional[torch.dtype] = None) -> FtZForCausalLM:
    """An FtZ checkpoint folder, or a transformers-format FtZ folder (config.json of model_type
    "ftz", as ``FtZForConditionalGeneration.save_pretrained`` writes it: ftz_edge.hf), as an
    ``FtZForCausalLM``."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() and _is_hf_folder(folder):
        from ftz_edge.hf import FtZForConditionalGeneration

        try:
            model = FtZForConditionalGeneration.from_pretrained(folder, **({"dtype": dtype} if dtype else {}))
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{folder} (a transformers-format FtZ model) cannot be loaded: {err}") from None
        if model.tokenizer is None:
            raise CheckpointError(f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
        return model.to_ftz()
    config = check_checkpoint(folder)
    _check_components(config, folder)
    model = FtZForCausalLM.from_config(config, base_dir=folder, dtype=dtype)
    try:
        weights = load_file(folder / WEIGHTS_NAME)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{folder / WEIGHTS_NAME} is unreadable: {err}") from None
    load_trainable_weights(model, weights, source=folder / WEIGHTS_NAME)
    return model


def _is_hf_folder(folder: Path) -> bool:
    path = folder / "config.json"
    try:
        return path.is_file() and json.loads(path.read_text()).get("model_type") == "ftz"
    except (OSError, ValueError, AttributeError):
        return False


def load_trainable_weights(model: FtZForCausalLM, weights: dict[str, torch.Tensor], source: object = "weights") -> None:
    """Load fusion/projector weights, refusing any mismatch with the config-built model."""
    expected = model.vision.trainable_state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model its config builds: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the config builds {tuple(expected[name].shape)}"
            )
    model.vision.load_state_dict(weights, strict=False)
