"""Results -> ``results.json``, ``results.md`` and PNG plots, plus README's Performance section.

Everything shown is derived from the rows (ftz_edge.bench.results) and the machine record, so a
results folder alone regenerates its report and the README section (:func:`performance_section`,
``ftz-bench --update-readme README.md --from results/DIR``). Figures are medians with [min–max];
comparisons are ratios of medians from the same run.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Optional

from ftz_edge.atomic import atomic_write_bytes
from ftz_edge.bench.memory import decode_bound
from ftz_edge.bench.results import metric
from ftz_edge.bench.timing import fmt, ratio

SCHEMA = "ftz-bench/1"
README_BEGIN, README_END = "<!-- ftz-bench:begin -->", "<!-- ftz-bench:end -->"
EAGER_FP32 = ("PyTorch eager", "fp32")
LLM_BASELINE = ("transformers eager", "fp32")


# -- derived figures --------------------------------------------------------------------------


def _ok(rows, suite):
    return [r for r in rows if r["suite"] == suite and r["status"] == "ok"]


def _find(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def bandwidth_gbs(results: dict) -> Optional[float]:
    bw = results.get("bandwidth") or {}
    return bw.get("read_gbs", {}).get("median")


def comparisons(results: dict) -> list[dict]:
    """Ratios of medians from this run: speed-ups against the eager baselines, fusion overhead,
    pruning, decode against the bandwidth bound, runtime overhead, cold / warm start."""
    rows = results["rows"]
    out = []
    vision = _ok(rows, "vision")
    for r in vision:
        base = _find(vision, size=r["size"], model=r["model"], path=r["path"], backend=EAGER_FP32[0],
                     precision=EAGER_FP32[1], batch=r["batch"])
        if base and base is not r and r["path"] == "FtZ tower":
            out.append({"kind": "vision speed-up vs PyTorch eager fp32", "model": r["model"], "batch": r["batch"],
                        "name": f"{r['backend']} {r['precision']}",
                        "value": ratio(metric(base, "latency_ms"), metric(r, "latency_ms"))})
    for r in vision:
        if r["path"] != "FtZ tower":
            continue
        same = dict(size=r["size"], model=r["model"], backend=r["backend"], precision=r["precision"], batch=r["batch"])
        anchor, aug = _find(vision, path="anchor alone", **same), _find(vision, path="augmenter alone", **same)
        unpruned = _find(vision, path="FtZ tower, unpruned", **same)
        name = f"{r['backend']} {r['precision']}"
        if anchor and aug:
            parts = metric(anchor, "latency_ms").median + metric(aug, "latency_ms").median
            out.append({"kind": "fusion overhead: FtZ tower / (anchor + augmenter)", "model": r["model"],
                        "batch": r["batch"], "name": name, "value": ratio(metric(r, "latency_ms"), parts)})
        if unpruned:
            value = ratio(metric(r, "latency_ms"), metric(unpruned, "latency_ms"))
            out.append({"kind": "dead-layer pruning: pruned / unpruned", "model": r["model"], "batch": r["batch"],
                        "name": name, "value": value, "saving": 1 - value if value is not None else None,
                        "saving_estimated": r["info"].get("pruning_saving_estimated")})
    llm = _ok(rows, "llm")
    bandwidth = bandwidth_gbs(results)
    for r in llm:
        base = _find(llm, size=r["size"], model=r["model"], backend=LLM_BASELINE[0], precision=LLM_BASELINE[1])
        decode = metric(r, "decode_tokens_per_s")
        entry = {"kind": "LLM", "model": r["model"], "name": f"{r['backend']} {r['precision']}"}
        if base and base is not r:
            entry["prefill_speedup_vs_eager_fp32"] = ratio(metric(r, "prefill_tokens_per_s"), metric(base, "prefill_tokens_per_s"))
            entry["decode_speedup_vs_eager_fp32"] = ratio(decode, metric(base, "decode_tokens_per_s"))
        weight = r["info"].get("weight_bytes_per_token")
        if bandwidth and weight:
            entry["decode_bound_tokens_per_s"] = decode_bound(weight, bandwidth)
            entry["decode_fraction_of_bound"] = decode.median / entry["decode_bound_tokens_per_s"]
        out.append(entry)
    for r in _ok(rows, "e2e"):
        answer, parts = metric(r, "answer_ms"), metric(r, "sum_of_parts_ms")
        if answer is None or parts is None:  # a PyTorch baseline: no parts timed apart
            continue
        out.append({"kind": "e2e: answer / sum of parts", "model": r["model"], "name": r["path"],
                    "value": ratio(answer, parts), "overhead_ms": metric(r, "overhead_ms").median,
                    "first_token_ratio": ratio(metric(r, "time_to_first_token_ms"), metric(r, "first_token_sum_of_parts_ms"))})
    out += real_e2e_comparisons(results)
    startup = _ok(rows, "startup")
    cold, warm = _find(startup, path="cold start (warmup=False)"), _find(startup, path="warm start (warmup=True)")
    if cold and warm:
        steady = metric(cold, "steady_ttft_ms")
        out.append({"kind": "startup: first-token time / steady", "model": cold["model"], "name": "cold",
                    "value": ratio(metric(cold, "first_request_ttft_ms"), steady)})
        out.append({"kind": "startup: first-token time / steady", "model": warm["model"], "name": "warm-started",
                    "value": ratio(metric(warm, "first_request_ttft_ms"), metric(warm, "steady_ttft_ms"))})
    return out


def real_e2e_comparisons(results: dict) -> list[dict]:
    """Per real-size end-to-end row: its first token against PyTorch eager fp32 and bf16 on the
    same checkpoint (ratios of medians from one run), and its FLOP and bandwidth bounds."""
    from ftz_edge.bench.bounds import first_token_bound_ms

    real = [r for r in _ok(results["rows"], "e2e") if r["size"] == "real"]
    out = []
    for r in real:
        ttft, decode, info = metric(r, "time_to_first_token_ms"), metric(r, "decode_tokens_per_s"), r["info"]
        entry = {"kind": "e2e real-size", "model": r["model"], "name": f"{r['backend']} {r['precision']}"}
        run = (info.get("run") or {}).get("command")
        for precision in ("fp32", "bf16"):  # ratios within one run only
            base = _find(real, model=r["model"], backend="PyTorch eager", precision=precision)
            if base and base is not r and (base["info"].get("run") or {}).get("command") == run:
                entry[f"ttft_vs_pytorch_{precision}"] = ratio(ttft, metric(base, "time_to_first_token_ms"))
        gflops = info.get("gflops")
        bound_ms = first_token_bound_ms(gflops, info.get("matmul_gflops"))
        if gflops:
            entry["first_token_gflops"] = gflops["first_token"]
        if bound_ms:
            entry["first_token_flop_bound_ms"] = bound_ms
            entry["first_token_of_flop_bound"] = bound_ms / ttft.median
        bandwidth = info.get("bandwidth_read_gbs") or bandwidth_gbs(results)
        weight = info.get("weight_bytes_per_token")
        if bandwidth and weight and decode is not None:
            entry["decode_bound_tokens_per_s"] = decode_bound(weight, bandwidth)
            entry["decode_fraction_of_bound"] = decode.median / entry["decode_bound_tokens_per_s"]
        out.append(entry)
    return out


# -- Markdown ---------------------------------------------------------------------------------


def _m(row, name, scale: float = 1.0) -> str:
    m = metric(row, name)
    if m is None:
        return "—"
    return f"{fmt(m.median * scale)} [{fmt(m.min * scale)}–{fmt(m.max * scale)}]"


def _x(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def _mem(row) -> str:
    mem = row.get("memory") or {}
    parts = []
    if mem.get("peak_rss_mb"):
        parts.append(f"{mem['peak_rss_mb']:.0f}")
    if mem.get("cuda_peak_mb"):
        parts.append(f"GPU {mem['cuda_peak_mb']:.0f}")
    return " / ".join(parts) or "—"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _comparison(comps, kind, model, batch, name):
    for c in comps:
        if c["kind"] == kind and c["model"] == model and c.get("batch") == batch and c["name"] == name:
            return c
    return None


def vision_table(results: dict, comps: list[dict], batches: Optional[set] = None, paths=None) -> str:
    body = []
    for r in _ok(results["rows"], "vision"):
        if (batches and r["batch"] not in batches) or (paths and r["path"] not in paths):
            continue
        speed = _comparison(comps, "vision speed-up vs PyTorch eager fp32", r["model"], r["batch"],
                            f"{r['backend']} {r['precision']}")
        is_base = (r["backend"], r["precision"]) == EAGER_FP32
        body.append([r["model"], r["path"], r["backend"], r["precision"], r["batch"], _m(r, "latency_ms"),
                     "1.00× (baseline)" if is_base and r["path"] == "FtZ tower" else
                     (_x(speed["value"]) if speed else "—"), _mem(r)])
    if not body:
        return ""
    return _table(["model", "path", "backend", "precision", "batch", "latency ms, median [min–max]",
                   "speed vs PyTorch eager fp32", "peak RSS MB"], body)


def fusion_table(comps: list[dict]) -> str:
    body = []
    for c in comps:
        if c["kind"].startswith("fusion overhead"):
            prune = _comparison(comps, "dead-layer pruning: pruned / unpruned", c["model"], c["batch"], c["name"])
            body.append([c["model"], c["name"], c["batch"], _x(c["value"]),
                         _pct(prune["saving"]) if prune else "—",
                         _pct(prune["saving_estimated"]) if prune and prune.get("saving_estimated") is not None else "—"])
    if not body:
        return ""
    return _table(["model", "backend", "batch", "fusion overhead: FtZ ÷ (anchor + augmenter)",
                   "pruning saving, measured", "pruning saving, FLOPs estimate"], body)


def llm_table(results: dict, comps: list[dict]) -> str:
    body = []
    for r in _ok(results["rows"], "llm"):
        c = next((c for c in comps if c["kind"] == "LLM" and c["model"] == r["model"]
                  and c["name"] == f"{r['backend']} {r['precision']}"), {})
        weight = r["info"].get("weight_bytes_per_token")
        body.append([r["model"], r["backend"], r["precision"], r["info"].get("prompt_tokens", "—"),
                     _m(r, "time_to_first_token_ms"), _m(r, "prefill_tokens_per_s"), _m(r, "decode_tokens_per_s"),
                     fmt(weight / 1e6) if weight else "—",
                     fmt(c.get("decode_bound_tokens_per_s")), _pct(c.get("decode_fraction_of_bound")),
                     "1.00× (baseline)" if (r["backend"], r["precision"]) == LLM_BASELINE else
                     f"{_x(c.get('prefill_speedup_vs_eager_fp32'))} / {_x(c.get('decode_speedup_vs_eager_fp32'))}",
                     _mem(r)])
    if not body:
        return ""
    return _table(["model", "backend", "precision", "prompt tokens", "time to first token ms", "prefill tok/s",
                   "decode tok/s", "weights read / token MB", "bandwidth bound tok/s", "of bound",
                   "prefill / decode vs eager fp32", "peak RSS MB"], body)


def e2e_table(results: dict) -> str:
    blocks = []
    for r in _ok(results["rows"], "e2e"):
        if r["size"] == "real":  # real_e2e_table
            continue
        rows = [["answer (through the runtime)", _m(r, "answer_ms")],
                ["sum of its parts", _m(r, "sum_of_parts_ms")],
                ["overhead (answer − parts)", _m(r, "overhead_ms")],
                ["time to first token", _m(r, "time_to_first_token_ms")],
                ["first-token parts (preprocess + vision + prompt + prefill)", _m(r, "first_token_sum_of_parts_ms")],
                ["part: preprocess", _m(r, "part_preprocess_ms")], ["part: vision tower", _m(r, "part_vision_ms")],
                ["part: prompt + splice", _m(r, "part_prompt_ms")], ["part: prefill", _m(r, "part_prefill_ms")],
                ["part: decode steps", _m(r, "part_decode_ms")]]
        info = r["info"]
        blocks.append(f"{r['model']}; prompt {info.get('prompt_tokens')} tokens, answer {info.get('new_tokens')} "
                      f"tokens ({info.get('answer', '')!r}):\n\n" + _table(["", "ms, median [min–max]"], rows))
    return "\n\n".join(blocks)


def _bytes(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{fmt(value / 1e9)} GB" if value >= 1e9 else f"{fmt(value / 1e6)} MB"


def _export_line(info: dict) -> str:
    """What the bundle's manifest says about the export that wrote it."""
    parts = [f"bundle {_bytes(info.get('bundle_bytes'))} (the manifest's files)"]
    if info.get("export_seconds") is not None:
        parts.append(f"exported by `ftz-export` in {fmt(info['export_seconds'])} s")
    stages = info.get("export_stage_seconds")
    if stages:
        parts.append("stages: " + ", ".join(f"{name} {fmt(seconds)} s" for name, seconds in stages.items()))
    if info.get("export_peak_rss_gib") is not None:
        parts.append(f"export peak RSS {fmt(info['export_peak_rss_gib'])} GiB")
    if not stages or info.get("export_peak_rss_gib") is None:
        parts.append("stage times and peak RSS not in its manifest (exported before ftz-export recorded them)")
    return "; ".join(parts)


