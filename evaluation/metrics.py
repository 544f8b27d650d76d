"""The benchmarks' official metrics, reimplemented without their dependencies (no torch, no sklearn).

Each function follows the script the published numbers come from, quirks included, so a score
here is the score that script would print for the same answers:

* POPE: LLaVA's ``llava/eval/eval_pope.py``;
* TextVQA: LLaVA's ``llava/eval/m4c_evaluator.py`` (``EvalAIAnswerProcessor`` and
  ``TextVQAAccuracyEvaluator``), which follows the official VQA evaluation's answer processing;
* MME: the benchmark's ``eval_tool/calculation.py``;
* MMMU: the MMMU repo's ``mmmu/utils/eval_utils.py`` (response parsing, ``eval_open``) and
  ``main_eval_only.py`` / ``print_results.py`` (per-subject accuracy, the six disciplines and
  the overall accuracy, each weighted by questions);
* MM-Vet: the grading protocol of the benchmark's ``mm-vet_evaluator.py`` (its few-shot prompt,
  score parsing, retries, per-capability and total averages); the grader itself is called by
  ``grader.py``.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

# ---- POPE ---------------------------------------------------------------------------------


def pope_answer(text: str) -> str:
    """yes/no from a free-form answer, as eval_pope.py reads it: only the text before the first
    '.', commas dropped, split on spaces; 'No', 'no' or 'not' among the words means no, anything
    else (an empty answer included) means yes."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(num: float, den: float) -> float:
    # eval_pope.py divides unguarded (a ZeroDivisionError with no positive answer); 0 here.
    return num / den if den else 0.0


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> Dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio with positive = yes, as fractions, plus
    the confusion counts. ``predictions`` are raw answers, ``labels`` 'yes'/'no'."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    pred = [pope_answer(p) == "yes" for p in predictions]
    gold = [label != "no" for label in labels]  # eval_pope.py: 'no' -> 0, anything else -> 1
    tp = sum(p and g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": _ratio(tp + tn, len(pred)),
            "precision": precision, "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall),
            "yes_ratio": _ratio(sum(pred), len(pred))}


# ---- TextVQA: the VQA answer normaliser and the leave-one-out accuracy ----------------------

# The official VQA evaluation's tables (vqaEval.py, as carried into EvalAIAnswerProcessor). The
# odd entries ("somebody'd" -> "somebodyd", capitalised keys that lower-cased text never hits)
# are the reference's and are kept, so normalised answers match it exactly.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The reference's period pattern: "(?!<=\d)" was meant as a look-behind but is a look-ahead that
# always passes, so in effect a period is removed unless a digit follows it ("2.5" keeps its).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        # A mark next to a space (or any text with a thousands comma) is deleted, one inside a
        # word becomes a space ("black-and-white" -> "black and white"). The test looks at the
        # text as it came in, not as already edited: the reference's order, kept.
        if mark + " " in text or " " + mark in text or _COMMA_BETWEEN_DIGITS.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The reference passes re.UNICODE (32) where sub() takes its count: at most 32 periods go.
    return _PERIOD_STRIP.sub("", out, count=32)


