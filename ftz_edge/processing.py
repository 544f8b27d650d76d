"""``FtZProcessor``: the model's inputs from images and text, as one transformers ``ProcessorMixin``.

It holds what turns a conversation and its images into what FtZ reads:

* ``image_processor``: the anchor's (CLIP) image processor, ``CLIPImageProcessor`` form;
* ``augmenter_image_processor``: the augmenter's (DINOv2) image processor, ``BitImageProcessor``
  form; ``None`` for a CLIP-only tower (``kind="clip"``);
* ``tokenizer``: the LLM's tokenizer;
* ``chat_template``: the template of the model's prompt format (``FtZConfig.prompt_format``:
  the tokenizer's own for "chat", LLaVA's fallback when it has none, or the authors' "plain" /
  "llama" conversation), the template ``FtZForCausalLM.chat_template`` renders with.

``save_pretrained`` writes transformers' layout (``processor_config.json`` with both image
processors inside it, the anchor's also loadable by ``AutoImageProcessor``, the tokenizer files,
``chat_template.jinja``); ``from_pretrained`` reads it back. transformers 5.x's ``ProcessorMixin``
takes its sub-processors from ``__init__``'s parameters: every parameter whose name contains
``image_processor`` is one, the one named exactly ``image_processor`` is the "primary" (loaded
through ``AutoImageProcessor``), any other is stored as a dict in ``processor_config.json``
and built from its ``image_processor_type`` on load. So two image processors are held as
sub-processors proper; only a missing augmenter (CLIP-only towers) needs code here, because
``ProcessorMixin`` wants every sub-processor present.

One rule with the model and the runtime:

* **pixels** are computed by ``ftz_edge.preprocess.encoder_pixels`` with the
  ``ImageProcessorSpec`` each image processor's config reads as, never by the transformers image
  processor's own ``__call__``: transformers' default backend (torchvision, when installed)
  resizes slightly differently from the PIL reference (a uint8 step on some pixels), and the
  model was trained, and the bundle runs, with ``ftz_edge.preprocess``. ``pixel_values`` is the
  anchor's, ``augmenter_pixel_values`` the augmenter's (float32, NCHW).
* **text** is rendered by ``ftz_edge.prompt.render_chat`` (transformers' sandboxed Jinja
  environment) and tokenized by ``ftz_edge.prompt.tokenize``: each ``<image>`` becomes
  ``num_image_tokens`` copies of ``IMAGE_TOKEN_ID`` (-200).

**The image positions are -200 in ``input_ids``.** LLaVA's transformers processors expand
``<image>`` to a real token id added to the vocabulary; FtZ never extends the LLM's vocabulary
(the model, its checkpoints and the exported bundle all mark image positions with the sentinel
-200), so the processor gives exactly what ``FtZForCausalLM.encode_conversation`` gives and
``FtZForCausalLM.build_inputs`` splices: the same ids, hence the same embeddings. The cost: such
``input_ids`` cannot go through the LLM's embedding table as they are (the model masks the
sentinels before the lookup), and ``tokenizer.decode`` cannot decode them:
``FtZProcessor.decode`` / ``batch_decode`` drop them (or show ``<image>`` once per image,
``show_images=True``). ``image_mask(input_ids)`` gives the positions.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from transformers import BatchFeature, ProcessorMixin

from ftz_edge import prompt
from ftz_edge.preprocess import ANCHOR_INPUT, AUGMENTER_INPUT, ImageProcessorSpec, encoder_pixels

__all__ = ["FtZProcessor", "image_processor_from_spec", "spec_of"]

AUGMENTER = "augmenter_image_processor"
# The kind each encoder's processor is saved as (transformers' classes for CLIP and DINOv2).
ANCHOR_PROCESSOR_TYPE = "CLIPImageProcessor"
AUGMENTER_PROCESSOR_TYPE = "BitImageProcessor"


def image_processor_from_spec(spec: ImageProcessorSpec, kind: str = ANCHOR_PROCESSOR_TYPE):
    """A transformers image processor (``kind``: CLIPImageProcessor or BitImageProcessor) whose
    config reads back as ``spec`` (``ImageProcessorSpec.to_processor_config``). The PIL-backend
    class is built (what transformers falls back to without torchvision; it also computes what
    ``ftz_edge.preprocess`` computes); it saves as ``kind``, so a reader with torchvision gets
    that backend."""
    import transformers

    config = dict(spec.to_processor_config())
    config["image_processor_type"] = kind
    cls = getattr(transformers, f"{kind}Pil", None) or getattr(transformers, kind)
    processor = cls(**{k: v for k, v in config.items() if k != "image_processor_type"})
    if spec_of(processor) != spec:  # a transformers version that reads a field differently
        raise ValueError(f"{kind} built from {spec} reads back as {spec_of(processor)}")
    return processor


def spec_of(image_processor) -> ImageProcessorSpec:
    """The ``ImageProcessorSpec`` a transformers image processor's config describes."""
    config = image_processor.to_dict()
    for key in ("image_mean", "image_std"):
        if isinstance(config.get(key), tuple):
            config[key] = list(config[key])
    return ImageProcessorSpec.from_processor_config(config)


