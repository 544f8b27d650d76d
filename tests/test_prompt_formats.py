"""Prompt formats per training stage: the tokenizer's chat template, and the authors' plain and llama."""

import json
import shutil

import pytest
from tokenizers import Tokenizer

from ftz_edge import DEFAULT_MODEL, prompt
from ftz_edge.config import FtZConfig
from ftz_edge.training.recipe import TrainConfig, load_recipe, recipe_stage_config

TOKENIZER = Tokenizer.from_file(str(DEFAULT_MODEL / "llm" / "tokenizer.json"))
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def test_plain_is_the_image_then_the_caption_and_a_newline():
    """TinyLLaVA Factory's pretrain template: the instruction is dropped, labels on the caption."""
    messages = [{"role": "user", "content": "<image>\nDescribe the image briefly."},
                {"role": "assistant", "content": "a red circle"}]
    assert prompt.render_chat(messages, prompt.PLAIN_TEMPLATE, SPECIAL, add_generation_prompt=False) == \
        "<s><image>a red circle\n"
    assert prompt.render_chat(messages[:1], prompt.PLAIN_TEMPLATE, SPECIAL) == "<s><image>"
    two = [{"role": "user", "content": "<image>\n<image>\nWhat differs?"}, messages[1]]
    assert prompt.render_chat(two, prompt.PLAIN_TEMPLATE, SPECIAL, add_generation_prompt=False).count("<image>") == 2
    ids, labels = prompt.encode_supervised(messages, TOKENIZER, prompt.PLAIN_TEMPLATE, {"bos_token": "", "eos_token": ""},
                                           num_image_tokens=3)
    assert ids[:3] == [prompt.IMAGE_TOKEN_ID] * 3 and labels[:3] == [-100] * 3
    caption = prompt.tokenize("a red circle\n", TOKENIZER)
    assert ids[3:] == caption and labels[3:] == caption


def test_llama_is_tinyllava_factorys_llama_conversation():
    """system + " ", then "USER: {q} " and "ASSISTANT: {a}</s>" per round (their llama_template.py)."""
    messages = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "How many?"}, {"role": "assistant", "content": "two"}]
    expected = (f"<s>{prompt.LLAMA_SYSTEM} USER: <image>\nWhat colour? ASSISTANT: red</s>"
                "USER: How many? ASSISTANT: two</s>")
    assert prompt.render_chat(messages, prompt.LLAMA_TEMPLATE, SPECIAL, add_generation_prompt=False) == expected
    assert prompt.render_chat(messages[:3], prompt.LLAMA_TEMPLATE, SPECIAL).endswith("USER: How many? ASSISTANT:")
    custom = [{"role": "system", "content": "Be brief."}, *messages[:1]]
    assert prompt.render_chat(custom, prompt.LLAMA_TEMPLATE, SPECIAL) == "<s>Be brief. USER: <image>\nWhat colour? ASSISTANT:"
    # Training renders it incrementally: labels on the answers and their EOS only.
    ids, labels = prompt.encode_supervised(messages, TOKENIZER, prompt.LLAMA_TEMPLATE, SPECIAL)
    answers = prompt.tokenize(" red</s>", TOKENIZER) + prompt.tokenize(" two</s>", TOKENIZER)
    assert [t for t in labels if t != -100] == answers


def test_formats_are_checked_where_they_are_set():
    assert prompt.format_template("chat", "TEMPLATE") == "TEMPLATE"
    assert prompt.format_template("chat", None, "FALLBACK") == "FALLBACK"
    with pytest.raises(prompt.PromptError, match="prompt format must be one of chat, plain, llama"):
        prompt.format_template("vicuna")
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        FtZConfig(prompt_format="vicuna")
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        TrainConfig(prompt_format="vicuna")


def test_the_authors_recipe_pretrains_plain_and_finetunes_llama():
    recipe = load_recipe("authors-tinyllama-1.1b")
    assert recipe_stage_config(recipe, "pretrain").prompt_format == "plain"
    assert recipe_stage_config(recipe, "finetune").prompt_format == "llama"
    assert recipe_stage_config(load_recipe("ftz-qwen2.5-0.5b"), "finetune").prompt_format is None  # the model's: chat


def test_a_stage_trains_and_saves_with_its_format(tiny_components, tmp_path):
    from conftest import make_config
    from PIL import Image

    from ftz_edge.checkpoint import load_checkpoint
    from ftz_edge.training.train import train

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    records = [{"id": str(i), "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]} for i in range(4)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    common = dict(data_path=str(tmp_path / "data.json"), per_device_batch_size=2, global_batch_size=2, max_steps=1,
                  save_every=1, num_workers=0, gradient_checkpointing=False, log_every=1)
    first = train(TrainConfig(stage="pretrain", output_dir=str(tmp_path / "pre"), prompt_format="plain", **common),
                  make_config(tiny_components), progress=False)
    assert load_checkpoint(first).config.prompt_format == "plain"
    final = train(TrainConfig(stage="finetune", output_dir=str(tmp_path / "sft"), init_from=str(first),
                              prompt_format="llama", **common), progress=False)
    model = load_checkpoint(final)
    assert model.config.prompt_format == "llama" and model.chat_template == prompt.LLAMA_TEMPLATE


def test_the_bundle_records_the_format_and_the_runtime_renders_the_same(tmp_path):
    from ftz_edge.checkpoint import load_checkpoint
    from ftz_edge.export.bundle import ExportOptions, export_bundle
    from ftz_edge.runtime.engine import FtZRuntime

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_MODEL, checkpoint)
    config = json.loads((checkpoint / "ftz_config.json").read_text())
    (checkpoint / "ftz_config.json").write_text(json.dumps({**config, "prompt_format": "llama"}))
    bundle = export_bundle(ExportOptions(checkpoint=str(checkpoint), out=str(tmp_path / "bundle"), precision="fp32",
                                         llm_precision="fp32", validation_images=1))
    runtime = FtZRuntime(bundle)
    assert runtime.manifest.prompt.format == "llama"
    assert runtime.manifest.prompt.chat_template == prompt.LLAMA_TEMPLATE
    model = load_checkpoint(checkpoint)
    messages = [prompt.user_turn_with_image("What colour is the circle?")]
    assert runtime.encode_prompt(messages) == model.encode_conversation(messages)
