"""The on-device runtime: a bundle in, streamed answers about images out (torch-free).

It imports numpy, Pillow, onnxruntime, tokenizers and Jinja2 (through ftz_edge.prompt), and
tensorrt + cuda-python only when a TensorRT engine is used. Never torch or transformers.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from ftz_edge import prompt
from ftz_edge.manifest import BundleError, VisionSection, read_manifest
from ftz_edge.preprocess import encoder_pixels
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


class Generation:
    """One request's answer, owned by that request (``FtZRuntime.stream`` returns one).

    Iterate it for the answer's text deltas (``for delta in runtime.stream(...)``); it is lazy:
    nothing runs, and a bad request raises nothing, until the first ``next()``. As it runs it
    fills, for this request only:

    * ``text``: the deltas so far, joined (the whole answer once finished);
    * ``tokens``: the generated token ids so far (EOS excluded);
    * ``timings``: a ``Timings``, complete once finished;
    * ``finish_reason``: None while it runs; "stop" (EOS or a stop string) or "length"
      (max_new_tokens, or the context, reached) once it finished; "cancelled" when it was closed
      (``close()``, or a ``with`` block left) before finishing. A generation that raised keeps None
      (the exception is the answer) and ``error`` holds the exception.

    A cancelled generation keeps the tokens, text and timings it had reached (``timings.new_tokens``
    and ``total_ms`` up to the close) and yields nothing more. ``add_done_callback(fn)`` calls
    ``fn(generation)`` once it finishes ("stop" or "length"), never when cancelled or failed.

    ``steps(generation)`` makes the iterator of deltas; it fills ``tokens``/``timings`` and sets
    ``finish_reason`` as its very last act (test doubles can build a Generation the same way).
    """

    def __init__(self, steps: Callable[["Generation"], Iterator[str]]):
        self.text = ""
        self.tokens: List[int] = []
        self.timings = Timings()
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self._callbacks: List[Callable[["Generation"], None]] = []
        self._steps = steps(self)  # a generator: its body runs on the first next()

    @property
    def finished(self) -> bool:
        """It ran to its end ("stop" or "length")."""
        return self.finish_reason in ("stop", "length")

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        if self.error is not None:  # it failed: asking again gives the same error, not a quiet end
            raise self.error
        if self.finish_reason is not None:
            raise StopIteration
        try:
            delta = next(self._steps)
        except StopIteration:
            if self.finish_reason is None:
                self.finish_reason = "stop"
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:  # outside the try: a callback's error is its own, not the request's
                callback(self)
            raise
        except BaseException as err:
            self.error = err
            raise
        self.text += delta
        return delta

    def run(self) -> "Generation":
        """Run to the end; returns this generation (raises the request's error, also when run again)."""
        for _ in self:
            pass
        return self

    def close(self) -> None:
        """Stop it where it is: finish_reason becomes "cancelled" unless it had finished or failed."""
        self._steps.close()
        if self.finish_reason is None and self.error is None:
            self.finish_reason = "cancelled"

    def add_done_callback(self, callback: Callable[["Generation"], None]) -> None:
        if self.finished:
            callback(self)
        else:
            self._callbacks.append(callback)

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


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
        vision, llm, self.prompt_spec = self.manifest.vision, self.manifest.llm, self.manifest.prompt
        self.tokenizer = Tokenizer.from_file(str(self.bundle / self.prompt_spec.tokenizer))
        self.anchor_spec = self.manifest.preprocess.anchor
        self.augmenter_spec = self.manifest.preprocess.augmenter
        # One rule for both sessions (ftz-doctor tests the same lists): never TensorRT for the decoder.
        self.providers = provider_plan(llm.execution_provider, providers)
        self.vision = self._vision_backend(vision, vision_backend, self.providers.vision)
        self.num_image_tokens = vision.num_image_tokens
        self._check_image_tokens(vision)
        self.decoder = OnnxDecoder(self.bundle / llm.folder, model_file=llm.file, embeddings_file=llm.embeddings,
                                   providers=self.providers.decoder, min_onnxruntime=llm.min_onnxruntime)
        self.context_length = min(self.prompt_spec.max_length, llm.context_length)
        self.eos_token_ids = set(self.prompt_spec.eos_token_ids)
        # The bundle's identity in cache keys: its manifest holds every file's sha256.
        manifest_digest = hashlib.sha256((self.bundle / "manifest.json").read_bytes()).hexdigest()
        self.identity = f"{manifest_digest}:{self.vision.name}"
        self.image_cache = ImageEmbeddingCache(int(image_cache_mb * (1 << 20)))
        self.warmup_ms: Optional[float] = None
        if warmup:
            self.warmup()

    def _vision_backend(self, vision: VisionSection, requested: str, providers):
        engine = vision.tensorrt
        if requested not in ("auto", "onnxruntime", "tensorrt"):
            raise ValueError(f"vision backend must be auto, onnxruntime or tensorrt, got {requested!r}")
        if requested == "tensorrt" and engine is None:
            raise ValueError(f"bundle {self.bundle} has no TensorRT engine; export it with ftz-export --engine trt")
        if engine is not None and requested in ("auto", "tensorrt"):
            try:
                return TensorRTVision(self.bundle / engine.file)
            except (ImportError, RuntimeError) as err:  # no TensorRT here, or an engine built for another GPU/version
                if requested == "tensorrt":
                    raise
                print(f"ftz-edge: warning: TensorRT engine not used ({err}); running the vision ONNX on onnxruntime",
                      file=sys.stderr)
        # An INT8 bundle's CPU form on a CPU-only provider list, its Q/DQ graph otherwise.
        self.vision_file = vision_file(vision, providers)
        return OrtVision(self.bundle / self.vision_file, providers)

    def _check_image_tokens(self, vision: VisionSection) -> None:
        """The manifest's image-token count sizes the context and the splice: it must be what the
        vision graph emits wherever the graph states a static count."""
        emitted = getattr(self.vision, "num_tokens", None)
        if emitted is not None and emitted != self.num_image_tokens:
            source = (vision.tensorrt.file if self.vision.name == "tensorrt" and vision.tensorrt is not None
                      else getattr(self, "vision_file", vision.file))
            raise BundleError(f"bundle {self.bundle}: the manifest says {self.num_image_tokens} image tokens per image "
                              f"but {source} outputs {emitted}; the manifest does not describe this graph: re-export "
                              "the bundle")

    @property
    def backends(self) -> Dict[str, str]:
        return {"vision": f"{self.vision.name} ({self.vision.provider})", "llm": f"onnxruntime ({self.decoder.provider})",
                "vision_precision": self.manifest.vision.precision, "llm_precision": self.manifest.llm.precision}

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
        ids = self.encode_prompt([prompt.user_turn_with_image("Describe the image.")])  # its image: N positions
        logits, cache = self.decoder.forward(self.splice(ids, image_embeds)[None], self.decoder.empty_cache())
        choose = TokenChooser(GenerationConfig(max_new_tokens=2))  # its first random generator costs ~10 ms
        for _ in range(2):
            logits, cache = self.decoder.forward(self.decoder.embed([choose(logits[0], [t for t in ids if t >= 0])])[None], cache)
        self.warmup_ms = (time.perf_counter() - start) * 1e3
        return self.warmup_ms

    def encode_prompt(self, messages: Sequence[dict]) -> List[int]:
        """The prompt's token ids, each ``<image>`` as ``num_image_tokens`` IMAGE_TOKEN_IDs: one id
        per embedding the decoder gets, so the prompt is ``len(ids)`` tokens."""
        text = prompt.render_chat(messages, self.prompt_spec.chat_template,
                                  {"bos_token": self.prompt_spec.bos_token, "eos_token": self.prompt_spec.eos_token})
        return prompt.tokenize(text, self.tokenizer, num_image_tokens=self.num_image_tokens)

    def splice(self, ids: Sequence[int], image_embeds) -> np.ndarray:
        """Token ids (``encode_prompt``'s) -> (T, D) embeddings: text ids looked up, each image's
        block scattered into its IMAGE_TOKEN_ID positions, images in order (``image_embeds``: an
        (images, tokens, D) array, a list of (tokens, D) blocks, or None)."""
        return prompt.splice_image_embeddings(ids, image_embeds, self.decoder.embed, self.num_image_tokens)

    # -- answering ------------------------------------------------------------------------
    def stream(self, messages: Sequence[dict], images: Sequence = (), config: Optional[GenerationConfig] = None) -> Generation:
        """The answer to ``messages`` (with ``images`` for their ``<image>`` placeholders, in
        order) as a ``Generation``: iterate it for the text deltas; it carries this request's
        tokens, timings and finish reason. Lazy: a bad request (placeholders and images that do
        not match, a prompt past the context, an unreadable image) raises on the first ``next()``."""
        return Generation(lambda generation: self._generate(generation, messages, images, config))

    def _generate(self, generation: Generation, messages: Sequence[dict], images: Sequence,
                  config: Optional[GenerationConfig]) -> Iterator[str]:
        config = config or GenerationConfig()
        timings = generation.timings
        start = time.perf_counter()
        placeholders = prompt.count_images(messages)
        if placeholders != len(images):
            raise ValueError(f"the conversation has {placeholders} <image> placeholders but {len(images)} images were given")
        ids = self.encode_prompt(messages)  # each image already its num_image_tokens positions
        room = self.context_length - len(ids)
        if room < 1:
            raise ContextLengthError(
                f"the prompt needs {len(ids)} tokens ({placeholders} image(s) x {self.num_image_tokens} + text) "
                f"but the context holds {self.context_length}; shorten the conversation or use fewer images")
        max_new = config.max_new_tokens
        if max_new > room:
            timings.notes.append(f"max_new_tokens {max_new} trimmed to {room} to fit the {self.context_length}-token context")
            max_new = room
        image_embeds = self.encode_images(images, timings) if images else None
        embeds = self.splice(ids, image_embeds)
        timings.prompt_tokens = embeds.shape[0]

        prefill_start = time.perf_counter()
        # The cache is allocated once, for the whole request: the prompt and every token it may add.
        logits, cache = self.decoder.forward(embeds[None], self.decoder.empty_cache(capacity=len(ids) + max_new))
        timings.prefill_ms = (time.perf_counter() - prefill_start) * 1e3
        choose, stops = TokenChooser(config), StopChecker(config.stop)
        history = [t for t in ids if t >= 0]  # the text ids (image positions are no tokens to penalise)
        generated = generation.tokens
        detokenizer = _IncrementalDetokenizer(self.tokenizer)
        emitted = ""
        decode_start = None
        finish_reason = "length"
        try:
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
        finally:  # also when closed early or failed: the timings up to here
            end = time.perf_counter()
            timings.new_tokens = len(generated)
            timings.decode_ms = (end - decode_start) * 1e3 if decode_start else 0.0
            if timings.new_tokens > 1 and timings.decode_ms > 0:
                timings.decode_tokens_per_s = (timings.new_tokens - 1) / (timings.decode_ms / 1e3)
            timings.total_ms = (end - start) * 1e3
            timings.peak_rss_mb = peak_rss_mb()
            timings.gpu_memory_used_mb = gpu_memory_used_mb() if self.decoder.device == "cuda" else None
        generation.finish_reason = finish_reason  # last: finish_reason set means finished

    def ask(self, image, question: str, config: Optional[GenerationConfig] = None) -> Generation:
        """One image (or None), one question, as a ``Generation`` (not started)."""
        return self.stream([prompt.user_turn_with_image(question)], [image] if image is not None else [], config)

    def answer(self, image, question: str, config: Optional[GenerationConfig] = None) -> str:
        """One image, one question: the whole answer's text (``ask(...).run()`` for its tokens and timings)."""
        return self.ask(image, question, config).run().text


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
        self._pending: Optional[Generation] = None

    def ask(self, question: str, images: Sequence = (), config: Optional[GenerationConfig] = None) -> Generation:
        """The next turn's answer as a ``Generation`` (iterate it for the deltas). Only a turn
        that finishes joins the history: one that fails or is closed early leaves the
        conversation as it was. One turn at a time: asking again while the last turn's
        generation is unfinished closes that one (a new question supersedes an abandoned answer,
        as in a chat window), so the history never depends on which finishes first."""
        if self._pending is not None:
            self._pending.close()  # a no-op once it finished or failed
        images = list(images)
        placeholders = "".join(f"{prompt.IMAGE_PLACEHOLDER}\n" for _ in images)
        turn = {"role": "user", "content": placeholders + question}

        def completed(generation: Generation) -> None:
            self.messages += [turn, {"role": "assistant", "content": generation.text.strip() or "(no answer)"}]
            self.images += images

        generation = self.runtime.stream(self.messages + [turn], self.images + images, config)
        generation.add_done_callback(completed)
        self._pending = generation
        return generation