def real_e2e_table(results: dict, comps: list[dict]) -> str:
    """The real-size (paper-size) end-to-end rows: the runtime on an exported bundle beside
    PyTorch eager on its checkpoint, first-token parts, decode speed, bounds, and the export."""
    from ftz_edge.bench.machine import machine_line

    real = [r for r in _ok(results["rows"], "e2e") if r["size"] == "real"]
    blocks = []
    for model in dict.fromkeys(r["model"] for r in real):
        rows = [r for r in real if r["model"] == model]
        runtime = next((r for r in rows if r["backend"] == "ftz_edge runtime"), rows[0])
        info = runtime["info"]
        run, machine = info.get("run") or {}, info.get("machine")
        ttft = metric(runtime, "time_to_first_token_ms")
        head = (f"{model}, random weights; the example image + a {info.get('question_tokens', '?')}-token question "
                f"({info.get('prompt_tokens')} prompt tokens), {info.get('new_tokens')} greedy tokens; "
                f"{ttft.repeats} run(s) after {ttft.warmup} warm-up")
        if run.get("command"):
            head += f"; measured by `{run['command']}`" + (f" ({run['created'][:10]})" if run.get("created") else "")
        if machine:
            head += f" on {machine_line(machine)}"
        rates = []
        if info.get("bandwidth_read_gbs"):
            rates.append(f"read bandwidth {fmt(info['bandwidth_read_gbs'])} GB/s")
        if info.get("matmul_gflops"):
            rates.append(f"fp32 GEMM {fmt(info['matmul_gflops'])} GFLOP/s (numpy)")
        head += (", " + ", ".join(rates) if rates else "") + "."
        loads = [x for r in rows for x in r["info"].get("load_average_1min") or [] if x is not None]
        if loads and machine:
            head += (f" The machine's 1-minute load average around these cases: {min(loads):.1f}–{max(loads):.1f} on "
                     f"{machine.get('logical_cores')} logical cores (each case's own threads count in it).")
        speed, bound_rows = [], []
        for r in rows:
            c = next((c for c in comps if c["kind"] == "e2e real-size" and c["model"] == model
                      and c["name"] == f"{r['backend']} {r['precision']}"), {})
            runtime_row = r["backend"] == "ftz_edge runtime"
            part = (lambda name: _m(r, "runtime_" + name)) if runtime_row else (lambda name: _m(r, "part_" + name))
            is_fp32 = (r["backend"], r["precision"]) == EAGER_FP32
            speed.append([r["backend"], r["precision"], _m(r, "time_to_first_token_ms"), part("preprocess_ms"),
                          part("vision_ms"), part("prefill_ms"), _m(r, "decode_tokens_per_s"),
                          "1.00× (baseline)" if is_fp32 else _x(c.get("ttft_vs_pytorch_fp32")),
                          _x(c.get("ttft_vs_pytorch_bf16")), _mem(r)])
            weight = r["info"].get("weight_bytes_per_token")
            bound_rows.append([r["backend"], r["precision"], fmt(c.get("first_token_gflops")),
                               fmt(c.get("first_token_flop_bound_ms")), _pct(c.get("first_token_of_flop_bound")),
                               fmt(weight / 1e6) if weight else "—", fmt(c.get("decode_bound_tokens_per_s")),
                               _pct(c.get("decode_fraction_of_bound"))])
        notes = sorted({r["info"]["bounds_note"] for r in rows if r["info"].get("bounds_note")})
        blocks.append("\n\n".join([
            head,
            _table(["path", "precision", "time to first token ms", "preprocess ms", "vision ms", "prefill ms",
                    "decode tok/s", "first token vs PyTorch fp32", "first token vs PyTorch bf16", "peak RSS MB"], speed),
            _table(["path", "precision", "GFLOPs to first token (vision + prefill)", "FLOP bound ms", "of FLOP bound",
                    "weights read / token MB", "bandwidth bound tok/s", "of bound"], bound_rows),
            "\n".join(f"- `{Path(b['info'].get('bundle', '')).name}` (vision {b['info'].get('vision_precision')}, LLM "
                      f"{b['info'].get('llm_precision')}): {_export_line(b['info'])}."
                      for b in rows if b["backend"] == "ftz_edge runtime")
            + "".join(f"\n- {n}." for n in notes)]))
    if not blocks:
        return ""
    return "\n\n".join(blocks) + (
        "\n\nParts of the first token: the runtime's own timings of the request; PyTorch's from the same "
        "`generate` call (preprocessing and prompt, the tower by hooks, prefill = first token − tower end). "
        "FLOP bound: GFLOPs (from the configs) ÷ the fp32 GEMM rate; bf16 and quantized kernels can beat it, so "
        "'of FLOP bound' can pass 100 %. Bandwidth bound: read bandwidth ÷ weight bytes read per token.")


