"""``ftz-demo``: a local Gradio chat about images with an FtZ bundle (torch-free).

    ftz-demo                                  # the shipped default model, http://127.0.0.1:7860
    ftz-demo --bundle out/bundle --port 8080 --auth alice:secret

Each browser session has its own ``Conversation`` (a ``gr.State``); the runtime is shared and the
chat event runs one request at a time (concurrency limit 1, bounded queue), so two users never
run the model at once. Bad uploads (corrupt, too large, odd modes, none at all) come back as an
assistant message in the chat, never as a traceback. It binds 127.0.0.1 unless told otherwise
and never opens a public link unless ``--share`` is given. After each answer the side panel
(#ftz-timings) shows its timings and the backend and precision that gave it. The components have
elem_ids (#ftz-image, #ftz-question, #ftz-send, #ftz-chat, ...) that tests/test_browser.py uses.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import gradio as gr

import ftz_edge
from ftz_edge.preprocess import ImageLoadError, load_image
from ftz_edge.prompt import IMAGE_PLACEHOLDER, PromptError
from ftz_edge.runtime.engine import ContextLengthError, Conversation, FtZRuntime, Timings
from ftz_edge.runtime.generation import GenerationConfig

log = logging.getLogger("ftz_edge.demo")

EXAMPLES_DIR = ftz_edge.DEFAULT_MODEL / "examples"
CHAT_CONCURRENCY_ID = "ftz-model"
QUEUE_MAX_SIZE = 16  # waiting requests beyond this are refused ("queue is full") rather than piling up
MAX_UPLOAD = "25mb"  # an upload is refused above this; load_image's pixel guard catches the rest

NO_IMAGE_MESSAGE = "Please upload an image first (or pick one of the examples below), then ask about it."
STARTED_MESSAGE = "…"


# ------------------------------------------------------------------------------ session state


@dataclass
class ChatSession:
    """One browser session: its conversation with the model and what its chat shows."""

    conversation: Conversation
    history: List[dict] = field(default_factory=list)  # the Chatbot's messages
    image_keys: List[str] = field(default_factory=list)  # the images the conversation holds
    timings: List[dict] = field(default_factory=list)  # Timings.to_dict() of each answer
    backends: List[dict] = field(default_factory=list)  # FtZRuntime.backends that gave each answer

    def __deepcopy__(self, memo):  # gr.State may copy values; the runtime (ONNX sessions) is shared
        copy = ChatSession(Conversation(self.conversation.runtime))
        copy.conversation.messages = [dict(m) for m in self.conversation.messages]
        copy.conversation.images = list(self.conversation.images)
        copy.history = [dict(m) for m in self.history]
        copy.image_keys, copy.timings = list(self.image_keys), list(self.timings)
        copy.backends = [dict(b) for b in self.backends]
        return copy


def load_examples(folder: Path = EXAMPLES_DIR) -> List[dict]:
    """The shipped examples: [{image (absolute path), qtype, question, answer}, ...]."""
    folder = Path(folder)
    items = json.loads((folder / "examples.json").read_text())
    return [{**item, "image": str((folder / item["image"]).resolve())} for item in items]


# ------------------------------------------------------------------------------ helpers


@dataclass
class _Image:
    source: Any  # what the runtime gets: a file path or a loaded PIL image
    key: str  # identity, to tell a new upload from the image already in the conversation
    display_path: Optional[str]  # shown in the chat when it is a file
    name: str  # the user's name for it (for messages)


def _payload_path(value: Any) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(path, data-URL, original name) of an image value: a Gradio FileData dict, a path or None."""
    if isinstance(value, dict):
        url = value.get("url")
        return value.get("path"), url if isinstance(url, str) and url.startswith("data:") else None, value.get("orig_name")
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value), None, None
    return None, None, None


