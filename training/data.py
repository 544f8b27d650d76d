"""LLaVA-format training data: records -> token ids, labels and preprocessed images.

The format is LLaVA's / TinyLLaVA's: a JSON list of
``{"id", "image" (optional, relative to an image folder), "conversations": [{"from": "human"|"gpt", "value"}]}``
with ``<image>`` in the first human turn. Text-only records and multi-turn conversations are
fine. Bad records are skipped and counted (the first few named) unless ``strict``.

Images are checked for existence and a readable header when the data set is opened; a file that
still fails to decode later raises an error naming it (decoding every image up front would take
hours on LLaVA-scale sets).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from ftz_edge import prompt
from ftz_edge.mllm import IGNORE_INDEX
from ftz_edge.preprocess import encoder_pixels

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class DataError(ValueError):
    """The data file itself is unusable, or a record is bad while ``strict`` is on."""


@dataclass
class DataReport:
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few skipped records, named
    truncated: int = 0

    def skip(self, record_id: str, error: str) -> None:
        # Count by cause; the details in parentheses (file names) only go into the examples.
        self.skipped[error.split(" (")[0]] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{record_id}: {error}")

    def summary(self) -> str:
        text = f"{self.kept}/{self.total} records kept"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} ({reason})" for reason, n in self.skipped.most_common())
            text += "; first: " + "; ".join(self.examples)
        if self.truncated:
            text += f"; {self.truncated} truncated to the max length"
        return text


def record_messages(record: dict) -> list[dict]:
    """LLaVA turns -> chat messages; raises ValueError with the reason for a bad record."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("no conversations")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            raise ValueError(f"turn speaker must be one of {sorted(ROLES)}")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise ValueError("empty turn")
        messages.append({"role": ROLES[turn["from"]], "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no gpt turn")
    has_image = "image" in record and record["image"] is not None
    placeholders = prompt.count_images(messages)
    if has_image and placeholders != 1:
        raise ValueError("image given but no <image> placeholder" if not placeholders else "more than one <image>")
    if not has_image and placeholders:
        raise ValueError("<image> placeholder but no image")
    if has_image:
        first_user = next(m for m in messages if m["role"] == "user")
        if prompt.IMAGE_PLACEHOLDER not in first_user["content"]:
            raise ValueError("<image> is not in the first human turn")
    return messages


def _check_image(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"image not found ({path})")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # Pillow raises many types for a bad header
        raise ValueError(f"image unreadable ({path}: {type(err).__name__})") from None


class LlavaDataset(torch.utils.data.Dataset):
    """Tokenised records; images are decoded and preprocessed in the collator."""

    def __init__(self, data_path: str | Path, image_folder: Optional[str | Path], model, max_length: int,
                 strict: bool = False):
        data_path = Path(data_path)
        try:
            records = json.loads(data_path.read_text())
        except FileNotFoundError:
            raise DataError(f"data file {data_path} not found") from None
        except json.JSONDecodeError as err:
            raise DataError(f"data file {data_path} is not valid JSON: {err}") from None
        if not isinstance(records, list):
            raise DataError(f"data file {data_path} must hold a JSON list of records")
        image_folder = Path(image_folder) if image_folder else data_path.parent
        image_tokens = model.vision.num_image_tokens
        tokenizer = model.tokenizer.backend_tokenizer
        self.report = DataReport(total=len(records))
        self.items: list[dict] = []
        for index, record in enumerate(records):
            record_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
            try:
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                messages = record_messages(record)
                image = None
                if record.get("image") is not None:
                    image = image_folder / record["image"]
                    _check_image(image)
                ids, labels = prompt.encode_supervised(messages, tokenizer, model.chat_template, model.special_tokens,
                                                       IGNORE_INDEX)
            except (ValueError, prompt.PromptError) as err:
                if strict:
                    raise DataError(f"{data_path}: record {record_id}: {err}") from None
                self.report.skip(record_id, str(err))
                continue
            expand = image_tokens - 1 if image is not None else 0  # the placeholder becomes the image tokens
            first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + expand
            if first_answer >= max_length:
                # Truncation would leave nothing to learn (and an all-ignored row gives a NaN loss).
                if strict:
                    raise DataError(f"{data_path}: record {record_id}: no answer token within max_length {max_length}")
                self.report.skip(record_id, f"no answer within max_length ({max_length} tokens)")
                continue
            if len(ids) + expand > max_length:
                self.report.truncated += 1
            self.items.append({"id": record_id, "input_ids": ids, "labels": labels, "image": image})
        self.report.kept = len(self.items)
        if not self.items:
            raise DataError(f"{data_path}: no usable records ({self.report.summary()})")
        if self.report.skipped or self.report.truncated:
            logger.warning("%s: %s", data_path, self.report.summary())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class Collator:
    """A batch of items -> ragged ids/labels lists and stacked pixels for both encoders."""

    def __init__(self, anchor_spec, augmenter_spec):
        self.anchor_spec = anchor_spec
        self.augmenter_spec = augmenter_spec

    def __call__(self, items: list[dict]) -> dict:
        images = [item["image"] for item in items if item["image"] is not None]
        batch = {
            "input_ids": [item["input_ids"] for item in items],
            "labels": [item["labels"] for item in items],
            "anchor_pixels": None,
            "augmenter_pixels": None,
        }
        if images:
            for name, pixels in encoder_pixels(images, self.anchor_spec, self.augmenter_spec).items():
                batch[name] = torch.from_numpy(pixels)
        return batch
