"""llama.cpp (through llama-cpp-python) on the same weights as the other LLM paths.

Conversion uses registry packages only: llama-cpp-python's sdist vendors llama.cpp with its
``convert_hf_to_gguf.py`` (+ ``conversion/``, ``gguf-py/``). The bench looks for those files in
``$FTZ_BENCH_LLAMACPP_SRC`` or its cache, else fetches the sdist of the *installed* version with
``pip download --no-binary :all: --no-deps`` into the cache (never in tests) and keeps only them.
HF folder -> F16 GGUF (the converter) -> Q8_0 / Q4_0 (``llama_model_quantize`` from the
installed library, what ``llama-quantize`` runs).

One patch to the converter: it identifies a BPE tokenizer's pre-tokenizer by hashing how it
splits a test text, and refuses tokenizers it does not know. The real-size random models carry
the default model's small tokenizer (none can be downloaded here), so the pre-tokenizer name is
given instead (``qwen2`` / ``llama-bpe``); it only matters for tokenizing text, not for speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ftz_edge import precision as P
from ftz_edge.atomic import atomic_folder
from ftz_edge.bench import artifacts
from ftz_edge.bench.results import make_row
from ftz_edge.bench.timing import collect

QUANTS = P.GGUF_QUANTS  # the bit widths comparable to ORT's int8 / int4
_FTYPES = {"f16": 1, "q4_0": 2, "q8_0": 7}  # llama.h LLAMA_FTYPE_MOSTLY_*
_PRE_TOKENIZER = {"qwen2": "qwen2", "llama": "llama-bpe"}
_SOURCE_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def installed_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def availability(probe: bool = True) -> tuple[bool, str]:
    """(usable, why not): llama-cpp-python and gguf must import, and (``probe``) llama.cpp's
    CPU backend must start in a child process - a build for instructions this CPU lacks dies
    there with SIGILL, which must not take the benchmark with it."""
    try:
        import llama_cpp  # noqa: F401 - loads the library but runs none of its CPU code
    except Exception as err:  # noqa: BLE001 - a broken native library raises OSError
        return False, f"llama-cpp-python is not installed ({type(err).__name__}); pip install -e '.[llamacpp]'"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False, "the gguf package is not installed; pip install -e '.[llamacpp]'"
    if probe:
        run = subprocess.run([sys.executable, "-c", "import llama_cpp; llama_cpp.llama_backend_init()"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            import signal

            why = (signal.Signals(-run.returncode).name if run.returncode < 0 else f"exit status {run.returncode}")
            hint = (" - an illegal instruction: the library was built for instructions this CPU lacks "
                    "(e.g. AVX-512 on an AVX2-only CPU); rebuild llama-cpp-python for this CPU"
                    if run.returncode == -4 else "")
            return False, f"llama-cpp-python {installed_version()} is installed but llama.cpp's CPU backend crashes on this machine ({why}){hint}"
    return True, ""


def gguf_path(size: str, llm: Optional[str], quant: str) -> Path:
    return artifacts.llm_folder(size, llm) / "gguf" / f"model-{quant}.gguf"


def source_folder() -> Path:
    return artifacts.cache_root() / f"llama.cpp-convert-{installed_version()}"


def find_converter(download: bool = True) -> Path:
    """The folder holding ``convert_hf_to_gguf.py`` for the installed llama-cpp-python."""
    env = os.environ.get("FTZ_BENCH_LLAMACPP_SRC")
    if env and (Path(env) / "convert_hf_to_gguf.py").is_file():
        return Path(env)
    folder = source_folder()
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    version = installed_version()
    if not download or not version:
        raise FileNotFoundError("llama.cpp's convert_hf_to_gguf.py is not cached and fetching it is not allowed here")
    with tempfile.TemporaryDirectory(prefix="ftz-bench-sdist-") as work:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                              "-d", work, f"llama-cpp-python=={version}"],
                             capture_output=True, text=True)
        archives = list(Path(work).glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-3:])
            raise FileNotFoundError(f"could not fetch llama-cpp-python {version}'s sdist for its converter: {tail}")
        with tarfile.open(archives[0]) as tar, atomic_folder(folder) as tmp:
            for member in tar.getmembers():
                parts = member.name.split("/vendor/llama.cpp/", 1)
                if len(parts) == 2 and parts[1].startswith(_SOURCE_MEMBERS) and (member.isfile() or member.isdir()):
                    member.name = parts[1]
                    tar.extract(member, tmp, filter="data")
    return folder


_CONVERT = r"""
import sys, runpy
src, hf, out, outtype, pre = sys.argv[1:6]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
for obj in vars(base).values():
    if isinstance(obj, type) and "get_vocab_base_pre" in vars(obj):
        obj.get_vocab_base_pre = lambda self, tokenizer: pre
    if isinstance(obj, type) and "_set_vocab_sentencepiece" in vars(obj):
        # Without a tokenizer.model this must fail with FileNotFoundError (the converters then try
        # the BPE path), not with ImportError when the sentencepiece package is absent.
        def _sentencepiece(self, *a, _original=vars(obj)["_set_vocab_sentencepiece"], **k):
            if not (self.dir_model / "tokenizer.model").is_file():
                raise FileNotFoundError("no tokenizer.model")
            return _original(self, *a, **k)
        obj._set_vocab_sentencepiece = _sentencepiece
sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", out, "--outtype", outtype]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert(hf: Path, out: Path, src: Path, outtype: str = "f16") -> None:
    model_type = json.loads((hf / "config.json").read_text())["model_type"]
    pre = _PRE_TOKENIZER.get(model_type, "default")
    run = subprocess.run([sys.executable, "-c", _CONVERT, str(src), str(hf), str(out), outtype, pre],
                         capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": ""})
    if run.returncode != 0 or not out.is_file():
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-6:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {tail}")


def quantize(src: Path, dst: Path, quant: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[quant]
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize to {quant} failed")


def build_gguf(size: str, llm: Optional[str], quant: str) -> list[dict]:
    """F16 GGUF from the HF folder (once), then ``quant``; a "build" row."""
    start = time.perf_counter()
    target = gguf_path(size, llm, quant)
    note = "reused"
    if not target.is_file():
        src = find_converter(download=True)
        f16 = gguf_path(size, llm, "f16")
        f16.parent.mkdir(parents=True, exist_ok=True)
        if not f16.is_file():
            partial = f16.with_suffix(".partial")
            convert(artifacts.llm_hf(size, llm), partial, src)
            os.replace(partial, f16)
        if quant == "q8_0":  # the converter writes Q8_0 itself (pure Python)
            partial = target.with_suffix(".partial")
            convert(artifacts.llm_hf(size, llm), partial, src, "q8_0")
            os.replace(partial, target)
        elif quant != "f16":  # the installed library's quantizer, from F16
            partial = target.with_suffix(".partial")
            quantize(f16, partial, quant)
            os.replace(partial, target)
        note = "built"
    return [make_row("build", size, artifacts.llm_label(size, llm), "GGUF", "llama.cpp", quant.upper(), note=note,
                     info={"seconds": round(time.perf_counter() - start, 1), "file": str(target),
                           "bytes": target.stat().st_size})]


def weight_bytes(path: Path) -> int:
    """Bytes read per decoded token: every tensor but the token embedding table, unless the
    output layer shares it (then it is read whole by the output projection)."""
    try:
        from gguf import GGUFReader

        tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
        total = sum(tensors.values())
        return total if "output.weight" not in tensors else total - tensors.get("token_embd.weight", 0)
    except Exception:  # noqa: BLE001 - an unreadable header: the file size is the next best figure
        return path.stat().st_size


def llamacpp_case(size: str, llm: Optional[str], quant: str, new_tokens: int, repeats: int, warmup: int) -> list[dict]:
    import llama_cpp
    from llama_cpp import Llama

    from ftz_edge.bench.llm_bench import FASTER_IS_HIGHER, UNITS, _generation_run, _row, image_tokens

    path = gguf_path(size, llm, quant)
    prompt_len = image_tokens(size) + artifacts.TEXT_TOKENS
    threads = os.cpu_count() or 1
    batch = 1 << (prompt_len - 1).bit_length()
    model = Llama(model_path=str(path), n_ctx=prompt_len + new_tokens + 8, n_batch=batch, n_ubatch=batch,
                  n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = model.n_vocab()
    ids = np.random.default_rng(0).integers(100, min(vocab, 30000), size=prompt_len).tolist()

    def last_token() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(vocab,)).argmax())

    def prefill():
        model.reset()
        model.eval(ids)
        return last_token()

    def step(token):
        model.eval([token])
        return last_token()

    metrics = collect(_generation_run(prefill, step, prompt_len, new_tokens), repeats, warmup, UNITS, FASTER_IS_HIGHER)
    return [_row(size, llm, "LLM", "llama.cpp (llama-cpp-python)", quant.upper(), metrics, weight_bytes(path),
                 {"threads": threads, "file_bytes": path.stat().st_size, "new_tokens": new_tokens,
                  "version": installed_version()}, None, prompt_len)]
