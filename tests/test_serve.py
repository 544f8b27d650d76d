"""ftz-serve: the official ``openai`` client against a real server on 127.0.0.1, raw HTTP for the
error cases, a bounded load test, and (with a slowed-down runtime in-process) the queue's 429
and a disconnecting client stopping its generation."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Imported, not importorskip'ed: on a dev install (pip install -e '.[dev]') a missing serve
# extra or client must fail these tests, not turn them into a green skip.
import httpx
import openai
from conftest import free_port, stop_process

from ftz_edge.runtime.engine import FtZRuntime, Generation, Timings

DEFAULT = Path(__file__).resolve().parent.parent / "ftz_edge" / "default_model"
EXAMPLES_DIR = DEFAULT / "examples"
EXAMPLES = json.loads((EXAMPLES_DIR / "examples.json").read_text())
API_KEY = "test-key-123"
LOAD_SECONDS = float(os.environ.get("FTZ_LOAD_TEST_SECONDS", "12"))


def data_url(path_or_image) -> str:
    if isinstance(path_or_image, Image.Image):
        buffer = io.BytesIO()
        path_or_image.save(buffer, format="PNG")
        raw = buffer.getvalue()
    else:
        raw = Path(path_or_image).read_bytes()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def image_message(question: str, *images) -> list:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


def wait_ready(base: str, timeout: float = 120.0, process=None, log=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"ftz-serve exited with {process.returncode}: {Path(log).read_text() if log else ''}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("ftz-serve did not become ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An allowed folder with an image and a symlink that points out of it, and that outside file."""
    root = tmp_path_factory.mktemp("files")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "picture.png").write_bytes((EXAMPLES_DIR / EXAMPLES[1]["image"]).read_bytes())
    (outside / "secret.png").write_bytes((EXAMPLES_DIR / EXAMPLES[2]["image"]).read_bytes())
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    return {"allowed": allowed, "outside": outside, "root": root}


@pytest.fixture(scope="module")
def server(default_bundle, folders):
    """``ftz-serve`` as a user starts it, in its own process, with small limits to test against."""
    port = free_port()
    command = [sys.executable, "-m", "ftz_edge.serve.server", "--bundle", str(default_bundle), "--port", str(port),
               "--api-key", API_KEY, "--allow-local-files", str(folders["allowed"]), "--max-images", "3",
               "--max-image-pixels", "100000", "--max-request-mb", "1", "--queue-size", "4", "--image-cache-mb", "1",
               "--log-level", "warning"]
    log = open(folders["root"] / "server.log", "w")  # a file, not a pipe nobody reads (a full pipe blocks the server)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process=process, log=folders["root"] / "server.log")
        yield {"base": base, "process": process}
    finally:
        stop_process(process)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def runtime(default_bundle):
    return FtZRuntime(default_bundle, image_cache_mb=0)


def post(server, body, key=API_KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server["base"] + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kwargs)
    return httpx.post(server["base"] + "/v1/chat/completions", content=body, timeout=60,
                      headers={**headers, "Content-Type": "application/json"}, **kwargs)


# ------------------------------------------------------------------------------ the openai client


def test_openai_client_gets_the_runtimes_answer_with_usage_and_timings(client, runtime):
    example = EXAMPLES[2]
    image = EXAMPLES_DIR / example["image"]
    reference = runtime.ask(image, example["question"]).run()
    expected = reference.text
    response = client.chat.completions.create(model="anything", messages=image_message(example["question"], image))
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == "stop" and response.object == "chat.completion"
    assert response.usage.prompt_tokens == reference.timings.prompt_tokens
    assert response.usage.completion_tokens == reference.timings.new_tokens
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    timings = response.model_extra["timings"]
    assert {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second", "vision_ms",
            "cache_hit"} <= set(timings)
    assert timings["prompt_n"] == response.usage.prompt_tokens and timings["vision_ms"] >= 0
    # The same image again (another request, same pixels): the embedding comes from the cache.
    again = client.chat.completions.create(model="anything", messages=image_message(example["question"], image))
    assert again.choices[0].message.content == expected
    assert again.model_extra["timings"]["cache_hit"] is True and again.model_extra["timings"]["vision_ms"] == 0


