"""The torch-free prompt format: fallback template, placeholders, clear errors."""

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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


@pytest.mark.parametrize("messages, where, index", [
    ([{"role": "user", "content": "hi \ud800"}], "message 0 (user)", 0),
    ([{"role": "system", "content": "be \udfff brief"}, {"role": "user", "content": "hi"}], "message 0 (system)", 0),
    ([{"role": "user", "content": "ok"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "x\udcff"}],
     "message 2 (user)", 2),
])
def test_text_that_is_not_utf8_is_a_prompt_error_naming_the_message(messages, where, index):
    """A lone surrogate (a JSON "\\ud800" escape, or an undecodable byte on a command line) is
    refused with its own PromptError, not tokenizers' bare TypeError."""
    with pytest.raises(prompt.UnencodableTextError, match=re.escape(f"{where} is not valid UTF-8 text")) as info:
        prompt.render_chat(messages, None)
    assert info.value.index == index and isinstance(info.value, prompt.PromptError)
    with pytest.raises(prompt.UnencodableTextError):
        prompt.encode_supervised(messages + [{"role": "assistant", "content": "b"}], word_tokenizer(), None)


def test_tokenize_refuses_text_that_is_not_utf8():
    with pytest.raises(prompt.UnencodableTextError, match="character 2 is a lone surrogate"):
        prompt.tokenize("a \ud800 <image> b", word_tokenizer())


def test_unencodable_text_error_survives_pickling():
    """Data-loader workers send errors across processes."""
    import pickle

    error = pickle.loads(pickle.dumps(prompt.UnencodableTextError("message 3 (user) ...", 3)))
    assert isinstance(error, prompt.UnencodableTextError) and error.index == 3 and str(error) == "message 3 (user) ..."


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=40))
def test_any_text_tokenizes_or_is_refused_as_unencodable(text):
    """Any Python string, surrogates included: token ids, or UnencodableTextError exactly when
    UTF-8 cannot encode it. Never another exception."""
    try:
        text.encode("utf-8")
        encodable = True
    except UnicodeEncodeError:
        encodable = False
    try:
        ids = prompt.tokenize(text, word_tokenizer())
    except prompt.UnencodableTextError:
        assert not encodable
    else:
        assert encodable and all(isinstance(i, int) for i in ids)
