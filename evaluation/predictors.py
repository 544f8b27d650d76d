"""Models to evaluate: a training checkpoint (PyTorch) or an exported bundle (torch-free runtime).

Both answer greedily, one image and one question at a time, and the answer is stripped of
surrounding whitespace (as LLaVA's evaluation strips decoded outputs). The checkpoint side is
the only code of ftz-eval that imports torch, and only when a checkpoint is evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ftz_edge.config import CONFIG_NAME as CHECKPOINT_CONFIG  # stdlib only, like the manifest module
from ftz_edge.evaluation.errors import EvalDataError
from ftz_edge.manifest import MANIFEST_NAME as MANIFEST
from ftz_edge.precision import TORCH_DTYPES


@dataclass
class ModelSpec:
    label: str
    path: Path
    kind: str  # "checkpoint" or "bundle"


def detect_kind(path: Path) -> str:
    """A bundle has manifest.json at its root, a checkpoint ftz_config.json (a finished export
    is a bundle even when the checkpoint's files were copied beside it)."""
    if not path.is_dir():
        raise EvalDataError(f"model {path} does not exist" if not path.exists() else f"model {path} is not a folder")
    if (path / MANIFEST).is_file():
        return "bundle"
    if (path / CHECKPOINT_CONFIG).is_file() or _is_hf_model(path):
        return "checkpoint"
    raise EvalDataError(f"model {path} is neither an exported bundle ({MANIFEST}) nor an FtZ checkpoint "
                        f"({CHECKPOINT_CONFIG})")


def _is_hf_model(path: Path) -> bool:
    """A transformers-format FtZ folder (config.json of model_type "ftz", ftz_edge.hf): a checkpoint too."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "ftz"
    except (OSError, ValueError, AttributeError):
        return False


def parse_models(arguments: Sequence[str]) -> List[ModelSpec]:
    """``PATH`` or ``LABEL=PATH`` each; an unlabelled model is named after its folder (with #1,
    #2 appended when folders share a name). A path that exists is never split at '='."""
    specs, explicit = [], []
    for text in arguments:
        label, path = None, text
        if "=" in text and not Path(text).exists():
            label, path = text.split("=", 1)
            if not label:
                raise EvalDataError(f"--model {text!r}: the label before '=' is empty")
        path = Path(path).expanduser()
        specs.append(ModelSpec(label or path.resolve().name, path, detect_kind(path)))
        explicit.append(label is not None)
    names = [s.label for s in specs]
    for i, spec in enumerate(specs):
        if not explicit[i] and names.count(spec.label) > 1:
            spec.label = f"{spec.label}#{names[:i + 1].count(spec.label)}"
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise EvalDataError(f"--model labels must differ, got {', '.join(labels)}")
    return specs


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvalDataError(f"{path}: cannot be read as JSON ({err})") from None


def identity(spec: ModelSpec, torch_dtype: str = "fp32") -> Dict[str, Any]:
    """What the saved results say each column was: path, kind, precision, tower kind."""
    info: Dict[str, Any] = {"label": spec.label, "path": str(spec.path.resolve()), "kind": spec.kind}
    if spec.kind == "bundle":
        from ftz_edge.manifest import BundleError, read_manifest  # stdlib only

        try:
            manifest = read_manifest(spec.path, verify=False)  # the files are verified when the runtime loads them
        except BundleError as err:
            raise EvalDataError(str(err)) from None
        vision = manifest.vision
        info.update(runtime="onnxruntime" if vision.engine != "trt" else "tensorrt",
                    precision={"vision": vision.precision, "llm": manifest.llm.precision},
                    tower_kind=vision.tower_kind, source_checkpoint=manifest.provenance.get("checkpoint"))
    else:
        config = _read_json(spec.path / CHECKPOINT_CONFIG)
        info.update(runtime="pytorch", precision={"vision": torch_dtype, "llm": torch_dtype},
                    tower_kind=config.get("tower", {}).get("kind"))
    return info


def describe(info: Dict[str, Any]) -> str:
    """One line per model for the table's header rows: 'pytorch fp32' / 'onnxruntime int8 + int4'."""
    precision = info.get("precision") or {}
    vision, llm = precision.get("vision"), precision.get("llm")
    return f"{info['runtime']} {vision}" if vision == llm else f"{info['runtime']} vision {vision}, llm {llm}"


class CheckpointPredictor:
    """``FtZForCausalLM.answer`` on a loaded checkpoint (greedy)."""

    DTYPES = TORCH_DTYPES

    def __init__(self, path: Path, device: str = "auto", dtype: str = "fp32"):
        import torch  # only here: bundles and the metrics never need it

        from ftz_edge.checkpoint import load_checkpoint

        if dtype not in self.DTYPES:
            raise EvalDataError(f"torch dtype must be one of {', '.join(self.DTYPES)}, got {dtype!r}")
        self._torch = torch
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        try:
            self.model = load_checkpoint(path, dtype=torch_dtype).to(device).eval()
        except ValueError as err:  # CheckpointError and config errors name the file already
            raise EvalDataError(str(err)) from None
        self.device = device

    def __call__(self, image, prompt: str, max_new_tokens: int) -> str:
        with self._torch.inference_mode():
            return self.model.answer(image, prompt, max_new_tokens=max_new_tokens).strip()


class BundlePredictor:
    """``FtZRuntime.answer`` on an exported bundle (greedy). Its image-embedding cache is left
    on: it is exact (keyed by the preprocessed pixels), and POPE and MME ask several questions
    about each image."""

    def __init__(self, path: Path, providers: Optional[Sequence[str]] = None):
        from ftz_edge.manifest import BundleError
        from ftz_edge.runtime.engine import FtZRuntime
        from ftz_edge.runtime.generation import GenerationConfig

        self._config = GenerationConfig
        try:
            self.runtime = FtZRuntime(path, providers=providers)
        except BundleError as err:
            raise EvalDataError(str(err)) from None

    def __call__(self, image, prompt: str, max_new_tokens: int) -> str:
        return self.runtime.answer(image, prompt, self._config(max_new_tokens=max_new_tokens)).strip()


def load_predictor(spec: ModelSpec, device: str = "auto", torch_dtype: str = "fp32",
                   providers: Optional[Sequence[str]] = None):
    if spec.kind == "bundle":
        return BundlePredictor(spec.path, providers)
    return CheckpointPredictor(spec.path, device, torch_dtype)
