"""The CI skip policy of tests/conftest.py, run on a tiny test file in a separate pytest (issue 13, item 9)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = '''
import pytest

def test_passes():
    pass

def test_needs_tensorrt():
    pytest.skip("TensorRT is not installed here")

def test_needs_a_gpu():
    pytest.skip("no NVIDIA GPU found")

def test_needs_chromium():
    pytest.skip("chromium is not on PATH")

@pytest.mark.skipif(True, reason="some file is not beside this checkout")
def test_skipped_for_another_reason():
    pass

@pytest.fixture
def missing_extra():
    pytest.importorskip("no_such_module_for_ftz", reason="the foo extra is not installed")

def test_skipped_in_a_fixture(missing_extra):
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_to_fail():
    assert False
'''
MODULE_SKIP = '''
import pytest

pytest.importorskip("no_such_module_for_ftz", reason="the serve extra is not installed")

def test_never_collected():
    pass
'''


def run_pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), folder / "conftest.py")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [None, "0", "false"])
def test_outside_ci_every_skip_is_a_skip(tmp_path, ci):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    result = run_pytest(tmp_path, ci)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 5 skipped, 1 xfailed" in result.stdout, result.stdout


def test_in_ci_only_the_allowed_skips_remain_skips(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    result = run_pytest(tmp_path, "true")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    # A skip in the test body becomes a failure, one at setup (skipif, a fixture) an error.
    assert "1 passed, 3 skipped, 1 xfailed, 2 errors" in out, out
    failed = sorted(line.split("::")[1].split(" ")[0] for line in out.splitlines() if line.startswith(("FAILED", "ERROR")))
    assert failed == ["test_skipped_for_another_reason", "test_skipped_in_a_fixture"], out
    assert "skipped in CI for a reason not on the allowed list" in out and "some file is not beside this checkout" in out


def test_in_ci_a_whole_module_importorskip_fails(tmp_path):
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    result = run_pytest(tmp_path, "1")
    assert result.returncode != 0, result.stdout
    assert "the serve extra is not installed" in result.stdout and "not on the allowed list" in result.stdout
    outside = run_pytest(tmp_path, None)  # outside CI: a skipped module, as before (5: no test ran)
    assert outside.returncode == 5 and "1 skipped" in outside.stdout, outside.stdout
