"""Synthetic fine-grained perception set: small rendered scenes + one-word questions.

Why synthetic: the shipped FtZ model is tiny (4-layer, width-64 towers, word-level LLM), so we
need a task it can learn on CPU in minutes, with a closed answer vocabulary and ground truth we
can check exactly. Each image holds 1-4 flat shapes (circle/square/triangle) in distinct colours
on a gray background, optionally one black character. Questions probe colour, counting, spatial
relations, reading and POPE-style existence. Records use the LLaVA/TinyLLaVA conversation JSON.

Only stdlib, numpy and Pillow are used so this runs in the torch-free base install.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

QTYPES = ("color", "count", "position", "text", "exists")
# The question types the shipped default model is built and evaluated on (position is left out:
# neither tiny encoder is pretrained on relations, and both models stayed at chance on it).
DEFAULT_MODEL_QTYPES = ("color", "count", "text", "exists")
SHAPES = ("circle", "square", "triangle")
# Saturated, mutually distant colours; black is kept for the text so a glyph is never a "shape".
PALETTE = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230),
    "yellow": (245, 225, 30), "white": (250, 250, 250), "purple": (150, 40, 190),
}
BACKGROUND = (128, 128, 128)
TEXT_COLOR = (0, 0, 0)
# The ten digits: the fine-grained question's answers. A closed set small enough for the tiny
# augmenter (8-px patches) to read reliably at ~12 px, while the anchor's 16-px patches and
# scene-level pretraining do not resolve them (the shipped model's point; docs/model.md).
# (Until the rebuild of the shipped model it was 34 characters: digits and capitals without I, O.)
CHARSET = "0123456789"
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
MAX_SHAPES = 4
SUFFIX = " Answer with one word."
IMAGE_TOKEN = "<image>"
_SPLIT_CODE = {"train": 0, "test": 1}


@dataclass
class Shape:
    kind: str
    color: str
    cx: int
    cy: int
    r: int  # half the side of the bounding box

    @property
    def box(self) -> Tuple[int, int, int, int]:
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)


@dataclass
class Example:
    image: Image.Image
    qtype: str
    question: str  # without the <image> prefix and the answer-format suffix
    answer: str
    shapes: List[Shape]
    text: Optional[str] = None
    text_box: Optional[Tuple[int, int, int, int]] = None


def answer_choices(qtype: str) -> List[str]:
    """Every answer a question of this type can have (what the target is balanced over)."""
    return {
        "color": list(PALETTE), "count": list(NUMBER_WORDS),
        "position": ["left", "right", "above", "below"],
        "text": [c.lower() for c in CHARSET], "exists": ["yes", "no"],
    }[qtype]


def n_choices(qtype: str, question: str) -> int:
    """Answers plausible for the question *as posed*; 1/this is the chance level."""
    if qtype == "count":
        return 4 if "shapes" in question else 5  # "How many shapes" is never zero
    if qtype in ("position", "exists"):
        return 2  # left/right or above/below; yes/no
    return len(answer_choices(qtype))


def _font(size: int):
    # Pillow >= 10.1 ships a scalable default font when FreeType is present; else a fixed bitmap.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _disjoint(a, b, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(rng, size: int, specs: List[Tuple[str, str]], text_wh: Optional[Tuple[int, int]],
           relation: Optional[str]) -> Tuple[List[Shape], Optional[Tuple[int, int, int, int]]]:
    """Rejection-sample non-overlapping boxes. With `relation` (e.g. "left"), shape 0 must lie that
    way of shape 1 with a margin: their extents do not overlap along the asked axis, so the
    answer stays unambiguous even for a model that only sees coarse patches."""
    r_lo, r_hi = max(3, round(size * 0.09)), max(4, round(size * 0.12))
    for _ in range(100):
        boxes, shapes, ok = [], [], True
        for i, (kind, color) in enumerate(specs):
            r = int(rng.integers(r_lo, r_hi + 1))
            for _ in range(200):
                cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, size=2))
                s = Shape(kind, color, cx, cy, r)
                if not all(_disjoint(s.box, b, 2) for b in boxes):
                    continue
                if i == 1 and relation is not None:
                    a, m = shapes[0], shapes[0].r + r + 2
                    d = {"left": cx - a.cx, "right": a.cx - cx,
                         "above": cy - a.cy, "below": a.cy - cy}
                    if d[relation] < m:
                        continue
                break
            else:
                ok = False
                break
            boxes.append(s.box)
            shapes.append(s)
        text_box = None
        if ok and text_wh is not None:
            w, h = text_wh
            for _ in range(200):
                x, y = int(rng.integers(1, size - w - 1)), int(rng.integers(1, size - h - 1))
                cand = (x, y, x + w, y + h)
                if all(_disjoint(cand, b, 2) for b in boxes):
                    text_box = cand
                    break
            ok = text_box is not None
        if ok:
            return shapes, text_box
    raise RuntimeError(f"could not place {len(specs)} shapes in a {size}x{size} image")


def _specs(rng, kinds: Sequence[str], colors: Optional[Sequence[str]] = None,
           avoid: Sequence[str] = ()) -> List[Tuple[str, str]]:
    """Pair kinds with distinct colours (fixed ones first), so 'the red circle' names one shape."""
    fixed = list(colors or [])
    pool = [c for c in PALETTE if c not in fixed and c not in avoid]
    free = [str(c) for c in rng.permutation(pool)[: len(kinds) - len(fixed)]]
    return list(zip(kinds, fixed + free))


def generate_example(rng: Union[int, np.random.Generator], qtype: str, image_size: int = 64,
                     answer: Optional[str] = None, text_prob: float = 0.5) -> Example:
    """Render one scene and its question. `answer` fixes the target (used to balance answers)."""
    rng = np.random.default_rng(rng)
    if qtype not in QTYPES:
        raise ValueError(f"unknown qtype {qtype!r}; expected one of {QTYPES}")
    if image_size < 32:
        raise ValueError("image_size must be >= 32 to fit four shapes and a character")
    choices = answer_choices(qtype)
    answer = answer if answer is not None else str(rng.choice(choices))
    if answer not in choices:
        raise ValueError(f"{answer!r} is not a possible {qtype} answer")
    pick = lambda seq: str(rng.choice(list(seq)))  # noqa: E731
    others = lambda k: [s for s in SHAPES if s != k]  # noqa: E731
    relation = None
    if qtype == "color":  # the asked kind appears exactly once; distractors are other kinds
        kind = pick(SHAPES)
        extra = [pick(others(kind)) for _ in range(int(rng.integers(0, MAX_SHAPES)))]
        specs = _specs(rng, [kind] + extra, [answer])
        question = f"What color is the {kind}?"
    elif qtype == "count":
        n = NUMBER_WORDS.index(answer)
        if n > 0 and rng.random() < 0.5:
            specs = _specs(rng, [pick(SHAPES) for _ in range(n)])
            question = "How many shapes are there?"
        else:
            kind = pick(SHAPES)
            m = int(rng.integers(1 if n == 0 else 0, MAX_SHAPES - n + 1))
            specs = _specs(rng, [kind] * n + [pick(others(kind)) for _ in range(m)])
            question = f"How many {kind}s are there?"
    elif qtype == "position":
        relation = answer
        specs = _specs(rng, [pick(SHAPES) for _ in range(2 + int(rng.integers(0, 3)))])
        (k0, c0), (k1, c1) = specs[:2]
        pair = "left or right of" if answer in ("left", "right") else "above or below"
        question = f"Is the {c0} {k0} {pair} the {c1} {k1}?"
    elif qtype == "text":
        specs = _specs(rng, [pick(SHAPES) for _ in range(int(rng.integers(0, MAX_SHAPES)))])
        question = "What is the written character?"
    else:  # exists: "no" asks for a combination absent from the scene, often a near miss
        specs = _specs(rng, [pick(SHAPES) for _ in range(int(rng.integers(1, MAX_SHAPES + 1)))])
        present = set(specs)
        if answer == "yes":
            kind, color = specs[int(rng.integers(len(specs)))]
        else:
            absent = [(k, c) for k in SHAPES for c in PALETTE if (k, c) not in present]
            kind, color = absent[int(rng.integers(len(absent)))]
        question = f"Is there a {color} {kind}?"
    # Shuffle drawing order so the asked shape is not always the first placed (except position,
    # whose constraint is defined on the first two specs).
    if qtype != "position":
        specs = [specs[i] for i in rng.permutation(len(specs))]

    char = None
    if qtype == "text":
        char = answer.upper()
    elif rng.random() < text_prob:
        char = pick(CHARSET)
    font = _font(max(8, round(image_size * 0.19)))
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    glyph = draw_probe.textbbox((0, 0), char, font=font) if char else None
    text_wh = (glyph[2] - glyph[0], glyph[3] - glyph[1]) if glyph else None
    shapes, text_box = _place(rng, image_size, specs, text_wh, relation)

    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in shapes:  # no antialiasing: every interior pixel has the exact palette colour
        fill, (x0, y0, x1, y1) = PALETTE[s.color], s.box
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            q = round(s.r * 0.15)  # shrink so its area is close to the circle's
            draw.rectangle((x0 + q, y0 + q, x1 - q, y1 - q), fill=fill)
        else:
            draw.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    if char:
        origin = (text_box[0] - glyph[0], text_box[1] - glyph[1])  # glyph ink lands in its box
        draw.text(origin, char, font=font, fill=TEXT_COLOR)
    return Example(img, qtype, question, answer, shapes, char, text_box)


def _check_qtypes(qtypes: Sequence[str]) -> Tuple[str, ...]:
    unknown = [q for q in qtypes if q not in QTYPES]
    if unknown or not qtypes or len(set(qtypes)) != len(qtypes):
        raise ValueError(f"qtypes must be distinct, non-empty, from {QTYPES}; got {tuple(qtypes)}")
    return tuple(qtypes)


def _plan(n: int, rng: np.random.Generator, qtypes: Sequence[str] = QTYPES) -> List[Tuple[str, str]]:
    """(qtype, answer) per record: types round-robin, answers cycled per type, then shuffled."""
    qtypes = _check_qtypes(qtypes)
    per_type = Counter(qtypes[i % len(qtypes)] for i in range(n))
    plan = []
    for qtype in qtypes:
        choices, k = answer_choices(qtype), per_type[qtype]
        answers = [choices[i % len(choices)] for i in range(k)]
        plan += [(qtype, str(a)) for a in rng.permutation(answers)] if k else []
    return [plan[i] for i in rng.permutation(len(plan))]


def split_examples(n: int, seed: int, split: str, image_size: int = 64, qtypes: Sequence[str] = QTYPES):
    """Yield one split's examples; each has its own seeded stream, so splits are independent.
    ``qtypes`` picks the question types (round-robin over them); the default, all five, is the
    original set, unchanged."""
    plan = _plan(n, np.random.default_rng([seed, _SPLIT_CODE[split], 0]), qtypes)
    for i, (qtype, answer) in enumerate(plan):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], 1, i])
        yield generate_example(rng, qtype, image_size, answer=answer)


def describe(ex: Example) -> str:
    """The scene in words (what the image shows), e.g. "two shapes: red circle, blue square;
    character 7". The shipped model's LLM is pretrained on these descriptions in the image's place
    (text only), so it knows how to answer from context before it ever sees an image."""
    shapes = ", ".join(f"{s.color} {s.kind}" for s in ex.shapes)
    text = f"{NUMBER_WORDS[len(ex.shapes)]} shapes" + (f": {shapes}" if shapes else "")
    return text + (f"; character {ex.text}" if ex.text else "")


def to_record(ex: Example, index: int) -> dict:
    return {
        "id": f"{index:06d}", "image": f"images/{index:06d}.png",
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{ex.question}{SUFFIX}"},
            {"from": "gpt", "value": ex.answer},
        ],
        "qtype": ex.qtype,
    }


def generate_dataset(out_dir, n_train: int, n_test: int, seed: int, image_size: int = 64,
                     overwrite: bool = False, qtypes: Sequence[str] = QTYPES) -> Dict[str, Dict[str, int]]:
    """Write images/*.png, train.json, test.json. Built in a sibling temp folder and renamed into
    place, so a crash never leaves a half-written set that looks complete."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    counts: Dict[str, Dict[str, int]] = {}
    try:
        (tmp / "images").mkdir()
        index = 0
        for split, n in (("train", n_train), ("test", n_test)):
            records = []
            for ex in split_examples(n, seed, split, image_size, qtypes):
                ex.image.save(tmp / "images" / f"{index:06d}.png")
                records.append(to_record(ex, index))
                index += 1
            (tmp / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
            counts[split] = dict(Counter(r["qtype"] for r in records))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


# ---- vocabulary ---------------------------------------------------------------------------

def tokenize(text: str) -> List[str]:
    """Word-level split the tiny tokenizer can mirror: <image>, words, single punctuation marks."""
    return re.findall(r"<image>|\w+|[^\w\s]", text)


def all_questions() -> List[str]:
    """Every question text the generator can emit (with the answer-format suffix)."""
    qs = [f"What color is the {k}?" for k in SHAPES] + ["How many shapes are there?"]
    qs += [f"How many {k}s are there?" for k in SHAPES] + ["What is the written character?"]
    qs += [f"Is there a {c} {k}?" for c in PALETTE for k in SHAPES]
    for pair in ("left or right of", "above or below"):
        qs += [f"Is the {c0} {k0} {pair} the {c1} {k1}?" for c0 in PALETTE for k0 in SHAPES
               for c1 in PALETTE for k1 in SHAPES if c0 != c1]
    return [q + SUFFIX for q in qs]


def answer_vocabulary() -> List[str]:
    return [a for qtype in QTYPES for a in answer_choices(qtype)]


def question_vocabulary() -> List[str]:
    """Tokens of all questions, without the <image> placeholder (a special token for the model)."""
    return sorted({t for q in all_questions() for t in tokenize(q)})


def all_words() -> List[str]:
    return sorted(set(question_vocabulary()) | set(answer_vocabulary()))


# ---- evaluation ---------------------------------------------------------------------------

def normalize(prediction: str, qtype: str = "") -> str:
    """Lowercase, first word, strip punctuation; count answers also accept digits ('2' -> two)."""
    words = str(prediction).strip().lower().split()
    word = words[0].strip(".,;:!?\"'()[]") if words else ""
    if qtype == "count" and word.isdigit() and int(word) < len(NUMBER_WORDS):
        word = NUMBER_WORDS[int(word)]
    return word


def evaluate(records: Sequence[dict], predictions: Union[Sequence[str], Mapping[str, str]]) -> dict:
    """Exact match per qtype and overall. `predictions` is aligned with `records` or keyed by id.
    chance = mean 1/n_choices over the questions as posed; majority = most frequent gold share."""
    if isinstance(predictions, Mapping):
        missing = [r["id"] for r in records if r["id"] not in predictions]
        if missing:
            raise ValueError(f"no prediction for {len(missing)} records, e.g. {missing[:3]}")
        preds = [predictions[r["id"]] for r in records]
    else:
        preds = list(predictions)
        if len(preds) != len(records):
            raise ValueError(f"{len(preds)} predictions for {len(records)} records")
    rows: Dict[str, list] = {}
    for rec, pred in zip(records, preds):
        qtype, gold = rec["qtype"], rec["conversations"][1]["value"]
        question = rec["conversations"][0]["value"]
        ok = normalize(pred, qtype) == gold
        rows.setdefault(qtype, []).append((ok, 1.0 / n_choices(qtype, question), gold))

    def summarize(items):
        n = len(items)
        correct = sum(ok for ok, _, _ in items)
        majority = Counter(g for _, _, g in items).most_common(1)[0][1] / n if n else 0.0
        return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
                "chance": sum(c for _, c, _ in items) / n if n else 0.0, "majority": majority}

    order = [q for q in QTYPES if q in rows] + sorted(q for q in rows if q not in QTYPES)
    per_type = {q: summarize(rows[q]) for q in order}
    overall = summarize([item for q in order for item in rows[q]])
    overall["macro_accuracy"] = (sum(v["accuracy"] for v in per_type.values()) / len(per_type)
                                 if per_type else 0.0)
    return {"per_type": per_type, "overall": overall}


def format_table(result: dict) -> str:
    lines = ["| qtype | n | correct | accuracy | chance | majority |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = list(result["per_type"].items()) + [("**overall**", result["overall"])]
    for name, v in rows:
        lines.append(f"| {name} | {v['n']} | {v['correct']} | {v['accuracy']:.3f} | "
                     f"{v['chance']:.3f} | {v['majority']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Generate the synthetic FtZ perception VQA set.")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--train", type=int, default=2000, help="number of training records")
    p.add_argument("--test", type=int, default=500, help="number of held-out test records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    try:
        counts = generate_dataset(args.out, args.train, args.test, args.seed, args.image_size,
                                  overwrite=args.overwrite)
    except FileExistsError as e:
        p.error(str(e))
    for split, per_type in counts.items():
        detail = ", ".join(f"{q}={per_type.get(q, 0)}" for q in QTYPES)
        print(f"{split}: {sum(per_type.values())} records ({detail})")
    print(f"vocabulary: {len(all_words())} words, {len(answer_vocabulary())} answers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
