"""Models the benchmark runs, and the files it builds from them, cached between runs.

Sizes: ``default`` is the shipped default model (ftz_edge.DEFAULT_MODEL); ``real`` builds the
public architectures from the shipped config files (ftz_edge.sizes) with random weights from a
fixed seed - latency does not depend on the weights' values. Built files (HF folders written
with ``save_pretrained``, ONNX exports, ORT GenAI decoders, GGUFs) live under
``$FTZ_EDGE_CACHE/bench`` (default ``~/.cache/ftz-edge/bench``) in folders keyed by everything
that shapes them, so a second run reuses them; every folder is written atomically
(ftz_edge.atomic), so an interrupted build leaves nothing that looks finished.

The end-to-end suite's real-size row runs a *paper-size bundle*: a real-format FtZ checkpoint
with random weights (CLIP ViT-L/14-336 + DINOv2-L/14 + Qwen2.5-0.5B,
ftz_edge.sizes.save_reference_checkpoint; ~4.2 GB, ~1 min, ~6 GB RSS) turned into a bundle by
``ftz-export``'s own ``export_bundle`` (fp16 tower + int4 LLM; ~10 min of CPU, ~11.5 GB peak
RSS): one builder for users and the bench. ``ftz-bench --e2e-bundle PATH`` measures a bundle
already exported instead, as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from ftz_edge import DEFAULT_MODEL
from ftz_edge import precision as P
from ftz_edge.atomic import atomic_folder

SEED = 0
# Bump to invalidate every cached artifact (a change in how they are built).
ARTIFACT_VERSION = 2  # 2: vision forms by export.forms.write_form (the CPU form's policy)
ANCHOR = "clip-vit-large-patch14-336"
AUGMENTERS = {"dinov2-large": "DINOv2-L/14", "dinov2-base": "DINOv2-B/14", "dinov2-small": "DINOv2-S/14"}
LLMS = {"qwen2.5-0.5b": "Qwen2.5-0.5B", "tinyllama-1.1b": "TinyLlama-1.1B"}
# The vision tower's projector maps to this LLM's width in the vision benchmark.
VISION_LLM = "qwen2.5-0.5b"
VISION_PRECISIONS = (*P.VISION_PRECISIONS, P.INT8_DYNAMIC)  # + ONNX Runtime's dynamic INT8 (the CPU form)
LLM_PRECISIONS = tuple(p for p in P.LLM_PRECISIONS if "cpu" in P.LLM_PROVIDERS[p])  # what ORT GenAI's builder makes for the CPU
CALIBRATION_IMAGES = 4
TEXT_TOKENS = 32
# The paper's model (section 4): CLIP ViT-L/14-336 anchor, DINOv2-L/14 augmenter, Qwen2.5-0.5B.
PAPER_AUGMENTER, PAPER_LLM = "dinov2-large", "qwen2.5-0.5b"
# The bundle a user gets from ``ftz-export`` by default (FP16 tower, INT4 LLM), validated on 2
# images: the validation's PyTorch fp32 runs cost seconds per image at this size.
PAPER_BUNDLE_OPTIONS = {"precision": P.FP16, "llm_precision": P.INT4, "validation_images": 2}
# The end-to-end question of the real-size row: 31 tokens in the shipped tokenizer (the paper-size
# checkpoint carries it), so the prompt is 576 image tokens + the chat template + ~32 question tokens.
E2E_QUESTION = "What shapes are in this image, and what color is each of them?"


def cache_root() -> Path:
    root = Path(os.environ.get("FTZ_EDGE_CACHE", Path.home() / ".cache" / "ftz-edge"))
    return root / "bench"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _config_text(name: str) -> str:
    from importlib import resources

    return resources.files("ftz_edge").joinpath("configs", f"{name}.json").read_text()


def default_model_digest() -> str:
    return hashlib.sha256((DEFAULT_MODEL / "ftz_weights.safetensors").read_bytes()).hexdigest()[:10]


# -- names ------------------------------------------------------------------------------------


def vision_label(size: str, augmenter: Optional[str]) -> str:
    if size == "default":
        return "default FtZ (tiny)"
    return f"CLIP-L/14-336 + {AUGMENTERS[augmenter]}"


def llm_label(size: str, llm: Optional[str]) -> str:
    return "default (tiny Qwen2)" if size == "default" else LLMS[llm]


def vision_folder(size: str, augmenter: Optional[str]) -> Path:
    if size == "default":
        return cache_root() / f"vision-default-{default_model_digest()}"
    key = _digest(ARTIFACT_VERSION, SEED, _config_text(ANCHOR), _config_text(augmenter), _config_text(VISION_LLM))
    return cache_root() / f"vision-{augmenter}-{key}"


def vision_onnx(size: str, augmenter: Optional[str], precision: str) -> Path:
    return vision_folder(size, augmenter) / precision / "vision.onnx"


def llm_folder(size: str, llm: Optional[str]) -> Path:
    if size == "default":
        return cache_root() / f"llm-default-{default_model_digest()}"
    return cache_root() / f"llm-{llm}-{_digest(ARTIFACT_VERSION, SEED, _config_text(llm))}"


def llm_hf(size: str, llm: Optional[str]) -> Path:
    return DEFAULT_MODEL / "llm" if size == "default" else llm_folder(size, llm) / "hf"


def llm_ort(size: str, llm: Optional[str], precision: str, block_size: int = P.DEFAULT_LLM_BLOCK_SIZE) -> Path:
    # "-lasthead": the decoder as ftz-export ships it (LM head on the last position, GQA inputs
    # trimmed); folders cached before that change hold the builder's raw graph and are not reused.
    block = f"-b{block_size}" if block_size != P.DEFAULT_LLM_BLOCK_SIZE else ""
    return llm_folder(size, llm) / f"ort-{precision}{block}-lasthead"


def llm_precision_label(precision: str, block_size: Optional[int] = P.DEFAULT_LLM_BLOCK_SIZE) -> str:
    """A decoder's precision as the tables show it: "int4", or "int4 b128" for a quantized decoder
    whose block size is not ftz-export's default (fp32 has none)."""
    default = block_size in (None, P.DEFAULT_LLM_BLOCK_SIZE)
    return f"{precision} b{block_size}" if precision in P.QUANTIZED_LLM and not default else precision


