"""The bundle manifest: what an exported bundle holds, defined once and torch-free.

``ftz-export`` writes it, the on-device runtime reads it. ``manifest.json`` sits at the bundle's
root and records:

* ``schema_version``: this module's ``SCHEMA_VERSION``; readers refuse other versions;
* ``files``: every other file of the bundle with its size and sha256 (tampering is refused);
* ``vision``: the vision graph (file, engine, precision, inputs/outputs with dtypes and dynamic
  axes, number of image tokens), an optional TensorRT engine with its build record and, for an
  INT8 bundle, an optional ``cpu_file``: the same tower quantized for ONNX Runtime's CPU provider;
* ``llm``: the decoder (file, precision, execution provider it was built for, KV-cache layout),
  the token-embedding table, context length;
* ``preprocess``: the ImageProcessorSpec of each encoder (ftz_edge.preprocess);
* ``prompt``: chat template, special tokens, EOS ids, the image placeholder and sentinel id,
  the tokenizer file;
* ``provenance``: source checkpoint, FtZ config, tool versions, export options;
* ``validation``: the parity report file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

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


def file_table(bundle: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``bundle`` except the manifest, by POSIX relative path."""
    table = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        relative = path.relative_to(bundle).as_posix()
        if relative != MANIFEST_NAME:
            table[relative] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return table


