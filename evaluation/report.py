"""The side-by-side table (rows = metrics, columns = models) and the files ftz-eval writes.

``eval.md`` is the table with what each column is; ``eval.json`` has the same numbers plus
every question's prediction and ground truth, so each score can be recomputed (``scoring.py``).
Both are written to a temporary file beside the target and renamed over it: a crash never
leaves half a report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from ftz_edge.atomic import atomic_write_bytes
from ftz_edge.evaluation.predictors import describe

MISSING = "—"


def table_rows(models: List[Dict[str, Any]], results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per metric, in the order the benchmarks report them, with each model's value
    (a model that lacks a metric, e.g. a POPE split it was not run on, has none)."""
    rows: Dict[str, Dict[str, Any]] = {}
    for model in models:
        for benchmark in results[model["label"]].values():
            for name, value in benchmark["metrics"].items():
                row = rows.setdefault(name, {"metric": name, "unit": benchmark["units"][name], "values": {}})
                row["values"][model["label"]] = value
    return list(rows.values())


def _cell(value: Any, unit: str) -> str:
    if value is None:
        return MISSING
    return str(int(value)) if unit == "" else f"{value:.2f}"


def markdown_table(models: List[Dict[str, Any]], rows: List[Dict[str, Any]]) -> str:
    labels = [m["label"] for m in models]
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels),
             "| *model* | " + " | ".join(describe(m) for m in models) + " |",
             "| *tower* | " + " | ".join(str(m.get("tower_kind")) for m in models) + " |"]
    for row in rows:
        name = f"{row['metric']} ({row['unit']})" if row["unit"] else row["metric"]
        lines.append(f"| {name} | " + " | ".join(_cell(row["values"].get(label), row["unit"]) for label in labels) + " |")
    return "\n".join(lines)


def markdown_report(report: Dict[str, Any]) -> str:
    lines = ["# ftz-eval", "", "Greedy decoding, one question at a time. POPE, TextVQA, MMMU, MM-Vet and the synthetic "
             "set in percent; MME in its points (acc + acc+ per subtask, summed for perception and cognition).", ""]
    for model in report["models"]:
        lines.append(f"- **{model['label']}**: {model['kind']} `{model['path']}` ({describe(model)}, "
                     f"tower {model.get('tower_kind')})")
    lines.append("")
    for name, info in report["benchmarks"].items():
        lines.append(f"- {name}: {info['questions']} questions, max_new_tokens {info['max_new_tokens']}, "
                     f"from {', '.join(f'{k} `{v}`' for k, v in info['source'].items())}")
    for label, benchmarks in report.get("results", {}).items():  # what a benchmark could not score, and why
        for name, result in benchmarks.items():
            note = result.get("details", {}).get("note")
            if note:
                lines.append(f"- {label} / {name}: {note}" + (f"; answers in `{result['submission']}`"
                                                             if result.get("submission") else ""))
            if result.get("details", {}).get("grader_models"):
                lines.append(f"- {label} / {name}: graded by {', '.join(result['details']['grader_models'])}")
    if report["settings"].get("limit"):
        lines.append(f"- limited to the first {report['settings']['limit']} questions per benchmark part "
                     "(POPE split, MME subtask): a quick subset, not the benchmark's score")
    lines += ["", report["table_markdown"], "",
              "Per-question predictions and each metric's details: `eval.json`.", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_report(out: Path, report: Dict[str, Any]) -> Dict[str, Path]:
    paths = {"json": out / "eval.json", "markdown": out / "eval.md"}
    write_atomic(paths["json"], json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_atomic(paths["markdown"], markdown_report(report))
    return paths
