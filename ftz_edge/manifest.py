"""The bundle manifest: what an exported bundle holds, defined once and torch-free.

``ftz-export`` writes it, the on-device runtime reads it. ``manifest.json`` sits at the bundle's
root and records:

* ``schema_version``: this module's ``SCHEMA_VERSION``; readers refuse other versions;
* ``files``: every other file of the bundle with its size and sha256 (tampering is refused);
* ``vision``: the vision graph (file, engine, precision, inputs/outputs with dtypes and dynamic
  axes, number of image tokens) and an optional TensorRT engine with its build record;
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
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class BundleError(ValueError):
    """A bundle that is missing, from another schema version, incomplete or tampered with."""


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
    """Hash every file and write ``manifest.json`` last (the bundle is complete when it exists)."""
    manifest = {"schema_version": SCHEMA_VERSION, **content, "files": file_table(bundle)}
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(bundle: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of ``bundle``; with ``verify`` every file's size and sha256 are checked."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"bundle folder {bundle} does not exist")
    if not path.is_file():
        raise BundleError(f"{bundle} is not a bundle: {MANIFEST_NAME} is missing (an unfinished export?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema version {version!r}, this ftz-edge reads version {SCHEMA_VERSION}; "
                          "re-export the bundle with a matching ftz-export")
    if verify:
        verify_files(bundle, manifest)
    return manifest


def verify_files(bundle: Path, manifest: dict[str, Any]) -> None:
    for relative, expected in manifest.get("files", {}).items():
        path = bundle / relative
        if not path.is_file():
            raise BundleError(f"bundle {bundle}: {relative} is missing")
        if path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            raise BundleError(f"bundle {bundle}: {relative} does not match its sha256 in {MANIFEST_NAME} "
                              "(modified or corrupted); re-export the bundle")
