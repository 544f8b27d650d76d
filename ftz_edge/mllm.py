"""LLaVA-style multimodal LM: image embeddings spliced into any Hugging Face causal LM.

Token ids carry ``num_image_tokens`` copies of ``IMAGE_TOKEN_ID`` (-200) where an image goes
(``ftz_edge.prompt.tokenize``): one position per image embedding. The splice scatters the
vision model's embeddings into those positions, images in order (the rule the runtime's numpy
splice follows). Labels at image positions are -100 (never predicted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ftz_edge import encoders, prompt
from ftz_edge.config import FtZConfig
from ftz_edge.preprocess import ANCHOR_INPUT, AUGMENTER_INPUT, ImageProcessorSpec, encoder_pixels
from ftz_edge.vision import FtZVision

IGNORE_INDEX = -100


class FtZForCausalLM(nn.Module):
    def __init__(self, config: FtZConfig, vision: FtZVision, llm: PreTrainedModel, tokenizer,
                 anchor_spec: ImageProcessorSpec, augmenter_spec: Optional[ImageProcessorSpec]):
        super().__init__()
        self.config = config
        self.vision = vision
        self.llm = llm
        self.tokenizer = tokenizer
        self.anchor_spec = anchor_spec
        self.augmenter_spec = augmenter_spec

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: FtZConfig, base_dir: Optional[Path] = None, dtype: Optional[torch.dtype] = None) -> "FtZForCausalLM":
        """Load every component with ``from_pretrained`` (hub ids or folders) and build fresh fusion
        modules and projector(s). ``base_dir`` resolves relative component folders (checkpoints)."""
        tower = config.tower
        anchor_path = encoders.resolve_component(tower.anchor, base_dir)
        anchor = encoders.load_anchor(tower.anchor, base_dir, dtype)
        augmenter, aug_spec = None, None
        if tower.uses_augmenter:
            aug_path = encoders.resolve_component(tower.augmenter, base_dir)
            augmenter = encoders.load_augmenter(tower.augmenter, base_dir, dtype)
            aug_spec = encoders.augmenter_spec(aug_path, augmenter.config)
        llm_path = encoders.resolve_component(config.llm, base_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(llm_path)
            llm = AutoModelForCausalLM.from_pretrained(llm_path, **({"dtype": dtype} if dtype else {}))
        except (OSError, ValueError) as err:
            raise encoders.ComponentLoadError(f"cannot load the LLM or its tokenizer from {llm_path!r}: {err}") from None
        vision = FtZVision(tower, anchor, augmenter, llm.config.hidden_size, config.projector_depth, config.preset)
        if dtype is not None:
            vision.to(dtype)
        return cls(config, vision, llm, tokenizer, encoders.anchor_spec(anchor_path, anchor.config), aug_spec)

    # -- freezing per training stage -------------------------------------------------------
    def set_trainable(self, train_llm: bool) -> None:
        """Encoders always frozen; fusion + W_proj + projector(s) train; the LLM only if asked."""
        self.requires_grad_(False)
        for name, param in self.vision.named_parameters():
            if not name.startswith(("anchor.", "augmenter.")):
                param.requires_grad_(True)
        self.llm.requires_grad_(train_llm)

    # -- prompts ----------------------------------------------------------------------------
    @property
    def chat_template(self) -> Optional[str]:
        """The template of the model's prompt format (``FtZConfig.prompt_format``)."""
        return prompt.format_template(self.config.prompt_format, getattr(self.tokenizer, "chat_template", None),
                                      self.config.chat_template)

    @property
    def special_tokens(self) -> dict[str, str]:
        return {k: getattr(self.tokenizer, k) or "" for k in ("bos_token", "eos_token")}

    def encode_conversation(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        text = prompt.render_chat(messages, self.chat_template, self.special_tokens, add_generation_prompt)
        return prompt.tokenize(text, self.tokenizer.backend_tokenizer, num_image_tokens=self.vision.num_image_tokens)

    def preprocess_images(self, images: Sequence) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """PIL images or paths -> (anchor_pixels, augmenter_pixels) with the shared preprocessing."""
        pixels = encoder_pixels(images, self.anchor_spec, self.augmenter_spec)
        augmenter = pixels.get(AUGMENTER_INPUT)
        return torch.from_numpy(pixels[ANCHOR_INPUT]), None if augmenter is None else torch.from_numpy(augmenter)

    # -- the splice -------------------------------------------------------------------------
    def build_inputs(
        self,
        input_ids: Sequence[Sequence[int]],
        anchor_pixels: Optional[torch.Tensor] = None,
        augmenter_pixels: Optional[torch.Tensor] = None,
        labels: Optional[Sequence[Sequence[int]]] = None,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """Ragged token id lists (``num_image_tokens`` IMAGE_TOKEN_IDs per image, as
        ``encode_conversation`` gives them) -> padded ``inputs_embeds``, mask, labels."""
        return splice_inputs(self.vision, self.llm, input_ids, anchor_pixels, augmenter_pixels, labels,
                             padding_side, self.config.max_length)

    def forward(self, input_ids, anchor_pixels=None, augmenter_pixels=None, labels=None):
        inputs = self.build_inputs(input_ids, anchor_pixels, augmenter_pixels, labels)
        return self.llm(**inputs)

    @torch.no_grad()
    def generate(self, input_ids, anchor_pixels=None, augmenter_pixels=None, **generate_kwargs) -> torch.Tensor:
        """New tokens only (HF ``generate`` with ``inputs_embeds`` returns just the continuation)."""
        inputs = self.build_inputs(input_ids, anchor_pixels, augmenter_pixels, padding_side="left")
        pad = self.tokenizer.pad_token_id
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.eos_token_id if pad is None else pad)
        return self.llm.generate(**inputs, **generate_kwargs)

    def answer(self, image, question: str, max_new_tokens: int = 32, **generate_kwargs) -> str:
        """One image, one question, greedy by default: the reference the runtime is checked against."""
        anchor, augmenter = self.preprocess_images([image])
        ids = self.encode_conversation([prompt.user_turn_with_image(question)])
        generate_kwargs.setdefault("do_sample", False)
        out = self.generate([ids], anchor, augmenter, max_new_tokens=max_new_tokens, **generate_kwargs)
        return self.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def splice_inputs(
    vision: FtZVision,
    llm: PreTrainedModel,
    input_ids: Sequence[Sequence[int]],
    anchor_pixels: Optional[torch.Tensor] = None,
    augmenter_pixels: Optional[torch.Tensor] = None,
    labels: Optional[Sequence[Sequence[int]]] = None,
    padding_side: str = "right",
    max_length: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """The splice (the one implementation: ``FtZForCausalLM.build_inputs`` and the transformers-style
    ``ftz_edge.hf.FtZForConditionalGeneration`` both call it). Rows of token ids (lists or 1-D
    tensors, ``vision.num_image_tokens`` IMAGE_TOKEN_IDs per image) -> padded ``inputs_embeds``,
    ``attention_mask`` (and ``labels``, -100 at image positions); each row cut to ``max_length``."""
    embed = llm.get_input_embeddings()
    device = embed.weight.device
    tokens_per_image = vision.num_image_tokens
    rows = [ids.to(device=device, dtype=torch.long) if isinstance(ids, torch.Tensor)
            else torch.as_tensor(list(ids), dtype=torch.long, device=device) for ids in input_ids]
    positions = sum(int((ids == prompt.IMAGE_TOKEN_ID).sum()) for ids in rows)
    given = 0 if anchor_pixels is None else anchor_pixels.shape[0]
    prompt.check_image_positions(positions, given, tokens_per_image)
    image_rows = None
    if given:
        image_embeds = vision(anchor_pixels.to(device), None if augmenter_pixels is None else augmenter_pixels.to(device))
        if image_embeds.shape[1] != tokens_per_image:
            raise ValueError(f"the vision model gave {image_embeds.shape[1]} tokens per image, "
                             f"not its num_image_tokens {tokens_per_image}")
        image_rows = image_embeds.to(embed.weight.dtype).reshape(-1, image_embeds.shape[-1])

    sequences, sequence_labels, next_row = [], [], 0
    for row, ids in enumerate(rows):
        is_image = ids == prompt.IMAGE_TOKEN_ID
        # Embed text tokens (sentinels swapped for a valid id first), then scatter the images'
        # rows into the sentinel positions, in order.
        embeds = embed(torch.where(is_image, torch.zeros_like(ids), ids))
        count = int(is_image.sum())
        if count % tokens_per_image:  # the batch total could still match with two rows off by one
            raise ValueError(f"row {row} holds {count} image positions, not a whole number of images of "
                             f"{tokens_per_image} tokens each: tokenize with num_image_tokens={tokens_per_image}")
        if count:
            embeds = embeds.masked_scatter(is_image[:, None], image_rows[next_row:next_row + count])
            next_row += count
        sequences.append(embeds[:max_length])
        if labels is not None:
            given_labels = labels[row]
            row_labels = (given_labels.to(device=device, dtype=torch.long) if isinstance(given_labels, torch.Tensor)
                          else torch.as_tensor(list(given_labels), dtype=torch.long, device=device))
            if row_labels.shape != ids.shape:
                raise ValueError(f"row {row}: {len(row_labels)} labels for {len(ids)} token ids")
            row_labels = row_labels.masked_fill(is_image, IGNORE_INDEX)
            sequence_labels.append(row_labels[:max_length])
    return _pad(sequences, sequence_labels if labels is not None else None, padding_side)


def _pad(sequences: list[torch.Tensor], labels: Optional[list[torch.Tensor]], side: str) -> dict[str, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    width = sequences[0].shape[-1]
    batch = len(sequences)
    ref = sequences[0]
    embeds = ref.new_zeros((batch, longest, width))
    mask = torch.zeros((batch, longest), dtype=torch.long, device=ref.device)
    padded_labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long, device=ref.device) if labels else None
    for i, seq in enumerate(sequences):
        span = slice(longest - len(seq), longest) if side == "left" else slice(0, len(seq))
        embeds[i, span] = seq
        mask[i, span] = 1
        if padded_labels is not None:
            padded_labels[i, span] = labels[i]
    out = {"inputs_embeds": embeds, "attention_mask": mask}
    if padded_labels is not None:
        out["labels"] = padded_labels
    return out