def _read_image(value: Any, known: Sequence[str] = ()) -> Optional[_Image]:
    """The image the user gave, validated (raises ImageLoadError with a readable message); None
    when there is none or it is one of the ``known`` images (already in the conversation)."""
    if value is None:
        return None
    path, data_url, orig_name = _payload_path(value)
    if path is not None:
        key = "path:" + str(Path(path).resolve())
        if key in known:  # Gradio names uploads by content: the same file is the same image
            return None
        name = orig_name or Path(path).name
        try:
            load_image(path)  # checks it decodes (and its size) before anything is shown or run
        except ImageLoadError as err:
            raise ImageLoadError(str(err).replace(f"'{path}'", f"'{name}'")) from None
        return _Image(source=path, key=key, display_path=path, name=name)
    if data_url is not None:  # a base64 data URL (e.g. pasted)
        try:
            data = base64.b64decode(data_url.split(",", 1)[1], validate=False)
        except (ValueError, IndexError) as err:
            raise ImageLoadError(f"cannot read image: bad data URL ({err})") from None
        value = data
    if isinstance(value, dict):
        raise ImageLoadError("cannot read image: the upload has no file")
    try:
        image = load_image(value)
    except TypeError as err:
        raise ImageLoadError(f"cannot read image: {err}") from None
    key = f"pixels:{image.size}:{hashlib.sha1(image.tobytes()).hexdigest()}"
    return None if key in known else _Image(source=image, key=key, display_path=None, name="image")


def _parse_stop(text: Any) -> List[str]:
    """Stop strings, one per line; ``\\n`` and ``\\t`` stand for a newline and a tab."""
    if not text:
        return []
    if isinstance(text, (list, tuple)):
        return [str(s) for s in text if s]
    return [line.replace("\\n", "\n").replace("\\t", "\t") for line in str(text).splitlines() if line]


def make_config(max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                seed=None, stop=None) -> GenerationConfig:
    seed = None if seed in (None, "") else int(float(seed))
    return GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                            top_p=float(top_p), repetition_penalty=float(repetition_penalty), seed=seed,
                            stop=_parse_stop(stop))


def backend_text(backends: dict) -> str:
    """E.g. "vision: onnxruntime (CPUExecutionProvider), fp32 · LLM: onnxruntime (CPUExecutionProvider), int4"."""
    b = backends
    return f"vision: {b['vision']}, {b['vision_precision']} · LLM: {b['llm']}, {b['llm_precision']}"


def backend_markdown(runtime: FtZRuntime) -> str:
    return f"**Backend** — {backend_text(runtime.backends)}"


