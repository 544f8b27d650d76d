"""``ftz-export``: an FtZ checkpoint -> one validated bundle for the on-device runtime.

Bundle layout (everything the runtime needs, nothing else)::

    manifest.json              ftz_edge.manifest: files + sha256, models, preprocessing, prompt, provenance
    README.md                  the model card (ftz_edge.model_card.bundle_card): description, parity, usage
    vision/vision.onnx         tower + projector(s), fp32 / fp16 / int8 (Q/DQ)
    vision/vision.cpu-int8.onnx  int8 only: the CPU form (dynamic int8, float parts FP32; --no-cpu-int8 skips it)
    vision/vision.engine(.json)  TensorRT engine + build record (--engine trt)
    llm/model.onnx(.data), genai_config.json, embed_tokens.npy, tokenizer.json
    reports/validation.json    parity against PyTorch (and validation.md)
    reports/int8_sensitivity.md  per-block INT8 sensitivity (--precision int8)

The bundle is assembled in a temporary folder and renamed into place only when complete, so a
failed export never leaves a folder that looks valid.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ftz_edge import DEFAULT_MODEL
from ftz_edge import precision as precision_names
from ftz_edge.atomic import DestinationError, atomic_folder, check_destination, work_folder
from ftz_edge.cli.args import DataclassOptions, OneLineParser
from ftz_edge.export.forms import DEFAULT_CALIB_METHOD
from ftz_edge import prompt as prompt_format
from ftz_edge.manifest import (
    BundleManifest, EncoderShape, EncodersSection, LLMSection, PreprocessSection, PromptSection, TensorRTEngine,
    TensorSpec, ValidationSection, VisionSection, check_replaceable, write_manifest,
)
from ftz_edge.preprocess import ANCHOR_INPUT, AUGMENTER_INPUT, ImageLoadError, encoder_pixels, load_image
from ftz_edge.model_card import bundle_card, write_card

logger = logging.getLogger("ftz_edge.export")
DEFAULT_CHECKPOINT = DEFAULT_MODEL
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class ExportError(RuntimeError):
    """Bad input or an impossible request: one clear line, nothing written."""


ENGINES = ("onnx", "trt", "auto")
LLM_PROVIDER_NAMES = ("cpu", "cuda")
CALIB_METHODS = ("minmax", "entropy", "percentile")
SENSITIVITY_MODES = ("auto", "blocks", "kinds", "off")


def _option(default, help: Optional[str] = None, choices=None, **kwargs):
    """A field of ExportOptions with its ``ftz-export`` option's help and choices (ftz_edge.cli.args)."""
    metadata = {k: v for k, v in (("help", help), ("choices", choices)) if v is not None}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclass
