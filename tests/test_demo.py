"""ftz-demo (demo/app.py): the chat callback, a real server driven by gradio_client, no torch
imported, and the page rendered by headless Chromium (screenshot kept in test-artifacts/)."""

import copy
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gradio as gr  # the dev extra brings it: a missing one must fail, not skip

from conftest import free_port, stop_process  # noqa: E402
from ftz_edge.demo import app as demo  # noqa: E402
from ftz_edge.runtime.engine import Conversation, FtZRuntime, Timings  # noqa: E402
from ftz_edge.prompt import IMAGE_PLACEHOLDER  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
SERVER_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def assistant_text(message) -> str:
    """Text of a Chatbot message: a str in the callback, a list of typed parts through the API."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bundle(default_bundle):
    """The shipped default model's bundle: conftest's ``default_bundle`` builds it once per session
    with ensure_default_bundle() into a tmp_path_factory cache (FTZ_EDGE_CACHE), never the user's."""
    assert (default_bundle / "manifest.json").is_file()
    assert Path(os.environ["FTZ_EDGE_CACHE"]) in default_bundle.parents
    return default_bundle


@pytest.fixture(scope="module")
def runtime(bundle):
    return FtZRuntime(bundle)


@pytest.fixture(scope="module")
def examples():
    items = demo.load_examples()
    assert len(items) >= 2 and all(Path(e["image"]).is_file() for e in items)
    return {Path(e["image"]).name: e for e in items}