def _digits_articles_contractions(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
    """An answer as the official VQA evaluation compares it (EvalAIAnswerProcessor's steps, in
    order): lower-case; ',' and '?' dropped and "'s" split off; newlines and tabs to spaces;
    punctuation removed or turned into spaces; number words to digits; articles a/an/the
    dropped; missing apostrophes restored ("dont" -> "don't")."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_punctuation(text))


def vqa_answer_scores(human_answers: Sequence[str]) -> Dict[str, float]:
    """Score of every distinct (normalised) human answer: the mean, over the leave-one-out sets
    of the other humans' answers, of min(1, matches / 3) (TextVQAAccuracyEvaluator)."""
    answers = [vqa_normalize(a) for a in human_answers]
    scores = {}
    for candidate in set(answers):
        per_subset = []
        for left_out in range(len(answers)):
            matches = sum(1 for i, a in enumerate(answers) if i != left_out and a == candidate)
            per_subset.append(min(1.0, matches / 3))
        scores[candidate] = sum(per_subset) / len(per_subset)
    return scores


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One question's VQA accuracy in [0, 1]: the score of the normalised prediction (0 if no
    human gave it)."""
    return vqa_answer_scores(human_answers).get(vqa_normalize(prediction), 0.0)


# ---- MME ----------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION


def mme_answer(response: str) -> str:
    """yes / no / other, as calculation.py parses a lower-cased response: exactly 'yes' or 'no',
    else 'yes' or 'no' inside its first four characters ('yes' checked first), else 'other'
    (which never matches the ground truth)."""
    text = response.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_subtask(items: Iterable[Tuple[str, str, str]]) -> Dict[str, float]:
    """One subtask from (image id, ground truth yes/no, response) triples. acc: questions right
    x 100; acc_plus: images with every question right x 100 (MME has two per image); score =
    acc + acc_plus, the number MME's totals add up."""
    per_image: Dict[str, List[bool]] = defaultdict(list)
    other = 0
    for image, truth, response in items:
        parsed = mme_answer(response)
        other += parsed == "other"
        per_image[image].append(parsed == truth.lower())
    answers = [ok for oks in per_image.values() for ok in oks]
    acc = 100 * _ratio(sum(answers), len(answers))
    acc_plus = 100 * _ratio(sum(all(oks) for oks in per_image.values()), len(per_image))
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(answers),
            "images": len(per_image), "other": other}


def mme_totals(subtask_scores: Dict[str, float]) -> Dict[str, float]:
    """Perception and cognition: the sums of their subtasks' scores (over the subtasks given)."""
    return {"perception": sum(subtask_scores[t] for t in MME_PERCEPTION if t in subtask_scores),
            "cognition": sum(subtask_scores[t] for t in MME_COGNITION if t in subtask_scores)}


# ---- MMMU ---------------------------------------------------------------------------------

# The MMMU repo's DOMAIN_CAT2SUB_CAT (mmmu/utils/data_utils.py), in its order: the six
# disciplines and their 30 subjects (the Hub's subject folder names).
MMMU_DISCIPLINES: Dict[str, Tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
MMMU_SUBJECTS: Tuple[str, ...] = tuple(s for subjects in MMMU_DISCIPLINES.values() for s in subjects)
MMMU_MULTIPLE_CHOICE, MMMU_OPEN = "multiple-choice", "open"
MMMU_DEFAULT_SEED = 42  # run_llava.py's --seed (and eval_utils.py's random.seed(42))


def mmmu_letters(count: int) -> List[str]:
    """The option letters of a question with ``count`` options: A, B, C, ..."""
    return [chr(ord("A") + i) for i in range(count)]


def mmmu_parse_choice(response: str, options: Sequence[str], question_id: str = "",
                      seed: int = MMMU_DEFAULT_SEED) -> Tuple[str, str]:
    """(letter, how) read from a multiple-choice response, by the rules of the MMMU repo's
    ``parse_multi_choice_response`` (eval_utils.py), in its order:

    1. the punctuation , . ! ? ; : ' is stripped from both ends (one mark after the other), and
       the response padded with a space on each side;
    2. every letter written "(X)" is a candidate ("bracket");
    3. else every letter standing alone, " X " ("letter");
    4. else, for a response of more than five words, every option whose text it contains,
       case-insensitively ("content");
    5. several candidates: the one written last (the rightmost "(X)", " X " or option text;
       a tie goes to the earlier letter, as numpy's argmax);
    6. none: a random letter ("random"). The reference draws it from the global ``random``
       stream seeded 42, so the letter depends on which questions came before; here it is
       drawn from ``random.Random(f"{seed}/{question_id}")``, so each question's fallback is
       fixed by its id and the seed, whatever subset or order is run.
    """
    letters = mmmu_letters(len(options))
    text = response
    for mark in (",", ".", "!", "?", ";", ":", "'"):
        text = text.strip(mark)
    text = f" {text} "
    candidates = [x for x in letters if f"({x})" in text]
    how = "bracket"
    if not candidates:
        candidates, how = [x for x in letters if f" {x} " in text], "letter"
    if not candidates and len(text.split()) > 5:
        candidates = [x for x, option in zip(letters, options) if str(option).lower() in text.lower()]
        how = "content"
    if not candidates:
        return random.Random(f"{seed}/{question_id}").choice(letters), "random"
    if len(candidates) == 1:
        return candidates[0], how
    if how == "bracket":
        positions = [text.rfind(f"({x})") for x in candidates]
    elif how == "letter":
        positions = [text.rfind(f" {x} ") for x in candidates]
    else:
        positions = [text.lower().rfind(str(options[letters.index(x)]).lower()) for x in candidates]
    return candidates[positions.index(max(positions))], how


def _mmmu_is_number(text: str) -> bool:
    # check_is_number: anything float() takes once commas are gone ("1,000", "1e3", "nan" too).
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def mmmu_normalize(text: str) -> List[Union[str, float]]:
    """normalize_str: a number becomes a float rounded to 2 places; other text is lower-cased,
    and a one-character text becomes " x" and "x " (so it only matches as a separate word)."""
    text = text.strip()
    if _mmmu_is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


_MMMU_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # 1,234,567
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # 1.5e-3
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # 12, 1.5, .5
)
_MMMU_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_MMMU_TRIVIAL = (":", ",", ".", "!", "?", ";", "'")


