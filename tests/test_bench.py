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
from ftz_edge.bench.timing import Measurement, collect, fmt, measure, measure_interleaved, ratio

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


def test_interleaved_measurement_rotates_the_order_each_round():
    """Warm-up of each, then rounds that start one further along: every callable runs first once
    per len(fns) rounds, so drift over the run is shared, not loaded onto the last one."""
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    got = measure_interleaved(fns, repeats=3, warmup=1)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: (m.repeats, m.warmup) for name, m in got.items()} == {n: (3, 1) for n in "abc"}
    with pytest.raises(ValueError):
        measure_interleaved(fns, repeats=0)


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


def test_one_decoder_row_per_block_size_at_real_size(monkeypatch):
    """--llm-block-sizes: int4/int8 decoders at real size once per block size (labelled when not
    ftz-export's default, each its own cached folder); fp32 and the tiny model's once."""
    from ftz_edge.bench import artifacts, cli, llamacpp

    monkeypatch.setattr(llamacpp, "availability", lambda probe=True: (False, "not installed"))
    _, args = cli.parse_args(["--suite", "llm", "--size", "default,real", "--llm", "qwen2.5-0.5b", "--repeats", "1",
                              "--backends", "onnxruntime", "--llm-block-sizes", "32,128"])
    plan = cli.make_plan(args, gpu=False, cpu_flags=["avx2"])
    measured = sorted(c.label for c in plan.cases if c.target.endswith("llm_bench:ort_case"))
    assert measured == sorted([f"llm default (tiny Qwen2) ORT {p}" for p in ("fp32", "int8", "int4", "int8-dynamic")]
                              + [f"llm Qwen2.5-0.5B ORT {p}" for p in ("fp32", "int8", "int8 b128", "int4", "int4 b128",
                                                                       "int8-dynamic")])
    assert artifacts.llm_ort("real", "qwen2.5-0.5b", "int4", 128) != artifacts.llm_ort("real", "qwen2.5-0.5b", "int4")
    assert artifacts.llm_precision_label("fp32", 128) == "fp32" and artifacts.llm_precision_label("int4", None) == "int4"
    assert cli.parse_args(["--quick"])[1].llm_block_sizes == [32, 128]
    with pytest.raises(SystemExit):
        cli.parse_args(["--llm-block-sizes", "100"])


def test_two_e2e_bundles_with_one_name_are_refused(default_bundle, tmp_path):
    """Two bundles of one model at the same precisions would give rows (and ratios) of one name."""
    from ftz_edge.bench import cli

    _, args = cli.parse_args(["--suite", "e2e", "--size", "real", "--repeats", "1",
                              "--e2e-bundle", str(default_bundle), "--e2e-bundle", str(default_bundle)])
    with pytest.raises(SystemExit, match="are both fp32/fp32 bundles of .*: their rows would share one name"):
        cli.make_plan(args, gpu=False, cpu_flags=["avx2"])


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


# -- the real-size (paper-size) end-to-end rows ---------------------------------------------------


