"""Tiny, real-architecture components built from configs with random weights.

No model hub is reachable here, so tests, the README's first command and the shipped default
model start from folders written by ``save_pretrained`` of small CLIP / DINOv2 / Qwen2 / Llama
models, with a tokenizer trained by the ``tokenizers`` library. They load through exactly the
same ``from_pretrained`` code as the real checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Qwen2.5's ChatML template, shortened (no tool calls, no default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

DEFAULT_CORPUS = (
    "What is in the image? Describe the picture. How many shapes are there? "
    "What color is the circle? Is the square left or right of the triangle? "
    "red green blue yellow white black zero one two three four yes no left right above below "
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z"
)


def build_tokenizer(corpus: Iterable[str], special_tokens: list[str], vocab_size: int = 512,
                    chat_template: Optional[str] = CHATML_TEMPLATE, bos: Optional[str] = None,
                    eos: str = "<|im_end|>", pad: Optional[str] = None, unk: Optional[str] = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (the GPT-2 / Qwen scheme) trained on ``corpus``: round-trips any text."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad or eos, unk_token=unk,
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def clip_vision_config(image_size: int = 64, patch_size: int = 8, width: int = 64, layers: int = 4, heads: int = 4) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=patch_size, projection_dim=width, hidden_act="quick_gelu",
    )


def dinov2_config(image_size: int = 56, patch_size: int = 8, width: int = 48, layers: int = 4, heads: int = 4) -> Dinov2Config:
    return Dinov2Config(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
        image_size=image_size, patch_size=patch_size,
    )


def save_clip(folder: Path, vision: CLIPVisionConfig, full_clip_model: bool = False, seed: int = 0) -> Path:
    """A random CLIP vision tower, or a full CLIPModel (text tower too), as hub checkpoints are."""
    torch.manual_seed(seed)
    if full_clip_model:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict())).save_pretrained(folder)
    else:
        CLIPVisionModel(vision).save_pretrained(folder)
    return folder


def save_dinov2(folder: Path, config: Dinov2Config, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def save_llm(folder: Path, arch: str = "qwen2", width: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
             corpus: Iterable[str] = (DEFAULT_CORPUS,), vocab_size: int = 512, chat_template: Optional[str] = "default",
             seed: int = 2) -> Path:
    """A random Qwen2 or Llama causal LM with its tokenizer. ``chat_template=None`` saves none
    (exercises the fallback template), "default" the family's usual one."""
    if arch == "qwen2":
        tokenizer = build_tokenizer(corpus, CHATML_SPECIAL_TOKENS, vocab_size,
                                    CHATML_TEMPLATE if chat_template == "default" else chat_template,
                                    eos="<|im_end|>", pad="<|endoftext|>")
        config_cls, model_cls = Qwen2Config, Qwen2ForCausalLM
        extra = dict(tie_word_embeddings=True)
    elif arch == "llama":
        template = None if chat_template == "default" else chat_template  # base Llama: no template
        tokenizer = build_tokenizer(corpus, LLAMA_SPECIAL_TOKENS, vocab_size, template, bos="<s>", eos="</s>",
                                    pad="</s>", unk="<unk>")
        config_cls, model_cls = LlamaConfig, LlamaForCausalLM
        extra = dict(tie_word_embeddings=False)
    else:
        raise ValueError(f"unknown tiny LLM architecture {arch!r} (qwen2 or llama)")
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_components(folder: str | Path, llm_arch: str = "qwen2", full_clip_model: bool = True,
                          anchor: Optional[CLIPVisionConfig] = None, augmenter: Optional[Dinov2Config] = None,
                          **llm_kwargs) -> dict[str, str]:
    """anchor/, augmenter/ and llm/ under ``folder``; returns their paths for an FtZConfig."""
    folder = Path(folder)
    paths = {
        "anchor": save_clip(folder / "anchor", anchor or clip_vision_config(), full_clip_model),
        "augmenter": save_dinov2(folder / "augmenter", augmenter or dinov2_config()),
        "llm": save_llm(folder / "llm", llm_arch, **llm_kwargs),
    }
    return {k: str(v) for k, v in paths.items()}
