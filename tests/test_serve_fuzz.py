"""Fuzzing ftz-serve's request parser in-process: whatever the body, ``parse_request`` gives a
valid parse or an OpenAI-shaped 4xx ``APIError`` whose body can be sent (UTF-8 JSON), never a
500 and never another exception. Bounded: a few hundred examples per strategy, a few seconds."""

import base64
import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ftz_edge.runtime.generation import GenerationConfig
from ftz_edge.serve.openai_api import APIError
from ftz_edge.serve.server import ParsedRequest, PendingImage, ServeConfig, parse_request

CONFIG = ServeConfig(max_images=2, max_tokens_limit=64, default_max_tokens=16, max_request_bytes=1 << 20)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any Python text, lone surrogates included (as JSON "\ud800" escapes produce).
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=12)
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
                | st.floats(allow_nan=True, allow_infinity=True) | any_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)

FIELDS = ["messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "presence_penalty",
          "frequency_penalty", "seed", "stop", "stream", "stream_options", "n", "tools", "tool_choice", "functions",
          "function_call", "response_format", "logprobs", "top_logprobs", "logit_bias", "modalities", "audio", "user"]
text = st.text(max_size=12)  # valid text; any_text above brings the surrogates
said = st.text(min_size=1, max_size=12).filter(lambda t: t.replace("<image>", "").strip())  # a turn with words
data_urls = st.builds(lambda raw, kind: f"data:image/{kind};base64," + base64.b64encode(raw).decode(),
                      st.binary(max_size=24), st.sampled_from(["png", "jpeg"]))
urls = data_urls | st.sampled_from(["https://example.com/a.png", "file:///etc/passwd", "data:,x",
                                    "data:image/png;base64,%%%", "ftp://x"]) | any_text
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": data_urls})}),
)
valid_messages = st.tuples(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                    "content": said}), max_size=2),
    st.fixed_dictionaries({"role": st.just("user"), "content": said | st.lists(parts, min_size=1, max_size=CONFIG.max_images).filter(
        lambda ps: any(p["type"] == "image_url" or p["text"].replace("<image>", "").strip() for p in ps))}),
).map(lambda pair: pair[0] + [pair[1]])
valid_fields = {
    "max_tokens": st.integers(1, 64), "max_completion_tokens": st.integers(1, 64),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "seed": st.integers(-(1 << 63), (1 << 63) - 1),
    "stop": text | st.lists(text, max_size=4), "stream": st.booleans(), "n": st.just(1),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "model": text,
    "response_format": st.just({"type": "text"}), "logprobs": st.just(False), "tool_choice": st.just("none"),
    "user": text,
}
valid_requests = st.fixed_dictionaries({"messages": valid_messages}, optional=valid_fields).map(
    lambda body: {k: v for k, v in body.items() if k != "max_tokens" or "max_completion_tokens" not in body})
# Hostile values: any JSON, wrong types, edge numbers, and text with lone surrogates in it.
surrogate_text = st.builds(lambda a, c, b: a + c + b, st.text(max_size=4),
                           st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.text(max_size=4))
hostile = (json_values | surrogate_text
           | st.sampled_from([True, False, 0, -1, 1 << 64, 1.5, float("nan"), "yes", "", " ", "<image>", [], {}, None]))


def paths(value, prefix=()):
    """Every place in a JSON value: dict keys and list indices, outermost first."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from paths(item, prefix + (key,))


def replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def mutated_requests(draw):
    """A valid request with one place in it (a field, a message, a part, a URL ...) replaced by
    something hostile, or one field added with a hostile value."""
    body = draw(valid_requests)
    if draw(st.integers(0, 2)) == 0:
        return {**body, draw(st.sampled_from(FIELDS)): draw(hostile)}
    places = list(paths(body))[1:]
    texts = [path for path in places if isinstance(path_value(body, path), str)]
    # Half the time a text (where lone surrogates, placeholders and blanks matter), else any place.
    path = draw(st.sampled_from(texts if texts and draw(st.booleans()) else places))
    return replaced(body, path, draw(hostile))


def path_value(value, path):
    for key in path:
        value = value[key]
    return value


def example_all(bodies):
    """Hypothesis ``@example`` for each of ``bodies``."""
    def decorate(test):
        for body in reversed(bodies):
            test = example(body)(test)
        return test
    return decorate


def check(raw: bytes):
    """The parse (checked for sense) or the APIError (checked for shape)."""
    try:
        parsed = parse_request(raw, CONFIG)
    except APIError as err:
        assert 400 <= err.status < 500, (err.status, err.message)
        body = err.body()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert body["error"]["param"] is None or isinstance(body["error"]["param"], str)
        json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")  # what JSONResponse does: must not fail
        return err
    assert isinstance(parsed, ParsedRequest)
    assert isinstance(parsed.generation, GenerationConfig) and 1 <= parsed.generation.max_new_tokens <= 64
    assert parsed.messages and parsed.messages[-1]["role"] == "user"
    for message in parsed.messages:
        assert message["role"] in ("system", "user", "assistant") and message["content"].strip()
        message["content"].encode("utf-8")  # the tokenizer will take it
    assert len(parsed.images) <= CONFIG.max_images and all(isinstance(i, PendingImage) for i in parsed.images)
    assert isinstance(parsed.stream, bool) and isinstance(parsed.include_usage, bool)
    return parsed


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes(raw):
    check(raw)


@FUZZ
@given(json_values)
def test_any_json_value(value):
    check(json.dumps(value).encode("utf-8", "surrogatepass"))


@FUZZ
@given(valid_requests)
def test_valid_requests_parse(body):
    assert isinstance(check(json.dumps(body).encode()), ParsedRequest), body


HI = [{"role": "user", "content": "hi"}]
KNOWN = [  # found by hand or by this fuzzer once: always tried, whatever the random draw
    {"messages": [{"role": "user", "content": "hi \ud800"}]},
    {"messages": [{"role": "system", "content": "x\udcff"}] + HI},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
    {"messages": HI, "user": {"\ud800": 1}},
    {"messages": [{"role": "user", "content": [{"type": ["text"], "text": "x"}]}]},
    {"messages": [{"role": "user", "content": [{"type": {"a": 1}}]}]},
    {"messages": HI, "max_tokens": True}, {"messages": HI, "stream": "yes"}, {"messages": HI, "seed": -1},
    {"messages": HI, "seed": 1 << 64}, {"messages": HI, "max_tokens": 3, "max_completion_tokens": 3},
    {"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, {"messages": HI, "temperature": float("nan")},
    {"messages": HI, "response_format": {"type": "json_object"}}, {"messages": HI, "n": None},
    {"messages": [{"role": "user", "content": "<im<image>age>"}]},
]


@FUZZ
@given(mutated_requests())
@example_all(KNOWN)
def test_request_shaped_bodies(body):
    # surrogatepass: a lone surrogate travels as raw UTF-8-like bytes, which the JSON reader
    # decodes back into one, like a "\ud800" escape (ensure_ascii=True sends those).
    check(json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    check(json.dumps(body).encode())


def test_deep_nesting_and_huge_numbers():
    for raw in (b"[" * 100_000, b'{"a":' * 50_000, b'{"messages": [], "seed": ' + b"9" * 5000 + b"}",
                b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
                b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b""):
        check(raw)
