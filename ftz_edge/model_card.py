"""Model cards (the Hugging Face Hub's ``README.md``: YAML front matter, then Markdown) for FtZ
checkpoints and exported bundles, written from what they record and nothing else.

* ``checkpoint_card(folder_or_model)``: from an FtZ checkpoint folder (``ftz_config.json``,
  the stored encoders' and LLM's ``config.json``, ``train_config.json``, ``eval.json``) or an
  ``FtZForCausalLM`` (its config and built tower, so the fusion pairs are the ones it runs);
* ``bundle_card(manifest, validation)``: from a bundle's ``BundleManifest`` and its parity report
  (``reports/validation.json``); ftz-export writes it as the bundle's ``README.md``, before the
  manifest, which lists it like every other file;
* ``write_card(folder, text)``: ``folder/README.md``, atomically.

Numbers come only from those records: a checkpoint without an evaluation record says "not
evaluated", one without a training record says so. Torch-free at import (the bundle side runs
where only the runtime is installed); a checkpoint folder whose fusion pairs must be resolved
from its encoders' depths imports ``ftz_edge.fusion`` (torch) then.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ftz_edge import DEFAULT_MODEL, __version__
from ftz_edge.atomic import atomic_write_bytes

__all__ = ["CARD_NAME", "LIBRARY_NAME", "PIPELINE_TAG", "checkpoint_card", "bundle_card", "write_card",
           "front_matter", "base_models"]

CARD_NAME = "README.md"
LIBRARY_NAME = "ftz-edge"
PIPELINE_TAG = "image-text-to-text"
PROJECT_LICENSE = "apache-2.0"  # pyproject.toml
TAGS = ["vision-language", "ftz", "multimodal", "llava"]
# Component folders a checkpoint stores its parts in (ftz_edge.checkpoint.STORED_COMPONENTS).
STORED = ("llm", "anchor", "augmenter")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

_TOWER_KINDS = {
    "ftz": "FtZ: the CLIP anchor's hidden states fused with the DINOv2 augmenter's by multi-head "
           "cross-attention (MHCA) at the fusion points below, then projected into the LLM",
    "clip": "CLIP-only baseline: the anchor's features projected into the LLM (no augmenter)",
    "mof": "Interleaved-MoF baseline: CLIP and DINOv2 patch tokens, each through its own projector, "
           "interleaved token by token",
}
_FORMATS = {
    "chat": "the LLM tokenizer's own chat template (LLaVA's \"USER: ... ASSISTANT:\" when it has none)",
    "plain": "LLaVA's / TinyLLaVA Factory's pretraining conversation: the image, then the caption",
    "llama": "TinyLLaVA Factory's \"llama\" conversation (a fixed system line, \"USER: <image>\\n... ASSISTANT:\")",
}


# -- front matter --------------------------------------------------------------------------------
def base_models(names: Mapping[str, Optional[str]]) -> list[str]:
    """The component names that are Hub ids (``owner/name``): not a stored component folder
    (``llm``, ``anchor``...), not a local path. The Hub's ``base_model`` takes only ids."""
    out = []
    for name in names.values():
        if not name or name in STORED or name.startswith((".", "/", "~")) or Path(name).exists():
            continue
        if _HUB_ID.match(name) and name not in out:
            out.append(name)
    return out