def write_manifest(bundle: Path, content: dict[str, Any]) -> dict[str, Any]:
    """Hash every file and write ``manifest.json`` last (the bundle is complete when it exists).
    The manifest is validated as ``read_manifest`` will validate it: an exporter that writes a
    manifest the runtime cannot read fails here, not on the device."""
    manifest = {"schema_version": SCHEMA_VERSION, **content, "files": file_table(bundle)}
    validate_manifest(manifest, bundle, source=f"the manifest being written to {bundle}")
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(bundle: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of ``bundle``, validated: every section and key the runtime, ftz-doctor and
    ftz-serve read is present with its type, and every path it names stays inside the bundle
    (symbolic links resolved). With ``verify`` every file's size and sha256 are checked too.
    Any problem is one BundleError naming the field."""
    bundle = Path(bundle)
    manifest = _load_json(bundle)
    path = bundle / MANIFEST_NAME
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema version {version!r}, this ftz-edge reads version {SCHEMA_VERSION}; "
                          "re-export the bundle with a matching ftz-export")
    validate_manifest(manifest, bundle, source=str(path))
    if verify:
        verify_files(bundle, manifest)
    return manifest


def _load_json(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"bundle folder {bundle} does not exist")
    if not path.is_file():
        raise BundleError(f"{bundle} is not a bundle: {MANIFEST_NAME} is missing (an unfinished export?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from None
    except OSError as err:
        raise BundleError(f"{path} cannot be read: {err.strerror or err}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} must hold a JSON object, not {type(manifest).__name__}")
    return manifest


def verify_files(bundle: Path, manifest: dict[str, Any]) -> None:
    for relative, expected in manifest.get("files", {}).items():
        path = bundle / relative
        if not path.is_file():
            raise BundleError(f"bundle {bundle}: {relative} is missing")
        if path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            raise BundleError(f"bundle {bundle}: {relative} does not match its sha256 in {MANIFEST_NAME} "
                              "(modified or corrupted); re-export the bundle")


# -- the schema ---------------------------------------------------------------------------------
# What the readers index without a default: runtime/engine.py, doctor/cli.py (bundle_spec,
# check_bundle, _decoder_step), serve/server.py (/v1/models), evaluation. Kinds:
#   str, int (bool refused), list, dict, "path" (a relative path inside the bundle),
#   "llm_path" (relative to llm.folder, inside the bundle), "io" (a list of {name, dtype, shape}),
#   "?..." optional (absent or null), "*..." required but may be null.
_SCHEMA: Dict[str, Dict[str, Any]] = {
    "vision": {"file": "path", "engine": ("onnx", "trt"), "precision": str, "num_image_tokens": "count",
               "inputs": "io", "outputs": "io", "tensorrt": "?dict", "fusion_layers": "?list", "tower_kind": "?str",
               "cpu_file": "?path"},  # --precision int8: the CPU form (runtime picks it on a CPU-only provider list)
    "llm": {"folder": "path", "file": "llm_path", "embeddings": "llm_path", "genai_config": "?llm_path",
            "tokenizer": "?llm_path", "precision": str, "execution_provider": ("cpu", "cuda"),
            "context_length": "count", "vocab_size": "count", "hidden_size": "count", "num_layers": "count",
            "num_kv_heads": "count", "head_size": "count", "inputs": "?io", "outputs": "?io",
            "min_onnxruntime": "?str", "builder_version": "?str", "onnxruntime_version": "?str", "lm_head": "?str"},
    "preprocess": {"anchor": dict, "augmenter": "*dict"},  # null: a tower without an augmenter (clip)
    "prompt": {"chat_template": "*str", "bos_token": str, "eos_token": str, "eos_token_ids": "ids", "tokenizer": "path",
               "max_length": "count", "image_placeholder": str, "image_token_id": int, "pad_token_id": "?int"},
    "provenance": {},
}
_OPTIONAL_SECTIONS = {"provenance", "validation"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def validate_manifest(manifest: dict[str, Any], bundle: Path, source: str = MANIFEST_NAME) -> None:
    """Raise BundleError naming the first missing or malformed field of ``manifest`` (already
    parsed JSON) of the bundle folder ``bundle``."""
    def fail(field: str, problem: str) -> None:
        raise BundleError(f"{source}: {field} {problem}; re-export the bundle with ftz-export")

    for section, keys in _SCHEMA.items():
        value = manifest.get(section)
        if value is None and section in _OPTIONAL_SECTIONS:
            continue
        if not isinstance(value, dict):
            fail(section, "is missing" if value is None else f"must be an object, not {_kind(value)}")
        for key, kind in keys.items():
            _check_field(manifest, bundle, f"{section}.{key}", value.get(key), kind, key in value, fail)
    _check_tensorrt(manifest, bundle, fail)
    _check_preprocess(manifest["preprocess"], fail)
    validation = manifest.get("validation")
    if validation is not None:
        if not isinstance(validation, dict):
            fail("validation", f"must be an object, not {_kind(validation)}")
        _check_field(manifest, bundle, "validation.file", validation.get("file"), "?path", "file" in validation, fail)
    _check_files(manifest.get("files"), bundle, fail)
    _check_image_tokens(manifest["vision"], fail)


def _check_field(manifest, bundle: Path, field: str, value, kind, present: bool, fail: Callable) -> None:
    if not present and not (isinstance(kind, str) and kind.startswith("?")):
        fail(field, "is missing")
    if isinstance(kind, str) and kind[0] in "?*":
        if value is None:
            return
        kind = kind[1:]
    if isinstance(kind, tuple):
        if value not in kind:
            fail(field, f"must be one of {', '.join(kind)}, got {value!r}")
    elif kind in ("path", "llm_path"):
        base = manifest["llm"].get("folder") if kind == "llm_path" else None
        if kind == "llm_path" and not isinstance(base, str):
            return  # llm.folder is checked (and reported) on its own
        _check_path(bundle, field, value, fail, base)
    elif kind == "count":
        if not _is_int(value) or value < 1:
            fail(field, f"must be a positive integer, got {value!r}")
    elif kind == "ids":
        if not isinstance(value, list) or not value or not all(_is_int(v) for v in value):
            fail(field, f"must be a non-empty list of integers, got {value!r}")
    elif kind == "io":
        _check_io(field, value, fail)
    elif kind in (str, "str"):
        if not isinstance(value, str):
            fail(field, f"must be a string, got {_kind(value)}")
    elif kind in (int, "int"):
        if not _is_int(value):
            fail(field, f"must be an integer, got {value!r}")
    elif kind in (dict, "dict"):
        if not isinstance(value, dict):
            fail(field, f"must be an object, got {_kind(value)}")
    elif kind in (list, "list"):
        if not isinstance(value, list):
            fail(field, f"must be a list, got {_kind(value)}")


def _check_path(bundle: Path, field: str, value, fail: Callable, base: Optional[str] = None) -> None:
    """A relative path that, joined to the bundle (and ``base`` inside it), stays inside the
    bundle after resolving ``..`` and symbolic links: a manifest cannot make the runtime read
    (or hash) a file outside its bundle."""
    if not isinstance(value, str) or not value or "\x00" in value:
        fail(field, f"must be a relative path inside the bundle, got {value!r}")
    relative = f"{base}/{value}" if base is not None else value
    if Path(relative).is_absolute() or "\\" in relative:
        fail(field, f"must be a relative path inside the bundle, got {value!r}")
    root = bundle.resolve()
    try:
        (root / relative).resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):  # outside; or a symlink loop
        fail(field, f"must stay inside the bundle, but {value!r} leads outside it")


def _check_io(field: str, value, fail: Callable) -> None:
    if not isinstance(value, list) or not value:
        fail(field, f"must be a non-empty list of {{name, dtype, shape}}, got {value!r:.80}")
    for i, entry in enumerate(value):
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("shape"), list) and entry["shape"]
              and all(isinstance(d, str) or (_is_int(d) and d >= 0) for d in entry["shape"]))
        if not ok:
            fail(f"{field}[{i}]", f"must be {{name: str, dtype: str, shape: [int or str, ...] (not empty)}}, "
                                  f"got {entry!r:.80}")


def _check_tensorrt(manifest: dict, bundle: Path, fail: Callable) -> None:
    engine = manifest["vision"].get("tensorrt")
    if engine is None:
        return
    _check_path(bundle, "vision.tensorrt.file", engine.get("file"), fail)
    if engine.get("record") is not None and not isinstance(engine["record"], dict):
        fail("vision.tensorrt.record", f"must be an object, got {_kind(engine['record'])}")


def _check_preprocess(specs: dict, fail: Callable) -> None:
    from ftz_edge.preprocess import ImageProcessorSpec  # numpy + Pillow: torch-free, loaded when needed

    for name in ("anchor", "augmenter"):
        if specs.get(name) is None:
            continue
        try:
            ImageProcessorSpec.from_dict(specs[name])
        except (TypeError, ValueError) as err:
            fail(f"preprocess.{name}", f"is not a valid ImageProcessorSpec ({err})")


def _check_files(files, bundle: Path, fail: Callable) -> None:
    if not isinstance(files, dict):
        fail("files", "is missing" if files is None else f"must be an object, got {_kind(files)}")
    for relative, entry in files.items():
        _check_path(bundle, f"files[{relative!r}]", relative, fail)
        if not (isinstance(entry, dict) and _is_int(entry.get("bytes")) and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            fail(f"files[{relative!r}]", f"must be {{bytes: int, sha256: 64 hex digits}}, got {entry!r:.80}")


def _check_image_tokens(vision: dict, fail: Callable) -> None:
    # The graph's own output shape, as recorded at export, must agree with the token count the
    # runtime splices into the prompt (a hand-edited count would misplace every text token).
    shape = vision["outputs"][0]["shape"]
    if len(shape) >= 2 and _is_int(shape[1]) and shape[1] != vision["num_image_tokens"]:
        fail("vision.num_image_tokens", f"is {vision['num_image_tokens']} but the vision graph's output "
                                        f"{vision['outputs'][0]['name']} has {shape[1]} tokens (shape {shape})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


# -- replacing a bundle ---------------------------------------------------------------------------
def check_replaceable(folder: str | Path) -> None:
    """Raise BundleError unless ``folder`` provably is an ftz bundle that a new export may
    replace: its manifest is an ftz manifest (this schema, fully valid; or another schema
    version that carries ftz-edge's provenance, so a re-export can replace an outdated bundle),
    and the folder holds no file the manifest does not list (nobody's notes get deleted).
    Use as ``atomic_folder(out, check=check_replaceable, what="an ftz bundle")``."""
    folder = Path(folder)
    manifest = _load_json(folder)
    path = folder / MANIFEST_NAME
    version = manifest.get("schema_version")
    if version == SCHEMA_VERSION:
        validate_manifest(manifest, folder, source=str(path))
    else:
        tools = (manifest.get("provenance") or {}).get("tools") if isinstance(manifest.get("provenance"), dict) else None
        if not (_is_int(version) and isinstance(tools, dict) and "ftz-edge" in tools
                and isinstance(manifest.get("files"), dict)):
            raise BundleError(f"{path} is not an ftz-edge manifest (no schema_version, files and provenance "
                              "written by ftz-export)")
    unlisted = _unlisted_files(folder, manifest["files"])
    if unlisted:
        more = f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
        raise BundleError(f"{folder} holds files its manifest does not list ({', '.join(unlisted[:3])}{more}), "
                          "which a new export would delete")


def is_bundle(folder: str | Path) -> bool:
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
