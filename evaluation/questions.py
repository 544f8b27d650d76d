"""One question of a benchmark, as the readers produce it and the predictors answer it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

# LLaVA-1.5's short-answer instruction, appended by its evaluation to POPE, MME and TextVQA
# questions (on its own line, as in LLaVA's question files).
SHORT_ANSWER = "Answer the question using a single word or phrase."


def with_short_answer(text: str) -> str:
    """``text`` with LLaVA's short-answer line, unless it already ends with it (LLaVA's own
    TextVQA question file carries it; the POPE annotation files and MME's txt files do not)."""
    text = text.rstrip()
    return text if text.endswith(SHORT_ANSWER) else f"{text}\n{SHORT_ANSWER}"


@dataclass
class Question:
    id: str  # unique within its benchmark
    group: str  # POPE split, MME subtask, synthetic question type; "val" for TextVQA
    image: Any  # a path, a PIL image (the synthetic set is generated in memory) or encoded bytes (MMMU)
    image_name: str  # how the saved predictions name the image
    prompt: str  # exactly what the model is asked (the <image> placeholder is added by the model)
    truth: Dict[str, Any] = field(default_factory=dict)  # what the scorer needs: label, answers, ...

    def entry(self, prediction: str) -> Dict[str, Any]:
        """The saved record of this question and its answer: enough to recompute every score."""
        return {"id": self.id, "group": self.group, "image": self.image_name, "prompt": self.prompt,
                "prediction": prediction, **self.truth}
