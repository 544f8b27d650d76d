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
from fakes_tensorrt import add_engine, copy_bundle, install

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
        generation = runtime.ask(path, question, GenerationConfig(max_new_tokens=16)).run()
        anchor, augmenter = model.preprocess_images([path])
        ids = model.encode_conversation([prompt.user_turn_with_image(question)])
        assert ids == runtime.encode_prompt([prompt.user_turn_with_image(question)])
        with torch.no_grad():
            reference = model.generate([ids], anchor, augmenter, max_new_tokens=16, do_sample=False,
                                       eos_token_id=sorted(runtime.eos_token_ids))[0].tolist()
        reference = [t for t in reference if t not in runtime.eos_token_ids]
        assert generation.tokens == reference, (question, generation.tokens, reference)


def test_runtime_never_imports_torch_or_transformers(default_bundle):
    code = f"""
import sys
from ftz_edge.runtime.engine import FtZRuntime
from ftz_edge.demo.chat_cli import main
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
    runtime.image_cache.clear()  # earlier tests asked about this image: make the tower run
    t = runtime.ask(DEFAULT / "examples" / EXAMPLES[0]["image"], "Describe the picture.",
                    GenerationConfig(max_new_tokens=8)).run().timings
    assert t.vision_ms > 0 and t.prefill_ms > 0 and t.time_to_first_token_ms >= t.prefill_ms
    assert t.prompt_tokens > runtime.num_image_tokens and t.peak_rss_mb > 10
    assert t.total_ms >= t.time_to_first_token_ms


def test_greedy_is_deterministic_and_seeds_reproduce_sampling(runtime):
    image, question = DEFAULT / "examples" / EXAMPLES[0]["image"], "Describe the picture."
    greedy = [runtime.answer(image, question, GenerationConfig(max_new_tokens=8)) for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = {}
    for seed in (1, 1, 2, 3, 4):
        generation = runtime.ask(image, question, GenerationConfig(max_new_tokens=12, temperature=1.5, seed=seed)).run()
        sampled.setdefault(seed, []).append(tuple(generation.tokens))
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
    generation = runtime.ask(image, "Describe the picture.", GenerationConfig(max_new_tokens=100_000)).run()
    assert any("trimmed" in note for note in generation.timings.notes)


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
    follow_up = chat.ask("Is there a green circle? Answer with one word.")
    second = "".join(follow_up)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == first.strip() and second
    assert follow_up.timings.prompt_tokens > runtime.num_image_tokens + 20  # both turns in the prompt


def test_each_request_owns_its_generation(runtime):
    """Two requests interleaved, one closed early: each Generation carries its own tokens, text,
    timings and finish reason; the closed one says "cancelled"; the runtime keeps none of them."""
    image, question = DEFAULT / "examples" / EXAMPLES[0]["image"], "Describe the picture."
    full = runtime.ask(image, question, GenerationConfig(max_new_tokens=12)).run()
    assert full.finish_reason in ("stop", "length") and full.text and full.tokens
    assert full.timings.new_tokens == len(full.tokens) and full.timings.prompt_tokens > runtime.num_image_tokens
    early = runtime.ask(image, question, GenerationConfig(max_new_tokens=12))
    assert early.finish_reason is None and early.tokens == [] and early.text == ""  # lazy: nothing ran yet
    first = next(early)
    other = runtime.ask(DEFAULT / "examples" / EXAMPLES[3]["image"], EXAMPLES[3]["question"],
                        GenerationConfig(max_new_tokens=4)).run()  # runs while ``early`` is open
    assert early.finish_reason is None and first == early.text
    early.close()
    assert early.finish_reason == "cancelled" and list(early) == []
    assert early.tokens == full.tokens[:len(early.tokens)] and early.timings.new_tokens == len(early.tokens)
    assert full.text.startswith(early.text)
    assert other.finish_reason in ("stop", "length") and other.timings is not early.timings
    assert not any(hasattr(runtime, name) for name in ("last_timings", "last_tokens", "last_finish_reason"))
    # with a block: left early, cancelled; a request that fails keeps finish_reason None
    with runtime.stream([prompt.user_turn_with_image("Hi")], [image]) as generation:
        next(generation)
    assert generation.finish_reason == "cancelled"
    bad = runtime.stream([prompt.user_turn_with_image("Hi")], [])  # lazy: no error yet
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        next(bad)
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        bad.run()  # asked again: the same error, not a quiet empty answer
    bad.close()
    assert bad.finish_reason is None and isinstance(bad.error, ValueError)


def test_a_conversation_keeps_only_finished_turns(runtime):
    chat = Conversation(runtime)
    image = DEFAULT / "examples" / EXAMPLES[1]["image"]
    turn = chat.ask(EXAMPLES[1]["question"], [image], GenerationConfig(max_new_tokens=8))
    next(turn)
    turn.close()  # the client left: the turn never happened
    assert turn.finish_reason == "cancelled" and chat.messages == [] and chat.images == []
    with pytest.raises(ContextLengthError):
        "".join(chat.ask("red " * 5000, [image]))
    assert chat.messages == [] and chat.images == []
    abandoned = chat.ask(EXAMPLES[1]["question"], [image], GenerationConfig(max_new_tokens=8))
    next(abandoned)
    done = chat.ask(EXAMPLES[1]["question"], [image], GenerationConfig(max_new_tokens=8))  # supersedes it
    assert abandoned.finish_reason == "cancelled" and chat.messages == []
    text = "".join(done)
    assert done.finished and chat.messages[1] == {"role": "assistant", "content": text.strip() or "(no answer)"}
    assert chat.images == [image]


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


class CountingVision:
    """Wraps a runtime's vision backend and records the batch size of every run."""

    def __init__(self, vision):
        self.vision, self.batches = vision, []
        self.name, self.provider = vision.name, vision.provider

    def __call__(self, pixels):
        self.batches.append(next(iter(pixels.values())).shape[0])
        return self.vision(pixels)