def mmmu_numbers(text: str) -> List[str]:
    """extract_numbers: numbers with thousands commas, then scientific, then plain ones."""
    return [n for pattern in _MMMU_NUMBER_PATTERNS for n in pattern.findall(text)]


def mmmu_parse_open(response: str) -> List[Union[str, float]]:
    """parse_open_response: the candidate answers in a free-form response. The response is
    stripped (and of end periods) and lower-cased, then split into sentences at newlines and at
    ". " before a capital (which, after lower-casing, never matches: the reference's order,
    kept). In each sentence the shortest tail after an indicator ("is ", "so ", "answer ", ...;
    also "=" in the last sentence) is a key response; with none, the whole response is. The
    candidates are the key responses and every number in them, normalised (``mmmu_normalize``),
    without duplicates."""
    text = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys = []
    for index, sentence in enumerate(sentences):
        indicators = _MMMU_KEY_INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        tails = [sentence.split(indicator)[-1].strip() for indicator in indicators if indicator in sentence]
        shortest = None
        for tail in tails:  # the first of the shortest, as the reference's strict "<" keeps it
            if not shortest or len(tail) < len(shortest):
                shortest = tail
        if shortest and shortest.strip() not in _MMMU_TRIVIAL:
            keys.append(shortest)
    keys = keys or [text]
    candidates = keys + [n for key in keys for n in mmmu_numbers(key)]
    normalised = [value for candidate in candidates for value in mmmu_normalize(candidate)]
    return list(dict.fromkeys(normalised))  # the reference's list(set(...)), in a stable order


def mmmu_open_correct(gold: Union[str, Sequence[str]], candidates: Sequence[Union[str, float]]) -> bool:
    """eval_open: right when a text candidate contains a normalised gold text, or a number
    candidate equals a normalised gold number (the gold may be a list of accepted answers)."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    normalised = [value for g in golds for value in mmmu_normalize(g)]
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(g, str) and g in candidate for g in normalised):
                return True
        elif candidate in normalised:
            return True
    return False


def mmmu_judge(question_type: str, answer: Union[str, Sequence[str]], options: Sequence[str], response: str,
               question_id: str = "", seed: int = MMMU_DEFAULT_SEED) -> Dict[str, Any]:
    """One question: {"correct", "parsed", "how"}. Multiple choice: the parsed letter equals the
    answer (eval_multi_choice); open: ``mmmu_open_correct`` of ``mmmu_parse_open``."""
    if question_type == MMMU_MULTIPLE_CHOICE:
        letter, how = mmmu_parse_choice(response, options, question_id, seed)
        golds = [answer] if isinstance(answer, str) else list(answer)
        return {"correct": letter in golds, "parsed": letter, "how": how}
    candidates = mmmu_parse_open(response)
    return {"correct": mmmu_open_correct(answer, candidates), "parsed": candidates, "how": "open"}


def mmmu_accuracy(per_subject: Dict[str, Sequence[bool]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Accuracy (a fraction) and question count per subject, per discipline and overall, over
    the subjects given. A discipline's and the overall accuracy are calculate_ins_level_acc's:
    the subjects' accuracies weighted by their questions (= right answers / questions)."""
    def block(oks: Sequence[bool]) -> Dict[str, float]:
        return {"accuracy": _ratio(sum(oks), len(oks)), "questions": len(oks)}

    subjects = {s: block(oks) for s, oks in per_subject.items()}
    disciplines = {}
    for discipline, members in MMMU_DISCIPLINES.items():
        present = [ok for s in members if s in per_subject for ok in per_subject[s]]
        if any(s in per_subject for s in members):
            disciplines[discipline] = block(present)
    return {"subjects": subjects, "disciplines": disciplines,
            "overall": block([ok for oks in per_subject.values() for ok in oks])}


