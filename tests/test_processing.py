"""FtZProcessor: the model's preprocessing, chat template and tokenizer as one transformers
ProcessorMixin, giving exactly what FtZForCausalLM (and the runtime) compute."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_config
from ftz_edge import DEFAULT_MODEL, prompt
from ftz_edge.checkpoint import load_checkpoint
from ftz_edge.mllm import FtZForCausalLM
from ftz_edge.preprocess import ANCHOR_INPUT, AUGMENTER_INPUT, encoder_pixels
from ftz_edge.processing import FtZProcessor

EXAMPLES = sorted((DEFAULT_MODEL / "examples").glob("*.png"))

CONVERSATIONS = [
    [prompt.user_turn_with_image("What color is the circle?")],
    [{"role": "system", "content": "Answer in one word."},
     prompt.user_turn_with_image("How many shapes are there?"),
     {"role": "assistant", "content": "three"},
     {"role": "user", "content": "Is the square left or right of the triangle?"}],
    [{"role": "user", "content": "<image>\n<image>\nWhat is in the image?"}],
]


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(DEFAULT_MODEL).eval()


@pytest.fixture(scope="module")
def processor(model):
    return FtZProcessor.from_model(model)


def test_it_holds_the_models_preprocessing_tokenizer_and_template(model, processor):
    assert type(processor.image_processor).__name__.startswith("CLIPImageProcessor")
    assert type(processor.augmenter_image_processor).__name__.startswith("BitImageProcessor")
    assert processor.anchor_spec == model.anchor_spec and processor.augmenter_spec == model.augmenter_spec
    assert processor.tokenizer is model.tokenizer
    assert processor.chat_template == model.chat_template and processor.prompt_format == model.config.prompt_format
    assert processor.num_image_tokens == model.vision.num_image_tokens == 17
    assert processor.image_token_id == prompt.IMAGE_TOKEN_ID == -200


def test_pixels_are_encoder_pixels_exactly(model, processor):
    expected = encoder_pixels(EXAMPLES, model.anchor_spec, model.augmenter_spec)
    out = processor(images=EXAMPLES)
    assert set(out) == {"pixel_values", "augmenter_pixel_values"}
    for key, name in (("pixel_values", ANCHOR_INPUT), ("augmenter_pixel_values", AUGMENTER_INPUT)):
        assert out[key].dtype == np.float32 and np.array_equal(out[key], expected[name])
    # Any source load_image reads: PIL images, encoded bytes; torch tensors with return_tensors="pt".
    pil = [Image.open(path) for path in EXAMPLES[:2]]
    as_pt = processor(images=pil, return_tensors="pt")
    assert torch.equal(as_pt["pixel_values"], torch.from_numpy(expected[ANCHOR_INPUT][:2]))
    assert np.array_equal(processor(images=EXAMPLES[0].read_bytes())["augmenter_pixel_values"],
                          expected[AUGMENTER_INPUT][:1])


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_template_and_ids_are_the_models(model, processor, index):
    messages = CONVERSATIONS[index]
    for generation_prompt in (True, False):
        text = processor.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert text == prompt.render_chat(messages, model.chat_template, model.special_tokens, generation_prompt)
        images = EXAMPLES[:prompt.count_images(messages)]
        out = processor(images=images, text=text)
        ids = model.encode_conversation(messages, add_generation_prompt=generation_prompt)
        assert out["input_ids"] == [ids] and out["attention_mask"] == [[1] * len(ids)]
        assert sum(t == -200 for t in ids) == 17 * len(images)
        assert processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True) == ids


def test_transformers_style_messages_render_as_llavas_layout(model, processor):
    """Content as a list of typed parts: the image, a newline, the text (ftz_edge.prompt.user_turn_with_image)."""
    parts = [{"role": "user", "content": [{"type": "image", "path": str(EXAMPLES[0])},
                                          {"type": "text", "text": "What color is the circle?"}]}]
    plain = [prompt.user_turn_with_image("What color is the circle?")]
    assert processor.apply_chat_template(parts, add_generation_prompt=True) == \
        processor.apply_chat_template(plain, add_generation_prompt=True)
    out = processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["input_ids"] == [model.encode_conversation(plain)]
    assert np.array_equal(out["pixel_values"], processor(images=EXAMPLES[:1])["pixel_values"])


def test_the_processors_inputs_give_the_models_embeddings(model, processor):
    messages = CONVERSATIONS[0]
    out = processor(images=EXAMPLES[:1], text=processor.apply_chat_template(messages, add_generation_prompt=True),
                    return_tensors="pt")
    anchor, augmenter = model.preprocess_images(EXAMPLES[:1])
    with torch.no_grad():
        ours = model.build_inputs([out["input_ids"][0].tolist()], out["pixel_values"], out["augmenter_pixel_values"])
        reference = model.build_inputs([model.encode_conversation(messages)], anchor, augmenter)
    assert torch.equal(ours["inputs_embeds"], reference["inputs_embeds"])
    assert torch.equal(ours["attention_mask"], reference["attention_mask"]) and torch.equal(out["attention_mask"],
                                                                                             reference["attention_mask"])


def test_batches_pad_on_the_tokenizers_side_or_as_asked(processor):
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in CONVERSATIONS[:2]]
    rows = processor(images=EXAMPLES[:2], text=texts)["input_ids"]
    for side in ("left", "right"):
        out = processor(images=EXAMPLES[:2], text=texts, return_tensors="np", padding_side=side)
        assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (2, max(map(len, rows)))
        for row, ids, mask in zip(rows, out["input_ids"], out["attention_mask"]):
            assert ids[mask.astype(bool)].tolist() == row and mask.sum() == len(row)
            assert mask[0 if side == "right" else -1] == 1  # the text starts (right) or ends (left) the row
        assert out["pixel_values"].shape[0] == 2


def test_a_wrong_image_count_is_refused(processor):
    text = processor.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True)  # two <image>
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor(images=EXAMPLES[:1], text=text)
    with pytest.raises(ValueError, match="placeholders but 1 images"):
        processor(images=EXAMPLES[:1], text="no image here")
    assert processor(text=text)["input_ids"][0].count(-200) == 2 * 17  # text alone: ids to pair with pixels later


def test_decode_drops_or_shows_the_image_positions(model, processor):
    ids = model.encode_conversation(CONVERSATIONS[2])
    text = processor.decode(ids, show_images=True)
    assert text == processor.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True)
    assert "<image>" not in processor.decode(ids) and "What is in the image?" in processor.decode(ids)
    assert processor.batch_decode(torch.tensor([ids])) == [processor.decode(ids)]
    assert processor.image_mask(ids).sum() == 2 * 17


def test_save_and_load_round_trip(model, processor, tmp_path):
    from transformers import AutoImageProcessor

    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "FtZProcessor" and saved["num_image_tokens"] == 17
    assert saved["image_processor"]["image_processor_type"] == "CLIPImageProcessor"
    assert saved["augmenter_image_processor"]["image_processor_type"] == "BitImageProcessor"
    assert "anchor_spec" not in saved and (tmp_path / "chat_template.jinja").read_text() == model.chat_template
    loaded = FtZProcessor.from_pretrained(tmp_path)
    assert (loaded.anchor_spec, loaded.augmenter_spec) == (model.anchor_spec, model.augmenter_spec)
    assert (loaded.chat_template, loaded.num_image_tokens, loaded.prompt_format) == \
        (processor.chat_template, processor.num_image_tokens, processor.prompt_format)
    for messages in CONVERSATIONS:
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert loaded.apply_chat_template(messages, add_generation_prompt=True) == text
        images = EXAMPLES[:prompt.count_images(messages)]
        a, b = processor(images=images, text=text), loaded(images=images, text=text)
        assert a["input_ids"] == b["input_ids"] == [model.encode_conversation(messages)]
        assert all(np.array_equal(a[k], b[k]) for k in ("pixel_values", "augmenter_pixel_values"))
    # The anchor's image processor is also transformers' primary one: AutoImageProcessor reads it.
    from ftz_edge.processing import spec_of

    assert spec_of(AutoImageProcessor.from_pretrained(tmp_path)) == model.anchor_spec


@pytest.mark.parametrize("prompt_format", ["plain", "llama"])
def test_the_prompt_format_is_the_models_and_survives_saving(tiny_components, tmp_path, prompt_format):
    model = FtZForCausalLM.from_config(make_config(tiny_components))
    model.config.prompt_format = prompt_format
    processor = FtZProcessor.from_model(model)
    messages = CONVERSATIONS[1]
    assert processor.chat_template == prompt.format_template(prompt_format)
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == \
        model.encode_conversation(messages)
    processor.save_pretrained(tmp_path)
    loaded = FtZProcessor.from_pretrained(tmp_path)
    assert loaded.prompt_format == prompt_format and loaded.chat_template == model.chat_template
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == \
        model.encode_conversation(messages)


def test_a_tokenizer_without_a_template_saves_the_fallback_it_renders_with(tiny_components, tiny_llama, tmp_path):
    model = FtZForCausalLM.from_config(make_config({**tiny_components, "llm": tiny_llama}))
    assert model.chat_template is None
    processor = FtZProcessor.from_model(model)
    assert processor.chat_template == prompt.FALLBACK_CHAT_TEMPLATE
    messages = CONVERSATIONS[0]
    processor.save_pretrained(tmp_path)
    for p in (processor, FtZProcessor.from_pretrained(tmp_path)):
        assert p(images=EXAMPLES[:1], text=p.apply_chat_template(messages, add_generation_prompt=True))["input_ids"] \
            == [model.encode_conversation(messages)]


def test_a_clip_only_tower_has_no_augmenter_processor(tiny_components, tmp_path):
    model = FtZForCausalLM.from_config(make_config(tiny_components, "clip"))
    processor = FtZProcessor.from_model(model)
    assert processor.augmenter_image_processor is None and processor.augmenter_spec is None
    assert "augmenter_pixel_values" not in processor.model_input_names
    text = processor.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    out = processor(images=EXAMPLES[:1], text=text)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}
    assert np.array_equal(out["pixel_values"], encoder_pixels(EXAMPLES[:1], model.anchor_spec, None)[ANCHOR_INPUT])
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["augmenter_image_processor"] is None
    loaded = FtZProcessor.from_pretrained(tmp_path)
    assert loaded.augmenter_image_processor is None and loaded.anchor_spec == model.anchor_spec
    assert loaded(images=EXAMPLES[:1], text=text)["input_ids"] == out["input_ids"]
