"""The shipped default model's bundle: where it is cached and how it is built the first time.

ftz-chat, ftz-demo, ftz-serve and ftz-bench answer with the default model when no ``--bundle`` is
given. The bundle is built once, by ftz-export in a separate process (so the torch-free front ends
never import torch), into the user cache, keyed by the model's weights.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import ftz_edge

DEFAULT_MODEL = ftz_edge.DEFAULT_MODEL


def default_bundle_path() -> Path:
    """Cache folder of the default model's bundle, keyed by the model's weights (a new default
    model gets a new bundle)."""
    digest = hashlib.sha256((DEFAULT_MODEL / "ftz_weights.safetensors").read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("FTZ_EDGE_CACHE", Path.home() / ".cache" / "ftz-edge"))
    return root / f"default-bundle-{digest}"


def ensure_default_bundle(prog: str = "ftz-chat") -> Path:
    """The default bundle, built first when missing; a failed build ends ``prog`` with one error line."""
    bundle = default_bundle_path()
    if not (bundle / "manifest.json").is_file():
        print(f"building the default model's bundle in {bundle} (once) ...", file=sys.stderr)
        command = [sys.executable, "-m", "ftz_edge.export.bundle", "--checkpoint", str(DEFAULT_MODEL), "--out", str(bundle),
                   "--engine", "onnx", "--precision", "fp32", "--llm-precision", "fp32"]
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise SystemExit(f"{prog}: error: building the default bundle failed (it needs the export extra: "
                             f"pip install -e '.[export]'); or pass --bundle\n{tail}")
    return bundle
