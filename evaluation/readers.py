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
* MMMU: ``MMMU/<Subject>/{validation,dev}-0000x-of-0000y.parquet`` as the Hub ships it (id,
  question, options as a Python-literal list, answer, question_type, image_1..image_7 as
  {bytes, path}); read with pyarrow (the ``eval`` extra).
* MM-Vet: ``mm-vet.json`` (id -> imagename, capability, question, answer) and ``images/``.
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


# ---- MMMU ---------------------------------------------------------------------------------

MMMU_SPLITS = ("validation", "dev")  # test's answers are not public (its answer column is "?")
MMMU_IMAGE_COLUMNS = tuple(f"image_{i}" for i in range(1, 8))
MMMU_COLUMNS = ("id", "question", "options", "answer", "question_type")
MMMU_PROMPTS = ("lmms-eval", "mmmu")
MMMU_CHOICE_LINE = "Answer with the option's letter from the given choices directly."


def mmmu_prompt(question: str, options: Sequence[str], question_type: str, style: str = "lmms-eval") -> str:
    """What the model is asked. ``lmms-eval`` (the default; lmms-eval's mmmu ``construct_prompt``
    with the LLaVA prompts of its mmmu_val task): the question, the options as "A. ..." lines,
    a blank line and the choice instruction; an open question gets a blank line and LLaVA's
    short-answer line. ``mmmu`` (the MMMU repo's configs/llava1.5.yaml as YAML loads it): the
    question, the options as "(A) ..." lines, then the instruction after a blank line; open:
    the short-answer line right after the question. ``<image k>`` references stay in the text
    as written (both references keep them)."""
    from ftz_edge.evaluation.metrics import MMMU_MULTIPLE_CHOICE, mmmu_letters

    if style not in MMMU_PROMPTS:
        raise EvalDataError(f"MMMU prompt style must be one of {', '.join(MMMU_PROMPTS)}, got {style!r}")
    letters = mmmu_letters(len(options))
    if question_type == MMMU_MULTIPLE_CHOICE:
        if style == "lmms-eval":
            listed = "\n".join(f"{x}. {option}" for x, option in zip(letters, options))
            return f"{question}\n{listed}\n\n{MMMU_CHOICE_LINE}"
        listed = "".join(f"({x}) {option}\n" for x, option in zip(letters, options))
        return f"{question}\n{listed}\n{MMMU_CHOICE_LINE}"
    return f"{question}\n\n{SHORT_ANSWER}" if style == "lmms-eval" else f"{question}\n{SHORT_ANSWER}"


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalDataError("reading MMMU's parquet files needs pyarrow: pip install 'ftz-edge[eval]'") from None
    return pq


def _parquet_rows(path: Path, required: Sequence[str], optional: Sequence[str]) -> List[Dict[str, Any]]:
    """The rows of a parquet file as dicts of the ``required`` columns and those of ``optional``
    that it has (a missing required column, or a file that is not parquet: EvalDataError)."""
    pq = _pyarrow_parquet()
    try:
        names = set(pq.read_schema(path).names)
        missing = [c for c in required if c not in names]
        if missing:
            raise EvalDataError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                                + ", ".join(repr(c) for c in missing))
        columns = list(required) + [c for c in optional if c in names]
        return pq.read_table(path, columns=columns).to_pylist()
    except EvalDataError:
        raise
    except Exception as err:  # pyarrow's ArrowInvalid / OSError for a truncated or non-parquet file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise EvalDataError(f"{path}: not a readable parquet file ({reason})") from None


def _mmmu_root(source: Path) -> Path:
    """The folder holding the subject folders: ``source`` or its ``MMMU/`` (the Hub's layout)."""
    _existing(source, "MMMU folder", folder=True)
    from ftz_edge.evaluation.metrics import MMMU_SUBJECTS

    for root in (source, source / "MMMU"):
        if any((root / s).is_dir() for s in MMMU_SUBJECTS):
            return root
    raise EvalDataError(f"{source}: no MMMU subject folders in it or in its MMMU/ folder "
                        f"(expected some of {', '.join(MMMU_SUBJECTS[:3])}, ...)")


