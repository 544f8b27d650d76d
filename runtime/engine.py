"""The on-device runtime: a bundle in, streamed answers about images out (torch-free).

It imports numpy, Pillow, onnxruntime, tokenizers and Jinja2 (through ftz_edge.prompt), and
tensorrt + cuda-python only when a TensorRT engine is used. Never torch or transformers.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from ftz_edge import prompt
from ftz_edge.manifest import BundleError, read_manifest
from ftz_edge.preprocess import ImageProcessorSpec, encoder_pixels
from ftz_edge.runtime import device
from ftz_edge.runtime.decoder import OnnxDecoder
from ftz_edge.runtime.generation import GenerationConfig, StopChecker, TokenChooser
from ftz_edge.runtime.image_cache import ImageEmbeddingCache, image_key
from ftz_edge.runtime.vision import OrtVision, TensorRTVision, provider_plan, vision_file


class ContextLengthError(ValueError):
    """The prompt (text + image tokens) does not fit the model's context."""


@dataclass
class Timings:
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    decode_ms: float = 0.0
    prompt_tokens: int = 0
    images: int = 0
    images_from_cache: int = 0  # served by the image-embedding cache: the vision tower skipped them
    new_tokens: int = 0
    decode_tokens_per_s: float = 0.0
    total_ms: float = 0.0
    peak_rss_mb: Optional[float] = None
    gpu_memory_used_mb: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    @property
    def cache_hit(self) -> bool:
        """Every image of the request came from the cache (no vision-tower run)."""
        return self.images > 0 and self.images_from_cache == self.images

    def to_dict(self) -> dict:
        return {**asdict(self), "cache_hit": self.cache_hit}

    @classmethod
    def from_dict(cls, data: dict) -> "Timings":
        return cls(**{k: v for k, v in data.items() if k != "cache_hit"})  # cache_hit is derived

    def summary(self) -> str:
        vision = f"vision {self.vision_ms:.1f} ms"
        if self.images_from_cache:
            vision += f" ({self.images_from_cache}/{self.images} image(s) from cache)"
        parts = [f"preprocess {self.preprocess_ms:.1f} ms", vision,
                 f"prefill {self.prefill_ms:.1f} ms ({self.prompt_tokens} tokens)",
                 f"first token {self.time_to_first_token_ms:.1f} ms",
                 f"decode {self.decode_tokens_per_s:.1f} tok/s ({self.new_tokens} tokens)"]
        if self.peak_rss_mb is not None:
            parts.append(f"peak RSS {self.peak_rss_mb:.0f} MB")
        if self.gpu_memory_used_mb is not None:
            parts.append(f"GPU memory {self.gpu_memory_used_mb:.0f} MB")
        return ", ".join(parts)


def peak_rss_mb() -> Optional[float]:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def gpu_memory_used_mb() -> Optional[float]:
    memory = device.gpu_free_memory(use_nvidia_smi=False)  # None without cuda-python or a GPU: unknown, not an error
    return None if memory is None else (memory["total"] - memory["free"]) / (1 << 20)