def is_built(path: Path) -> bool:
    return path.exists()


# -- models in PyTorch ------------------------------------------------------------------------


def load_vision(size: str, augmenter: Optional[str], kind: str = "ftz"):
    """(FtZVision in fp32 eval mode, {input name: (C, H, W)}) for a size."""
    import torch

    from ftz_edge.config import TowerConfig
    from ftz_edge.export.vision import input_shapes
    from ftz_edge.preprocess import clip_spec, dinov2_spec

    if size == "default":
        from ftz_edge.checkpoint import load_checkpoint

        model = load_checkpoint(DEFAULT_MODEL)
        vision = model.vision.float().eval()
        return vision, input_shapes(vision, model.anchor_spec, model.augmenter_spec)
    from ftz_edge.sizes import build_reference_vision

    torch.manual_seed(SEED)
    tower = TowerConfig(kind=kind, augmenter=f"facebook/{augmenter}")
    vision = build_reference_vision(tower, augmenter=augmenter, llm=VISION_LLM, device="cpu").float().eval()
    return vision, input_shapes(vision, clip_spec(336), dinov2_spec(224))


def specs(size: str):
    """(anchor spec, augmenter spec) of a size's preprocessing."""
    from ftz_edge.preprocess import ImageProcessorSpec, clip_spec, dinov2_spec

    if size == "default":
        return (ImageProcessorSpec.from_pretrained_folder(DEFAULT_MODEL / "anchor"),
                ImageProcessorSpec.from_pretrained_folder(DEFAULT_MODEL / "augmenter"))
    return clip_spec(336), dinov2_spec(224)