def _mmmu_list(text: Any, where: str, field: str) -> List[str]:
    """A Python-literal list of strings (how the parquet files store options, and some open
    answers)."""
    import ast

    try:
        value = ast.literal_eval(text) if isinstance(text, str) else text
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise EvalDataError(f"{where}: {field} is not a Python list literal: {text!r:.80}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EvalDataError(f"{where}: {field} must be a list of strings, got {text!r:.80}")
    return value


def _mmmu_image(cell: Any, where: str, column: str) -> bytes:
    """The encoded image of an image cell ({"bytes": ..., "path": ...}), its header checked here.
    The bytes themselves are what the model is given (``preprocess.load_image`` decodes them per
    question): 900 questions' decoded pixels are never held at once."""
    from io import BytesIO

    from PIL import Image, UnidentifiedImageError

    data = cell.get("bytes") if isinstance(cell, dict) else None
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise EvalDataError(f"{where}: {column} has no image bytes")
    try:
        with Image.open(BytesIO(data)):
            pass
    except (UnidentifiedImageError, OSError) as err:
        raise EvalDataError(f"{where}: {column} is not an image Pillow can read ({err})") from None
    return bytes(data)


def read_mmmu(source: Path, split: str = "validation", limit: Optional[int] = None, prompt_style: str = "lmms-eval",
              subjects: Optional[Sequence[str]] = None) -> List[Question]:
    """MMMU questions of every subject folder found (``MMMU/<Subject>/<split>-*.parquet``, the
    Hub's layout); ``limit`` keeps the first N of each subject.

    Images: the model sees ``image_1`` only, as in the MMMU repo's LLaVA run (run_llava.py with
    process_single_sample); the question's other images are counted (``images`` in its entry,
    and in the scores' details) but not shown, and its ``<image k>`` references stay in the text.
    (The runtime could take several images with a placeholder each; ftz-eval's predictors answer
    about one image, as LLaVA-1.5's evaluation does.)"""
    from ftz_edge.evaluation.metrics import MMMU_MULTIPLE_CHOICE, MMMU_OPEN, MMMU_SUBJECTS, mmmu_letters

    if split not in MMMU_SPLITS:
        hint = " (its answers are not public)" if split == "test" else ""
        raise EvalDataError(f"MMMU split must be one of {', '.join(MMMU_SPLITS)}, got {split!r}{hint}")
    root = _mmmu_root(Path(source))
    wanted = MMMU_SUBJECTS if subjects is None else subjects
    questions: List[Question] = []
    seen = set()
    for subject in [s for s in wanted if (root / s).is_dir()]:
        files = sorted((root / subject).glob(f"{split}-*.parquet"))
        if not files:
            raise EvalDataError(f"{root / subject}: no {split}-*.parquet file in it")
        kept = 0
        for path in files:
            for number, row in enumerate(_parquet_rows(path, MMMU_COLUMNS, MMMU_IMAGE_COLUMNS)):
                if limit is not None and kept >= limit:
                    break
                where = f"{path}: row {number}"
                qid = row["id"]
                if not isinstance(qid, str) or not qid:
                    raise EvalDataError(f"{where}: id must be a non-empty string, got {qid!r}")
                where = f"{path}: row {number} ({qid})"
                if qid in seen:
                    raise EvalDataError(f"{where}: id appears twice")
                seen.add(qid)
                kind = row["question_type"]
                if kind not in (MMMU_MULTIPLE_CHOICE, MMMU_OPEN):
                    raise EvalDataError(f"{where}: question_type must be {MMMU_MULTIPLE_CHOICE!r} or {MMMU_OPEN!r}, "
                                        f"got {kind!r}")
                if not isinstance(row["question"], str):
                    raise EvalDataError(f"{where}: question must be a string, got {row['question']!r:.80}")
                options = _mmmu_list(row["options"], where, "options")
                answer: Any = row["answer"]
                if not isinstance(answer, str):
                    raise EvalDataError(f"{where}: answer must be a string, got {answer!r:.80}")
                if kind == MMMU_MULTIPLE_CHOICE:
                    if answer not in mmmu_letters(len(options)):
                        raise EvalDataError(f"{where}: answer {answer!r} is not one of the option letters "
                                            f"{''.join(mmmu_letters(len(options)))}")
                elif answer.startswith("["):  # several accepted answers, e.g. "['24/7', '3.429']"
                    answer = _mmmu_list(answer, where, "answer")
                images = [c for c in MMMU_IMAGE_COLUMNS if row.get(c) is not None]
                if "image_1" not in images:
                    raise EvalDataError(f"{where}: image_1 is empty (the question the model is shown needs it)")
                image = _mmmu_image(row["image_1"], where, "image_1")
                for column in images[1:]:  # checked, not kept: the model sees image_1 only
                    _mmmu_image(row[column], where, column)
                questions.append(Question(
                    id=qid, group=subject, image=image, image_name=f"{subject}/{qid}/image_1",
                    prompt=mmmu_prompt(row["question"], options, kind, prompt_style),
                    truth={"question_type": kind, "answer": answer, "options": options, "images": len(images)}))
                kept += 1
    if not questions:
        raise EvalDataError(f"{root}: no MMMU {split} questions in it")
    return questions


# ---- MM-Vet -------------------------------------------------------------------------------

MMVET_FILE = "mm-vet.json"
MMVET_IMAGES = "images"


def _mmvet_root(source: Path) -> Path:
    _existing(source, "MM-Vet folder", folder=True)
    for root in (source, source / "mm-vet"):
        if (root / MMVET_FILE).is_file():
            return root
    raise EvalDataError(f"{source}: no {MMVET_FILE} in it or in its mm-vet/ folder")


def read_mmvet(source: Path, images: Optional[Path] = None, limit: Optional[int] = None) -> List[Question]:
    """MM-Vet's questions (``mm-vet.json``: id -> imagename, capability, question, answer) about
    the images in ``images/`` beside it. Asked as LLaVA-1.5 asks them (llava/eval/model_vqa.py on
    llava-mm-vet.jsonl): the question text alone, no answer-format line. The group is the
    question's capability integration (its capabilities, sorted, joined with "_")."""
    root = _mmvet_root(Path(source))
    path = root / MMVET_FILE
    folder = _existing(Path(images) if images else root / MMVET_IMAGES, "MM-Vet image folder", folder=True)
    data = read_json(path, "MM-Vet question file")
    if not isinstance(data, dict):
        raise EvalDataError(f"{path}: expected an object of question id -> question (mm-vet.json's format)")
    questions = []
    for qid, record in islice(data.items(), limit):
        where = f"{path}: {qid}"
        if not isinstance(record, dict):
            raise EvalDataError(f"{where}: expected an object")
        require(record, ("imagename", "capability", "question", "answer"), where)
        caps = record["capability"]
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c for c in caps):
            raise EvalDataError(f"{where}: 'capability' must be a non-empty list of strings, got {caps!r:.80}")
        for field in ("imagename", "question", "answer"):
            if not isinstance(record[field], str):
                raise EvalDataError(f"{where}: {field!r} must be a string, got {record[field]!r:.80}")
        name = record["imagename"]
        questions.append(Question(
            id=qid, group="_".join(sorted(set(caps))), image=_image(folder, name, where), image_name=name,
            prompt=record["question"], truth={"answer": record["answer"], "capability": list(caps)}))
    if not questions:
        raise EvalDataError(f"{path}: no questions in it")
    return questions