def test_streaming_describes_a_shipped_image(client, runtime, server):
    image = EXAMPLES_DIR / EXAMPLES[0]["image"]
    question = "Describe the image."
    reference = runtime.ask(image, question).run()
    expected = reference.text
    stream = client.chat.completions.create(model="ftz", messages=image_message(question, image), stream=True,
                                            stream_options={"include_usage": True})
    *chunks, usage = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected and text.strip()
    assert chunks[-1].choices[0].finish_reason == "stop" and "timings" in chunks[-1].model_extra
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # include_usage: as OpenAI, a last chunk without choices that carries the usage.
    assert usage.choices == [] and usage.usage.prompt_tokens == reference.timings.prompt_tokens
    # On the wire: server-sent events, each a JSON chunk, ending with [DONE].
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"messages": image_message(question, image), "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_several_images_and_a_multi_turn_conversation(client, runtime):
    a, b = EXAMPLES_DIR / EXAMPLES[0]["image"], EXAMPLES_DIR / EXAMPLES[3]["image"]
    response = client.chat.completions.create(model="ftz", messages=image_message("Compare them.", a, b), max_tokens=8)
    from ftz_edge.runtime.engine import Conversation

    replay = Conversation(runtime)
    compared = replay.ask("Compare them.", [a, b], __import__("ftz_edge.runtime.generation", fromlist=["x"])
                          .GenerationConfig(max_new_tokens=8))
    expected = "".join(compared)
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == compared.timings.prompt_tokens
    assert response.model_extra["timings"]["images"] == 2
    # A follow-up that carries the history as OpenAI clients do (the assistant's turn included).
    messages = image_message("Compare them.", a, b) + [
        {"role": "assistant", "content": response.choices[0].message.content},
        {"role": "user", "content": "Is there a circle? Answer with one word."}]
    follow = client.chat.completions.create(model="ftz", messages=messages, max_tokens=8)
    assert follow.choices[0].message.content.strip()
    assert follow.usage.prompt_tokens > response.usage.prompt_tokens
    assert follow.model_extra["timings"]["cache_hit"] is True  # both images' embeddings were cached


def file_message(url: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is this?"}]}]


def test_models_health_and_local_files(client, server, folders, runtime):
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].owned_by == "ftz-edge"
    assert models.data[0].model_extra["limits"]["max_images"] == 3
    health = httpx.get(server["base"] + "/health").json()
    assert health["status"] == "ready" and health["queue_size"] == 4
    picture = folders["allowed"] / "picture.png"
    answer = client.chat.completions.create(model="ftz", messages=file_message(picture.as_uri()))
    assert answer.choices[0].message.content == runtime.answer(picture, "What is this?")
    # Out of the allowed folder: directly, through "..", or through a symlink inside it.
    secret = folders["outside"] / "secret.png"
    for url in (secret.as_uri(), f"file://{folders['allowed']}/../outside/secret.png",
                (folders["allowed"] / "escape.png").as_uri(), Path(__file__).as_uri()):
        with pytest.raises(openai.PermissionDeniedError, match="outside the folders"):
            client.chat.completions.create(model="ftz", messages=file_message(url))
    for url, message in ((f"file://{folders['allowed']}/%00x.png", "not a usable file path"),
                         ((folders["allowed"] / "missing.png").as_uri(), "no such image file"),
                         (folders["allowed"].as_uri(), "no such image file")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="ftz", messages=file_message(url))


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        bad.models.list()
    response = post(server, {"messages": [{"role": "user", "content": "hi"}]}, key=None)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    # The key is checked before the body is even read: a bad body without a key is a 401.
    assert post(server, b'{"messages": [', key=None).status_code == 401
    assert post(server, b'{"messages": [', key="wrong").status_code == 401
    assert httpx.get(server["base"] + "/health").status_code == 200  # open, for orchestration


