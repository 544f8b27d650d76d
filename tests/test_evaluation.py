"""ftz-eval: the official metrics on hand-made answers (expected values worked out by hand from
counts, written as that arithmetic), the readers on small files in the benchmarks' layouts
(and their errors on broken ones), and the CLI end to end on a tiny benchmark with the shipped
default model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import ftz_edge
from ftz_edge.evaluation import metrics, readers, scoring
from ftz_edge.evaluation.cli import main
from ftz_edge.evaluation.errors import EvalDataError
from ftz_edge.evaluation.predictors import detect_kind, parse_models
from ftz_edge.evaluation.questions import SHORT_ANSWER

# ---- POPE ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, parsed", [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("Yes, there is a dog.", "yes"),
    ("There is not a dog in the image", "no"),  # 'not' as a word
    ("Yes. No.", "yes"),  # only the first sentence counts
    ("I see no,dog", "yes"),  # commas are deleted before splitting: "no,dog" becomes the word "nodog"
    ("Nothing", "yes"), ("Not really", "yes"),  # neither 'no', 'No' nor 'not' as a whole word
    ("", "yes"),
])
def test_pope_answer_follows_llava(answer, parsed):
    assert metrics.pope_answer(answer) == parsed


def test_pope_metrics_from_counts():
    labels = ["yes", "yes", "yes", "no", "no"]
    answers = ["Yes", "Yes, it is.", "No", "Yes", "yes"]  # TP, TP, FN, FP, FP
    result = metrics.pope_metrics(answers, labels)
    tp, fn, fp, tn = 2, 1, 2, 0
    assert (result["tp"], result["fn"], result["fp"], result["tn"]) == (tp, fn, fp, tn)
    assert result["accuracy"] == pytest.approx(2 / 5)
    assert result["precision"] == pytest.approx(2 / 4)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))  # = 4/7
    assert result["yes_ratio"] == pytest.approx(4 / 5)


def test_pope_scores_per_split_and_their_mean():
    entries = [{"id": "random/1", "group": "random", "prediction": "Yes", "label": "yes"},
               {"id": "random/2", "group": "random", "prediction": "No", "label": "yes"},
               {"id": "popular/1", "group": "popular", "prediction": "No", "label": "no"},
               {"id": "popular/2", "group": "popular", "prediction": "Yes", "label": "yes"}]
    scores = scoring.score_pope(entries)
    # random: TP 1, FN 1 -> precision 1/1, recall 1/2, F1 2/3, accuracy 1/2; popular: all right.
    assert scores.metrics["pope/random/f1"] == pytest.approx(100 * 2 / 3)
    assert scores.metrics["pope/random/accuracy"] == pytest.approx(100 * 1 / 2)
    assert scores.metrics["pope/popular/f1"] == pytest.approx(100.0)
    assert scores.metrics["pope/mean/f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert scores.metrics["pope/mean/accuracy"] == pytest.approx(100 * (1 / 2 + 1) / 2)
    assert scores.metrics["pope/random/questions"] == 2


# ---- TextVQA ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, normalised", [
    ("The Dog.", "dog"),  # case, final period, article
    ("an apple", "apple"),
    ("Two", "2"), ("two dogs", "2 dogs"), ("none", "0"),  # number words
    ("dont", "don't"), ("isnt it", "isn't it"),  # contractions restored
    ("black-and-white", "black and white"),  # a mark inside a word becomes a space
    ("coca - cola", "coca cola"),  # a mark next to a space is deleted
    ("yes!", "yes"), ("what?", "what"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("1,000", "1000"),
    ("john's", "john 's"),  # "'s" is split off, as the reference does
    ("Hello\nWorld\t", "hello world"),
])
def test_vqa_normalisation(raw, normalised):
    assert metrics.vqa_normalize(raw) == normalised


def test_textvqa_leave_one_out_accuracy():
    humans = ["stop"] * 2 + ["go"] * 8
    # Leaving out one of the 2 "stop" answers leaves 1 match (1/3), one of the 8 others leaves 2 (2/3).
    assert metrics.vqa_accuracy("stop", humans) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert metrics.vqa_accuracy("The Stop.", humans) == pytest.approx(0.6)  # normalised before matching
    # 3 agree: leaving one of them out leaves 2 (2/3), leaving out any of the other 7 leaves 3 (1).
    three = ["red"] * 3 + ["blue"] * 7
    assert metrics.vqa_accuracy("red", three) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)  # 0.9
    assert metrics.vqa_accuracy("blue", three) == pytest.approx(1.0)
    assert metrics.vqa_accuracy("green", three) == 0.0
    one = ["a cat"] + ["dog"] * 9
    assert metrics.vqa_accuracy("cat", one) == pytest.approx((1 * 0 + 9 * (1 / 3)) / 10)  # 0.3


def test_textvqa_score_is_the_mean_over_questions():
    entries = [{"id": "7", "group": "val", "prediction": "stop", "answers": ["stop"] * 2 + ["go"] * 8},
               {"id": "8", "group": "val", "prediction": "Nike", "answers": ["nike"] * 10}]
    scores = scoring.score_textvqa(entries)
    assert scores.metrics["textvqa/accuracy"] == pytest.approx(100 * (0.6 + 1.0) / 2)
    assert scores.metrics["textvqa/questions"] == 2


# ---- MME ----------------------------------------------------------------------------------


@pytest.mark.parametrize("response, parsed", [
    ("Yes", "yes"), ("no", "no"), ("No, it is not.", "no"), ("yes.", "yes"),
    ("nope", "no"),  # 'no' within the first four characters
    ("There is no dog", "other"), ("I think yes", "other"), ("", "other"),
])
def test_mme_answer_parsing(response, parsed):
    assert metrics.mme_answer(response) == parsed


def test_mme_acc_plus_needs_both_questions_of_an_image():
    items = [("a.jpg", "Yes", "Yes"), ("a.jpg", "No", "No"),  # both right
             ("b.jpg", "Yes", "Yes"), ("b.jpg", "No", "Yes"),  # one right: counts for acc, not acc+
             ("c.jpg", "Yes", "maybe"), ("c.jpg", "No", "no")]  # 'other' is wrong
    result = metrics.mme_subtask(items)
    assert result["acc"] == pytest.approx(100 * 4 / 6)
    assert result["acc_plus"] == pytest.approx(100 * 1 / 3)
    assert result["score"] == pytest.approx(100 * 4 / 6 + 100 * 1 / 3)
    assert (result["questions"], result["images"], result["other"]) == (6, 3, 1)


def test_mme_totals_add_subtask_scores():
    entries = [{"id": f"{t}/{i}", "group": t, "image": f"{t}/{i // 2}", "label": "yes", "prediction": p}
               for t, answers in (("color", ["Yes", "Yes"]), ("OCR", ["Yes", "No"]), ("code_reasoning", ["No", "No"]))
               for i, p in enumerate(answers)]
    scores = scoring.score_mme(entries)
    color, ocr, code = 100 + 100, 100 * 1 / 2 + 0, 0 + 0
    assert scores.metrics["mme/color"] == pytest.approx(color)
    assert scores.metrics["mme/OCR"] == pytest.approx(ocr)
    assert scores.metrics["mme/perception"] == pytest.approx(color + ocr)
    assert scores.metrics["mme/cognition"] == pytest.approx(code)


# ---- readers ------------------------------------------------------------------------------


def _png(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)
    return path


def _jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def make_pope(root: Path, splits=("random", "popular")) -> dict:
    """LLaVA's layout: coco/coco_pope_<split>.json + val2014/. Returns id -> label."""
    labels = {}
    for s, split in enumerate(splits):
        records = []
        for i, (obj, label) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes")]):
            image = f"COCO_val2014_{s}{i:011d}.jpg"
            _png(root / "val2014" / image, (40 * i, 100, 50 * s))
            records.append({"question_id": i + 1, "image": image, "text": f"Is there a {obj} in the image?", "label": label})
            labels[f"{split}/{i + 1}"] = label
        _jsonl(root / "coco" / f"coco_pope_{split}.json", records)
    return labels