@pytest.fixture
def counted_runtime(default_bundle):
    runtime = FtZRuntime(default_bundle)
    runtime.vision = CountingVision(runtime.vision)
    return runtime


def test_follow_up_question_skips_the_vision_tower(counted_runtime, default_bundle):
    image = DEFAULT / "examples" / EXAMPLES[2]["image"]
    chat = Conversation(counted_runtime)
    asked = chat.ask(EXAMPLES[2]["question"], [image])
    first = "".join(asked)
    assert not asked.timings.cache_hit
    follow_up = chat.ask("Is it a circle? Answer with one word.")
    second = "".join(follow_up)
    assert counted_runtime.vision.batches == [1]  # the tower ran once across two turns
    assert follow_up.timings.cache_hit and follow_up.timings.to_dict()["cache_hit"]
    # The same picture under another name is the same pixels: a hit too.
    copy = Path(shutil.copy(image, Path(default_bundle).parent / "same-image-copy.png"))
    again = counted_runtime.ask(copy, EXAMPLES[2]["question"]).run()
    assert counted_runtime.vision.batches == [1] and again.timings.cache_hit
    # And the cached answers are the answers of a runtime without a cache.
    uncached = Conversation(FtZRuntime(default_bundle, image_cache_mb=0))
    assert ["".join(uncached.ask(EXAMPLES[2]["question"], [image])),
            "".join(uncached.ask("Is it a circle? Answer with one word."))] == [first, second]
    assert uncached.runtime.image_cache.stats()["entries"] == 0


def test_several_images_each_get_their_own_block_in_order(counted_runtime):
    a, b = (DEFAULT / "examples" / EXAMPLES[i]["image"] for i in (0, 3))
    separate = [counted_runtime.encode_images([a])[0], counted_runtime.encode_images([b])[0]]
    counted_runtime.image_cache.clear()
    together = counted_runtime.encode_images([a, b])
    assert counted_runtime.vision.batches == [1, 1, 2]
    np.testing.assert_allclose(together[0], separate[0], atol=1e-4)
    np.testing.assert_allclose(together[1], separate[1], atol=1e-4)
    assert not np.allclose(together[0], together[1])
    # Only the image not yet cached runs through the tower, and the blocks stay in order.
    counted_runtime.image_cache.clear()
    counted_runtime.encode_images([b])
    timings = None
    from ftz_edge.runtime.engine import Timings
    timings = Timings()
    mixed = counted_runtime.encode_images([a, b], timings)
    assert counted_runtime.vision.batches[-2:] == [1, 1] and timings.images_from_cache == 1
    np.testing.assert_allclose(mixed[0], separate[0], atol=1e-4)
    np.testing.assert_allclose(mixed[1], separate[1], atol=1e-4)
    # The prompt holds one block of image tokens per image, spliced where each <image> stands.
    messages = [{"role": "user", "content": "<image>\n<image>\nWhich one is red?"}]
    ids = counted_runtime.encode_prompt(messages)
    embeds = counted_runtime.splice(ids, mixed)
    n = counted_runtime.num_image_tokens
    assert embeds.shape[0] == len(ids) and ids.count(prompt.IMAGE_TOKEN_ID) == 2 * n  # each image: its n positions
    first = ids.index(prompt.IMAGE_TOKEN_ID)
    np.testing.assert_array_equal(embeds[first:first + n], mixed[0].astype(embeds.dtype))
    second = ids.index(prompt.IMAGE_TOKEN_ID, first + n)
    assert second > first + n and ids[second:second + n] == [prompt.IMAGE_TOKEN_ID] * n  # "\n" between them
    np.testing.assert_array_equal(embeds[second:second + n], mixed[1].astype(embeds.dtype))


