"""ftz-doctor: what it finds on this machine, a bundle's budget, the Jetson plans, failure paths."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakes_tensorrt import add_engine, copy_bundle, install
from ftz_edge.doctor import cli as doctor
from ftz_edge.doctor import machine  # memory and GPU findings (doctor/machine.py)
from ftz_edge.runtime import device
from ftz_edge.doctor import memory_budget as mb

MIB, GIB = 1 << 20, 1 << 30


def run_json(capsys, *argv):
    code = doctor.main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def cpu_result(report):
    return next(r for r in report["providers"]["results"] if r["provider"] == "CPUExecutionProvider")


# -- this machine ---------------------------------------------------------------------------------
def test_without_bundle_reports_this_machine(capsys):
    code, report = run_json(capsys)
    assert report["python"]["python"] == sys.version
    import onnxruntime

    assert report["python"]["packages"]["onnxruntime"] == onnxruntime.__version__
    cpu = cpu_result(report)
    assert cpu["ok"] and cpu["needed"] and cpu["run_ms"] is not None, cpu
    ram = report["machine"]["ram"]
    assert 0 < ram["available"] <= ram["total"]
    if shutil.which("nvidia-smi") is None and device.cudart() is None and report["machine"]["jetson"] is None:
        assert report["machine"]["gpu"] is None and report["machine"]["unified_memory"]
    assert code == 0 and report["ok"] and not report["problems"], report["problems"]

    assert doctor.main([]) == code
    text = capsys.readouterr().out
    assert "CPUExecutionProvider" in text and f"Python {sys.version}" in text


def test_tiny_model_is_valid_onnx_and_runs_right():
    import onnx
    model, feeds, expected = doctor.tiny_model()
    proto = onnx.load_from_string(model)
    onnx.checker.check_model(proto)
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "Add"]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_allclose(feeds["x"] @ weights["W"] + weights["b"], expected, rtol=1e-6)
    result = doctor.run_on_provider(model, "CPUExecutionProvider", feeds,
                                    lambda out: None if np.allclose(out[0], expected, atol=1e-5) else "wrong")
    assert result["ok"], result


def test_doctor_imports_no_torch():
    code = ("import sys, ftz_edge.doctor.cli, ftz_edge.doctor.memory_budget; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- providers that are listed but do not work ----------------------------------------------------
class FailingOn:
    """onnxruntime.InferenceSession that fails for the given providers, as a broken CUDA install does."""

    def __init__(self, real, failing):
        self.real, self.failing = real, failing

    def __call__(self, model, sess_options=None, providers=None, **kwargs):
        if providers and providers[0] in self.failing:
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {providers[0]}: CUDA failure 35: "
                               "CUDA driver version is insufficient for CUDA runtime version")
        return self.real(model, sess_options=sess_options, providers=providers, **kwargs)


@pytest.mark.parametrize("provider, needed", [("CUDAExecutionProvider", True), ("OpenVINOExecutionProvider", False)])
def test_failing_provider_is_reported_and_fails_only_when_needed(monkeypatch, capsys, provider, needed):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [provider, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", FailingOn(onnxruntime.InferenceSession, {provider}))
    code, report = run_json(capsys)
    failed = next(r for r in report["providers"]["results"] if r["provider"] == provider)
    assert not failed["ok"] and "CUDA driver version is insufficient" in failed["error"]
    assert failed["needed"] is needed
    assert cpu_result(report)["ok"]
    if needed:
        assert code == 1 and any(provider in p for p in report["problems"])
    else:
        assert code == 0 and report["ok"], report["problems"]


class FallsBackToCpu:
    """onnxruntime.InferenceSession where ``provider`` lacks a kernel of the model, as ORT behaves:
    with "session.disable_cpu_ep_fallback" = "1" the session fails; without it the node runs on the
    CPU, quietly, with right results (so only the config entry makes the check mean anything)."""

    def __init__(self, real, provider):
        self.real, self.provider = real, provider

    def __call__(self, model, sess_options=None, providers=None, **kwargs):
        if not providers or providers[0] != self.provider:
            return self.real(model, sess_options=sess_options, providers=providers, **kwargs)
        try:
            fallback_off = sess_options.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
        except (AttributeError, RuntimeError):  # ORT raises for a key never set
            fallback_off = False
        if fallback_off:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : This session contains graph nodes that are assigned "
                               "to the default CPU EP, but fallback to CPU EP has been explicitly disabled by the user.")
        session = self.real(model, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)
        session.get_providers = lambda: [self.provider, "CPUExecutionProvider"]  # what ORT reports then
        return session


def test_a_provider_that_falls_back_to_the_cpu_is_a_failure(monkeypatch, capsys):
    import onnxruntime

    provider = "CUDAExecutionProvider"
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [provider, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", FallsBackToCpu(onnxruntime.InferenceSession, provider))
    code, report = run_json(capsys)
    failed = next(r for r in report["providers"]["results"] if r["provider"] == provider)
    assert not failed["ok"] and "fallback to CPU EP has been explicitly disabled" in failed["error"]
    assert code == 1 and cpu_result(report)["ok"]


# -- the bundle -----------------------------------------------------------------------------------
def test_default_bundle(default_bundle, capsys):
    code, report = run_json(capsys, "--bundle", str(default_bundle))
    assert code == 0, report["problems"]
    bundle = report["bundle"]
    assert bundle["manifest"].startswith("ok")
    assert [r["ok"] for r in bundle["vision_runs"]] == [True]
    assert bundle["decoder_run"]["ok"] and bundle["decoder_run"]["provider"] == "CPUExecutionProvider"
    items = {i["name"]: i["bytes"] for i in bundle["budgets"]["budget"]["items"]}
    size = lambda rel: (Path(default_bundle) / rel).stat().st_size  # noqa: E731
    assert items["vision weights"] == size("vision/vision.onnx")
    decoder_files = sorted((Path(default_bundle) / "llm").glob("model.onnx*"))  # the graph (+ its weights file)
    assert items["LLM weights"] == sum(p.stat().st_size for p in decoder_files) + size("llm/embed_tokens.npy")
    manifest = json.loads((Path(default_bundle) / "manifest.json").read_text())
    llm, context = manifest["llm"], min(manifest["prompt"]["max_length"], manifest["llm"]["context_length"])
    assert items["KV cache"] == 2 * llm["num_layers"] * llm["num_kv_heads"] * llm["head_size"] * context * 4  # fp32 cache
    fits = bundle["budgets"]["fits"]
    assert fits[0]["target"].startswith("this machine") and fits[0]["fits"]
    assert [f["target"] for f in fits[1:]] == [t.name for t in mb.JETSON_TARGETS]

    assert doctor.main(["--bundle", str(default_bundle)]) == 0
    text = capsys.readouterr().out
    assert "vision graph on CPUExecutionProvider: ok" in text and "Jetson Orin Nano 8 GB" in text


def test_bundle_that_does_not_fit_gets_real_export_options(default_bundle, monkeypatch, capsys):
    monkeypatch.setattr(machine, "meminfo", lambda: {"total": 512 * MIB, "available": 100 * MIB, "source": "test"})
    code, report = run_json(capsys, "--bundle", str(default_bundle))
    assert code == 1 and any("does not fit this machine" in p for p in report["problems"])
    here = report["bundle"]["budgets"]["fits"][0]
    assert not here["fits"]
    changes = {c["change"]: c for c in here["changes"]}
    assert "--llm-precision int4" in changes["INT4 LLM"]["how"] and changes["INT4 LLM"]["saving"] > 0
    assert "--precision fp16" in changes["FP16 vision tower"]["how"]
    # only ftz-export options that exist are suggested
    flags = set(subprocess.run([sys.executable, "-m", "ftz_edge.export.bundle", "--help"], capture_output=True,
                               text=True, check=True).stdout.split())
    for change in here["changes"]:
        for word in change["how"].split():
            if word.startswith("--"):
                assert word in flags, (word, change)


def test_bundle_budget_uses_the_sizes_the_manifest_records(default_bundle, tmp_path):
    """ftz-export records the encoders' sizes and the LLM's heads and MLP width; the budget reads
    them, and falls back to its stated assumptions only for a bundle exported before that."""
    from ftz_edge.doctor import bundle_check
    from ftz_edge.manifest import read_manifest

    manifest = read_manifest(default_bundle)
    encoders, llm = manifest.vision.encoders, manifest.llm
    spec = bundle_check.bundle_spec(Path(default_bundle), manifest)
    for built, recorded in ((spec.anchor, encoders.anchor), (spec.augmenter, encoders.augmenter)):
        assert built == mb.Encoder(recorded.tokens, recorded.hidden_size, recorded.intermediate_size,
                                   recorded.num_attention_heads)
    assert (spec.heads, spec.mlp) == (llm.num_attention_heads, llm.intermediate_size)
    assert not [a for a in spec.assumptions if "does not record" in a]

    def older(m):
        m["vision"].pop("encoders"), m["llm"].pop("num_attention_heads"), m["llm"].pop("intermediate_size")

    old = copy_bundle(default_bundle, tmp_path / "old", older)
    old_spec = bundle_check.bundle_spec(old, read_manifest(old))
    width = manifest.vision.outputs[0].shape[-1]
    assert old_spec.anchor == mb.Encoder(manifest.vision.num_image_tokens + 1, width, mb.ASSUMED_MLP_RATIO * width,
                                         max(1, width // mb.ASSUMED_HEAD_DIM))
    genai = json.loads((Path(default_bundle) / "llm" / "genai_config.json").read_text())["model"]["decoder"]
    assert old_spec.heads == genai["num_attention_heads"] and old_spec.mlp == mb.ASSUMED_MLP_RATIO * llm.hidden_size
    assert [a for a in old_spec.assumptions if "does not record the encoders' sizes" in a]
    assert [a for a in old_spec.assumptions if "does not record the LLM's MLP width" in a]


def _copy_with_engine(default_bundle, tmp_path, record):
    """The default bundle with a 4096-byte all-zero "engine" and the given build record."""
    def engine(manifest):
        manifest["vision"]["engine"] = "trt"
        manifest["vision"]["tensorrt"] = {"file": "vision/vision.engine", "record": record}

    return copy_bundle(default_bundle, tmp_path / "bundle", engine, {"vision/vision.engine": b"\0" * 4096,
                                                                     "vision/vision.engine.json": json.dumps(record).encode()})


ORIN = {"name": "Orin", "compute_capability": "8.7", "total_memory": 7_600_000 * 1024}


def fake_jetson(monkeypatch, tmp_path):
    """An Orin Nano: device tree, L4T 36.4.3, 7.4 GiB RAM with 5.5 GiB available, cuda-python, TensorRT 10.3
    (the fakes of tests/fakes_tensorrt.py: engines really deserialize and run, or fail to)."""
    model, release, meminfo = tmp_path / "model", tmp_path / "nv_tegra_release", tmp_path / "meminfo"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\0")
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8\n")
    meminfo.write_text(f"MemTotal:        {7_600_000} kB\nMemFree:         {1_000_000} kB\nMemAvailable:    {5_767_168} kB\n")
    monkeypatch.setattr(device, "DEVICE_TREE_MODEL", model)
    monkeypatch.setattr(device, "TEGRA_RELEASE", release)
    monkeypatch.setattr(machine, "MEMINFO", meminfo)
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError: /proc/meminfo is read
    trt, cuda = install(monkeypatch, "10.3.0", ORIN)
    cuda.free_memory = 5 * GIB
    return trt, cuda


RECORD = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "precision": "fp32",
          "profile_shapes": {}, "workspace_bytes": 2 * GIB, "timing_cache": None, "timing_cache_reused": False,
          "engine_sha256": "0" * 64, "engine_bytes": 4096, "onnx_sha256": "0" * 64, "built_at": "2026-01-01T00:00:00"}


def test_fake_jetson_with_a_matching_engine(default_bundle, monkeypatch, tmp_path, capsys):
    trt, cuda = fake_jetson(monkeypatch, tmp_path)
    bundle = copy_bundle(default_bundle, tmp_path / "bundle")
    record = add_engine(bundle, workspace_bytes=2 * GIB)  # built on this (fake) Orin by ftz-export's builder
    code, report = run_json(capsys, "--bundle", str(bundle))
    machine = report["machine"]
    assert machine["jetson"]["l4t"] == "36.4.3" and machine["jetson"]["jetpack"] == "JetPack 6"
    assert machine["gpu"]["name"] == "Orin" and machine["gpu"]["compute_capability"] == "8.7"
    assert machine["tensorrt"]["version"] == "10.3.0" and machine["unified_memory"]
    assert machine["gpu_memory"]["free"] == 5 * GIB
    assert machine["ram"] == {"total": 7_600_000 * 1024, "available": 5_767_168 * 1024, "source": str(tmp_path / "meminfo")}
    engine = report["bundle"]["engine"]
    assert engine["compatible"] and engine["used"], engine
    assert engine["run"]["ok"] and engine["run"]["run_ms"] is not None, engine["run"]  # deserialized and run, not trusted
    assert ("execute_async_v3",) in trt.calls and cuda.live == [] and cuda.streams == {}
    budget = report["bundle"]["budgets"]["budget"]
    items = {i["name"]: i for i in budget["items"]}
    assert items["vision weights"]["bytes"] == (bundle / "vision" / "vision.engine").stat().st_size  # the engine is loaded
    assert record["workspace_bytes"] == 2 * GIB and items["activations"]["bytes"] > 2 * GIB  # the TensorRT workspace counts
    here = report["bundle"]["budgets"]["fits"][0]
    assert "Jetson unified memory" in here["target"] and here["available"] == 5_767_168 * 1024
    assert code == 0, report["problems"]

    text_code = doctor.main(["--bundle", str(bundle)])
    text = capsys.readouterr().out
    assert text_code == 0 and "L4T 36.4.3 (JetPack 6)" in text and "compute capability 8.7" in text
    assert "TensorRT engine run: ok" in text


def test_fake_jetson_with_an_engine_file_of_zeros(default_bundle, monkeypatch, tmp_path, capsys):
    """The build record says "this GPU, this TensorRT"; the file is 4096 zero bytes: the doctor must not trust it."""
    fake_jetson(monkeypatch, tmp_path)
    bundle = _copy_with_engine(default_bundle, tmp_path, RECORD)
    code, report = run_json(capsys, "--bundle", str(bundle))
    engine = report["bundle"]["engine"]
    assert engine["compatible"] and not engine["used"] and not engine["run"]["ok"]
    assert "could not deserialize" in engine["run"]["error"]
    assert code == 1 and any("does not run here although its build record says" in p for p in report["problems"])
    items = {item["name"]: item for item in report["bundle"]["budgets"]["budget"]["items"]}
    assert items["vision weights"]["bytes"] != 4096  # the runtime would load the vision ONNX instead: that is budgeted
    assert doctor.main(["--bundle", str(bundle)]) == 1
    assert "TensorRT engine run: FAILED" in capsys.readouterr().out


def test_fake_jetson_with_an_engine_from_another_gpu(default_bundle, monkeypatch, tmp_path, capsys):
    fake_jetson(monkeypatch, tmp_path)
    bundle = _copy_with_engine(default_bundle, tmp_path,
                               {**RECORD, "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                                "tensorrt_version": "10.16.0"})
    code, report = run_json(capsys, "--bundle", str(bundle))
    engine = report["bundle"]["engine"]
    assert not engine["compatible"] and "9.0" in engine["reason"] and "10.16.0" in engine["reason"]
    assert not engine["run"]["ok"]  # tried all the same: the record is a claim
    # The runtime falls back to the vision ONNX: a warning (slower), not a failure, and the ONNX is budgeted.
    assert code == 0 and any("rebuild it on this device" in w for w in report["bundle"]["warnings"]), report["bundle"]
    items = {item["name"]: item for item in report["bundle"]["budgets"]["budget"]["items"]}
    onnx_bytes = sum(p.stat().st_size for p in (bundle / "vision").glob("*.onnx*"))
    assert items["vision weights"]["bytes"] == onnx_bytes


def test_jetson_without_cuda_python_infers_orin(monkeypatch, tmp_path, capsys):
    fake_jetson(monkeypatch, tmp_path)
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "tensorrt"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no nvidia-smi
    code, report = run_json(capsys)
    gpu = report["machine"]["gpu"]
    assert gpu["compute_capability"] == "8.7" and "device tree" in gpu["source"]
    assert report["machine"]["tensorrt"]["version"] is None and code == 0


def test_doctor_tests_the_provider_lists_the_runtime_uses(default_bundle, tmp_path, monkeypatch, capsys):
    """Where onnxruntime lists TensorRT, CUDA and the CPU, a CUDA-built decoder gets CUDA + CPU in
    the runtime and in the doctor alike (one function, runtime.vision.provider_plan), never TensorRT."""
    import onnxruntime

    from ftz_edge.runtime.engine import FtZRuntime

    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    bundle = copy_bundle(default_bundle, tmp_path / "bundle", lambda m: m["llm"].update(execution_provider="cuda"))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(everything))
    sessions = []
    real = onnxruntime.InferenceSession

    def recording(model, sess_options=None, providers=None, **kwargs):
        where = "tiny" if isinstance(model, bytes) else Path(str(model)).parent.name
        sessions.append((where, list(providers)))
        return real(model, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    FtZRuntime(bundle)
    runtime_sessions, sessions[:] = list(sessions), []
    code, report = run_json(capsys, "--bundle", str(bundle))
    assert report["bundle"]["providers"] == {"vision": everything, "decoder": everything[1:]}
    runtime_decoder = [providers for where, providers in runtime_sessions if where == "llm"]
    doctor_decoder = [providers for where, providers in sessions if where == "llm"]
    assert runtime_decoder == doctor_decoder == [everything[1:]]
    # the vision graph: each of the runtime's providers alone (TensorRT's would build an engine: skipped)
    assert [providers for where, providers in sessions if where == "vision"] == [[p] for p in everything[1:]]
    assert [r["provider"] for r in report["bundle"]["vision_runs"]] == everything


def test_tampered_bundle_fails(default_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle, bundle)
    with open(bundle / "llm" / "tokenizer.json", "a") as f:
        f.write(" ")
    code, report = run_json(capsys, "--bundle", str(bundle))
    assert code == 1 and report["bundle"]["manifest"].startswith("failed") and "sha256" in report["problems"][0]


@pytest.mark.parametrize("argv, message", [
    (["--bundle", "/no/such/folder"], "no such folder"),
    (["--bundle", "."], "not a bundle"),
])
def test_bad_bundle_path_is_one_line_and_exit_2(capsys, argv, message):
    assert doctor.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_arguments_exit_2(capsys):
    for argv in (["--llm", "tinyllama-1.1b"], ["--plan", "--context-length", "0"], ["--plan", "--llm", "gpt-5"]):
        with pytest.raises(SystemExit) as exit_info:
            doctor.main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()


# -- budgets --------------------------------------------------------------------------------------
def test_kv_cache_of_qwen2_5_0_5b():
    # Qwen2.5-0.5B: 24 layers, 2 KV heads, head dim 896 / 14 = 64. K and V, fp16, 2048 tokens:
    expected = 2 * 24 * 2 * 64 * 2048 * 2
    assert expected == 12_582_912 * 2 == 25_165_824
    spec = mb.plan_spec(llm="qwen2.5-0.5b", llm_precision="int4", context=2048, gpu=True)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.kv_bytes_per_element) == (24, 2, 64, 2)
    assert mb.budget(spec, gpu=True).kv_cache.bytes == expected
    # On the CPU the builder's cache is fp32: twice as much.
    assert mb.budget(mb.plan_spec(llm_precision="int4", gpu=False), gpu=False).kv_cache.bytes == 2 * expected
    # Qwen's 32768 positions are capped by the context asked for, TinyLlama's 2048 cap it.
    assert mb.plan_spec(context=4096).context == 4096
    assert mb.plan_spec(llm="tinyllama-1.1b", context=4096).context == 2048


def test_int4_decoder_size_matches_the_measured_file():
    # Measured on this project's machines: ORT GenAI's builder made a 317 MB int4 Qwen2.5-0.5B decoder for the CPU.
    decoder, embed = mb.exported_llm_bytes("qwen2.5-0.5b", "int4", "cpu")
    assert abs(decoder - 317e6) / 317e6 < 0.02
    assert embed == 151936 * 896 * 2  # fp16 table


def test_parameter_counts_match_torch():
    from ftz_edge.config import TowerConfig
    from ftz_edge.sizes import build_reference_vision, count_parameters, reference_config

    clip = mb.reference_config(mb.REFERENCE_ANCHOR)
    for augmenter, select_layer in [(name, -1) for name in mb.AUGMENTERS] + [("dinov2-large", -2)]:
        vision = build_reference_vision(TowerConfig(select_layer=select_layer), augmenter=augmenter)
        tower = mb.reference_tower(augmenter, select_layer=select_layer)
        assert count_parameters(vision.anchor) == mb.clip_vision_params(clip)
        assert count_parameters(vision.augmenter) == mb.dinov2_params(mb.reference_config(augmenter))
        assert (tower.anchor_layers_run, tower.augmenter_layers_run) == (vision.anchor_depth, vision.augmenter_depth)
        assert tower.fusion_params == count_parameters(vision.fusion)
        assert tower.projector_params == count_parameters(vision.projector)
        exported = (count_parameters(vision.anchor.embeddings) + count_parameters(vision.anchor.pre_layrnorm)
                    + sum(count_parameters(layer) for layer in vision.anchor.encoder.layers[:vision.anchor_depth])
                    + count_parameters(vision.augmenter.embeddings)
                    + sum(count_parameters(layer) for layer in vision.augmenter.encoder.layer[:vision.augmenter_depth]))
        assert tower.anchor_params + tower.augmenter_params == exported

    import torch
    from transformers import AutoModelForCausalLM

    for name in mb.LLMS:
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(reference_config(name))
        assert count_parameters(llm) == mb.llm_params(mb.reference_config(name)), name


def test_jetson_plans():
    nano, nx = mb.JETSON_TARGETS[0], mb.JETSON_TARGETS[1]
    # The paper-size model with an int4 LLM fits an Orin Nano.
    assert mb.check_fit(mb.plan_spec(llm_precision="int4"), nano).fits
    # TinyLlama fp16 with an fp32 tower does not; INT4 is offered, with the right command, and is enough.
    spec = mb.plan_spec(llm="tinyllama-1.1b", tower_precision="fp32", llm_precision="fp16")
    fit = mb.check_fit(spec, nano)
    assert not fit.fits and fit.needed > nano.available
    int4 = next(c for c in fit.changes if c["change"] == "INT4 LLM")
    assert "--llm-precision int4 --llm-provider cuda" in int4["how"] and int4["fits_after"]
    after = mb.budget(mb._to_int4(spec), gpu=True).llm_weights.bytes
    assert int4["saving"] == mb.budget(spec, gpu=True).llm_weights.bytes - after
    assert fit.all_changes_fit
    assert mb.check_fit(spec, nx).fits and not mb.check_fit(spec, nx).changes


def test_plan_cli(capsys):
    code, report = run_json(capsys, "--plan", "--llm", "tinyllama-1.1b", "--precision", "fp32", "--llm-precision", "fp16")
    assert code == 0 and report["ok"]  # a plan that does not fit somewhere never changes the exit status
    row = report["plan"]["rows"][0]
    nano = next(f for f in row["gpu"]["fits"] if f["target"] == "Jetson Orin Nano 8 GB")
    assert not nano["fits"] and any(c["change"] == "INT4 LLM" and c["fits_after"] for c in nano["changes"])
    assert doctor.main(["--plan"]) == code
    assert "Jetson AGX Orin 64 GB" in capsys.readouterr().out


# -- two ONNX Runtime builds at once --------------------------------------------------------------
def fake_distributions(monkeypatch, installed: dict):
    """importlib.metadata as ftz-doctor reads it, with ``installed`` (name -> version) laid over this
    environment's real distributions (None removes one)."""
    from ftz_edge.doctor import probes

    real = probes.distribution_version
    monkeypatch.setattr(probes, "distribution_version", lambda name: installed[name] if name in installed else real(name))