def test_pope_reader_layout_prompt_and_limit(tmp_path):
    labels = make_pope(tmp_path / "pope")
    questions = readers.read_pope(tmp_path / "pope")
    assert {q.id: q.truth["label"] for q in questions} == labels
    assert questions[0].prompt == f"Is there a dog in the image?\n{SHORT_ANSWER}"
    assert all(Path(q.image).is_file() for q in questions)
    one_file = readers.read_pope(tmp_path / "pope" / "coco" / "coco_pope_random.json")  # images found beside coco/
    assert [q.id for q in one_file] == ["random/1", "random/2", "random/3"]
    limited = readers.read_pope(tmp_path / "pope", limit=2)
    assert sorted(q.id for q in limited) == ["popular/1", "popular/2", "random/1", "random/2"]


def test_pope_reader_errors_name_the_file_and_line(tmp_path):
    make_pope(tmp_path / "pope", splits=("random",))
    path = tmp_path / "pope" / "coco" / "coco_pope_random.json"
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="no POPE annotation files"):
        readers.read_pope(tmp_path / "empty")
    with pytest.raises(EvalDataError, match="does not exist"):
        readers.read_pope(tmp_path / "missing")
    good = path.read_text().splitlines()
    path.write_text("\n".join([good[0], '{"question_id": 2, "image": ', good[2]]) + "\n")
    with pytest.raises(EvalDataError, match=f"{path}:2: not valid JSON"):
        readers.read_pope(tmp_path / "pope")
    path.write_text("\n".join([good[0], json.dumps({"question_id": 2, "image": "x.jpg", "text": "?"})]) + "\n")
    with pytest.raises(EvalDataError, match=f"{path}:2: missing field 'label'"):
        readers.read_pope(tmp_path / "pope")
    path.write_text(json.dumps({"question_id": 1, "image": "gone.jpg", "text": "?", "label": "yes"}) + "\n")
    with pytest.raises(EvalDataError, match=f"{path}:1: image .*gone.jpg does not exist"):
        readers.read_pope(tmp_path / "pope")
    _png(tmp_path / "pope" / "val2014" / "x.png")
    path.write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "?", "label": "maybe"}) + "\n")
    with pytest.raises(EvalDataError, match="label must be yes or no"):
        readers.read_pope(tmp_path / "pope")