def timings_markdown(runtime: FtZRuntime, timings: Optional[Timings], turn: int = 0,
                     backends: Optional[dict] = None) -> str:
    """The side panel: before any answer the backend that will answer; after one, which backend and
    precision gave answer ``turn`` (``backends``, default the runtime's) and its timings."""
    if timings is None:
        return backend_markdown(runtime) + "\n\n*Timings of each answer appear here.*"
    lines = [f"**Answer {turn}** — answered by {backend_text(backends or runtime.backends)}"]
    t = timings
    rows = [("preprocess", f"{t.preprocess_ms:.1f} ms"), ("vision", f"{t.vision_ms:.1f} ms" + (f" ({t.images_from_cache}/{t.images} image(s) from cache)"
                                                if t.images_from_cache else "")),
            ("prefill", f"{t.prefill_ms:.1f} ms ({t.prompt_tokens} tokens)"),
            ("time to first token", f"{t.time_to_first_token_ms:.1f} ms"),
            ("decode", f"{t.decode_tokens_per_s:.1f} tok/s ({t.new_tokens} new tokens)" if t.new_tokens > 1
             else f"n/a ({t.new_tokens} new token{'' if t.new_tokens == 1 else 's'})"),
            ("total", f"{t.total_ms:.1f} ms")]
    if t.peak_rss_mb is not None:
        rows.append(("peak RSS", f"{t.peak_rss_mb:.0f} MB"))
    if t.gpu_memory_used_mb is not None:
        rows.append(("GPU memory", f"{t.gpu_memory_used_mb:.0f} MB"))
    lines += ["", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += [f"\n*note: {note}*" for note in t.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the chat callback


def chat(runtime: FtZRuntime, session: Optional[ChatSession], image: Any, question: Any,
         max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None,
         stop=None, more_images: Any = None) -> Iterator[Tuple[List[dict], str, ChatSession, str]]:
    """Answer ``question`` about ``image`` and ``more_images`` (a list, for several images in one
    question) or about the conversation's images, streaming.

    Yields (chat history, timings markdown, session, textbox value). ``image`` is what the Image
    component holds (a Gradio FileData dict, a path, a PIL image or None); when it is the image
    the conversation already has, the question is a follow-up about it. Problems with the image,
    the settings or the context length come back as an assistant message, not an exception.
    """
    if session is None:
        session = ChatSession(Conversation(runtime))
    previous = session.timings[-1] if session.timings else None
    panel = timings_markdown(runtime, Timings.from_dict(previous) if previous else None, len(session.timings),
                             session.backends[-1] if session.backends else None)
    question = (question or "").replace(IMAGE_PLACEHOLDER, "").strip()
    if not question:  # nothing to ask: leave everything as it is
        yield session.history, panel, session, ""
        return

    def refuse(message: str):
        session.history = session.history + [{"role": "user", "content": question},
                                              {"role": "assistant", "content": message}]
        return session.history, panel, session, question  # the question stays in the box to retry

    new_images: List[_Image] = []
    try:  # an image already in the conversation gives None: a follow-up question
        for value in [image, *(more_images or [])]:
            new_image = _read_image(value, session.image_keys + [i.key for i in new_images])
            if new_image is not None:
                new_images.append(new_image)
    except ImageLoadError as err:
        yield refuse(f"Could not read the image: {err}")
        return
    if not new_images and not session.image_keys:
        yield refuse(NO_IMAGE_MESSAGE)
        return
    try:
        config = make_config(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    except (TypeError, ValueError) as err:
        yield refuse(f"Invalid generation settings: {err}")
        return

    shown: List[dict] = []
    for new_image in new_images:
        shown.append({"role": "user", "content": {"path": new_image.display_path, "alt_text": new_image.name}}
                     if new_image.display_path else {"role": "user", "content": f"🖼 *({new_image.name})*"})
    shown.append({"role": "user", "content": question})
    base = session.history + shown
    answer = ""
    yield base + [{"role": "assistant", "content": STARTED_MESSAGE}], panel, session, ""
    images = [new_image.source for new_image in new_images]
    generation = session.conversation.ask(question, images, config)  # this answer's own tokens and timings
    try:
        for delta in generation:
            answer += delta
            yield base + [{"role": "assistant", "content": answer}], panel, session, ""
    except ContextLengthError as err:
        session.history = base + [{"role": "assistant", "content":
                                   f"The conversation no longer fits the model's context: {err}. Press **New chat**."}]
        yield session.history, panel, session, question
        return
    except ImageLoadError as err:
        session.history = base + [{"role": "assistant", "content": f"Could not read the image: {err}"}]
        yield session.history, panel, session, question
        return
    except (PromptError, ValueError) as err:
        session.history = base + [{"role": "assistant", "content": f"Could not answer: {err}"}]
        yield session.history, panel, session, question
        return
    except Exception as err:  # a backend failure: logged with its traceback, shown as one line
        log.exception("generation failed")
        session.history = base + [{"role": "assistant", "content": f"Generation failed ({type(err).__name__}: {err})."}]
        yield session.history, panel, session, question
        return
    session.image_keys += [new_image.key for new_image in new_images]
    timings = generation.timings
    session.timings.append(timings.to_dict())
    session.backends.append(dict(runtime.backends))  # what answered: shown with this answer's timings
    session.history = base + [{"role": "assistant", "content": answer.strip() or "(no answer)"}]
    yield session.history, timings_markdown(runtime, timings, len(session.timings), session.backends[-1]), session, ""


def new_chat(runtime: FtZRuntime):
    """Outputs for "New chat": a fresh session, empty chat and images, reset panel."""
    return None, [], None, "", timings_markdown(runtime, None), None


# ------------------------------------------------------------------------------ the app


def build_app(runtime: FtZRuntime, examples: Optional[Sequence[dict]] = None) -> gr.Blocks:
    """The Gradio Blocks app for ``runtime``; ``examples`` as from ``load_examples()`` (default)."""
    examples = load_examples() if examples is None else list(examples)

    with gr.Blocks(title="FtZ image chat", analytics_enabled=False) as app:
        gr.Markdown("## FtZ image chat\nUpload an image, ask about it; follow-up questions keep the conversation.")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                # type="filepath" with preprocess=False on the chat event: the upload reaches the
                # callback undecoded, so a corrupt or huge file becomes a chat message (Gradio's own
                # decoding would fail before the callback, as an error toast).
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                 height=320, elem_id="ftz-image")
                # Several images in one question: each gets its own block of image tokens, in order.
                more_images = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                                      label="More images for this question (optional)", elem_id="ftz-more-images")
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(1, 512, value=128, step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (1 = off)")
                    repetition_penalty = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Repetition penalty (1 = off)")
                    seed = gr.Number(value=None, precision=0, label="Seed (empty = random)")
                    stop = gr.Textbox(value="", lines=2, label="Stop strings (one per line; \\n = newline)")
                timings = gr.Markdown(timings_markdown(runtime, None), elem_id="ftz-timings")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=480, elem_id="ftz-chat", feedback_options=None,
                                     placeholder="Answers stream here.")
                with gr.Row():
                    question = gr.Textbox(label="Question", placeholder="Ask about the image…", show_label=False, scale=5,
                                          lines=1, max_lines=4, submit_btn=False, elem_id="ftz-question")
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="ftz-send")
                clear = gr.Button("New chat", variant="secondary", elem_id="ftz-new-chat")
        if examples:
            gr.Examples(examples=[[e["image"], e["question"]] for e in examples], inputs=[image, question],
                        cache_examples=False, run_on_click=False, label="Examples (click one, then Send)")

        # The parameter names are the API's (gradio_client: predict(image, question, ..., api_name="/chat")).
        def on_send(state, image, question, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
                    more_images=None):
            yield from chat(runtime, state, image, question, max_new_tokens, temperature, top_k, top_p,
                            repetition_penalty, seed, stop, more_images)

        inputs = [session, image, question, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
                  more_images]
        outputs = [chatbot, timings, session, question]
        common = dict(fn=on_send, inputs=inputs, outputs=outputs, preprocess=False, concurrency_limit=1,
                      concurrency_id=CHAT_CONCURRENCY_ID, show_progress="minimal")
        send_event = send.click(api_name="chat", **common)
        submit_event = question.submit(api_name="chat_submit", api_visibility="undocumented", **common)
        clear.click(lambda: new_chat(runtime), inputs=None, outputs=[session, chatbot, image, question, timings, more_images],
                    cancels=[send_event, submit_event], queue=False, api_name="new_chat")
    app.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return app


