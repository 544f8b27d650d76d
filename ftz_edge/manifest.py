"""The bundle manifest: what an exported bundle holds, defined once, typed and torch-free.

``ftz-export`` builds a ``BundleManifest`` and writes it (``write_manifest``), the on-device
runtime, ftz-doctor, ftz-serve and ftz-bench read it back (``read_manifest``) and use its
attributes; each attribute is named exactly as its key in ``manifest.json``. ``manifest.json``
sits at the bundle's root and records:

* ``schema_version``: this module's ``SCHEMA_VERSION``; readers refuse other versions;
* ``files``: every other file of the bundle with its size and sha256 (tampering is refused);
* ``vision`` (``VisionSection``): the vision graph (file, engine, precision, inputs/outputs with
  dtypes and shapes, number of image tokens), an optional TensorRT engine with its build record,
  for an INT8 bundle an optional ``cpu_file`` (the same tower quantized for ONNX Runtime's CPU
  provider), and the encoders' layer sizes (``encoders``, what ftz-doctor's memory budget needs);
* ``llm`` (``LLMSection``): the decoder (file, precision, execution provider it was built for,
  KV-cache layout, attention heads and MLP width), the token-embedding table, context length;
* ``preprocess`` (``PreprocessSection``): the ImageProcessorSpec of each encoder (ftz_edge.preprocess);
* ``prompt`` (``PromptSection``): chat template, special tokens, EOS ids, the image placeholder and
  sentinel id (checked against ftz_edge.prompt's at load), the tokenizer file;
* ``provenance``: source checkpoint, FtZ config, tool versions, export options (free-form);
* ``validation`` (``ValidationSection``): the parity report file.

Parsing (``BundleManifest.from_dict``) is strict about every field a reader uses: any problem is
ONE ``BundleError`` naming the field. Keys a section does not define (written by another
ftz-export version) are kept in that section's ``extra`` and written back unchanged, never read.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from ftz_edge import prompt as _prompt  # stdlib only: the sentinel id and placeholder the runtime splices

if TYPE_CHECKING:  # numpy + Pillow: imported only when a preprocess section is parsed
    from ftz_edge.preprocess import ImageProcessorSpec

__all__ = [
    "SCHEMA_VERSION", "MANIFEST_NAME", "BundleError", "TensorSpec", "TensorRTEngine", "EncoderShape", "EncodersSection",
    "VisionSection", "LLMSection", "PreprocessSection", "PromptSection", "ValidationSection", "FileEntry",
    "BundleManifest", "read_manifest", "write_manifest", "verify_files", "file_table", "sha256_file",
    "check_replaceable", "is_bundle",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class BundleError(ValueError):
    """A bundle that is missing, from another schema version, incomplete, malformed or tampered with."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# -- parsing: one error naming the field ----------------------------------------------------------
class _Context:
    """The bundle a manifest belongs to (paths are checked against it) and where the manifest came from."""

    def __init__(self, bundle: Union[str, Path], source: str):
        self.bundle = Path(bundle)
        self.source = source

    def fail(self, field_name: str, problem: str):
        raise BundleError(f"{self.source}: {field_name} {problem}; re-export the bundle with ftz-export")


def _spec(kind, optional: bool = False, nullable: bool = False, absent_checked: bool = False):
    """A manifest field. ``kind``: "str", "int" (bool refused), "count" (a positive int), "bool",
    "dict", "ids" (non-empty list of ints), "io" (non-empty list of TensorSpec), "pairs" (a list
    of [int, int]), "path" (relative, inside the bundle), "llm_path" (relative to llm.folder,
    inside the bundle), "spec" (an ImageProcessorSpec), "files", a tuple of allowed strings, or a
    section class. ``optional``: may be absent or null (default None); ``nullable``: required but
    may be null; ``absent_checked``: an absent key is checked as null (its kind's own message)."""
    metadata = {"kind": kind, "optional": optional, "nullable": nullable, "absent_checked": absent_checked}
    if optional:
        return field(default=None, metadata=metadata)
    return field(metadata=metadata)


def _extra():
    return field(default_factory=dict, compare=True, repr=False, metadata={"extra": True})


