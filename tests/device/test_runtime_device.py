"""The runtime on the device's software: Python 3.10 (JetPack 6), onnxruntime 1.22, numpy 1.26, no torch.

``tests/test_py310.py`` builds that environment (``.cache/py310``), exports the bundles and runs
this module there with them in ``FTZ_DEVICE_BUNDLES``; it then compares the answers written to
``FTZ_DEVICE_RESULTS`` with the development machine's. Outside that environment it is not
collected (``collect_ignore`` in ``tests/conftest.py``). Nothing here may import torch or transformers (the
device has neither), nor lean on ``tests/conftest.py`` (the child pytest stops at this folder).
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from device_cases import EXAMPLES, answers, conversations
from ftz_edge.runtime.engine import Conversation, FtZRuntime
from ftz_edge.runtime.generation import GenerationConfig

BUNDLES = [Path(p) for p in os.environ["FTZ_DEVICE_BUNDLES"].split(os.pathsep)]


@pytest.fixture(scope="module", params=BUNDLES, ids=[b.name for b in BUNDLES])
def runtime(request):
    return FtZRuntime(request.param)


def test_the_environment_is_the_devices():
    import onnxruntime

    assert sys.version_info[:2] == (3, 10), sys.version
    assert onnxruntime.__version__ == os.environ["FTZ_DEVICE_ONNXRUNTIME"]
    assert int(np.__version__.split(".")[0]) == 1, np.__version__
    assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("transformers") is None


def test_each_bundle_loads_and_answers(runtime):
    results = answers(runtime)
    for name, result in results.items():
        assert result["tokens"], (name, "no answer")
        assert runtime.tokenizer.decode(result["tokens"], skip_special_tokens=True).strip() == result["text"].strip()
    assert results["two-images"]["prompt_tokens"] > 2 * runtime.num_image_tokens  # both images' blocks went in
    path = Path(os.environ["FTZ_DEVICE_RESULTS"])
    written = json.loads(path.read_text()) if path.is_file() else {}
    written[str(runtime.bundle)] = results
    path.write_text(json.dumps(written, indent=1))


def test_streamed_pieces_are_the_answer(runtime):
    name, messages, images = conversations()[2]
    config = GenerationConfig(max_new_tokens=12)
    pieces = list(runtime.stream(messages, images, config))
    assert len(pieces) == len([p for p in pieces if p]) and len(pieces) >= 1, pieces
    assert "".join(pieces) == "".join(runtime.stream(messages, images, config))


def test_a_follow_up_question_reuses_the_image(runtime):
    chat = Conversation(runtime)
    first = "".join(chat.ask("What color is the circle? Answer with one word.", [EXAMPLES / "008003.png"]))
    follow_up = chat.ask("Is it a circle? Answer with one word.")
    second = "".join(follow_up)
    assert first and second and follow_up.timings.cache_hit


def test_nothing_imported_torch():
    assert not [m for m in ("torch", "transformers") if m in sys.modules]
