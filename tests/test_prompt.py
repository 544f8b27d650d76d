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


def test_each_image_is_num_image_tokens_sentinels_and_len_ids_is_the_prompt():
    import numpy as np

    tok, n, width = word_tokenizer(), 5, 3
    ids = prompt.tokenize("a <image> b <image>", tok, num_image_tokens=n)
    image = prompt.IMAGE_TOKEN_ID
    assert ids == [1] + [image] * n + [2] + [image] * n
    table = np.arange(6 * width, dtype=np.float32).reshape(6, width)
    features = np.random.default_rng(0).normal(size=(2, n, width)).astype(np.float32)
    embeds = prompt.splice_image_embeddings(ids, features, lambda i: table[i], n)
    assert embeds.shape == (len(ids), width)  # one embedding per id: the context length is len(ids)
    np.testing.assert_array_equal(embeds[1:1 + n], features[0])
    np.testing.assert_array_equal(embeds[2 + n:], features[1])
    np.testing.assert_array_equal(embeds[[0, 1 + n]], table[[1, 2]])
    # blocks as a list (the runtime's image cache gives one per image) splice the same
    np.testing.assert_array_equal(prompt.splice_image_embeddings(ids, list(features), lambda i: table[i], n), embeds)
    # training labels: never on image positions
    messages = [{"role": "user", "content": "<image> a"}, {"role": "assistant", "content": "b"}]
    ids, labels = prompt.encode_supervised(messages, tok, None, num_image_tokens=n)
    assert ids.count(image) == n and len(labels) == len(ids)
    assert all(label == -100 for i, label in zip(ids, labels) if i == image)
    with pytest.raises(ValueError, match="num_image_tokens must be a positive integer"):
        prompt.tokenize("a <image>", tok, num_image_tokens=0)


def test_a_splice_whose_counts_disagree_is_refused_clearly():
    import numpy as np

    tok, n = word_tokenizer(), 4
    table = np.zeros((6, 2), np.float32)
    embed = lambda i: table[i]  # noqa: E731
    ids = prompt.tokenize("a <image> b", tok, num_image_tokens=n)
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        prompt.splice_image_embeddings(ids, np.zeros((2, n, 2), np.float32), embed, n)
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        prompt.splice_image_embeddings(ids, None, embed, n)
    # ids tokenized for another image-token count (here: one sentinel per image)
    with pytest.raises(ValueError, match="not a whole number of images of 4 tokens each: tokenize with num_image_tokens=4"):
        prompt.splice_image_embeddings(prompt.tokenize("a <image> b", tok), np.zeros((1, n, 2), np.float32), embed, n)
    # image features of another size than the model's image-token count
    with pytest.raises(ValueError, match=r"not \(4, width\)"):
        prompt.splice_image_embeddings(ids, np.zeros((1, n + 1, 2), np.float32), embed, n)


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