# ---- MM-Vet: the GPT grader's protocol ----------------------------------------------------

# The capabilities MM-Vet (v1) tags its questions with, in the order of its result tables.
MMVET_CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")

# The official few-shot prompt of mm-vet_evaluator.py, verbatim: the grader's scores are only
# comparable with the published ones under this exact text.
MMVET_GRADER_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
MMVET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
MMVET_MAX_TOKENS = 3  # the evaluator's max_tokens: room for "0.7" and nothing else
MMVET_DEFAULT_GRADER = "gpt-4-0613"  # the evaluator's default --gpt_model
# The evaluator's schedule: the plain query at temperature 0, then (while the reply does not
# parse) the query with the retry line at 0.0, 0.5, 1.0, 1.5. After the fifth unparsable reply
# the score is 0.0. (The reference sends one more request at 2.0 whose reply it never reads.)
MMVET_TEMPERATURES = (0.0, 0.0, 0.5, 1.0, 1.5)


def mmvet_grader_query(question: str, answer: str, prediction: str, retry: bool = False) -> str:
    """The one user message the grader gets: the few-shot table plus this question's row,
    "question | ground truth | prediction | " (the ground truth with spaces around <AND> and
    <OR>), and the retry line on later attempts."""
    truth = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    text = MMVET_GRADER_PROMPT + "\n" + " | ".join([question, truth, prediction, ""])
    return text + MMVET_RETRY_SUFFIX if retry else text


def mmvet_parse_grade(reply: Optional[str]) -> Optional[float]:
    """The score in a grader reply as the evaluator reads it: the text before the first space
    (``reply.split(" ")[0]``, so a reply starting with a space does not parse), a float in
    [0, 1]; None otherwise. (Unlike the reference, "nan" is refused: it would pass its range
    check and poison the averages.)"""
    if not isinstance(reply, str):
        return None
    try:
        score = float(reply.split(" ")[0].strip())
    except ValueError:
        return None
    return score if math.isfinite(score) and 0.0 <= score <= 1.0 else None


def mmvet_scores(items: Iterable[Tuple[Sequence[str], float]]) -> Dict[str, Dict[str, Any]]:
    """MM-Vet's scores from (capabilities, grade) pairs, as export_result computes them for one
    run: per capability, the sum of the grades of the questions that need it / their number x
    100; the total, the sum of all grades / all questions x 100; per capability integration
    (the exact set of capabilities a question needs, named by them sorted and joined with "_"),
    the same over its questions. Each with its question count."""
    per_capability: Dict[str, List[float]] = defaultdict(list)
    per_integration: Dict[str, List[float]] = defaultdict(list)
    grades = []
    for capabilities, grade in items:
        caps = sorted(set(capabilities))
        for cap in caps:
            per_capability[cap].append(grade)
        per_integration["_".join(caps)].append(grade)
        grades.append(grade)

    def block(values: List[float]) -> Dict[str, float]:
        return {"score": 100 * _ratio(sum(values), len(values)), "questions": len(values)}

    order = [c for c in MMVET_CAPABILITIES if c in per_capability]
    order += sorted(set(per_capability) - set(MMVET_CAPABILITIES))
    # The evaluator lists the integrations most common first.
    integrations = sorted(per_integration, key=lambda k: (-len(per_integration[k]), k))
    return {"capabilities": {c: block(per_capability[c]) for c in order},
            "integrations": {k: block(per_integration[k]) for k in integrations},
            "total": block(grades)}
