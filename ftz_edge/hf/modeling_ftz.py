"""``FtZForConditionalGeneration``: the FtZ model as a transformers ``PreTrainedModel``.

The same modules as ``ftz_edge.mllm.FtZForCausalLM`` under the same names (``vision`` - the
``FtZVision`` tower with its frozen CLIP anchor, DINOv2 augmenter, fusion modules and projector -
and ``llm``, any causal LM built by ``AutoModelForCausalLM.from_config``), so ``model.safetensors``
holds exactly ``FtZForCausalLM.state_dict()``; the image splice is the one of ``FtZForCausalLM``
(``ftz_edge.mllm.splice_inputs``). Built from ``FtZHFConfig`` alone: no component folders.

``save_pretrained`` writes one folder - config.json, model.safetensors (sharded past
``max_shard_size``), generation_config.json, the tokenizer's files when the model has one, and
(registered for the Auto classes) this file and configuration_ftz.py for ``trust_remote_code`` -
atomically (a temporary sibling folder renamed into place). ``from_pretrained`` reads such a
folder, and also an FtZ checkpoint folder (ftz_config.json + components), converted on load.

This file is copied into every saved model folder; it imports ``ftz_edge`` for the tower and
the splice, so loading with ``trust_remote_code=True`` needs ``pip install ftz-edge``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from ftz_edge import prompt
from ftz_edge.encoders import AUGMENTER_TYPES, freeze
from ftz_edge.fusion import CrossAttentionFusion
from ftz_edge.mllm import FtZForCausalLM, splice_inputs
from ftz_edge.preprocess import ImageProcessorSpec
from ftz_edge.vision import FtZVision

from .configuration_ftz import FtZHFConfig

HF_CONFIG_NAME = "config.json"
OLD_CONFIG_NAME = "ftz_config.json"  # ftz_edge.config.CONFIG_NAME: the FtZ checkpoint format
# from_pretrained keywords an FtZ checkpoint folder (converted on load) understands.
_OLD_FORMAT_KWARGS = {"dtype", "torch_dtype", "device_map", "trust_remote_code", "local_files_only"}


def is_hf_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a transformers-format FtZ model (config.json of model_type "ftz")."""
    path = Path(folder) / HF_CONFIG_NAME
    try:
        return path.is_file() and json.loads(path.read_text()).get("model_type") == FtZHFConfig.model_type
    except (OSError, ValueError, AttributeError):
        return False


def check_hf_folder(folder: Path) -> None:
    """ValueError unless ``folder`` is an FtZ model folder (the only kind save_pretrained replaces)."""
    if not is_hf_folder(folder):
        raise ValueError(f"no {HF_CONFIG_NAME} of model_type {FtZHFConfig.model_type!r}")