class ExportOptions:
    """Everything ``ftz-export`` is run with; its command line is generated from these fields
    (``main``), the help and choices from their metadata."""

    checkpoint: str = _option(str(DEFAULT_CHECKPOINT), "FtZ checkpoint folder (default: the shipped default model)")
    out: str = _option("ftz-bundle", "bundle folder to write (replaced atomically)")
    engine: str = _option("auto", "auto: TensorRT when importable and a GPU is present, else ONNX Runtime", ENGINES)
    precision: str = _option(precision_names.DEFAULT_VISION_PRECISION, "vision tower precision",
                             precision_names.VISION_PRECISIONS)
    llm_precision: str = _option(precision_names.DEFAULT_LLM_PRECISION, "LLM decoder precision",
                                 precision_names.LLM_PRECISIONS)
    # default: what the precision is built for first (ftz_edge.precision.LLM_PROVIDERS)
    llm_provider: Optional[str] = _option(None, "execution provider the LLM is built for", LLM_PROVIDER_NAMES)
    # int4/int8: weights per quantization scale. 32 (the builder's and llama.cpp Q4_0's block) keeps
    # the weights closest; 128 prefilled 1.3x and decoded 1.4-1.6x faster on a 2-core CPU (docs/export.md).
    llm_block_size: int = _option(precision_names.DEFAULT_LLM_BLOCK_SIZE, "int4/int8 LLM: weights per quantization "
                                  "scale (larger: faster, coarser)", precision_names.LLM_BLOCK_SIZES)
    # default: the shipped default model's calibration images
    calib_images: Optional[str] = _option(None, "folder of real images for INT8 calibration and validation")
    # entropy was unstable on ViTs here (README)
    calib_method: str = _option(DEFAULT_CALIB_METHOD, None, CALIB_METHODS)
    max_calib_images: int = 64
    # Parity against PyTorch runs on the first N calibration images (batch 1 and batch N): enough
    # to catch a broken graph, and bounded at the paper's size, where each image through the
    # PyTorch fp32 tower and every ONNX form costs seconds on a small CPU.
    validation_images: int = _option(8, "calibration images the parity checks run on (batch 1 and batch N)")
    # Per-block INT8 sensitivity report: "blocks" (one row per layer / module), "kinds" (one row
    # per kind of block: coarse and ~8x cheaper), "off", or "auto": blocks for graphs under
    # protobuf's 2 GB, off above (each row re-quantizes the whole graph: ~1 h for the paper-size tower).
    sensitivity: str = _option("auto", "INT8 sensitivity report: per block, per kind of block, off; auto: blocks "
                                       "under 2 GB, off above", SENSITIVITY_MODES)
    # The FtZ fusion modules stay in FP16 by default: on the shipped model they were the blocks
    # INT8 hurt most (reports/int8_sensitivity.md), and they are a small share of the FLOPs.
    int8_quantize_fusion: bool = _option(False, "quantize the FtZ fusion modules too (default: they stay in FP16)")
    # --precision int8 also writes the CPU form of the tower (ONNX Runtime dynamic INT8, float
    # parts FP32): the Q/DQ graph is TensorRT's form and the slowest INT8 form on a CPU.
    cpu_int8: bool = _option(True, "with --precision int8, skip the CPU form of the tower (vision/vision.cpu-int8.onnx: "
                                   "ONNX Runtime dynamic INT8, what a CPU-only runtime loads)")
    batch_min: int = 1
    batch_opt: int = 1
    batch_max: int = 8
    workspace_gb: float = 2.0
    timing_cache: Optional[str] = _option(None, "TensorRT timing cache file, reused across builds")
    strict: bool = _option(False, "a missed parity target is an error, not a warning")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # the same choices the command line offers
            allowed, value = f.metadata.get("choices"), getattr(self, f.name)
            if allowed is not None and not (value is None and f.default is None):
                if value not in tuple(allowed):  # the vocabulary's wording, for names and numbers alike
                    raise ExportError(f"--{f.name.replace('_', '-')} must be one of "
                                      f"{', '.join(map(str, allowed))}, got {value!r}")
        for name in ("max_calib_images", "validation_images"):
            if getattr(self, name) < 1:
                raise ExportError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def calibration_images(folder: Optional[str], limit: int) -> list[Path]:
    folder = Path(folder) if folder else DEFAULT_CHECKPOINT / "calibration"
    if not folder.is_dir():
        raise ExportError(f"calibration folder {folder} does not exist")
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    readable = []
    for path in candidates:
        try:
            load_image(path)
            readable.append(path)
        except ImageLoadError as err:
            logger.warning("skipping calibration image: %s", err)
        if len(readable) >= limit:
            break
    if not readable:
        raise ExportError(f"calibration folder {folder} has no readable images ({len(candidates)} image files tried)")
    return readable


def _pixels(model, images: list[Path]) -> dict[str, np.ndarray]:
    return encoder_pixels(images, model.anchor_spec, model.augmenter_spec)


def _check_writable(out: Path) -> None:
    # Only a previous bundle may be replaced (its manifest parses and it holds nothing else), never
    # a user's folder that happens to hold a manifest.json; a mount point cannot be renamed onto.
    try:
        check_destination(out, check_replaceable, "an ftz bundle")
    except DestinationError as err:
        raise ExportError(str(err)) from None
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot write the bundle to {out}: {err}") from None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write the bundle to {out}: {parent} is not writable")


def _eos_token_ids(model) -> list[int]:
    """The tokenizer's EOS plus the generation config's (chat models often stop on several)."""
    configured = model.llm.generation_config.eos_token_id
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return sorted({model.tokenizer.eos_token_id, *configured} - {None})


