"""The OpenAI Chat Completions wire format that ``ftz-serve`` speaks (torch-free).

Requests are parsed here (``read_request``: JSON, then pydantic in strict mode, so a value must
have the JSON type the API gives it: ``true`` is not an integer, ``"yes"`` not a boolean),
responses and stream chunks are built here, and errors are OpenAI error objects. Only what a
local image-chat model can honour is accepted: ``n`` other than 1, tools and tool choice,
``response_format`` other than text, ``logprobs``, ``logit_bias``, audio and remote image URLs
are refused with a 400 naming the field rather than silently ignored. ``presence_penalty`` and
``frequency_penalty`` are honoured (OpenAI's semantics, see ``ftz_edge.runtime.generation``).
Fields that change nothing here (``user``, ``store``, ``metadata``, ``logprobs: false``,
``response_format: {"type": "text"}`` ...) are accepted and ignored, as OpenAI clients send them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from ftz_edge.prompt import UnencodableTextError, check_encodable


class APIError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ------------------------------------------------------------------------------ request

# strict: no coercion between JSON types (bool is not int, "5" is not 5); a JSON int is still
# a valid number. NaN and Infinity (which Python's JSON reader accepts) are not numbers here.
STRICT = ConfigDict(strict=True, allow_inf_nan=False)
INT64 = 1 << 63


class ImageURL(BaseModel):
    model_config = STRICT

    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None  # accepted; every image is encoded one way


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = STRICT

    type: Literal["image_url"]
    image_url: ImageURL


def part_kind(value: Any) -> Optional[str]:
    """The content part's class by its ``type`` (tagged by class name, so that error locations
    drop the tag like any union member's)."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "TextPart", "image_url": "ImagePart"}.get(kind) if isinstance(kind, str) else None


