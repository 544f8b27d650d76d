"""Tests for the synthetic perception VQA set (ftz_edge.training.synthetic)."""
import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ftz_edge.training import synthetic as syn


def _load(out, split):
    return json.loads((out / f"{split}.json").read_text())


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _question(rec):
    return rec["conversations"][0]["value"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "set"
    counts = syn.generate_dataset(out, n_train=100, n_test=40, seed=7)
    return out, counts


def test_same_seed_is_byte_identical_and_other_seed_differs(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    syn.generate_dataset(again, n_train=100, n_test=40, seed=7)
    for split in ("train", "test"):
        assert (out / f"{split}.json").read_bytes() == (again / f"{split}.json").read_bytes()
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(p.name for p in (again / "images").iterdir())
    assert len(names) == 140
    for name in names:
        assert np.array_equal(_pixels(out / "images" / name), _pixels(again / "images" / name))

    other = tmp_path / "other"
    syn.generate_dataset(other, n_train=100, n_test=40, seed=8)
    assert (other / "train.json").read_bytes() != (out / "train.json").read_bytes()
    differing = sum(not np.array_equal(_pixels(out / "images" / n), _pixels(other / "images" / n))
                    for n in names)
    assert differing > 130  # essentially every image changes


def test_records_are_valid_llava_and_balanced(dataset):
    out, counts = dataset
    seen_images = {}
    for split, n in (("train", 100), ("test", 40)):
        recs = _load(out, split)
        assert len(recs) == n
        for rec in recs:
            assert set(rec) == {"id", "image", "conversations", "qtype"}
            assert isinstance(rec["id"], str) and rec["image"] == f"images/{rec['id']}.png"
            (human, gpt) = rec["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert human["value"].endswith(" Answer with one word.")
            assert gpt["value"] in syn.answer_choices(rec["qtype"])
            img = Image.open(out / rec["image"])
            assert img.mode == "RGB" and img.size == (64, 64)
            digest = hashlib.sha256(img.tobytes()).hexdigest()
            seen_images.setdefault(split, set()).add(digest)
            assert rec["image"] not in seen_images.get("paths", set())
            seen_images.setdefault("paths", set()).add(rec["image"])
        per_type = Counter(r["qtype"] for r in recs)
        assert per_type == {q: n // 5 for q in syn.QTYPES}
        assert counts[split] == dict(per_type)
        # Answers are balanced inside each type too: yes/no exactly half, left..below a quarter.
        exists = Counter(r["conversations"][1]["value"] for r in recs if r["qtype"] == "exists")
        assert exists["yes"] == exists["no"] == n // 10
        pos = Counter(r["conversations"][1]["value"] for r in recs if r["qtype"] == "position")
        assert max(pos.values()) - min(pos.values()) <= 1 and len(pos) == 4
    # Held-out split: no image (by path or by content) is shared between train and test.
    assert not seen_images["train"] & seen_images["test"]
    assert len(list((out / "images").iterdir())) == 140
    # No temp folder is left next to the output.
    assert [p.name for p in out.parent.iterdir()] == ["set"]


def test_dataset_images_match_regenerated_scenes(dataset):
    out, _ = dataset
    recs = _load(out, "test")
    for rec, ex in zip(recs, syn.split_examples(40, 7, "test")):
        assert _question(rec) == f"<image>\n{ex.question}{syn.SUFFIX}"
        assert rec["conversations"][1]["value"] == ex.answer and rec["qtype"] == ex.qtype
        assert np.array_equal(_pixels(out / rec["image"]), np.asarray(ex.image))


def _saved(ex, tmp_path):
    path = tmp_path / "x.png"
    ex.image.save(path)
    return _pixels(path)


def _colour_mask(px, colour):
    return np.all(px == np.array(syn.PALETTE[colour]), axis=-1)


@pytest.mark.parametrize("seed", range(12))
def test_answers_agree_with_scene_and_pixels(seed, tmp_path):
    for qtype in syn.QTYPES:
        ex = syn.generate_example(seed * 101 + 3, qtype)
        px = _saved(ex, tmp_path)
        assert len(ex.shapes) <= 4 and (len(ex.shapes) >= 1 or qtype == "text")
        colours = [s.color for s in ex.shapes]
        assert len(set(colours)) == len(colours)  # distinct colours name shapes uniquely
        for s in ex.shapes:  # the centre pixel of every shape has its palette colour
            assert tuple(px[s.cy, s.cx]) == syn.PALETTE[s.color]
        # Number of palette colours visible in the image = number of shapes drawn.
        visible = [c for c in syn.PALETTE if _colour_mask(px, c).sum() > 5]
        assert sorted(visible) == sorted(colours)
        q = ex.question
        if qtype == "color":
            kind = re.fullmatch(r"What color is the (\w+)\?", q).group(1)
            (target,) = [s for s in ex.shapes if s.kind == kind]
            assert ex.answer == target.color
            assert tuple(px[target.cy, target.cx]) == syn.PALETTE[ex.answer]
        elif qtype == "count":
            kind = re.fullmatch(r"How many (\w+)s are there\?", q).group(1)
            n = len(ex.shapes) if kind == "shape" else sum(s.kind == kind for s in ex.shapes)
            assert ex.answer == syn.NUMBER_WORDS[n]
        elif qtype == "position":
            pattern = r"Is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+)\?"
            m = re.fullmatch(pattern, q)
            c0, k0, pair, c1, k1 = m.groups()
            a = next(s for s in ex.shapes if s.color == c0)
            b = next(s for s in ex.shapes if s.color == c1)
            assert (a.kind, b.kind) == (k0, k1)
            axis = 1 if pair == "left or right of" else 0
            # Pixel centroids (image rows = y, cols = x) give the same relation, with a margin.
            ca = np.argwhere(_colour_mask(px, c0)).mean(0)[axis]
            cb = np.argwhere(_colour_mask(px, c1)).mean(0)[axis]
            if axis == 1:
                expected = "left" if ca < cb else "right"
            else:
                expected = "above" if ca < cb else "below"
            assert ex.answer == expected
            assert abs(ca - cb) >= a.r + b.r
        elif qtype == "exists":
            color, kind = re.fullmatch(r"Is there a (\w+) (\w+)\?", q).groups()
            present = any((s.color, s.kind) == (color, kind) for s in ex.shapes)
            assert ex.answer == ("yes" if present else "no")
        else:
            assert q == "What is the written character?"
            assert ex.text == ex.answer.upper() and ex.text in syn.CHARSET
        # Dark (text) pixels exist exactly when a character is drawn, and only inside its box.
        dark = np.argwhere(px.sum(-1) < 150)
        if ex.text is None:
            assert len(dark) == 0
        else:
            x0, y0, x1, y1 = ex.text_box
            assert len(dark) > 3
            assert dark[:, 1].min() >= x0 and dark[:, 1].max() <= x1
            assert dark[:, 0].min() >= y0 and dark[:, 0].max() <= y1


def test_requested_answer_is_honoured_and_invalid_rejected():
    for qtype in syn.QTYPES:
        for i, ans in enumerate(syn.answer_choices(qtype)):
            assert syn.generate_example(i, qtype, answer=ans).answer == ans
    with pytest.raises(ValueError):
        syn.generate_example(0, "count", answer="five")
    with pytest.raises(ValueError):
        syn.generate_example(0, "shape")


def test_custom_image_size(tmp_path):
    syn.generate_dataset(tmp_path / "s", n_train=10, n_test=5, seed=1, image_size=96)
    for rec in _load(tmp_path / "s", "train"):
        assert Image.open(tmp_path / "s" / rec["image"]).size == (96, 96)


def test_vocabulary_covers_every_record(dataset):
    out, _ = dataset
    words = set(syn.all_words())
    questions = set(syn.all_questions())
    for rec in _load(out, "train") + _load(out, "test"):
        q = _question(rec)
        assert q.split("\n", 1)[1] in questions
        assert set(syn.tokenize(q)) - words == {"<image>"}
        assert rec["conversations"][1]["value"] in words
    answers = syn.answer_vocabulary()
    assert len(answers) == len(set(answers)) == 6 + 5 + 4 + len(syn.CHARSET) + 2
    assert {"red", "two", "left", "below", "yes", "7", "a", "?", ".", "How"} <= words
    assert "<image>" not in words
    tokens = syn.tokenize("<image>\nIs the red circle left?")
    assert tokens == ["<image>", "Is", "the", "red", "circle", "left", "?"]


def _rec(i, qtype, question, answer):
    return {"id": str(i), "image": f"images/{i}.png", "qtype": qtype, "conversations": [
        {"from": "human", "value": f"<image>\n{question} Answer with one word."},
        {"from": "gpt", "value": answer}]}


def test_evaluate_hand_computed():
    recs = [
        _rec(0, "color", "What color is the circle?", "red"),
        _rec(1, "count", "How many shapes are there?", "two"),
        _rec(2, "count", "How many circles are there?", "zero"),
        _rec(3, "count", "How many squares are there?", "three"),
        _rec(4, "text", "What is the written character?", "7"),
        _rec(5, "text", "What is the written character?", "a"),
        _rec(6, "text", "What is the written character?", "2"),
        _rec(7, "exists", "Is there a green triangle?", "yes"),
        _rec(8, "exists", "Is there a red square?", "no"),
        _rec(9, "position", "Is the red circle left or right of the blue square?", "left"),
    ]
    preds = ["Red.", "2", "zero circles", "4", " 7 \n", "A", "two", "No", "no, there isn't",
             "right"]
    res = syn.evaluate(recs, preds)
    pt = res["per_type"]
    assert list(pt) == ["color", "count", "position", "text", "exists"]
    assert (pt["color"]["n"], pt["color"]["correct"], pt["color"]["accuracy"]) == (1, 1, 1.0)
    assert (pt["count"]["correct"], pt["count"]["n"]) == (2, 3)  # "2"->two, "zero circles"->zero
    assert pt["text"]["correct"] == 2  # digit->word mapping applies to count only, so "two" != "2"
    assert pt["exists"]["correct"] == 1 and pt["exists"]["accuracy"] == 0.5
    assert pt["position"]["correct"] == 0
    assert res["overall"]["n"] == 10 and res["overall"]["correct"] == 6
    assert res["overall"]["accuracy"] == pytest.approx(0.6)
    # Chance as posed: 1/6 colours; count "shapes" has 4 answers, per-kind 5; 1/len(CHARSET); 1/2.
    assert pt["color"]["chance"] == pytest.approx(1 / 6)
    assert pt["count"]["chance"] == pytest.approx((1 / 4 + 1 / 5 + 1 / 5) / 3)
    assert pt["text"]["chance"] == pytest.approx(1 / len(syn.CHARSET))
    assert pt["exists"]["chance"] == pt["position"]["chance"] == 0.5
    expected = (1 / 6 + 1 / 4 + 2 / 5 + 3 / len(syn.CHARSET) + 0.5 * 3) / 10
    assert res["overall"]["chance"] == pytest.approx(expected)
    assert pt["count"]["majority"] == pytest.approx(1 / 3)
    macro = (1.0 + 2 / 3 + 0.0 + 2 / 3 + 0.5) / 5
    assert res["overall"]["macro_accuracy"] == pytest.approx(macro)

    # Keyed by id gives the same numbers; missing or misaligned predictions are errors.
    assert syn.evaluate(recs, {r["id"]: p for r, p in zip(recs, preds)}) == res
    with pytest.raises(ValueError):
        syn.evaluate(recs, preds[:-1])
    with pytest.raises(ValueError):
        syn.evaluate(recs, {"0": "red"})

    table = syn.format_table(res)
    lines = table.splitlines()
    assert lines[0].startswith("| qtype | n | correct | accuracy | chance")
    assert len(lines) == 2 + 5 + 1
    assert "| count | 3 | 2 | 0.667 | 0.217 |" in table
    assert lines[-1].startswith("| **overall** | 10 | 6 | 0.600 |")


def test_normalize():
    assert syn.normalize("Red.") == "red"
    assert syn.normalize("  LEFT, of course") == "left"
    assert syn.normalize("3", "count") == "three"
    assert syn.normalize("3", "text") == "3"
    assert syn.normalize("9", "count") == "9"
    assert syn.normalize("") == ""


def test_refuses_non_empty_out_dir(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        syn.generate_dataset(out, 5, 5, seed=0)
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temp left behind

    syn.generate_dataset(out, 5, 5, seed=0, overwrite=True)
    assert not (out / "keep.txt").exists() and len(_load(out, "train")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]

    empty = tmp_path / "empty"
    empty.mkdir()
    syn.generate_dataset(empty, 5, 0, seed=0)  # an empty folder is fine to fill
    assert len(_load(empty, "train")) == 5 and _load(empty, "test") == []


def test_cli_prints_counts(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "c"), "--train", "10", "--test", "5", "--seed", "3"]
    assert syn.main(argv) == 0
    out = capsys.readouterr().out
    assert "train: 10 records (color=2, count=2, position=2, text=2, exists=2)" in out
    assert "test: 5 records (color=1, count=1, position=1, text=1, exists=1)" in out
    with pytest.raises(SystemExit):
        syn.main(["--out", str(tmp_path / "c"), "--train", "1", "--test", "1"])