class FtZPreTrainedModel(PreTrainedModel):
    config_class = FtZHFConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers skips a module without parameters of its own in "custom code" (any model
        # outside transformers) once its children are done; the fusion module's init is its own.
        if isinstance(module, CrossAttentionFusion) and not getattr(module, "_is_hf_initialized", False):
            self._init_weights(module)
            module._is_hf_initialized = True
            return
        super()._initialize_weights(module, is_custom_code)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only FtZ's own modules reach here (the encoders and the LLM are PreTrainedModels: each
        # is initialised by its own _init_weights). Same init as the constructors'.
        if isinstance(module, CrossAttentionFusion):
            reference = nn.MultiheadAttention(module.q_proj.in_features, module.num_heads, batch_first=True)
            weights, biases = reference.in_proj_weight.chunk(3), reference.in_proj_bias.chunk(3)
            for proj, weight, bias in zip((module.q_proj, module.k_proj, module.v_proj), weights, biases):
                init.copy_(proj.weight, weight)
                init.copy_(proj.bias, bias)
            zero = self.config.fusion_init == "zero"
            init.copy_(module.out_proj.weight, torch.zeros_like(module.out_proj.weight) if zero else reference.out_proj.weight)
            init.copy_(module.out_proj.bias, torch.zeros_like(module.out_proj.bias) if zero else reference.out_proj.bias)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()


class FtZForConditionalGeneration(FtZPreTrainedModel, GenerationMixin):
    """FtZ vision-language model, transformers-style (cf. ``LlavaForConditionalGeneration``).

    ``forward(input_ids, pixel_values, augmenter_pixel_values, attention_mask, labels, ...)``:
    ``input_ids`` carry ``config.image_seq_length`` copies of ``config.image_token_id`` (-200) per
    image (``ftz_edge.prompt.tokenize(..., num_image_tokens=N)``); ``pixel_values`` are the CLIP
    anchor's images, ``augmenter_pixel_values`` DINOv2's (kinds ftz and mof). Returns the LLM's
    ``CausalLMOutputWithPast`` (loss when ``labels`` are given; image positions never count).
    """

    def __init__(self, config: FtZHFConfig, vision: Optional[FtZVision] = None, llm: Optional[PreTrainedModel] = None):
        super().__init__(config)
        given = vision is not None
        if given != (llm is not None):
            raise ValueError("give both vision and llm (an FtZForCausalLM's modules) or neither")
        if not given:
            llm = AutoModelForCausalLM.from_config(config.text_config)
            anchor = freeze(CLIPVisionModel(config.anchor_config))
            augmenter = None
            if config.kind in ("ftz", "mof"):
                augmenter = freeze(AUGMENTER_TYPES[config.augmenter_config.model_type](config.augmenter_config))
            vision = FtZVision(config.to_ftz_config().tower, anchor, augmenter, llm.config.hidden_size,
                               config.projector_depth, config.preset)
        self.vision = vision
        self.llm = llm
        if vision.num_image_tokens != config.image_seq_length:
            raise ValueError(f"the tower gives {vision.num_image_tokens} tokens per image, the config says "
                             f"{config.image_seq_length}")
        self.tokenizer = None  # set by from_pretrained / from_ftz when there is one; saved with the model
        if given:
            # Trained modules: post_init must not re-initialise them.
            for module in self.modules():
                module._is_hf_initialized = True
        self.post_init()
        if given:
            self.generation_config = copy.deepcopy(llm.generation_config)

    # -- conversion with FtZForCausalLM --------------------------------------------------------
    @classmethod
    def from_ftz(cls, model: FtZForCausalLM) -> "FtZForConditionalGeneration":
        """Wrap an ``FtZForCausalLM`` (e.g. from ``load_checkpoint``): the same modules, no copy."""
        augmenter = model.vision.augmenter
        config = FtZHFConfig.from_ftz_config(
            model.config, model.vision.anchor.config, None if augmenter is None else augmenter.config, model.llm.config,
            anchor_image_processor=model.anchor_spec.to_processor_config(),
            augmenter_image_processor=None if model.augmenter_spec is None else model.augmenter_spec.to_processor_config(),
        )
        dtype = model.llm.dtype
        config.dtype = dtype
        hf = cls(config, vision=model.vision, llm=model.llm)
        hf.tokenizer = model.tokenizer
        return hf.train(model.training)

    def to_ftz(self) -> FtZForCausalLM:
        """The ``FtZForCausalLM`` over the same modules (what ftz-export, ftz-eval, ftz-train use)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (save_pretrained stores it; or set model.tokenizer)")
        anchor_spec = self._spec(self.config.anchor_image_processor, "anchor")
        augmenter_spec = None
        if self.vision.augmenter is not None:
            augmenter_spec = self._spec(self.config.augmenter_image_processor, "augmenter")
        model = FtZForCausalLM(self.config.to_ftz_config(), self.vision, self.llm, self.tokenizer, anchor_spec, augmenter_spec)
        return model.train(self.training)

    def _spec(self, processor_config: Optional[dict], role: str) -> ImageProcessorSpec:
        from ftz_edge import encoders

        if processor_config is not None:
            return ImageProcessorSpec.from_processor_config(processor_config)
        module = self.vision.anchor if role == "anchor" else self.vision.augmenter
        return (encoders.anchor_spec if role == "anchor" else encoders.augmenter_spec)(None, module.config)

    # -- embeddings (resize_token_embeddings etc.) -----------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    # -- forward / generate ---------------------------------------------------------------------
    def _splice(self, rows, pixel_values, augmenter_pixel_values, labels=None, padding_side="right", max_length=None):
        return splice_inputs(self.vision, self.llm, rows, pixel_values, augmenter_pixel_values, labels, padding_side,
                             max_length)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        augmenter_pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Rows are taken as given (padding included; no cut at ``max_sequence_length``): the splice
        only replaces the image positions' embeddings, so outputs line up with ``input_ids``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            spliced = self._splice(list(input_ids), pixel_values, augmenter_pixel_values,
                                   None if labels is None else list(labels))
            inputs_embeds = spliced["inputs_embeds"]
            labels = spliced.get("labels", labels)
            if attention_mask is None:
                attention_mask = spliced["attention_mask"]
        elif pixel_values is not None:
            raise ValueError("pixel_values with inputs_embeds: the images are spliced into input_ids' embeddings")
        optional = {"position_ids": position_ids, "past_key_values": past_key_values, "use_cache": use_cache}
        kwargs.update({name: value for name, value in optional.items() if value is not None})
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                        logits_to_keep=logits_to_keep, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        augmenter_pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **generate_kwargs,
    ):
        """The prompt followed by the new tokens, as transformers' generate returns them for a
        decoder-only model given ``input_ids`` (image positions come back as the pad token id, so
        the whole row decodes). Decoding is the LLM's own ``generate`` on the spliced embeddings,
        exactly as ``FtZForCausalLM.generate`` (padding, wherever it is, is dropped by
        ``attention_mask`` and the rows re-padded on the left; each cut to ``max_sequence_length``).
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids (with the image positions expanded)")
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        rows = list(input_ids) if attention_mask is None else [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
        inputs = self._splice(rows, pixel_values, augmenter_pixel_values, padding_side="left",
                              max_length=self.config.max_sequence_length)
        self.llm.generation_config = self.generation_config
        pad = self._pad_token_id()
        if pad is not None:
            generate_kwargs.setdefault("pad_token_id", pad)
        out = self.llm.generate(**inputs, **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt_ids = input_ids.to(sequences.device)
        prompt_ids = prompt_ids.masked_fill(prompt_ids == prompt.IMAGE_TOKEN_ID, pad if pad is not None else 0)
        full = torch.cat([prompt_ids, sequences], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out

    def _pad_token_id(self) -> Optional[int]:
        """As ``FtZForCausalLM.generate``: the tokenizer's pad id, else its EOS (else the configs')."""
        if self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
            return self.tokenizer.eos_token_id if pad is None else pad
        for source in (self.generation_config, self.config.text_config):
            for name in ("pad_token_id", "eos_token_id"):
                value = getattr(source, name, None)
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    return value
        return None

    # -- folders --------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained (``max_shard_size``, ``safe_serialization``...), atomically:
        into a temporary sibling folder renamed into place. An existing non-empty folder is replaced
        only when it is an FtZ model folder. Writes the tokenizer too when the model has one."""
        if kwargs.get("push_to_hub"):
            raise ValueError("ftz-edge never uploads: save to a folder, then push it yourself")
        from ftz_edge.atomic import atomic_folder

        folder = Path(save_directory)
        if self._auto_class is not None:
            # The Auto classes this model answers to with trust_remote_code (the registered one is added by transformers).
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = f"{Path(__file__).stem}.{type(self).__name__}"
            self.config.auto_map = auto_map
        with atomic_folder(folder, check_hf_folder, "an FtZ model folder") as tmp:
            super().save_pretrained(tmp, *args, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            from ftz_edge.model_card import checkpoint_card, write_card

            write_card(tmp, checkpoint_card(self, folder=tmp))  # the Hub's README.md model card
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """A transformers-format FtZ folder (or hub id), or an FtZ checkpoint folder (ftz_config.json +
        component folders, as ``ftz_edge.checkpoint.save_checkpoint`` writes it and the shipped
        default model is), converted on load (keywords then: dtype, device_map as one device)."""
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir() and (folder / OLD_CONFIG_NAME).is_file() and not is_hf_folder(folder):
            return cls._from_ftz_checkpoint(folder, args, kwargs)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if folder.is_dir() and any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            # Loaded as remote code, this class was trusted already: so is the config the tokenizer reads.
            trusted = kwargs.get("trust_remote_code", cls.__module__.startswith("transformers_modules"))
            model.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trusted)
        return model

    @classmethod
    def _from_ftz_checkpoint(cls, folder: Path, args, kwargs) -> "FtZForConditionalGeneration":
        from ftz_edge.checkpoint import load_checkpoint

        unsupported = sorted(set(kwargs) - _OLD_FORMAT_KWARGS)
        if args or unsupported:
            raise ValueError(f"{folder} is an FtZ checkpoint (converted on load), which takes only "
                             f"{', '.join(sorted(_OLD_FORMAT_KWARGS))}; got {unsupported or list(args)}. "
                             "Convert it once with ftz_edge.hf.convert_checkpoint, then load the new folder.")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        model = cls.from_ftz(load_checkpoint(folder, dtype=None if dtype == "auto" else dtype))
        device_map = kwargs.get("device_map")
        if device_map is not None:
            if isinstance(device_map, dict):
                raise ValueError("an FtZ checkpoint loads onto one device: give device_map as a device ('cpu', 'cuda:0')")
            model.to(device_map)
        return model.eval()


__all__ = ["FtZForConditionalGeneration", "FtZPreTrainedModel", "is_hf_folder", "check_hf_folder"]