def test_context_guard_counts_every_image(counted_runtime):
    image = DEFAULT / "examples" / EXAMPLES[0]["image"]
    count = counted_runtime.context_length // counted_runtime.num_image_tokens + 1
    messages = [{"role": "user", "content": "<image>\n" * count + "Describe them."}]
    with pytest.raises(ContextLengthError, match=f"{count} image"):
        list(counted_runtime.stream(messages, [image] * count))
    assert counted_runtime.vision.batches == []  # refused before any image was encoded


def test_warmup_runs_the_tower_and_decoder_once_and_changes_no_answer(counted_runtime, default_bundle):
    image = DEFAULT / "examples" / EXAMPLES[1]["image"]
    assert counted_runtime.warmup_ms is None
    milliseconds = counted_runtime.warmup()
    assert milliseconds == counted_runtime.warmup_ms > 0
    assert counted_runtime.vision.batches == [1] and len(counted_runtime.image_cache) == 0  # the blank is not cached
    warm = FtZRuntime(default_bundle, warmup=True)
    assert warm.warmup_ms is not None
    assert warm.answer(image, EXAMPLES[1]["question"]) == counted_runtime.answer(image, EXAMPLES[1]["question"])


def test_image_cache_is_lru_within_its_byte_budget():
    from ftz_edge.runtime.image_cache import ImageEmbeddingCache

    block = np.zeros((4, 8), np.float32)  # 128 bytes
    cache = ImageEmbeddingCache(max_bytes=3 * block.nbytes)
    for key in "abc":
        cache.put(key, block + ord(key))
    assert cache.get("a") is not None  # a is now the most recent; b the least
    cache.put("d", block)
    assert cache.get("b") is None and {k for k in "acd" if cache.get(k) is not None} == set("acd")
    assert cache.bytes == 3 * block.nbytes and len(cache) == 3
    cache.put("huge", np.zeros((100, 8), np.float32))  # over the whole budget: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    off = ImageEmbeddingCache(0)
    off.put("a", block)
    assert not off.enabled and off.get("a") is None
    with pytest.raises(ValueError, match=">= 0 bytes"):
        ImageEmbeddingCache(-1)


# -- the device path: TensorRT engines (against tests/fakes_tensorrt.py) and provider lists ----------

def test_an_unusable_tensorrt_engine_falls_back_to_onnxruntime(default_bundle, tmp_path, monkeypatch, capsys):
    """A file TensorRT cannot deserialize (here: zeros) goes through the real TensorRTVision."""
    install(monkeypatch)

    def zero_engine(manifest):
        manifest["vision"]["engine"] = "trt"
        manifest["vision"]["tensorrt"] = {"file": "vision/vision.engine", "record": {}}

    bundle = copy_bundle(default_bundle, tmp_path / "bundle", zero_engine, {"vision/vision.engine": b"\0" * 4096})
    runtime = FtZRuntime(bundle)
    assert runtime.vision.name == "onnxruntime"
    err = capsys.readouterr().err
    assert "TensorRT engine not used" in err and "could not deserialize" in err
    with pytest.raises(RuntimeError, match="could not deserialize .*another GPU"):
        FtZRuntime(bundle, vision_backend="tensorrt")


@pytest.fixture
def engine_bundle(default_bundle, tmp_path, monkeypatch):
    """The default bundle with an engine built from its vision graph (profile batches 1..2); the fake
    engine computes with that graph, so its answers are the ONNX path's."""
    trt, cuda = install(monkeypatch)
    bundle = copy_bundle(default_bundle, tmp_path / "bundle")
    add_engine(bundle, batch_min=1, batch_opt=1, batch_max=2)
    return bundle, cuda


