"""runtime/, demo/ and the shared torch-free modules must run on Python 3.10 (JetPack 6)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEVICE_CODE = ["runtime", "demo", "ftz_edge/__init__.py", "ftz_edge/prompt.py", "ftz_edge/preprocess.py",
               "ftz_edge/manifest.py", "ftz_edge/atomic.py"]


def test_device_code_needs_no_python_newer_than_3_10():
    pytest.importorskip("vermin", reason="vermin is in the dev extra")
    vermin = shutil.which("vermin")
    assert vermin, "the vermin command is not on PATH"
    result = subprocess.run([vermin, "-t=3.10-", "--violations", "--no-tips",
                             *[str(ROOT / p) for p in DEVICE_CODE]], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_device_code_imports_no_torch_statically():
    """The shared hook's static import-chain check (runtime/ and demo/ never reach torch)."""
    hook = ROOT.parent / "shared" / "hooks" / "torchfree.py"
    if not hook.is_file():
        pytest.skip("shared/hooks/torchfree.py is not beside this checkout")
    result = subprocess.run([sys.executable, str(hook)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