@pytest.fixture(scope="module")
def COLOR(examples):
    """File name of the shipped colour example ("What color is the circle?")."""
    return next(name for name, e in examples.items() if e["qtype"] == "color")


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """``python -m ftz_edge.demo.app`` on a free port of 127.0.0.1; yields its URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ftz_edge.demo.app", "--bundle", str(bundle), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **SERVER_ENV})
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ftz-demo exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ftz-demo did not answer on {url} within 180 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process(proc)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


# ------------------------------------------------------------------------------ bad images


def corrupt_png(path: Path, magic: bool = True) -> Path:
    """A PNG signature and garbage after it (``magic=False``: not even the signature)."""
    path.write_bytes((b"\x89PNG\r\n\x1a\n" if magic else b"") + b"not really a png" * 8)
    return path


def huge_png(path: Path, width: int = 10_000, height: int = 8_000) -> Path:
    """A tiny file whose header claims width x height (80 MP > load_image's 64 MP guard)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


# ------------------------------------------------------------------------------ unit: the callback


def test_chat_streams_an_answer_and_keeps_sessions_apart(runtime, examples, COLOR):
    example = examples[COLOR]
    image, question = example["image"], example["question"]
    reference = runtime.ask(image, question).run()
    expected = reference.text
    assert expected.strip()
    follow_up = "Is there a circle? Answer with one word."
    replay = Conversation(runtime)
    "".join(replay.ask(question, [image]))
    expected_follow_up = "".join(replay.ask(follow_up, []))

    steps = list(demo.chat(runtime, None, image, question))
    assert len(steps) >= 2  # a placeholder first, then the streamed text
    history, panel, session, box = steps[-1]
    assert isinstance(session, demo.ChatSession)
    assert [m["role"] for m in history] == ["user", "user", "assistant"]
    assert history[0]["content"]["path"] == image  # the image, shown in the chat
    assert history[1]["content"] == question
    assert history[2]["content"] == expected.strip()
    streamed = [assistant_text(step[0][-1]) for step in steps[1:]]
    assert all(expected.startswith(text) for text in streamed)  # each step a prefix of the answer
    assert box == ""  # the textbox is cleared
    # The timings panel: this answer's numbers and the backend + precision.
    assert len(session.timings) == 1
    timings = Timings.from_dict(session.timings[0])  # this answer's own (the runtime keeps none)
    assert (timings.prompt_tokens, timings.new_tokens) == (reference.timings.prompt_tokens, reference.timings.new_tokens)
    assert "**Answer 1**" in panel and "time to first token" in panel
    assert f"{timings.prompt_tokens} tokens" in panel
    # Which backend and precision answered, e.g. "vision: onnxruntime (CPUExecutionProvider), fp32 · LLM: ...".
    b = runtime.backends
    backend = f"vision: {b['vision']}, {b['vision_precision']} · LLM: {b['llm']}, {b['llm_precision']}"
    assert demo.backend_text(b) == backend and b["vision"].startswith("onnxruntime (") and b["llm_precision"]
    assert f"**Answer 1** — answered by {backend}" in panel
    assert session.backends == [b]
    assert session.timings == [timings.to_dict()] and timings.new_tokens >= 1
    # Before the answer the panel shows no timings yet, and which backend will answer.
    assert "Answer" not in steps[0][1] and f"**Backend** — {backend}" in steps[0][1]

    # A follow-up in the same session, the same image still in the box: not attached again.
    *_, (history, panel, same, _) = demo.chat(runtime, session, image, follow_up)
    assert same is session and len(session.conversation.images) == 1
    assert [m["role"] for m in session.conversation.messages] == ["user", "assistant"] * 2
    assert history[-1] == {"role": "assistant", "content": expected_follow_up.strip()}
    assert len(history) == 5 and f"**Answer 2** — answered by {backend}" in panel
    assert len(session.backends) == 2 and copy.deepcopy(session).backends == session.backends

    # Another browser session: its own conversation; the first one is untouched.
    other_example = next(e for name, e in examples.items() if name != COLOR)
    *_, (other_history, _, other, _) = demo.chat(runtime, None, other_example["image"], other_example["question"])
    assert other is not session and len(other.conversation.messages) == 2 and len(other_history) == 3
    assert len(session.conversation.messages) == 4 and len(session.history) == 5
    # Without an image the other session still answers follow-ups about its own image.
    *_, (other_history, _, _, _) = demo.chat(runtime, other, None, follow_up)
    assert other_history[-1]["role"] == "assistant" and assistant_text(other_history[-1]).strip()
    assert len(other.conversation.images) == 1

    # "New chat" drops the session, the chat, the image and the question.
    state, chat_value, image_value, box, panel, more = demo.new_chat(runtime)
    assert (state, chat_value, image_value, box, more) == (None, [], None, "", None) and "Answer" not in panel


def test_several_images_in_one_question(runtime, examples, COLOR):
    first, second = examples[COLOR]["image"], next(e["image"] for e in examples.values() if e["image"] != examples[COLOR]["image"])
    question = "Which image has more shapes?"
    replay = Conversation(runtime)
    expected = "".join(replay.ask(question, [first, second]))
    *_, (history, panel, session, _) = demo.chat(runtime, None, first, question, more_images=[second, first])
    # The repeated first image is attached once; both are shown, in order, before the question.
    assert [m["content"]["path"] for m in history[:2]] == [first, second]
    assert history[2]["content"] == question and history[3]["content"] == expected.strip()
    assert len(session.conversation.images) == 2 and session.conversation.images == [first, second]
    assert session.conversation.messages[0]["content"].count(IMAGE_PLACEHOLDER) == 2
    assert session.timings[-1]["images"] == 2
    # A broken extra image refuses the question and attaches nothing.
    *_, (history, _, session, box) = demo.chat(runtime, None, first, question, more_images=[__file__])
    assert "Could not read the image" in history[-1]["content"] and box == question
    assert session.image_keys == []


def test_bad_uploads_become_readable_chat_messages(runtime, examples, tmp_path, COLOR):
    question = "What is this?"

    def last_turn(session, image):
        steps = list(demo.chat(runtime, session, image, question))
        assert len(steps) == 1  # refused at once, nothing streamed
        history, _, session, box = steps[0]
        assert history[-2] == {"role": "user", "content": question}
        assert history[-1]["role"] == "assistant" and "Traceback" not in history[-1]["content"]
        assert box == question  # kept for another try
        assert session.conversation.messages == []  # the model never ran
        return history[-1]["content"], session

    message, session = last_turn(None, str(corrupt_png(tmp_path / "broken.png", magic=False)))
    assert message.startswith("Could not read the image:") and "'broken.png'" in message
    assert "not a recognised image file" in message and str(tmp_path) not in message

    # The upload as Gradio hands it over (preprocess=False): shown under its original name.
    payload = {"path": str(corrupt_png(tmp_path / "upload-7f3a.png")), "orig_name": "holiday.png",
               "meta": {"_type": "gradio.FileData"}}
    message, session = last_turn(session, payload)
    assert message.startswith("Could not read the image:") and "'holiday.png'" in message and "7f3a" not in message
    assert "truncated or corrupt" in message

    message, session = last_turn(session, str(huge_png(tmp_path / "huge.png")))
    assert message.startswith("Could not read the image:") and "10000x8000" in message and "max_pixels" in message

    message, session = last_turn(session, np.zeros((4, 4, 2), dtype=np.uint8))  # not an image layout
    assert message.startswith("Could not read the image:")

    message, session = last_turn(session, None)  # nothing uploaded and nothing in the conversation
    assert message == demo.NO_IMAGE_MESSAGE
    assert len(session.history) == 10  # every refusal is in the chat

    # Odd but valid modes are answered: 16-bit grayscale and palette with transparency.
    source = Image.open(examples[COLOR]["image"])
    odd16 = tmp_path / "gray16.png"
    Image.fromarray((np.asarray(source.convert("L"), dtype=np.uint16) * 257)).save(odd16)
    assert Image.open(odd16).mode.startswith("I")
    palette = source.convert("RGBA").convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    for odd in (str(odd16), palette):
        *_, (history, _, fresh, _) = demo.chat(runtime, None, odd, question)
        assert history[-1]["role"] == "assistant" and not history[-1]["content"].startswith("Could not")
        assert len(fresh.conversation.messages) == 2 and fresh.timings

    # The session that saw the refusals still works with a good image.
    *_, (history, _, session, _) = demo.chat(runtime, session, examples[COLOR]["image"], question)
    assert len(session.conversation.messages) == 2 and not history[-1]["content"].startswith("Could not")


def test_settings_and_app_wiring(runtime, examples, COLOR):
    config = demo.make_config(16, 0.7, 5, 0.9, 1.1, 3.0, "Q:\n\\n")
    assert (config.max_new_tokens, config.top_k, config.seed, config.stop) == (16, 5, 3, ["Q:", "\n"])
    assert demo.make_config(seed="").seed is None
    *_, (history, _, _, _) = demo.chat(runtime, None, examples[COLOR]["image"], "Hi", top_p=0.0)
    assert history[-1]["content"].startswith("Invalid generation settings:") and "top_p" in history[-1]["content"]

    app = demo.build_app(runtime, list(examples.values()))
    assert isinstance(app, gr.Blocks)
    chat_fns = [fn for fn in app.fns.values() if fn.api_name in ("chat", "chat_submit")]
    assert len(chat_fns) == 2
    for fn in chat_fns:  # one model run at a time over both triggers, raw uploads to the callback
        assert fn.concurrency_limit == 1 and fn.concurrency_id == demo.CHAT_CONCURRENCY_ID
        assert fn.queue and not fn.preprocess
    assert app._queue.max_size == demo.QUEUE_MAX_SIZE
    datasets = [b for b in app.blocks.values() if isinstance(b, gr.Dataset)]
    assert len(datasets) == 1 and len(datasets[0].samples) == len(examples)
    assert sum(isinstance(b, gr.State) for b in app.blocks.values()) == 1


# ------------------------------------------------------------------------------ no torch


@pytest.mark.slow
def test_demo_never_imports_torch(bundle, examples, COLOR):
    code = textwrap.dedent("""
        import json, sys
        from ftz_edge.demo.app import build_app, chat, load_examples
        from ftz_edge.runtime.engine import FtZRuntime
        runtime = FtZRuntime(sys.argv[1])
        app = build_app(runtime, load_examples())
        *_, (history, _, _, _) = chat(runtime, None, sys.argv[2], "What color is the circle?")
        print(json.dumps({"bad": sorted(m for m in ("torch", "transformers") if m in sys.modules),
                          "gradio": "gradio" in sys.modules, "answer": history[-1]["content"]}))
    """)
    result = subprocess.run([sys.executable, "-c", code, str(bundle), examples[COLOR]["image"]], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **SERVER_ENV})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["bad"] == [] and report["gradio"] and report["answer"].strip()


