"""Readers of the benchmarks' published local files (nothing is ever downloaded).

Each reader checks everything it is given before a model answers anything, and fails with an
``EvalDataError`` that names the file (and line) at fault: a missing file, a bad JSON line, a
missing field, an image that is not there.

Layouts, as LLaVA-1.5's evaluation and the benchmarks ship them:

* POPE: ``coco_pope_{adversarial,popular,random}.json`` (JSON lines: question_id, image, text,
  label yes/no) in a folder or its ``coco/`` subfolder, COCO val2014 images in ``val2014/``
  beside them (or elsewhere, given). These annotation files hold the questions, so LLaVA's
  ``llava_pope_test.jsonl`` (the same questions again, matched back only by order) is not read.
* TextVQA: ``llava_textvqa_val_v051_ocr.jsonl`` (question_id, image, text), the official
  ``TextVQA_0.5.1_val.json`` ({"data": [{question_id, image_id, question, answers}]}) and the
  images (``train_images/``: TextVQA's val images live there).
* MME: ``MME_Benchmark_release_version/<subtask>/`` holding either ``images/`` +
  ``questions_answers_YN/`` or images and same-stem ``.txt`` files side by side; each txt has
  two ``question<TAB>Yes|No`` lines about its image.
* the synthetic fine-grained set of ``ftz_edge.training.synthetic``, generated from its seed.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ftz_edge.evaluation.errors import EvalDataError
from ftz_edge.evaluation.metrics import MME_SUBTASKS
from ftz_edge.evaluation.questions import SHORT_ANSWER, Question, with_short_answer

POPE_SPLITS = ("adversarial", "popular", "random")
TEXTVQA_QUESTIONS = "llava_textvqa_val_v051_ocr.jsonl"
TEXTVQA_ANNOTATIONS = "TextVQA_0.5.1_val.json"
TEXTVQA_IMAGES = "train_images"
MME_RELEASE = "MME_Benchmark_release_version"
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
OCR_LINE = "Reference OCR token:"


# ---- file helpers -------------------------------------------------------------------------

def _existing(path: Path, what: str, folder: bool = False) -> Path:
    if not path.exists():
        raise EvalDataError(f"{what} {path} does not exist")
    if path.is_dir() != folder:
        raise EvalDataError(f"{what} {path} is not a {'folder' if folder else 'file'}")
    return path


def _text(path: Path, what: str) -> str:
    _existing(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalDataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise EvalDataError(f"{path}: cannot read it ({err.strerror or err})") from None


def read_jsonl(path: Path, what: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON-lines file."""
    for number, line in enumerate(_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalDataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise EvalDataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(_text(path, what))
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def require(record: Dict[str, Any], fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise EvalDataError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                            + ", ".join(repr(f) for f in missing))


def _image(folder: Path, name: str, where: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise EvalDataError(f"{where}: image {path} does not exist")
    return path


def _yes_no(value: Any, where: str, field: str) -> str:
    answer = str(value).strip().lower()
    if answer not in ("yes", "no"):
        raise EvalDataError(f"{where}: {field} must be yes or no, got {value!r}")
    return answer


# ---- POPE ---------------------------------------------------------------------------------

def pope_annotation_files(source: Path) -> Dict[str, Path]:
    """split -> annotation file: ``source`` is one ``coco_pope_<split>.json`` or a folder
    holding them directly or in ``coco/`` (LLaVA's ``playground/data/eval/pope``)."""
    if source.is_file():
        split = source.name[len("coco_pope_"):-len(".json")] if source.name.startswith("coco_pope_") else ""
        if split not in POPE_SPLITS or not source.name.endswith(".json"):
            raise EvalDataError(f"{source}: a POPE annotation file is named coco_pope_<split>.json with split "
                                f"one of {', '.join(POPE_SPLITS)}")
        return {split: source}
    _existing(source, "POPE folder", folder=True)
    for folder in (source, source / "coco"):
        found = {s: folder / f"coco_pope_{s}.json" for s in POPE_SPLITS if (folder / f"coco_pope_{s}.json").is_file()}
        if found:
            return found
    raise EvalDataError(f"{source}: no POPE annotation files (coco_pope_{{{','.join(POPE_SPLITS)}}}.json) "
                        "in it or in its coco/ folder")


def default_pope_images(source: Path) -> Path:
    """LLaVA's layout: val2014/ beside the annotation folder (or beside its coco/ folder)."""
    base = source.parent if source.is_file() else source
    for folder in (base / "val2014", base.parent / "val2014"):
        if folder.is_dir():
            return folder
    return base / "val2014"


def read_pope(source: Path, images: Optional[Path] = None, limit: Optional[int] = None) -> List[Question]:
    """POPE questions of every split found; ``limit`` keeps the first N of each split."""
    files = pope_annotation_files(Path(source))
    images = _existing(Path(images) if images else default_pope_images(Path(source)), "POPE image folder", folder=True)
    questions = []
    for split, path in files.items():
        seen = set()
        for number, record in islice(read_jsonl(path, "POPE annotation file"), limit):
            where = f"{path}:{number}"
            require(record, ("question_id", "image", "text", "label"), where)
            qid = f"{split}/{record['question_id']}"
            if qid in seen:
                raise EvalDataError(f"{where}: question_id {record['question_id']!r} appears twice")
            seen.add(qid)
            questions.append(Question(
                id=qid, group=split, image=_image(images, str(record["image"]), where), image_name=str(record["image"]),
                prompt=with_short_answer(str(record["text"])), truth={"label": _yes_no(record["label"], where, "label")}))
        if not seen:
            raise EvalDataError(f"{path}: no questions in it")
    return questions


# ---- TextVQA ------------------------------------------------------------------------------

def textvqa_question(text: str) -> str:
    """The bare question inside a LLaVA TextVQA prompt (its first line that is neither the OCR
    tokens nor the short-answer instruction): what the annotations are matched on, as LLaVA's
    eval_textvqa.py matches them."""
    lines = [line.strip() for line in text.split("\n")]
    kept = [line for line in lines if line and not line.startswith(OCR_LINE) and line != SHORT_ANSWER]
    return kept[0] if kept else ""


def textvqa_prompt(text: str, drop_ocr_tokens: bool = False) -> str:
    if drop_ocr_tokens:
        text = "\n".join(line for line in text.split("\n") if not line.strip().startswith(OCR_LINE))
    return with_short_answer(text)


def _textvqa_annotations(path: Path) -> Dict[Tuple[str, str], Dict[str, Any]]:
    data = read_json(path, "TextVQA annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise EvalDataError(f"{path}: expected an object with a 'data' list (TextVQA_0.5.1_val.json's format)")
    index = {}
    for i, entry in enumerate(data["data"]):
        where = f"{path}: data[{i}]"
        if not isinstance(entry, dict):
            raise EvalDataError(f"{where}: expected an object")
        require(entry, ("question_id", "image_id", "question", "answers"), where)
        answers = entry["answers"]
        # m4c_evaluator asserts ten human answers; its leave-one-out score assumes them.
        if not isinstance(answers, list) or len(answers) != 10 or not all(isinstance(a, str) for a in answers):
            raise EvalDataError(f"{where}: 'answers' must be a list of 10 strings "
                                f"(question_id {entry['question_id']!r} has {answers!r:.80})")
        index[(str(entry["image_id"]), str(entry["question"]).strip().lower())] = entry
    return index


def read_textvqa(questions_file: Path, annotations_file: Path, images: Path, limit: Optional[int] = None,
                 drop_ocr_tokens: bool = False) -> List[Question]:
    """TextVQA val questions matched to their ten human answers by (image id, question), the key
    LLaVA's eval_textvqa.py uses (image files are named <image_id>.jpg)."""
    annotations = _textvqa_annotations(Path(annotations_file))
    images = _existing(Path(images), "TextVQA image folder", folder=True)
    questions, seen = [], set()
    for number, record in islice(read_jsonl(Path(questions_file), "TextVQA question file"), limit):
        where = f"{questions_file}:{number}"
        require(record, ("question_id", "image", "text"), where)
        text, image = str(record["text"]), str(record["image"])
        question = textvqa_question(text).lower()
        entry = annotations.get((Path(image).stem, question)) or annotations.get((str(record["question_id"]), question))
        if entry is None:
            raise EvalDataError(f"{where}: no entry in {annotations_file} for image {Path(image).stem!r} "
                                f"and question {question!r}")
        qid = str(entry["question_id"])
        if qid in seen:
            raise EvalDataError(f"{where}: question {question!r} about {image} appears twice")
        seen.add(qid)
        questions.append(Question(id=qid, group="val", image=_image(images, image, where), image_name=image,
                                  prompt=textvqa_prompt(text, drop_ocr_tokens), truth={"answers": entry["answers"]}))
    if not questions:
        raise EvalDataError(f"{questions_file}: no questions in it")
    return questions


def textvqa_paths(folder: Optional[Path], questions: Optional[Path], annotations: Optional[Path],
                  images: Optional[Path]) -> Tuple[Path, Path, Path]:
    """The three TextVQA inputs: explicit paths win, the rest come from LLaVA's folder layout."""
    if folder is None and None in (questions, annotations, images):
        raise EvalDataError("TextVQA needs --textvqa FOLDER, or all of --textvqa-questions, "
                            "--textvqa-annotations and --textvqa-images")
    folder = Path(folder) if folder else Path(".")
    return (Path(questions) if questions else folder / TEXTVQA_QUESTIONS,
            Path(annotations) if annotations else folder / TEXTVQA_ANNOTATIONS,
            Path(images) if images else folder / TEXTVQA_IMAGES)


# ---- MME ----------------------------------------------------------------------------------

def _mme_root(source: Path) -> Path:
    _existing(source, "MME folder", folder=True)
    nested = source / MME_RELEASE
    return nested if nested.is_dir() else source


def _mme_pairs(subtask: Path) -> Tuple[List[Path], Path]:
    """(question files, image folder) in either of MME's two subtask layouts."""
    if (subtask / "questions_answers_YN").is_dir():
        return sorted((subtask / "questions_answers_YN").glob("*.txt")), subtask / "images"
    return sorted(subtask.glob("*.txt")), subtask


def _mme_image(folder: Path, stem: str, where: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise EvalDataError(f"{where}: no image {stem}.jpg or {stem}.png in {folder}")


def read_mme_file(path: Path) -> List[Tuple[str, str]]:
    """(question, yes/no) pairs of one MME txt file: two ``question<TAB>answer`` lines."""
    pairs = []
    for number, line in enumerate(_text(path, "MME question file").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) != 2 or not parts[0].strip():
            raise EvalDataError(f"{path}:{number}: expected 'question<TAB>Yes|No', got {line!r:.80}")
        pairs.append((parts[0].strip(), _yes_no(parts[1], f"{path}:{number}", "the answer")))
    # calculation.py pairs results two by two: one image, two questions.
    if len(pairs) != 2:
        raise EvalDataError(f"{path}: MME has two questions per image, this file has {len(pairs)}")
    return pairs


def read_mme(source: Path, limit: Optional[int] = None) -> List[Question]:
    """Questions of every MME subtask folder found; ``limit`` keeps whole images, at most N
    questions (at least one image) per subtask."""
    root = _mme_root(Path(source))
    subtasks = [root / name for name in MME_SUBTASKS if (root / name).is_dir()]
    if not subtasks:
        raise EvalDataError(f"{root}: no MME subtask folders in it (expected some of {', '.join(MME_SUBTASKS)})")
    images_per_subtask = None if limit is None else max(1, limit // 2)
    questions = []
    for subtask in subtasks:
        files, image_folder = _mme_pairs(subtask)
        if not files:
            raise EvalDataError(f"{subtask}: no question files (*.txt) in it or in its questions_answers_YN/ folder")
        for path in files[:images_per_subtask]:
            image = _mme_image(image_folder, path.stem, path)
            image_id = f"{subtask.name}/{image.name}"
            for k, (question, answer) in enumerate(read_mme_file(path)):
                questions.append(Question(id=f"{image_id}#{k}", group=subtask.name, image=image, image_name=image_id,
                                          prompt=with_short_answer(question), truth={"label": answer}))
    return questions


# ---- the synthetic fine-grained set -------------------------------------------------------

def read_synthetic(n: int, seed: int, limit: Optional[int] = None) -> List[Question]:
    """The held-out split of ``ftz_edge.training.synthetic`` (``n`` questions from ``seed``, the
    first ``limit`` of them), asked in the set's own format (the shipped default model was
    trained on it): the question and the set's one-word suffix. The question types are the
    shipped model's (``synthetic.DEFAULT_MODEL_QTYPES``), so 500 from seed 0 is its eval set."""
    from ftz_edge.training import synthetic  # numpy + Pillow only

    if n < 1:
        raise EvalDataError(f"the synthetic set needs at least one question, got {n}")
    questions = []
    examples = synthetic.split_examples(n, seed, "test", qtypes=synthetic.DEFAULT_MODEL_QTYPES)
    for i, example in enumerate(islice(examples, limit)):
        record = synthetic.to_record(example, i)
        questions.append(Question(
            id=record["id"], group=example.qtype, image=example.image, image_name=f"synthetic:test:seed{seed}:{i}",
            prompt=example.question + synthetic.SUFFIX, truth={"answer": example.answer}))
    return questions
