"""ftz-doctor's report: the findings as text (``format_report``) or JSON (``jsonable``)."""

from __future__ import annotations

from typing import List

from ftz_edge.doctor import memory_budget as mb
from ftz_edge.doctor.memory_budget import fmt_bytes


def jsonable(value):
    if isinstance(value, (mb.MemoryBudget, mb.Fit)):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _format_fits(lines: List[str], fits: List[mb.Fit]) -> None:
    for fit in fits:
        verdict = "fits" if fit.fits else "DOES NOT FIT"
        note = f" [{fit.note}]" if fit.note else ""
        lines.append(f"    {fit.target}{note}: {verdict} ({fit.detail})")
        for change in fit.changes:
            after = "then fits" if change["fits_after"] else "not enough alone"
            lines.append(f"      - {change['change']}: saves {fmt_bytes(change['saving'])}, {after}; {change['how']}")
        if fit.all_changes_fit is not None:
            lines.append(f"      all of these together: {'fits' if fit.all_changes_fit else 'still does not fit'}")
        elif not fit.fits:
            lines.append("      no export option shrinks it further: a smaller model or a bigger module")


def _format_budget(lines: List[str], budget: mb.MemoryBudget) -> None:
    for item in budget.items:
        lines.append(f"    {item.name:<17}{fmt_bytes(item.bytes):>12}  {item.how}")
    lines.append(f"    {'total':<17}{fmt_bytes(budget.total):>12}")


def backend_line(b: dict) -> str:
    """One GPU backend's state in words: "listed, runs (...)", "listed but fails: <reason>", ..."""
    state, detail = b["state"], b["detail"]
    if b["kind"] == "provider":
        role = " [the runtime would pick it]" if b.get("needed") else ""
        if state == "runs":
            return f"listed, runs ({detail}){role}"
        if state == "fails":
            return f"listed but fails: {detail}{role}"
        return f"not listed: {detail}"
    version = f"{b['version']} " if b.get("version") else ""
    if state == "fails":
        steps = f" [{b['steps']}]" if b.get("steps") else ""
        return f"{version}installed but fails: {detail}{steps}"
    if state == "not installed":
        return f"not installed ({detail})"
    return f"{version}{state}: {detail}"


