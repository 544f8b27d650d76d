"""The shipped default model: small, self-contained, and really answers held-out questions."""

import json
from pathlib import Path

import pytest

from ftz_edge.checkpoint import load_checkpoint
from ftz_edge.training import synthetic

DEFAULT = Path(__file__).resolve().parent.parent / "ftz_edge" / "default_model"


def test_default_model_is_small_and_self_contained():
    size = sum(p.stat().st_size for p in DEFAULT.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"{size / 2**20:.1f} MB"
    config = json.loads((DEFAULT / "ftz_config.json").read_text())
    assert (config["tower"]["anchor"], config["tower"]["augmenter"], config["llm"]) == ("anchor", "augmenter", "llm")
    assert config["tower"]["kind"] == "ftz"


def test_default_model_answers_held_out_questions_above_chance():
    report = json.loads((DEFAULT / "eval.json").read_text())
    seed, n_test = report["settings"]["seed"], report["settings"]["test"]
    model = load_checkpoint(DEFAULT).eval()
    # Regenerate the first 100 held-out scenes from the seed: the generator is deterministic.
    examples = [ex for ex, _ in zip(synthetic.split_examples(n_test, seed, "test"), range(100))]
    records = [synthetic.to_record(ex, i) for i, ex in enumerate(examples)]
    predictions = [model.answer(ex.image, ex.question + synthetic.SUFFIX, max_new_tokens=4) for ex in examples]
    result = synthetic.evaluate(records, predictions)
    overall = result["overall"]
    assert overall["accuracy"] > overall["chance"] + 0.2, synthetic.format_table(result)
    # and it agrees with the accuracy recorded when the model was built (same questions, first 100)
    assert overall["accuracy"] == pytest.approx(report["results"]["ftz"]["overall"]["accuracy"], abs=0.12)
