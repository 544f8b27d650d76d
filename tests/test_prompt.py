"""The torch-free prompt format: fallback template, placeholders, clear errors."""

import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from ftz_edge import prompt


def word_tokenizer():
    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "b", "USER:", "ASSISTANT:", "hi"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_fallback_template():
    messages = [{"role": "system", "content": "Be brief."}, prompt.user_turn_with_image("Hi?"),
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]
    text = prompt.render_chat(messages, None, {"bos_token": "<s>", "eos_token": "</s>"})
    assert text == "<s>Be brief.\nUSER: <image>\nHi?\nASSISTANT: Hello.</s>\nUSER: Bye?\nASSISTANT:"


def test_tokenize_places_image_sentinels():
    tok = word_tokenizer()
    assert prompt.tokenize("a <image> b <image>", tok) == [1, prompt.IMAGE_TOKEN_ID, 2, prompt.IMAGE_TOKEN_ID]
    assert prompt.count_images([{"role": "user", "content": "<image><image> x"}]) == 2


@pytest.mark.parametrize("messages, message", [
    ([], "empty conversation"),
    ([{"role": "robot", "content": "x"}], "role must be system, user or assistant"),
    ([{"role": "user", "content": "  "}], "content must be a non-empty string"),
])
def test_bad_conversations(messages, message):
    with pytest.raises(prompt.PromptError, match=message):
        prompt.render_chat(messages, None)


def test_template_raise_exception_is_a_prompt_error():
    template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(prompt.PromptError, match="only user turns"):
        prompt.render_chat([{"role": "user", "content": "x"}], template)


def test_shared_modules_import_without_torch():
    code = ("import sys, ftz_edge.prompt, ftz_edge.preprocess; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
