"""The conversations the device test asks, and their answers (torch-free, Python 3.10).

One definition for both sides: ``tests/device/test_runtime_device.py`` answers them on the
device's software (Python 3.10, onnxruntime 1.22), ``tests/test_py310.py`` on the development
machine's, and the greedy tokens must agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "ftz_edge" / "default_model" / "examples"
MAX_NEW_TOKENS = 12


def conversations() -> List[Tuple[str, List[dict], List[Path]]]:
    """(name, messages, images): each shipped example (one image), and two images in one prompt."""
    from ftz_edge import prompt

    examples = json.loads((EXAMPLES / "examples.json").read_text())
    cases = [(f"example-{i}", [prompt.user_turn_with_image(e["question"])], [EXAMPLES / e["image"]])
             for i, e in enumerate(examples)]
    two = [EXAMPLES / examples[0]["image"], EXAMPLES / examples[2]["image"]]
    cases.append(("two-images", [{"role": "user", "content": "<image>\n<image>\nWhich one has a red circle?"}], two))
    return cases


def answers(runtime) -> Dict[str, dict]:
    """Greedy answer of every conversation: {name: {"text", "tokens", "prompt_tokens"}}."""
    from ftz_edge.runtime.generation import GenerationConfig

    out = {}
    for name, messages, images in conversations():
        generation = runtime.stream(messages, images, GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)).run()
        out[name] = {"text": generation.text, "tokens": list(generation.tokens),
                     "prompt_tokens": generation.timings.prompt_tokens}
    return out