def test_paper_bundle_is_built_by_ftz_export_once(tmp_path, monkeypatch):
    """The cached paper-size bundle comes from ftz-export's own export_bundle (one builder), with
    the options the bench states, from the cached checkpoint; a finished bundle is reused."""
    from ftz_edge.bench import artifacts
    from ftz_edge.export import bundle as export

    monkeypatch.setenv("FTZ_EDGE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(export, "export_bundle", lambda options: calls.append(options) or Path(options.out))
    monkeypatch.setattr(artifacts, "is_bundle", lambda path: bool(calls))
    row = artifacts.build_paper_bundle()[0]
    assert len(calls) == 1 and row["note"] == "built" and row["status"] == "ok"
    options = calls[0]
    assert (options.precision, options.llm_precision, options.validation_images) == ("fp16", "int4", 2)
    assert Path(options.checkpoint) == artifacts.paper_checkpoint() and Path(options.out) == artifacts.paper_bundle()
    assert artifacts.paper_bundle().parent == tmp_path / "bench"
    assert artifacts.build_paper_bundle()[0]["note"] == "reused" and len(calls) == 1


def test_real_e2e_plan(tmp_path, monkeypatch):
    """--size real plans the paper-size row: the checkpoint and bundle builds when they are not
    cached (the bundle's after the checkpoint's), the runtime on the bundle, PyTorch fp32 and bf16
    on the checkpoint (bf16 'not available' without native bf16); nothing is built when cached,
    and --e2e-bundle takes an exported bundle as it is."""
    from ftz_edge.bench import artifacts, cli

    monkeypatch.setenv("FTZ_EDGE_CACHE", str(tmp_path))
    _, args = cli.parse_args(["--suite", "e2e", "--size", "real", "--repeats", "1"])
    plan = cli.make_plan(args, gpu=False, cpu_flags=["avx2"])
    builds = [c for c in plan.cases if c.suite == "build"]
    assert [c.target.rsplit(":", 1)[1] for c in builds] == ["build_paper_checkpoint", "build_paper_bundle"]
    checkpoint_key, bundle_key = builds[0].needs[0], builds[1].needs[0]
    assert checkpoint_key in builds[1].needs
    cases = {c.target.rsplit(":", 1)[1] + (" " + c.kwargs.get("precision", "")): c for c in plan.cases if c.suite == "e2e"}
    assert set(cases) == {"e2e_case ", "torch_case fp32"}  # no default-size row with --size real
    runtime = cases["e2e_case "]
    assert runtime.needs == [bundle_key] and runtime.kwargs["bundle"] == str(artifacts.paper_bundle())
    assert runtime.kwargs["ignore_eos"] and runtime.kwargs["question"] == artifacts.E2E_QUESTION
    assert cases["torch_case fp32"].needs == [checkpoint_key]
    assert cases["torch_case fp32"].kwargs["checkpoint"] == str(artifacts.paper_checkpoint())
    missing = {(r["backend"], r["precision"]): r["note"] for r in plan.rows if r["status"] == "not available"}
    assert "no native bf16" in missing[("PyTorch eager", "bf16")]
    assert plan.real_e2e

    plan = cli.make_plan(args, gpu=False, cpu_flags=["avx2", "avx512_bf16"])
    assert any(c.target.endswith(":torch_case") and c.kwargs["precision"] == "bf16" for c in plan.cases)

    monkeypatch.setattr(artifacts, "is_bundle", lambda path: True)
    monkeypatch.setattr(artifacts, "is_checkpoint_folder", lambda path: True)
    plan = cli.make_plan(args, gpu=False, cpu_flags=["avx2"])
    assert not [c for c in plan.cases if c.suite == "build"]
    assert {r["note"] for r in plan.rows if r["suite"] == "build"} == {"reused"}

    with pytest.raises(SystemExit):
        cli.parse_args(["--e2e-bundle", str(tmp_path / "nothing")])


def test_real_e2e_on_the_tiny_default_bundle(default_bundle, tmp_path):
    """The real-size case run for real on the shipped tiny model's bundle (fast): the runtime row
    with its first-token parts, decode speed, the manifest's export record and bundle size; the
    PyTorch baselines on the checkpoint the manifest names; the bounds; no timing asserted."""
    from ftz_edge import DEFAULT_MODEL
    from ftz_edge.bench.cli import main
    from ftz_edge.bench.machine import describe_machine

    out = tmp_path / "run"
    assert main(["--suite", "e2e", "--size", "real", "--e2e-bundle", str(default_bundle), "--repeats", "1",
                 "--warmup", "0", "--new-tokens", "3", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = [r for r in data["rows"] if r["suite"] == "e2e"]
    assert {r["size"] for r in rows} == {"real"}
    failed = [(r["backend"], r["precision"], r["note"]) for r in rows if r["status"] == "failed"]
    assert not failed, failed
    by = {(r["backend"], r["precision"]): r for r in rows}
    runtime = by[("ftz_edge runtime", "fp32/fp32")]
    for name in ("time_to_first_token_ms", "runtime_preprocess_ms", "runtime_vision_ms", "runtime_prefill_ms",
                 "decode_tokens_per_s", "answer_ms", "sum_of_parts_ms"):
        assert name in runtime["metrics"], name
    info = runtime["info"]
    manifest = json.loads((default_bundle / "manifest.json").read_text())
    assert info["bundle_bytes"] == sum(f["bytes"] for f in manifest["files"].values())
    assert info["export_seconds"] == manifest["provenance"]["export_seconds"]
    # None in bundles exported before ftz-export recorded them.
    assert info["export_stage_seconds"] == manifest["provenance"].get("stage_seconds")
    assert info["export_peak_rss_gib"] == manifest["provenance"].get("peak_rss_gib")
    assert info["new_tokens"] == 3 and info["question_tokens"] > 20  # EOS ignored: every run decodes the same count
    assert Path(info["checkpoint"]).resolve() == DEFAULT_MODEL.resolve()
    assert runtime["memory"]["peak_rss_mb"] > 0
    flags = describe_machine()["cpu_flags"]
    native = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    expected = {("PyTorch eager", "fp32"): "ok", ("PyTorch eager", "bf16"): "ok" if native else "not available"}
    assert {k: by[k]["status"] for k in expected} == expected
    torch_fp32 = by[("PyTorch eager", "fp32")]
    assert torch_fp32["info"]["prompt_tokens"] == info["prompt_tokens"]
    assert {"time_to_first_token_ms", "part_vision_ms", "part_prefill_ms",
            "decode_tokens_per_s"} <= set(torch_fp32["metrics"])
    # Bounds: machine rates and FLOPs on every measured row, and the ratios and bounds derived from them.
    for row in (r for r in rows if r["status"] == "ok"):
        i = row["info"]
        assert i["machine"]["cpu_flags"] is not None and i["bandwidth_read_gbs"] > 0 and i["matmul_gflops"] > 0
        assert i["gflops"]["first_token"] == pytest.approx(i["gflops"]["vision"] + i["gflops"]["prefill"])
        assert i["gflops"]["vision"] > 0 and i["weight_bytes_per_token"] > 0 and i["run"]["command"].startswith("ftz-bench")
    comp = next(c for c in data["comparisons"] if c["kind"] == "e2e real-size" and c["name"] == "ftz_edge runtime fp32/fp32")
    assert comp["ttft_vs_pytorch_fp32"] == pytest.approx(
        runtime["metrics"]["time_to_first_token_ms"]["median"] / torch_fp32["metrics"]["time_to_first_token_ms"]["median"])
    assert ("ttft_vs_pytorch_bf16" in comp) == native
    assert comp["first_token_flop_bound_ms"] == pytest.approx(info["gflops"]["first_token"] / info["matmul_gflops"] * 1e3)
    assert comp["decode_bound_tokens_per_s"] == pytest.approx(
        info["bandwidth_read_gbs"] * 1e9 / info["weight_bytes_per_token"])
    md = (out / "results.md").read_text()
    assert "## End to end at paper size" in md and "| path | precision | time to first token ms |" in md
    assert "GFLOPs to first token (vision + prefill)" in md and "bandwidth bound tok/s" in md
    _valid_png(out / "e2e_parts.png")


def test_model_cost_matches_the_loaded_tower():
    """FLOPs counted from a checkpoint's configs on the meta device equal tower_cost of the loaded
    tower; the prefill arithmetic is 2 FLOPs per multiply-add plus the causal half of attention."""
    from ftz_edge import DEFAULT_MODEL
    from ftz_edge.bench import artifacts, bounds
    from ftz_edge.sizes import tower_cost

    cost = bounds.model_cost(DEFAULT_MODEL)
    vision, _ = artifacts.load_vision("default", None)
    assert cost["vision_gflops"] == pytest.approx(tower_cost(vision, artifacts.specs("default")[1].crop_height).gflops)
    toy = {"llm_layer_params": 1000, "lm_head_params": 100, "llm_layers": 2, "attention_width": 8}
    assert bounds.prefill_gflops(toy, 4) * 1e9 == pytest.approx(2 * 4 * 1000 + 2 * 2 * 2 * 8 * 10 + 2 * 100)
    assert bounds.decode_gflops(toy, 4) * 1e9 == pytest.approx(2 * 1100 + 2 * 2 * 2 * 8 * 4)
    assert bounds.first_token_bound_ms({"first_token": 50.0}, 100.0) == pytest.approx(500.0)
    assert bounds.first_token_bound_ms(None, 100.0) is None


def _real_e2e_rows(command="ftz-bench --suite e2e --size real"):
    label = "FtZ CLIP-L/14-336 + DINOv2-L/14 + Qwen2.5-0.5B"
    common = {"run": {"command": command, "created": "2026-01-01T00:00:00Z"}, "bandwidth_read_gbs": 20.0,
              "matmul_gflops": 200.0, "prompt_tokens": 620, "question_tokens": 31, "new_tokens": 32,
              "gflops": {"vision": 540.0, "prefill": 460.0, "first_token": 1000.0, "decode_per_token": 1.0},
              "machine": {"cpu": "Test CPU", "cpu_flags": ["avx2", "avx512_bf16"], "logical_cores": 2, "ram_gib": 24,
                          "gpu": None}}
    row = lambda backend, precision, ttft, decode, weight, **extra: make_row(  # noqa: E731
        "e2e", "real", label, "image + question -> answer", backend, precision, 1,
        {"time_to_first_token_ms": Measurement(ttft), "decode_tokens_per_s": Measurement(decode, "tok/s"),
         "part_vision_ms": Measurement([1000.0]), "part_prefill_ms": Measurement([900.0]),
         "part_preprocess_ms": Measurement([10.0])}, info={**common, "weight_bytes_per_token": weight, **extra},
        memory={"peak_rss_mb": 3000.0})
    return [row("ftz_edge runtime", "fp16/int4", [2000, 2100, 1900], [40, 42, 38], 0.32e9, bundle="/b/b-fp16",
                bundle_bytes=1.8e9, export_seconds=978.5, export_stage_seconds=None, export_peak_rss_gib=None,
                vision_precision="fp16", llm_precision="int4"),
            row("PyTorch eager", "fp32", [5000, 5100, 4900], [8, 8, 8], 2.0e9),
            row("PyTorch eager", "bf16", [2500, 2600, 2400], [16, 16, 16], 1.0e9)]


def test_real_e2e_ratios_and_bounds():
    results = _synthetic_results()
    results["rows"] += _real_e2e_rows()
    comps = report.comparisons(results)
    runtime = next(c for c in comps if c["kind"] == "e2e real-size" and c["name"] == "ftz_edge runtime fp16/int4")
    assert runtime["ttft_vs_pytorch_fp32"] == pytest.approx(0.4) and runtime["ttft_vs_pytorch_bf16"] == pytest.approx(0.8)
    assert runtime["first_token_flop_bound_ms"] == pytest.approx(5000.0)  # 1000 GFLOPs at 200 GFLOP/s
    assert runtime["first_token_of_flop_bound"] == pytest.approx(2.5)  # faster than the fp32 rate allows
    assert runtime["decode_bound_tokens_per_s"] == pytest.approx(62.5)  # 20 GB/s over 0.32 GB
    assert runtime["decode_fraction_of_bound"] == pytest.approx(40 / 62.5)
    md = report.markdown({**results, "comparisons": comps})
    assert "0.40×" in md and "0.80×" in md and "978 s" in md and "stage times and peak RSS not in its manifest" in md
    assert "Test CPU (2 logical cores, avx2, avx512_bf16)" in md
    # The default-size e2e block is unchanged by real-size rows.
    assert report.e2e_table(results) == report.e2e_table(_synthetic_results())


def test_merge_into_replaces_only_what_it_measured(tmp_path):
    base_dir, run_dir = tmp_path / "committed", tmp_path / "run"
    base = _synthetic_results()
    base["rows"].append(make_row("e2e", "real", "real-size FtZ", "image + question -> answer", "ftz_edge runtime",
                                 "bundle", 1, status="not available", note="no real-size bundle"))
    report.write_report(base, base_dir)
    before = json.loads((base_dir / "results.json").read_text())
    run = {**_synthetic_results(), "command": "ftz-bench --suite e2e --size real", "created": "2026-01-01T00:00:00Z",
           "rows": _real_e2e_rows()}
    report.write_report(run, run_dir)
    from ftz_edge.bench.cli import main

    assert main(["--merge-into", str(base_dir), "--from", str(run_dir)]) == 0
    after = json.loads((base_dir / "results.json").read_text())
    kept = [r for r in before["rows"] if r["note"] != "no real-size bundle"]
    assert after["rows"][:len(kept)] == kept  # every other committed row exactly as it was
    assert after["rows"][len(kept):] == json.loads(json.dumps(run["rows"]))
    assert after["command"] == before["command"] and after["machine"] == before["machine"]
    assert after["merged"][0]["command"] == "ftz-bench --suite e2e --size real" and len(after["merged"][0]["rows"]) == 3
    md = (base_dir / "results.md").read_text()
    assert "## End to end at paper size" in md and "no real-size bundle" not in md
    assert "End to end at paper size" in report.performance_section(base_dir)
    main(["--merge-into", str(base_dir), "--from", str(run_dir)])  # merging the same run again changes nothing
    assert json.loads((base_dir / "results.json").read_text())["rows"] == after["rows"]