# ------------------------------------------------------------------------------ errors, raw HTTP


def big_image(pixels_side: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (pixels_side, pixels_side, 3), np.uint8))


ONE_IMAGE = str(EXAMPLES_DIR / EXAMPLES[0]["image"])
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("name, body, status, expect", [
    ("malformed JSON", b'{"messages": [', 400, "not valid JSON"),
    ("no messages", {"model": "x"}, 400, "messages"),
    ("content of the wrong type", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("max_tokens of the wrong type", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400,
     "max_tokens"),
    ("max_tokens over the limit", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400,
     "above this server's limit"),
    ("temperature out of range", {"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature"),
    ("bad base64", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%not-base64"}}]}]}, 400, "base64"),
    ("undecodable image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}]}]},
     400, "not a recognised image"),
    ("oversized image", {"messages": image_message("What?", big_image(400))}, 400, "max_pixels"),
    ("too many images", {"messages": image_message("What?", *[ONE_IMAGE] * 4)}, 400, "at most 3"),
    ("remote image URL", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, 400, "not fetched"),
    ("prompt past the context", {"messages": [{"role": "user", "content": "red " * 3000}]}, 400, "context holds"),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ("n > 1", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "one choice"),
    ("image in an assistant turn", {"messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(ONE_IMAGE)}}]}, {"role": "user", "content": "hi"}]}, 400,
     "only accepted in user messages"),
    ("request too large", {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, "larger than"),
    ("more than 4 stop strings", {"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop"),
    # Values of another JSON type are refused, not coerced (true is not 1, "yes" is not true).
    ("max_tokens a boolean", {"messages": HI, "max_tokens": True}, 400, "max_tokens"),
    ("stream a string", {"messages": HI, "stream": "yes"}, 400, "stream"),
    ("temperature a string", {"messages": HI, "temperature": "0.5"}, 400, "temperature"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("seed past int64", {"messages": HI, "seed": 1 << 63}, 400, "seed"),
    ("both token limits", {"messages": HI, "max_tokens": 3, "max_completion_tokens": 3}, 400, "not both"),
    ("presence_penalty out of range", {"messages": HI, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("frequency_penalty out of range", {"messages": HI, "frequency_penalty": -3}, 400, "frequency_penalty"),
    # Asked for but not served: refused, naming the field (never silently ignored).
    ("response_format json_object", {"messages": HI, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("response_format json_schema", {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}}, 400, "response_format"),
    ("logprobs", {"messages": HI, "logprobs": True}, 400, "logprobs"),
    ("top_logprobs", {"messages": HI, "top_logprobs": 3}, 400, "top_logprobs"),
    ("tools", {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("tool_choice", {"messages": HI, "tool_choice": "required"}, 400, "tool_choice"),
    ("logit_bias", {"messages": HI, "logit_bias": {"50256": -100}}, 400, "logit_bias"),
])
def test_bad_requests_get_openai_errors(server, name, body, status, expect):
    response = post(server, body)
    assert response.status_code == status, (name, response.text)
    error = response.json()["error"]
    assert expect in error["message"] or expect == error["param"], (name, error)
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param", [
    (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages.0.content"),
    (b'{"messages": [{"role": "system", "content": "be \\udfff brief"}, {"role": "user", "content": "hi"}]}',
     "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udcff"}]}]}', "messages.0.content.0.text"),
    (b'{"messages": [{"role": "user", "content": "hi \xed\xa0\x80"}]}', "messages.0.content"),  # a raw encoded surrogate
])
def test_text_that_is_not_utf8_is_a_400_naming_the_field(server, body, param):
    """A lone surrogate (JSON lets one be written) was a 500 from the tokenizer."""
    before = httpx.get(server["base"] + "/health").json()["failed"]
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "not valid UTF-8" in error["message"] and error["code"] == "invalid_text"
    assert httpx.get(server["base"] + "/health").json()["failed"] == before


def test_harmless_fields_are_accepted_and_seed_minus_one_reproduces(client, runtime):
    """Fields that ask for what the server does anyway are accepted; OpenAI's seed range is int64."""
    image = EXAMPLES_DIR / EXAMPLES[1]["image"]
    plain = client.chat.completions.create(model="ftz", messages=image_message("What is it?", image), max_tokens=8)
    same = client.chat.completions.create(
        model="ftz", messages=image_message("What is it?", image), max_tokens=8, response_format={"type": "text"},
        logprobs=False, top_logprobs=0, tool_choice="none", presence_penalty=0, frequency_penalty=0, n=1)
    assert same.choices[0].message.content == plain.choices[0].message.content
    sampled = [client.chat.completions.create(model="ftz", messages=image_message("What is it?", image), max_tokens=8,
                                              temperature=1.5, seed=-1).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_openai_parse_with_a_response_format_is_refused_naming_it(client):
    """openai's .parse(response_format=Model) needs JSON the server does not constrain: a clear 400,
    not a plain-text answer that fails to parse on the client."""
    from pydantic import BaseModel

    class Answer(BaseModel):
        colour: str

    with pytest.raises(openai.BadRequestError, match="response_format") as info:
        client.chat.completions.parse(model="ftz", messages=HI, response_format=Answer)
    assert info.value.param == "response_format"


def test_a_body_without_content_length_gets_411(server):
    """Chunked bodies are refused before they are read (every OpenAI client sends Content-Length)."""
    response = httpx.post(server["base"] + "/v1/chat/completions", content=iter([json.dumps({"messages": HI}).encode()]),
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 411 and response.json()["error"]["code"] == "length_required"


def test_finish_reasons_stop_strings_and_smuggled_placeholders(client, runtime, server):
    image = EXAMPLES_DIR / EXAMPLES[0]["image"]
    full = runtime.answer(image, "Describe the image.")
    cut = client.chat.completions.create(model="ftz", messages=image_message("Describe the image.", image), max_tokens=1)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 1
    ended = client.chat.completions.create(model="ftz", messages=image_message("Describe the image.", image))
    assert ended.choices[0].finish_reason == "stop" and ended.choices[0].message.content == full
    assert len(full) >= 2, full  # so that a stop string can cut it after its first character
    stopped = client.chat.completions.create(model="ftz", messages=image_message("Describe the image.", image),
                                             stop=[full[1:]])
    assert stopped.choices[0].message.content == full[:1] and stopped.choices[0].finish_reason == "stop"
    # "<image>" typed (or hidden) in text is not an image: it is dropped, never a 500.
    before = httpx.get(server["base"] + "/health").json()["failed"]
    for text in ("a <image> b", "a <im<image>age> b"):
        response = post(server, {"messages": [{"role": "user", "content": text}], "max_tokens": 2})
        assert response.status_code == 200, response.text
    response = post(server, {"messages": [{"role": "user", "content": "<<image>image>"}]})  # nothing left
    assert response.status_code == 400 and "is empty" in response.json()["error"]["message"]
    assert httpx.get(server["base"] + "/health").json()["failed"] == before


def test_unknown_route_and_method_are_openai_errors(server):
    response = httpx.get(server["base"] + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and "error" in response.json()
    assert httpx.get(server["base"] + "/v1/nothing").status_code == 401  # no key: nothing more is said
    assert httpx.get(server["base"] + "/openapi.json").status_code == 404  # no schema served without a key
    response = httpx.get(server["base"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 405 and "error" in response.json()


# ------------------------------------------------------------------------------ load


def test_load_every_request_completes_or_gets_a_clean_429(server):
    """8 clients for LOAD_SECONDS: streamed and plain requests, new and repeated images. Each
    gets a complete answer or a 429; the server survives and its memory stays bounded."""
    deadline = time.time() + LOAD_SECONDS
    rng = np.random.default_rng(1)
    images = [Image.fromarray(np.full((64, 64, 3), rng.integers(0, 255, 3), np.uint8)) for _ in range(40)]
    urls = [data_url(image) for image in images]
    results, failures, rss = [], [], []

    def one_client(index: int) -> None:
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            n = 0
            while time.time() < deadline:
                n += 1
                body = {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": urls[(index * 7 + n) % len(urls)]}},
                    {"type": "text", "text": "What colour is the image?"}]}], "max_tokens": 16, "stream": n % 2 == 0}
                try:
                    if body["stream"]:
                        with http.stream("POST", server["base"] + "/v1/chat/completions", json=body) as response:
                            lines = [line for line in response.iter_lines() if line]
                            status = response.status_code
                            ok = status == 200 and lines[-1] == "data: [DONE]" and \
                                json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
                    else:
                        response = http.post(server["base"] + "/v1/chat/completions", json=body)
                        status = response.status_code
                        ok = status == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")
                    if status == 429:
                        ok = response.headers.get("retry-after") == "1"
                    results.append(status)
                    if not ok:
                        failures.append((status, lines if body["stream"] else response.text))
                except Exception as err:  # a dropped connection or a broken stream is a failure
                    failures.append(("exception", repr(err)))

    def sample_memory() -> None:
        while time.time() < deadline:
            rss.append(rss_mb(server["process"].pid))
            time.sleep(0.5)

    with ThreadPoolExecutor(max_workers=9) as pool:
        futures = [pool.submit(one_client, i) for i in range(8)] + [pool.submit(sample_memory)]
        for future in futures:
            future.result()
    assert not failures, failures[:5]
    assert results.count(200) >= 1 and set(results) <= {200, 429}
    assert server["process"].poll() is None  # nothing crashed
    health = httpx.get(server["base"] + "/health").json()
    assert health["status"] == "ready" and health["in_flight"] == 0 and health["failed"] == 0
    # Memory: after the first quarter (caches and allocators warm), the server grows by little.
    settled = rss[len(rss) // 4]
    assert max(rss) - settled < 64, (settled, max(rss))


# ------------------------------------------------------------------------------ queue and disconnects


class SlowRuntime:
    """A real runtime whose answers are long and slow ("tok " every ``delay`` s), to hold the
    worker busy; everything else is the real runtime's."""

    def __init__(self, runtime, delay=0.02):
        self._runtime, self.delay = runtime, delay
        self.produced = 0
        self.configs = []  # the GenerationConfig of every generation started
        self.gate = threading.Event()  # cleared: a generation waits before its first token
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def stream(self, messages, images, config):
        def steps(generation):
            self.configs.append(config)
            self.gate.wait(30)
            for _ in range(config.max_new_tokens):
                time.sleep(self.delay)
                self.produced += 1
                yield "tok "
            generation.timings = Timings(prompt_tokens=10, new_tokens=config.max_new_tokens)
            generation.finish_reason = "length"

        return Generation(steps)


def start_server(bundle, runtime, grace_s=5.0, **config):
    """ftz-serve's app and server class (as ``main`` builds them) on a thread, over ``runtime``."""
    import uvicorn

    from ftz_edge.serve.server import FtZServer, ServeConfig, create_app

    port = free_port()
    app = create_app(ServeConfig(bundle=str(bundle), port=port, **config), runtime=runtime)
    server = FtZServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                      timeout_graceful_shutdown=grace_s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, timeout=30)
    return {"base": base, "runtime": runtime, "server": server, "thread": thread, "port": port,
            "health": lambda: httpx.get(base + "/health").json()}


@pytest.fixture(scope="module")
def shared_runtime(default_bundle):
    return FtZRuntime(default_bundle)


@pytest.fixture
def slow_server(default_bundle, shared_runtime):
    running = start_server(default_bundle, SlowRuntime(shared_runtime), queue_size=1)
    yield running
    running["server"].should_exit = True
    running["thread"].join(timeout=10)


def wait_for(condition, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def test_full_queue_answers_429(slow_server):
    """One running + queue_size (1) waiting: the next request gets 429, whatever the machine's speed."""
    base, slow = slow_server["base"], slow_server["runtime"]
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 3}
    health = lambda: httpx.get(base + "/health").json()  # noqa: E731
    slow.gate.clear()  # hold the worker: the first request runs but produces nothing yet
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=60)
        wait_for(lambda: health()["in_flight"] == 1)
        second = pool.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=60)
        wait_for(lambda: health()["in_flight"] == 2)
        refused = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full" and refused.json()["error"]["type"] == "rate_limit_error"
        slow.gate.set()
        for future in (first, second):
            response = future.result()
            assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "tok " * 3
    after = health()
    assert after["rejected"] == 1 and after["in_flight"] == 0 and after["completed"] == 2


def test_a_client_that_disconnects_stops_its_generation(slow_server):
    slow = slow_server["runtime"]
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 1000, "stream": True}  # 20 s if not stopped
    with httpx.stream("POST", slow_server["base"] + "/v1/chat/completions", json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 6:
                break  # leave mid-answer: the connection closes here
    wait_for(lambda: httpx.get(slow_server["base"] + "/health").json()["cancelled"] >= 1, timeout=10)
    produced = slow.produced
    assert httpx.get(slow_server["base"] + "/health").json()["cancelled"] == 1
    time.sleep(0.3)
    assert slow.produced == produced < 200  # stopped, long before its 1000 tokens
    # A plain (non-streamed) request whose client times out is stopped too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server["base"] + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    wait_for(lambda: httpx.get(slow_server["base"] + "/health").json()["cancelled"] >= 2, timeout=10)
    assert httpx.get(slow_server["base"] + "/health").json()["cancelled"] == 2
    # And the server goes on answering.
    ok = httpx.post(slow_server["base"] + "/v1/chat/completions", timeout=60,
                    json={"messages": [{"role": "user", "content": "Count."}], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "tok tok tok "


def test_a_request_cancelled_while_queued_never_runs(slow_server):
    """A client that leaves while its request waits: the worker skips it (no generation)."""
    base, slow, health = slow_server["base"], slow_server["runtime"], slow_server["health"]
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 3}
    slow.gate.clear()
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=60)
        wait_for(lambda: health()["in_flight"] == 1)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the held one; its client gives up
            httpx.post(base + "/v1/chat/completions", json=body, timeout=1.0)
        time.sleep(0.6)  # the server looks at a waiting connection every quarter second
        slow.gate.set()
        assert first.result().status_code == 200
    wait_for(lambda: health()["in_flight"] == 0)
    after = health()
    assert after["completed"] == 1 and after["cancelled"] == 1 and after["queued_bytes"] == 0
    assert len(slow.configs) == 1  # the cancelled one never reached the model


def test_penalties_reach_the_token_chooser(slow_server):
    response = httpx.post(slow_server["base"] + "/v1/chat/completions", timeout=60, json={
        "messages": HI, "max_tokens": 2, "presence_penalty": 1.5, "frequency_penalty": -0.5, "seed": -7})
    assert response.status_code == 200, response.text
    config = slow_server["runtime"].configs[-1]
    assert (config.presence_penalty, config.frequency_penalty, config.seed) == (1.5, -0.5, -7)


def headers_only(port: int, length: int, timeout: float = 10.0) -> bytes:
    """Send a POST's headers, declaring ``length`` bytes of body, and none of the body: the reply."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % length)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):  # headers, then the JSON error
            piece = connection.recv(4096)
            if not piece:
                break
            reply += piece
        return reply


def test_a_full_queue_answers_429_before_reading_the_body(slow_server):
    """The 429 comes from the headers alone: the body is never read nor parsed (it was, ~0.3 s
    for 19 MB, before each 429)."""
    base, slow, health = slow_server["base"], slow_server["runtime"], slow_server["health"]
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 3}
    slow.gate.clear()
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = [pool.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=60)]
        wait_for(lambda: health()["in_flight"] == 1)
        held.append(pool.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=60))
        wait_for(lambda: health()["in_flight"] == 2)
        start = time.perf_counter()
        reply = headers_only(slow_server["port"], 19 << 20)
        assert reply.startswith(b"HTTP/1.1 429"), reply[:200]
        assert b"queue_full" in reply and time.perf_counter() - start < 5
        slow.gate.set()
        assert [future.result().status_code for future in held] == [200, 200]


def test_a_body_that_never_arrives_gets_408_and_its_place_back(slow_server, monkeypatch):
    """A client that declares a body and stalls holds a queue place only until the body timeout."""
    import socket

    from ftz_edge.serve import server as server_module

    monkeypatch.setattr(server_module, "BODY_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", slow_server["port"]), timeout=10) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{\"messages\": ")
        reply = connection.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    health = slow_server["health"]()
    assert health["in_flight"] == 0 and health["queued_bytes"] == 0


def test_admitted_bodies_are_bounded_in_bytes(default_bundle, shared_runtime):
    """Large bodies fill --max-queued-mb before the queue is full: the next large one gets 429,
    a small one still gets in."""
    slow = SlowRuntime(shared_runtime)
    running = start_server(default_bundle, slow, queue_size=4, max_request_bytes=1 << 20, max_queued_bytes=1 << 20)
    base, health = running["base"], running["health"]
    small = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 2}
    large = {"messages": [{"role": "user", "content": "x " * 300_000}], "max_tokens": 2}  # 0.6 MB
    try:
        slow.gate.clear()
        with ThreadPoolExecutor(max_workers=3) as pool:
            first = pool.submit(httpx.post, base + "/v1/chat/completions", json=large, timeout=60)
            wait_for(lambda: health()["in_flight"] == 1)
            refused = httpx.post(base + "/v1/chat/completions", json=large, timeout=60)
            assert refused.status_code == 429 and "passes the limit" in refused.json()["error"]["message"]
            second = pool.submit(httpx.post, base + "/v1/chat/completions", json=small, timeout=60)
            wait_for(lambda: health()["in_flight"] == 2)
            slow.gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert health()["queued_bytes"] == 0 and health()["rejected"] == 1
    finally:
        running["server"].should_exit = True
        running["thread"].join(timeout=10)


def test_sigterm_answers_queued_and_running_requests_503(default_bundle, shared_runtime):
    """A stop signal: the queued client gets a 503 with a message at once (it got an empty reply
    when uvicorn's grace period ran out); the running one gets the grace period less a second,
    then a 503 too, and the server exits."""
    slow = SlowRuntime(shared_runtime, delay=0.05)
    running = start_server(default_bundle, slow, grace_s=2.0, queue_size=2)
    base, health = running["base"], running["health"]
    long = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 1000}  # 50 s if not stopped
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(httpx.post, base + "/v1/chat/completions", json=long, timeout=60)
        wait_for(lambda: slow.produced > 0)
        queued = pool.submit(httpx.post, base + "/v1/chat/completions", json=long, timeout=60)
        wait_for(lambda: health()["in_flight"] == 2)
        start = time.perf_counter()
        running["server"].handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        answer = queued.result()
        assert answer.status_code == 503 and time.perf_counter() - start < 1.5
        assert answer.json()["error"]["code"] == "shutting_down" and "shutting down" in answer.json()["error"]["message"]
        stopped = first.result()
        assert stopped.status_code == 503 and stopped.json()["error"]["code"] == "shutting_down"
    running["thread"].join(timeout=10)
    assert not running["thread"].is_alive()
    assert slow.produced < 100  # stopped after about its second of grace, not at its 1000th token
    service = running["server"].config.app.state.service
    assert service.counts["shut_down"] == 2 and service.in_flight == 0 and service.queued_bytes == 0


class FailingRuntime(SlowRuntime):
    """A runtime whose backend breaks mid-answer (as a lost GPU would)."""

    def stream(self, messages, images, config):
        def steps(generation):
            yield "partial "
            raise RuntimeError("the accelerator fell over")

        return Generation(steps)


def test_a_backend_failure_is_a_500_and_the_server_carries_on(shared_runtime, default_bundle):
    from fastapi.testclient import TestClient

    from ftz_edge.serve.server import ServeConfig, create_app

    app = create_app(ServeConfig(bundle=str(default_bundle)), runtime=FailingRuntime(shared_runtime))
    with TestClient(app) as http:
        response = http.post("/v1/chat/completions", json={"messages": HI})
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and "RuntimeError: the accelerator fell over" in error["message"]
        # Streamed: the headers went out with the first token, so the error is the last event.
        with http.stream("POST", "/v1/chat/completions", json={"messages": HI, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line]
        assert stream.status_code == 200 and "partial" in events[1]
        assert json.loads(events[-1][6:])["error"]["type"] == "server_error"
        health = http.get("/health").json()
        assert health["failed"] == 2 and health["in_flight"] == 0 and health["status"] == "ready"


def test_text_that_reaches_the_worker_unchecked_is_still_a_400(shared_runtime, default_bundle):
    """The backstop behind the parser: the runtime's own refusal of text that is not UTF-8 is a
    400 naming the message (it was tokenizers' TypeError, a 500)."""
    from ftz_edge.runtime.generation import GenerationConfig
    from ftz_edge.serve.server import Job, ModelService, ServeConfig

    class Direct:  # delivers the worker's events at once (no event loop needed)
        def call_soon_threadsafe(self, callback, *args):
            callback(*args)

    service = ModelService(ServeConfig(bundle=str(default_bundle)), runtime=shared_runtime)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi \ud800"}]
    job = Job(Direct(), messages, [], GenerationConfig(max_new_tokens=2), size=10)
    service.admit(10)
    service.live.add(job)
    service._run(job)
    kind, error = job.events.get_nowait()
    assert kind == "error" and error.status == 400 and error.param == "messages.1.content"
    assert service.counts["invalid"] == 1 and service.in_flight == 0 and service.queued_bytes == 0


def test_a_request_admitted_just_before_a_stop_signal_is_counted_as_shut_down(shared_runtime, default_bundle):
    """The race the SIGTERM test met once: admitted (in_flight counted), then the signal, then
    submit: it is answered 503 and counted shut_down like a queued request (it was not counted)."""
    from ftz_edge.runtime.generation import GenerationConfig
    from ftz_edge.serve.server import APIError, Job, ModelService, ServeConfig

    service = ModelService(ServeConfig(bundle=str(default_bundle)), runtime=shared_runtime)
    job = Job(None, [{"role": "user", "content": "hi"}], [], GenerationConfig(max_new_tokens=2), size=10)
    service.admit(10)
    service.drain(None)  # the stop signal: nothing queued or running yet
    with pytest.raises(APIError) as refused:
        service.submit(job)
    assert refused.value.status == 503 and refused.value.code == "shutting_down"
    service.release(10)  # what the request handler does with a refused admission
    assert service.counts["shut_down"] == 1 and service.in_flight == 0 and service.queued_bytes == 0


def test_warming_server_answers_503_then_ready(default_bundle, monkeypatch):
    """Before the model is loaded and warmed up, /health says warming and requests get 503."""
    from fastapi.testclient import TestClient

    from ftz_edge.serve.server import ModelService, ServeConfig, create_app

    release = threading.Event()
    original = ModelService.load

    def slow_load(self):
        release.wait(30)
        original(self)

    monkeypatch.setattr(ModelService, "load", slow_load)
    app = create_app(ServeConfig(bundle=str(default_bundle)))
    with TestClient(app) as http:
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "warming"
        response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_warming"
        release.set()
        deadline = time.time() + 60
        while time.time() < deadline and http.get("/health").status_code != 200:
            time.sleep(0.1)
        assert http.get("/health").json()["status"] == "ready"
        assert app.state.service.runtime.warmup_ms is not None  # warm start ran before "ready"


def test_cli_refuses_a_bad_bundle_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ftz_edge.serve.server", "--bundle", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("ftz-serve: error:") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