ContentPart = Annotated[
    Union[Annotated[TextPart, Tag("TextPart")], Annotated[ImagePart, Tag("ImagePart")]],
    Discriminator(part_kind, custom_error_type="invalid_content_part",
                  custom_error_message='a content part\'s type must be "text" or "image_url"'),
]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", **STRICT)

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[ContentPart], None] = None
    name: Optional[str] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", **STRICT)

    include_usage: Optional[bool] = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", **STRICT)

    messages: List[ChatMessage] = Field(min_length=1)
    model: Optional[str] = None  # any name is answered by the one loaded model (clients often hard-code one)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)  # the newer name of max_tokens
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(default=None, ge=-INT64, lt=INT64)  # OpenAI's range: int64
    stop: Union[str, List[str], None] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = 1
    # Accepted only where they change nothing (check_supported says why otherwise).
    tools: Optional[List[Any]] = None
    tool_choice: Union[str, Dict[str, Any], None] = None
    functions: Optional[List[Any]] = None  # the deprecated forms of tools / tool_choice
    function_call: Union[str, Dict[str, Any], None] = None
    response_format: Optional[Dict[str, Any]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    logit_bias: Optional[Dict[str, Any]] = None
    modalities: Optional[List[str]] = None
    audio: Optional[Dict[str, Any]] = None

    def new_token_limit(self) -> Optional[int]:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise APIError(400, "give max_completion_tokens or max_tokens (its older name), not both",
                           param="max_completion_tokens")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_strings(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:  # OpenAI's limit
            raise APIError(400, f"at most 4 stop sequences are allowed, got {len(stops)}", param="stop")
        return [s for s in stops if s]

    def check_supported(self) -> None:
        """Refuse (400, naming the field) what would change the answer's form in a way this
        server cannot give, instead of answering as if it had not been asked."""
        refusals = (
            ("n", self.n not in (None, 1), f"n={self.n} is not supported: this server returns one choice per request"),
            ("tools", bool(self.tools), "tools are not supported by this model"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tool_choice is not supported by this model "
                                                                      "(only \"none\")"),
            ("functions", bool(self.functions), "functions are not supported by this model"),
            ("function_call", self.function_call not in (None, "none"), "function_call is not supported by this model"),
            ("response_format", self.response_format not in (None, {"type": "text"}),
             "response_format: only {\"type\": \"text\"} is supported (no JSON mode or structured outputs): "
             "this server answers in plain text"),
            ("logprobs", bool(self.logprobs), "logprobs are not supported by this server"),
            ("top_logprobs", bool(self.top_logprobs), "top_logprobs are not supported by this server"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported by this server"),
            ("modalities", self.modalities not in (None, ["text"]), "only the text modality is supported"),
            ("audio", self.audio is not None, "audio output is not supported by this model"),
        )
        for param, refused, message in refusals:
            if refused:
                raise APIError(400, message, param=param, code="unsupported_parameter")


def first_unencodable(data: Any) -> Optional[tuple]:
    """(path, error) of the first string (key or value) in parsed JSON that UTF-8 cannot encode
    (a lone surrogate from a ``\\ud800`` escape), else None. Iterative: depth costs no stack."""
    stack: List[tuple] = [((), data)]
    while stack:
        path, value = stack.pop()
        where = ".".join(path) or None
        try:
            if isinstance(value, str):
                check_encodable(value, where or "the request body")
            elif isinstance(value, dict):
                for key in value:  # keys before they become part of a path (and of an error message)
                    check_encodable(key, f"a key in {where or 'the request body'}")
                stack.extend((path + (key,), item) for key, item in reversed(list(value.items())))
            elif isinstance(value, list):
                stack.extend((path + (str(i),), item) for i, item in reversed(list(enumerate(value))))
        except UnencodableTextError as err:
            return where, err
    return None


def read_request(raw: Union[bytes, bytearray]) -> ChatCompletionRequest:
    """A request body -> the validated request, or an APIError (400) naming what is wrong.

    Contract: raises nothing but ``APIError`` with a 4xx status, whatever the bytes."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None
    except ValueError as err:  # JSONDecodeError, bytes that are not UTF-8/16/32, an int of >4300 digits
        raise APIError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    found = first_unencodable(data)
    if found is not None:
        param, err = found
        raise APIError(400, str(err), param=param, code="invalid_text")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(err.errors(include_url=False, include_input=False))
        raise APIError(400, message, param=param) from None


def union_tag(part: str) -> bool:
    """A location part that names a union member (``str``, ``list[...]``, ``TextPart``), not a field."""
    return part in ("str", "int", "float", "bool", "none") or "[" in part or part[:1].isupper()


def validation_message(errors: List[dict]) -> tuple:
    """(message, param) of pydantic validation errors, in OpenAI's terms: the error that got
    furthest into the input (for a union, the member the input was meant to be)."""
    first = max(errors, key=lambda error: len(error.get("loc", ())))
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})".replace(" ()", ""), None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(part for part in location if not union_tag(part)) or None
    message = first.get("msg", "invalid request")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


# ------------------------------------------------------------------------------ response


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(timings) -> dict:
    return {"prompt_tokens": timings.prompt_tokens, "completion_tokens": timings.new_tokens,
            "total_tokens": timings.prompt_tokens + timings.new_tokens}


def timings_object(timings) -> dict:
    """llama.cpp server's ``timings`` shape, plus what is particular to an image model."""
    decode_s = timings.decode_ms / 1e3
    return {"prompt_n": timings.prompt_tokens, "prompt_ms": round(timings.prefill_ms, 3),
            "prompt_per_second": round(timings.prompt_tokens / (timings.prefill_ms / 1e3), 3) if timings.prefill_ms else None,
            "predicted_n": timings.new_tokens, "predicted_ms": round(timings.decode_ms, 3),
            "predicted_per_second": round((timings.new_tokens - 1) / decode_s, 3) if timings.new_tokens > 1 and decode_s else None,
            "vision_ms": round(timings.vision_ms, 3), "preprocess_ms": round(timings.preprocess_ms, 3),
            "time_to_first_token_ms": round(timings.time_to_first_token_ms, 3), "cache_hit": timings.cache_hit,
            "images": timings.images}


def completion(request_id: str, model: str, text: str, finish_reason: str, timings) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                         "logprobs": None}],
            "usage": usage(timings), "timings": timings_object(timings)}


def chunk(request_id: str, model: str, created: int, delta: Dict[str, Any], finish_reason: Optional[str] = None,
          timings=None) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if timings is not None:
        body["timings"] = timings_object(timings)
    return body


def usage_chunk(request_id: str, model: str, created: int, timings) -> dict:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(timings), "timings": timings_object(timings)}


def models_list(model: str, created: int, bundle_info: dict) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "ftz-edge",
                                        **bundle_info}]}