def startup_table(results: dict) -> str:
    body = []
    for r in _ok(results["rows"], "startup"):
        body.append([r["path"], _m(r, "load_ms"), _m(r, "warmup_ms"), _m(r, "first_request_ttft_ms"),
                     _m(r, "steady_ttft_ms"), _m(r, "ready_to_first_token_ms"), metric(r, "load_ms").repeats])
    if not body:
        return ""
    return _table(["runtime", "load ms", "warm-up ms", "first request: time to first token ms",
                   "later request: time to first token ms", "load + first token ms", "processes"], body)


def unavailable(results: dict) -> str:
    lines = []
    seen = set()
    for r in results["rows"]:
        if r["status"] in ("not available", "failed") and r["suite"] != "build":
            text = f"- {r['suite']}: {r['model']}, {r['backend']} {r['precision']} — {r['status']}: {r['note']}"
            if text not in seen:
                seen.add(text)
                lines.append(text)
    return "\n".join(lines)


def machine_summary(results: dict) -> str:
    from ftz_edge.bench.machine import machine_line

    machine = results["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items() if v)
    bw = results.get("bandwidth") or {}
    line = f"**Machine:** {machine_line(machine)}; {machine['os']}, Python {machine['python']}.  \n**Libraries:** {libs}."
    if bw:
        line += (f"  \n**Memory bandwidth** (numpy, {bw.get('threads')} threads): read {fmt(bw['read_gbs']['median'])} GB/s, "
                 f"copy {fmt(bw['copy_gbs']['median'])} GB/s.")
    return line


def markdown(results: dict) -> str:
    comps = results.get("comparisons") or comparisons(results)
    opts = results.get("options", {})
    out = [f"# ftz-bench results: {results['device']}", "", machine_summary(results), "",
           f"Command: `{results.get('command', 'ftz-bench')}`; {opts.get('repeats')} timed runs after "
           f"{opts.get('warmup')} warm-up run(s) per figure; every figure is the median [min–max]; ratios are of medians "
           f"from this run. Total time {results.get('seconds', 0):.0f} s.", ""]
    sections = [("Vision tower", vision_table(results, comps)),
                ("Fusion overhead and dead-layer pruning", fusion_table(comps)),
                ("LLM (prompt: image tokens + 32 text tokens; greedy decode)", llm_table(results, comps)
                 + ("\n\n'of bound': decode tok/s ÷ (measured read bandwidth ÷ weight bytes read per token). Over 100 % "
                    "means the decoder streams weights faster than numpy's reductions measured (a shared or "
                    "throttled machine understates bandwidth), so read it as a lower bound of the machine's speed."
                    if any((c.get("decode_fraction_of_bound") or 0) > 1 for c in comps) else "")),
                ("End to end (image + question → answer, through the runtime; image cache off)", e2e_table(results)),
                ("End to end at paper size (an exported bundle through the runtime, PyTorch eager on its checkpoint)",
                 real_e2e_table(results, comps)),
                ("Start-up: cold vs warm-started first request (image cache off)", startup_table(results)),
                ("Not available or failed on this machine", unavailable(results))]
    for title, body in sections:
        if body:
            out += [f"## {title}", "", body, ""]
    notes = list(results.get("notes") or [])
    for m in results.get("merged") or []:
        notes.append(f"Merged from a later run (`ftz-bench --merge-into`): {len(m['rows'])} row(s) of `{m['command']}` "
                     f"({m.get('created', '?')[:10]}) on {_machine_of(m)}: " + "; ".join(
                         f"{k[0]} / {k[2]} / {k[4]} {k[5]}" for k in m["rows"]) + ".")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    builds = [r for r in results["rows"] if r["suite"] == "build"]
    if builds:
        out += ["## Artifacts", "", _table(["model", "artifact", "precision", "built / reused", "seconds"],
                                           [[b["model"], b["path"], b["precision"],
                                             b["note"] if b["status"] == "ok" else f"{b['status']}: {b['note']}",
                                             b["info"].get("seconds", "—")] for b in builds]), ""]
    return "\n".join(out)


def performance_section(results_dir, relative_to=None) -> str:
    """README's Performance section, from a results folder's ``results.json`` alone; the folder
    is named relative to ``relative_to`` (README's folder) when given."""
    results_dir = Path(results_dir)
    shown = Path(os.path.relpath(results_dir, relative_to)) if relative_to is not None else results_dir
    results = json.loads((results_dir / "results.json").read_text())
    comps = results.get("comparisons") or comparisons(results)
    opts = results.get("options", {})
    from ftz_edge.bench.machine import machine_line

    out = [f"Measured by `{results.get('command', 'ftz-bench')}` on {machine_line(results['machine'])}; "
           f"medians of {opts.get('repeats')} runs after {opts.get('warmup')} warm-up, [min–max] in brackets, "
           f"full tables and plots in `{shown.as_posix()}/` (`results.md`).", ""]
    for title, body in (("Vision tower, batch 1", vision_table(results, comps, batches={1}, paths={"FtZ tower"})),
                        ("Fusion overhead and pruning", fusion_table(comps)),
                        ("LLM", llm_table(results, comps)),
                        ("End to end", e2e_table(results)),
                        ("End to end at paper size", real_e2e_table(results, comps)),
                        ("Cold vs warm start", startup_table(results)),
                        ("Not available here", unavailable(results))):
        if body:
            out += [f"**{title}**", "", body, ""]
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme, results_dir) -> bool:
    """Replace the text between README's ftz-bench markers; returns whether it changed."""
    readme = Path(readme)
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    section = performance_section(results_dir, relative_to=readme.resolve().parent)
    new = f"{head}{README_BEGIN}\n{section}{README_END}{tail}"
    if new == text:
        return False
    atomic_write_bytes(readme, new.encode())
    return True