class _Attributes:
    """``get_attributes`` that leaves out the augmenter's processor on an instance without one
    (a CLIP-only tower): ``ProcessorMixin`` calls it on the instance to check ``__init__``'s
    arguments and to save, and on the class to load."""

    def __get__(self, instance, owner):
        def get_attributes() -> list[str]:
            names = ProcessorMixin.__dict__["get_attributes"].__func__(owner)
            if instance is not None and instance.__dict__.get(AUGMENTER, "unset") is None:
                names = [name for name in names if name != AUGMENTER]
            return names

        return get_attributes


class FtZProcessor(ProcessorMixin):
    """Images + text -> ``input_ids`` (``<image>`` as ``num_image_tokens`` x -200),
    ``attention_mask``, ``pixel_values`` (anchor) and ``augmenter_pixel_values``."""

    get_attributes = _Attributes()
    image_token = prompt.IMAGE_PLACEHOLDER
    image_token_id = prompt.IMAGE_TOKEN_ID

    def __init__(self, image_processor=None, augmenter_image_processor=None, tokenizer=None, chat_template=None,
                 num_image_tokens: int = 1, prompt_format: str = "chat", **kwargs):
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive integer, got {num_image_tokens!r}")
        if prompt_format not in prompt.PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {prompt.PROMPT_FORMATS}, got {prompt_format!r}")
        self.num_image_tokens = num_image_tokens
        self.prompt_format = prompt_format
        if augmenter_image_processor is None:
            self.__dict__[AUGMENTER] = None  # a CLIP-only tower: not a sub-processor (see _Attributes)
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        else:
            super().__init__(image_processor, augmenter_image_processor, tokenizer, chat_template=chat_template,
                             **kwargs)
        # The specs are read now: a config ftz_edge.preprocess cannot reproduce fails here, not on the first image.
        self.anchor_spec = spec_of(image_processor)
        self.augmenter_spec = None if augmenter_image_processor is None else spec_of(augmenter_image_processor)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model) -> "FtZProcessor":
        """The processor of an ``FtZForCausalLM``: its encoders' preprocessing, its tokenizer, the
        template of its prompt format and its image-token count. A transformers-format FtZ model
        (``ftz_edge.hf``) is read through its ``to_ftz()``."""
        if not hasattr(model, "anchor_spec") and hasattr(model, "to_ftz"):
            model = model.to_ftz()
        augmenter = None
        if model.augmenter_spec is not None:
            augmenter = image_processor_from_spec(model.augmenter_spec, AUGMENTER_PROCESSOR_TYPE)
        template = model.chat_template or prompt.FALLBACK_CHAT_TEMPLATE  # what render_chat uses for None
        return cls(image_processor_from_spec(model.anchor_spec, ANCHOR_PROCESSOR_TYPE), augmenter, model.tokenizer,
                   chat_template=template, num_image_tokens=model.vision.num_image_tokens,
                   prompt_format=model.config.prompt_format)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        processor_dict = dict(processor_dict or {})
        clip_only = AUGMENTER in processor_dict and processor_dict[AUGMENTER] is None
        if clip_only:  # built like the anchor's, then dropped: ProcessorMixin wants every sub-processor's config
            processor_dict[AUGMENTER] = processor_dict.get("image_processor") or {
                "image_processor_type": ANCHOR_PROCESSOR_TYPE}
        args = super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)
        if clip_only:
            args[ProcessorMixin.__dict__["get_attributes"].__func__(cls).index(AUGMENTER)] = None
        return args

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in ("anchor_spec", "augmenter_spec"):  # derived from the image processors, not saved twice
            out.pop(name, None)
        return out

    # -- text ------------------------------------------------------------------------------------
    @property
    def special_tokens(self) -> dict[str, str]:
        return {k: getattr(self.tokenizer, k, None) or "" for k in ("bos_token", "eos_token")}

    @property
    def model_input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "pixel_values"]
        return names + (["augmenter_pixel_values"] if self.augmenter_spec is not None else [])

    def apply_chat_template(self, conversation, chat_template: Optional[str] = None, add_generation_prompt: bool = False,
                            tokenize: bool = False, return_dict: bool = False, return_tensors=None, **kwargs):
        """The conversation(s) rendered as the model sees them (``ftz_edge.prompt.render_chat``: the
        same sandboxed Jinja environment as transformers', BOS/EOS from the tokenizer).

        Messages are ``{"role", "content"}`` with ``content`` a string holding ``<image>``, or
        transformers' list of parts (``{"type": "image", ...}`` / ``{"type": "text", "text": ...}``),
        which becomes ``<image>`` per image part and the texts, one per line (LLaVA's layout: image,
        newline, question). ``tokenize=True`` returns the ids (``return_dict=True``: the whole
        ``__call__`` output, with the images given in the parts as ``image``/``url``/``path``)."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        template = chat_template or self.chat_template
        texts, images = [], []
        for messages in conversations:
            flat, found = _flatten(messages)
            images += found
            texts.append(prompt.render_chat(flat, template, self.special_tokens, add_generation_prompt))
        if not tokenize:
            return texts if batched else texts[0]
        out = self(images=images or None, text=texts, return_tensors=return_tensors, **kwargs)
        if return_dict:
            return out
        return out["input_ids"] if batched or return_tensors else out["input_ids"][0]

    def __call__(self, images=None, text: Union[str, Sequence[str], None] = None, return_tensors=None,
                 padding: Union[bool, str] = False, padding_side: Optional[str] = None, **kwargs) -> BatchFeature:
        """``text`` (rendered prompts, each ``<image>`` a placeholder; see ``apply_chat_template``)
        and ``images`` (one per placeholder, in order, over all texts; anything
        ``ftz_edge.preprocess.load_image`` reads) -> ``input_ids`` and ``attention_mask`` (lists,
        or padded arrays/tensors with ``return_tensors`` "np"/"pt" or ``padding=True``; padding side
        the tokenizer's unless ``padding_side``), ``pixel_values`` and ``augmenter_pixel_values``
        (float32 NCHW; torch tensors with ``return_tensors="pt"``). Special tokens are not added:
        the chat template writes them. With both, the images must match the placeholders (ValueError)."""
        if kwargs:
            raise TypeError(f"FtZProcessor got unexpected arguments: {', '.join(sorted(kwargs))}")
        if text is None and images is None:
            raise ValueError("give text, images or both")
        out: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            ids = [prompt.tokenize(t, self.tokenizer.backend_tokenizer, num_image_tokens=self.num_image_tokens)
                   for t in texts]
            if images is not None:  # text alone (ids to be paired with pixels later) is not checked
                positions = sum(row.count(prompt.IMAGE_TOKEN_ID) for row in ids)
                prompt.check_image_positions(positions, len(_as_list(images)), self.num_image_tokens)
            pad = bool(padding) or return_tensors is not None
            out.update(self._pad(ids, padding_side) if pad else
                       {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})
        if images is not None:
            pixels = encoder_pixels(_as_list(images), self.anchor_spec, self.augmenter_spec)
            out["pixel_values"] = pixels[ANCHOR_INPUT]
            if AUGMENTER_INPUT in pixels:
                out["augmenter_pixel_values"] = pixels[AUGMENTER_INPUT]
        return BatchFeature(out, tensor_type=return_tensors)

    def _pad(self, ids: list[list[int]], padding_side: Optional[str]) -> dict[str, np.ndarray]:
        side = padding_side or getattr(self.tokenizer, "padding_side", "right") or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be left or right, got {side!r}")
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        longest = max(len(row) for row in ids)
        input_ids = np.full((len(ids), longest), 0 if pad is None else pad, dtype=np.int64)
        mask = np.zeros((len(ids), longest), dtype=np.int64)
        for i, row in enumerate(ids):
            span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
            input_ids[i, span] = row
            mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    # -- ids -----------------------------------------------------------------------------------
    def image_mask(self, input_ids) -> np.ndarray:
        """True at image positions (``IMAGE_TOKEN_ID``)."""
        return np.asarray(_to_numpy(input_ids)) == prompt.IMAGE_TOKEN_ID

    def decode(self, token_ids, skip_special_tokens: bool = False, show_images: bool = False, **kwargs) -> str:
        """Text of ``token_ids``; image positions are dropped, or shown as one ``<image>`` per image."""
        ids = [int(t) for t in np.asarray(_to_numpy(token_ids)).reshape(-1)]
        pieces, text, run = [], [], 0
        for token in ids + [None]:
            if token == prompt.IMAGE_TOKEN_ID:
                run += 1
                continue
            if run:
                if text:
                    pieces.append(self.tokenizer.decode(text, skip_special_tokens=skip_special_tokens, **kwargs))
                    text = []
                if show_images:
                    pieces.append(prompt.IMAGE_PLACEHOLDER * -(-run // self.num_image_tokens))
                run = 0
            if token is not None:
                text.append(token)
        if text:
            pieces.append(self.tokenizer.decode(text, skip_special_tokens=skip_special_tokens, **kwargs))
        return "".join(pieces)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(row, **kwargs) for row in _to_numpy(sequences)]


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return value


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def _flatten(messages: Iterable[dict]) -> tuple[list[dict], list]:
    """transformers-style messages (content as a list of typed parts) -> ftz_edge.prompt's
    (content a string with ``<image>``), and the images found in the parts, in order."""
    flat, images = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    parts.append(prompt.IMAGE_PLACEHOLDER)
                    source = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
                    if source is not None:
                        images.append(os.fspath(source) if isinstance(source, os.PathLike) else source)
                elif kind == "text":
                    parts.append(part.get("text", ""))
                else:
                    raise prompt.PromptError(f"message content parts must be of type image or text, got {part!r}")
            content = "\n".join(parts)
        flat.append({**message, "content": content})
    return flat, images
