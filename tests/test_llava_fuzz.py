"""Fuzz the LLaVA record reader (training/data.py): any JSON record is a parsed sample or a
counted, named skip - never an uncaught exception, never an "unexpected error" (issue 13)."""

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import make_config
from ftz_edge.mllm import FtZForCausalLM
from ftz_edge.training.data import LlavaDataset, collate

# Lone surrogates are what `json.loads('"\\ud800"')` gives; hypothesis leaves them out of text by default.
text = st.lists(st.characters() | st.sampled_from(["\ud800", "\udfff", "<image>", "\n", " "]), max_size=10).map("".join)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
image_name = st.sampled_from(["ok.png", "cut.jpg", "fake.png", "missing.png", "", "../ok.png"]) | json_value
turn = st.fixed_dictionaries(
    {"from": st.sampled_from(["human", "gpt", "system"]) | json_value,
     "value": st.sampled_from(["<image>\nColor?", "red", "<image><image>", " "]) | text | json_value},
) | json_value
# Near-valid records reach the tokenizer and the image decoder; the others, every early check.
near_valid = st.builds(
    lambda rid, image, question, answer: {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
    json_value, image_name | st.none(), st.sampled_from(["<image>\nColor?", "Color?"]) | text,
    st.sampled_from(["red", "blue"]) | text | json_value,
)
record = near_valid | st.fixed_dictionaries(
    {"conversations": st.lists(turn, max_size=4) | json_value},
    optional={"id": json_value, "image": image_name},
) | json_value


@pytest.fixture(scope="module")
def fuzz_model(tiny_components):
    return FtZForCausalLM.from_config(make_config(tiny_components))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-images")
    Image.new("RGB", (32, 32), "red").save(folder / "ok.png")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # fails only when decoded
    (folder / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


GOOD = {"id": "good", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}


# ~5 s on 2 cores. No example database: nothing is written into the checkout (a failure prints
# its example, and the @reproduce_failure line to replay it).
@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(records=st.lists(record, min_size=1, max_size=3))
def test_any_record_is_a_sample_or_a_counted_skip(fuzz_model, image_folder, records):
    path = image_folder / "data.json"
    path.write_text(json.dumps([*records, GOOD]))  # one good record: the set always opens
    data = LlavaDataset(path, image_folder, fuzz_model, max_length=64)
    report = data.report
    assert report.total == len(records) + 1
    assert report.kept + sum(report.skipped.values()) == report.total
    assert not [reason for reason in report.skipped if reason.startswith("unexpected")], report.examples
    report.summary().encode("utf-8")  # loggable as it is
    samples = [data[i] for i in range(len(data))]  # what the data loader does: decoding happens here
    batch = collate(samples)
    for where, reason in batch["skipped"]:
        assert where.startswith("data.json record #") and reason.startswith("image unreadable when loaded")
    assert len(batch["input_ids"]) == len(samples)  # a bad image is replaced, never leaves a hole
