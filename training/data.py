"""LLaVA-format training data: records -> token ids, labels and preprocessed images.

The format is LLaVA's / TinyLLaVA's: a JSON list of
``{"id", "image" (optional, relative to an image folder), "conversations": [{"from": "human"|"gpt", "value"}]}``
with ``<image>`` in the first human turn. Text-only records and multi-turn conversations are
fine.

Bad records are skipped, counted and named (file, record index, id, reason) unless ``strict``,
wherever they are found:

* when the data set is opened: malformed records, text that is not valid UTF-8, images that are
  missing or whose header is unreadable (``DataReport.skipped``);
* when a sample is loaded for training (inside the data loader, possibly in a worker process):
  images that still fail to decode, e.g. a truncated JPEG, whose header is fine (decoding every
  image up front would take hours on LLaVA-scale sets). The sample is replaced by the next
  usable record, so every batch keeps its size and every process of a distributed run still
  steps together; the skip travels with the batch (``batch["skipped"]``) to the training loop,
  which logs it, counts it once per record in ``DataReport.load_skipped`` and, with ``strict``,
  stops with one line naming the record.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from ftz_edge import prompt
from ftz_edge.mllm import IGNORE_INDEX
from ftz_edge.preprocess import ImageLoadError, encoder_pixels

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# A sample whose image fails to decode is replaced by the next record; this many failures in a
# row leave the slot empty (a folder of broken images should stop a run, not loop over it).
MAX_REPLACEMENTS = 8
LOAD_REASON = "image unreadable when loaded"


class DataError(ValueError):
    """The data file itself is unusable, or a record is bad while ``strict`` is on."""


def printable(value: Any, limit: int = 80) -> str:
    """``value`` as text safe to log or print: lone surrogates escaped (they cannot be written to
    a UTF-8 stream), cut to ``limit`` characters."""
    text = str(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class DataReport:
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few skipped records, named
    truncated: int = 0
    # Records found bad when loaded for training: "<file> record #<index> (id <id>)" -> reason.
    load_skipped: dict[str, str] = field(default_factory=dict)

    def skip(self, record_id: str, error: str, where: str = "") -> None:
        # Count by cause; the details in parentheses (file names) only go into the examples.
        self.skipped[error.split(" (")[0]] += 1
        if len(self.examples) < 5:
            self.examples.append(printable(f"{record_id}: {error}" + (f" [{where}]" if where else ""), 300))

    def skip_at_load(self, record: str, reason: str) -> bool:
        """Note a record that failed when loaded; True the first time that record fails."""
        if record in self.load_skipped:
            return False
        self.load_skipped[record] = reason
        return True

    def summary(self) -> str:
        text = f"{self.kept}/{self.total} records kept"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} ({reason})" for reason, n in self.skipped.most_common())
            text += "; first: " + "; ".join(self.examples)
        if self.truncated:
            text += f"; {self.truncated} truncated to the max length"
        if self.load_skipped:
            first = "; ".join(f"{k}: {v}" for k, v in list(self.load_skipped.items())[:3])
            text += f"; {len(self.load_skipped)} more skipped when loaded ({LOAD_REASON}; first: {first})"
        return printable(text, 4000)

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "skipped": dict(self.skipped), "examples": self.examples,
                "truncated": self.truncated, "skipped_when_loaded": dict(self.load_skipped)}


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("empty turn")
    try:
        prompt.check_encodable(value, what)
    except prompt.UnencodableTextError:
        raise ValueError(f"text is not valid UTF-8 (a lone surrogate in {what})") from None
    return value


def record_messages(record: dict) -> list[dict]:
    """LLaVA turns -> chat messages; raises ValueError with the reason for a bad record."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("no conversations")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(speaker, str) or speaker not in ROLES:  # a list or dict is not even hashable
            raise ValueError(f"turn speaker must be one of {sorted(ROLES)}")
        messages.append({"role": ROLES[speaker], "content": _text(turn.get("value"), f"turn {i}")})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no gpt turn")
    has_image = record_image(record) is not None
    placeholders = prompt.count_images(messages)
    if has_image and placeholders != 1:
        raise ValueError("image given but no <image> placeholder" if not placeholders else "more than one <image>")
    if not has_image and placeholders:
        raise ValueError("<image> placeholder but no image")
    if has_image:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None or prompt.IMAGE_PLACEHOLDER not in first_user["content"]:
            raise ValueError("<image> is not in the first human turn")
    return messages


def record_image(record: dict) -> Optional[str]:
    """The record's image file name, None for a text-only record; ValueError if it is not a name."""
    image = record.get("image")
    if image is None:
        return None
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"image must be a file name (a non-empty string), got {type(image).__name__} {printable(image, 40)}")
    try:
        prompt.check_encodable(image, "the image name")
    except prompt.UnencodableTextError:
        raise ValueError("image name is not valid UTF-8 (a lone surrogate)") from None
    return image


def _check_image(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"image not found ({path})")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # Pillow raises many types for a bad header
        raise ValueError(f"image unreadable ({path}: {type(err).__name__})") from None


