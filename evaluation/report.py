"""The side-by-side table (rows = metrics, columns = models) and the files ftz-eval writes.

``eval.md`` is the table with what each column is; ``eval.json`` has the same numbers plus
every question's prediction and ground truth, so each score can be recomputed (``scoring.py``).
``eval.png`` is the table as a bar chart: one panel per benchmark, one bar group per metric
(per question type, split, subtask ...), one bar per model; counts are not plotted. It needs
matplotlib (imported only here, Agg, no pyplot); without it ftz-eval says so in one line and
writes the tables. Each file is written to a temporary file beside the target and renamed over
it: a crash never leaves half a report.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ftz_edge.atomic import atomic_write_bytes
from ftz_edge.evaluation.predictors import describe

MISSING = "—"
CHART_NAME = "eval.png"
CHART_UNITS = ("%", "points")  # what the chart plots; counts ("") are not scores


class ChartUnavailable(Exception):
    """No chart could be drawn (no matplotlib, or nothing to plot); the message says why."""


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


def chart_panels(models: List[Dict[str, Any]], rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The chart's panels from the table's rows: benchmark -> {unit, metrics (in table order),
    values: {label: [value or None per metric]}}. One panel per benchmark and unit ("mme (points)");
    only the units in CHART_UNITS."""
    labels = [m["label"] for m in models]
    panels: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        if row["unit"] not in CHART_UNITS:
            continue
        benchmark = row["metric"].split("/", 1)[0]
        key = benchmark if row["unit"] == "%" else f"{benchmark} ({row['unit']})"
        panel = panels.setdefault(key, {"unit": row["unit"], "metrics": [], "values": {label: [] for label in labels}})
        panel["metrics"].append(row["metric"])
        for label in labels:
            panel["values"][label].append(row["values"].get(label))
    return panels


def _short(metric: str) -> str:
    """The bar group's name: the metric without its benchmark (the panel's title) or "/accuracy"."""
    name = metric.split("/", 1)[1] if "/" in metric else metric
    return name.removesuffix("/accuracy") or metric


def write_chart(path: Path, models: List[Dict[str, Any]], rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Draw the table as grouped bars into the PNG ``path`` (written atomically).

    Returns what was plotted, read back from the bars: {panel: {label: {metric: height}}} (a
    model without a value for a metric has no bar, and no entry). Raises ChartUnavailable
    without matplotlib or without any score to plot."""
    panels = chart_panels(models, rows)
    if not panels:
        raise ChartUnavailable("nothing to plot (no accuracy or points in the table)")
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch
    except ImportError:
        raise ChartUnavailable("matplotlib is not installed (pip install matplotlib)") from None

    labels = [m["label"] for m in models]
    widest = max(len(panel["metrics"]) for panel in panels.values())
    width = min(40.0, max(7.0, 0.28 * widest * max(len(labels), 2) + 2.5))
    figure = Figure(figsize=(width, 3.6 * len(panels) + 0.6), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    bar_width = 0.8 / len(labels)
    plotted: Dict[str, Dict[str, Dict[str, float]]] = {}
    for ax, (name, panel) in zip(axes, panels.items()):
        plotted[name] = {}
        for i, label in enumerate(labels):
            points = [(x, metric, value) for x, (metric, value) in enumerate(zip(panel["metrics"], panel["values"][label]))
                      if value is not None]
            bars = ax.bar([x - 0.4 + bar_width * (i + 0.5) for x, _, _ in points], [v for _, _, v in points],
                          width=bar_width, label=label, color=f"C{i % 10}")
            plotted[name][label] = {metric: float(bar.get_height()) for (_, metric, _), bar in zip(points, bars)}
        ax.set_title(name, loc="left", fontsize=10)
        ax.set_xticks(range(len(panel["metrics"])), [_short(m) for m in panel["metrics"]],
                      rotation=30 if len(panel["metrics"]) > 4 else 0, ha="right" if len(panel["metrics"]) > 4 else "center",
                      fontsize=8)
        ax.set_ylabel("accuracy (%)" if panel["unit"] == "%" else panel["unit"])
        if panel["unit"] == "%":
            ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="model")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return plotted


def markdown_report(report: Dict[str, Any], chart: Optional[str] = None) -> str:
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
              "Per-question predictions and each metric's details: `eval.json`." +
              (f" The table as a chart: `{chart}`." if chart else ""), ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_report(out: Path, report: Dict[str, Any]) -> Dict[str, Path]:
    """eval.json, eval.png (when it can be drawn; else one line on stderr says why) and eval.md."""
    paths = {"json": out / "eval.json", "markdown": out / "eval.md"}
    write_atomic(paths["json"], json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    try:
        write_chart(out / CHART_NAME, report["models"], report["table"]["rows"])
        paths["chart"] = out / CHART_NAME
    except ChartUnavailable as err:
        (out / CHART_NAME).unlink(missing_ok=True)  # an older run's chart would not match these tables
        print(f"ftz-eval: no chart: {err}; the tables are written", file=sys.stderr)
    write_atomic(paths["markdown"], markdown_report(report, CHART_NAME if "chart" in paths else None))
    return paths