HUMANS = ["stop"] * 2 + ["go"] * 8


def make_textvqa(root: Path) -> dict:
    """LLaVA's question jsonl (question, OCR line, short-answer line) + the official annotations."""
    _png(root / "train_images" / "abc123.jpg")
    _png(root / "train_images" / "def456.jpg", (10, 10, 200))
    data = [{"question_id": 7, "image_id": "abc123", "question": "What does the sign say?", "answers": HUMANS},
            {"question_id": 8, "image_id": "def456", "question": "What brand is it?", "answers": ["nike"] * 10}]
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    _jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "abc123", "image": "abc123.jpg",
         "text": f"what does the sign say?\nReference OCR token: STOP, go\n{SHORT_ANSWER}"},
        {"question_id": "def456", "image": "def456.jpg", "text": "what brand is it?"}])
    return {"7": HUMANS, "8": ["nike"] * 10}


def test_textvqa_reader_matches_annotations(tmp_path):
    answers = make_textvqa(tmp_path)
    questions = readers.read_textvqa(*readers.textvqa_paths(tmp_path, None, None, None))
    assert {q.id: q.truth["answers"] for q in questions} == answers
    assert questions[0].prompt == f"what does the sign say?\nReference OCR token: STOP, go\n{SHORT_ANSWER}"
    assert questions[1].prompt == f"what brand is it?\n{SHORT_ANSWER}"
    dropped = readers.read_textvqa(*readers.textvqa_paths(tmp_path, None, None, None), drop_ocr_tokens=True)
    assert dropped[0].prompt == f"what does the sign say?\n{SHORT_ANSWER}"


def test_textvqa_reader_errors(tmp_path):
    make_textvqa(tmp_path)
    paths = readers.textvqa_paths(tmp_path, None, None, None)
    annotations = tmp_path / "TextVQA_0.5.1_val.json"
    data = json.loads(annotations.read_text())
    data["data"][1]["answers"] = ["nike"] * 9
    annotations.write_text(json.dumps(data))
    with pytest.raises(EvalDataError, match=r"data\[1\]: 'answers' must be a list of 10 strings"):
        readers.read_textvqa(*paths)
    del data["data"][1]
    annotations.write_text(json.dumps(data))
    with pytest.raises(EvalDataError, match=f"{paths[0]}:2: no entry in .* for image 'def456'"):
        readers.read_textvqa(*paths)
    with pytest.raises(EvalDataError, match="TextVQA question file .*nothing.jsonl does not exist"):
        readers.read_textvqa(tmp_path / "nothing.jsonl", paths[1], paths[2])