def front_matter(data: Mapping[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def _metadata(bases: list[str], extra_tags: tuple[str, ...] = ()) -> dict[str, Any]:
    meta: dict[str, Any] = {"library_name": LIBRARY_NAME,
                            # Every part trained here: the project's license. Otherwise each base model keeps its own.
                            "license": "other" if bases else PROJECT_LICENSE}
    if bases:
        meta["license_name"] = "base-model-licenses"
    meta["tags"] = TAGS + [t for t in extra_tags if t not in TAGS]
    meta["pipeline_tag"] = PIPELINE_TAG
    if bases:
        meta["base_model"] = bases
    return meta


def write_card(folder: Union[str, Path], text: str) -> Path:
    """``folder/README.md`` holding ``text``, written atomically (a reader never sees half)."""
    path = Path(folder) / CARD_NAME
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


# -- what a checkpoint records --------------------------------------------------------------------
def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _component_folder(name: Optional[str], folder: Optional[Path]) -> Optional[Path]:
    if not name:
        return None
    for candidate in ([folder / name] if folder is not None else []) + [Path(name)]:
        if candidate.is_dir():
            return candidate
    return None


def _vision_config(config: Optional[dict]) -> Optional[dict]:
    """A CLIPModel's config.json nests the vision tower's; a CLIPVisionModel's / Dinov2Model's is flat."""
    if not isinstance(config, dict):
        return None
    return config.get("vision_config") if isinstance(config.get("vision_config"), dict) else config


def _resolve_layer(index: int, total: int) -> int:  # ftz_edge.encoders.resolve_layer, without torch
    return index if index > 0 else total + 1 + index


def _facts_from_folder(folder: Path) -> dict[str, Any]:
    from ftz_edge.config import FtZConfig

    config = FtZConfig.load(folder)
    tower = config.tower
    parts: dict[str, Optional[dict]] = {}
    for role, name in (("anchor", tower.anchor), ("augmenter", tower.augmenter if tower.uses_augmenter else None),
                       ("llm", config.llm)):
        where = _component_folder(name, folder)
        raw = _read_json(where / "config.json") if where is not None else None
        parts[role] = (_vision_config(raw) if role != "llm" else raw) if isinstance(raw, dict) else None
    anchor, augmenter = parts["anchor"], parts["augmenter"]
    pairs, pairs_note = None, None
    if tower.kind == "ftz":
        if tower.fusion_layers is not None:
            pairs = [list(p) for p in tower.fusion_layers]
        elif anchor and augmenter:
            from ftz_edge import fusion

            total = anchor["num_hidden_layers"]
            if config.preset == "authors":
                pairs = fusion.authors_fusion_layers(augmenter["num_hidden_layers"], tower.num_fusion_points)
            else:
                pairs = fusion.paper_fusion_layers(tower.num_fusion_points, _resolve_layer(tower.select_layer, total),
                                                   total, augmenter["num_hidden_layers"])
            pairs = sorted(pairs)
        else:
            pairs_note = (f"{tower.num_fusion_points} points ({config.preset} preset), resolved from the encoders' "
                          "depths when the tower is built")
    tokens = None
    if anchor and "image_size" in anchor and "patch_size" in anchor:
        grid = anchor["image_size"] // anchor["patch_size"]
        tokens = grid * grid + (1 if tower.select_feature == "cls_patch" else 0)
        tokens = 2 * tokens if tower.kind == "mof" else tokens
    specs = {}
    for role in ("anchor", "augmenter"):
        where = _component_folder(getattr(tower, role) if role == "anchor" or tower.uses_augmenter else None, folder)
        if where is not None and (where / "preprocessor_config.json").is_file():
            from ftz_edge.preprocess import ImageProcessorSpec

            try:
                specs[role] = ImageProcessorSpec.from_pretrained_folder(where)
            except ValueError:
                pass
    return {"config": config.to_dict(), "parts": parts, "pairs": pairs, "pairs_note": pairs_note,
            "num_image_tokens": tokens, "specs": specs}


def _facts_from_model(model) -> dict[str, Any]:
    vision = model.vision
    parts = {"anchor": vision.anchor.config.to_dict(),
             "augmenter": vision.augmenter.config.to_dict() if vision.augmenter is not None else None,
             "llm": model.llm.config.to_dict()}
    specs = {"anchor": model.anchor_spec}
    if model.augmenter_spec is not None:
        specs["augmenter"] = model.augmenter_spec
    return {"config": model.config.to_dict(), "parts": parts,
            "pairs": [list(p) for p in vision.fusion_layers] if model.config.tower.kind == "ftz" else None,
            "pairs_note": None, "num_image_tokens": vision.num_image_tokens, "specs": specs}


def _records(folder: Optional[Path]) -> dict[str, Any]:
    if folder is None:
        return {}
    return {name: data for name in ("train_config", "eval")
            if (data := _read_json(folder / f"{name}.json")) is not None}


def _is_shipped_default(folder: Optional[Path]) -> bool:
    try:
        return folder is not None and folder.resolve() == DEFAULT_MODEL.resolve()
    except OSError:
        return False


# -- sections ---------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def _part_line(role: str, name: Optional[str], part: Optional[dict]) -> str:
    shown = f"`{name}`" + (" (stored in this folder)" if name in STORED else "")
    if not part:
        return f"- **{role}**: {shown}"
    sizes = [f"{k.replace('num_hidden_layers', 'layers').replace('_', ' ')} {part[k]}"
             for k in ("model_type", "num_hidden_layers", "hidden_size", "patch_size", "image_size", "vocab_size")
             if part.get(k) is not None]
    return f"- **{role}**: {shown}: " + ", ".join(sizes)


def _spec_line(role: str, spec) -> str:
    resize = (f"shortest edge {spec.resize_shortest_edge}" if spec.resize_height is None
              else f"{spec.resize_height}x{spec.resize_width}")
    return (f"- {role}: resize ({resize}, {spec.resample}), center crop {spec.crop_height}x{spec.crop_width}, "
            f"mean {list(spec.image_mean)}, std {list(spec.image_std)}")


def _description(facts: dict[str, Any]) -> list[str]:
    config, tower = facts["config"], facts["config"]["tower"]
    kind = tower["kind"]
    lines = ["## Model description", "",
             f"An FtZ vision-language model (ftz-edge {__version__}): a frozen CLIP vision encoder (the *anchor*)"
             + (", a frozen DINOv2 encoder (the *augmenter*)" if kind != "clip" else "")
             + ", an MLP projector and a causal language model; the image's tokens are spliced into the prompt "
               "where `<image>` stands.", "",
             f"- **tower kind**: `{kind}`: {_TOWER_KINDS.get(kind, kind)}",
             f"- **preset**: `{config['preset']}`"]
    if kind == "ftz":
        if facts["pairs"]:
            pairs = ", ".join(f"{a} ↔ {g}" for a, g in facts["pairs"])
            lines.append(f"- **fusion points** (anchor layer ↔ augmenter layer, 1-based layer outputs): {pairs}")
        else:
            lines.append(f"- **fusion points**: {facts['pairs_note']}")
        lines.append(f"- **fusion**: {tower['fusion_heads']} MHCA heads, `{tower['fusion_init']}` init, "
                     f"augmenter register tokens: {tower.get('augmenter_registers', 'keep')}")
    if kind == "mof":
        lines.append(f"- **augmenter features**: layer {tower['augmenter_select_layer']}")
    lines += [f"- **features**: anchor layer {tower['select_layer']}, `{tower['select_feature']}` tokens"
              + (f", {facts['num_image_tokens']} image tokens per image" if facts["num_image_tokens"] else ""),
              f"- **projector**: {config['projector_depth']}-layer GELU MLP",
              f"- **prompt format**: `{config.get('prompt_format', 'chat')}`: "
              f"{_FORMATS.get(config.get('prompt_format', 'chat'), '')}",
              f"- **context**: {config['max_length']} tokens at training",
              f"- **LLM weights**: {'trained (stored in this checkpoint)' if config['llm_trained'] else 'frozen (the base LLM)'}",
              "", "Components:", ""]
    lines.append(_part_line("anchor", tower["anchor"], facts["parts"]["anchor"]))
    if kind != "clip":
        lines.append(_part_line("augmenter", tower["augmenter"], facts["parts"]["augmenter"]))
    lines.append(_part_line("LLM", config["llm"], facts["parts"]["llm"]))
    if facts["specs"]:
        lines += ["", "Image preprocessing (`ftz_edge.preprocess`, transformers' PIL-backend numbers):", ""]
        lines += [_spec_line(role, spec) for role, spec in facts["specs"].items()]
    return lines


def _training(records: dict[str, Any], shipped: bool) -> list[str]:
    lines = ["## Training", ""]
    train, evaluation = records.get("train_config"), records.get("eval")
    settings = evaluation.get("settings") if isinstance(evaluation, dict) else None
    if not train and not settings:
        return lines + ["No training record is stored with this checkpoint (no `train_config.json`): what it "
                        "was trained on, and whether it was trained at all, is not recorded."]
    if shipped:
        lines += ["The shipped default model of ftz-edge, built by `python -m ftz_edge.training.default_model`: "
                  "tiny encoders and LLM trained from scratch on synthetic 64x64 scenes of coloured shapes and a "
                  "written character (`ftz_edge.training.synthetic`), then the two FtZ stages.", ""]
    if isinstance(settings, dict):
        lines += ["Build settings (`eval.json`):", ""]
        lines += [f"- {key}: {_fmt(value)}" for key, value in settings.items()]
        lines.append("")
    if isinstance(train, dict):
        keys = ("stage", "data_path", "image_folder", "init_from", "max_steps", "num_epochs", "global_batch_size",
                "learning_rate", "warmup_ratio", "weight_decay", "mixed_precision", "max_length", "prompt_format", "seed")
        lines += ["Last stage (`train_config.json`):", "", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(train.get(key))} |" for key in keys if key in train]
    return lines


def _accuracy_tables(evaluation: Any) -> list[str]:
    results = evaluation.get("results") if isinstance(evaluation, dict) else None
    if not isinstance(results, dict) or not results:
        return []
    lines = []
    for name, result in results.items():
        if not isinstance(result, dict):
            continue
        rows = dict(result.get("per_type") or {})
        if result.get("overall"):
            rows["**overall**"] = result["overall"]
        lines += ["", f"### {name}", "", "| question type | n | correct | accuracy | chance | majority |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {qtype} | {_fmt(row.get('n'))} | {_fmt(row.get('correct'))} | {_fmt(row.get('accuracy'))} | "
                  f"{_fmt(row.get('chance'))} | {_fmt(row.get('majority'))} |" for qtype, row in rows.items()]
    return lines


def _evaluation(records: dict[str, Any]) -> list[str]:
    lines = ["## Evaluation", ""]
    evaluation = records.get("eval")
    tables = _accuracy_tables(evaluation)
    if not tables:
        return lines + ["Not evaluated: no evaluation record (`eval.json`) is stored with this checkpoint."]
    machine = evaluation.get("machine")
    lines.append("Greedy answers on the held-out split, from `eval.json` (each table is one model trained with "
                 "the same data and steps; `clip` is the CLIP-only baseline)" + (f"; run on {machine}." if machine else "."))
    return lines + tables


def _limitations(shipped: bool, records: dict[str, Any], bases: list[str]) -> list[str]:
    lines = ["## Intended use and limitations", ""]
    if shipped:
        lines.append("- This is a tiny model trained on synthetic data: it exists to exercise the whole pipeline "
                     "(training, export, the on-device runtime) end to end. It answers questions about its own "
                     "synthetic scenes only and says nothing about the paper's results.")
    lines += ["- A checkpoint whose fusion modules and projector were never trained (built from a config with random "
              "weights, e.g. the paper-size towers made from random components for tests) is for testing only.",
              "- The model inherits the limitations and biases of its base encoders and LLM."
              + (" Each base model's license applies: " + ", ".join(f"`{b}`" for b in bases) + "." if bases else "")]
    if not records.get("eval"):
        lines.append("- It has not been evaluated: measure it on your task before relying on it.")
    return lines


def _usage_checkpoint() -> list[str]:
    return ["## How to use", "",
            "With ftz-edge installed (`pip install -e .` in its repository):", "",
            "```python",
            "from ftz_edge.checkpoint import load_checkpoint",
            "from ftz_edge.processing import FtZProcessor",
            "",
            "model = load_checkpoint(\"path/to/this/folder\").eval()",
            "print(model.answer(\"photo.png\", \"What is in the image?\"))",
            "processor = FtZProcessor.from_model(model)  # images + text -> input_ids (-200 at image positions), pixels",
            "```", "",
            "Export it for the on-device runtime and chat with the bundle:", "",
            "```bash",
            "ftz-export --checkpoint path/to/this/folder --out bundle",
            "ftz-chat --bundle bundle --image photo.png \"What is in the image?\"",
            "```"]


def checkpoint_card(source, folder: Optional[Union[str, Path]] = None) -> str:
    """The model card of an FtZ checkpoint: ``source`` is its folder, or an ``FtZForCausalLM``
    (or ``ftz_edge.hf``'s transformers model), whose records (``train_config.json``, ``eval.json``)
    are then read from ``folder`` when given: e.g. the folder ``save_checkpoint`` is writing."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        facts = _facts_from_folder(folder)
    else:
        folder = Path(folder) if folder is not None else None
        if not hasattr(source, "anchor_spec") and hasattr(source, "to_ftz"):  # ftz_edge.hf's transformers model
            source = source.to_ftz()
        facts = _facts_from_model(source)
    config = facts["config"]
    tower = config["tower"]
    bases = base_models({"anchor": tower["anchor"], "augmenter": tower["augmenter"] if tower["kind"] != "clip" else None,
                         "llm": config["llm"]})
    records = _records(folder)
    shipped = _is_shipped_default(folder)
    title = "ftz-edge default model" if shipped else "FtZ vision-language model"
    body = [f"# {title}", ""] + _description(facts) + [""] + _training(records, shipped) + [""] \
        + _evaluation(records) + [""] + _limitations(shipped, records, bases) + [""] + _usage_checkpoint()
    return front_matter(_metadata(bases, (tower["kind"],))) + "\n" + "\n".join(body) + "\n"


# -- bundles ----------------------------------------------------------------------------------------
def _validation_lines(validation: Optional[Mapping[str, Any]]) -> list[str]:
    lines = ["## Evaluation", ""]
    if not validation:
        return lines + ["Not evaluated: no validation report."]
    lines += [f"Parity of the exported graphs against the PyTorch model (`reports/validation.json`): "
              f"{'passed' if validation.get('passed') else 'has warnings'}. This checks the export, not the "
              "model's accuracy.", "",
              "| part | precision | evaluated | batch | cosine (min) | max abs error | target | ok |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for row in validation.get("vision") or []:
        ok = "-" if row.get("ok") is None else ("yes" if row["ok"] else "NO")
        lines.append(f"| vision | {row.get('precision')} | {row.get('evaluated')} | {row.get('batch')} | "
                     f"{row['cosine']:.6f} | {row['max_abs']:.3e} | {row.get('target') or '-'} | {ok} |")
    llm = validation.get("llm")
    if llm:
        if llm.get("skipped"):
            lines.append(f"| llm | {llm.get('precision')} | - | 1 | - | - | - | skipped: {llm['skipped']} |")
        else:
            lines.append(f"| llm | {llm.get('precision')} | onnxruntime | 1 | greedy tokens equal: "
                         f"{llm.get('matching_prefix')}/{llm.get('steps')} | - | "
                         f"{'identical' if llm.get('target_identical') else 'reported'} | {'yes' if llm.get('ok') else 'NO'} |")
    for warning in validation.get("warnings") or []:
        lines.append(f"\nWarning: {warning}")
    return lines


def bundle_card(manifest, validation: Optional[Mapping[str, Any]] = None,
                evaluation: Optional[Mapping[str, Any]] = None) -> str:
    """The model card of an exported bundle: ``manifest`` a ``BundleManifest`` (or its dict form),
    ``validation`` the parity report (``ValidationReport.to_dict()``, ``reports/validation.json``),
    ``evaluation`` the source checkpoint's ``eval.json`` when it has one (shown as the checkpoint's
    accuracy, in PyTorch)."""
    data = manifest if isinstance(manifest, Mapping) else manifest.to_dict()
    vision, llm, prompt, preprocess = data["vision"], data["llm"], data["prompt"], data.get("preprocess") or {}
    provenance = data.get("provenance") or {}
    config = provenance.get("ftz_config") or {}
    tower = config.get("tower") or {}
    kind = vision.get("tower_kind") or tower.get("kind") or "ftz"
    bases = base_models({"anchor": tower.get("anchor"), "augmenter": tower.get("augmenter") if kind != "clip" else None,
                         "llm": config.get("llm")})
    checkpoint = provenance.get("checkpoint")
    shipped = bool(checkpoint) and _is_shipped_default(Path(checkpoint))
    title = "ftz-edge default model (bundle)" if shipped else "FtZ vision-language model (bundle)"
    lines = [f"# {title}", "",
             "An on-device bundle written by `ftz-export`: the FtZ vision tower and projector as ONNX"
             + (" (and a TensorRT engine)" if vision.get("tensorrt") else "")
             + ", the LLM decoder as ONNX (ONNX Runtime GenAI's builder), the tokenizer, the preprocessing and "
               "prompt settings, every file listed with its sha256 in `manifest.json`.", "",
             "## Model description", "",
             f"- **tower kind**: `{kind}`: {_TOWER_KINDS.get(kind, kind)}"]
    if config.get("preset"):
        lines.append(f"- **preset**: `{config['preset']}`")
    pairs = vision.get("fusion_layers")
    if kind == "ftz" and pairs:
        lines.append("- **fusion points** (anchor layer ↔ augmenter layer): " + ", ".join(f"{a} ↔ {g}" for a, g in pairs))
    lines += [f"- **image tokens**: {vision['num_image_tokens']} per image",
              f"- **vision graph**: `{vision['file']}`, {vision['precision']}, engine {vision['engine']}"
              + (f"; CPU form `{vision['cpu_file']}`" if vision.get("cpu_file") else ""),
              f"- **LLM**: {llm['precision']} for the {llm['execution_provider']} provider, {llm['num_layers']} layers, "
              f"width {llm['hidden_size']}, vocabulary {llm['vocab_size']}, context {llm['context_length']} tokens",
              f"- **prompt format**: `{prompt.get('format') or 'chat'}`: {_FORMATS.get(prompt.get('format') or 'chat', '')}"]
    encoders = vision.get("encoders") or {}
    for role in ("anchor", "augmenter"):
        shape = encoders.get(role)
        if shape:
            lines.append(f"- **{role}**: {shape['num_layers']} layers run, width {shape['hidden_size']}, "
                         f"{shape['tokens']} tokens")
    for role in ("anchor", "augmenter"):
        spec = preprocess.get(role)
        if spec:
            lines.append(f"- **{role} preprocessing**: crop {spec['crop_height']}x{spec['crop_width']}, "
                         f"mean {list(spec['image_mean'])}, std {list(spec['image_std'])}")
    if bases:
        lines.append("- **base models**: " + ", ".join(f"`{b}`" for b in bases))
    if checkpoint:
        lines.append(f"- **exported from**: `{checkpoint}`"
                     + (f" on {provenance['created']}" if provenance.get("created") else ""))
    lines += [""] + _validation_lines(validation)
    tables = _accuracy_tables(evaluation)
    if tables:
        lines += ["", "Accuracy of the source checkpoint in PyTorch (its `eval.json`; the bundle's parity is above):"]
        lines += tables
    lines += [""] + _limitations(shipped, {"eval": evaluation} if tables else {}, bases)
    lines += ["- The ONNX and TensorRT parts are checked against PyTorch on the export machine only; "
              "`ftz-doctor --bundle` checks them on the device.",
              "", "## How to use", "", "```bash",
              "ftz-chat --bundle path/to/this/folder --image photo.png \"What is in the image?\"",
              "ftz-serve --bundle path/to/this/folder   # OpenAI-compatible API",
              "```", "", "```python", "from ftz_edge.runtime.engine import FtZRuntime", "",
              "runtime = FtZRuntime(\"path/to/this/folder\")",
              "print(runtime.answer(\"photo.png\", \"What is in the image?\"))", "```"]
    return front_matter(_metadata(bases, (kind, "onnx"))) + "\n" + "\n".join(lines) + "\n"