def test_onnxruntime_and_onnxruntime_gpu_together_are_a_failure_with_the_fix(monkeypatch, capsys):
    fake_distributions(monkeypatch, {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.23.2"})
    code, report = run_json(capsys)
    conflict = [p for p in report["problems"] if "ONNX Runtime builds are installed at once" in p]
    assert code == 1 and len(conflict) == 1, report["problems"]
    assert "onnxruntime 1.32.0, onnxruntime-gpu 1.23.2" in conflict[0]
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in conflict[0]
    assert report["python"]["packages"]["onnxruntime-gpu"] == "1.23.2"
    assert doctor.main([]) == 1
    text = capsys.readouterr().out
    assert "PROBLEM: 2 ONNX Runtime builds are installed at once" in text and "(exit status 1)" in text


@pytest.mark.parametrize("installed", [{"onnxruntime": None, "onnxruntime-gpu": "1.23.2"},
                                       {"onnxruntime": "1.32.0", "onnxruntime-gpu": None}])
def test_one_onnxruntime_build_is_fine(monkeypatch, capsys, installed):
    fake_distributions(monkeypatch, installed)
    code, report = run_json(capsys)
    assert code == 0 and not report["problems"], report["problems"]


def test_any_two_onnxruntime_distributions_conflict_and_two_genai_builds_warn(monkeypatch, capsys):
    fake_distributions(monkeypatch, {"onnxruntime": None, "onnxruntime-gpu": "1.22.0",
                                     "onnxruntime-directml": "1.22.0", "onnxruntime-genai": "0.9.2",
                                     "onnxruntime-genai-cuda": "0.9.2", "tensorrt-cu12": "10.13.3.9",
                                     "tensorrt-cu13": "11.4.0.106"})
    code, report = run_json(capsys)
    assert code == 1
    assert any("pip uninstall -y onnxruntime-gpu onnxruntime-directml && pip install onnxruntime-gpu" in p
               for p in report["problems"]), report["problems"]
    assert any("onnxruntime-genai and onnxruntime-genai-cuda are installed at once" in w for w in report["warnings"])
    assert any("tensorrt-cu12 and tensorrt-cu13 are installed at once" in w for w in report["warnings"])


# -- which GPU backends actually run ---------------------------------------------------------------
class ProvidersThat:
    """onnxruntime.InferenceSession where the ``runs`` providers work (the tiny model really runs, on
    the CPU, and the session reports the provider, as a working GPU provider's would) and the
    ``fails`` providers raise ``fails[provider]``, as a broken CUDA / TensorRT install does."""

    def __init__(self, real, runs=(), fails=None):
        self.real, self.runs, self.fails = real, set(runs), dict(fails or {})

    def __call__(self, model, sess_options=None, providers=None, **kwargs):
        first = providers[0] if providers else None
        if first in self.fails:
            raise RuntimeError(self.fails[first])
        if first in self.runs:  # on the CPU, without the options that forbid the CPU to a GPU provider's session
            session = self.real(model, providers=["CPUExecutionProvider"], **kwargs)
            session.get_providers = lambda: [first, "CPUExecutionProvider"]
            return session
        return self.real(model, sess_options=sess_options, providers=providers, **kwargs)


TRT_EP, CUDA_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider"
NO_NVINFER = ("[ONNXRuntimeError] : 1 : FAIL : Load model failed: libnvinfer.so.10: cannot open shared object file: "
              "No such file or directory")
OLD_DRIVER = ("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 35: CUDA driver version is insufficient for CUDA "
              "runtime version")


def backend(report, name):
    return next(b for b in report["gpu_backends"] if b["name"] == name)


def test_cuda_runs_and_tensorrt_is_listed_but_fails(monkeypatch, capsys):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [TRT_EP, CUDA_EP, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        ProvidersThat(onnxruntime.InferenceSession, runs={CUDA_EP}, fails={TRT_EP: NO_NVINFER}))
    code, report = run_json(capsys)
    cuda, trt = backend(report, CUDA_EP), backend(report, TRT_EP)
    assert cuda["state"] == "runs" and cuda["needed"], cuda
    assert trt["state"] == "fails" and "libnvinfer.so.10: cannot open shared object file" in trt["detail"], trt
    # The runtime would give the vision graph TensorRT first: a needed provider that fails is exit 1.
    problem = [p for p in report["problems"] if TRT_EP in p]
    assert code == 1 and len(problem) == 1 and "libnvinfer.so.10" in problem[0], report["problems"]
    assert "LD_LIBRARY_PATH, see docs/desktop-gpu.md" in problem[0]  # the library is missing: say where it comes from
    assert doctor.main([]) == 1
    text = capsys.readouterr().out
    assert f"{CUDA_EP:<28} listed, runs (load " in text
    assert f"{TRT_EP:<28} listed but fails: RuntimeError: {' '.join(NO_NVINFER.split())}" in text


def test_cuda_listed_but_fails_and_tensorrt_not_listed(monkeypatch, capsys):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_EP, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        ProvidersThat(onnxruntime.InferenceSession, fails={CUDA_EP: OLD_DRIVER}))
    code, report = run_json(capsys)
    assert backend(report, CUDA_EP)["state"] == "fails" and "driver version is insufficient" in backend(report, CUDA_EP)["detail"]
    assert backend(report, TRT_EP)["state"] == "not listed"
    assert code == 1
    assert doctor.main([]) == 1
    text = capsys.readouterr().out
    assert f"{CUDA_EP:<28} listed but fails: RuntimeError: {OLD_DRIVER}" in text
    assert f"{TRT_EP:<28} not listed: onnxruntime" in text and "install onnxruntime-gpu" in text


def test_gpu_providers_that_run_exit_0(monkeypatch, capsys):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [TRT_EP, CUDA_EP, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", ProvidersThat(onnxruntime.InferenceSession, runs={CUDA_EP, TRT_EP}))
    code, report = run_json(capsys)
    assert [backend(report, p)["state"] for p in (CUDA_EP, TRT_EP)] == ["runs", "runs"]
    assert code == 0, report["problems"]


class WrapperFallsBack:
    """onnxruntime 1.22's Python wrapper (the JetPack 6 wheels): a provider that fails to create a
    session is printed to stdout ("EP Error ... when using [...]") and the session retried on the
    CPU with the same options; with the CPU fallback turned off that retry fails too, and the
    wrapper raises the retry's error ``from`` the provider's."""

    def __init__(self, real, provider, error):
        self.real, self.provider, self.error = real, provider, error

    def __call__(self, model, sess_options=None, providers=None, **kwargs):
        kwargs.pop("enable_fallback", None)  # 1.22 takes **kwargs and ignores it
        if not providers or providers[0] != self.provider:
            return self.real(model, sess_options=sess_options, providers=providers, **kwargs)
        error = RuntimeError(self.error)
        print("*************** EP Error ***************")
        print(f"EP Error {error} when using {providers}")
        print("Falling back to ['CPUExecutionProvider'] and retrying.")
        print("****************************************")
        try:
            return self.real(model, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)
        except Exception as fallback_error:
            raise fallback_error from error


def test_a_provider_the_wrapper_falls_back_from_reports_the_printed_reason(monkeypatch, capsys):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [TRT_EP, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", WrapperFallsBack(onnxruntime.InferenceSession, TRT_EP, NO_NVINFER))
    code, report = run_json(capsys)  # the JSON parses: the wrapper's print did not reach stdout
    trt = backend(report, TRT_EP)
    assert trt["state"] == "fails" and trt["detail"] == f"RuntimeError: {NO_NVINFER}", trt
    assert code == 1


def test_onnxruntime_is_asked_not_to_fall_back(monkeypatch):
    import onnxruntime

    seen = []
    real = onnxruntime.InferenceSession

    def recording(model, sess_options=None, providers=None, **kwargs):
        seen.append(kwargs)
        return real(model, sess_options=sess_options, providers=providers, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    model, feeds, expected = doctor.tiny_model()
    assert doctor.run_on_provider(model, "CPUExecutionProvider", feeds, lambda out: None)["ok"]
    assert seen == [{"enable_fallback": 0}]


def test_tensorrt_python_api_builds_and_runs_a_tiny_network(monkeypatch, capsys):
    trt, cuda = install(monkeypatch, "10.3.0", ORIN)
    code, report = run_json(capsys)
    api = backend(report, "TensorRT Python API")
    assert api["state"] == "runs" and api["version"] == "10.3.0", api
    check = report["machine"]["tensorrt"]["check"]
    assert [(s["step"], s["ok"]) for s in check["steps"]] == [("import", True), ("builder", True),
                                                               ("tiny network build", True), ("engine run", True)]
    assert ("build_serialized_network", True, True) in trt.calls and ("execute_async_v3",) in trt.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 64 << 20) in trt.calls
    assert cuda.live == [] and cuda.streams == {}  # every device buffer and the stream released
    driver = backend(report, "cuda-python (CUDA driver)")
    assert driver["state"] == "works" and "1 device(s)" in driver["detail"]
    assert code == 0, report["problems"]
    assert doctor.main([]) == 0
    text = capsys.readouterr().out
    assert "TensorRT Python API          10.3.0 runs: import ok; builder ok; tiny network build ok (" in text
    assert "engine run ok (deserialized and run in " in text


@pytest.mark.parametrize("breakage, step, reason", [
    ("builder", "builder", "TypeError: pybind11::init(): factory function returned nullptr"),
    ("build", "tiny network build", "build_serialized_network returned None"),
    ("execute", "engine run", "execute_async_v3 failed"),
])
def test_tensorrt_python_api_that_fails_says_where_and_warns(monkeypatch, capsys, breakage, step, reason):
    trt, cuda = install(monkeypatch, "10.3.0", ORIN)
    if breakage == "builder":
        def no_device(logger):
            raise TypeError("pybind11::init(): factory function returned nullptr")
        monkeypatch.setattr(trt, "Builder", no_device)
    trt.build_fails = breakage == "build"
    trt.execute_fails = breakage == "execute"
    code, report = run_json(capsys)
    api = backend(report, "TensorRT Python API")
    assert api["state"] == "fails" and api["detail"].startswith(f"{step}: ") and reason in api["detail"], api
    assert cuda.live == [] and cuda.streams == {}
    # Optional for the runtime (it needs TensorRT only for a bundle's engine): a warning, exit 0.
    assert code == 0 and any("TensorRT Python API fails" in w for w in report["warnings"]), report
    assert doctor.main([]) == 0
    assert f"TensorRT Python API          10.3.0 installed but fails: {step}: " in capsys.readouterr().out


def test_tensorrt_without_cuda_python_builds_but_cannot_run(monkeypatch, capsys):
    install(monkeypatch, "10.3.0", ORIN)
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime"):
        monkeypatch.setitem(sys.modules, name, None)
    code, report = run_json(capsys)
    api = backend(report, "TensorRT Python API")
    assert api["state"] == "builds" and "engine run skipped (skipped: cuda-python is not installed" in api["detail"], api
    assert backend(report, "cuda-python (CUDA driver)")["state"] == "not installed"
    assert code == 0


def test_cuda_python_with_a_driver_too_old_says_so(monkeypatch, capsys):
    import enum

    class Error(enum.IntEnum):
        cudaErrorInsufficientDriver = 35

    _, cuda = install(monkeypatch, "10.3.0", ORIN)
    monkeypatch.setattr(cuda, "cudaGetDeviceCount", lambda: (Error.cudaErrorInsufficientDriver, 0))
    monkeypatch.setattr(cuda, "cudaDriverGetVersion", lambda: (0, 11080), raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no nvidia-smi either
    code, report = run_json(capsys)
    driver = backend(report, "cuda-python (CUDA driver)")
    assert driver["state"] == "fails" and "cudaErrorInsufficientDriver (35)" in driver["detail"], driver
    assert report["machine"]["cuda_python"]["driver"] == "11.8"
    assert code == 0 and any("cuda-python (CUDA driver) fails" in w for w in report["warnings"])


def test_a_plan_never_budgets_a_decoder_the_builder_cannot_make(capsys):
    """fp32 is built for the CPU only, fp16 for CUDA only (ftz_edge.precision.LLM_PROVIDERS)."""
    with pytest.raises(ValueError, match="an fp32 LLM is built for CPU only"):
        mb.plan_spec(llm_precision="fp32", gpu=True)
    with pytest.raises(ValueError, match="an fp16 LLM is built for CUDA only"):
        mb.plan_spec(llm_precision="fp16", gpu=False)
    code, report = run_json(capsys, "--plan", "--llm-precision", "fp32")
    row = report["plan"]["rows"][0]
    assert "gpu" not in row and row["gpu_note"] == "an fp32 LLM is built for the CPU only: not for a GPU"
    assert doctor.main(["--plan", "--llm-precision", "fp32", "--llm-precision", "int4"]) == code
    assert "an fp32 LLM is built for the CPU only" in capsys.readouterr().out
