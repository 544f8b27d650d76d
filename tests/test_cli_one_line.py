"""Every console script turns the error classes it meets into one line and a non-zero exit.

A user who mistypes a path, points at a folder that is not what the tool reads, or gives a file
that is corrupted, reads one ``PROG: error: ...`` line, never a traceback. (ftz-chat and
ftz-serve have more cases in tests/test_cli_errors.py; ftz-export's stages in test_export.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

NOT_A_BUNDLE = "NOT_A_BUNDLE"      # replaced by a folder with a manifest.json that is not ours
CORRUPT_CKPT = "CORRUPT_CKPT"      # replaced by a folder whose ftz_config.json is not JSON
TEXT_FILE = "TEXT_FILE"            # replaced by a plain text file


CASES = [
    # (script, arguments, what the last line must mention)
    ("ftz-export", ["--checkpoint", "/nonexistent/ckpt", "--out", "OUT"], "cannot load checkpoint"),
    ("ftz-export", ["--checkpoint", CORRUPT_CKPT, "--out", "OUT"], "cannot load checkpoint"),
    ("ftz-export", ["--max-calib-images", "0", "--out", "OUT"], "at least 1"),
    ("ftz-export", ["--precision", "int3"], "invalid choice"),
    ("ftz-chat", ["--bundle", "/nonexistent/bundle", "hi"], "/nonexistent/bundle"),
    ("ftz-chat", ["--bundle", NOT_A_BUNDLE, "hi"], "manifest"),
    ("ftz-chat", ["--bundle", TEXT_FILE, "hi"], TEXT_FILE),
    ("ftz-serve", ["--bundle", "/nonexistent/bundle"], "/nonexistent/bundle"),
    ("ftz-serve", ["--port", "70000"], "port"),
    ("ftz-doctor", ["--bundle", "/nonexistent/bundle"], "/nonexistent/bundle"),
    ("ftz-doctor", ["--bundle", NOT_A_BUNDLE], "manifest"),
    ("ftz-demo", ["--bundle", "/nonexistent/bundle"], "/nonexistent/bundle"),
    ("ftz-train", ["--recipe", "/nonexistent.yaml", "--output-dir", "OUT"], "nonexistent"),
    ("ftz-eval", ["--model", "/nonexistent/bundle", "--synthetic", "5", "--out", "OUT"], "/nonexistent/bundle"),
    ("ftz-bench", ["--suite", "nonsense"], "unknown suite"),
    ("ftz-info", ["--no-such-flag"], "unrecognized arguments"),
]


@pytest.fixture
def places(tmp_path):
    not_a_bundle = tmp_path / "webapp"
    not_a_bundle.mkdir()
    (not_a_bundle / "manifest.json").write_text(json.dumps({"name": "a web app"}))
    corrupt = tmp_path / "ckpt"
    corrupt.mkdir()
    (corrupt / "ftz_config.json").write_text("{not json")
    text = tmp_path / "notes.txt"
    text.write_text("just text")
    return {NOT_A_BUNDLE: str(not_a_bundle), CORRUPT_CKPT: str(corrupt), TEXT_FILE: str(text),
            "OUT": str(tmp_path / "out")}


@pytest.mark.parametrize("script, args, mention", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_each_cli_error_is_one_line_and_a_nonzero_exit(script, args, mention, places):
    executable = shutil.which(script)
    assert executable, f"{script} is not installed (pip install -e '.[dev]')"
    args = [places.get(a, a) for a in args]
    env = {**os.environ, "FTZ_DEBUG": "", "HF_HUB_OFFLINE": "1"}
    env.pop("FTZ_DEBUG")
    run = subprocess.run([executable, *args], capture_output=True, text=True, timeout=180, env=env,
                         stdin=subprocess.DEVNULL)
    assert run.returncode != 0, run.stdout[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    if script == "ftz-doctor" and not run.stderr.strip():
        # The doctor's job is a report: a bundle's problem is one PROBLEM line in it, exit status 1.
        problems = [line for line in run.stdout.splitlines() if line.startswith("PROBLEM:")]
        assert run.returncode == 1 and problems and any(places.get(mention, mention) in p for p in problems), run.stdout
        return
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert lines, "no error message at all"
    last = lines[-1]
    assert last.startswith(f"{script}: error:") or last.startswith(f"{script}: "), last
    assert places.get(mention, mention) in last, last
    assert not Path(places["OUT"]).exists()