def make_mme(root: Path) -> dict:
    """Both subtask layouts: color/ with images and txt side by side, code_reasoning/ with
    images/ + questions_answers_YN/. Returns question id -> label."""
    release = root / "MME_Benchmark_release_version"
    _png(release / "color" / "001.png", (250, 250, 30))
    (release / "color" / "001.txt").write_text("Is the square yellow? Please answer yes or no.\tYes\n"
                                               "Is the square blue? Please answer yes or no.\tNo\n")
    _png(release / "code_reasoning" / "images" / "0020.png")
    (release / "code_reasoning" / "questions_answers_YN").mkdir(parents=True)
    (release / "code_reasoning" / "questions_answers_YN" / "0020.txt").write_text(
        "Will the code print 3? Please answer yes or no.\tNo\r\nWill the code print 4? Please answer yes or no.\tYes\r\n")
    return {"color/001.png#0": "yes", "color/001.png#1": "no",
            "code_reasoning/0020.png#0": "no", "code_reasoning/0020.png#1": "yes"}


def test_mme_reader_both_layouts(tmp_path):
    labels = make_mme(tmp_path)
    questions = readers.read_mme(tmp_path)
    assert {q.id: q.truth["label"] for q in questions} == labels
    assert questions[0].prompt == f"Is the square yellow? Please answer yes or no.\n{SHORT_ANSWER}"
    assert {q.group for q in questions} == {"color", "code_reasoning"}


def test_mme_reader_errors(tmp_path):
    make_mme(tmp_path)
    txt = tmp_path / "MME_Benchmark_release_version" / "color" / "001.txt"
    txt.write_text("Is it yellow?\tYes\nIs it blue?\tMaybe\n")
    with pytest.raises(EvalDataError, match=f"{txt}:2: the answer must be yes or no"):
        readers.read_mme(tmp_path)
    txt.write_text("Is it yellow? Yes\nIs it blue?\tNo\n")
    with pytest.raises(EvalDataError, match=f"{txt}:1: expected 'question<TAB>Yes|No'"):
        readers.read_mme(tmp_path)
    txt.write_text("Is it yellow?\tYes\n")
    with pytest.raises(EvalDataError, match=f"{txt}: MME has two questions per image, this file has 1"):
        readers.read_mme(tmp_path)
    txt.write_text("Is it yellow?\tYes\nIs it blue?\tNo\n")
    (tmp_path / "MME_Benchmark_release_version" / "color" / "001.png").unlink()
    with pytest.raises(EvalDataError, match=f"{txt}: no image 001.jpg or 001.png"):
        readers.read_mme(tmp_path)
    with pytest.raises(EvalDataError, match="no MME subtask folders"):
        readers.read_mme(tmp_path / "MME_Benchmark_release_version" / "color")


