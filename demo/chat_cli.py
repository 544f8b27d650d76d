"""``ftz-chat``: ask about images from the terminal, answers streamed, timings printed.

    ftz-chat --image photo.jpg "What is written on the sign?"     # one question
    ftz-chat --image photo.jpg                                     # interactive, multi-turn
    ftz-chat --image a.jpg --image b.jpg "What differs?"           # several images in one question
    ftz-chat --example 0                                           # a shipped example image + question

With no ``--bundle`` it uses the shipped default model's bundle, building it once (with
ftz-export, in a separate process: this one never imports torch) into the user cache.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import ftz_edge
from ftz_edge.cli.args import DataclassOptions, Flag, OneLineParser
from ftz_edge.cli.default_bundle import ensure_default_bundle
from ftz_edge.manifest import BundleError

DEFAULT_MODEL = ftz_edge.DEFAULT_MODEL


def main(argv: Optional[List[str]] = None) -> int:
    """Every error a user can cause (an option, a bundle, an image, text that is not UTF-8) ends
    as one "ftz-chat: error: ..." line on stderr and exit status 2; Ctrl-C exits 130."""
    try:
        return chat(argv)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (| head): nothing left to say
        sys.stdout = open(os.devnull, "w")  # so that the interpreter's last flush does not fail again
        return 1


def chat(argv: Optional[List[str]]) -> int:
    from ftz_edge.prompt import check_encodable
    from ftz_edge.runtime.engine import Conversation, FtZRuntime
    from ftz_edge.runtime.generation import GenerationConfig

    parser = OneLineParser(prog="ftz-chat", description="Ask an FtZ bundle about images.")
    parser.add_argument("question", nargs="?", help="ask once and exit; without it: an interactive chat")
    parser.add_argument("--bundle", help="bundle folder from ftz-export (default: the shipped default model's)")
    parser.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    parser.add_argument("--example", type=int, metavar="N",
                        help="ask the shipped default model's example N (its image and question)")
    # The sampling options: one per GenerationConfig field.
    generation_options = DataclassOptions(GenerationConfig, flags={
        "temperature": Flag(help="0 = greedy"), "presence_penalty": Flag(help="OpenAI's, -2..2"),
        "frequency_penalty": Flag(help="OpenAI's, -2..2"), "stop": Flag(help="stop string (repeatable)")})
    generation_options.add_to(parser)
    parser.add_argument("--provider", action="append", help="onnxruntime execution provider (repeatable, in order)")
    parser.add_argument("--system", help="system prompt")
    args = parser.parse_args(argv)
    if args.example is not None:
        examples = json.loads((DEFAULT_MODEL / "examples" / "examples.json").read_text())
        if not 0 <= args.example < len(examples):
            parser.error(f"--example must be 0..{len(examples) - 1}")
        example = examples[args.example]
        args.image.append(str(DEFAULT_MODEL / "examples" / example["image"]))
        args.question = args.question or example["question"]
        print(f"[example {args.example}: {example['image']}, expected answer {example['answer']!r}]", file=sys.stderr)
        print(f"you> {args.question}", file=sys.stderr)
    try:
        config = generation_options.build(args)
        # Undecodable bytes on a command line arrive as lone surrogates: refused before the model loads.
        for text, where in ((args.question, "the question"), (args.system, "--system")):
            if text is not None:
                check_encodable(text, where)
        # Interactive: warm up at load, so the first answer is as quick as the later ones.
        runtime = FtZRuntime(args.bundle or ensure_default_bundle(), providers=args.provider,
                             warmup=args.question is None)
        chat = Conversation(runtime, args.system)
        print(f"[{runtime.backends['vision']} {runtime.backends['vision_precision']}, "
              f"LLM {runtime.backends['llm']} {runtime.backends['llm_precision']}]", file=sys.stderr)
        images = list(args.image)
        questions = [args.question] if args.question else None
        if questions is None and hasattr(sys.stdin, "reconfigure"):
            # Undecodable bytes typed in arrive as lone surrogates (refused with one error line,
            # the chat goes on) instead of a strict decoder dropping what was read with them.
            sys.stdin.reconfigure(errors="surrogateescape")
        while True:
            if questions is not None:
                if not questions:
                    break
                question = questions.pop()
            else:
                try:
                    question = input("you> ").strip()
                except EOFError:
                    break
                except UnicodeDecodeError as err:  # stdin that could not be reconfigured above
                    print(f"ftz-chat: error: the input is not UTF-8 text ({err.reason}); type it again", file=sys.stderr)
                    continue
                if question in ("", "/quit", "/exit"):
                    break
                if question.startswith("/image "):
                    images.append(question.split(" ", 1)[1].strip())
                    print("(image added; it goes with your next question)", file=sys.stderr)
                    continue
            print("ftz> " if questions is None else "", end="", flush=True)
            streamed = questions is None  # something on stdout's current line
            generation = chat.ask(question, images, config)
            try:
                for delta in generation:
                    print(delta, end="", flush=True)
                    streamed = True
            except ValueError as err:  # an unreadable image, a prompt past the context, text that is not UTF-8
                if streamed:
                    print()
                print(f"ftz-chat: error: {err}", file=sys.stderr)
                if questions is not None:
                    return 2
                continue
            finally:
                images = []  # an image goes with one question, used or refused
            print()
            print(f"[{generation.timings.summary()}]", file=sys.stderr)
            for note in generation.timings.notes:
                print(f"[note: {note}]", file=sys.stderr)
    except (BundleError, ValueError) as err:
        print(f"ftz-chat: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