class _Section:
    """from_dict / to_dict of a section from its fields' metadata (the pattern of
    ``ftz_edge.preprocess.ImageProcessorSpec``, plus path checks against the bundle)."""

    def __post_init__(self) -> None:
        # Sequences as tuples (lists from Python or JSON alike), so a section built by the exporter
        # equals the one read back from its JSON, and stays frozen.
        for f in fields(self):
            kind, value = f.metadata.get("kind"), getattr(self, f.name)
            if kind in ("ids", "io") and isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            elif kind == "pairs" and isinstance(value, (list, tuple)):
                object.__setattr__(self, f.name, tuple(tuple(p) for p in value))

    @classmethod
    def from_dict(cls, data: Any, bundle: Union[str, Path] = ".", source: str = MANIFEST_NAME,
                  prefix: Optional[str] = None):
        return cls._parse(data, _Context(bundle, source), prefix or getattr(cls, "_PREFIX", cls.__name__))

    @classmethod
    def _parse(cls, data: Any, ctx: _Context, prefix: str, top: bool = False):
        if not isinstance(data, dict):
            if data is None:
                ctx.fail(prefix, "is missing")
            ctx.fail(prefix, f"must be an object, {'not' if top else 'got'} {_kind(data)}")
        values: Dict[str, Any] = {}
        known = set()
        extra_name = None
        for f in fields(cls):
            if f.metadata.get("extra"):
                extra_name = f.name
                continue
            known.add(f.name)
            meta = f.metadata
            name = f"{prefix}.{f.name}"
            present, value = f.name in data, data.get(f.name)
            if not present and not meta["optional"] and not meta["absent_checked"]:
                ctx.fail(name, "is missing")
            if value is None and (meta["optional"] or meta["nullable"]):
                values[f.name] = None
                continue
            values[f.name] = _convert(meta["kind"], value, name, ctx, data)
        if extra_name is not None:
            values[extra_name] = {k: copy.deepcopy(v) for k, v in data.items() if k not in known}
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        extra: Dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("extra"):
                extra = value
            else:
                out[f.name] = _to_json(value)
        for key, value in extra.items():
            out.setdefault(key, copy.deepcopy(value))
        return out


def _convert(kind, value, name: str, ctx: _Context, section: dict):
    if isinstance(kind, type) and issubclass(kind, _Section):
        return kind._parse(value, ctx, name)
    if isinstance(kind, tuple):
        if value not in kind:
            ctx.fail(name, f"must be one of {', '.join(kind)}, got {value!r}")
        return value
    if kind in ("path", "llm_path"):
        base = section.get("folder") if kind == "llm_path" else None
        if kind == "llm_path" and not isinstance(base, str):
            return value  # llm.folder is checked (and reported) on its own
        _check_path(ctx, name, value, base)
        return value
    if kind == "count":
        if not _is_int(value) or value < 1:
            ctx.fail(name, f"must be a positive integer, got {value!r}")
        return value
    if kind == "int":
        if not _is_int(value):
            ctx.fail(name, f"must be an integer, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            ctx.fail(name, f"must be a string, got {_kind(value)}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            ctx.fail(name, f"must be true or false, got {value!r}")
        return value
    if kind == "dict":
        if not isinstance(value, dict):
            ctx.fail(name, f"must be an object, got {_kind(value)}")
        return copy.deepcopy(value)
    if kind == "ids":
        if not isinstance(value, list) or not value or not all(_is_int(v) for v in value):
            ctx.fail(name, f"must be a non-empty list of integers, got {value!r}")
        return tuple(value)
    if kind == "pairs":
        if not isinstance(value, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(_is_int(v) for v in p) for p in value):
            ctx.fail(name, f"must be a list of [anchor layer, augmenter layer] pairs, got {value!r:.80}")
        return tuple(tuple(p) for p in value)
    if kind == "io":
        return _parse_io(ctx, name, value)
    if kind == "spec":
        from ftz_edge.preprocess import ImageProcessorSpec  # numpy + Pillow: torch-free, loaded when needed

        if not isinstance(value, dict):
            ctx.fail(name, f"must be an object, got {_kind(value)}")
        try:
            return ImageProcessorSpec.from_dict(value)
        except (TypeError, ValueError) as err:
            ctx.fail(name, f"is not a valid ImageProcessorSpec ({err})")
    if kind == "files":
        return _parse_files(ctx, name, value)
    raise AssertionError(f"unknown manifest field kind {kind!r}")  # pragma: no cover - a bug in this module


def _to_json(value):
    if hasattr(value, "to_dict"):  # a section, TensorSpec, FileEntry, ImageProcessorSpec
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _check_path(ctx: _Context, name: str, value, base: Optional[str] = None) -> None:
    """A relative path that, joined to the bundle (and ``base`` inside it), stays inside the
    bundle after resolving ``..`` and symbolic links: a manifest cannot make the runtime read
    (or hash) a file outside its bundle."""
    if not isinstance(value, str) or not value or "\x00" in value:
        ctx.fail(name, f"must be a relative path inside the bundle, got {value!r}")
    relative = f"{base}/{value}" if base is not None else value
    if Path(relative).is_absolute() or "\\" in relative:
        ctx.fail(name, f"must be a relative path inside the bundle, got {value!r}")
    root = ctx.bundle.resolve()
    try:
        (root / relative).resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):  # outside; or a symlink loop
        ctx.fail(name, f"must stay inside the bundle, but {value!r} leads outside it")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


