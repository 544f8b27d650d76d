"""Saved per-question predictions -> a benchmark's named metrics.

The input is exactly what ``eval.json`` stores for each model and benchmark (``Question.entry``:
id, group, image, prompt, prediction and the ground truth), so anyone can recompute a table
from the saved file. Metric names read ``benchmark/part/metric``; POPE, TextVQA, MMMU, MM-Vet
and the synthetic set are in percent, MME in its own points (acc + acc+ per subtask, summed).
MM-Vet's entries carry their grader's grades (``grader.py``); without them it has no score.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence

from ftz_edge.evaluation import metrics as m
from ftz_edge.evaluation.readers import POPE_SPLITS

Entries = Sequence[Dict[str, Any]]


@dataclass
class Scores:
    metrics: Dict[str, float] = field(default_factory=dict)  # name -> value, headline first
    units: Dict[str, str] = field(default_factory=dict)  # name -> "%", "points" or "" (a count)
    details: Dict[str, Any] = field(default_factory=dict)  # everything else the metric computed

    def add(self, name: str, value: float, unit: str = "%") -> None:
        self.metrics[name] = value
        self.units[name] = unit

    def to_dict(self) -> Dict[str, Any]:
        return {"metrics": self.metrics, "units": self.units, "details": self.details}


def _by_group(entries: Entries) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        groups[entry["group"]].append(entry)
    return groups


def score_pope(entries: Entries) -> Scores:
    groups = _by_group(entries)
    splits = [s for s in POPE_SPLITS if s in groups]
    per_split = {s: m.pope_metrics([e["prediction"] for e in groups[s]], [e["label"] for e in groups[s]])
                 for s in splits}
    scores = Scores(details={"per_split": per_split})
    if len(splits) > 1:  # LLaVA-1.5 and FtZ report POPE as the mean over its three splits
        for name in ("f1", "accuracy"):
            scores.add(f"pope/mean/{name}", 100 * sum(r[name] for r in per_split.values()) / len(splits))
    for split, result in per_split.items():
        for name in ("f1", "accuracy", "precision", "recall", "yes_ratio"):
            scores.add(f"pope/{split}/{name}", 100 * result[name])
        scores.add(f"pope/{split}/questions", len(groups[split]), "")
    return scores


def score_textvqa(entries: Entries) -> Scores:
    per_question = [m.vqa_accuracy(e["prediction"], e["answers"]) for e in entries]
    scores = Scores(details={"per_question": {e["id"]: a for e, a in zip(entries, per_question)}})
    scores.add("textvqa/accuracy", 100 * sum(per_question) / len(per_question) if per_question else 0.0)
    scores.add("textvqa/questions", len(per_question), "")
    return scores


def score_mme(entries: Entries) -> Scores:
    groups = _by_group(entries)
    subtasks = [t for t in m.MME_SUBTASKS if t in groups]
    per_subtask = {t: m.mme_subtask((e["image"], e["label"], e["prediction"]) for e in groups[t]) for t in subtasks}
    totals = m.mme_totals({t: r["score"] for t, r in per_subtask.items()})
    scores = Scores(details={"per_subtask": per_subtask, "subtasks": subtasks})
    # A total is shown only over subtasks that were run (a partial MME is named as such by the
    # questions rows and details.subtasks, not hidden in a smaller sum labelled as the whole).
    if any(t in groups for t in m.MME_PERCEPTION):
        scores.add("mme/perception", totals["perception"], "points")
    if any(t in groups for t in m.MME_COGNITION):
        scores.add("mme/cognition", totals["cognition"], "points")
    for subtask, result in per_subtask.items():
        scores.add(f"mme/{subtask}", result["score"], "points")
    scores.add("mme/questions", sum(r["questions"] for r in per_subtask.values()), "")
    return scores


def score_synthetic(entries: Entries) -> Scores:
    from ftz_edge.training import synthetic

    # synthetic.evaluate reads LLaVA-style records: the question (its chance level depends on
    # the wording) and the gold answer.
    records = [{"id": e["id"], "qtype": e["group"],
                "conversations": [{"from": "human", "value": e["prompt"]}, {"from": "gpt", "value": e["answer"]}]}
               for e in entries]
    result = synthetic.evaluate(records, [e["prediction"] for e in entries])
    scores = Scores(details=result)
    scores.add("synthetic/overall/accuracy", 100 * result["overall"]["accuracy"])
    for qtype, stats in result["per_type"].items():
        scores.add(f"synthetic/{qtype}/accuracy", 100 * stats["accuracy"])
    scores.add("synthetic/questions", result["overall"]["n"], "")
    return scores


def _slug(name: str) -> str:
    return name.lower().replace(" and ", "_and_").replace(" ", "_").replace("&", "and")


def score_mmmu(entries: Entries) -> Scores:
    """MMMU as its repo's main_eval_only.py scores it: each response parsed (a letter for a
    multiple-choice question, candidate answers for an open one) and judged, accuracy per
    subject, per discipline and overall (question-weighted). The random letter the reference
    falls back on is fixed per question (``metrics.mmmu_parse_choice``)."""
    judged = {e["id"]: m.mmmu_judge(e["question_type"], e["answer"], e["options"], e["prediction"], e["id"])
              for e in entries}
    groups = _by_group(entries)
    order = [s for s in m.MMMU_SUBJECTS if s in groups] + sorted(set(groups) - set(m.MMMU_SUBJECTS))
    result = m.mmmu_accuracy({s: [judged[e["id"]]["correct"] for e in groups[s]] for s in order})
    scores = Scores(details={
        **result, "per_question": judged,
        "random_fallbacks": sum(j["how"] == "random" for j in judged.values()),
        # The model is shown image_1 only (the MMMU repo's LLaVA run): how many questions had more.
        "multi_image_questions": sum(e.get("images", 1) > 1 for e in entries)})
    scores.add("mmmu/overall/accuracy", 100 * result["overall"]["accuracy"])
    for discipline, block in result["disciplines"].items():
        scores.add(f"mmmu/{_slug(discipline)}/accuracy", 100 * block["accuracy"])
    for subject, block in result["subjects"].items():
        scores.add(f"mmmu/{subject}/accuracy", 100 * block["accuracy"])
    scores.add("mmmu/questions", result["overall"]["questions"], "")
    # Answers nothing could be read from, scored by a random letter (as the reference does): a
    # weak model's accuracy may be mostly these, so the table shows how many there were.
    scores.add("mmmu/random_fallbacks", scores.details["random_fallbacks"], "")
    return scores


def score_mmvet(entries: Entries) -> Scores:
    """MM-Vet from the grades saved in the entries (``grader.grade_entries``): the total and the
    per-capability scores of mm-vet_evaluator.py (``metrics.mmvet_scores``). Without a grade for
    every answer there is no score: only the counts, and a note saying why."""
    graded = [e for e in entries if isinstance(e.get("grade"), (int, float))]
    details: Dict[str, Any] = {"graded": len(graded),
                               "grader_models": sorted({str(e.get("grader_model")) for e in graded})}
    scores = Scores(details=details)
    if entries and len(graded) == len(entries):
        result = m.mmvet_scores((e["capability"], float(e["grade"])) for e in entries)
        details.update(result)
        scores.add("mmvet/total", result["total"]["score"])
        for capability, block in result["capabilities"].items():
            scores.add(f"mmvet/{capability}", block["score"])
    else:
        details["note"] = (f"not scored: {len(graded)} of {len(entries)} answers graded (MM-Vet needs a GPT grader: "
                           "--grader-url, or the official evaluator on the submission file)")
    scores.add("mmvet/questions", len(entries), "")
    scores.add("mmvet/graded", len(graded), "")
    return scores


SCORERS: Dict[str, Callable[[Entries], Scores]] = {
    "pope": score_pope, "textvqa": score_textvqa, "mme": score_mme, "synthetic": score_synthetic,
    "mmmu": score_mmmu, "mmvet": score_mmvet,
}


def score(benchmark: str, entries: Entries) -> Scores:
    return SCORERS[benchmark](entries)
