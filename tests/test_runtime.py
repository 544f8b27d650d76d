"""The torch-free runtime: parity with PyTorch, no torch imported, generation options, guards."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ftz_edge import prompt
from ftz_edge.manifest import BundleError
from ftz_edge.preprocess import ImageLoadError
from ftz_edge.runtime.engine import ContextLengthError, Conversation, FtZRuntime
from ftz_edge.runtime.generation import GenerationConfig, StopChecker, TokenChooser

DEFAULT = Path(__file__).resolve().parent.parent / "ftz_edge" / "default_model"
EXAMPLES = json.loads((DEFAULT / "examples" / "examples.json").read_text())


@pytest.fixture(scope="module")
def runtime(default_bundle):
    return FtZRuntime(default_bundle)


def test_greedy_tokens_equal_the_pytorch_model(runtime):
    import torch

    from ftz_edge.checkpoint import load_checkpoint

    model = load_checkpoint(DEFAULT).eval()
    questions = [(e["image"], e["question"]) for e in EXAMPLES] + [(EXAMPLES[0]["image"], "Describe the picture.")]
    for image, question in questions:
        path = DEFAULT / "examples" / image
        runtime.answer(path, question, GenerationConfig(max_new_tokens=16))
        anchor, augmenter = model.preprocess_images([path])
        ids = model.encode_conversation([prompt.user_turn_with_image(question)])
        assert ids == runtime.encode_prompt([prompt.user_turn_with_image(question)])
        with torch.no_grad():
            reference = model.generate([ids], anchor, augmenter, max_new_tokens=16, do_sample=False,
                                       eos_token_id=sorted(runtime.eos_token_ids))[0].tolist()
        reference = [t for t in reference if t not in runtime.eos_token_ids]
        assert runtime.last_tokens == reference, (question, runtime.last_tokens, reference)


def test_runtime_never_imports_torch_or_transformers(default_bundle):
    code = f"""
import sys
from ftz_edge.runtime.engine import FtZRuntime
from ftz_edge.runtime.chat_cli import main
rt = FtZRuntime({str(default_bundle)!r})
answer = rt.answer({str(DEFAULT / 'examples' / EXAMPLES[0]['image'])!r}, {EXAMPLES[0]['question']!r})
assert main(["--bundle", {str(default_bundle)!r}, "--image", {str(DEFAULT / 'examples' / EXAMPLES[1]['image'])!r}, "Hi?"]) == 0
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
assert not heavy, heavy
print("ANSWER", answer)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ANSWER" in result.stdout


def test_timings_are_reported(runtime):
    runtime.answer(DEFAULT / "examples" / EXAMPLES[0]["image"], "Describe the picture.", GenerationConfig(max_new_tokens=8))
    t = runtime.last_timings
    assert t.vision_ms > 0 and t.prefill_ms > 0 and t.time_to_first_token_ms >= t.prefill_ms
    assert t.prompt_tokens > runtime.num_image_tokens and t.peak_rss_mb > 10
    assert t.total_ms >= t.time_to_first_token_ms


def test_greedy_is_deterministic_and_seeds_reproduce_sampling(runtime):
    image, question = DEFAULT / "examples" / EXAMPLES[0]["image"], "Describe the picture."
    greedy = [runtime.answer(image, question, GenerationConfig(max_new_tokens=8)) for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = {}
    for seed in (1, 1, 2, 3, 4):
        runtime.answer(image, question, GenerationConfig(max_new_tokens=12, temperature=1.5, seed=seed))
        sampled.setdefault(seed, []).append(tuple(runtime.last_tokens))
    assert sampled[1][0] == sampled[1][1]
    assert len({tokens[0] for tokens in sampled.values()}) > 1  # other seeds, other samples


def test_stop_strings_stop_and_are_cut(runtime):
    image, question = DEFAULT / "examples" / EXAMPLES[2]["image"], EXAMPLES[2]["question"]
    full = runtime.answer(image, question, GenerationConfig(max_new_tokens=8))
    assert len(full) >= 2
    cut = runtime.answer(image, question, GenerationConfig(max_new_tokens=8, stop=[full[1:]]))
    assert cut == full[:1]


def test_context_guard_refuses_and_trims(runtime):
    image = DEFAULT / "examples" / EXAMPLES[0]["image"]
    with pytest.raises(ContextLengthError, match="but the context holds"):
        runtime.answer(image, "red " * 5000)
    runtime.answer(image, "Describe the picture.", GenerationConfig(max_new_tokens=100_000))
    assert any("trimmed" in note for note in runtime.last_timings.notes)


def test_bad_images_give_clear_errors(runtime, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        runtime.answer(broken, "What is this?")
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        list(runtime.stream([prompt.user_turn_with_image("Hi")], []))


def test_multi_turn_conversation_keeps_history(runtime):
    chat = Conversation(runtime)
    image = DEFAULT / "examples" / EXAMPLES[4]["image"]
    first = "".join(chat.ask(EXAMPLES[4]["question"], [image]))
    second = "".join(chat.ask("Is there a green circle? Answer with one word."))
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == first.strip() and second
    assert runtime.last_timings.prompt_tokens > runtime.num_image_tokens + 20  # both turns in the prompt


def test_tampered_bundle_is_refused(default_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(default_bundle, copy)
    table = copy / "llm" / "embed_tokens.npy"
    data = bytearray(table.read_bytes())
    data[-1] ^= 1
    table.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="embed_tokens.npy does not match its sha256"):
        FtZRuntime(copy)


def test_token_chooser_matches_transformers_processors():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32) * 3
    history = [3, 7, 7, 20]
    ours = TokenChooser(GenerationConfig(repetition_penalty=1.3))(logits, history)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), torch.tensor(logits[None]))
    assert ours == int(theirs.argmax())
    # top-k = 1 and a tiny top-p both leave only the most likely token.
    for config in (GenerationConfig(temperature=1.0, top_k=1, seed=0), GenerationConfig(temperature=1.0, top_p=1e-6, seed=0)):
        assert TokenChooser(config)(logits, []) == int(logits.argmax())
    # the set top-p keeps is transformers' set
    kept_by_transformers = set(np.flatnonzero(np.isfinite(
        TopPLogitsWarper(0.8)(None, torch.tensor(logits[None])).numpy()[0])))
    draws = {TokenChooser(GenerationConfig(temperature=1.0, top_p=0.8, seed=s))(logits, []) for s in range(300)}
    assert draws <= kept_by_transformers and len(draws) > 1
    kept_top_k = set(np.flatnonzero(np.isfinite(TopKLogitsWarper(5)(None, torch.tensor(logits[None])).numpy()[0])))
    draws = {TokenChooser(GenerationConfig(temperature=1.0, top_k=5, seed=s))(logits, []) for s in range(300)}
    assert draws == kept_top_k


def test_stop_checker_holds_back_partial_stop_strings():
    checker = StopChecker(["###", "\nUSER"])
    assert checker.cut("hello ### world") == 6
    assert checker.holdback("hello #") == 1 and checker.holdback("hello ##") == 2
    assert checker.holdback("line\nUS") == 3 and checker.holdback("hello") == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_generation_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)
