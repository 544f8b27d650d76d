"""ftz-demo used the way a person uses it: a real Chromium (Debian's ``chromium``, driven by
Playwright through ``executable_path`` - no ``playwright install``, no browser download) opens the
page of a real server on the shipped default bundle, uploads an image, types, presses Send and
reads what the page shows: the streamed answer, the backend and precision that gave it, a
follow-up's answer, and the error messages for files that are not images.

The components are found by the elem_ids demo/app.py gives them (#ftz-image, #ftz-question,
#ftz-send, #ftz-chat, #ftz-timings), not by Gradio's generated classes. Where Chromium is not
installed the test skips with a reason naming it (conftest.py's CI allow-list); a missing
Playwright (the dev extra) is a failure in CI.
"""

import os
import shutil
import time
from pathlib import Path

import pytest

from ftz_edge.demo import app as demo
from ftz_edge.runtime.engine import Conversation
from test_demo import ARTIFACTS, COLOR, bundle, corrupt_png, examples, runtime, server  # noqa: F401  (fixtures)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ANSWER_TIMEOUT_MS = 60_000  # one answer of the default model takes well under a second on a CPU


def find_chromium():
    """``$FTZ_CHROMIUM`` (checked when the browser starts), else the first of CHROMIUM_NAMES on PATH, else None."""
    explicit = os.environ.get("FTZ_CHROMIUM")
    if explicit:
        return explicit
    return next((found for found in map(shutil.which, CHROMIUM_NAMES) if found), None)


CHROMIUM = find_chromium()
# Decided before any fixture runs: without Chromium no bundle is built and no server started.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install -y "
                                                          "chromium; or set FTZ_CHROMIUM)")]


@pytest.fixture(scope="module")
def browser():
    executable = CHROMIUM
    if not (Path(executable).is_file() and os.access(executable, os.X_OK)):
        pytest.fail(f"Chromium at {executable} is not an executable file (FTZ_CHROMIUM?)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, server):  # noqa: F811  (the fixture imported from test_demo)
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server)
    page.wait_for_selector("#ftz-send")
    try:
        yield page
    finally:
        try:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo-browser.png"), full_page=True)
        finally:
            context.close()
    assert errors == [], errors  # no uncaught JavaScript error on the page


# ------------------------------------------------------------------------------ page helpers


def bot_messages(page):
    return page.locator('#ftz-chat [data-testid="bot"]')


def upload(page, path) -> None:
    page.locator("#ftz-image input[type=file]").set_input_files(str(path))


# Records every text the new bot message shows while the reply streams (window.ftzSeen).
RECORD_STREAM = """n => {
    window.ftzSeen = [];
    const chat = document.querySelector('#ftz-chat');
    const record = () => {
        const bots = chat.querySelectorAll('[data-testid="bot"]');
        const text = bots.length > n ? bots[n].innerText.trim() : null;
        if (text !== null && window.ftzSeen[window.ftzSeen.length - 1] !== text) window.ftzSeen.push(text);
    };
    if (window.ftzObserver) window.ftzObserver.disconnect();
    window.ftzObserver = new MutationObserver(record);
    window.ftzObserver.observe(chat, {childList: true, subtree: true, characterData: true});
}"""


def streamed(page) -> list:
    """What the last reply showed as it streamed, in order (consecutive repeats dropped)."""
    return page.evaluate("window.ftzSeen")


def ask(page, question: str, answers_before: int, turn: int = 0) -> str:
    """Type ``question``, press Send and wait for the reply; its text as the page shows it.

    ``turn``: the answer's number - it has finished streaming when the panel shows that answer's
    timings (they come with the last step). 0: a refusal, shown at once as a new chat message."""
    page.locator("#ftz-question textarea").fill(question)
    page.evaluate(RECORD_STREAM, answers_before)
    page.locator("#ftz-send").click()
    if turn:
        page.wait_for_function("n => document.querySelector('#ftz-timings').innerText.includes(`Answer ${n} —`)",
                               arg=turn, timeout=ANSWER_TIMEOUT_MS)
    bot_messages(page).nth(answers_before).wait_for(timeout=ANSWER_TIMEOUT_MS)
    return bot_messages(page).nth(answers_before).inner_text().strip()


def panel_text(page) -> str:
    return " ".join(page.locator("#ftz-timings").inner_text().split())


# ------------------------------------------------------------------------------ the test


def test_chat_in_a_real_browser(page, runtime, examples, COLOR, tmp_path):  # noqa: F811  (fixtures)
    started = time.monotonic()
    example = examples[COLOR]
    expected = runtime.answer(example["image"], example["question"]).strip()  # greedy: deterministic
    follow_up = "Is there a circle? Answer with one word."
    replay = Conversation(runtime)
    "".join(replay.ask(example["question"], [example["image"]]))
    expected_follow_up = "".join(replay.ask(follow_up, [])).strip()
    assert expected and expected_follow_up
    backend = demo.backend_text(runtime.backends)
    assert backend == (f"vision: {runtime.backends['vision']}, {runtime.backends['vision_precision']} · "
                       f"LLM: {runtime.backends['llm']}, {runtime.backends['llm_precision']}")

    # Before any answer the panel says which backend will answer.
    assert f"Backend — {backend}" in panel_text(page) and "Answer 1" not in panel_text(page)

    # Upload the image, ask, read the streamed answer and the backend that gave it.
    upload(page, example["image"])
    page.wait_for_selector("#ftz-image img")
    assert ask(page, example["question"], 0, turn=1) == expected
    seen = streamed(page)  # the placeholder, then growing prefixes of the answer
    assert seen and seen[-1] == expected and all(t == demo.STARTED_MESSAGE or expected.startswith(t) for t in seen), seen
    panel = panel_text(page)
    assert f"Answer 1 — answered by {backend}" in panel, panel
    assert "time to first token" in panel and "prefill" in panel
    users = page.locator('#ftz-chat [data-testid="user"]')
    assert users.last.inner_text().strip() == example["question"]
    assert page.locator('#ftz-chat [data-testid="user"] img').count() == 1  # the image is shown in the chat
    assert page.locator("#ftz-question textarea").input_value() == ""  # the box was cleared

    # A follow-up about the same image (still in the box: not attached again).
    assert ask(page, follow_up, 1, turn=2) == expected_follow_up
    assert f"Answer 2 — answered by {backend}" in panel_text(page)
    assert page.locator('#ftz-chat [data-testid="user"] img').count() == 1

    # A file that is not an image, as a person would pick it: the page refuses it at once.
    text_file = tmp_path / "notes.txt"
    text_file.write_text("shopping list: milk, eggs\n")
    upload(page, text_file)
    toast = page.locator('[data-testid="toast-body"]').filter(has_text="notes.txt")
    toast.wait_for()
    assert "Invalid file type" in toast.inner_text() and "notes.txt" in toast.inner_text()

    # One that claims to be an image (a .png name, PNG signature, garbage after it) gets past the
    # browser: the app answers with a readable message in the chat, and the question stays.
    fake = corrupt_png(tmp_path / "holiday.png")
    upload(page, fake)
    page.wait_for_function("() => [...document.querySelectorAll('#ftz-image img')].some(i => i.src.includes('holiday'))")
    message = ask(page, "What is in this picture?", 2)
    assert message.startswith("Could not read the image:"), message
    assert "'holiday.png'" in message and "truncated or corrupt" in message and "Traceback" not in message
    assert page.locator("#ftz-question textarea").input_value() == "What is in this picture?"
    assert "Answer 2 — answered by" in panel_text(page)  # no new answer was made
    assert time.monotonic() - started < 60