def test_a_tensorrt_engine_answers_like_the_onnx_graph(engine_bundle, default_bundle):
    bundle, cuda = engine_bundle
    runtime = FtZRuntime(bundle, vision_backend="tensorrt")
    assert runtime.vision.name == "tensorrt" and runtime.backends["vision"] == "tensorrt (TensorRT engine)"
    assert runtime.vision.num_tokens == runtime.num_image_tokens
    reference = FtZRuntime(default_bundle)
    image, question = DEFAULT / "examples" / EXAMPLES[0]["image"], EXAMPLES[0]["question"]
    assert runtime.answer(image, question) == reference.answer(image, question)
    assert FtZRuntime(bundle).vision.name == "tensorrt"  # auto picks the engine where it loads
    assert cuda.live == []


def test_more_images_than_the_engine_profile_takes(engine_bundle, default_bundle):
    """Three uncached images, profile batch_max 2: the engine gets batches of 2 and 1, in order."""
    bundle, cuda = engine_bundle
    runtime = FtZRuntime(bundle, vision_backend="tensorrt")
    images = [DEFAULT / "examples" / EXAMPLES[i]["image"] for i in (0, 1, 3)]
    blocks = runtime.encode_images(images)
    batches = [dims[0] for name, dims in runtime.vision.context.input_shapes_set if name == "anchor_pixels"]
    assert batches == [2, 1]
    expected = FtZRuntime(default_bundle, image_cache_mb=0).encode_images(images)
    for got, want in zip(blocks, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    messages = [{"role": "user", "content": "<image>\n<image>\n<image>\nWhich one is red?"}]
    assert "".join(runtime.stream(messages, images, GenerationConfig(max_new_tokens=4))) is not None
    assert cuda.live == []


def test_decoders_never_get_the_tensorrt_provider(default_bundle, tmp_path, monkeypatch):
    """ORT's TensorRT provider has no GroupQueryAttention / MatMulNBits: a CUDA-built decoder gets
    CUDA + CPU even where TensorRT is the vision graph's first choice."""
    import onnxruntime

    from ftz_edge.runtime.vision import provider_plan

    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    plan = provider_plan("cuda", available=everything)
    assert plan.vision == everything and plan.decoder == everything[1:]
    assert provider_plan("cpu", available=everything).decoder == ["CPUExecutionProvider"]
    assert provider_plan("cuda", ["TensorrtExecutionProvider"], everything).decoder == everything[1:]
    assert provider_plan("cuda", ["CPUExecutionProvider"], everything).decoder == ["CPUExecutionProvider"]
    assert provider_plan("cuda", available=["CPUExecutionProvider"]).decoder == ["CPUExecutionProvider"]

    bundle = copy_bundle(default_bundle, tmp_path / "bundle", lambda m: m["llm"].update(execution_provider="cuda"))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(everything))
    sessions = []
    real = onnxruntime.InferenceSession

    def recording(model, sess_options=None, providers=None, **kwargs):
        sessions.append((Path(str(model)).parent.name, list(providers)))
        return real(model, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    runtime = FtZRuntime(bundle)
    assert dict(sessions) == {"vision": everything, "llm": everything[1:]}
    assert (runtime.providers.vision, runtime.providers.decoder) == (everything, everything[1:])


def test_manifest_image_tokens_must_match_the_graph(default_bundle, engine_bundle, tmp_path):
    from ftz_edge.manifest import BundleError

    def one_more(manifest):  # the manifest agrees with itself (count and recorded shape), not with the graph
        manifest["vision"]["num_image_tokens"] += 1
        manifest["vision"]["outputs"][0]["shape"][1] += 1

    tokens = FtZRuntime(default_bundle).num_image_tokens
    wrong = copy_bundle(default_bundle, tmp_path / "wrong", one_more)
    with pytest.raises(BundleError, match=f"manifest says {tokens + 1} image tokens per image but "
                                          f"vision/vision.onnx outputs {tokens}"):
        FtZRuntime(wrong)
    wrong_engine = copy_bundle(engine_bundle[0], tmp_path / "wrong-engine", one_more)
    with pytest.raises(BundleError, match=f"but vision/vision.engine outputs {tokens}"):
        FtZRuntime(wrong_engine, vision_backend="tensorrt")