# ------------------------------------------------------------------------------ CLI


def _parse_auth(text: Optional[str]):
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth must be USER:PASSWORD")
    return (user, password)


def main(argv: Optional[List[str]] = None) -> int:
    from ftz_edge.manifest import BundleError
    from ftz_edge.cli.default_bundle import ensure_default_bundle

    parser = argparse.ArgumentParser(prog="ftz-demo", description="A local Gradio chat about images with an FtZ bundle.")
    parser.add_argument("--bundle", help="bundle folder from ftz-export (default: the shipped default model's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", help="USER:PASSWORD required to open the page")
    parser.add_argument("--share", action="store_true", help="also open a public *.gradio.live link (off by default)")
    parser.add_argument("--provider", action="append", help="onnxruntime execution provider (repeatable, in order)")
    args = parser.parse_args(argv)
    try:
        auth = _parse_auth(args.auth)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.WARNING, format="ftz-demo: %(levelname)s: %(message)s")
    try:
        # Warm start: the first visitor's answer costs what later ones do.
        runtime = FtZRuntime(args.bundle or ensure_default_bundle("ftz-demo"), providers=args.provider, warmup=True)
    except (BundleError, ValueError, OSError) as err:
        print(f"ftz-demo: error: {err}", file=sys.stderr)
        return 2
    print(f"ftz-demo: {backend_markdown(runtime).replace('**', '')}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        print(f"ftz-demo: warning: listening on {args.host} without --auth", file=sys.stderr)
    if args.share and auth is None:
        print("ftz-demo: warning: --share makes a public link without --auth", file=sys.stderr)
    app = build_app(runtime)
    app.launch(server_name=args.host, server_port=args.port, auth=auth, share=bool(args.share),
               max_file_size=MAX_UPLOAD, ssr_mode=False, show_error=False, inbrowser=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
