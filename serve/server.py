"""``ftz-serve``: a local OpenAI-compatible image chat API over a bundle (torch-free).

    ftz-serve                                    # the shipped default model, http://127.0.0.1:8000/v1
    ftz-serve --bundle out/bundle --api-key "$KEY" --allow-local-files /data/images

Endpoints: ``POST /v1/chat/completions`` (OpenAI Chat Completions with ``image_url`` content
parts, ``stream: true`` as server-sent events ending with ``[DONE]``), ``GET /v1/models`` and
``GET /health`` ("warming" until the model is loaded and warmed up, then "ready").

Built on the stack Gradio already brings: FastAPI (its SSE encoder; pydantic validates requests)
and uvicorn. One model instance answers one request at a time on a worker thread, so the event
loop stays free to take requests, to answer 429 when the bounded queue is full, and to notice a
client that went away (its generation then stops at the next token).

Bad input costs little and is answered, never a 500: the API key and the declared size are
checked before anything is read, the queue's 429 is decided from the headers before the body is
read, bodies are parsed one at a time (``parse_request``: any bytes give a parse or a 4xx), and
the bodies admitted are bounded in bytes (``--max-queued-mb``). A stop signal answers the waiting
requests 503 at once and gives the running one the grace period to finish.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, List, Optional, Sequence, Tuple
from urllib.parse import unquote, urlparse

import fastapi
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ftz_edge.prompt import UnencodableTextError, check_encodable
from ftz_edge.cli.args import OneLineParser, finite_float
from ftz_edge.runtime.generation import GenerationConfig, GenerationConfigError
from ftz_edge.serve.openai_api import (APIError, ChatCompletionRequest, ImagePart, chunk, completion,
                                         completion_id, error_body, models_list, read_request, usage_chunk,
                                         validation_message)

log = logging.getLogger("ftz_edge.serve")

MiB = 1 << 20
BODY_TIMEOUT_S = 60.0  # a client slower than this to send its body gets 408 and gives back its queue place


# ServeConfig fields whose ftz-serve option is not simply --the-field-name.
CLI_OPTION = {"max_request_bytes": "--max-request-mb", "max_queued_bytes": "--max-queued-mb", "providers": "--provider",
              "warmup": "--no-warmup"}


def option(name: str) -> str:
    """A ServeConfig field as errors name it: ``default_temperature (--default-temperature)``."""
    return f"{name} ({CLI_OPTION.get(name, '--' + name.replace('_', '-'))})"


@dataclass
class ServeConfig:
    """Everything ``ftz-serve`` is started with (``/v1/models`` reports the limits)."""

    bundle: Optional[str] = None  # None: the shipped default model's bundle
    host: str = "127.0.0.1"  # this machine only, unless asked
    port: int = 8000
    api_key: Optional[str] = None  # Bearer token required on /v1/* when set
    model_name: Optional[str] = None  # default: the bundle folder's name
    allow_local_files: List[str] = field(default_factory=list)  # folders file:// image URLs may read
    max_request_bytes: int = 20 * MiB  # base64 images make requests large; this bounds memory per request
    max_image_pixels: int = 16_000_000  # per image, checked before decoding (decompression bombs)
    max_images: int = 8  # per request, all messages together
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    # OpenAI's default temperature is 1; small VLMs answer best greedy, so 0 unless asked.
    default_temperature: float = 0.0
    queue_size: int = 8  # requests waiting behind the running one; more get 429
    # The bodies of admitted requests (waiting or running) together, by Content-Length; more get
    # 429. With one body parsed at a time, this bounds what requests hold in memory: large
    # base64 images fill it long before the queue is full (a request alone is always admitted).
    # None: 3 x max_request_bytes.
    max_queued_bytes: Optional[int] = None
    image_cache_mb: float = 256.0
    providers: Optional[List[str]] = None
    warmup: bool = True
    verify: bool = True  # check every bundle file's sha256 at load

    def validate(self) -> None:
        """Check every option before the server starts (a server that would refuse every request
        never starts); raises ValueError naming the option, as ``ftz-serve`` spells it."""
        self._validate_numbers()
        self._validate_text_and_places()

    def _validate_numbers(self) -> None:
        for name in ("max_request_bytes", "max_image_pixels", "max_images", "max_tokens_limit", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{option(name)} must be >= 1, got {getattr(self, name)}")
        if self.queue_size < 0:
            raise ValueError(f"{option('queue_size')} must be >= 0, got {self.queue_size}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"{option('port')} must be in 0..65535, got {self.port}")
        if self.max_queued_bytes is not None and self.max_queued_bytes < self.max_request_bytes:
            raise ValueError(f"{option('max_queued_bytes')} {self.max_queued_bytes / MiB:g} MiB is below "
                             f"{option('max_request_bytes')} {self.max_request_bytes / MiB:g} MiB")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"{option('default_max_tokens')} {self.default_max_tokens} is above "
                             f"{option('max_tokens_limit')} {self.max_tokens_limit}")
        # The range a request may ask for (OpenAI's): a default outside it is a mistake, not a choice.
        if not (math.isfinite(self.default_temperature) and 0 <= self.default_temperature <= 2):
            raise ValueError(f"{option('default_temperature')} must be in [0, 2], got {self.default_temperature}")
        if not (math.isfinite(self.image_cache_mb) and self.image_cache_mb >= 0):
            raise ValueError(f"{option('image_cache_mb')} must be >= 0 (0 turns the cache off), got {self.image_cache_mb}")

    def _validate_text_and_places(self) -> None:
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()
                                             and self.api_key and " " not in self.api_key):
            raise ValueError(f"{option('api_key')} must be printable ASCII without spaces (it travels in an HTTP header)")
        for name in ("host", "model_name"):  # the model name is in every answer: it must encode as UTF-8
            if getattr(self, name) is not None:
                if not getattr(self, name):
                    raise ValueError(f"{option(name)} must not be empty")
                check_encodable(getattr(self, name), option(name))
        if self.model_name is None and self.bundle is not None:
            check_encodable(Path(self.bundle).name, "the bundle folder's name (the model id clients see: "
                                                    "give --model-name)")
        for folder in self.allow_local_files:
            if not Path(folder).is_dir():
                raise ValueError(f"--allow-local-files {folder}: not a folder")
        if self.providers:
            from ftz_edge.runtime.vision import choose_providers

            choose_providers(self.providers)  # a provider this onnxruntime lacks: its ValueError says which

    def queued_bytes_limit(self) -> int:
        return 3 * self.max_request_bytes if self.max_queued_bytes is None else self.max_queued_bytes

    def limits(self) -> dict:
        return {**{k: v for k, v in asdict(self).items()
                   if k in ("max_request_bytes", "max_image_pixels", "max_images", "max_tokens_limit", "queue_size")},
                "max_queued_bytes": self.queued_bytes_limit()}


# ------------------------------------------------------------------------------ the model worker


class Job:
    """One queued request: its events flow from the worker thread to the request's task (the
    runtime's own per-request result is the ``Generation`` its stream returns)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, messages: List[dict], images: list, config, size: int = 0):
        self.loop, self.messages, self.images, self.config = loop, messages, images, config
        self.size = size  # its body's bytes, counted against max_queued_bytes until it is done
        self.events: "asyncio.Queue[tuple]" = asyncio.Queue()
        self.cancel = threading.Event()  # set when the client goes away (or the server stops it)
        self.checked_at = time.monotonic()  # when the connection was last looked at
        self.running = False  # taken by the worker (under the service's lock)
        self.stop_error: Optional[APIError] = None  # why the server stopped it, answered instead of the rest

    def push(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutting down): nobody is waiting any more
            pass


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry when it is back", kind="server_error",
                    code="shutting_down")


