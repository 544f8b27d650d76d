"""``ftz-doctor``: can this machine run an FtZ bundle, and would a planned model fit a Jetson?

    ftz-doctor                         # this machine: Python, packages, providers, GPU, TensorRT, memory
    ftz-doctor --bundle ftz-bundle     # + the bundle: manifest, engine, a real run, its memory budget
    ftz-doctor --plan                  # + a real-size FtZ model (CLIP-L/336 + DINOv2-L + Qwen2.5-0.5B)
                                       #   at int4 / int8 / fp16 against this machine and the Orin modules
    ftz-doctor --json                  # the same, machine-readable

It prints:

* Python and package versions;
* every ONNX Runtime execution provider this onnxruntime lists, and whether a tiny real inference
  succeeds on it alone (a MatMul + Add model, and with ``--bundle`` the bundle's vision graph;
  CPU fallback turned off, outputs checked): on a Jetson a provider can be listed without working
  kernels;
* the GPU (cuda-python, else ``nvidia-smi``, else a Jetson's ``/proc/device-tree/model``), its
  compute capability and free memory, and the TensorRT version (``ftz_edge.runtime.device``);
  whether the bundle's engine was built for them (its build record), and, wherever TensorRT is
  installed, whether it really deserializes and runs (the runtime's own ``TensorRTVision``);
* the providers the runtime gives the vision graph and the decoder, from the same function the
  runtime calls (``ftz_edge.runtime.vision.provider_plan``: never TensorRT for a decoder);
* the bundle's memory budget (ftz_edge.doctor.memory_budget: weights, KV cache, activations,
  overhead) against this machine and the Jetson Orin modules, with the ftz-export changes that
  would make it fit.

Exit status: 0 when everything the runtime needs works (and the bundle, if given, is intact and
fits here); 1 when something needed is missing or broken (a provider the runtime would pick fails,
the bundle fails verification, its engine claims this GPU and TensorRT but does not run, its LLM
does not run, or it does not fit this machine's memory); an engine built for another GPU or
TensorRT is a warning (the runtime falls back to the vision ONNX); 2 for bad arguments, including a --bundle that is not a bundle.
A plan never changes the exit status: it answers a question about a model not exported yet.

Torch-free (numpy, onnxruntime; tensorrt, cuda-python and psutil only if present), Python 3.10+.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ftz_edge.manifest import MANIFEST_NAME, BundleError, read_manifest
from ftz_edge.runtime import device  # GPU, Jetson, TensorRT: tensorrt and cuda-python imported only when asked
from ftz_edge.doctor import memory_budget as mb
from ftz_edge.doctor.memory_budget import fmt_bytes
from ftz_edge.runtime.vision import CUDA, TENSORRT, provider_plan, vision_file

MEMINFO = Path("/proc/meminfo")
PACKAGES = ("ftz-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "pillow", "jinja2", "onnx",
            "onnxruntime-genai", "tensorrt", "cuda-python", "psutil", "gradio", "fastapi", "uvicorn")
CPU = "CPUExecutionProvider"


class DoctorError(Exception):
    """Bad arguments (exit 2): one line, no traceback."""


# -- Python and packages --------------------------------------------------------------------------
def installed_versions(names: Sequence[str]) -> Dict[str, Optional[str]]:
    """Each distribution's installed version, None where it is not installed."""
    versions: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def python_and_packages() -> dict:
    versions = installed_versions(PACKAGES)
    notes = []
    if versions["onnxruntime"] and versions["onnxruntime-gpu"]:
        notes.append("both onnxruntime and onnxruntime-gpu are installed: they share one module and overwrite "
                     "each other; keep one (pip uninstall onnxruntime, then reinstall onnxruntime-gpu)")
    if sys.version_info < (3, 10):
        notes.append("the runtime needs Python 3.10 or newer")
    return {"python": sys.version, "executable": sys.executable, "platform": platform.platform(),
            "machine": platform.machine(), "packages": versions, "notes": notes}


# -- a tiny ONNX model, written without the onnx package (the runtime extra has none) -------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # wire type 2: length-delimited
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:  # wire type 0: varint
    return _varint(number << 3) + _varint(value)