def calibration_samples(size: str, limit: int = CALIBRATION_IMAGES) -> list[dict]:
    """The shipped calibration images, preprocessed for ``size``, one batch-1 dict each."""
    from ftz_edge.preprocess import encoder_pixels

    images = sorted((DEFAULT_MODEL / "calibration").glob("*.png"))[:limit]
    anchor, augmenter = specs(size)
    pixels = encoder_pixels(images, anchor, augmenter)
    return [{k: v[i:i + 1] for k, v in pixels.items()} for i in range(len(images))]


# -- vision ONNX ------------------------------------------------------------------------------

def build_vision_onnx(size: str, augmenter: Optional[str], precision: str) -> list[dict]:
    """Build the tower's fp32 ONNX (if missing) and its ``precision`` variant; a "build" row."""
    from ftz_edge.bench.results import make_row

    start = time.perf_counter()
    fp32 = vision_onnx(size, augmenter, "fp32")
    built = []
    bundled = _default_bundle_vision() if size == "default" else None
    if not fp32.exists() and bundled is not None:
        with atomic_folder(fp32.parent) as tmp:  # the same export ftz-chat's bundle already holds
            shutil.copy(bundled, tmp / "vision.onnx")
        built.append("fp32 (copied from the default bundle)")
    if not fp32.exists():
        vision, shapes = load_vision(size, augmenter)
        with atomic_folder(fp32.parent) as tmp:
            from ftz_edge.export.vision import export_vision

            export_vision(vision, shapes, tmp / "vision.onnx")  # weights in vision.onnx.data when over 2 GB
        del vision
        built.append("fp32")
    target = vision_onnx(size, augmenter, precision)
    info: dict = {}
    if not target.exists():
        from ftz_edge.export.forms import write_form

        with atomic_folder(target.parent) as tmp:
            # ftz-export's own writer with its default options: the bench times the files a bundle
            # ships (int8: vision/vision.onnx of an int8 bundle; int8-dynamic: vision.cpu-int8.onnx).
            info = write_form(fp32, tmp / "vision.onnx", precision,
                              calibration_samples(size) if precision == P.INT8 else None)
        built.append(precision)
    info = {k: v for k, v in info.items() if not isinstance(v, (list, dict)) or k == "fp32_op_types"}
    return [make_row("build", size, vision_label(size, augmenter), "vision ONNX", "onnxruntime", precision,
                     note=("built " + ", ".join(built)) if built else "reused",
                     info={"seconds": round(time.perf_counter() - start, 1), "folder": str(target.parent), **info})]


def _default_bundle_vision() -> Optional[Path]:
    """The default bundle's vision graph when that bundle exists and is fp32 (ftz-chat's)."""
    from ftz_edge.cli.default_bundle import default_bundle_path

    from ftz_edge.manifest import BundleError, read_manifest

    if not (default_bundle_path() / "manifest.json").is_file():
        return None
    try:
        vision = read_manifest(default_bundle_path(), verify=False).vision
    except BundleError:  # a stale bundle (ftz-chat rebuilds it)
        return None
    return default_bundle_path() / vision.file if vision.precision == "fp32" else None


def folder_bytes(folder: Path, suffixes=(".onnx", ".data", ".onnx_data", ".bin")) -> int:
    """Bytes of the model files in a folder (graphs and their external weights)."""
    return sum(f.stat().st_size for f in Path(folder).iterdir()
               if f.is_file() and (f.suffix in suffixes or f.name.endswith(".onnx.data")))


# -- LLM folders ------------------------------------------------------------------------------


def build_llm_hf(size: str, llm: Optional[str]) -> list[dict]:
    """A real-size LLM with random weights (seeded), ``save_pretrained`` in fp32, with the default
    model's tokenizer beside it (the converters need one; its vocabulary fits in any model's)."""
    from ftz_edge.bench.results import make_row

    start = time.perf_counter()
    hf = llm_hf(size, llm)
    note = "reused"
    if not hf.exists():
        import torch
        from transformers import AutoModelForCausalLM

        from ftz_edge.sizes import reference_config

        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(reference_config(llm), dtype=torch.float32)
        with atomic_folder(hf) as tmp:
            model.save_pretrained(tmp)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(DEFAULT_MODEL / "llm" / name, tmp / name)
        note = "built"
    return [make_row("build", size, llm_label(size, llm), "HF folder (random weights)", "transformers", "fp32",
                     note=note, info={"seconds": round(time.perf_counter() - start, 1), "folder": str(hf)})]


