"""The prompt format, defined once and torch-free (training, export and the runtime share it).

* Conversations are lists of ``{"role": "system"|"user"|"assistant", "content": str}``; the text
  ``<image>`` in a user turn marks where the image's embeddings go.
* They are rendered with the LLM tokenizer's own Jinja chat template, exactly as transformers'
  ``apply_chat_template`` renders it (same sandboxed Jinja environment and globals). A tokenizer
  without a template gets ``FALLBACK_CHAT_TEMPLATE``: LLaVA-v1's plain "USER: ... ASSISTANT:" form.
* Tokenisation goes through the ``tokenizers`` library (the ``tokenizer.json`` every fast HF
  tokenizer is built on). Text is split at ``<image>`` and each placeholder becomes
  ``num_image_tokens`` copies of the sentinel id ``IMAGE_TOKEN_ID`` (-200, LLaVA's convention):
  one position per image embedding, so the LLM's vocabulary is never extended and the prompt's
  length is ``len(ids)``.
* The splice is one rule on both sides (``FtZForCausalLM.build_inputs`` in torch,
  ``splice_image_embeddings`` here in numpy, nanoVLM-style): text ids are looked up with the
  sentinels masked to a valid id, then ``embeds[ids == IMAGE_TOKEN_ID] = image_features.reshape(-1, D)``,
  images in order. ``check_image_positions`` is the shared count check.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable, Optional, Sequence

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_ID = -200

# Used only when the tokenizer ships no chat template (e.g. a base Llama). Assistant turns end
# with the EOS token so that a model trained on it learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The prompt formats a training stage (and so the model it saves) can use:
# * "chat": the LLM tokenizer's own chat template (FALLBACK_CHAT_TEMPLATE when it has none);
# * "plain": LLaVA's / TinyLLaVA Factory's pretraining conversation ("plain" / "pretrain"): the
#   image placeholder(s) of the user turn, then the caption and a newline; the instruction is
#   dropped and nothing else is written (BOS where the tokenizer has one, as its tokenizer call adds);
# * "llama": TinyLLaVA Factory's "llama" conversation, the one the FtZ authors' SFT uses: a fixed
#   system line, then "USER: <image>\n{question} ASSISTANT: {answer}</s>" per round, the generation
#   prompt ending in "ASSISTANT:". (Read from TinyLLaVA Factory's tinyllava/data/template/
#   {pretrain,llama}_template.py; written here as Jinja templates so every stage, the export and the
#   torch-free runtime render them through the same code as a tokenizer's own template.)
PROMPT_FORMATS = ("chat", "plain", "llama")
LLAMA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions.")
PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<image>' * message['content'].count('<image>') }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}" + LLAMA_SYSTEM + "{% endif %} "
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def format_template(prompt_format: str, tokenizer_template: Optional[str] = None,
                    fallback_template: Optional[str] = None) -> Optional[str]:
    """The chat template a prompt format renders with: "chat" is the tokenizer's own template
    (else ``fallback_template``, else None: ``render_chat`` then uses FALLBACK_CHAT_TEMPLATE)."""
    if prompt_format not in PROMPT_FORMATS:
        raise PromptError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "plain":
        return PLAIN_TEMPLATE
    if prompt_format == "llama":
        return LLAMA_TEMPLATE
    return tokenizer_template or fallback_template


class PromptError(ValueError):
    """A conversation that cannot be rendered (bad roles, empty turns, template errors)."""


class UnencodableTextError(PromptError):
    """Text that is not valid Unicode, so cannot be encoded as UTF-8 (nor tokenized): it holds a
    lone surrogate (U+D800..U+DFFF). Python strings can: a JSON ``"\\ud800"`` escape decodes to
    one, and so do undecodable bytes on a command line (``surrogateescape``). ``index`` is the
    message it was found in (None when the text is not a message's)."""

    def __init__(self, message: str, index: Optional[int] = None):
        super().__init__(message)
        self.index = index

    def __reduce__(self):  # keeps ``index`` across pickling (data-loader workers)
        return type(self), (str(self), self.index)


# Lone surrogates are the only code points a Python str may hold that UTF-8 cannot encode.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_encodable(text: str, where: str = "the text", index: Optional[int] = None) -> None:
    """Raise ``UnencodableTextError`` naming ``where`` if ``text`` cannot be encoded as UTF-8.
    A scan, no copy: ASCII text (the usual case, also a large base64 image) is answered at once."""
    if text.isascii():
        return
    match = _SURROGATE.search(text)
    if match is not None:
        raise UnencodableTextError(f"{where} is not valid UTF-8 text: character {match.start()} is a lone surrogate "
                                   f"(U+{ord(match.group()):04X}); send valid UTF-8", index)


@lru_cache(maxsize=16)
def _compile(template: str):
    # Mirrors transformers' chat-template environment: sandboxed, trim/lstrip blocks, loop
    # controls, a tojson filter and the raise_exception / strftime_now globals.
    import json
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise PromptError(f"chat template refused the conversation: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def validate_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise PromptError("empty conversation")
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise PromptError(f"message {i}: role must be system, user or assistant, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise PromptError(f"message {i} ({role}): content must be a non-empty string")
        check_encodable(content, f"message {i} ({role})", i)


def render_chat(
    messages: Sequence[dict],
    chat_template: Optional[str],
    special_tokens: Optional[dict[str, str]] = None,
    add_generation_prompt: bool = True,
) -> str:
    """The conversation as the LLM sees it, ``<image>`` placeholders still in the text."""
    validate_messages(messages)
    tokens = {"bos_token": "", "eos_token": "", **(special_tokens or {})}
    return _compile(chat_template or FALLBACK_CHAT_TEMPLATE).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **tokens
    )


def tokenize(text: str, tokenizer, add_special_tokens: bool = False, num_image_tokens: int = 1) -> list[int]:
    """Token ids of ``text`` with each ``<image>`` replaced by ``num_image_tokens`` copies of
    ``IMAGE_TOKEN_ID`` (the model's image-token count: one position per image embedding).

    ``tokenizer`` is a ``tokenizers.Tokenizer``. Special tokens are not added by default because
    chat templates write BOS etc. themselves (as ``apply_chat_template`` assumes). Text that is
    not valid Unicode raises ``UnencodableTextError`` (tokenizers would raise a bare TypeError).
    """
    if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be a positive integer, got {num_image_tokens!r}")
    check_encodable(text)
    ids: list[int] = []
    for index, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index:
            ids.extend([IMAGE_TOKEN_ID] * num_image_tokens)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=add_special_tokens).ids)
    return ids


