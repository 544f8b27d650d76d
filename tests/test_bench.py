"""ftz-bench: statistics, ratios, the bandwidth bound, report files, 'not available' rows, and a
real tiny run of the CLI on the shipped default model. No timing is asserted anywhere: speed
goals are never tests (the machine is shared and noisy)."""

import json
import re
from pathlib import Path

import pytest

from ftz_edge.bench import report
from ftz_edge.bench.memory import bound_fraction, decode_bound
from ftz_edge.bench.results import make_row, merge_samples, metric
from ftz_edge.bench.timing import Measurement, collect, fmt, measure, ratio

ROOT = Path(__file__).resolve().parents[1]


# -- statistics -------------------------------------------------------------------------------


def test_measurement_median_min_max():
    m = Measurement([3.0, 1.0, 2.0, 10.0], "ms")
    assert (m.median, m.min, m.max, m.repeats) == (2.5, 1.0, 10.0, 4)
    odd = Measurement([5, 1, 4])
    assert odd.median == 4
    d = m.to_dict()
    assert d["samples"] == [3.0, 1.0, 2.0, 10.0] and d["median"] == 2.5
    assert Measurement.from_dict(d).median == 2.5
    assert m.map(lambda ms: 1000 / ms, "tok/s").samples == [1000 / 3, 1000.0, 500.0, 100.0]
    with pytest.raises(ValueError):
        Measurement([])