def readme_section(readme) -> Optional[str]:
    """The text between the markers (None without markers): what update_readme wrote."""
    text = Path(readme).read_text()
    match = re.search(re.escape(README_BEGIN) + r"\n?(.*?)" + re.escape(README_END), text, re.S)
    return match.group(1) if match else None


# -- plots ------------------------------------------------------------------------------------


def _bars(ax, labels, measurements, unit, title):
    medians = [m.median for m in measurements]
    lower = [m.median - m.min for m in measurements]
    upper = [m.max - m.median for m in measurements]
    ax.barh(range(len(labels)), medians, xerr=[lower, upper], capsize=3, color="#4C72B0")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    positive = [m for m in medians if m > 0]
    log = bool(positive) and max(positive) > 20 * min(positive)  # tiny and real-size models on one axis
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(f"{unit} (median, min–max{', log scale' if log else ''})")
    ax.set_title(title, fontsize=9)


def plots(results: dict, out: Path) -> list[str]:
    """PNG figures into ``out``; returns their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []

    def save(fig, name):
        path = out / name
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
        atomic_write_bytes(path, png.getvalue())
        plt.close(fig)
        written.append(name)

    vision = _ok(results["rows"], "vision")
    models = list(dict.fromkeys(r["model"] for r in vision))
    if models:
        fig, axes = plt.subplots(len(models), 1, figsize=(8, 1.2 + 0.32 * max(
            len([r for r in vision if r["model"] == m]) for m in models) * 1.0 * 1), squeeze=False)
        fig.set_figheight(sum(1.0 + 0.3 * len([r for r in vision if r["model"] == m]) for m in models))
        for ax, model in zip(axes[:, 0], models):
            rows = [r for r in vision if r["model"] == model]
            _bars(ax, [f"{r['path']} · {r['backend']} {r['precision']} · b{r['batch']}" for r in rows],
                  [metric(r, "latency_ms") for r in rows], "ms", f"Vision: {model}")
        save(fig, "vision_latency.png")
    llm = _ok(results["rows"], "llm")
    if llm:
        fig, axes = plt.subplots(1, 3, figsize=(14, 1.2 + 0.3 * len(llm)))
        labels = [f"{r['model']} · {r['backend']} {r['precision']}" for r in llm]
        _bars(axes[0], labels, [metric(r, "time_to_first_token_ms") for r in llm], "ms", "Time to first token")
        _bars(axes[1], labels, [metric(r, "prefill_tokens_per_s") for r in llm], "tok/s", "Prefill")
        _bars(axes[2], labels, [metric(r, "decode_tokens_per_s") for r in llm], "tok/s", "Decode")
        for ax in axes[1:]:
            ax.set_yticks([])
        save(fig, "llm_speed.png")
    from ftz_edge.bench.e2e_bench import PARTS

    # The runtime's rows (PyTorch baselines have no parts timed apart), one axis each: a tiny and
    # a paper-size model differ by three orders of magnitude.
    e2e = [r for r in _ok(results["rows"], "e2e") if all(metric(r, p) for p in (*PARTS, "answer_ms"))]
    if e2e:
        fig, axes = plt.subplots(len(e2e), 1, figsize=(8, 2.1 * len(e2e)), squeeze=False)
        for ax, r in zip(axes[:, 0], e2e):
            left = 0.0
            for part in PARTS:
                value = metric(r, part).median
                ax.barh(1, value, left=left, label=part.replace("part_", "").replace("_ms", ""))
                left += value
            answer = metric(r, "answer_ms")
            ax.barh(0, answer.median, xerr=[[answer.median - answer.min], [answer.max - answer.median]], color="grey",
                    capsize=3, label="answer through the runtime")
            ax.set_yticks([0, 1], ["runtime", "sum of parts"], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("ms (median)")
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
            ax.set_title(f"End to end vs the sum of its parts: {r['model']} ({r['precision']})", fontsize=9)
        fig.tight_layout()
        save(fig, "e2e_parts.png")
    startup = _ok(results["rows"], "startup")
    if startup:
        fig, ax = plt.subplots(figsize=(7, 2.2))
        labels, ms = [], []
        for r in startup:
            labels += [f"{r['path']}: first request", f"{r['path']}: later request"]
            ms += [metric(r, "first_request_ttft_ms"), metric(r, "steady_ttft_ms")]
        _bars(ax, labels, ms, "ms", "Time to first token: cold vs warm-started runtime")
        save(fig, "startup_ttft.png")
    return written


# -- files ------------------------------------------------------------------------------------


def write_report(results: dict, out) -> dict:
    """``results.json``, ``results.md`` and the PNGs into ``out``; each file written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "schema": SCHEMA}
    results["comparisons"] = comparisons(results)
    results["plots"] = plots(results, out)
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=1, default=str) + "\n").encode())
    atomic_write_bytes(out / "results.md", (markdown(results) + "\n").encode())
    return results


