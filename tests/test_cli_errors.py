"""ftz-chat and ftz-serve turn every error class a user can cause into one "PROG: error: ..."
line on stderr and a non-zero exit, never a traceback: a missing bundle, a bad image, text that
is not UTF-8 (undecodable bytes on the command line), a bad option, a port in use.

The option matrix runs ``main`` in-process (an uncaught exception fails the test as a traceback
would); one case of each class runs as a real process, as a user starts it."""

import contextlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ftz_edge.demo import chat_cli
from ftz_edge.serve import server

EXAMPLE_IMAGE = Path(chat_cli.DEFAULT_MODEL) / "examples" / "008000.png"
UNDECODABLE = os.fsdecode(b"x\xff")  # what Python makes of the byte 0xff in argv: a lone surrogate


def one_error_line(stderr: str, prog: str, expect: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"{prog}: error: ") and expect in errors[0], stderr


def run_main(main, argv) -> tuple:
    """(exit status, stderr) of a CLI's ``main`` run in this process."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = main(argv)
        except SystemExit as exit:  # argparse's usage errors
            status = exit.code
    return status, stderr.getvalue()


def run_process(module: str, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, timeout=timeout)


@pytest.mark.parametrize("argv, expect", [
    (["--default-temperature", "-5"], "--default-temperature"),
    (["--default-temperature", "nan"], "must be a finite number"),
    (["--port", "70000"], "--port"),
    (["--queue-size", "-1"], "--queue-size"),
    (["--max-request-mb", "0"], "--max-request-mb"),
    (["--max-request-mb", "inf"], "must be a finite number"),
    (["--max-request-mb", "2", "--max-queued-mb", "1"], "--max-queued-mb"),
    (["--default-max-tokens", "5000"], "above max_tokens_limit"),
    (["--image-cache-mb", "-1"], "--image-cache-mb"),
    (["--api-key", "two words"], "--api-key"),
    (["--model-name", UNDECODABLE], "not valid UTF-8"),
    (["--allow-local-files", "/no/such/folder"], "not a folder"),
    (["--provider", "NoSuchExecutionProvider"], "not in this onnxruntime"),
    (["--max-images", "many"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
    (["--bundle", "/no/such/bundle"], "does not exist"),
])
def test_serve_refuses_bad_options_at_start(argv, expect):
    """Checked before the bundle is built or the port opened (the default temperature of -5 used
    to start a server that refused every request)."""
    status, stderr = run_main(server.main, argv)
    assert status == 2
    one_error_line(stderr, "ftz-serve", expect)


@pytest.mark.parametrize("argv, expect", [
    (["--temperature", "-5", "hi"], "temperature"),
    (["--temperature", "nan", "hi"], "must be a finite number"),
    (["--top-p", "2", "hi"], "top_p"),
    (["--max-new-tokens", "0", "hi"], "max_new_tokens"),
    (["--presence-penalty", "3", "hi"], "presence_penalty"),
    (["--example", "99"], "--example must be"),
    (["--bogus"], "unrecognized arguments"),
    ([UNDECODABLE], "the question is not valid UTF-8"),
    (["--system", UNDECODABLE, "hi"], "--system is not valid UTF-8"),
    (["--bundle", "/no/such/bundle", "hi"], "does not exist"),
])
def test_chat_refuses_bad_input_before_loading(argv, expect):
    status, stderr = run_main(chat_cli.main, argv)
    assert status == 2
    one_error_line(stderr, "ftz-chat", expect)


def test_chat_errors_as_a_user_meets_them(default_bundle, tmp_path):
    """Real processes: the byte 0xff in a question (a traceback before), a file that is not an
    image, a missing image, a missing bundle, an unknown provider."""
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    for args, expect in (
        (["--example", "0", b"x\xff"], "not valid UTF-8"),  # the case: the default bundle
        (["--bundle", str(default_bundle), "--image", str(not_image), "What is it?"], "not a recognised image"),
        (["--bundle", str(default_bundle), "--image", str(tmp_path / "missing.png"), "hi"], "cannot read image"),
        (["--bundle", str(tmp_path / "nope"), "hi"], "does not exist"),
        (["--bundle", str(default_bundle), "--provider", "NoSuchExecutionProvider", "hi"], "not in this onnxruntime"),
    ):
        result = run_process("ftz_edge.demo.chat_cli", *args)
        assert result.returncode == 2, (args, result.stderr)
        one_error_line(result.stderr.decode("utf-8", "backslashreplace"), "ftz-chat", expect)


@pytest.mark.parametrize("stdin_errors", ["surrogateescape", "strict"])
def test_chat_keeps_going_after_text_that_is_not_utf8_interactively(default_bundle, stdin_errors):
    """Interactive: a line that is not UTF-8 is one error line, and the chat goes on. Python
    hands it over as lone surrogates (surrogateescape, a UTF-8 locale's default for stdin) or
    raises UnicodeDecodeError (strict); both are met."""
    result = subprocess.run([sys.executable, "-m", "ftz_edge.demo.chat_cli", "--bundle", str(default_bundle),
                             "--image", str(EXAMPLE_IMAGE), "--max-new-tokens", "4"],
                            input=b"caf\xe9?\nWhat colour is it?\n", capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONIOENCODING": f"utf-8:{stdin_errors}"})
    stderr = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == 0, stderr
    one_error_line(stderr, "ftz-chat", "UTF-8")
    assert stderr.count("tok/s") == 1  # the timings of the one answer: the second question was answered


def test_serve_errors_as_a_user_meets_them(default_bundle):
    """Real processes: a bad option, text that is not UTF-8, a port in use (it used to load the
    model first and then print uvicorn's own error)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, expect in (
            (["--default-temperature", "-5"], "--default-temperature"),
            (["--model-name", b"\xffmodel"], "not valid UTF-8"),
            (["--bundle", str(default_bundle), "--port", str(port), "--no-warmup"], "cannot listen on"),
        ):
            result = run_process("ftz_edge.serve.server", *args)
            assert result.returncode == 2, (args, result.stderr)
            one_error_line(result.stderr.decode("utf-8", "backslashreplace"), "ftz-serve", expect)