def test_measure_runs_warmup_then_repeats():
    calls = []
    m = measure(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and m.repeats == 3 and m.warmup == 2
    assert m.min <= m.median <= m.max
    values = iter([{"a": 1.0}, {"a": 5.0}, {"a": 3.0}, {"a": 2.0}])
    got = collect(lambda: next(values), repeats=3, warmup=1, units={"a": "tok/s"}, higher_is_better=("a",))
    assert got["a"].samples == [5.0, 3.0, 2.0] and got["a"].unit == "tok/s" and got["a"].higher_is_better


def test_ratio_of_medians():
    assert ratio(Measurement([2, 4, 6]), Measurement([1, 2, 3])) == 2.0
    assert ratio(Measurement([10]), 4.0) == 2.5
    assert ratio(1.0, 0.0) is None
    assert fmt(1234.5) == "1234" and fmt(12.345) == "12.3" and fmt(0.01234) == "0.0123" and fmt(None) == "—"


def test_bandwidth_bound_arithmetic():
    # 500 MB of weights per token at 14 GB/s: at most 28 tokens/s; 14 tok/s is half the bound.
    assert decode_bound(500e6, 14.0) == pytest.approx(28.0)
    assert bound_fraction(14.0, 500e6, 14.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        decode_bound(0, 14.0)


def test_merge_samples_concatenates_fresh_process_runs():
    row = lambda v, rss: make_row("startup", "default", "m", "cold", "rt", "b", 1,  # noqa: E731
                                  {"load_ms": Measurement([v])}, memory={"peak_rss_mb": rss})
    merged = merge_samples([[row(3.0, 100)], [row(1.0, 300)], [row(2.0, 200)]])
    assert len(merged) == 1
    m = metric(merged[0], "load_ms")
    assert m.samples == [3.0, 1.0, 2.0] and m.median == 2.0
    assert merged[0]["memory"]["peak_rss_mb"] == 300


# -- report -----------------------------------------------------------------------------------


def _synthetic_results():
    V = "CLIP-L/14-336 + DINOv2-B/14"
    vis = lambda path, backend, precision, ms: make_row(  # noqa: E731
        "vision", "real", V, path, backend, precision, 1, {"latency_ms": Measurement(ms)},
        info={"pruning_saving_estimated": 0.044}, memory={"peak_rss_mb": 1500.0})
    llm = lambda backend, precision, decode, weight: make_row(  # noqa: E731
        "llm", "real", "Qwen2.5-0.5B", "LLM", backend, precision, 1,
        {"time_to_first_token_ms": Measurement([2000, 2100, 2400]),
         "prefill_tokens_per_s": Measurement([300, 290, 250], "tok/s"),
         "decode_tokens_per_s": Measurement(decode, "tok/s"), "decode_ms_per_token": Measurement([50, 60, 70])},
        info={"weight_bytes_per_token": weight, "prompt_tokens": 608})
    e2e_metrics = {name: Measurement([10.0, 12.0, 11.0]) for name in (
        "time_to_first_token_ms", "part_preprocess_ms", "part_vision_ms", "part_prompt_ms", "part_prefill_ms",
        "part_decode_ms", "first_token_sum_of_parts_ms")}
    e2e_metrics.update(answer_ms=Measurement([60.0, 62.0, 61.0]), sum_of_parts_ms=Measurement([55.0, 57.0, 56.0]),
                       overhead_ms=Measurement([5.0, 5.0, 5.0]))
    start = lambda path, first, steady: make_row(  # noqa: E731
        "startup", "default", "bundle", path, "ftz_edge runtime", "fp32/fp32", 1,
        {"load_ms": Measurement([100, 110]), "first_request_ttft_ms": Measurement(first),
         "steady_ttft_ms": Measurement(steady), "ready_to_first_token_ms": Measurement([300, 320])})
    rows = [
        vis("FtZ tower", "PyTorch eager", "fp32", [1600, 1650, 1700]),
        vis("anchor alone", "PyTorch eager", "fp32", [1200, 1210, 1300]),
        vis("augmenter alone", "PyTorch eager", "fp32", [200, 190, 230]),
        vis("FtZ tower, unpruned", "PyTorch eager", "fp32", [1700, 1720, 1800]),
        vis("FtZ tower", "ONNX Runtime", "int8", [800, 825, 900]),
        llm("transformers eager", "fp32", [10, 11, 9], 2e9),
        llm("ONNX Runtime (runtime decoder)", "int4", [35, 38, 30], 0.35e9),
        make_row("e2e", "default", "bundle", "image + question -> answer", "ftz_edge runtime", "fp32/fp32", 1,
                 e2e_metrics, info={"prompt_tokens": 50, "new_tokens": 1, "answer": "below"}),
        start("cold start (warmup=False)", [180, 200], [30, 32]),
        start("warm start (warmup=True)", [40, 44], [30, 31]),
        make_row("vision", "real", V, "FtZ tower", "TensorRT", "fp16", status="not available",
                 note="not available on this machine (TensorRT is not installed)"),
        make_row("build", "real", V, "vision ONNX", "onnxruntime", "int8", note="reused", info={"seconds": 0.1}),
    ]
    from ftz_edge.bench.machine import describe_machine

    return {"device": "test-cpu-2c", "machine": describe_machine(), "options": {"repeats": 3, "warmup": 1},
            "bandwidth": {"read_gbs": Measurement([14.0, 14.5, 13.0], "GB/s").to_dict(),
                          "copy_gbs": Measurement([23.0], "GB/s").to_dict(), "threads": 2},
            "command": "ftz-bench --test", "seconds": 1.0, "rows": rows, "notes": ["a note"]}


def test_comparisons_are_ratios_of_medians():
    comps = report.comparisons(_synthetic_results())
    by = {(c["kind"], c["name"]): c for c in comps}
    fusion = by[("fusion overhead: FtZ tower / (anchor + augmenter)", "PyTorch eager fp32")]
    assert fusion["value"] == pytest.approx(1650 / (1210 + 200))
    prune = by[("dead-layer pruning: pruned / unpruned", "PyTorch eager fp32")]
    assert prune["value"] == pytest.approx(1650 / 1720) and prune["saving"] == pytest.approx(1 - 1650 / 1720)
    assert by[("vision speed-up vs PyTorch eager fp32", "ONNX Runtime int8")]["value"] == pytest.approx(2.0)
    int4 = by[("LLM", "ONNX Runtime (runtime decoder) int4")]
    assert int4["decode_bound_tokens_per_s"] == pytest.approx(14.0e9 / 0.35e9)  # 40 tok/s
    assert int4["decode_fraction_of_bound"] == pytest.approx(35 / 40)
    assert int4["decode_speedup_vs_eager_fp32"] == pytest.approx(3.5)
    assert by[("e2e: answer / sum of parts", "image + question -> answer")]["value"] == pytest.approx(61 / 56)
    assert by[("startup: first-token time / steady", "cold")]["value"] == pytest.approx(190 / 31)


def _valid_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 50


def test_report_files(tmp_path):
    report.write_report(_synthetic_results(), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema"] == report.SCHEMA
    for key in ("device", "machine", "bandwidth", "options", "command", "rows", "comparisons", "plots", "notes"):
        assert key in data, key
    for row in data["rows"]:
        assert set(row) >= {"suite", "size", "model", "path", "backend", "precision", "batch", "status", "note",
                            "metrics", "info", "memory"}
        for m in row["metrics"].values():
            assert set(m) >= {"median", "min", "max", "unit", "samples"}
    md = (tmp_path / "results.md").read_text()
    assert "| model | path | backend | precision | batch | latency ms, median [min–max]" in md
    assert "1650 [1600–1700]" in md
    assert "fusion overhead: FtZ ÷ (anchor + augmenter)" in md and "1.17×" in md
    assert "TensorRT fp16 — not available: not available on this machine (TensorRT is not installed)" in md
    assert "88 %" in md  # int4 decode at 35 of a 40 tok/s bound
    assert set(data["plots"]) == {"vision_latency.png", "llm_speed.png", "e2e_parts.png", "startup_ttft.png"}
    for name in data["plots"]:
        _valid_png(tmp_path / name)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_update_readme_between_markers(tmp_path):
    results = tmp_path / "results" / "test-cpu-2c"
    report.write_report(_synthetic_results(), results)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{report.README_BEGIN}\nSTALE-SECTION\n{report.README_END}\n\nafter\n")
    from ftz_edge.bench.cli import main

    assert main(["--update-readme", str(readme), "--from", str(results)]) == 0
    text = readme.read_text()
    assert "STALE-SECTION" not in text and text.endswith(f"{report.README_END}\n\nafter\n")
    assert report.readme_section(readme) == report.performance_section(results, relative_to=tmp_path)
    assert "`results/test-cpu-2c/`" in text
    assert report.update_readme(readme, results) is False  # idempotent
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# nothing\n")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(no_markers, results)


def test_readme_performance_section_matches_committed_results():
    readme = ROOT / "README.md"
    section = report.readme_section(readme)
    if section is None:
        pytest.skip("README.md has no <!-- ftz-bench:begin --> ... <!-- ftz-bench:end --> markers yet")
    match = re.search(r"full tables and plots in `([^`]+)/`", section)
    assert match, "README's ftz-bench section does not name its results folder"
    results = ROOT / match.group(1)
    assert (results / "results.json").is_file(), f"{results} is not committed"
    assert section == report.performance_section(results, relative_to=ROOT), \
        f"README's Performance section is stale: run ftz-bench --update-readme README.md --from {match.group(1)}"


# -- what is missing is said, not hidden -------------------------------------------------------


def test_not_available_rows_for_missing_tensorrt_and_llamacpp(monkeypatch):
    from ftz_edge.bench import cli, llamacpp
    from ftz_edge.export import tensorrt

    monkeypatch.setattr(tensorrt, "tensorrt_available", lambda: False)
    monkeypatch.setattr(llamacpp, "availability", lambda probe=True: (False, "llama-cpp-python is not installed"))
    _, args = cli.parse_args(["--suite", "vision,llm", "--size", "default", "--repeats", "1"])
    args.batches = [1]
    plan = cli.make_plan(args, gpu=False, cpu_flags=["avx2"])
    missing = {(r["backend"], r["precision"]): r["note"] for r in plan.rows if r["status"] == "not available"}
    assert "TensorRT is not installed" in missing[("TensorRT", "fp16")]
    assert "TensorRT is not installed" in missing[("TensorRT", "int8")]
    for quant in ("Q8_0", "Q4_0"):
        assert missing[("llama.cpp (llama-cpp-python)", quant)] == "llama-cpp-python is not installed"
    assert "no native bf16" in missing[("PyTorch eager", "bf16")]
    assert not any("llamacpp" in c.target or "tensorrt" in c.target for c in plan.cases)


def test_tensorrt_rows_where_tensorrt_is_installed(monkeypatch):
    """With TensorRT importable (the fakes of tests/fakes_tensorrt.py) the plan times it on a CUDA GPU and
    says "no CUDA GPU" without one: the bench's tests hold whether or not TensorRT is installed."""
    from fakes_tensorrt import install

    from ftz_edge.bench import cli

    install(monkeypatch)
    _, args = cli.parse_args(["--suite", "vision", "--size", "default", "--repeats", "1", "--backends", "tensorrt"])
    args.batches = [1]
    plan = cli.make_plan(args, gpu=False, cpu_flags=["avx2"])
    notes = {r["precision"]: r["note"] for r in plan.rows if r["backend"] == "TensorRT"}
    assert set(notes) == {"fp16", "int8"} and all("no CUDA GPU" in note for note in notes.values()), notes
    plan = cli.make_plan(args, gpu=True, cpu_flags=["avx2"])
    assert not [r for r in plan.rows if r["backend"] == "TensorRT" and r["status"] == "not available"]
    assert sorted(c.label.rsplit(" ", 1)[1] for c in plan.cases if c.target.endswith(":tensorrt_case")) == ["fp16", "int8"]


def test_llamacpp_availability_without_the_package(monkeypatch):
    import sys

    from ftz_edge.bench import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    usable, why = llamacpp.availability()
    assert not usable and "not installed" in why


def test_quick_preset_and_explicit_options():
    from ftz_edge.bench import cli

    _, args = cli.parse_args(["--quick", "--repeats", "7"])
    assert args.repeats == 7 and args.warmup == 1 and args.sizes == ["default", "real"]
    assert args.llms == ["qwen2.5-0.5b"] and "llamacpp" in args.backends
    with pytest.raises(SystemExit):
        cli.parse_args(["--suite", "nonsense"])


# -- a real run on the shipped default model ------------------------------------------------------


def test_cli_tiny_run_on_the_default_model(default_bundle, tmp_path, monkeypatch):
    from ftz_edge.bench.cli import main

    out = tmp_path / "results"
    code = main(["--size", "default", "--suite", "vision,e2e", "--repeats", "2", "--warmup", "1",
                 "--backends", "pytorch,onnxruntime,tensorrt", "--precisions", "fp32,fp16",
                 "--batch", "1", "--new-tokens", "4", "--bundle", str(default_bundle), "--out", str(out),
                 "--no-progress"])
    assert code == 0
    for name in ("results.json", "results.md", "vision_latency.png", "e2e_parts.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    rows = [r for r in data["rows"] if r["suite"] != "build"]
    failed = [(r["backend"], r["precision"], r["note"]) for r in rows if r["status"] == "failed"]
    assert not failed, failed
    measured = [r for r in rows if r["status"] == "ok"]
    assert {(r["path"], r["backend"], r["precision"]) for r in measured if r["suite"] == "vision"} >= {
        ("FtZ tower", "PyTorch eager", "fp32"), ("anchor alone", "PyTorch eager", "fp32"),
        ("augmenter alone", "PyTorch eager", "fp32"), ("FtZ tower, unpruned", "PyTorch eager", "fp32"),
        ("FtZ tower", "ONNX Runtime", "fp32")}
    for row in measured:
        assert row["metrics"], row
        for name, m in row["metrics"].items():
            assert m["min"] <= m["median"] <= m["max"], (row["path"], name, m)
            assert m["repeats"] == 2, (row["path"], name)
        assert row["memory"].get("peak_rss_mb", 0) > 0
    e2e = next(r for r in measured if r["suite"] == "e2e")
    for name in ("answer_ms", "time_to_first_token_ms", "sum_of_parts_ms", "overhead_ms",
                 "first_token_sum_of_parts_ms", "part_vision_ms", "part_prefill_ms", "part_decode_ms"):
        assert name in e2e["metrics"], name
    # TensorRT rows: measured where TensorRT and a CUDA GPU are present, else "not available" saying which is missing.
    from ftz_edge.export.tensorrt import tensorrt_available

    trt = [r for r in data["rows"] if r["backend"] == "TensorRT"]
    if tensorrt_available() and data["machine"]["gpu"] is not None:
        expected, why = "ok", ""
    else:
        expected, why = "not available", "TensorRT is not installed" if not tensorrt_available() else "no CUDA GPU"
    assert trt and all(r["status"] == expected and why in (r["note"] or "") for r in trt), trt
    assert "## Fusion overhead and dead-layer pruning" in (out / "results.md").read_text()