# ------------------------------------------------------------------------------ real server


@pytest.mark.slow
def test_gradio_client_round_trip(server, runtime, examples, tmp_path, COLOR):
    from gradio_client import Client, handle_file

    example = examples[COLOR]
    expected = runtime.answer(example["image"], example["question"]).strip()
    settings = dict(max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, stop="")
    client = Client(server, verbose=False, download_files=False)

    # A corrupt upload first: a readable assistant message, and the session goes on.
    job = client.submit(handle_file(str(corrupt_png(tmp_path / "broken.png"))), "What is this?", api_name="/chat",
                        **settings)
    history, _, box = job.result(timeout=120)
    assert assistant_text(history[-1]).startswith("Could not read the image:") and "broken.png" in assistant_text(history[-1])
    assert box == "What is this?"

    job = client.submit(handle_file(example["image"]), example["question"], api_name="/chat", **settings)
    history, panel, box = job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) >= 2  # streamed: the placeholder, then the text
    assert assistant_text(outputs[0][0][-1]) == demo.STARTED_MESSAGE
    assert [m["role"] for m in history][-3:] == ["user", "user", "assistant"]
    assert history[-3]["content"][0]["type"] == "file"  # the uploaded image is shown in the chat
    assert assistant_text(history[-1]) == expected and expected
    assert f"**Answer 1** — answered by {demo.backend_text(runtime.backends)}" in panel and box == ""

    # The same client (= one browser session) keeps its conversation: a follow-up without image.
    history, panel, _ = client.predict(None, "Is there a circle? Answer with one word.", api_name="/chat", **settings)
    assert assistant_text(history[-1]).strip() and "**Answer 2**" in panel

    # Another client is another session: no image in its conversation yet.
    other = Client(server, verbose=False, download_files=False)
    history, _, _ = other.predict(None, "And now?", api_name="/chat", **settings)
    assert len(history) == 2 and assistant_text(history[-1]) == demo.NO_IMAGE_MESSAGE

    # "New chat" through the API: this session starts over, without an image.
    chat_value, image_value, box, panel, more = client.predict(api_name="/new_chat")
    assert (chat_value, image_value, box) == ([], None, "") and "Answer" not in panel
    history, _, _ = client.predict(None, "And now?", api_name="/chat", **settings)
    assert len(history) == 2 and assistant_text(history[-1]) == demo.NO_IMAGE_MESSAGE


# ------------------------------------------------------------------------------ real browser


@pytest.mark.slow
def test_page_renders_in_headless_chromium(server, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install -y chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo.png"
    shot.unlink(missing_ok=True)
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--dump-dom", "--window-size=1280,900",
               "--virtual-time-budget=15000", server]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-3000:]
    # The DOM after the page's JavaScript ran: the app's components were rendered (these ids are
    # not in the HTML the server sends, only in what the Svelte front end builds from it).
    dom = result.stdout
    assert 'id="ftz-chat"' in dom and 'id="ftz-timings"' in dom and "<h2>FtZ image chat" in dom, dom[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with Image.open(shot) as image:
        assert image.size == (1280, 900)
        pixels = np.asarray(image.convert("RGB"))
    # A rendered app, not a blank or error page: many colours and a good share of non-white pixels.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    assert (pixels.min(axis=2) < 235).mean() > 0.03