class ModelService:
    """The runtime, its single worker thread and the bounded queue in front of it."""

    def __init__(self, config: ServeConfig, runtime=None):
        self.config = config
        self.runtime = runtime
        self.state = "ready" if runtime is not None else "warming"
        self.load_error: Optional[str] = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftz-model")
        self._lock = threading.Lock()
        self.in_flight = 0  # running + waiting
        self.queued_bytes = 0  # their bodies' sizes, together
        # completed; cancelled (client left); invalid (a 4xx found while generating, e.g. the context);
        # failed (a 5xx: the backend broke); rejected (429, queue full); shut_down (503: queued or
        # running when the server was told to stop).
        self.counts = {"completed": 0, "cancelled": 0, "invalid": 0, "failed": 0, "rejected": 0, "shut_down": 0}
        self.live: set = set()  # admitted generations not finished yet (cancelled at shutdown)

    # -- loading --------------------------------------------------------------------------
    def load(self) -> None:
        from ftz_edge.runtime.engine import FtZRuntime

        try:
            runtime = FtZRuntime(self.config.bundle, providers=self.config.providers, verify=self.config.verify,
                                 image_cache_mb=self.config.image_cache_mb)
            if self.config.warmup:
                log.info("warm-up took %.0f ms", runtime.warmup())
        except Exception as err:  # reported by /health and the CLI; the server then stops
            self.load_error = f"{type(err).__name__}: {err}"
            self.state = "error"
            raise
        self.runtime, self.state = runtime, "ready"

    def require_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "stopping":
            raise shutting_down()
        if self.state == "error":
            raise APIError(503, f"the model failed to load: {self.load_error}", kind="server_error", code="model_load_failed")
        raise APIError(503, "the model is loading and warming up; retry shortly", kind="server_error",
                       code="model_warming", headers={"Retry-After": "1"})

    # -- the queue ------------------------------------------------------------------------
    def admit(self, size: int) -> None:
        """Take a place for a request whose body is ``size`` bytes, or raise a 429: the queue is
        full, or the admitted bodies would pass ``max_queued_bytes`` (a request alone always fits)."""
        with self._lock:
            if self.in_flight >= self.config.queue_size + 1:
                reason = f"{self.in_flight} request(s) running or queued (queue size {self.config.queue_size})"
            elif self.in_flight and self.queued_bytes + size > self.config.queued_bytes_limit():
                reason = (f"the {self.in_flight} request(s) running or queued hold {self.queued_bytes / MiB:.1f} MiB; "
                          f"with this one's {size / MiB:.1f} MiB that passes the limit of "
                          f"{self.config.queued_bytes_limit() / MiB:g} MiB")
            else:
                self.in_flight += 1
                self.queued_bytes += size
                return
            self.counts["rejected"] += 1
        raise APIError(429, f"the server is busy: {reason}; retry shortly", kind="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"})

    def release(self, size: int) -> None:
        """Give back an admission (its job is done, answered, or never reached the worker)."""
        with self._lock:
            self._release(size)

    def _release(self, size: int) -> None:  # under the lock
        self.in_flight -= 1
        self.queued_bytes -= size

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the worker (its admission is taken over: the worker gives it back)."""
        with self._lock:
            if self.state == "stopping":  # admitted, then a stop signal before it reached the queue
                self.counts["shut_down"] += 1  # answered 503 like a queued one, and counted like one
                raise shutting_down()
            self.live.add(job)
        try:
            self.executor.submit(self._run, job)
        except RuntimeError:  # the executor was shut down since the check above
            with self._lock:
                self.live.discard(job)
                self.counts["shut_down"] += 1
            raise shutting_down() from None

    def drain(self, grace_s: Optional[float] = 0.0) -> None:
        """Stop taking work (SIGTERM): new requests and every queued one are answered 503 at
        once; the running generation has ``grace_s`` seconds to finish (None: until
        ``shutdown``), then it is stopped and answered 503 too (streamed: an error event).
        Safe to call more than once."""
        with self._lock:
            self.state = "stopping"
            queued = [job for job in self.live if not job.running]
            for job in queued:  # answered here: the worker will skip them (see _claim)
                self.live.discard(job)
                self._release(job.size)
                self.counts["shut_down"] += 1
        for job in queued:
            job.cancel.set()
            job.push("error", shutting_down())
        if grace_s is None:
            return
        if grace_s > 0:
            timer = threading.Timer(grace_s, self.stop_running)
            timer.daemon = True
            timer.start()
        else:
            self.stop_running()

    def stop_running(self) -> None:
        """Stop the running generation at its next token; its client gets a 503."""
        with self._lock:
            running = list(self.live)
        for job in running:
            job.stop_error = shutting_down()
            job.cancel.set()

    def shutdown(self) -> None:
        """At the very end (lifespan shutdown): answer whatever is still waiting or running."""
        self.drain(0.0)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _claim(self, job: Job) -> bool:
        """Mark ``job`` running, unless it was answered while it waited (the server is stopping)."""
        with self._lock:
            if job not in self.live:
                return False
            job.running = True
            return True

    def _run(self, job: Job) -> None:
        """On the worker thread: decode the images, stream the answer into ``job``'s events."""
        from ftz_edge.preprocess import ImageLoadError
        from ftz_edge.prompt import PromptError
        from ftz_edge.runtime.engine import ContextLengthError

        if not self._claim(job):
            return
        outcome, final = "failed", None
        try:
            if job.cancel.is_set():  # the client left while it waited in the queue
                outcome = "cancelled"
                return
            images = [decode_image(image, self.config) for image in job.images]
            stream = self.runtime.stream(job.messages, images, job.config)
            try:
                for delta in stream:
                    if job.cancel.is_set():
                        break
                    job.push("delta", delta)
            finally:
                stream.close()
            if job.cancel.is_set():
                outcome = "cancelled"
                return
            outcome, final = "completed", ("done", stream.timings, stream.finish_reason)  # this request's own
        except APIError as err:
            outcome, final = "invalid", ("error", err)
        except ContextLengthError as err:
            outcome, final = "invalid", ("error", APIError(400, str(err), param="messages", code="context_length_exceeded"))
        except UnencodableTextError as err:  # the request parser refuses these first; kept as a backstop
            param = "messages" if err.index is None else f"messages.{err.index}.content"
            outcome, final = "invalid", ("error", APIError(400, str(err), param=param, code="invalid_text"))
        except GenerationConfigError as err:
            outcome, final = "invalid", ("error", APIError(400, str(err), param=API_PARAM.get(err.field, err.field)))
        except (ImageLoadError, PromptError, ValueError) as err:  # the runtime's word on a request it cannot take
            outcome, final = "invalid", ("error", APIError(400, str(err), param="messages"))
        except Exception as err:  # a backend failure: logged with its traceback, answered as a 500
            log.exception("generation failed")
            final = ("error", APIError(500, f"generation failed ({type(err).__name__}: {err})", kind="server_error"))
        finally:
            if outcome == "cancelled" and job.stop_error is not None:  # stopped by the server, not the client
                outcome, final = "shut_down", ("error", job.stop_error)
            # Counted and released before the last event goes out: a client that has its answer
            # sees a /health that already includes it.
            with self._lock:
                self.counts[outcome] += 1
                self._release(job.size)
                self.live.discard(job)
            job.push(*(final or ("cancelled",)))

    def health(self) -> dict:
        with self._lock:
            return {"status": self.state, "error": self.load_error, "in_flight": self.in_flight,
                    "queue_size": self.config.queue_size, "queued_bytes": self.queued_bytes, **self.counts,
                    "image_cache": self.runtime.image_cache.stats() if self.runtime is not None else None}