def format_report(report: dict) -> str:
    lines = []
    py = report["python"]
    lines.append("Python and packages")
    lines.append(f"  Python {py['python']} ({py['executable']}, {py['machine']})")
    present = [f"{n} {v}" for n, v in py["packages"].items() if v]
    missing = [n for n, v in py["packages"].items() if not v]
    lines.append("  " + ", ".join(present))
    lines.append("  not installed: " + (", ".join(missing) or "-"))

    providers = report["providers"]
    lines.append("")
    lines.append("ONNX Runtime providers (" + (providers.get("model") or "no model run") + ")")
    if providers["error"]:
        lines.append(f"  {providers['error']}")
    for r in providers["results"]:
        state = f"ok      load {r['load_ms']} ms, run {r['run_ms']} ms" if r["ok"] else f"FAILED  {r['error']}"
        role = "needed" if r["needed"] else "not used by ftz-edge"
        lines.append(f"  {r['provider']:<28} {state}  ({role})")

    backends = report.get("gpu_backends")
    if backends:
        lines.append("")
        lines.append("GPU backends (what actually runs here, not just what imports)")
        for b in backends:
            lines.append(f"  {b['name']:<28} {backend_line(b)}")

    m = report["machine"]
    lines.append("")
    lines.append("GPU, TensorRT, memory")
    if m["jetson"]:
        j = m["jetson"]
        lines.append(f"  Jetson: {j['model'] or 'model unknown'}, L4T {j['l4t'] or '?'} ({j['jetpack'] or 'JetPack unknown'})")
    if m["gpu"]:
        g = m["gpu"]
        lines.append(f"  GPU: {g['name']}, compute capability {g['compute_capability'] or 'unknown'} (from {g['source']})")
        if m["gpu_memory"]:
            lines.append(f"  GPU memory: {fmt_bytes(m['gpu_memory']['free'])} free of {fmt_bytes(m['gpu_memory']['total'])} "
                         f"({m['gpu_memory']['source']})" + (", shared with the CPU" if m["jetson"] else ""))
    else:
        lines.append("  GPU: not found (no cuda-python device, no nvidia-smi on PATH, not a Jetson): CPU only")
    t = m["tensorrt"]
    lines.append(f"  TensorRT: {t['version']}" if t["version"] else f"  TensorRT: not found ({t['error']})")
    if m["ram"]:
        lines.append(f"  RAM: {fmt_bytes(m['ram']['available'])} available of {fmt_bytes(m['ram']['total'])} "
                     f"({m['ram']['source']})" + (", unified with the GPU" if m["jetson"] else ""))

    b = report.get("bundle")
    if b:
        lines.append("")
        lines.append(f"Bundle {b['path']}")
        lines.append(f"  manifest: {b['manifest']}")
        if "vision" in b:
            v, l = b["vision"], b["llm"]
            lines.append(f"  vision: {v['tower_kind']} tower, {v['precision']}, engine {v['engine']}, {v['image_tokens']} image tokens")
            lines.append(f"  LLM: {l['precision']} built for {l['execution_provider']}, {l['num_layers']} layers, "
                         f"{l['num_kv_heads']} KV heads x {l['head_size']}, context {l['context_length']}, vocab {l['vocab_size']}")
            e = b["engine"]
            lines.append("  TensorRT engine: none in this bundle" if e is None else
                         f"  TensorRT engine {e['file']}: record {'matches' if e['compatible'] else 'does NOT match'} "
                         f"this machine: {e['reason']}")
            if e is not None:
                r = e["run"]
                lines.append("  TensorRT engine run: " + ("not tried (no TensorRT here)" if r is None else
                             f"ok (load {r['load_ms']} ms, run {r['run_ms']} ms)" if r["ok"] else f"FAILED ({r['error']})"))
            lines.append(f"  providers: vision {', '.join(b['providers']['vision'])}; "
                         f"decoder {', '.join(b['providers']['decoder'])}")
            for r in b["vision_runs"]:
                state = "skipped" if r["ok"] is None else ("ok" if r["ok"] else "FAILED")
                detail = f"load {r['load_ms']} ms, run {r['run_ms']} ms" if r["ok"] else r["error"]
                lines.append(f"  vision graph on {r['provider']}: {state} ({detail})")
            d = b["decoder_run"]
            lines.append(f"  LLM decoder step on {d['provider'] or d['providers']}: "
                         + (f"ok ({d['ms']} ms with loading)" if d["ok"] else f"FAILED ({d['error']})"))
        if "budgets" in b:
            budget = b["budgets"]["budget"]
            lines.append(f"  memory budget ({budget.label}):")
            _format_budget(lines, budget)
            for assumption in budget.assumptions:
                lines.append(f"    assumption: {assumption}")
            _format_fits(lines, b["budgets"]["fits"])

    plan = report.get("plan")
    if plan:
        lines.append("")
        lines.append(f"Plan: CLIP ViT-L/14-336 + {plan['augmenter']} ({plan['tower_precision']} tower) + {plan['llm']}, "
                     "paper preset, from ftz_edge/configs (before any export)")
        for row in plan["rows"]:
            if "gpu" in row:
                budget = row["gpu"]["budget"]
                lines.append(f"  {budget.label} (Jetson / GPU layout):")
                _format_budget(lines, budget)
                _format_fits(lines, row["gpu"]["fits"])
            else:
                lines.append(f"  {row['gpu_note']}")
            if "cpu" in row:
                lines.append(f"  the same on this CPU machine ({row['cpu']['budget'].label}): "
                             f"{fmt_bytes(row['cpu']['budget'].total)}")
                _format_fits(lines, [row["cpu"]["here"]])
            elif "cpu_note" in row:
                lines.append(f"  {row['cpu_note']}")
        budgets = [row[where]["budget"] for row in plan["rows"] for where in ("gpu", "cpu") if where in row]
        if budgets:
            lines.append("  assumptions: " + "; ".join(budgets[0].assumptions)
                         + f"; runtime overhead {fmt_bytes(mb.OVERHEAD_GPU)} on a GPU, {fmt_bytes(mb.OVERHEAD_CPU)} on a CPU")

    lines.append("")
    for warning in report["warnings"]:
        lines.append(f"warning: {warning}")
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    lines.append("everything the runtime needs works" if report["ok"] else
                 f"{len(report['problems'])} problem(s): see above (exit status 1)")
    return "\n".join(lines)