# -- the sections ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the exporter recorded it: a dimension is an int or a symbolic name."""

    name: str
    dtype: str
    shape: Tuple[Union[int, str], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _parse_io(ctx: _Context, name: str, value) -> Tuple[TensorSpec, ...]:
    if not isinstance(value, list) or not value:
        ctx.fail(name, f"must be a non-empty list of {{name, dtype, shape}}, got {value!r:.80}")
    out = []
    for i, entry in enumerate(value):
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("shape"), list) and entry["shape"]
              and all(isinstance(d, str) or (_is_int(d) and d >= 0) for d in entry["shape"]))
        if not ok:
            ctx.fail(f"{name}[{i}]", f"must be {{name: str, dtype: str, shape: [int or str, ...] (not empty)}}, "
                                     f"got {entry!r:.80}")
        out.append(TensorSpec(entry["name"], entry["dtype"], tuple(entry["shape"])))
    return tuple(out)


@dataclass(frozen=True)
class FileEntry:
    """A bundle file's size and sha256 (``files`` maps each POSIX relative path to one)."""

    bytes: int
    sha256: str

    def to_dict(self) -> Dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _parse_files(ctx: _Context, name: str, files) -> Dict[str, FileEntry]:
    if not isinstance(files, dict):
        ctx.fail(name, "is missing" if files is None else f"must be an object, got {_kind(files)}")
    out = {}
    for relative, entry in files.items():
        _check_path(ctx, f"{name}[{relative!r}]", relative)
        if not (isinstance(entry, dict) and _is_int(entry.get("bytes")) and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            ctx.fail(f"{name}[{relative!r}]", f"must be {{bytes: int, sha256: 64 hex digits}}, got {entry!r:.80}")
        out[relative] = FileEntry(entry["bytes"], entry["sha256"])
    return out


@dataclass(frozen=True)
class TensorRTEngine(_Section):
    """``vision.tensorrt``: the serialized engine and its build record (GPU, TensorRT version,
    profile, workspace: ftz_edge.export.tensorrt.BuildRecord.to_dict)."""

    file: str = _spec("path", absent_checked=True)
    record: Optional[Dict[str, Any]] = _spec("dict", optional=True)
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class EncoderShape(_Section):
    """One ViT encoder of the exported tower as far as its activations go (ftz-doctor's memory
    budget): tokens per image at the exported input size, layer width, MLP width, attention heads,
    and ``num_layers``: the layers the exported graph runs (pruned layers left out)."""

    tokens: int = _spec("count")
    hidden_size: int = _spec("count")
    intermediate_size: int = _spec("count")
    num_attention_heads: int = _spec("count")
    num_layers: int = _spec("count")
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class EncodersSection(_Section):
    """``vision.encoders``: the anchor (CLIP) and the augmenter (DINOv2; null for a CLIP-only tower)."""

    anchor: EncoderShape = _spec(EncoderShape)
    augmenter: Optional[EncoderShape] = _spec(EncoderShape, nullable=True)
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class VisionSection(_Section):
    _PREFIX = "vision"

    file: str = _spec("path")
    engine: str = _spec(("onnx", "trt"))
    precision: str = _spec("str")
    inputs: Tuple[TensorSpec, ...] = _spec("io")
    outputs: Tuple[TensorSpec, ...] = _spec("io")
    num_image_tokens: int = _spec("count")
    tower_kind: Optional[str] = _spec("str", optional=True)
    fusion_layers: Optional[Tuple[Tuple[int, int], ...]] = _spec("pairs", optional=True)
    tensorrt: Optional[TensorRTEngine] = _spec(TensorRTEngine, optional=True)
    # --precision int8: the CPU form (the runtime picks it on a CPU-only provider list)
    cpu_file: Optional[str] = _spec("path", optional=True)
    # Since ftz-edge 0.1: the encoders' layer sizes (older bundles: None, ftz-doctor assumes them)
    encoders: Optional[EncodersSection] = _spec(EncodersSection, optional=True)
    # Records of the export, read by no runtime (kept for people and reports):
    layers_in_graph: Optional[Dict[str, List[int]]] = _spec("dict", optional=True)
    precision_details: Optional[Dict[str, Any]] = _spec("dict", optional=True)
    cpu_precision_details: Optional[Dict[str, Any]] = _spec("dict", optional=True)
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class LLMSection(_Section):
    _PREFIX = "llm"

    folder: str = _spec("path")
    file: str = _spec("llm_path")
    embeddings: str = _spec("llm_path")
    precision: str = _spec("str")
    execution_provider: str = _spec(("cpu", "cuda"))
    context_length: int = _spec("count")
    vocab_size: int = _spec("count")
    hidden_size: int = _spec("count")
    num_layers: int = _spec("count")
    num_kv_heads: int = _spec("count")
    head_size: int = _spec("count")
    genai_config: Optional[str] = _spec("llm_path", optional=True)
    tokenizer: Optional[str] = _spec("llm_path", optional=True)
    inputs: Optional[Tuple[TensorSpec, ...]] = _spec("io", optional=True)
    outputs: Optional[Tuple[TensorSpec, ...]] = _spec("io", optional=True)
    min_onnxruntime: Optional[str] = _spec("str", optional=True)
    lm_head: Optional[str] = _spec("str", optional=True)
    block_size: Optional[int] = _spec("count", optional=True)  # int4/int8: weights per scale (MatMulNBits)
    # Since ftz-edge 0.1 (older bundles: None; ftz-doctor reads genai_config.json or assumes them):
    num_attention_heads: Optional[int] = _spec("count", optional=True)
    intermediate_size: Optional[int] = _spec("count", optional=True)
    # Records of the build, read by no runtime:
    embeddings_dtype: Optional[str] = _spec("str", optional=True)
    builder: Optional[str] = _spec("str", optional=True)
    builder_version: Optional[str] = _spec("str", optional=True)
    onnxruntime_version: Optional[str] = _spec("str", optional=True)
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class PreprocessSection(_Section):
    _PREFIX = "preprocess"

    anchor: "ImageProcessorSpec" = _spec("spec")
    augmenter: Optional["ImageProcessorSpec"] = _spec("spec", nullable=True)  # null: a tower without an augmenter (clip)
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class PromptSection(_Section):
    _PREFIX = "prompt"

    chat_template: Optional[str] = _spec("str", nullable=True)
    bos_token: str = _spec("str")
    eos_token: str = _spec("str")
    eos_token_ids: Tuple[int, ...] = _spec("ids")
    tokenizer: str = _spec("path")
    max_length: int = _spec("count")
    image_placeholder: str = _spec("str")  # must be ftz_edge.prompt.IMAGE_PLACEHOLDER (checked at load)
    image_token_id: int = _spec("int")  # must be ftz_edge.prompt.IMAGE_TOKEN_ID (checked at load)
    pad_token_id: Optional[int] = _spec("int", optional=True)
    fallback_template_used: Optional[bool] = _spec("bool", optional=True)  # a record: the tokenizer had no template
    # The model's prompt format (ftz_edge.prompt.PROMPT_FORMATS; chat_template is its template);
    # absent in bundles exported before formats could be chosen ("chat").
    format: Optional[str] = _spec("str", optional=True)
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class ValidationSection(_Section):
    _PREFIX = "validation"

    file: Optional[str] = _spec("path", optional=True)
    passed: Optional[bool] = _spec("bool", optional=True)
    extra: Dict[str, Any] = _extra()


@dataclass(frozen=True)
class BundleManifest(_Section):
    """The whole manifest. ``files`` and ``schema_version`` are filled in by ``write_manifest``."""

    vision: VisionSection = _spec(VisionSection)
    llm: LLMSection = _spec(LLMSection)
    preprocess: PreprocessSection = _spec(PreprocessSection)
    prompt: PromptSection = _spec(PromptSection)
    provenance: Dict[str, Any] = field(default_factory=dict, metadata={"kind": "dict", "optional": True,
                                                                        "nullable": False, "absent_checked": False})
    validation: Optional[ValidationSection] = _spec(ValidationSection, optional=True)
    files: Dict[str, FileEntry] = field(default_factory=dict, metadata={"kind": "files", "optional": False,
                                                                        "nullable": False, "absent_checked": True})
    schema_version: int = field(default=SCHEMA_VERSION, metadata={"kind": "int", "optional": True,
                                                                  "nullable": False, "absent_checked": False})
    extra: Dict[str, Any] = _extra()

    @classmethod
    def from_dict(cls, data: Any, bundle: Union[str, Path] = ".", source: str = MANIFEST_NAME,
                  prefix: Optional[str] = None) -> "BundleManifest":
        """The manifest ``data`` (parsed JSON) of the bundle folder ``bundle``, validated: every
        field typed, every path inside the bundle, the image-token count agreeing with the graph's
        output, the image sentinel and placeholder being this runtime's. Raises one BundleError
        naming the first bad field (``source`` names the manifest in it)."""
        ctx = _Context(bundle, source)
        if not isinstance(data, dict):
            ctx.fail("the manifest", f"must be a JSON object, not {_kind(data)}")
        parsed = {}
        for f in fields(cls):
            if f.metadata.get("extra"):
                continue
            present, value = f.name in data, data.get(f.name)
            if f.name == "provenance":
                if value is not None and not isinstance(value, dict):
                    ctx.fail("provenance", f"must be an object, not {_kind(value)}")
                parsed[f.name] = copy.deepcopy(value) if value is not None else {}
            elif f.name == "schema_version":
                if present and value != SCHEMA_VERSION:
                    ctx.fail("schema_version", f"is {value!r}, this ftz-edge reads version {SCHEMA_VERSION}")
                parsed[f.name] = SCHEMA_VERSION
            elif f.name == "files":
                parsed[f.name] = _parse_files(ctx, "files", value)
            elif isinstance(f.metadata["kind"], type):
                if value is None and f.metadata["optional"]:
                    parsed[f.name] = None
                else:
                    parsed[f.name] = f.metadata["kind"]._parse(value, ctx, f.name, top=True)
        known = {f.name for f in fields(cls)}
        manifest = cls(**parsed, extra={k: copy.deepcopy(v) for k, v in data.items() if k not in known})
        manifest._check_consistent(ctx)
        return manifest

    def _check_consistent(self, ctx: _Context) -> None:
        vision, prompt = self.vision, self.prompt
        # The graph's own output shape, as recorded at export, must agree with the token count the
        # runtime splices into the prompt (a hand-edited count would misplace every text token).
        shape = vision.outputs[0].shape
        if len(shape) >= 2 and _is_int(shape[1]) and shape[1] != vision.num_image_tokens:
            ctx.fail("vision.num_image_tokens", f"is {vision.num_image_tokens} but the vision graph's output "
                                                f"{vision.outputs[0].name} has {shape[1]} tokens (shape {list(shape)})")
        # The runtime splices images where ftz_edge.prompt puts them: the bundle must agree.
        if prompt.image_token_id != _prompt.IMAGE_TOKEN_ID:
            ctx.fail("prompt.image_token_id", f"is {prompt.image_token_id}, but this ftz-edge marks image positions "
                                              f"with {_prompt.IMAGE_TOKEN_ID} (ftz_edge.prompt.IMAGE_TOKEN_ID)")
        if prompt.image_placeholder != _prompt.IMAGE_PLACEHOLDER:
            ctx.fail("prompt.image_placeholder", f"is {prompt.image_placeholder!r}, but this ftz-edge's prompts mark "
                                                 f"images with {_prompt.IMAGE_PLACEHOLDER!r}")
        if prompt.format is not None and prompt.format not in _prompt.PROMPT_FORMATS:
            ctx.fail("prompt.format", f"must be one of {', '.join(_prompt.PROMPT_FORMATS)}, got {prompt.format!r}")
        if (vision.encoders is not None and (vision.encoders.augmenter is None) != (self.preprocess.augmenter is None)):
            ctx.fail("vision.encoders.augmenter", "must be given exactly when preprocess.augmenter is")

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        # schema_version first, files last: the order ftz-export has always written them in.
        return {"schema_version": out.pop("schema_version"), **{k: v for k, v in out.items() if k != "files"},
                "files": out["files"]}


# -- reading and writing --------------------------------------------------------------------------
def file_table(bundle: Path) -> Dict[str, FileEntry]:
    """Size and sha256 of every file under ``bundle`` except the manifest, by POSIX relative path."""
    table = {}
    for path in sorted(p for p in Path(bundle).rglob("*") if p.is_file()):
        relative = path.relative_to(bundle).as_posix()
        if relative != MANIFEST_NAME:
            table[relative] = FileEntry(path.stat().st_size, sha256_file(path))
    return table


def write_manifest(bundle: Path, manifest: BundleManifest) -> BundleManifest:
    """Hash every file and write ``manifest.json`` last (the bundle is complete when it exists);
    ``manifest``'s own ``files`` and ``schema_version`` are replaced. The result is validated as
    ``read_manifest`` will validate it (through its JSON form): an exporter that writes a manifest
    the runtime cannot read fails here, not on the device. Returns what was written."""
    bundle = Path(bundle)
    if not isinstance(manifest, BundleManifest):
        raise TypeError(f"write_manifest takes a BundleManifest, not {type(manifest).__name__}")
    content = dataclasses.replace(manifest, schema_version=SCHEMA_VERSION, files=file_table(bundle)).to_dict()
    written = BundleManifest.from_dict(content, bundle, source=f"the manifest being written to {bundle}")
    (bundle / MANIFEST_NAME).write_text(json.dumps(content, indent=2) + "\n")
    return written


def read_manifest(bundle: Union[str, Path], verify: bool = True) -> BundleManifest:
    """The manifest of ``bundle``, validated: every section and key the runtime, ftz-doctor and
    ftz-serve read is present with its type, and every path it names stays inside the bundle
    (symbolic links resolved). With ``verify`` every file's size and sha256 are checked too.
    Any problem is one BundleError naming the field."""
    bundle = Path(bundle)
    data = _load_json(bundle)
    path = bundle / MANIFEST_NAME
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema version {version!r}, this ftz-edge reads version {SCHEMA_VERSION}; "
                          "re-export the bundle with a matching ftz-export")
    manifest = BundleManifest.from_dict(data, bundle, source=str(path))
    if verify:
        verify_files(bundle, manifest)
    return manifest