# ------------------------------------------------------------------------------ request -> runtime


@dataclass
class PendingImage:
    """An image of a request, checked but not yet decoded: the encoded bytes (or a file path).
    Decoding waits for the worker, so requests waiting in the queue hold compressed bytes, not
    full-resolution pixels."""

    source: Any
    param: str


def image_source(url: str, config: ServeConfig, param: str) -> PendingImage:
    """An ``image_url.url`` -> what to decode, or an APIError saying what is wrong with it."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, "image data URLs must be base64: data:image/<type>;base64,<data>", param=param)
        try:
            return PendingImage(base64.b64decode(payload, validate=True), param)
        except (binascii.Error, ValueError) as err:
            raise APIError(400, f"the image's base64 data is invalid ({err})", param=param, code="invalid_base64") from None
    if url.startswith("file://"):
        if not config.allow_local_files:
            raise APIError(400, "file:// image URLs are off; start ftz-serve with --allow-local-files FOLDER "
                                "or send the image as a base64 data: URL", param=param)
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise APIError(400, f"file:// URL with a host ({parsed.netloc!r}) is not a local file", param=param)
        try:  # resolve() follows symlinks and "..", so the check below sees the real file
            path = Path(unquote(parsed.path)).resolve()
            allowed = [Path(folder).resolve() for folder in config.allow_local_files]
            inside = any(path == folder or folder in path.parents for folder in allowed)
            size = path.stat().st_size if inside and path.is_file() else None
        except (ValueError, OSError) as err:  # a NUL byte, a name too long, ...
            raise APIError(400, f"not a usable file path ({err})", param=param) from None
        if not inside:
            raise APIError(403, "the file is outside the folders this server may read", kind="permission_error",
                           param=param)
        if size is None:
            raise APIError(400, "no such image file", param=param)
        if size > config.max_request_bytes:
            raise APIError(400, f"the image file is {size} bytes, more than this server's limit of "
                                f"{config.max_request_bytes}", param=param, code="image_too_large")
        return PendingImage(str(path), param)
    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched (the server makes no outbound requests); "
                            "send the image as a base64 data: URL", param=param)
    raise APIError(400, "image_url.url must be a data: URL (or a file:// URL with --allow-local-files)", param=param)


def decode_image(image: PendingImage, config: ServeConfig):
    """Decode (on the worker); the pixel limit is checked from the header before decoding."""
    from ftz_edge.preprocess import ImageLoadError, load_image

    try:
        return load_image(image.source, max_pixels=config.max_image_pixels)
    except ImageLoadError as err:
        code = "image_too_large" if "max_pixels" in str(err) else "invalid_image"
        raise APIError(400, str(err), param=image.param, code=code) from None


def without_placeholders(text: str) -> str:
    """Text with every literal ``<image>`` gone, also ones hidden inside each other
    ("<im<image>age>"): a placeholder that no image backs would misplace the images."""
    from ftz_edge.prompt import IMAGE_PLACEHOLDER

    while IMAGE_PLACEHOLDER in text:
        text = text.replace(IMAGE_PLACEHOLDER, "")
    return text


# GenerationConfig fields -> the request fields they come from.
API_PARAM = {"max_new_tokens": "max_tokens"}


@dataclass
class ParsedRequest:
    """What the worker needs of a request. The body itself is not kept: a queued request holds
    its text and its images' encoded bytes, never the body's base64."""

    messages: List[dict]
    images: List["PendingImage"]
    generation: GenerationConfig
    stream: bool
    include_usage: bool


def parse_request(raw: bytes, config: ServeConfig) -> ParsedRequest:
    """A request body -> a ``ParsedRequest``, or an ``APIError`` saying what is wrong with it.

    Contract: raises nothing but ``APIError`` with a 4xx status, whatever ``raw`` holds (JSON,
    types, ranges, unsupported fields, text that is not UTF-8, image URLs and their base64 are
    all checked here; the images' pixels are decoded later, on the worker)."""
    body = read_request(raw)
    body.check_supported()
    generation = generation_config(body, config)
    messages, images = to_runtime_messages(body, config)
    return ParsedRequest(messages, images, generation, stream=bool(body.stream),
                         include_usage=bool(body.stream_options and body.stream_options.include_usage))


def generation_config(body: ChatCompletionRequest, config: ServeConfig) -> GenerationConfig:
    """The request's sampling settings, the server's defaults where it gives none."""
    limit = body.new_token_limit() or config.default_max_tokens
    if limit > config.max_tokens_limit:
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise APIError(400, f"{param} {limit} is above this server's limit of {config.max_tokens_limit}", param=param)
    try:
        return GenerationConfig(
            max_new_tokens=limit, temperature=config.default_temperature if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0, seed=body.seed, stop=body.stop_strings())
    except GenerationConfigError as err:  # the API's ranges are checked first; this names the field all the same
        raise APIError(400, str(err), param=API_PARAM.get(err.field, err.field)) from None


def to_runtime_messages(request, config: ServeConfig) -> Tuple[List[dict], List[PendingImage]]:
    """OpenAI messages -> the runtime's (messages with ``<image>`` placeholders, images in order)."""
    from ftz_edge.prompt import IMAGE_PLACEHOLDER

    image_parts = [(i, j) for i, m in enumerate(request.messages) if isinstance(m.content, list)
                   for j, part in enumerate(m.content) if isinstance(part, ImagePart)]
    if len(image_parts) > config.max_images:
        raise APIError(400, f"{len(image_parts)} images in the request; this server takes at most {config.max_images}",
                       param="messages", code="too_many_images")
    messages, images = [], []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        parts = [message.content or ""] if not isinstance(message.content, list) else message.content
        content = ""  # images where their parts stand (LLaVA's "<image>\n" layout), text parts on their own lines
        for j, part in enumerate(parts):
            if isinstance(part, ImagePart):
                if role != "user":
                    raise APIError(400, f"images are only accepted in user messages, not {message.role}",
                                   param=f"messages.{i}.content.{j}")
                images.append(image_source(part.image_url.url, config, f"messages.{i}.content.{j}.image_url"))
                content += IMAGE_PLACEHOLDER + "\n"
            else:
                text = part if isinstance(part, str) else part.text
                text = without_placeholders(text)
                content += ("\n" if content and not content.endswith("\n") else "") + text
        if not content.strip():
            raise APIError(400, f"message {i} ({message.role}) is empty", param=f"messages.{i}.content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", param="messages")
    return messages, images


# ------------------------------------------------------------------------------ the app


class Gatekeeper:
    """Before any body is read: the API key on ``/v1/*``, then a POST's declared size (a body of
    undeclared size, chunked, is refused: every OpenAI client sends Content-Length). So an
    unauthenticated or oversized request costs the server nothing.
    Plain ASGI rather than ``@app.middleware("http")``, whose wrapper hides client disconnects
    from the endpoint (``request.is_disconnected()`` never turns true behind it)."""

    def __init__(self, app, max_bytes: int, api_key: Optional[str]):
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    def refusal(self, scope) -> Optional[APIError]:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token:
                return APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            if not hmac.compare_digest(token.encode("latin-1"), self.api_key.encode()):
                return APIError(401, "incorrect API key", code="invalid_api_key")
        if scope["method"] == "POST":
            length = headers.get(b"content-length")
            if length is None:
                return APIError(411, "send a Content-Length header", code="length_required")
            if not length.isdigit():
                return APIError(400, "the Content-Length header is not a number", code="invalid_content_length")
            if int(length) > self.max_bytes:
                return APIError(413, f"the request is larger than this server's limit of {self.max_bytes} bytes",
                                code="request_too_large")
        return None

    async def __call__(self, scope, receive, send):
        error = self.refusal(scope) if scope["type"] == "http" else None
        if error is not None:
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(config: ServeConfig, runtime=None):
    """The FastAPI app. With ``runtime`` it is ready at once; otherwise it loads (and warms up)
    ``config.bundle`` on startup while /health answers "warming"."""
    config.validate()
    service = ModelService(config, runtime)
    created = int(time.time())

    async def lifespan(app):
        if service.runtime is None:
            loading = asyncio.get_running_loop().run_in_executor(service.executor, service.load)
            # A load failure is reported by /health and the CLI; mark it seen so asyncio adds no traceback.
            loading.add_done_callback(lambda future: future.cancelled() or future.exception())
        yield
        service.shutdown()

    app = FastAPI(title="ftz-serve", version=fastapi.__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError):
        message, param = validation_message(list(err.errors()))
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException):
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception):
        log.exception("unexpected error")
        return error_response(APIError(500, f"internal error ({type(err).__name__})", kind="server_error"))

    app.add_middleware(Gatekeeper, max_bytes=config.max_request_bytes, api_key=config.api_key)

    def model_id() -> str:
        return config.model_name or Path(service.runtime.bundle if service.runtime else config.bundle).name

    @app.get("/health")
    async def health():
        body = service.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/v1/models")
    async def models():
        service.require_ready()
        manifest = service.runtime.manifest
        info = {"vision_precision": manifest.vision.precision, "llm_precision": manifest.llm.precision,
                "image_tokens": service.runtime.num_image_tokens, "context_length": service.runtime.context_length,
                "limits": config.limits()}
        return models_list(model_id(), created, info)

    async def next_event(job: Job, request: Request) -> Optional[tuple]:
        """The job's next event, or None when the client has gone (the job is then cancelled).
        The connection is looked at every quarter second, also while tokens keep coming."""
        while True:
            if time.monotonic() - job.checked_at > 0.25:
                job.checked_at = time.monotonic()
                if await request.is_disconnected():
                    job.cancel.set()
                    return None
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                continue

    # One body parsed at a time: parsing (JSON, base64) holds the GIL anyway, and this bounds its
    # transient memory (~3x a body) to one body, however many requests arrive together.
    parse_lock = asyncio.Lock()

    async def read_body(request: Request, size: int) -> bytearray:
        """The body, grown in one buffer as it arrives (no list of chunks joined into a second
        copy, and no memory taken for bytes a slow client has not sent yet), held to ``size``."""
        body = bytearray()
        async for piece in request.stream():
            if len(body) + len(piece) > size:
                raise APIError(400, "the body is longer than its Content-Length", code="invalid_content_length")
            body += piece
        if len(body) != size:
            raise APIError(400, "the body is shorter than its Content-Length", code="invalid_content_length")
        return body

    async def parse(request: Request, size: int) -> ParsedRequest:
        loop = asyncio.get_running_loop()
        try:
            raw = await asyncio.wait_for(read_body(request, size), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                           code="request_timeout") from None
        async with parse_lock:
            return await loop.run_in_executor(None, parse_request, raw, config)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        service.require_ready()
        # Before the body is read: a request refused with 429 costs the server its headers only,
        # and unread bodies wait in the socket (uvicorn stops reading), not in this process.
        size = int(request.headers["content-length"])  # the Gatekeeper checked it: there, a number, within the limit
        service.admit(size)
        try:
            parsed = await parse(request, size)
            job = Job(asyncio.get_running_loop(), parsed.messages, parsed.images, parsed.generation, size)
            service.submit(job)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            service.release(size)
            return JSONResponse(error_body("client disconnected"), status_code=499)
        except BaseException:
            service.release(size)
            raise
        first = await next_event(job, request)
        if first is None or first[0] == "cancelled":
            return JSONResponse(error_body("client disconnected"), status_code=499)
        if first[0] == "error":
            raise first[1]
        request_id, model = completion_id(), model_id()

        if not parsed.stream:
            text, event = [], first
            while event[0] == "delta":
                text.append(event[1])
                event = await next_event(job, request)
                if event is None or event[0] == "cancelled":
                    return JSONResponse(error_body("client disconnected"), status_code=499)
            if event[0] == "error":
                raise event[1]
            _, timings, finish_reason = event
            return completion(request_id, model, "".join(text), finish_reason, timings)

        include_usage = parsed.include_usage

        async def events() -> AsyncIterator[bytes]:
            def sse(data: dict) -> bytes:
                return format_sse_event(data_str=json.dumps(data, ensure_ascii=False))

            try:
                yield sse(chunk(request_id, model, created_at, {"role": "assistant", "content": ""}))
                event = first
                while True:
                    if event[0] == "delta":
                        yield sse(chunk(request_id, model, created_at, {"content": event[1]}))
                    elif event[0] == "done":
                        _, timings, finish_reason = event
                        yield sse(chunk(request_id, model, created_at, {}, finish_reason, timings))
                        if include_usage:  # as OpenAI: one more chunk, no choices, the usage
                            yield sse(usage_chunk(request_id, model, created_at, timings))
                        yield format_sse_event(data_str="[DONE]")
                        return
                    elif event[0] == "error":  # after the headers went out: an error event, as OpenAI sends
                        yield sse(event[1].body())
                        return
                    else:  # cancelled
                        return
                    event = await next_event(job, request)  # also watches the connection
                    if event is None:
                        return
            finally:
                job.cancel.set()  # the client went away (or all is sent): stop generating

        created_at = int(time.time())
        return EventSourceResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ------------------------------------------------------------------------------ CLI