def _value_info(name: str, shape: Sequence[int]) -> bytes:
    dims = b"".join(_field(1, _int_field(1, d)) for d in shape)  # Dimension.dim_value
    tensor_type = _int_field(1, 1) + _field(2, dims)  # elem_type FLOAT, shape
    return _field(1, name.encode()) + _field(2, _field(1, tensor_type))  # name, TypeProto.tensor_type


def _initializer(name: str, array: np.ndarray) -> bytes:
    dims = b"".join(_int_field(1, d) for d in array.shape)
    return dims + _int_field(2, 1) + _field(8, name.encode()) + _field(9, array.astype("<f4").tobytes())


def tiny_model() -> tuple[bytes, Dict[str, np.ndarray], np.ndarray]:
    """(ModelProto bytes, feeds, expected output) of ``y = x @ W + b`` (IR 8, opset 13), encoded by
    hand in protobuf's wire format so no onnx package is needed on the device."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = (_field(1, _field(1, b"x") + _field(1, b"W") + _field(2, b"xw") + _field(3, b"matmul") + _field(4, b"MatMul"))
             + _field(1, _field(1, b"xw") + _field(1, b"b") + _field(2, b"y") + _field(3, b"add") + _field(4, b"Add")))
    graph = (nodes + _field(2, b"ftz-doctor") + _field(5, _initializer("W", w)) + _field(5, _initializer("b", b))
             + _field(11, _value_info("x", x.shape)) + _field(12, _value_info("y", (2, 4))))
    model = (_int_field(1, 8) + _field(2, b"ftz-doctor") + _field(7, graph)
             + _field(8, _field(1, b"") + _int_field(2, 13)))
    return model, {"x": x}, x @ w + b


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def run_on_provider(model, provider: str, feeds: Dict[str, np.ndarray], check) -> dict:
    """Run ``model`` (bytes or a path) on ``provider`` alone; ``check(outputs)`` returns None or a problem."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failing provider is reported by us, once
    if provider != CPU:
        # Without this, ONNX Runtime quietly runs unsupported nodes on the CPU and the check proves nothing.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    result = {"provider": provider, "ok": False, "error": None, "load_ms": None, "run_ms": None}
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                       providers=[provider])
        result["load_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        if session.get_providers()[0] != provider:
            raise RuntimeError(f"the session runs on {session.get_providers()}, not {provider}")
        start = time.perf_counter()
        outputs = session.run(None, feeds)
        result["run_ms"] = round((time.perf_counter() - start) * 1e3, 2)
        problem = check(outputs)
        if problem:
            raise RuntimeError(problem)
        result["ok"] = True
    except Exception as err:  # noqa: BLE001 - every failure of a provider is a finding, not a crash
        result["error"] = _one_line(err)
    return result


def available_providers() -> List[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def needed_providers(available: Sequence[str]) -> List[str]:
    """Every provider the runtime gives a session by default (``provider_plan``, for a decoder built
    for either device): each must work."""
    needed: List[str] = []
    for built_for in ("cuda", "cpu"):
        plan = provider_plan(built_for, available=available)
        needed += [p for p in plan.vision + plan.decoder if p not in needed]
    return needed


def check_providers() -> dict:
    try:
        available = available_providers()
    except ImportError as err:
        return {"available": [], "needed": [CPU], "results": [], "error": f"onnxruntime is not importable ({err}); "
                "pip install -e '.[runtime]' (Jetson: onnxruntime-gpu from the Jetson AI Lab index)"}
    model, feeds, expected = tiny_model()

    def check(outputs):
        if outputs[0].shape != expected.shape:
            return f"output shape {outputs[0].shape}, expected {expected.shape}"
        error = float(np.max(np.abs(outputs[0] - expected)))
        return None if error < 1e-2 else f"wrong result: max abs error {error:.3g}"

    needed = needed_providers(available)
    results = []
    for provider in available:
        result = run_on_provider(model, provider, feeds, check)
        result["needed"] = provider in needed
        results.append(result)
    return {"available": available, "needed": needed, "results": results, "error": None,
            "model": "y = x @ W + b, 2x8 @ 8x4 (hand-encoded ONNX), CPU fallback off"}


# -- GPU, Jetson, TensorRT, memory ----------------------------------------------------------------
def meminfo() -> Optional[dict]:
    """Total and available RAM: psutil when installed, else /proc/meminfo."""
    try:
        import psutil

        memory = psutil.virtual_memory()
        return {"total": int(memory.total), "available": int(memory.available), "source": "psutil"}
    except ImportError:
        pass
    text = device.read_text(MEMINFO)
    if not text:
        return None
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024  # kB
    if "MemTotal" not in fields:
        return None
    return {"total": fields["MemTotal"], "available": fields.get("MemAvailable", fields.get("MemFree", 0)),
            "source": str(MEMINFO)}


def machine_info() -> dict:
    trt, why = device.import_tensorrt()
    tensorrt = {"version": getattr(trt, "__version__", None) if trt else None, "error": why}
    jetson = device.jetson_info()
    gpu = device.gpu_here(jetson)
    ram = meminfo()
    gpu_memory = device.gpu_free_memory() if gpu is not None else None
    unified = gpu is None or jetson is not None
    return {"gpu": gpu, "gpu_memory": gpu_memory, "jetson": jetson, "tensorrt": tensorrt, "ram": ram,
            "unified_memory": unified}


def this_machine_target(machine: dict) -> Optional[mb.Target]:
    ram = machine["ram"]
    if ram is None:
        return None
    gpu = machine["gpu"] is not None
    if machine["unified_memory"]:
        kind = "Jetson unified memory" if machine["jetson"] else "CPU only"
        return mb.Target(f"this machine ({kind}, RAM available)", True, ram["available"], gpu=gpu)
    free = machine["gpu_memory"]["free"] if machine["gpu_memory"] else None
    return mb.Target("this machine (GPU free memory + RAM available)", free is None, ram["available"], free, gpu=True)


# -- the bundle -----------------------------------------------------------------------------------
def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def bundle_files(bundle: Path, manifest: dict) -> dict:
    """The files whose bytes are the weights of each model (tokenizer and configs are not)."""
    vision = manifest["vision"]
    vision_onnx = bundle / vision["file"]
    onnx_files = [vision_onnx] + sorted(p for p in vision_onnx.parent.glob(vision_onnx.name + "*")
                                        if p != vision_onnx and p.suffix in (".data", ".onnx_data"))
    engine = (vision.get("tensorrt") or {}).get("file")
    llm_dir = bundle / manifest["llm"]["folder"]
    model = llm_dir / manifest["llm"]["file"]
    llm = [model] + sorted(p for p in llm_dir.glob(model.name + "*") if p != model) + [llm_dir / manifest["llm"]["embeddings"]]
    return {"vision_onnx": onnx_files, "engine": bundle / engine if engine else None, "llm": llm}


def bundle_spec(bundle: Path, manifest: dict, use_engine: bool = True) -> mb.ModelSpec:
    """A ModelSpec of a bundle: its real file sizes, its LLM's shape, and stated assumptions.
    ``use_engine=False``: the engine cannot load here, so the runtime loads the vision ONNX."""
    vision, llm, files = manifest["vision"], manifest["llm"], bundle_files(bundle, manifest)
    record = ((vision.get("tensorrt") or {}).get("record") or {}) if use_engine else {}
    if files["engine"] is not None and use_engine:
        vision_bytes = _size(files["engine"])
        vision_how = f"{files['engine'].relative_to(bundle)} (the runtime loads the engine instead of the ONNX)"
    else:
        vision_bytes = sum(_size(p) for p in files["vision_onnx"])
        vision_how = " + ".join(str(p.relative_to(bundle)) for p in files["vision_onnx"])
    decoder_files, embed_file = files["llm"][:-1], files["llm"][-1]
    genai_path = bundle / llm["folder"] / llm.get("genai_config", "genai_config.json")
    genai = json.loads(genai_path.read_text())["model"]["decoder"] if genai_path.is_file() else {}
    hidden, head_dim = llm["hidden_size"], llm["head_size"]
    past = next((i for i in llm.get("inputs", []) if i["name"].startswith("past_key_values")), None)
    kv_bytes = np.dtype(past["dtype"]).itemsize if past else (2 if llm["execution_provider"] == "cuda" else 4)
    context = min(manifest["prompt"]["max_length"], llm["context_length"])
    output_width = vision["outputs"][0]["shape"][-1]
    tokens = vision["num_image_tokens"] + 1
    anchor = mb.Encoder(tokens, output_width, mb.ASSUMED_MLP_RATIO * output_width, max(1, output_width // mb.ASSUMED_HEAD_DIM))
    augmenter = None
    specs = manifest.get("preprocess", {})
    if specs.get("augmenter"):
        ratio = (specs["augmenter"]["crop_height"] * specs["augmenter"]["crop_width"]) / \
                (specs["anchor"]["crop_height"] * specs["anchor"]["crop_width"])
        augmenter = mb.Encoder(max(1, round((tokens - 1) * ratio)) + 1, anchor.width, anchor.mlp, anchor.heads)
    heads = genai.get("num_attention_heads", hidden // head_dim)
    return mb.ModelSpec(
        label=f"bundle {bundle.name}: {vision['precision']} tower ({vision['engine']}), {llm['precision']} LLM "
              f"({llm['execution_provider']}), context {context}",
        vision_precision=vision["precision"], vision_weight_bytes=vision_bytes, vision_weight_how=vision_how,
        vision_on_gpu=files["engine"] is not None or llm["execution_provider"] == "cuda",
        llm_precision=llm["precision"], llm_provider=llm["execution_provider"],
        llm_decoder_bytes=sum(_size(p) for p in decoder_files), llm_embed_bytes=_size(embed_file),
        llm_weight_how=" + ".join(str(p.relative_to(bundle)) for p in files["llm"]) + " (the table is memory-mapped)",
        num_layers=llm["num_layers"], num_kv_heads=llm["num_kv_heads"], head_dim=head_dim, hidden=hidden, heads=heads,
        mlp=mb.ASSUMED_MLP_RATIO * hidden, vocab=llm["vocab_size"], context=context, kv_bytes_per_element=kv_bytes,
        image_tokens=vision["num_image_tokens"], anchor=anchor, augmenter=augmenter,
        fusion_points=len(vision.get("fusion_layers") or []),
        tensorrt_workspace_bytes=int(record.get("workspace_bytes") or 0),
        last_position_logits=any(o["name"] == "logits" and o["shape"][1] == 1 for o in llm.get("outputs", [])),
        lm_head_last_position=llm.get("lm_head") == "last position only",
        checkpoint=manifest.get("provenance", {}).get("checkpoint", "<your checkpoint>"),
        assumptions=[f"context {context} = min(max_length {manifest['prompt']['max_length']}, the LLM's "
                     f"context_length {llm['context_length']}), as the runtime uses it",
                     f"the bundle does not record the encoders' sizes: activations assume width {output_width} (the "
                     f"projector's output), MLP {mb.ASSUMED_MLP_RATIO}x, heads of {mb.ASSUMED_HEAD_DIM}, "
                     f"and the LLM's MLP {mb.ASSUMED_MLP_RATIO}x its width"],
    )


def _dummy_feeds(vision: dict) -> Dict[str, np.ndarray]:
    feeds = {}
    for spec in vision["inputs"]:
        shape = [1 if isinstance(d, str) else int(d) for d in spec["shape"]]
        feeds[spec["name"]] = np.zeros(shape, dtype=np.dtype(spec["dtype"]))
    return feeds


def _decoder_step(bundle: Path, manifest: dict, providers: List[str]) -> dict:
    """One real decoder step (one embedded token, empty cache) on the providers the runtime would use."""
    from ftz_edge.runtime.decoder import OnnxDecoder

    llm = manifest["llm"]
    result = {"providers": providers, "ok": False, "error": None, "ms": None, "provider": None}
    start = time.perf_counter()
    try:
        decoder = OnnxDecoder(bundle / llm["folder"], model_file=llm["file"], embeddings_file=llm["embeddings"],
                              providers=providers, min_onnxruntime=llm.get("min_onnxruntime"))
        logits, _ = decoder.forward(decoder.embed([0])[None], decoder.empty_cache())
        if logits.shape[-1] != llm["vocab_size"] or not np.isfinite(logits).all():
            raise RuntimeError(f"logits of shape {logits.shape} (vocab {llm['vocab_size']}), finite: {np.isfinite(logits).all()}")
        result.update(ok=True, provider=decoder.provider)
    except Exception as err:  # noqa: BLE001
        result["error"] = _one_line(err)
    result["ms"] = round((time.perf_counter() - start) * 1e3, 1)
    return result


def run_engine(path: Path, feeds: Dict[str, np.ndarray], check) -> dict:
    """Deserialize the engine at ``path`` and run it once on ``feeds`` through the runtime's own
    ``TensorRTVision``; ``check([output])`` returns None or a problem. Never raises."""
    from ftz_edge.runtime.vision import TensorRTVision

    result = {"ok": False, "error": None, "load_ms": None, "run_ms": None}
    engine = None
    start = time.perf_counter()
    try:
        engine = TensorRTVision(path)
        result["load_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        start = time.perf_counter()
        output = engine(feeds)
        result["run_ms"] = round((time.perf_counter() - start) * 1e3, 2)
        problem = check([output])
        if problem:
            raise RuntimeError(problem)
        result["ok"] = True
    except Exception as err:  # noqa: BLE001 - an engine that fails is a finding, not a crash
        result["error"] = _one_line(err)
    finally:
        if engine is not None:
            engine.close()
    return result


def _check_engine(bundle: Path, entry: Optional[dict], machine: dict, feeds, check, out: dict) -> Optional[dict]:
    """The bundle's TensorRT engine: its build record against this GPU and TensorRT, and, wherever
    TensorRT is installed, a real run (the record is only a claim: a file of zeros has a record too).
    ``used``: whether the runtime would run the engine (else it falls back to the vision ONNX)."""
    if not entry:
        return None
    trt_version = machine["tensorrt"]["version"]
    compatible, why = device.engine_compatible(entry.get("record") or {}, machine["gpu"], trt_version)
    result = {"file": entry["file"], "compatible": compatible, "reason": why, "record": entry.get("record"),
              "run": None, "used": compatible}
    if trt_version is not None:
        result["run"] = run_engine(bundle / entry["file"], feeds, check)
        result["used"] = result["run"]["ok"]
    fallback = "the runtime would run the vision ONNX on ONNX Runtime instead"
    if result["run"] is not None and not result["run"]["ok"] and compatible:
        out["problems"].append(f"TensorRT engine {entry['file']} does not run here although its build record says it "
                               f"was built for this GPU and TensorRT ({result['run']['error']}); {fallback}: rebuild it "
                               "on this device (ftz-export --engine trt)")
    elif not result["used"]:  # built elsewhere: slower here, not broken
        rebuild = " rebuild it on this device (ftz-export --engine trt) for TensorRT's speed" if trt_version else ""
        ran = f"; it does not run here either ({result['run']['error']})" if result["run"] else ""
        out["warnings"].append(f"TensorRT engine {entry['file']} is not usable here ({why}{ran}); "
                               f"{fallback};{rebuild}".rstrip(";"))
    elif not compatible:
        out["warnings"].append(f"TensorRT engine {entry['file']} runs here although its build record says otherwise "
                               f"({why})")
    return result


def check_bundle(bundle: Path, machine: dict, providers: dict) -> dict:
    """Manifest, engine record, a real run of the vision graph and of one decoder step, and the budget."""
    out: dict = {"path": str(bundle), "problems": [], "warnings": []}
    try:
        manifest = read_manifest(bundle, verify=True)
        out["manifest"] = f"ok: schema {manifest['schema_version']}, {len(manifest.get('files', {}))} files match their sha256"
    except BundleError as err:
        out["manifest"] = f"failed: {err}"
        out["problems"].append(str(err))
        return out
    vision, llm = manifest["vision"], manifest["llm"]
    out["vision"] = {"precision": vision["precision"], "engine": vision["engine"], "image_tokens": vision["num_image_tokens"],
                     "tower_kind": vision.get("tower_kind")}
    out["llm"] = {k: llm.get(k) for k in ("precision", "execution_provider", "num_layers", "num_kv_heads", "head_size",
                                          "context_length", "vocab_size")}

    # A real run of the bundle's own vision graph on each provider the runtime gives it (each alone,
    # CPU fallback off), and one decoder step on exactly the decoder's list: the runtime's own plan.
    plan = provider_plan(llm["execution_provider"], available=providers.get("available") or [CPU])
    out["providers"] = {"vision": plan.vision, "decoder": plan.decoder}
    feeds = _dummy_feeds(vision)
    tokens, width = vision["num_image_tokens"], vision["outputs"][0]["shape"][-1]

    def check(outputs):
        if tuple(outputs[0].shape) != (1, tokens, width):
            return f"image_embeds of shape {outputs[0].shape}, expected (1, {tokens}, {width})"
        return None if np.isfinite(outputs[0]).all() else "image_embeds are not finite"

    out["engine"] = _check_engine(bundle, vision.get("tensorrt"), machine, feeds, check, out)

    out["vision_runs"] = []
    for provider in plan.vision:
        if provider == TENSORRT:
            out["vision_runs"].append({"provider": provider, "ok": None, "error": "skipped: the TensorRT provider would "
                                       "build an engine for the whole tower (minutes); the tiny model checked it"})
            continue
        # The graph the runtime loads for this plan (an INT8 bundle's CPU form on a CPU-only plan).
        result = run_on_provider(bundle / vision_file(vision, plan.vision), provider, feeds, check)
        out["vision_runs"].append(result)
        if not result["ok"]:
            out["problems"].append(f"the bundle's vision graph fails on {provider}: {result['error']}")

    if llm["execution_provider"] != "cpu" and CUDA not in plan.decoder:
        out["warnings"].append("the LLM was built for CUDA but this onnxruntime has no CUDA provider; "
                               "it may not run on the CPU (fp16 / CUDA-only kernels)")
    out["decoder_run"] = _decoder_step(bundle, manifest, plan.decoder)
    if not out["decoder_run"]["ok"]:
        out["problems"].append(f"the bundle's LLM decoder fails: {out['decoder_run']['error']}")

    spec = bundle_spec(bundle, manifest, use_engine=bool(out["engine"] and out["engine"]["used"]))
    out["spec"] = spec
    return out


# -- budgets against targets ----------------------------------------------------------------------
def budgets_for(spec: mb.ModelSpec, machine_target: Optional[mb.Target], machine_gpu: bool) -> dict:
    here = mb.budget(spec, machine_gpu)
    fits = [mb.check_fit(spec, t) for t in ([machine_target] if machine_target else []) + list(mb.JETSON_TARGETS)]
    return {"budget": here, "fits": fits, "here": fits[0] if machine_target else None}


def run(bundle: Optional[str], plan: Optional[dict]) -> dict:
    if bundle is not None:  # a wrong path is a bad argument: say so before anything runs
        if not Path(bundle).is_dir():
            raise DoctorError(f"--bundle {bundle}: no such folder")
        if not (Path(bundle) / MANIFEST_NAME).is_file():
            raise DoctorError(f"--bundle {bundle}: not a bundle ({MANIFEST_NAME} is missing; make one with ftz-export)")
    report: dict = {"problems": [], "warnings": []}
    report["python"] = python_and_packages()
    report["warnings"] += report["python"]["notes"]
    report["providers"] = providers = check_providers()
    if providers["error"]:
        report["problems"].append(providers["error"])
    for result in providers["results"]:
        if result["needed"] and not result["ok"]:
            report["problems"].append(f"{result['provider']} is listed and the runtime would pick it, but a tiny "
                                      f"inference fails on it ({result['error']}); fix the install (onnxruntime-gpu "
                                      "for this CUDA / JetPack) or pass --provider CPUExecutionProvider to ftz-chat")
    report["machine"] = machine = machine_info()
    version = machine["tensorrt"]["version"]
    if version and (device.tensorrt_major(version) or 0) < device.MIN_TENSORRT_MAJOR:
        report["warnings"].append(f"TensorRT {version} is too old for ftz-export's engines (needs >= 10: JetPack 6+)")
    if machine["ram"] is None:
        report["warnings"].append("system memory not found (no psutil, no /proc/meminfo)")
    target = this_machine_target(machine)
    gpu_here = machine["gpu"] is not None

    if bundle is not None:
        result = check_bundle(Path(bundle), machine, providers)
        report["problems"] += result["problems"]
        report["warnings"] += result["warnings"]
        spec = result.pop("spec", None)
        if spec is not None:
            result["budgets"] = budgets_for(spec, target, gpu_here)
            here = result["budgets"]["here"]
            if here is not None and not here.fits:
                report["problems"].append(f"the bundle does not fit this machine's memory: {here.detail}")
        report["bundle"] = result

    if plan is not None:
        rows = []
        for precision in plan["llm_precisions"]:
            gpu_spec = mb.plan_spec(plan["augmenter"], plan["llm"], plan["tower_precision"], precision, plan["context"], gpu=True)
            row = {"llm_precision": precision, "gpu": budgets_for(gpu_spec, target if gpu_here else None, True)}
            if not gpu_here and target is not None:
                if precision == "fp16":
                    row["cpu_note"] = "an fp16 LLM is built for CUDA only: not for this CPU machine"
                else:
                    cpu_spec = mb.plan_spec(plan["augmenter"], plan["llm"], plan["tower_precision"], precision,
                                            plan["context"], gpu=False)
                    row["cpu"] = budgets_for(cpu_spec, target, False)
            rows.append(row)
        report["plan"] = {**plan, "rows": rows}
    report["ok"] = not report["problems"]
    return report


# -- output ---------------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, (mb.MemoryBudget, mb.Fit)):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
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
            budget = row["gpu"]["budget"]
            lines.append(f"  {budget.label} (Jetson / GPU layout):")
            _format_budget(lines, budget)
            _format_fits(lines, row["gpu"]["fits"])
            if "cpu" in row:
                lines.append(f"  the same on this CPU machine ({row['cpu']['budget'].label}): "
                             f"{fmt_bytes(row['cpu']['budget'].total)}")
                _format_fits(lines, [row["cpu"]["here"]])
            elif "cpu_note" in row:
                lines.append(f"  {row['cpu_note']}")
        lines.append("  assumptions: " + "; ".join(plan["rows"][0]["gpu"]["budget"].assumptions)
                     + f"; runtime overhead {fmt_bytes(mb.OVERHEAD_GPU)} on a GPU, {fmt_bytes(mb.OVERHEAD_CPU)} on a CPU")

    lines.append("")
    for warning in report["warnings"]:
        lines.append(f"warning: {warning}")
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    lines.append("everything the runtime needs works" if report["ok"] else
                 f"{len(report['problems'])} problem(s): see above (exit status 1)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ftz-doctor", description="Check that this machine can run FtZ bundles, and what fits where.",
        epilog="exit status: 0 everything needed works; 1 something needed is missing or broken (a provider the "
               "runtime picks, the bundle's files, engine, decoder, or its memory); 2 bad arguments")
    parser.add_argument("--bundle", help="an ftz-export bundle folder to check and budget")
    parser.add_argument("--plan", action="store_true",
                        help="budget a real-size FtZ model from the shipped configs against this machine and Jetson Orin")
    parser.add_argument("--augmenter", default="dinov2-large", choices=mb.AUGMENTERS, help="--plan: the DINOv2 size")
    parser.add_argument("--llm", default="qwen2.5-0.5b", choices=mb.LLMS, help="--plan: the LLM")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "int8"), help="--plan: vision tower precision")
    parser.add_argument("--llm-precision", action="append", choices=("int4", "int8", "fp16", "fp32"),
                        help="--plan: LLM precision (repeatable; default int4, int8 and fp16)")
    parser.add_argument("--context-length", type=int, default=2048,
                        help="--plan: context the runtime allows (FtZConfig.max_length; default 2048)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.context_length < 1:
        parser.error("--context-length must be positive")
    plan_only = {"--augmenter": args.augmenter != "dinov2-large", "--llm": args.llm != "qwen2.5-0.5b",
                 "--precision": args.precision != "fp16", "--llm-precision": bool(args.llm_precision),
                 "--context-length": args.context_length != 2048}
    if not args.plan and any(plan_only.values()):
        parser.error(f"{', '.join(k for k, v in plan_only.items() if v)} only apply with --plan")
    plan = None
    if args.plan:
        plan = {"augmenter": args.augmenter, "llm": args.llm, "tower_precision": args.precision,
                "llm_precisions": args.llm_precision or ["int4", "int8", "fp16"], "context": args.context_length}
    try:
        report = run(args.bundle, plan)
    except DoctorError as err:
        print(f"ftz-doctor: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(_jsonable(report), indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