class FtZRuntime:
    """A loaded bundle. ``image_cache_mb`` bounds the image-embedding cache (0 turns it off);
    ``warmup`` runs the vision tower and a short prefill + decode at load, so the first real
    request costs what later ones do (ONNX Runtime and TensorRT allocate and pick kernels on the
    first run)."""

    def __init__(self, bundle, providers: Optional[Sequence[str]] = None, vision_backend: str = "auto",
                 verify: bool = True, image_cache_mb: float = 256.0, warmup: bool = False):
        import hashlib

        from tokenizers import Tokenizer

        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle, verify=verify)
        vision, llm, self.prompt_spec = self.manifest["vision"], self.manifest["llm"], self.manifest["prompt"]
        self.tokenizer = Tokenizer.from_file(str(self.bundle / self.prompt_spec["tokenizer"]))
        specs = self.manifest["preprocess"]
        self.anchor_spec = ImageProcessorSpec.from_dict(specs["anchor"])
        self.augmenter_spec = ImageProcessorSpec.from_dict(specs["augmenter"]) if specs["augmenter"] else None
        # One rule for both sessions (ftz-doctor tests the same lists): never TensorRT for the decoder.
        self.providers = provider_plan(llm["execution_provider"], providers)
        self.vision = self._vision_backend(vision, vision_backend, self.providers.vision)
        self.num_image_tokens = vision["num_image_tokens"]
        self._check_image_tokens(vision)
        self.decoder = OnnxDecoder(self.bundle / llm["folder"], model_file=llm["file"], embeddings_file=llm["embeddings"],
                                   providers=self.providers.decoder, min_onnxruntime=llm.get("min_onnxruntime"))
        self.context_length = min(self.prompt_spec["max_length"], llm["context_length"])
        self.eos_token_ids = set(self.prompt_spec["eos_token_ids"])
        self.last_timings: Optional[Timings] = None
        self.last_tokens: List[int] = []
        self.last_finish_reason: Optional[str] = None  # "stop" (EOS or a stop string) or "length"
        # The bundle's identity in cache keys: its manifest holds every file's sha256.
        manifest_digest = hashlib.sha256((self.bundle / "manifest.json").read_bytes()).hexdigest()
        self.identity = f"{manifest_digest}:{self.vision.name}"
        self.image_cache = ImageEmbeddingCache(int(image_cache_mb * (1 << 20)))
        self.warmup_ms: Optional[float] = None
        if warmup:
            self.warmup()

    def _vision_backend(self, vision: dict, requested: str, providers):
        engine = vision.get("tensorrt")
        if requested not in ("auto", "onnxruntime", "tensorrt"):
            raise ValueError(f"vision backend must be auto, onnxruntime or tensorrt, got {requested!r}")
        if requested == "tensorrt" and not engine:
            raise ValueError(f"bundle {self.bundle} has no TensorRT engine; export it with ftz-export --engine trt")
        if engine and requested in ("auto", "tensorrt"):
            try:
                return TensorRTVision(self.bundle / engine["file"])
            except (ImportError, RuntimeError) as err:  # no TensorRT here, or an engine built for another GPU/version
                if requested == "tensorrt":
                    raise
                print(f"ftz-edge: warning: TensorRT engine not used ({err}); running the vision ONNX on onnxruntime",
                      file=sys.stderr)
        # An INT8 bundle's CPU form on a CPU-only provider list, its Q/DQ graph otherwise.
        self.vision_file = vision_file(vision, providers)
        return OrtVision(self.bundle / self.vision_file, providers)

    def _check_image_tokens(self, vision: dict) -> None:
        """The manifest's image-token count sizes the context and the splice: it must be what the
        vision graph emits wherever the graph states a static count."""
        emitted = getattr(self.vision, "num_tokens", None)
        if emitted is not None and emitted != self.num_image_tokens:
            source = ((vision.get("tensorrt") or {}).get("file") if self.vision.name == "tensorrt"
                      else getattr(self, "vision_file", vision["file"]))
            raise BundleError(f"bundle {self.bundle}: the manifest says {self.num_image_tokens} image tokens per image "
                              f"but {source} outputs {emitted}; the manifest does not describe this graph: re-export "
                              "the bundle")

    @property
    def backends(self) -> Dict[str, str]:
        return {"vision": f"{self.vision.name} ({self.vision.provider})", "llm": f"onnxruntime ({self.decoder.provider})",
                "vision_precision": self.manifest["vision"]["precision"], "llm_precision": self.manifest["llm"]["precision"]}

    # -- pieces ---------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> Dict[str, np.ndarray]:
        return encoder_pixels(images, self.anchor_spec, self.augmenter_spec)

    def encode_images(self, images: Sequence, timings: Optional[Timings] = None) -> List[np.ndarray]:
        """Images -> one (tokens, width) embedding block each, in order. Images already in the
        cache skip the vision tower; the others go to it together (a TensorRT backend splits them
        into batches its engine's profile accepts)."""
        timings = timings if timings is not None else Timings()
        start = time.perf_counter()
        pixels = self.preprocess(images)
        keys = [image_key(pixels, i, self.identity) for i in range(len(images))] if self.image_cache.enabled else []
        blocks: List[Optional[np.ndarray]] = [self.image_cache.get(key) for key in keys] or [None] * len(images)
        timings.preprocess_ms = (time.perf_counter() - start) * 1e3
        missing = [i for i, block in enumerate(blocks) if block is None]
        if missing:
            vision_start = time.perf_counter()
            batch = pixels if len(missing) == len(images) else {name: array[missing] for name, array in pixels.items()}
            embeds = self.vision(batch)
            timings.vision_ms = (time.perf_counter() - vision_start) * 1e3
            for row, i in enumerate(missing):
                blocks[i] = embeds[row]
                if keys:
                    self.image_cache.put(keys[i], embeds[row])
        timings.images = len(images)
        timings.images_from_cache = len(images) - len(missing)
        return blocks

    def warmup(self) -> float:
        """Run the vision tower and a short prefill + 2 decode steps once on a blank image
        (not cached); returns the milliseconds it took (also in ``warmup_ms``)."""
        import io

        from PIL import Image

        start = time.perf_counter()
        blank = Image.new("RGB", (self.anchor_spec.crop_width, self.anchor_spec.crop_height), (128, 128, 128))
        # Through the decoders real requests use (PNG and JPEG bytes): Pillow loads its format
        # plugins and codecs on first use, some tens of milliseconds.
        encoded = []
        for image_format in ("PNG", "JPEG"):
            buffer = io.BytesIO()
            blank.save(buffer, format=image_format)
            encoded.append(buffer.getvalue())
        pixels = self.preprocess(encoded)
        image_embeds = self.vision({name: array[:1] for name, array in pixels.items()})
        ids = self.encode_prompt([prompt.user_turn_with_image("Describe the image.")])
        logits, cache = self.decoder.forward(self.splice(ids, image_embeds)[None], self.decoder.empty_cache())
        choose = TokenChooser(GenerationConfig(max_new_tokens=2))  # its first random generator costs ~10 ms
        for _ in range(2):
            logits, cache = self.decoder.forward(self.decoder.embed([choose(logits[0], [t for t in ids if t >= 0])])[None], cache)
        self.warmup_ms = (time.perf_counter() - start) * 1e3
        return self.warmup_ms

    def encode_prompt(self, messages: Sequence[dict]) -> List[int]:
        text = prompt.render_chat(messages, self.prompt_spec["chat_template"],
                                  {"bos_token": self.prompt_spec["bos_token"], "eos_token": self.prompt_spec["eos_token"]})
        return prompt.tokenize(text, self.tokenizer)

    def splice(self, ids: Sequence[int], image_embeds: Optional[np.ndarray]) -> np.ndarray:
        """Token ids with IMAGE_TOKEN_ID sentinels -> (T, D) embeddings, images in order."""
        pieces, start, next_image = [], 0, 0
        ids = list(ids)
        for position, token in enumerate(ids):
            if token == prompt.IMAGE_TOKEN_ID:
                pieces += [self.decoder.embed(ids[start:position]), image_embeds[next_image].astype(self.decoder.embeds_dtype)]
                next_image += 1
                start = position + 1
        pieces.append(self.decoder.embed(ids[start:]))
        return np.concatenate(pieces, axis=0)

    # -- answering ------------------------------------------------------------------------
    def stream(self, messages: Sequence[dict], images: Sequence = (), config: Optional[GenerationConfig] = None) -> Iterator[str]:
        """Yield the answer as text deltas; ``last_timings`` holds the timings when it ends."""
        config = config or GenerationConfig()
        timings = Timings()
        start = time.perf_counter()
        placeholders = prompt.count_images(messages)
        if placeholders != len(images):
            raise ValueError(f"the conversation has {placeholders} <image> placeholders but {len(images)} images were given")
        ids = self.encode_prompt(messages)
        prompt_tokens = len(ids) + placeholders * (self.num_image_tokens - 1)
        room = self.context_length - prompt_tokens
        if room < 1:
            raise ContextLengthError(
                f"the prompt needs {prompt_tokens} tokens ({placeholders} image(s) x {self.num_image_tokens} + text) "
                f"but the context holds {self.context_length}; shorten the conversation or use fewer images")
        max_new = config.max_new_tokens
        if max_new > room:
            timings.notes.append(f"max_new_tokens {max_new} trimmed to {room} to fit the {self.context_length}-token context")
            max_new = room
        image_embeds = self.encode_images(images, timings) if images else None
        embeds = self.splice(ids, image_embeds)
        timings.prompt_tokens = embeds.shape[0]

        prefill_start = time.perf_counter()
        logits, cache = self.decoder.forward(embeds[None], self.decoder.empty_cache())
        timings.prefill_ms = (time.perf_counter() - prefill_start) * 1e3
        choose, stops = TokenChooser(config), StopChecker(config.stop)
        history = [t for t in ids if t >= 0]
        generated: List[int] = []
        detokenizer = _IncrementalDetokenizer(self.tokenizer)
        emitted = ""
        decode_start = None
        finish_reason = "length"
        while True:
            token = choose(logits[0], history + generated)
            if not generated:
                timings.time_to_first_token_ms = (time.perf_counter() - start) * 1e3
                decode_start = time.perf_counter()
            if token in self.eos_token_ids:
                finish_reason = "stop"
                break
            generated.append(token)
            text = detokenizer.push(token)  # == decode(generated), without re-decoding it all per token
            cut = stops.cut(text)
            if cut is not None:
                text = text[:cut]
            # Hold back a partial UTF-8 character, then a possible start of a stop string in what
            # is left (looked for past the partial character, a stop string running on into it
            # would be streamed before it is recognised).
            settled = text[:-1] if text.endswith("\ufffd") else text
            ready = settled if cut is not None else settled[: len(settled) - stops.holdback(settled)]
            if len(ready) > len(emitted) and ready.startswith(emitted):
                yield ready[len(emitted):]
                emitted = ready
            if cut is not None:
                finish_reason = "stop"
                break
            if len(generated) >= max_new:
                break
            logits, cache = self.decoder.forward(self.decoder.embed([token])[None], cache)
        final = self.tokenizer.decode(generated, skip_special_tokens=True)
        cut = stops.cut(final)
        final = final[:cut] if cut is not None else final
        if final.startswith(emitted) and len(final) > len(emitted):
            yield final[len(emitted):]
        end = time.perf_counter()
        timings.new_tokens = len(generated)
        timings.decode_ms = (end - decode_start) * 1e3 if decode_start else 0.0
        if timings.new_tokens > 1 and timings.decode_ms > 0:
            timings.decode_tokens_per_s = (timings.new_tokens - 1) / (timings.decode_ms / 1e3)
        timings.total_ms = (end - start) * 1e3
        timings.peak_rss_mb = peak_rss_mb()
        timings.gpu_memory_used_mb = gpu_memory_used_mb() if self.decoder.device == "cuda" else None
        self.last_timings = timings
        self.last_tokens = generated
        self.last_finish_reason = finish_reason

    def answer(self, image, question: str, config: Optional[GenerationConfig] = None) -> str:
        """One image, one question: the whole answer (``last_timings`` has the timings)."""
        return "".join(self.stream([prompt.user_turn_with_image(question)], [image] if image is not None else [], config))


