"""Shared fixtures: tiny random components written with save_pretrained, built once per session.

Skip policy: where the environment variable ``CI`` is set (non-empty, not "0"/"false"), a skip
is a failure unless its reason names one of ``ALLOWED_SKIPS`` - what a CPU-only CI machine
cannot have. A missing extra, a missing file or a missing tool is then a red run, not a green one.
"""

import os
import re
import socket
import subprocess

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for the hub

# tests/device/ runs only inside the Python 3.10 device environment: tests/test_py310.py builds it
# and runs that folder there (with --confcutdir, so this file is not loaded there). Here it is not
# collected at all: it neither runs twice nor shows up as a skip. (A conftest.py of its own would
# shadow this one for `from conftest import ...`.)
collect_ignore = ["device"]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The only skips CI accepts: each needs hardware or software no CPU-only CI machine has.
ALLOWED_SKIPS = (
    ("real TensorRT", re.compile(r"\bTensorRT\b")),
    ("CUDA or a GPU", re.compile(r"\bCUDA\b|\bGPU\b")),
    ("Chromium, where it cannot be installed", re.compile(r"\bchromium\b", re.IGNORECASE)),
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def allowed_skip(reason: str) -> bool:
    return any(pattern.search(reason) for _, pattern in ALLOWED_SKIPS)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_disallowed_skip(report) -> None:
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):  # an xfail is not a skip
        return
    reason = _skip_reason(report)
    if not allowed_skip(reason):
        report.outcome = "failed"
        allowed = "; ".join(name for name, _ in ALLOWED_SKIPS)
        report.longrepr = (f"skipped in CI for a reason not on the allowed list ({allowed}): {reason}\n"
                           "fix the environment (install the extra, the tool, the file) or the test")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A whole module's importorskip (a missing extra) is a collection-time skip.
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate a server under test, and kill it if it does not stop within ``timeout``."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory):
    """anchor (a full CLIPModel checkpoint), augmenter (Dinov2Model) and a Qwen2 LLM + tokenizer."""
    from transformers.utils import logging

    from ftz_edge import tiny

    logging.disable_progress_bar()
    return tiny.build_tiny_components(tmp_path_factory.mktemp("tiny"), llm_arch="qwen2", full_clip_model=True)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A Llama causal LM whose tokenizer has no chat template (the fallback path)."""
    from ftz_edge import tiny

    return str(tiny.save_llm(tmp_path_factory.mktemp("llama") / "llm", arch="llama"))


def make_config(components, kind="ftz", **tower):
    from ftz_edge.config import FtZConfig, TowerConfig

    tower.setdefault("num_fusion_points", 2)
    augmenter = None if kind == "clip" else components["augmenter"]
    return FtZConfig(
        tower=TowerConfig(kind=kind, anchor=components["anchor"], augmenter=augmenter, **tower),
        llm=components["llm"],
    )


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory):
    """The shipped default model exported as ftz-chat does it (fp32 tower and LLM), once per session."""
    os.environ["FTZ_EDGE_CACHE"] = str(tmp_path_factory.mktemp("ftz-cache"))
    from ftz_edge.cli.default_bundle import ensure_default_bundle

    return ensure_default_bundle()
