"""The multimodal LM: image splice, label masking, loss, generate(), Qwen2 and Llama, prompts."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import make_config
from ftz_edge import prompt
from ftz_edge.config import FtZConfig, TowerConfig
from ftz_edge.mllm import IGNORE_INDEX, FtZForCausalLM


@pytest.fixture(scope="module")
def model(tiny_components):
    return FtZForCausalLM.from_config(make_config(tiny_components))


def images(model, n):
    torch.manual_seed(n)
    return torch.randn(n, 3, 64, 64), torch.randn(n, 3, 56, 56)


def test_image_placeholder_is_replaced_by_image_embeddings(model):
    ids = model.encode_conversation([prompt.user_turn_with_image("What color is the circle?")])
    n_img = model.vision.num_image_tokens
    assert ids.count(prompt.IMAGE_TOKEN_ID) == n_img  # the placeholder is the image's n_img positions
    anchor, augmenter = images(model, 1)
    labels = [list(ids)]
    inputs = model.build_inputs([ids], anchor, augmenter, labels=labels)
    assert inputs["inputs_embeds"].shape[1] == len(ids)
    at = ids.index(prompt.IMAGE_TOKEN_ID)
    assert ids[at:at + n_img] == [prompt.IMAGE_TOKEN_ID] * n_img
    with torch.no_grad():
        expected = model.vision(anchor, augmenter)[0]
    torch.testing.assert_close(inputs["inputs_embeds"][0, at:at + n_img], expected)
    text_ids = torch.tensor(ids[:at])
    torch.testing.assert_close(inputs["inputs_embeds"][0, :at], model.llm.get_input_embeddings()(text_ids))
    assert (inputs["labels"][0, at:at + n_img] == IGNORE_INDEX).all()
    assert inputs["labels"][0, at + n_img:].tolist() == ids[at + n_img:]


def test_image_count_must_match(model):
    ids = model.encode_conversation([prompt.user_turn_with_image("Describe.")])
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        model.build_inputs([ids], *images(model, 2))


def test_sentinel_count_must_match_the_image_features(model):
    n_img = model.vision.num_image_tokens
    assert n_img > 1
    # ids with one sentinel per image (tokenized for another model): refused before the tower runs
    compact = prompt.tokenize("a <image> b", model.tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match=f"not a whole number of images of {n_img} tokens each"):
        model.build_inputs([compact], *images(model, 1))
    ids = model.encode_conversation([prompt.user_turn_with_image("Describe.")])
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        model.build_inputs([ids])
    # two rows, two images: the images' rows go to the rows in order
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        model.build_inputs([ids, ids], *images(model, 1))
    # two rows off by one each way: the batch total matches two images, each row does not
    at = ids.index(prompt.IMAGE_TOKEN_ID)
    longer, shorter = ids[:at] + [prompt.IMAGE_TOKEN_ID] + ids[at:], ids[:at] + ids[at + 1:]
    with pytest.raises(ValueError, match=f"row 0 holds {n_img + 1} image positions"):
        model.build_inputs([longer, shorter], *images(model, 2))


def test_torch_and_numpy_splices_agree(model):
    """The same ids through build_inputs (torch) and prompt.splice_image_embeddings (numpy, the
    runtime's): the same embeddings, bit for bit."""
    ids = model.encode_conversation([{"role": "user", "content": "<image>\nThis one, <image>\nthat one: same?"}])
    anchor, augmenter = images(model, 2)
    with torch.no_grad():
        ours = model.build_inputs([ids], anchor, augmenter)["inputs_embeds"][0].numpy()
        features = model.vision(anchor, augmenter).numpy()
        table = model.llm.get_input_embeddings().weight.numpy()
    theirs = prompt.splice_image_embeddings(ids, features, lambda i: table[i], model.vision.num_image_tokens)
    assert theirs.shape == ours.shape == (len(ids), table.shape[1])
    np.testing.assert_array_equal(theirs, ours)


def test_loss_is_finite_and_padding_is_ignored(model):
    short = model.encode_conversation([prompt.user_turn_with_image("Hi")])
    long = model.encode_conversation([prompt.user_turn_with_image("How many shapes are there in the picture?")])
    # Loss only on the last 3 tokens of each (as if they were the answer).
    labels = [[IGNORE_INDEX] * (len(s) - 3) + s[-3:] for s in (short, long)]
    out = model([short, long], *images(model, 2), labels=labels)
    assert torch.isfinite(out.loss) and out.loss > 0
    mask = model.build_inputs([short, long], *images(model, 2), labels=labels)["attention_mask"]
    assert mask[0].sum() == len(short)  # the image's positions are in the ids
    assert mask[0, -1] == 0 and mask[1].all()


def test_generate_returns_new_tokens_and_is_deterministic(model):
    ids = model.encode_conversation([prompt.user_turn_with_image("What color is the circle?")])
    anchor, augmenter = images(model, 1)
    first = model.generate([ids], anchor, augmenter, max_new_tokens=6, do_sample=False)
    again = model.generate([ids], anchor, augmenter, max_new_tokens=6, do_sample=False)
    assert first.shape == (1, 6)
    assert torch.equal(first, again)
    assert (first >= 0).all() and (first < model.llm.config.vocab_size).all()


def test_generate_matches_manual_greedy_decoding(model):
    """generate() over inputs_embeds equals a plain argmax loop over the full sequence."""
    ids = model.encode_conversation([prompt.user_turn_with_image("Is there a red square?")])
    anchor, augmenter = images(model, 1)
    generated = model.generate([ids], anchor, augmenter, max_new_tokens=4, do_sample=False)[0].tolist()
    sequence, manual = list(ids), []
    with torch.no_grad():
        for _ in range(4):
            logits = model.llm(**model.build_inputs([sequence], anchor, augmenter)).logits
            manual.append(int(logits[0, -1].argmax()))
            sequence.append(manual[-1])
    assert generated == manual


def test_llama_with_fallback_template(tiny_components, tiny_llama):
    config = FtZConfig(tower=TowerConfig(anchor=tiny_components["anchor"], augmenter=tiny_components["augmenter"],
                                         num_fusion_points=2), llm=tiny_llama)
    model = FtZForCausalLM.from_config(config)
    assert type(model.llm).__name__ == "LlamaForCausalLM"
    assert not getattr(model.tokenizer, "chat_template", None)
    ids = model.encode_conversation([prompt.user_turn_with_image("What is this?")])
    text = model.tokenizer.decode([i for i in ids if i >= 0])
    assert text.startswith("<s>USER: \nWhat is this?\nASSISTANT:")
    labels = [list(ids)]
    out = model([ids], *images(model, 1), labels=labels)
    assert torch.isfinite(out.loss)
    assert model.generate([ids], *images(model, 1), max_new_tokens=3, do_sample=False).shape == (1, 3)


def test_answer_from_a_pil_image(model):
    from PIL import Image

    reply = model.answer(Image.new("RGB", (90, 70), "red"), "What color is it?", max_new_tokens=4)
    assert isinstance(reply, str)


def test_prompt_rendering_equals_apply_chat_template(tiny_components):
    tokenizer = AutoTokenizer.from_pretrained(tiny_components["llm"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the square?"},
    ]
    for add in (True, False):
        ours = prompt.render_chat(messages, tokenizer.chat_template, add_generation_prompt=add)
        theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours == theirs
    ids = prompt.tokenize("a <image> b", tokenizer.backend_tokenizer)
    assert ids == tokenizer("a ", add_special_tokens=False).input_ids + [prompt.IMAGE_TOKEN_ID] + \
        tokenizer(" b", add_special_tokens=False).input_ids