def check_image_positions(positions: int, images: int, num_image_tokens: int) -> None:
    """The splice's count check, shared by torch and numpy: ``positions`` sentinel ids must be
    exactly ``images`` x ``num_image_tokens`` image-feature rows. ValueError says which side is off."""
    if positions == images * num_image_tokens:
        return
    if positions % num_image_tokens:
        raise ValueError(f"the token ids hold {positions} image positions, not a whole number of images of "
                         f"{num_image_tokens} tokens each: tokenize with num_image_tokens={num_image_tokens}")
    raise ValueError(f"the prompts hold {positions // num_image_tokens} <image> placeholders but {images} images "
                     f"were given ({positions} image positions, {images * num_image_tokens} image-feature rows "
                     f"of {num_image_tokens} tokens per image)")


def splice_image_embeddings(ids, image_features, embed, num_image_tokens: int):
    """Token ids (``IMAGE_TOKEN_ID`` at every image position) -> (T, D) embeddings, in numpy.

    ``embed`` maps an int64 array of valid token ids to its (n, D) rows; ``image_features`` is an
    (images, num_image_tokens, D) array, a list of (num_image_tokens, D) blocks, or None. Text ids
    are looked up with the sentinels masked to 0, then the image rows fill the sentinel positions
    in order: the rule ``FtZForCausalLM.build_inputs`` applies in torch. A count that does not
    match raises ValueError (``check_image_positions``)."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    is_image = ids == IMAGE_TOKEN_ID
    blocks = [] if image_features is None else [np.asarray(block) for block in image_features]
    for block in blocks:
        if block.ndim != 2 or block.shape[0] != num_image_tokens:
            raise ValueError(f"an image's features are {block.shape}, not ({num_image_tokens}, width): "
                             f"the model has {num_image_tokens} tokens per image")
    check_image_positions(int(is_image.sum()), len(blocks), num_image_tokens)
    embeds = np.array(embed(np.where(is_image, 0, ids)))  # a writable copy
    if blocks:
        embeds[is_image] = np.concatenate(blocks, axis=0).reshape(-1, embeds.shape[-1]).astype(embeds.dtype, copy=False)
    return embeds


def encode_supervised(
    messages: Sequence[dict],
    tokenizer,
    chat_template: Optional[str],
    special_tokens: Optional[dict[str, str]] = None,
    ignore_index: int = -100,
    num_image_tokens: int = 1,
) -> tuple[list[int], list[int]]:
    """Token ids and labels for training: labels are ``ignore_index`` everywhere but on the
    assistant turns (their text and the template's end-of-turn tokens); never on image positions.
    Each ``<image>`` becomes ``num_image_tokens`` sentinels, as in ``tokenize``.

    Each assistant turn's span is what rendering the conversation up to and including it adds to
    rendering it up to that turn's generation prompt, so the prompt part is tokenised exactly as
    it will be at inference time (which always stops at a generation prompt).
    """
    validate_messages(messages)
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_chat(messages[:index], chat_template, special_tokens, add_generation_prompt=True)
        full = render_chat(messages[: index + 1], chat_template, special_tokens, add_generation_prompt=False)
        if not prefix.startswith(rendered) or not full.startswith(prefix):
            raise PromptError("the chat template does not render conversations incrementally; "
                              "cannot tell assistant tokens from prompt tokens")
        prompt_ids = tokenize(prefix[len(rendered):], tokenizer, num_image_tokens=num_image_tokens)
        answer_ids = tokenize(full[len(prefix):], tokenizer, num_image_tokens=num_image_tokens)
        ids += prompt_ids + answer_ids
        labels += [ignore_index] * len(prompt_ids) + [ignore_index if t == IMAGE_TOKEN_ID else t for t in answer_ids]
        rendered = full
    if not rendered:
        raise PromptError("the conversation has no assistant turn to learn from")
    return ids, labels


def count_images(messages: Iterable[dict]) -> int:
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)


def user_turn_with_image(question: str) -> dict:
    """A first user turn in LLaVA's layout: the image, a newline, then the question."""
    text = question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER}\n{question}"
    return {"role": "user", "content": text}