class FtZServer(uvicorn.Server):
    """uvicorn's server whose stop signal (SIGTERM, Ctrl-C) first drains the model's queue:
    queued requests are answered 503 at once, instead of losing their connection when the grace
    period runs out, and the running one has the grace period less a second to finish."""

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            service: ModelService = self.config.app.state.service
            grace = self.config.timeout_graceful_shutdown
            # A thread: a signal handler must not take the service's lock, which the main
            # thread it interrupted may hold.
            threading.Thread(target=service.drain, args=(None if grace is None else max(0.0, grace - 1.0),),
                             daemon=True).start()
        super().handle_exit(sig, frame)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``, or a ValueError that says why not (a port in use,
    no permission, an unknown host)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as err:  # socket.gaierror included
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None


def serve_parser():
    """ftz-serve's command line, and what turns its parse into a ServeConfig: one option per
    ServeConfig field but ``verify`` (CLI_OPTION: those not spelled --the-field-name; sizes in
    MiB), plus ``--log-level``. Returns (parser, ftz_edge.cli.args.DataclassOptions)."""
    parser = OneLineParser(prog="ftz-serve", description="A local OpenAI-compatible image chat API over an FtZ bundle.")
    from dataclasses import replace

    from ftz_edge.cli.args import DataclassOptions, Flag

    def mib(value):
        return value / MiB

    def from_mib(value):
        return int(value * MiB)

    helps = {
        "bundle": "bundle folder from ftz-export (default: the shipped default model's)",
        "host": "address to bind (default 127.0.0.1: this machine only)",
        "api_key": "require 'Authorization: Bearer KEY' on /v1/* (default: $FTZ_SERVE_API_KEY, else none)",
        "model_name": "the model id clients see (default: the bundle folder's name)",
        "allow_local_files": "let file:// image URLs read images under FOLDER (repeatable; off by default)",
        "max_images": "images per request",
        "max_tokens_limit": "the largest max_tokens a request may ask for",
        "default_temperature": "when a request gives none, 0..2 (default 0 = greedy; OpenAI's is 1)",
        "queue_size": "requests that may wait behind the running one; more get 429",
        "max_queued_bytes": "request bodies that may be admitted (running or queued) together; more get 429 "
                            "(default: 3 x --max-request-mb)",
        "providers": "onnxruntime execution provider (repeatable, in order)",
        "warmup": "skip the warm-up run at load",
    }
    flags = {name: Flag(help=text) for name, text in helps.items()}
    flags.update({
        "api_key": Flag(help=helps["api_key"], default=os.environ.get("FTZ_SERVE_API_KEY"), to_field=lambda key: key or None),
        "allow_local_files": Flag(help=helps["allow_local_files"], metavar="FOLDER"),
        "max_request_bytes": Flag(type=finite_float, from_field=mib, to_field=from_mib),
        "max_queued_bytes": Flag(help=helps["max_queued_bytes"], type=finite_float, from_field=mib, to_field=from_mib),
    })
    for name, option_name in CLI_OPTION.items():
        flags[name] = replace(flags.get(name, Flag()), flag=option_name)
    fields = DataclassOptions(ServeConfig, skip=("verify",), flags=flags)
    fields.add_to(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser, fields


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser, fields = serve_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="ftz-serve: %(levelname)s: %(message)s")

    from ftz_edge.manifest import BundleError, read_manifest

    config: ServeConfig = fields.build(args)
    try:
        config.validate()  # every option, before a minute of building the default bundle
        if config.bundle is None:
            from ftz_edge.cli.default_bundle import ensure_default_bundle

            config.bundle = str(ensure_default_bundle("ftz-serve"))
        read_manifest(config.bundle, verify=False)  # a wrong path fails here, before the port opens
        app = create_app(config)
        listener = listen(config.host, config.port)  # before the model loads: a port in use fails at once
    except (BundleError, ValueError) as err:
        print(f"ftz-serve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"ftz-serve: warning: listening on {config.host} without --api-key", file=sys.stderr)
    server = FtZServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                                      timeout_graceful_shutdown=5))
    service: ModelService = app.state.service

    def stop_when_loading_fails() -> None:
        while service.state == "warming" and not server.should_exit:
            time.sleep(0.05)
        if service.state == "error":
            print(f"ftz-serve: error: the model failed to load: {service.load_error}", file=sys.stderr)
            server.should_exit = True

    threading.Thread(target=stop_when_loading_fails, daemon=True).start()
    print(f"ftz-serve: http://{config.host}:{config.port}/v1 (bundle {config.bundle}); /health says when it is ready",
          file=sys.stderr)
    server.run(sockets=[listener])
    return 1 if service.state == "error" else 0


if __name__ == "__main__":
    sys.exit(main())