def _io_spec(path: Path) -> dict[str, tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs (``inputs``, ``outputs``): name, numpy dtype, shape (a
    dynamic axis by its name)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    def describe(values):
        return tuple(TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                                tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values)
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def _encoder_shapes(vision, shapes: dict[str, tuple[int, int, int]]) -> EncodersSection:
    """Each encoder's size as exported (ftz-doctor's memory budget reads it): tokens per image at
    the exported input size, layer width, MLP width, heads, and the layers the graph runs."""
    def shape(encoder, input_name: str, layers_run: int, registers: int = 0) -> EncoderShape:
        config = encoder.config
        _, height, width = shapes[input_name]
        mlp = getattr(config, "intermediate_size", None) or int(config.hidden_size * config.mlp_ratio)  # DINOv2: a ratio
        return EncoderShape(tokens=(height // config.patch_size) * (width // config.patch_size) + 1 + registers,
                            hidden_size=config.hidden_size, intermediate_size=mlp,
                            num_attention_heads=config.num_attention_heads, num_layers=layers_run)

    augmenter = None
    if vision.augmenter is not None:
        augmenter = shape(vision.augmenter, AUGMENTER_INPUT, vision.augmenter_depth, vision.augmenter_registers)
    return EncodersSection(anchor=shape(vision.anchor, ANCHOR_INPUT, vision.anchor_depth), augmenter=augmenter)


def _tool_versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    versions = {}
    for name in ("ftz-edge", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "tensorrt"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class _Stages:
    """Progress of the export's long stages, one line each (``[3/7] FP16 conversion ... 53 s``),
    and the stage's name on any failure inside it: the user reads *where* an export failed in
    one line (``ExportError``), not in a traceback."""

    def __init__(self, names: list[str]):
        self.names = names
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        number = self.names.index(name) + 1
        logger.info("[%d/%d] %s ...", number, len(self.names), name)
        started = time.perf_counter()
        try:
            yield
        except (ExportError, KeyboardInterrupt):
            raise
        except _OWN_ERRORS as err:  # already written for the user: keep the whole message
            raise ExportError(f"{name}: {err}") from None
        except MemoryError:
            raise ExportError(f"{name}: out of memory ({_peak_rss_gib():.1f} GiB peak RSS); close other programs "
                              "or export on a machine with more RAM") from None
        except OSError as err:
            raise ExportError(f"{name}: {err.strerror or err} ({err.filename or 'no file'}); check disk space and "
                              "permissions") from None
        except Exception as err:  # noqa: BLE001 - every library failure becomes one line naming the stage
            if os.environ.get("FTZ_DEBUG"):
                raise
            first_line = (str(err).strip().splitlines() or [""])[0][:300]
            raise ExportError(f"{name} failed: {type(err).__name__}: {first_line} "
                              "(nothing was written; FTZ_DEBUG=1 shows the traceback)") from None
        self.seconds[name] = round(time.perf_counter() - started, 1)
        logger.info("[%d/%d] %s done in %.0f s (peak RSS %.1f GiB)", number, len(self.names), name,
                    self.seconds[name], _peak_rss_gib())


def _own_errors() -> tuple[type, ...]:
    from ftz_edge.export.llm import LlmExportError
    from ftz_edge.export.tensorrt import EngineBuildError, TensorRTUnavailable

    return (LlmExportError, EngineBuildError, TensorRTUnavailable, ValueError)


_OWN_ERRORS = _own_errors()


def _peak_rss_gib() -> float:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return float("nan")
    # The LLM builder runs as a child process: its peak counts too (KiB on Linux).
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / (1 << 20)


CPU_INT8_STAGE = "INT8 CPU form (dynamic quantization)"
CPU_INT8_FILE = "vision.cpu-int8.onnx"
CPU_INT8_EVALUATED = "onnxruntime CPU int8 (cpu form)"


def _validate_cpu_int8(path: Path, torch_vision, pixels: dict[str, np.ndarray], report, target: float) -> None:
    """Rows for the CPU form at batch 1 and the full batch against PyTorch fp32, run as the
    runtime runs it (ORT CPU provider, its optimizer on: the integer kernels)."""
    import torch

    from ftz_edge.export.quantize import compare, cpu_session

    with torch.no_grad():
        reference = torch_vision.float()(*[torch.from_numpy(v) for v in pixels.values()]).numpy()
    session = cpu_session(path, optimize=True)
    batch = next(iter(pixels.values())).shape[0]
    for size in sorted({1, batch}):
        exported = session.run(None, {name: value[:size] for name, value in pixels.items()})[0]
        result = compare(exported, reference[:size])
        row = {"precision": precision_names.INT8, "evaluated": CPU_INT8_EVALUATED, "batch": size, "cosine": result["cosine"],
               "max_abs": result["max_abs"], "target": target, "ok": result["cosine"] >= target}
        report.vision.append(row)
        if not row["ok"]:
            report.warnings.append(f"vision int8 cpu form batch {size}: cosine {result['cosine']:.6f} is below the "
                                   f"target {target} (max abs error {result['max_abs']:.3e})")


def export_bundle(options: ExportOptions) -> Path:
    # Heavy imports here, so `ftz-export --help` is quick.
    import onnx

    from ftz_edge.checkpoint import CheckpointError, load_checkpoint
    from ftz_edge.encoders import ComponentLoadError
    from ftz_edge.export import llm as llm_export
    from ftz_edge.export import forms, onnx_io, quantize, tensorrt
    from ftz_edge.export.validate import VISION_TARGETS, ValidationReport, validate_llm, validate_vision
    from ftz_edge.export.vision import export_vision, input_shapes, layers_in_graph
    from ftz_edge.runtime.decoder import OnnxDecoder

    out = Path(options.out)
    _check_writable(out)
    engine, reason = tensorrt.pick_engine(options.engine)  # raises TensorRTUnavailable for trt without TensorRT
    logger.info("engine: %s (%s)", engine, reason)
    llm_provider = options.llm_provider or llm_export.default_provider(options.llm_precision)
    try:
        llm_export.check_target(options.llm_precision, llm_provider)
    except ValueError as err:
        raise ExportError(str(err)) from None
    images = calibration_images(options.calib_images, options.max_calib_images)
    try:
        model = load_checkpoint(options.checkpoint).eval()
    except (CheckpointError, ComponentLoadError, FileNotFoundError) as err:
        raise ExportError(f"cannot load checkpoint {options.checkpoint}: {err}") from None
    model.float()
    pixels = _pixels(model, images)
    report = ValidationReport()
    started = time.perf_counter()

    fp32, fp16, int8 = precision_names.VISION_PRECISIONS
    stage = _Stages(["tower export (fp32 ONNX)", {fp32: "tower copy", fp16: "FP16 conversion",
                                                  int8: "INT8 calibration and quantization"}[options.precision],
                     *(["INT8 sensitivity report"] if options.precision == int8 else []),
                     *([CPU_INT8_STAGE] if options.precision == int8 and options.cpu_int8 else []), "tower validation",
                     *(["TensorRT engine build and check"] if engine == "trt" else []),
                     f"LLM build ({options.llm_precision}, {llm_provider})", "LLM validation"])
    with atomic_folder(out, check_replaceable, "an ftz bundle") as bundle, work_folder("ftz-export-") as work:
        (bundle / "vision").mkdir()
        (bundle / "reports").mkdir()
        shapes = input_shapes(model.vision, model.anchor_spec, model.augmenter_spec)
        with stage("tower export (fp32 ONNX)"):
            fp32_path = export_vision(model.vision, shapes, work / "vision.fp32.onnx")
            present = layers_in_graph(onnx.load(str(fp32_path), load_external_data=False))
        vision_path = bundle / "vision" / "vision.onnx"
        precision_info: dict = {}
        cpu_path: Optional[Path] = None
        cpu_info: Optional[dict] = None
        if options.precision == fp32:
            with stage("tower copy"):
                onnx_io.copy(fp32_path, vision_path)  # with its weights file, when it has one
        elif options.precision == fp16:
            with stage("FP16 conversion"):
                precision_info = forms.write_form(fp32_path, vision_path, fp16)
        else:
            calibration = [{k: v[i:i + 1] for k, v in pixels.items()} for i in range(len(images))]
            policy = forms.int8_policy(options.int8_quantize_fusion)
            with stage("INT8 calibration and quantization"):
                precision_info = forms.write_form(fp32_path, vision_path, int8, calibration, options.calib_method,
                                                  options.int8_quantize_fusion)
            with stage("INT8 sensitivity report"):
                granularity = options.sensitivity
                if granularity == "auto":
                    granularity = "off" if onnx_io.is_large(onnx_io.total_bytes(fp32_path)) else "blocks"
                    if granularity == "off":
                        logger.info("skipped for a graph over 2 GB (it re-quantizes the graph once per block); "
                                    "--sensitivity kinds gives a coarse one")
                if granularity != "off":
                    rows = quantize.sensitivity_report(fp32_path, calibration, calibration[:options.validation_images],
                                                       policy=policy, granularity=granularity)
                    (bundle / "reports" / "int8_sensitivity.json").write_text(json.dumps(rows, indent=2) + "\n")
                    (bundle / "reports" / "int8_sensitivity.md").write_text(quantize.format_sensitivity(rows) + "\n")
            if options.cpu_int8:
                with stage(CPU_INT8_STAGE):
                    cpu_path = bundle / "vision" / CPU_INT8_FILE
                    cpu_info = forms.write_form(fp32_path, cpu_path, forms.CPU_INT8,
                                                quantize_fusion=options.int8_quantize_fusion)
        with stage("tower validation"):
            checked = {name: value[:options.validation_images] for name, value in pixels.items()}
            validate_vision(vision_path, model.vision, checked, options.precision, report)
            if cpu_path is not None:
                _validate_cpu_int8(cpu_path, model.vision, checked, report, VISION_TARGETS[int8])

        engine_entry = None
        if engine == "trt":
            with stage("TensorRT engine build and check"):
                spec = tensorrt.EngineBuildSpec(
                    onnx_path=vision_path, engine_path=bundle / "vision" / "vision.engine", precision=options.precision,
                    input_shapes=shapes, batch_min=options.batch_min, batch_opt=options.batch_opt,
                    batch_max=options.batch_max, workspace_bytes=int(options.workspace_gb * (1 << 30)),
                    timing_cache_path=Path(options.timing_cache) if options.timing_cache else None,
                )
                record = tensorrt.build_engine(spec)
                engine_entry = TensorRTEngine(file="vision/vision.engine", record=record.to_dict())
                # The engine itself, against onnxruntime fp32 on the same images: TensorRT 10.3
                # (JetPack 6) has given wrong FP16 ViT results (NVIDIA/TensorRT#4419, #4330).
                row = tensorrt.check_engine(spec.engine_path, fp32_path, checked, options.precision,
                                            target=VISION_TARGETS[options.precision])
                report.vision.append(row)
                if row["ok"] is False:
                    report.warnings.append(f"TensorRT engine: cosine {row['cosine']:.6f} against onnxruntime fp32 is "
                                           f"below the {options.precision} target {row['target']}")

        with stage(f"LLM build ({options.llm_precision}, {llm_provider})"):
            llm_info = llm_export.export_llm(model, bundle / "llm", options.llm_precision, llm_provider,
                                             options.llm_block_size)
        eos_ids = _eos_token_ids(model)
        with stage("LLM validation"):
            if llm_provider == "cpu":
                decoder = OnnxDecoder(bundle / "llm")
                validate_llm(decoder, model, images[0], options.llm_precision, report, eos_ids)
                del decoder
            else:
                report.llm = {"precision": options.llm_precision,
                              "skipped": f"built for the {llm_provider} provider, which this export cannot run: not "
                                         "validated (check it on the device: ftz-doctor --bundle)"}

        (bundle / "reports" / "validation.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (bundle / "reports" / "validation.md").write_text(report.table() + "\n")
        print(report.table())
        for warning in report.warnings:
            print(f"WARNING: {warning}", file=sys.stderr)
        if options.strict and not report.passed:
            raise ExportError("validation targets missed (--strict): " + "; ".join(report.warnings))

        llm_config = model.llm.config
        manifest = BundleManifest(
            vision=VisionSection(
                file="vision/vision.onnx", engine=engine, precision=options.precision, **_io_spec(vision_path),
                num_image_tokens=model.vision.num_image_tokens, tower_kind=model.config.tower.kind,
                fusion_layers=model.vision.fusion_layers, tensorrt=engine_entry,
                cpu_file=f"vision/{CPU_INT8_FILE}" if cpu_path else None, encoders=_encoder_shapes(model.vision, shapes),
                layers_in_graph={k: sorted(v) for k, v in present.items()},
                precision_details=precision_info, cpu_precision_details=cpu_info if cpu_path else None),
            llm=LLMSection(**llm_info, folder="llm", **_io_spec(bundle / "llm" / "model.onnx"),
                           num_attention_heads=getattr(llm_config, "num_attention_heads", None),
                           intermediate_size=getattr(llm_config, "intermediate_size", None)),
            preprocess=PreprocessSection(anchor=model.anchor_spec, augmenter=model.augmenter_spec),
            prompt=PromptSection(
                chat_template=model.chat_template, bos_token=model.special_tokens["bos_token"],
                eos_token=model.special_tokens["eos_token"], eos_token_ids=eos_ids, tokenizer="llm/tokenizer.json",
                max_length=model.config.max_length, image_placeholder=prompt_format.IMAGE_PLACEHOLDER,
                image_token_id=prompt_format.IMAGE_TOKEN_ID, pad_token_id=model.tokenizer.pad_token_id,
                fallback_template_used=(model.config.prompt_format == "chat"
                                        and not getattr(model.tokenizer, "chat_template", None)),
                format=model.config.prompt_format),
            provenance={"checkpoint": str(Path(options.checkpoint).resolve()), "ftz_config": model.config.to_dict(),
                        "tools": _tool_versions(), "options": dataclasses.asdict(options),
                        "engine_choice": reason, "export_seconds": round(time.perf_counter() - started, 1),
                        "stage_seconds": stage.seconds, "peak_rss_gib": round(_peak_rss_gib(), 2),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            validation=ValidationSection(file="reports/validation.json", passed=report.passed),
        )
        # The model card (README.md) before the manifest, which lists and hashes it like every other file.
        write_card(bundle, bundle_card(manifest, report.to_dict(), _checkpoint_evaluation(options.checkpoint)))
        write_manifest(bundle, manifest)
    return out


def _checkpoint_evaluation(checkpoint: str) -> Optional[dict]:
    """The checkpoint's own evaluation record (``eval.json``, the shipped default has one), for the card."""
    try:
        data = json.loads((Path(checkpoint) / "eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def export_parser() -> tuple[argparse.ArgumentParser, DataclassOptions]:
    """ftz-export's command line: one option per ExportOptions field (``--no-cpu-int8`` for
    ``cpu_int8``), plus ``--no-sensitivity``; and what turns the parse back into ExportOptions."""
    parser = OneLineParser(prog="ftz-export", description="FtZ checkpoint -> validated ONNX / TensorRT bundle.")
    fields = DataclassOptions(ExportOptions)
    fields.add_to(parser)
    parser.add_argument("--no-sensitivity", action="store_true", help="same as --sensitivity off")
    return parser, fields


def options_from_args(fields: DataclassOptions, args: argparse.Namespace) -> ExportOptions:
    return fields.build(args, **({"sensitivity": "off"} if args.no_sensitivity else {}))


def main(argv: Optional[list[str]] = None) -> int:
    parser, fields = export_parser()
    args = parser.parse_args(argv)
    # Our own progress at INFO; the libraries' (exporter passes, quantizer steps) only if they warn.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    try:
        options = options_from_args(fields, args)
        out = export_bundle(options)
    except Exception as err:  # every failure is one line; --strict or bad input leaves nothing behind
        from ftz_edge.export.llm import LlmExportError
        from ftz_edge.export.tensorrt import EngineBuildError, TensorRTUnavailable

        if isinstance(err, (ExportError, TensorRTUnavailable, EngineBuildError, LlmExportError, ValueError)):
            print(f"ftz-export: error: {err}", file=sys.stderr)
            return 2
        if os.environ.get("FTZ_DEBUG"):
            raise
        print(f"ftz-export: internal error: {type(err).__name__}: {err} (nothing was written; FTZ_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ftz-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(summary(out))
    print(f"wrote bundle {out}")
    return 0


def summary(bundle: Path) -> str:
    """The bundle at a glance: each part's precision, files and size, and the validation verdict."""
    from ftz_edge.manifest import read_manifest

    manifest = read_manifest(bundle, verify=False)
    sizes: dict[str, int] = {}
    for relative, entry in manifest.files.items():
        part = relative.split("/", 1)[0] if "/" in relative else "."
        sizes[part] = sizes.get(part, 0) + entry.bytes
    vision, llm = manifest.vision, manifest.llm
    rows = [("vision", f"{vision.precision} ({vision.engine})", sizes.get("vision", 0)),
            ("llm", f"{llm.precision} ({llm.execution_provider})", sizes.get("llm", 0)),
            ("reports", "", sizes.get("reports", 0))]
    lines = ["| part | precision | size |", "|---|---|---:|"]
    lines += [f"| {name} | {what} | {size / 1e6:,.1f} MB |" for name, what, size in rows]
    passed = manifest.validation is not None and manifest.validation.passed
    lines.append(f"| total | validation {'passed' if passed else 'has warnings'} | "
                 f"{sum(sizes.values()) / 1e6:,.1f} MB |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