def _embedding_table(hf: Path):
    """The input embedding table from the safetensors files, as numpy (no torch)."""
    from safetensors import safe_open

    for file in sorted(hf.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                if name.endswith("embed_tokens.weight"):
                    return f.get_tensor(name)
    raise FileNotFoundError(f"no embed_tokens.weight in {hf}")


def build_llm_ort(size: str, llm: Optional[str], precision: str,
                  block_size: int = P.DEFAULT_LLM_BLOCK_SIZE) -> list[dict]:
    """ORT GenAI's builder on the HF folder (as ftz-export does, ``exclude_embeds=true``), CPU."""
    import numpy as np

    from ftz_edge.bench.results import make_row
    from ftz_edge.export import llm as llm_export

    start = time.perf_counter()
    out = llm_ort(size, llm, precision, block_size)
    note = "reused"
    if not out.exists():
        hf = llm_hf(size, llm)
        with atomic_folder(out) as tmp:
            # The decoder exactly as ftz-export writes it (one builder for both).
            llm_export.build_decoder(hf, tmp, precision, "cpu", block_size)
            np.save(tmp / "embed_tokens.npy", _embedding_table(hf).astype(llm_export.embeddings_dtype(precision)))
        note = "built"
    return [make_row("build", size, llm_label(size, llm), "ORT GenAI decoder", "onnxruntime",
                     llm_precision_label(precision, block_size), note=note,
                     info={"seconds": round(time.perf_counter() - start, 1), "folder": str(out)})]


# -- the paper-size bundle (end to end) ----------------------------------------------------------


def paper_label(augmenter: str = PAPER_AUGMENTER, llm: str = PAPER_LLM) -> str:
    return f"FtZ CLIP-L/14-336 + {AUGMENTERS[augmenter]} + {LLMS[llm]}"


def paper_checkpoint() -> Path:
    key = _digest(ARTIFACT_VERSION, SEED, _config_text(ANCHOR), _config_text(PAPER_AUGMENTER),
                  _config_text(PAPER_LLM), default_model_digest())  # the checkpoint carries the default tokenizer
    return cache_root() / f"ckpt-paper-{key}"


def paper_bundle() -> Path:
    """Keyed by the checkpoint it comes from, the export options and the engine the export would
    pick here (TensorRT where it is importable, else ONNX)."""
    from ftz_edge.export.tensorrt import tensorrt_available

    options = dict(PAPER_BUNDLE_OPTIONS)
    key = _digest(ARTIFACT_VERSION, paper_checkpoint().name, options, tensorrt_available())
    return cache_root() / f"bundle-paper-{options['precision']}-{options['llm_precision']}-{key}"


def is_bundle(path: Path) -> bool:
    """A finished bundle whose manifest this ftz-edge reads (a stale one is rebuilt)."""
    from ftz_edge.manifest import BundleError, read_manifest

    if not (Path(path) / "manifest.json").is_file():
        return False
    try:
        read_manifest(Path(path), verify=False)
    except (BundleError, ValueError, OSError):
        return False
    return True


def is_checkpoint_folder(path: Path) -> bool:
    """An FtZ checkpoint's two files are there (checked without importing torch)."""
    return (Path(path) / "ftz_config.json").is_file() and (Path(path) / "ftz_weights.safetensors").is_file()


def build_paper_checkpoint() -> list[dict]:
    """The paper-size FtZ checkpoint with random weights (save_checkpoint writes it atomically)."""
    from ftz_edge.bench.results import make_row
    from ftz_edge.sizes import save_reference_checkpoint

    start = time.perf_counter()
    folder = paper_checkpoint()
    note = "reused"
    if not is_checkpoint_folder(folder):
        save_reference_checkpoint(folder, augmenter=PAPER_AUGMENTER, llm=PAPER_LLM, seed=SEED)
        note = "built"
    return [make_row("build", "real", paper_label(), "FtZ checkpoint (random weights)", "PyTorch", "fp32", note=note,
                     info={"seconds": round(time.perf_counter() - start, 1), "folder": str(folder)})]


def build_paper_bundle() -> list[dict]:
    """``ftz-export``'s export_bundle on the paper-size checkpoint (it writes the bundle atomically)."""
    from ftz_edge.bench.results import make_row
    from ftz_edge.export.bundle import ExportOptions, export_bundle

    start = time.perf_counter()
    out = paper_bundle()
    options = PAPER_BUNDLE_OPTIONS
    note = "reused"
    if not is_bundle(out):
        export_bundle(ExportOptions(checkpoint=str(paper_checkpoint()), out=str(out), **options))
        note = "built"
    return [make_row("build", "real", paper_label(), "bundle (ftz-export)", "ftz-export",
                     f"{options['precision']}/{options['llm_precision']}", note=note,
                     info={"seconds": round(time.perf_counter() - start, 1), "folder": str(out)})]


def bundle_checkpoint(bundle: Path) -> Optional[Path]:
    """The checkpoint a bundle was exported from (its manifest's provenance), when it is here."""
    from ftz_edge.manifest import BundleError, read_manifest

    try:
        source = read_manifest(Path(bundle), verify=False).provenance.get("checkpoint")
    except BundleError:
        return None
    return Path(source) if source and is_checkpoint_folder(Path(source)) else None


def bundle_precision(bundle: Path) -> str:
    """``vision/llm`` precisions from a bundle's manifest ("bundle" when it cannot be read)."""
    from ftz_edge.manifest import BundleError, read_manifest

    try:
        manifest = read_manifest(Path(bundle), verify=False)
    except BundleError:
        return "bundle"
    return manifest_precision(manifest)


def manifest_precision(manifest) -> str:
    """A bundle's precisions as the tables show them: "int8/int4", "int8/int4 b128"."""
    return f"{manifest.vision.precision}/{llm_precision_label(manifest.llm.precision, manifest.llm.block_size)}"


def _component_config(checkpoint: Path, name: Optional[str]) -> Optional[dict]:
    if not name:
        return None
    path = Path(name) if Path(name).is_absolute() else checkpoint / name
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("vision_config", config)  # a full CLIPModel config holds the vision one


def _same(config: Optional[dict], reference: str, keys=("hidden_size", "num_hidden_layers", "intermediate_size")) -> bool:
    ref = json.loads(_config_text(reference))
    return config is not None and all(config.get(k) == ref.get(k) for k in keys)


def e2e_label(bundle: Path, checkpoint: Optional[Path]) -> str:
    """The real-size e2e row's model: the reference architectures its checkpoint's configs match
    (read as JSON, no torch), else the bundle's folder name."""
    if checkpoint is not None:
        try:
            ftz = json.loads((Path(checkpoint) / "ftz_config.json").read_text())
            anchor = _component_config(Path(checkpoint), ftz["tower"]["anchor"])
            augmenter = _component_config(Path(checkpoint), ftz["tower"].get("augmenter"))
            llm = _component_config(Path(checkpoint), ftz["llm"])
        except (OSError, ValueError, KeyError, TypeError):
            anchor = augmenter = llm = None
        aug = next((a for a in AUGMENTERS if _same(augmenter, a)), None)
        lm = next((m for m in LLMS if _same(llm, m)), None)
        if _same(anchor, ANCHOR, ("hidden_size", "num_hidden_layers", "image_size", "patch_size")) and aug and lm:
            return paper_label(aug, lm)
    return f"FtZ bundle {Path(bundle).name}"


def default_bundle(path: Optional[str] = None) -> Path:
    """The bundle the e2e and startup suites run: ``path``, else the default model's (built once)."""
    if path:
        return Path(path)
    from ftz_edge.cli.default_bundle import ensure_default_bundle

    return ensure_default_bundle("ftz-bench")


def example() -> tuple[Path, str]:
    """The shipped default model's first example: (image, question)."""
    first = json.loads((DEFAULT_MODEL / "examples" / "examples.json").read_text())[0]
    return DEFAULT_MODEL / "examples" / first["image"], first["question"]


