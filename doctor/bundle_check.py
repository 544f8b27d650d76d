"""ftz-doctor's check of one bundle: its manifest and files, its TensorRT engine (build record and
a real run), a real run of its vision graph on each provider the runtime would give it, one real
decoder step, and its memory spec (ftz_edge.doctor.memory_budget) from the manifest and the real
file sizes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ftz_edge.doctor import memory_budget as mb
from ftz_edge.doctor.probes import CPU, one_line, run_on_provider
from ftz_edge.manifest import BundleError, BundleManifest, EncoderShape, TensorRTEngine, VisionSection, read_manifest
from ftz_edge.runtime import device
from ftz_edge.runtime.vision import CUDA, TENSORRT, provider_plan, vision_file


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def bundle_files(bundle: Path, manifest: BundleManifest) -> dict:
    """The files whose bytes are the weights of each model (tokenizer and configs are not)."""
    vision, llm = manifest.vision, manifest.llm
    vision_onnx = bundle / vision.file
    onnx_files = [vision_onnx] + sorted(p for p in vision_onnx.parent.glob(vision_onnx.name + "*")
                                        if p != vision_onnx and p.suffix in (".data", ".onnx_data"))
    llm_dir = bundle / llm.folder
    model = llm_dir / llm.file
    weights = [model] + sorted(p for p in llm_dir.glob(model.name + "*") if p != model) + [llm_dir / llm.embeddings]
    return {"vision_onnx": onnx_files, "engine": bundle / vision.tensorrt.file if vision.tensorrt else None,
            "llm": weights}


def _encoder(shape: EncoderShape) -> mb.Encoder:
    return mb.Encoder(shape.tokens, shape.hidden_size, shape.intermediate_size, shape.num_attention_heads)


def _encoders(manifest: BundleManifest, assumptions: List[str]) -> Tuple[mb.Encoder, Optional[mb.Encoder]]:
    """The encoders as the manifest records them (ftz-export since ftz-edge 0.1); for an older
    bundle, today's assumptions, stated in ``assumptions``."""
    recorded = manifest.vision.encoders
    if recorded is not None:
        return _encoder(recorded.anchor), _encoder(recorded.augmenter) if recorded.augmenter else None
    vision, preprocess = manifest.vision, manifest.preprocess
    width = vision.outputs[0].shape[-1]
    width = width if isinstance(width, int) else manifest.llm.hidden_size
    tokens = vision.num_image_tokens + 1
    anchor = mb.Encoder(tokens, width, mb.ASSUMED_MLP_RATIO * width, max(1, width // mb.ASSUMED_HEAD_DIM))
    augmenter = None
    if preprocess.augmenter is not None:
        ratio = (preprocess.augmenter.crop_height * preprocess.augmenter.crop_width) / \
                (preprocess.anchor.crop_height * preprocess.anchor.crop_width)
        augmenter = mb.Encoder(max(1, round((tokens - 1) * ratio)) + 1, anchor.width, anchor.mlp, anchor.heads)
    assumptions.append(f"the bundle does not record the encoders' sizes (exported before ftz-export recorded "
                       f"vision.encoders): activations assume width {width} (the projector's output), MLP "
                       f"{mb.ASSUMED_MLP_RATIO}x, heads of {mb.ASSUMED_HEAD_DIM}")
    return anchor, augmenter


def bundle_spec(bundle: Path, manifest: BundleManifest, use_engine: bool = True) -> mb.ModelSpec:
    """A ModelSpec of a bundle: its real file sizes, its LLM's and encoders' shapes as the manifest
    records them, and stated assumptions where it does not (older bundles).
    ``use_engine=False``: the engine cannot load here, so the runtime loads the vision ONNX."""
    vision, llm, files = manifest.vision, manifest.llm, bundle_files(bundle, manifest)
    record = (vision.tensorrt.record or {}) if use_engine and vision.tensorrt is not None else {}
    if files["engine"] is not None and use_engine:
        vision_bytes = _size(files["engine"])
        vision_how = f"{files['engine'].relative_to(bundle)} (the runtime loads the engine instead of the ONNX)"
    else:
        vision_bytes = sum(_size(p) for p in files["vision_onnx"])
        vision_how = " + ".join(str(p.relative_to(bundle)) for p in files["vision_onnx"])
    decoder_files, embed_file = files["llm"][:-1], files["llm"][-1]
    hidden, head_dim = llm.hidden_size, llm.head_size
    past = next((i for i in llm.inputs or () if i.name.startswith("past_key_values")), None)
    kv_bytes = np.dtype(past.dtype).itemsize if past else (2 if llm.execution_provider == "cuda" else 4)
    context = min(manifest.prompt.max_length, llm.context_length)
    assumptions = [f"context {context} = min(max_length {manifest.prompt.max_length}, the LLM's "
                   f"context_length {llm.context_length}), as the runtime uses it"]
    anchor, augmenter = _encoders(manifest, assumptions)
    heads = llm.num_attention_heads
    if heads is None:  # an older bundle: the builder's genai_config.json says it
        genai_path = bundle / llm.folder / (llm.genai_config or "genai_config.json")
        genai = json.loads(genai_path.read_text())["model"]["decoder"] if genai_path.is_file() else {}
        heads = genai.get("num_attention_heads", hidden // head_dim)
    mlp = llm.intermediate_size
    if mlp is None:
        mlp = mb.ASSUMED_MLP_RATIO * hidden
        assumptions.append(f"the bundle does not record the LLM's MLP width: assumed {mb.ASSUMED_MLP_RATIO}x its width")
    return mb.ModelSpec(
        label=f"bundle {bundle.name}: {vision.precision} tower ({vision.engine}), {llm.precision} LLM "
              f"({llm.execution_provider}), context {context}",
        vision_precision=vision.precision, vision_weight_bytes=vision_bytes, vision_weight_how=vision_how,
        vision_on_gpu=files["engine"] is not None or llm.execution_provider == "cuda",
        llm_precision=llm.precision, llm_provider=llm.execution_provider,
        llm_decoder_bytes=sum(_size(p) for p in decoder_files), llm_embed_bytes=_size(embed_file),
        llm_weight_how=" + ".join(str(p.relative_to(bundle)) for p in files["llm"]) + " (the table is memory-mapped)",
        num_layers=llm.num_layers, num_kv_heads=llm.num_kv_heads, head_dim=head_dim, hidden=hidden, heads=heads,
        mlp=mlp, vocab=llm.vocab_size, context=context, kv_bytes_per_element=kv_bytes,
        image_tokens=vision.num_image_tokens, anchor=anchor, augmenter=augmenter,
        fusion_points=len(vision.fusion_layers or ()),
        tensorrt_workspace_bytes=int(record.get("workspace_bytes") or 0),
        last_position_logits=any(o.name == "logits" and len(o.shape) > 1 and o.shape[1] == 1 for o in llm.outputs or ()),
        lm_head_last_position=llm.lm_head == "last position only",
        checkpoint=manifest.provenance.get("checkpoint", "<your checkpoint>"),
        assumptions=assumptions,
    )


def _dummy_feeds(vision: VisionSection) -> Dict[str, np.ndarray]:
    feeds = {}
    for spec in vision.inputs:
        shape = [1 if isinstance(d, str) else int(d) for d in spec.shape]
        feeds[spec.name] = np.zeros(shape, dtype=np.dtype(spec.dtype))
    return feeds


def _decoder_step(bundle: Path, manifest: BundleManifest, providers: List[str]) -> dict:
    """One real decoder step (one embedded token, empty cache) on the providers the runtime would use."""
    from ftz_edge.runtime.decoder import OnnxDecoder

    llm = manifest.llm
    result = {"providers": providers, "ok": False, "error": None, "ms": None, "provider": None}
    start = time.perf_counter()
    try:
        decoder = OnnxDecoder(bundle / llm.folder, model_file=llm.file, embeddings_file=llm.embeddings,
                              providers=providers, min_onnxruntime=llm.min_onnxruntime)
        logits, _ = decoder.forward(decoder.embed([0])[None], decoder.empty_cache())
        if logits.shape[-1] != llm.vocab_size or not np.isfinite(logits).all():
            raise RuntimeError(f"logits of shape {logits.shape} (vocab {llm.vocab_size}), finite: {np.isfinite(logits).all()}")
        result.update(ok=True, provider=decoder.provider)
    except Exception as err:  # noqa: BLE001
        result["error"] = one_line(err)
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
        result["error"] = one_line(err)
    finally:
        if engine is not None:
            engine.close()
    return result


def _check_engine(bundle: Path, entry: Optional[TensorRTEngine], machine: dict, feeds, check,
                  out: dict) -> Optional[dict]:
    """The bundle's TensorRT engine: its build record against this GPU and TensorRT, and, wherever
    TensorRT is installed, a real run (the record is only a claim: a file of zeros has a record too).
    ``used``: whether the runtime would run the engine (else it falls back to the vision ONNX)."""
    if entry is None:
        return None
    trt_version = machine["tensorrt"]["version"]
    compatible, why = device.engine_compatible(entry.record or {}, machine["gpu"], trt_version)
    result = {"file": entry.file, "compatible": compatible, "reason": why, "record": entry.record,
              "run": None, "used": compatible}
    if trt_version is not None:
        result["run"] = run_engine(bundle / entry.file, feeds, check)
        result["used"] = result["run"]["ok"]
    fallback = "the runtime would run the vision ONNX on ONNX Runtime instead"
    if result["run"] is not None and not result["run"]["ok"] and compatible:
        out["problems"].append(f"TensorRT engine {entry.file} does not run here although its build record says it "
                               f"was built for this GPU and TensorRT ({result['run']['error']}); {fallback}: rebuild it "
                               "on this device (ftz-export --engine trt)")
    elif not result["used"]:  # built elsewhere: slower here, not broken
        rebuild = " rebuild it on this device (ftz-export --engine trt) for TensorRT's speed" if trt_version else ""
        ran = f"; it does not run here either ({result['run']['error']})" if result["run"] else ""
        out["warnings"].append(f"TensorRT engine {entry.file} is not usable here ({why}{ran}); "
                               f"{fallback};{rebuild}".rstrip(";"))
    elif not compatible:
        out["warnings"].append(f"TensorRT engine {entry.file} runs here although its build record says otherwise "
                               f"({why})")
    return result


def check_bundle(bundle: Path, machine: dict, providers: dict) -> dict:
    """Manifest, engine record, a real run of the vision graph and of one decoder step, and the budget."""
    out: dict = {"path": str(bundle), "problems": [], "warnings": []}
    try:
        manifest = read_manifest(bundle, verify=True)
        out["manifest"] = f"ok: schema {manifest.schema_version}, {len(manifest.files)} files match their sha256"
    except BundleError as err:
        out["manifest"] = f"failed: {err}"
        out["problems"].append(str(err))
        return out
    vision, llm = manifest.vision, manifest.llm
    out["vision"] = {"precision": vision.precision, "engine": vision.engine, "image_tokens": vision.num_image_tokens,
                     "tower_kind": vision.tower_kind}
    out["llm"] = {k: getattr(llm, k) for k in ("precision", "execution_provider", "num_layers", "num_kv_heads",
                                               "head_size", "context_length", "vocab_size")}

    # A real run of the bundle's own vision graph on each provider the runtime gives it (each alone,
    # CPU fallback off), and one decoder step on exactly the decoder's list: the runtime's own plan.
    plan = provider_plan(llm.execution_provider, available=providers.get("available") or [CPU])
    out["providers"] = {"vision": plan.vision, "decoder": plan.decoder}
    feeds = _dummy_feeds(vision)
    tokens, width = vision.num_image_tokens, vision.outputs[0].shape[-1]

    def check(outputs):
        if tuple(outputs[0].shape) != (1, tokens, width):
            return f"image_embeds of shape {outputs[0].shape}, expected (1, {tokens}, {width})"
        return None if np.isfinite(outputs[0]).all() else "image_embeds are not finite"

    out["engine"] = _check_engine(bundle, vision.tensorrt, machine, feeds, check, out)

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

    if llm.execution_provider != "cpu" and CUDA not in plan.decoder:
        out["warnings"].append("the LLM was built for CUDA but this onnxruntime has no CUDA provider; "
                               "it may not run on the CPU (fp16 / CUDA-only kernels)")
    out["decoder_run"] = _decoder_step(bundle, manifest, plan.decoder)
    if not out["decoder_run"]["ok"]:
        out["problems"].append(f"the bundle's LLM decoder fails: {out['decoder_run']['error']}")

    spec = bundle_spec(bundle, manifest, use_engine=bool(out["engine"] and out["engine"]["used"]))
    out["spec"] = spec
    return out