def _load_json(bundle: Path) -> Dict[str, Any]:
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"bundle folder {bundle} does not exist")
    if not path.is_file():
        raise BundleError(f"{bundle} is not a bundle: {MANIFEST_NAME} is missing (an unfinished export?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from None
    except OSError as err:
        raise BundleError(f"{path} cannot be read: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def verify_files(bundle: Path, manifest: BundleManifest) -> None:
    """Every file the manifest lists is there with its size and sha256."""
    for relative, expected in manifest.files.items():
        path = Path(bundle) / relative
        if not path.is_file():
            raise BundleError(f"bundle {bundle}: {relative} is missing")
        if path.stat().st_size != expected.bytes or sha256_file(path) != expected.sha256:
            raise BundleError(f"bundle {bundle}: {relative} does not match its sha256 in {MANIFEST_NAME} "
                              "(modified or corrupted); re-export the bundle")


# -- replacing a bundle ---------------------------------------------------------------------------
def check_replaceable(folder: Union[str, Path]) -> None:
    """Raise BundleError unless ``folder`` provably is an ftz bundle that a new export may
    replace: its manifest is an ftz manifest (this schema, fully valid; or another schema
    version that carries ftz-edge's provenance, so a re-export can replace an outdated bundle),
    and the folder holds no file the manifest does not list (nobody's notes get deleted).
    Use as ``atomic_folder(out, check=check_replaceable, what="an ftz bundle")``."""
    folder = Path(folder)
    data = _load_json(folder)
    path = folder / MANIFEST_NAME
    version = data.get("schema_version")
    if version == SCHEMA_VERSION:
        BundleManifest.from_dict(data, folder, source=str(path))
    else:
        tools = (data.get("provenance") or {}).get("tools") if isinstance(data.get("provenance"), dict) else None
        if not (_is_int(version) and isinstance(tools, dict) and "ftz-edge" in tools
                and isinstance(data.get("files"), dict)):
            raise BundleError(f"{path} is not an ftz-edge manifest (no schema_version, files and provenance "
                              "written by ftz-export)")
    unlisted = _unlisted_files(folder, data["files"])
    if unlisted:
        more = f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
        raise BundleError(f"{folder} holds files its manifest does not list ({', '.join(unlisted[:3])}{more}), "
                          "which a new export would delete")


def is_bundle(folder: Union[str, Path]) -> bool:
    """Whether ``folder`` is an ftz bundle that may be replaced (see ``check_replaceable``)."""
    try:
        check_replaceable(folder)
    except BundleError:
        return False
    return True


def _unlisted_files(folder: Path, files: dict) -> List[str]:
    listed = set(files) | {MANIFEST_NAME}
    found = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(f for f in found if f not in listed)