def test_model_folders_are_recognised(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ftz_config.json").write_text("{}")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert detect_kind(tmp_path / "ckpt") == "checkpoint"
    assert detect_kind(tmp_path / "bundle") == "bundle"
    with pytest.raises(EvalDataError, match="neither an exported bundle"):
        detect_kind(tmp_path / "empty")
    specs = parse_models([str(tmp_path / "ckpt"), f"int8={tmp_path / 'bundle'}", str(tmp_path / "ckpt")])
    assert [(s.label, s.kind) for s in specs] == [("ckpt#1", "checkpoint"), ("int8", "bundle"), ("ckpt#2", "checkpoint")]


def test_cli_reports_bad_data_without_a_traceback(tmp_path):
    make_pope(tmp_path / "pope", splits=("random",))
    path = tmp_path / "pope" / "coco" / "coco_pope_random.json"
    path.write_text(path.read_text() + "{oops\n")
    result = subprocess.run([sys.executable, "-m", "ftz_edge.evaluation.cli", "--pope", str(tmp_path / "pope"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith(f"ftz-eval: error: {path}:4: not valid JSON"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_readers_and_metrics_do_not_import_torch():
    code = ("import sys; from ftz_edge.evaluation import cli, readers, metrics, scoring, report;"
            "readers.read_synthetic(10, 0); assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- end to end ---------------------------------------------------------------------------


@pytest.fixture
def tiny_benchmarks(tmp_path):
    return {"pope": make_pope(tmp_path / "pope", splits=("random",)), "textvqa": make_textvqa(tmp_path / "textvqa"),
            "mme": make_mme(tmp_path / "mme"), "root": tmp_path}


def _run_cli(tmp_path, models, capsys):
    out = tmp_path / "results"
    argv = [a for m in models for a in ("--model", m)] + [
        "--pope", str(tmp_path / "pope"), "--textvqa", str(tmp_path / "textvqa"), "--mme", str(tmp_path / "mme"),
        "--synthetic", "500", "--limit", "6", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert (out / "eval.md").is_file() and (out / "eval.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    report = json.loads((out / "eval.json").read_text())
    _check_chart(out, report)
    return report, (out / "eval.md").read_text(), capsys.readouterr().out


def _check_chart(out, report):
    """eval.png beside the tables is a real PNG, and what it plots is the table's numbers."""
    from ftz_edge.evaluation.report import write_chart

    with Image.open(out / "eval.png") as image:
        image.verify()
    with Image.open(out / "eval.png") as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 300
        size = image.size
    plotted = write_chart(out / "replot.png", report["models"], report["table"]["rows"])  # the same drawing
    with Image.open(out / "replot.png") as image:
        assert image.size == size
    (out / "replot.png").unlink()
    _check_plotted(plotted, report["models"], report["table"]["rows"])
    assert "`eval.png`" in (out / "eval.md").read_text()


def _check_plotted(plotted, models, rows):
    """Every score of the table (% and points; not counts) is one bar of its model, nothing else is."""
    bars = {(panel, label, metric): value for panel, by_label in plotted.items()
            for label, values in by_label.items() for metric, value in values.items()}
    expected = {}
    for row in rows:
        if row["unit"] == "":
            continue
        benchmark = row["metric"].split("/")[0]
        panel = benchmark if row["unit"] == "%" else f"{benchmark} ({row['unit']})"
        for model in models:
            value = row["values"].get(model["label"])
            if value is not None:
                expected[(panel, model["label"], row["metric"])] = value
    assert expected and bars == pytest.approx(expected)


def _check_recomputed(report, label, truth):
    """Every reported metric equals the metric recomputed from the saved predictions with the
    ground truth this test wrote (not the one the tool saved beside them)."""
    results = report["results"][label]
    pope = {e["id"]: e["prediction"] for e in results["pope"]["predictions"]}
    assert set(pope) == set(truth["pope"])
    expected = metrics.pope_metrics([pope[i] for i in truth["pope"]], list(truth["pope"].values()))
    for name in ("f1", "accuracy", "precision", "recall", "yes_ratio"):
        assert results["pope"]["metrics"][f"pope/random/{name}"] == pytest.approx(100 * expected[name])

    textvqa = {e["id"]: e["prediction"] for e in results["textvqa"]["predictions"]}
    expected = sum(metrics.vqa_accuracy(textvqa[i], truth["textvqa"][i]) for i in truth["textvqa"]) / 2
    assert results["textvqa"]["metrics"]["textvqa/accuracy"] == pytest.approx(100 * expected)

    mme = {e["id"]: e["prediction"] for e in results["mme"]["predictions"]}
    assert set(mme) == set(truth["mme"])
    for subtask, total in (("color", "perception"), ("code_reasoning", "cognition")):
        items = [(i.split("#")[0], label_, mme[i]) for i, label_ in truth["mme"].items() if i.startswith(subtask)]
        expected = metrics.mme_subtask(items)["score"]
        assert results["mme"]["metrics"][f"mme/{subtask}"] == pytest.approx(expected)
        assert results["mme"]["metrics"][f"mme/{total}"] == pytest.approx(expected)

    from ftz_edge.training import synthetic

    examples = list(synthetic.split_examples(500, 0, "test", qtypes=synthetic.DEFAULT_MODEL_QTYPES))[:6]
    records = [synthetic.to_record(ex, i) for i, ex in enumerate(examples)]
    saved = [e["prediction"] for e in results["synthetic"]["predictions"]]
    expected = synthetic.evaluate(records, saved)["overall"]["accuracy"]
    assert results["synthetic"]["metrics"]["synthetic/overall/accuracy"] == pytest.approx(100 * expected)


def test_cli_end_to_end_with_the_default_checkpoint(tiny_benchmarks, capsys):
    tmp_path = tiny_benchmarks["root"]
    report, markdown, printed = _run_cli(tmp_path, [f"default={ftz_edge.DEFAULT_MODEL}"], capsys)
    (model,) = report["models"]
    assert (model["label"], model["kind"], model["tower_kind"]) == ("default", "checkpoint", "ftz")
    assert model["path"] == str(ftz_edge.DEFAULT_MODEL)
    _check_recomputed(report, "default", tiny_benchmarks)
    assert report["benchmarks"]["mme"]["questions"] == 4 and report["benchmarks"]["synthetic"]["questions"] == 6
    f1 = report["results"]["default"]["pope"]["metrics"]["pope/random/f1"]
    row = f"| pope/random/f1 (%) | {f1:.2f} |"
    assert row in markdown and row in printed


def test_chart_groups_scores_per_metric_and_model(tmp_path, capsys):
    """eval.png from a made-up two-model table: per question type bars, a missing value has no
    bar, points get their own panel, counts are not plotted; without matplotlib, one line and
    the tables."""
    import sys

    from ftz_edge.evaluation import report as report_mod

    models = [{"label": "a", "kind": "checkpoint", "runtime": "pytorch", "path": "x", "precision": {"vision": "fp32", "llm": "fp32"},
               "tower_kind": "ftz"},
              {"label": "b", "kind": "bundle", "runtime": "onnxruntime", "path": "y", "precision": {"vision": "fp16", "llm": "int4"},
               "tower_kind": "ftz"}]
    results = {"a": {"synthetic": {"metrics": {"synthetic/overall/accuracy": 60.0, "synthetic/color/accuracy": 75.0,
                                               "synthetic/count/accuracy": 25.0, "synthetic/questions": 8},
                                   "units": {"synthetic/overall/accuracy": "%", "synthetic/color/accuracy": "%",
                                             "synthetic/count/accuracy": "%", "synthetic/questions": ""}},
                     "mme": {"metrics": {"mme/perception": 150.0, "mme/questions": 4},
                             "units": {"mme/perception": "points", "mme/questions": ""}}},
               "b": {"synthetic": {"metrics": {"synthetic/overall/accuracy": 50.0, "synthetic/color/accuracy": 100.0,
                                               "synthetic/questions": 8},
                                   "units": {"synthetic/overall/accuracy": "%", "synthetic/color/accuracy": "%",
                                             "synthetic/questions": ""}}}}
    rows = report_mod.table_rows(models, results)
    plotted = report_mod.write_chart(tmp_path / "chart.png", models, rows)
    assert plotted == {"synthetic": {"a": {"synthetic/overall/accuracy": 60.0, "synthetic/color/accuracy": 75.0,
                                           "synthetic/count/accuracy": 25.0},
                                     "b": {"synthetic/overall/accuracy": 50.0, "synthetic/color/accuracy": 100.0}},
                       "mme (points)": {"a": {"mme/perception": 150.0}, "b": {}}}
    _check_plotted(plotted, models, rows)
    with Image.open(tmp_path / "chart.png") as image:
        assert image.format == "PNG"
    panels = report_mod.chart_panels(models, rows)
    assert panels["synthetic"]["metrics"] == ["synthetic/overall/accuracy", "synthetic/color/accuracy",
                                              "synthetic/count/accuracy"]
    assert panels["synthetic"]["values"]["b"] == [50.0, 100.0, None]

    report = {"models": models, "benchmarks": {}, "settings": {}, "results": {},
              "table": {"columns": ["a", "b"], "rows": rows}, "table_markdown": report_mod.markdown_table(models, rows)}
    out = tmp_path / "out"
    assert set(report_mod.write_report(out, report)) == {"json", "markdown", "chart"}
    assert (out / "eval.png").is_file()

    # No matplotlib: one line says so, the tables are written, an older chart is not left behind.
    with pytest.MonkeyPatch.context() as patch:  # restores the modules already imported afterwards
        for name in ("matplotlib", "matplotlib.figure"):
            patch.setitem(sys.modules, name, None)  # makes `import matplotlib...` raise ImportError
        capsys.readouterr()
        assert set(report_mod.write_report(out, report)) == {"json", "markdown"}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib is not installed" in err and "tables are written" in err
    assert (out / "eval.md").is_file() and (out / "eval.json").is_file() and not (out / "eval.png").exists()
    assert "eval.png" not in (out / "eval.md").read_text()
    # Only counts in the table: nothing to plot, said in one line.
    counts = [row for row in rows if row["unit"] == ""]
    with pytest.raises(report_mod.ChartUnavailable, match="nothing to plot"):
        report_mod.write_chart(tmp_path / "none.png", models, counts)


@pytest.mark.slow
def test_cli_side_by_side_checkpoint_and_bundle(tiny_benchmarks, default_bundle, capsys):
    """PyTorch and the exported bundle as two columns of one table, on the same questions."""
    tmp_path = tiny_benchmarks["root"]
    report, markdown, _ = _run_cli(tmp_path, [f"pytorch={ftz_edge.DEFAULT_MODEL}", f"onnx={default_bundle}"], capsys)
    kinds = {m["label"]: (m["kind"], m["precision"]) for m in report["models"]}
    manifest = json.loads((Path(default_bundle) / "manifest.json").read_text())
    assert kinds == {"pytorch": ("checkpoint", {"vision": "fp32", "llm": "fp32"}),
                     "onnx": ("bundle", {"vision": manifest["vision"]["precision"], "llm": manifest["llm"]["precision"]})}
    assert report["table"]["columns"] == ["pytorch", "onnx"]
    assert markdown.count("| metric | pytorch | onnx |") == 1
    for label in ("pytorch", "onnx"):
        _check_recomputed(report, label, tiny_benchmarks)


def test_a_question_the_model_cannot_take_is_scored_wrong_and_the_run_goes_on(capsys):
    from ftz_edge.evaluation.cli import answer_all
    from ftz_edge.evaluation.questions import Question

    questions = [Question(str(i), "random", f"img{i}.jpg", f"img{i}.jpg", "Is there a dog?", {"label": label})
                 for i, label in enumerate(["yes", "no", "yes"])]

    def predictor(image, prompt, max_new_tokens):
        if image == "img1.jpg":
            raise ValueError("the prompt needs 700 tokens but the context holds 512")
        return "Yes"

    entries = answer_all(predictor, "m", "pope", questions, 8, lambda items, desc: items)
    assert [e["prediction"] for e in entries] == ["Yes", "", "Yes"]
    assert "error" not in entries[0] and "context holds 512" in entries[1]["error"]
    assert "question 1 (img1.jpg)" in capsys.readouterr().err
    # POPE's rule reads the empty answer as "yes": against the label "no" it is wrong (2 of 3 right).
    assert scoring.score("pope", entries).to_dict()["metrics"]["pope/random/accuracy"] == pytest.approx(2 / 3 * 100)


def test_readme_accuracy_table_is_the_committed_result():
    """README's side-by-side accuracy comes from results/eval-default-synthetic/eval.json."""
    root = Path(__file__).resolve().parent.parent
    results = json.loads((root / "results" / "eval-default-synthetic" / "eval.json").read_text())["results"]
    metrics = [results[m]["synthetic"]["metrics"] for m in
               ("pytorch-fp32", "onnx-fp32", "fp16-tower+int4-llm", "int8-tower+int8-llm")]
    readme = (root / "README.md").read_text()
    overall = " | ".join(f"{m['synthetic/overall/accuracy']:.1f} %" for m in metrics)
    pairs = " | ".join(f"{m['synthetic/color/accuracy']:.0f} / {m['synthetic/count/accuracy']:.0f} %" for m in metrics)
    assert f"| overall | {overall} |" in readme and f"| colour / count | {pairs} |" in readme
    text = " | ".join(f"{m['synthetic/text/accuracy']:.1f} %" for m in metrics)
    assert f"| text (the digit) | {text} |" in readme
    # Per-answer agreement with PyTorch: an accuracy that stays put can hide many changed answers.
    reference = {p["id"]: p["prediction"] for p in results["pytorch-fp32"]["synthetic"]["predictions"]}
    agreement = []
    for name in ("pytorch-fp32", "onnx-fp32", "fp16-tower+int4-llm", "int8-tower+int8-llm"):
        predictions = {p["id"]: p["prediction"] for p in results[name]["synthetic"]["predictions"]}
        agreement.append(f"{sum(predictions[i] == answer for i, answer in reference.items())} / {len(reference)}")
    assert f"| same answer as PyTorch | {' | '.join(agreement)} |" in readme
