"""runtime/, demo/, serve/, doctor/ and the shared torch-free modules must run on the device's software: Python 3.10
(JetPack 6), onnxruntime 1.22 (the oldest onnxruntime-gpu wheel for JetPack 6), numpy 1.26, no torch.

Three checks: vermin (no syntax or library call newer than 3.10), a static import-chain check (no
path from device code reaches torch), and the runtime's own tests run in a real Python 3.10
environment with those packages (``tests/device/``), on an fp32-decoder and an int4-decoder bundle.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEVICE_CODE = ["runtime", "demo", "serve", "doctor", "ftz_edge/cli/args.py", "ftz_edge/cli/default_bundle.py", "ftz_edge/precision.py", "ftz_edge/__init__.py", "ftz_edge/prompt.py", "ftz_edge/preprocess.py",
               "ftz_edge/manifest.py", "ftz_edge/atomic.py"]
HEAVY = {"torch", "transformers", "torchvision", "accelerate", "deepspeed", "optimum"}

DEVICE_ONNXRUNTIME = "1.22.1"
# The device's onnxruntime and numpy, and the floors pyproject.toml declares for the rest
# (tokenizers>=0.21, pillow>=10, jinja2>=3.1): what CI runs is the oldest set we claim to support.
DEVICE_REQUIREMENTS = [f"onnxruntime=={DEVICE_ONNXRUNTIME}", "numpy==1.26.4", "tokenizers==0.21.0", "pillow==10.0.0",
                       "jinja2==3.1.0", "pytest>=8"]
DEVICE_VENV = ROOT / ".cache" / "py310"  # git-ignored; rebuilt when its stamp no longer matches
DEVICE_TESTS = ROOT / "tests" / "device" / "test_runtime_device.py"


def test_device_code_needs_no_python_newer_than_3_10():
    vermin = shutil.which("vermin")
    assert vermin, "the vermin command is not on PATH"
    result = subprocess.run([vermin, "-t=3.10-", "--violations", "--no-tips",
                             *[str(ROOT / p) for p in DEVICE_CODE]], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- static import chains ------------------------------------------------------------------------
def package_dirs(root: Path) -> Dict[str, Path]:
    """pyproject's setuptools package-dir: import prefix -> folder (ftz_edge.runtime -> runtime/)."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    return {name: root / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def module_file(module: str, dirs: Dict[str, Path]) -> Optional[Path]:
    """The file that ``import module`` runs, or None when it is not this repository's."""
    prefix = max((p for p in dirs if module == p or module.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        return None
    base = dirs[prefix].joinpath(*module[len(prefix):].split(".")[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, dirs: Dict[str, Path]) -> str:
    for prefix, folder in sorted(dirs.items(), key=lambda item: -len(str(item[1]))):
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            return ".".join([prefix, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))
    raise ValueError(f"{path} is in no package")


def imported_modules(path: Path, dirs: Dict[str, Path]) -> List[str]:
    """Every module ``path`` may import, lazily or not (``from a import b`` gives a and a.b)."""
    name = module_name(path, dirs)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def torch_chains(root: Path, starts: List[str]) -> List[str]:
    """Import chains from the device code under ``root`` to torch & co, following this
    repository's modules and the package ``__init__`` files each import runs."""
    dirs = package_dirs(root)
    files = [p for s in starts for p in ([root / s] if (root / s).is_file() else sorted((root / s).rglob("*.py")))]
    chains, seen = [], set()

    def visit(path: Path, chain: List[str]) -> None:
        if path in seen:
            return
        seen.add(path)
        chain = chain + [str(path.relative_to(root))]
        for module in imported_modules(path, dirs):
            if module.split(".")[0] in HEAVY:
                chains.append(" -> ".join(chain) + f" imports {module}")
            bits = module.split(".")
            for depth in range(1, len(bits) + 1):  # a.b.c runs a/__init__, a/b/__init__, then c
                target = module_file(".".join(bits[:depth]), dirs)
                if target is not None and target != path:
                    visit(target, chain)

    for path in files:
        visit(path, [])
    return list(dict.fromkeys(chains))


def test_device_code_imports_no_torch_statically():
    chains = torch_chains(ROOT, DEVICE_CODE)
    assert not chains, "\n".join(chains[:10])


def test_the_import_chain_check_finds_a_torch_import_behind_another_module(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"ftz_edge" = "ftz_edge"\n'
                                             '"ftz_edge.runtime" = "runtime"\n"ftz_edge.export" = "export"\n')
    for folder in ("ftz_edge", "runtime", "export"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "runtime" / "engine.py").write_text("def run():\n    from .helper import go\n")
    (tmp_path / "runtime" / "helper.py").write_text("from ftz_edge.export import tools\n")
    (tmp_path / "export" / "tools.py").write_text("import numpy\n")
    assert torch_chains(tmp_path, ["runtime"]) == []
    (tmp_path / "export" / "__init__.py").write_text("import torch.nn\n")  # reached through the package
    assert torch_chains(tmp_path, ["runtime"]) == [
        "runtime/engine.py -> runtime/helper.py -> export/__init__.py imports torch.nn"]


# -- the runtime's tests in a Python 3.10 environment -----------------------------------------
def find_python310() -> Optional[str]:
    """A Python 3.10 interpreter: $FTZ_PYTHON310, else pyenv's newest 3.10, else python3.10 on PATH."""
    candidates = [os.environ.get("FTZ_PYTHON310")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        found = (Path(root) / "versions").glob("3.10.*/bin/python") if root else []
        candidates += sorted(map(str, found), key=lambda p: [int(x) for x in Path(p).parents[1].name.split(".")
                                                               if x.isdigit()], reverse=True)
    candidates.append(shutil.which("python3.10"))
    for candidate in filter(None, candidates):
        check = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                               capture_output=True, text=True)
        if check.stdout.strip() == "True":
            return candidate
    return None


def _clean_env(**extra: str) -> Dict[str, str]:
    """This process's environment without what would make the child see our Python's packages."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYENV_VERSION", "PYTHONSTARTUP")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _run(command: List[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=_clean_env(), **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        pytest.fail(f"building the Python 3.10 device environment: {what} failed ({' '.join(command)}):\n{tail}")
    return result


def device_environment(python: str, venv: Path = DEVICE_VENV) -> Path:
    """The Python of a 3.10 venv holding DEVICE_REQUIREMENTS and this package (editable, no
    dependencies: torch never enters). Built once and reused while its stamp matches; built
    aside and moved into place, so a concurrent or interrupted build never leaves half a venv."""
    version = _run([python, "-c", "import sys; print(sys.version)"], "asking the interpreter").stdout.strip()
    stamp = {"python": version, "requirements": DEVICE_REQUIREMENTS, "package": str(ROOT),
             "pyproject": hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()}
    def ready() -> bool:
        return (venv / "bin" / "python").exists() and (venv / "stamp.json").is_file() \
            and json.loads((venv / "stamp.json").read_text()) == stamp

    if ready():
        return venv / "bin" / "python"
    building = venv.with_name(f"{venv.name}.tmp-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.parent.mkdir(parents=True, exist_ok=True)
    _run([python, "-m", "venv", str(building)], "python -m venv")
    pip = [str(building / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run(pip + DEVICE_REQUIREMENTS, "installing the device's packages")
    _run(pip + ["--no-deps", "-e", str(ROOT)], "installing ftz-edge without its dependencies")
    (building / "stamp.json").write_text(json.dumps(stamp, indent=1))
    if ready():  # another run finished the same venv meanwhile (it may be using it): keep that one
        shutil.rmtree(building)
    else:
        shutil.rmtree(venv, ignore_errors=True)
        os.replace(building, venv)
    return venv / "bin" / "python"


def require_python310() -> str:
    """find_python310's interpreter; without one, skip on a developer's machine, fail in CI."""
    python = find_python310()
    if python is None:
        message = "no Python 3.10 (pyenv's 3.10.*, python3.10, or $FTZ_PYTHON310) to run the device's tests in"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):  # as tests/conftest.py reads it
            pytest.fail(f"{message}: CI must run them")
        pytest.skip(message)
    return python


def test_without_python_3_10_ci_fails_and_a_developer_skips(monkeypatch):
    monkeypatch.setitem(globals(), "find_python310", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run them"):
        require_python310()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no Python 3.10"):
        require_python310()


@pytest.fixture(scope="module")
def device_python() -> Path:
    return device_environment(require_python310())


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory) -> Path:
    """The shipped default model with an fp32 tower and an int4 decoder (MatMulNBits + GQA)."""
    from ftz_edge.export import bundle as bundle_module

    out = tmp_path_factory.mktemp("device-bundles") / "int4-llm"
    code = bundle_module.main(["--checkpoint", str(ROOT / "ftz_edge" / "default_model"), "--out", str(out),
                               "--engine", "onnx", "--precision", "fp32", "--llm-precision", "int4"])
    assert code == 0
    return out


def _device_cases():
    spec = importlib.util.spec_from_file_location("device_cases", ROOT / "tests" / "device" / "device_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_runtime_answers_on_python_3_10_with_onnxruntime_1_22(device_python, default_bundle, int4_bundle, tmp_path):
    from ftz_edge.runtime.engine import FtZRuntime

    bundles = [Path(default_bundle), int4_bundle]
    manifests = [json.loads((b / "manifest.json").read_text())["llm"] for b in bundles]
    assert [m["precision"] for m in manifests] == ["fp32", "int4"]
    release = lambda version: tuple(int(x) for x in version.split("."))  # noqa: E731
    assert all(release(m["min_onnxruntime"]) <= release(DEVICE_ONNXRUNTIME) for m in manifests), \
        [m["min_onnxruntime"] for m in manifests]
    results = tmp_path / "device-answers.json"
    env = _clean_env(FTZ_DEVICE_BUNDLES=os.pathsep.join(map(str, bundles)), FTZ_DEVICE_RESULTS=str(results),
                     FTZ_DEVICE_ONNXRUNTIME=DEVICE_ONNXRUNTIME)
    # --confcutdir: the device tests stand on device code alone, not on tests/conftest.py.
    child = subprocess.run([str(device_python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"--confcutdir={DEVICE_TESTS.parent}", str(DEVICE_TESTS)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = child.stdout[-6000:] + child.stderr[-3000:]
    assert child.returncode == 0, "the device tests failed under Python 3.10:\n" + output
    assert " passed" in output and "skipped" not in output, output  # every device test ran
    # The same greedy answers as on this machine's Python and onnxruntime, bundle by bundle.
    on_device = json.loads(results.read_text())
    cases = _device_cases()
    for bundle in bundles:
        assert on_device[str(bundle)] == cases.answers(FtZRuntime(bundle)), bundle.name