class _IncrementalDetokenizer:
    """The text of the answer so far, token by token, equal to ``tokenizer.decode(ids,
    skip_special_tokens=True)`` of all of them, at a cost that does not grow with the answer.

    Each token decodes only a short window: the tokens since the last-but-one point where the text
    ended on a whole character (``context``, already known) plus the ones after it; the window's
    text past the context is appended. The text is committed only when it does not end in
    "\ufffd" (a UTF-8 character split across tokens); until then the pending part is returned on
    top of the committed text, just as a full decode shows it. This is the algorithm of tokenizers'
    ``decoders.DecodeStream``, written out because (a) its ``step`` returns None while a character
    is pending, whereas ``stream`` needs the full text (with its "\ufffd") every step to keep its
    stop-string and streaming behaviour exactly, and (b) in tokenizers 0.21.0 (the floor
    pyproject.toml declares and the device venv pins) ``DecodeStream.step`` panics on such a
    split character ("slice index starts at 18446744073709551615").
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.text = ""  # the text of ids[:read]
        self.prefix = 0  # the window starts here ...
        self.read = 0  # ... and ids[prefix:read], whose text is ``context``, only give it context
        self.context = ""

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        window = self._decode(self.ids[self.prefix:])
        if not window.startswith(self.context):  # a decoder whose text is not prefix-stable: decode all
            return self._decode(self.ids)
        new = window[len(self.context):]
        if new.endswith("\ufffd"):  # a character still incomplete: show it, commit nothing yet
            return self.text + new
        self.text += new
        self.prefix, self.read = self.read, len(self.ids)
        self.context = self._decode(self.ids[self.prefix:self.read])
        return self.text


class Conversation:
    """A multi-turn chat about one or more images with a runtime."""

    def __init__(self, runtime: FtZRuntime, system: Optional[str] = None):
        self.runtime = runtime
        self.messages: List[dict] = [{"role": "system", "content": system}] if system else []
        self.images: list = []

    def ask(self, question: str, images: Sequence = (), config: Optional[GenerationConfig] = None) -> Iterator[str]:
        placeholders = "".join(f"{prompt.IMAGE_PLACEHOLDER}\n" for _ in images)
        turn = {"role": "user", "content": placeholders + question}
        answer = []
        for delta in self.runtime.stream(self.messages + [turn], self.images + list(images), config):
            answer.append(delta)
            yield delta
        # Only a completed turn joins the history (an error above leaves the conversation as it was).
        self.messages += [turn, {"role": "assistant", "content": "".join(answer).strip() or "(no answer)"}]
        self.images += list(images)