class LlavaDataset(torch.utils.data.Dataset):
    """Tokenised records. A sample's image is decoded and preprocessed when the sample is
    loaded (in the data loader's workers); see the module docstring for what a bad one does."""

    def __init__(self, data_path: str | Path, image_folder: Optional[str | Path], model, max_length: int,
                 strict: bool = False):
        data_path = Path(data_path)
        try:
            records = json.loads(data_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"data file {data_path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"data file {data_path} is not valid JSON: {err}") from None
        except OSError as err:
            raise DataError(f"data file {data_path} cannot be read: {err.strerror or err}") from None
        if not isinstance(records, list):
            raise DataError(f"data file {data_path} must hold a JSON list of records")
        self.data_path = data_path
        self.image_folder = Path(image_folder) if image_folder else data_path.parent
        self.anchor_spec, self.augmenter_spec = model.anchor_spec, model.augmenter_spec
        self.report = DataReport(total=len(records))
        self.items: list[dict] = []
        for index, record in enumerate(records):
            record_id = printable(record.get("id", index) if isinstance(record, dict) else index)
            where = f"{data_path.name} record #{index}"
            try:
                item = self._parse(record, model, max_length)
            except (ValueError, prompt.PromptError) as err:
                reason = printable(err, 300)
                if strict:
                    raise DataError(f"{printable(data_path, 300)} [#{index}]: record {record_id}: {reason}") from None
                self.report.skip(record_id, reason, where)
                continue
            except Exception as err:  # noqa: BLE001 - a record must never stop a run; counted apart, so a bug shows
                reason = f"unexpected error ({type(err).__name__}: {printable(err, 200)})"
                if strict:
                    raise DataError(f"{printable(data_path, 300)} [#{index}]: record {record_id}: {reason}") from None
                self.report.skip(record_id, reason, where)
                continue
            if item.pop("truncated"):
                self.report.truncated += 1
            self.items.append({"id": record_id, "where": f"{where} (id {record_id})", **item})
        self.report.kept = len(self.items)
        if not self.items:
            raise DataError(f"{printable(data_path, 300)}: no usable records ({self.report.summary()})")
        if self.report.skipped or self.report.truncated:
            logger.warning("%s: %s", printable(data_path, 300), self.report.summary())

    def _parse(self, record: Any, model, max_length: int) -> dict:
        """One record -> ``{input_ids, labels, image, truncated}``; ValueError names what is wrong."""
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        messages = record_messages(record)
        name = record_image(record)
        image = None
        if name is not None:
            image = self.image_folder / name
            _check_image(image)
        # The placeholder is already the image's num_image_tokens positions: lengths are len(ids).
        ids, labels = prompt.encode_supervised(messages, model.tokenizer.backend_tokenizer, model.chat_template,
                                               model.special_tokens, IGNORE_INDEX, model.vision.num_image_tokens)
        first_answer = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if first_answer is None:
            raise ValueError("no answer tokens")
        if first_answer >= max_length:
            # Truncation would leave nothing to learn (and an all-ignored row gives a NaN loss).
            raise ValueError(f"no answer within max_length ({max_length} tokens)")
        # Kept as 4-byte arrays: an image's hundreds of positions cost 4 bytes each, not a list slot.
        return {"input_ids": array("i", ids), "labels": array("i", labels), "image": image,
                "truncated": len(ids) > max_length}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        """The sample at ``index`` with its pixels (``{input name: (1, C, H, W)}``, None when
        text-only) and ``skipped``: ``[(record, reason)]`` of records whose image failed to decode
        on the way (the sample is then the next usable record's; with no usable one within
        ``MAX_REPLACEMENTS``, only ``skipped`` is returned)."""
        skipped = []
        for step in range(MAX_REPLACEMENTS + 1):
            item = self.items[(index + step) % len(self.items)]
            try:
                pixels = self._pixels(item["image"])
            except (ImageLoadError, ValueError, OSError) as err:
                skipped.append((item["where"], printable(f"{LOAD_REASON} ({err})", 300)))
                continue
            return {"input_ids": item["input_ids"], "labels": item["labels"], "pixels": pixels, "skipped": skipped}
        return {"skipped": skipped}

    def _pixels(self, image: Optional[Path]) -> Optional[dict]:
        if image is None:
            return None
        return encoder_pixels([image], self.anchor_spec, self.augmenter_spec)


def collate(samples: list[dict]) -> dict:
    """Samples -> ragged ids/labels lists, stacked pixels for both encoders (the image rows in
    sample order, as the model splices them), and every ``skipped`` record of the samples."""
    usable = [s for s in samples if "input_ids" in s]
    batch = {
        "input_ids": [s["input_ids"] for s in usable],
        "labels": [s["labels"] for s in usable],
        "anchor_pixels": None,
        "augmenter_pixels": None,
        "skipped": [entry for s in samples for entry in s["skipped"]],
    }
    pixels = [s["pixels"] for s in usable if s["pixels"] is not None]
    if pixels:
        for name in pixels[0]:
            batch[name] = torch.from_numpy(np.concatenate([p[name] for p in pixels]))
    return batch