def load(results_dir) -> dict:
    return json.loads((Path(results_dir) / "results.json").read_text())


def _machine_of(merged: dict) -> str:
    from ftz_edge.bench.machine import machine_line

    return machine_line(merged["machine"]) if merged.get("machine") else "an unrecorded machine"


def merge_results(base: dict, new: dict) -> dict:
    """``base`` with the rows of the run ``new``: a row of the same case (suite, size, model, path,
    backend, precision, batch) is replaced; a base row that was "not available" or "failed" in a
    suite and size that ``new`` measured is dropped (``new`` says what it could not run itself);
    every other base row is kept as it is. The merge is recorded under ``merged`` (command, date,
    machine, rows), the base run's own header is left as it was."""
    from ftz_edge.bench.results import row_key

    fresh = new["rows"]
    keys = {row_key(r) for r in fresh}
    measured = {(r["suite"], r["size"]) for r in fresh if r["status"] == "ok" and r["suite"] != "build"}
    kept = [r for r in base["rows"] if row_key(r) not in keys
            and not (r["status"] in ("not available", "failed") and (r["suite"], r["size"]) in measured)]
    record = {"command": new.get("command"), "created": new.get("created"), "machine": new.get("machine"),
              "bandwidth": new.get("bandwidth"), "compute": new.get("compute"),
              "rows": [list(row_key(r)) for r in fresh]}
    merged = {k: v for k, v in base.items() if k not in ("comparisons", "plots", "schema")}
    merged["rows"] = kept + fresh
    merged["merged"] = [m for m in base.get("merged") or [] if m.get("command") != record["command"]] + [record]
    return merged


def merge_into(target, source) -> int:
    """Merge the run in folder ``source`` into the results folder ``target`` and rewrite its
    results.json, results.md and plots (its bench.log stays); returns the rows merged."""
    new = load(source)
    write_report(merge_results(load(target), new), target)
    return len(new["rows"])


