"""``ftz-bench``: how fast FtZ runs on this machine, written as Markdown, JSON and PNG plots.

    ftz-bench --quick                              # the CPU reference preset (≤ ~10 min, warm caches)
    ftz-bench --suite vision --size real --augmenter dinov2-base --batch 1
    ftz-bench --suite llm --llm qwen2.5-0.5b --backends onnxruntime,transformers --precisions fp32,int4
    ftz-bench --update-readme README.md --from results/<device>
    ftz-bench --suite e2e --size real --e2e-bundle B --out /tmp/run   # a paper-size bundle as it is
    ftz-bench --merge-into results/<device> --from /tmp/run          # its rows into a committed run

Every case (one model in one framework and precision) runs in its own process (peak memory per
path; a crash is a failed row); figures are medians of ``--repeats`` runs after ``--warmup``
runs, with min and max. What the machine lacks (a GPU, TensorRT, llama.cpp) is listed as not
available, with the reason, instead of silently missing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from ftz_edge import precision as P
from ftz_edge.bench import artifacts
from ftz_edge.bench.results import Case, make_row, merge_samples

SUITES = ("vision", "llm", "e2e", "startup")
VISION_BACKENDS = ("pytorch", "compile", "onnxruntime", "tensorrt")
LLM_BACKENDS = ("transformers", "onnxruntime", "llamacpp")
PRECISIONS = (P.FP32, P.BF16, P.FP16, P.INT8, P.INT8_DYNAMIC, P.INT4, *P.GGUF_QUANTS)
QUICK = dict(suite="vision,llm,e2e,startup", size="default,real", augmenter="dinov2-base,dinov2-large",
             llm="qwen2.5-0.5b", batch="1", repeats=3, warmup=1, new_tokens=16,
             backends="pytorch,onnxruntime,transformers,llamacpp",
             precisions="fp32,bf16,int8,int8-dynamic,int4,q8_0,q4_0", llm_block_sizes="32,128")


def _csv(text: Optional[str], allowed=None, what="value") -> List[str]:
    items = [s.strip() for s in (text or "").split(",") if s.strip()]
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise SystemExit(f"ftz-bench: error: unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


class Plan:
    """The cases to run, in order, and the rows known without running anything."""

    def __init__(self, args, gpu: bool, cpu_flags: list[str]):
        self.args, self.gpu, self.cpu_flags = args, gpu, cpu_flags
        self.cases: list[Case] = []
        self.rows: list[dict] = []  # not available / skipped / reused artifacts
        self.notes: list[str] = []
        self._building: set = set()
        self.failed_builds: dict = {}  # build key -> why, known before running anything

    def want(self, backend: str, precision: str) -> bool:
        a = self.args
        return (not a.backends or backend in a.backends) and (not a.precisions or precision in a.precisions)

    @property
    def torch_precisions(self) -> tuple:
        """PyTorch baselines: fp16 on a GPU only (CPUs emulate it)."""
        return P.TORCH_DTYPES if self.gpu else tuple(p for p in P.TORCH_DTYPES if p != P.FP16)

    @property
    def native_bf16(self) -> bool:
        return any(f in self.cpu_flags for f in ("avx512_bf16", "amx_bf16"))

    def add(self, case: Case) -> None:
        self.cases.append(case)

    def build(self, label: str, target: str, kwargs: dict, done: bool, row: dict, needs: Sequence[str] = ()) -> str:
        """Plan building an artifact unless it is cached; returns its key for ``Case.needs``.
        ``needs``: keys of the builds this one reads (it is not tried when one of them failed)."""
        key = f"{target}{sorted(kwargs.items())}"
        if key in self._building:
            return key
        self._building.add(key)
        if done:
            self.rows.append({**row, "note": "reused"})
        else:
            build = Case("build", f"build {label}", target, kwargs, row, timeout=self.args.timeout * 3)
            build.needs = [key, *needs]  # a build "needs" itself: its failure is recorded under its key
            self.add(build)
        return key

    def unavailable(self, row: dict, why: str) -> None:
        self.rows.append({**row, "status": "not available", "note": why})

    # -- suites ---------------------------------------------------------------------------
    def vision(self, size: str, augmenter: Optional[str]) -> None:
        a = self.args
        model = artifacts.vision_label(size, augmenter)
        per_batch = a.warmup + a.repeats
        kw = dict(size=size, augmenter=augmenter, repeats=a.repeats, warmup=a.warmup)
        device = "cuda" if self.gpu else "cpu"
        for precision in self.torch_precisions:
            if not self.want("pytorch", precision):
                continue
            row = make_row("vision", size, model, "FtZ tower", "PyTorch eager" + (" (CUDA)" if self.gpu else ""), precision)
            if precision == "bf16" and not self.gpu and not self.native_bf16:
                self.unavailable(row, "this CPU has no native bf16 (AVX512-BF16 or AMX); PyTorch would emulate it")
                continue
            parts = precision == "fp32" or self.gpu
            self.add(Case("vision", f"vision {model} PyTorch {precision}", "ftz_edge.bench.vision_bench:torch_case",
                          dict(kw, precision=precision, device=device, batches=a.batches, parts=parts), row,
                          expected_ticks=len(a.batches) * (4 if parts else 1) * per_batch, timeout=a.timeout))
        if self.want("compile", "fp32") and (self.gpu or (a.backends and "compile" in a.backends)):
            precision = "fp16" if self.gpu else "fp32"
            row = make_row("vision", size, model, "FtZ tower", "PyTorch torch.compile", precision)
            self.add(Case("vision", f"vision {model} torch.compile", "ftz_edge.bench.vision_bench:torch_case",
                          dict(kw, precision=precision, device=device, batches=a.batches, compile=True, parts=False),
                          row, expected_ticks=len(a.batches) * (per_batch + 1), timeout=a.timeout))
        for precision in artifacts.VISION_PRECISIONS:
            if not self.want("onnxruntime", precision):
                continue
            row = make_row("vision", size, model, "FtZ tower", "ONNX Runtime", precision)
            path = artifacts.vision_onnx(size, augmenter, precision)
            key = self.build(f"{model} ONNX {precision}", "ftz_edge.bench.artifacts:build_vision_onnx",
                             dict(size=size, augmenter=augmenter, precision=precision), path.exists(),
                             make_row("build", size, model, "vision ONNX", "onnxruntime", precision))
            self.add(Case("vision", f"vision {model} ORT {precision}", "ftz_edge.bench.vision_bench:ort_case",
                          dict(kw, precision=precision, batches=a.batches), row,
                          expected_ticks=len(a.batches) * per_batch, timeout=a.timeout, needs=[key]))
        for precision in (P.FP16, P.INT8):
            if not self.want("tensorrt", precision):
                continue
            row = make_row("vision", size, model, "FtZ tower", "TensorRT", precision)
            from ftz_edge.export.tensorrt import tensorrt_available

            if not tensorrt_available() or not self.gpu:
                self.unavailable(row, "not available on this machine (" + (
                    "TensorRT is not installed" if not tensorrt_available() else "no CUDA GPU") + ")")
                continue
            key = self.build(f"{model} ONNX {precision}", "ftz_edge.bench.artifacts:build_vision_onnx",
                             dict(size=size, augmenter=augmenter, precision=precision),
                             artifacts.vision_onnx(size, augmenter, precision).exists(),
                             make_row("build", size, model, "vision ONNX", "onnxruntime", precision))
            self.add(Case("vision", f"vision {model} TensorRT {precision}", "ftz_edge.bench.vision_bench:tensorrt_case",
                          dict(kw, precision=precision, batches=a.batches), row,
                          expected_ticks=len(a.batches) * per_batch, timeout=a.timeout, needs=[key]))

    def llm(self, size: str, llm: Optional[str]) -> None:
        a = self.args
        model = artifacts.llm_label(size, llm)
        kw = dict(size=size, llm=llm, new_tokens=a.new_tokens, repeats=a.repeats, warmup=a.warmup)
        ticks = a.warmup + a.repeats
        hf = []
        if size == "real":
            hf = [self.build(f"{model} HF folder", "ftz_edge.bench.artifacts:build_llm_hf", dict(size=size, llm=llm),
                             artifacts.llm_hf(size, llm).exists(),
                             make_row("build", size, model, "HF folder (random weights)", "transformers", "fp32"))]
        device = "cuda" if self.gpu else "cpu"
        for precision in self.torch_precisions:
            if not self.want("transformers", precision):
                continue
            row = make_row("llm", size, model, "LLM", "transformers eager" + (" (CUDA)" if self.gpu else ""), precision, 1)
            if precision == "bf16" and not self.gpu and not self.native_bf16:
                self.unavailable(row, "this CPU has no native bf16 (AVX512-BF16 or AMX); PyTorch would emulate it")
                continue
            self.add(Case("llm", f"llm {model} transformers {precision}", "ftz_edge.bench.llm_bench:transformers_case",
                          dict(kw, precision=precision, device=device), row, expected_ticks=ticks, timeout=a.timeout,
                          needs=hf))
        import onnxruntime as ort

        cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
        for precision in P.LLM_PRECISIONS:
            if not self.want("onnxruntime", precision):
                continue
            # int4 / int8 at real size: one decoder per block size asked for (fp32 and fp16 have none;
            # the tiny default LLM's layers are narrower than the larger blocks).
            blockwise = precision in P.QUANTIZED_LLM and size == "real"
            blocks = a.llm_block_sizes if blockwise else [P.DEFAULT_LLM_BLOCK_SIZE]
            for block in blocks:
                label = artifacts.llm_precision_label(precision, block)
                row = make_row("llm", size, model, "LLM", "ONNX Runtime (runtime decoder)", label, 1)
                if precision == "fp16" and not cuda_ep:
                    self.unavailable(row, "ORT GenAI's builder makes fp16 decoders for CUDA only, and this onnxruntime "
                                          "has no CUDA execution provider")
                    continue
                key = self.build(f"{model} ORT {label}", "ftz_edge.bench.artifacts:build_llm_ort",
                                 dict(size=size, llm=llm, precision=precision, block_size=block),
                                 artifacts.llm_ort(size, llm, precision, block).exists(),
                                 make_row("build", size, model, "ORT GenAI decoder", "onnxruntime", label))
                providers = ["CUDAExecutionProvider"] if precision == "fp16" else None
                self.add(Case("llm", f"llm {model} ORT {label}", "ftz_edge.bench.llm_bench:ort_case",
                              dict(kw, precision=precision, providers=providers, block_size=block), row,
                              expected_ticks=ticks, timeout=a.timeout, needs=hf + [key]))
        quants = [q for q in P.GGUF_QUANTS if self.want("llamacpp", q)]
        if quants:
            from ftz_edge.bench import llamacpp

            usable, why = llamacpp.availability()
            for quant in quants:
                row = make_row("llm", size, model, "LLM", "llama.cpp (llama-cpp-python)", quant.upper(), 1)
                if not usable:
                    self.unavailable(row, why)
                    continue
                key = self.build(f"{model} GGUF {quant}", "ftz_edge.bench.llamacpp:build_gguf",
                                 dict(size=size, llm=llm, quant=quant), llamacpp.gguf_path(size, llm, quant).is_file(),
                                 make_row("build", size, model, "GGUF", "llama.cpp", quant.upper()))
                self.add(Case("llm", f"llm {model} llama.cpp {quant}", "ftz_edge.bench.llamacpp:llamacpp_case",
                              dict(kw, quant=quant), row, expected_ticks=ticks, timeout=a.timeout, needs=hf + [key]))

    def e2e(self) -> None:
        a = self.args
        if "default" in a.sizes:
            row = make_row("e2e", "default", "default bundle", "image + question -> answer", "ftz_edge runtime", "bundle", 1)
            self.add(Case("e2e", "e2e default bundle", "ftz_edge.bench.e2e_bench:e2e_case",
                          dict(bundle=a.bundle, new_tokens=a.new_tokens, repeats=a.repeats, warmup=a.warmup), row,
                          expected_ticks=a.warmup + a.repeats, timeout=a.timeout))
        if "real" in a.sizes:
            self.e2e_real()

    def e2e_real(self) -> None:
        """The paper-size rows: each bundle ``ftz-export`` wrote (``--e2e-bundle``, repeatable; else
        the cached paper-size artifact, built once) through the runtime, beside PyTorch eager fp32
        (and bf16 where the CPU has it natively) once per checkpoint those bundles came from."""
        a = self.args
        path = "image + question -> answer"
        bundles = []  # (bundle, checkpoint, label, precision, build keys the runtime case reads)
        torch_needs: list = []  # build keys the PyTorch cases read (the checkpoint's)
        if a.e2e_bundle:
            for given in a.e2e_bundle:
                bundle = Path(given)
                checkpoint = Path(a.e2e_checkpoint) if a.e2e_checkpoint else artifacts.bundle_checkpoint(bundle)
                label, precision = artifacts.e2e_label(bundle, checkpoint), artifacts.bundle_precision(bundle)
                twin = next((b for b, _, other, same, _ in bundles if (other, same) == (label, precision)), None)
                if twin is not None:  # their rows, and the ratios keyed by them, would be one
                    raise SystemExit(f"ftz-bench: error: --e2e-bundle {twin} and {bundle} are both {precision} bundles "
                                     f"of {label}: their rows would share one name; bench them in separate runs")
                bundles.append((bundle, checkpoint, label, precision, []))
        else:
            bundle, label = artifacts.paper_bundle(), artifacts.paper_label()
            options = artifacts.PAPER_BUNDLE_OPTIONS
            precision = f"{options['precision']}/{options['llm_precision']}"
            checkpoint = artifacts.paper_checkpoint()
            made = self.build("paper-size FtZ checkpoint", "ftz_edge.bench.artifacts:build_paper_checkpoint", {},
                              artifacts.is_checkpoint_folder(checkpoint),
                              make_row("build", "real", label, "FtZ checkpoint (random weights)", "PyTorch", "fp32"))
            needs = [self.build(f"paper-size bundle {precision}", "ftz_edge.bench.artifacts:build_paper_bundle", {},
                                artifacts.is_bundle(bundle),
                                make_row("build", "real", label, "bundle (ftz-export)", "ftz-export", precision),
                                needs=[made])]
            if a.e2e_checkpoint:
                checkpoint = Path(a.e2e_checkpoint)
            else:
                torch_needs = [made]
            bundles.append((bundle, checkpoint, label, precision, needs))
        kw = dict(new_tokens=a.new_tokens, repeats=a.repeats, warmup=a.warmup, question=artifacts.E2E_QUESTION,
                  size="real")
        for bundle, checkpoint, label, precision, needs in bundles:
            self.add(Case("e2e", f"e2e {label} runtime {precision}", "ftz_edge.bench.e2e_bench:e2e_case",
                          dict(kw, bundle=str(bundle), model=label, checkpoint=str(checkpoint) if checkpoint else None,
                               ignore_eos=True),
                          make_row("e2e", "real", label, path, "ftz_edge runtime", precision, 1),
                          expected_ticks=a.warmup + a.repeats, timeout=a.timeout, needs=needs))
        for label, (bundle, checkpoint) in {label: (b, c) for b, c, label, _, _ in bundles}.items():
            for torch_precision in (P.FP32, P.BF16):
                if not self.want("pytorch", torch_precision):
                    continue
                row = make_row("e2e", "real", label, path, "PyTorch eager", torch_precision, 1)
                if torch_precision == "bf16" and not self.native_bf16:
                    self.unavailable(row, "this CPU has no native bf16 (AVX512-BF16 or AMX); PyTorch would emulate it")
                    continue
                if checkpoint is None:
                    self.unavailable(row, f"the checkpoint {bundle} was exported from is not here (its manifest's "
                                          "provenance.checkpoint); --e2e-checkpoint PATH gives it")
                    continue
                self.add(Case("e2e", f"e2e {label} PyTorch {torch_precision}", "ftz_edge.bench.e2e_bench:torch_case",
                              dict(kw, checkpoint=str(checkpoint), precision=torch_precision, model=label), row,
                              expected_ticks=a.warmup + a.repeats, timeout=a.timeout, needs=torch_needs))

    @property
    def real_e2e(self) -> bool:
        return any(c.suite == "e2e" and c.placeholder["size"] == "real" for c in self.cases)

    def startup(self) -> None:
        a = self.args
        for mode, label in (("cold", "cold start (warmup=False)"), ("warm", "warm start (warmup=True)")):
            row = make_row("startup", "default", "default bundle", label, "ftz_edge runtime", "bundle", 1)
            self.add(Case("startup", f"startup {mode}", "ftz_edge.bench.e2e_bench:startup_case",
                          dict(bundle=a.bundle, mode=mode, new_tokens=a.new_tokens), row,
                          expected_ticks=a.repeats + a.warmup, fresh_processes=a.repeats + a.warmup,
                          discard_first=a.warmup, timeout=a.timeout))


def make_plan(args, gpu: bool, cpu_flags: list[str]) -> Plan:
    plan = Plan(args, gpu, cpu_flags)
    if (("e2e" in args.suites and "default" in args.sizes) or "startup" in args.suites) and not args.list:
        # Built here, once, before any timing (ftz-export in a subprocess, as ftz-chat does).
        args.bundle = str(artifacts.default_bundle(args.bundle))
    if "vision" in args.suites:
        for size in args.sizes:
            for augmenter in (args.augmenters if size == "real" else [None]):
                plan.vision(size, augmenter)
    if "llm" in args.suites:
        for size in args.sizes:
            for llm in (args.llms if size == "real" else [None]):
                plan.llm(size, llm)
    if "e2e" in args.suites:
        plan.e2e()
    if "startup" in args.suites:
        plan.startup()
    if not gpu:
        plan.notes.append("No CUDA GPU here: PyTorch fp16/bf16 on GPU, batch 8, torch.compile by default, CUDA memory "
                          "and TensorRT were not run (they run where torch.cuda.is_available()).")
    return plan


def run_plan(plan: Plan, log: Path, show_progress: bool = True) -> list[dict]:
    from ftz_edge.bench.isolate import run_isolated

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers / the bench extra
        tqdm = None
    total = sum(c.expected_ticks for c in plan.cases)
    bar = tqdm(total=total, unit="run", dynamic_ncols=True, disable=not show_progress) if tqdm else None
    rows = list(plan.rows)
    failed_builds: dict = dict(plan.failed_builds)
    for case in plan.cases:
        if bar:
            bar.set_description(case.label[:60])
        broken = [failed_builds[k] for k in case.needs if k in failed_builds]
        if broken:  # what it would read was not built: say why, do not try
            rows.append({**case.placeholder, "status": "failed", "note": f"not built: {broken[0]}"})
            if case.suite == "build":  # nor what would read this build
                failed_builds.setdefault(case.needs[0], f"not built: {broken[0]}")
            if bar:
                bar.update(case.expected_ticks)
            continue
        counted = [0]

        def progress(n, counted=counted, case=case):
            step = min(n, max(case.expected_ticks - counted[0], 0))
            counted[0] += step
            if bar and step:
                bar.update(step)

        runs, error = [], None
        load_before = _load_average()
        for attempt in range(case.fresh_processes):
            result = run_isolated(case.target, case.kwargs, timeout=case.timeout, log=log, on_progress=progress)
            if "error" in result:
                error = result["error"]
                break
            if attempt < case.discard_first:
                continue
            for r in result["rows"]:
                r.setdefault("memory", {})
                r["memory"]["peak_rss_mb"] = result.get("peak_rss_mb")
                r["memory"]["process_baseline_rss_mb"] = result.get("baseline_rss_mb")
                r["info"]["process_seconds"] = round(result["seconds"], 1)
                # The machine's 1-minute load around the case (this case's own threads count in it):
                # on a shared machine it says how much else was running.
                r["info"]["load_average_1min"] = [load_before, _load_average()]
            runs.append(result["rows"])
        if error is not None:
            rows.append({**case.placeholder, "status": "failed", "note": error})
            if case.suite == "build":  # its own key (the first of its needs); the others are what it read
                failed_builds[case.needs[0]] = error
        else:
            rows += merge_samples(runs) if case.fresh_processes > 1 else runs[0]
        if bar and counted[0] < case.expected_ticks:
            bar.update(case.expected_ticks - counted[0])
    if bar:
        bar.close()
    return rows


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on Windows
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ftz-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="vision,llm,e2e,startup", help=f"comma list of {', '.join(SUITES)}")
    p.add_argument("--size", default="default,real", help="default (the shipped tiny model) and/or real "
                   "(real-size architectures with random weights)")
    p.add_argument("--augmenter", default="dinov2-large,dinov2-base", help="real-size augmenters (with CLIP-L/14-336): "
                   + ", ".join(artifacts.AUGMENTERS))
    p.add_argument("--llm", default="qwen2.5-0.5b,tinyllama-1.1b", help="real-size LLMs: " + ", ".join(artifacts.LLMS))
    p.add_argument("--backends", help="only these: " + ", ".join(VISION_BACKENDS + LLM_BACKENDS))
    p.add_argument("--precisions", help="only these: " + ", ".join(PRECISIONS))
    p.add_argument("--llm-block-sizes", default=str(P.DEFAULT_LLM_BLOCK_SIZE),
                   help="int4/int8 decoders: one row per quantization block size (ftz-export --llm-block-size; "
                        f"default {P.DEFAULT_LLM_BLOCK_SIZE}, its default)")
    p.add_argument("--batch", help="vision batch sizes (default 1,4; 1,4,8 on a GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="discarded runs before them (default 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per LLM / e2e run (default 32)")
    p.add_argument("--quick", action="store_true",
                   help="the CPU reference preset: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                   + " (explicit options still win)")
    p.add_argument("--bundle", help="bundle for the e2e and startup suites (default: the shipped model's, built once)")
    p.add_argument("--e2e-bundle", metavar="PATH", action="append", help="the e2e suite's real-size rows run this "
                   "exported bundle as it is (repeat the option for several; default: a paper-size fp16/int4 bundle "
                   "that ftz-export builds once from a random-weight paper-size checkpoint: ~10-20 min, ~12 GB peak RSS)")
    p.add_argument("--e2e-checkpoint", metavar="PATH", help="checkpoint for that row's PyTorch baselines and FLOP "
                   "counts (default: the one the bundle's manifest names, when it is here)")
    p.add_argument("--out", help="results folder (default results/<device>)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case before it is stopped (default 1800)")
    p.add_argument("--list", action="store_true", help="print the planned cases and exit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--update-readme", metavar="README", help="replace README's ftz-bench section from --from DIR")
    p.add_argument("--merge-into", metavar="DIR", help="merge the rows of the run in --from DIR into the results "
                   "folder DIR (rows of the same case replaced, what it measured no longer 'not available'; the rest kept)")
    p.add_argument("--from", dest="from_dir", metavar="DIR", help="results folder for --update-readme / --merge-into")
    args = p.parse_args(argv)
    explicit = {a.dest for a in p._actions if a.option_strings and any(o in (argv if argv is not None else sys.argv[1:])
                                                                      for o in a.option_strings)}
    if args.quick:
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, value)
    args.suites = _csv(args.suite, SUITES, "suite")
    args.sizes = _csv(args.size, ("default", "real"), "size")
    args.augmenters = _csv(args.augmenter, artifacts.AUGMENTERS, "augmenter")
    args.llms = _csv(args.llm, artifacts.LLMS, "LLM")
    args.backends = _csv(args.backends, VISION_BACKENDS + LLM_BACKENDS, "backend")
    args.precisions = _csv(args.precisions, PRECISIONS, "precision")
    args.llm_block_sizes = [int(b) for b in _csv(args.llm_block_sizes, [str(b) for b in P.LLM_BLOCK_SIZES],
                                                 "LLM block size")]
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 2:
        p.error("--repeats must be ≥ 1, --warmup ≥ 0, --new-tokens ≥ 2")
    for bundle in args.e2e_bundle or []:
        if not (Path(bundle) / "manifest.json").is_file():
            p.error(f"--e2e-bundle {bundle} is not a bundle (no manifest.json)")
    if args.e2e_checkpoint and not artifacts.is_checkpoint_folder(Path(args.e2e_checkpoint)):
        p.error(f"--e2e-checkpoint {args.e2e_checkpoint} is not an FtZ checkpoint (ftz_config.json and "
                "ftz_weights.safetensors)")
    return p, args


def main(argv: Optional[List[str]] = None) -> int:
    from ftz_edge.bench import report

    parser, args = parse_args(argv)
    if args.merge_into:
        if not args.from_dir:
            parser.error("--merge-into needs --from DIR (the results folder of the run to merge)")
        merged = report.merge_into(args.merge_into, args.from_dir)
        print(f"{args.merge_into}: {merged} row(s) merged from {args.from_dir}")
        return 0
    if args.update_readme:
        if not args.from_dir:
            parser.error("--update-readme needs --from DIR (a results folder)")
        changed = report.update_readme(args.update_readme, args.from_dir)
        print(f"{args.update_readme}: {'updated' if changed else 'already up to date'} from {args.from_dir}")
        return 0
    from ftz_edge.bench import bounds
    from ftz_edge.bench.machine import describe_machine, device_slug
    from ftz_edge.bench.memory import measure_bandwidth

    started = time.perf_counter()
    machine = describe_machine()
    gpu = machine["gpu"] is not None
    if args.batch:
        args.batches = [int(b) for b in _csv(args.batch)]
    else:
        args.batches = [1, 4, 8] if gpu else [1, 4]
    out = Path(args.out or Path("results") / device_slug(machine))
    plan = make_plan(args, gpu, machine["cpu_flags"])
    if args.list:
        for case in plan.cases:
            print(f"{case.suite:8s} {case.label}")
        for row in plan.rows:
            print(f"{row['suite']:8s} {row['model']} {row['backend']} {row['precision']}: {row['status']} {row['note']}")
        return 0
    print(f"ftz-bench: {len(plan.cases)} cases on {device_slug(machine)}; results in {out}", file=sys.stderr)
    # The machine's rates, before any case runs: bandwidth for decode bounds, the fp32 GEMM rate
    # for the real-size end-to-end row's FLOP bound.
    bandwidth = measure_bandwidth(256 if args.quick else 512) if "llm" in args.suites or plan.real_e2e else None
    compute = bounds.measure_matmul_gflops() if plan.real_e2e else None
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    log.write_text("")
    rows = run_plan(plan, log, show_progress=not args.no_progress)
    command = ("ftz-bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))).strip()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bounds.annotate(rows, machine, bandwidth, compute, {"command": command, "created": created})
    options = {k: v for k, v in vars(args).items() if k in (
        "suites", "sizes", "augmenters", "llms", "backends", "precisions", "batches", "repeats", "warmup",
        "new_tokens", "quick", "bundle", "e2e_bundle", "e2e_checkpoint", "llm_block_sizes")}
    results = {"device": device_slug(machine), "machine": machine, "bandwidth": bandwidth, "compute": compute,
               "options": options, "command": command, "created": created,
               "seconds": round(time.perf_counter() - started, 1), "rows": rows, "notes": plan.notes}
    report.write_report(results, out)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"ftz-bench: wrote {out}/results.md, results.json and plots in {time.perf_counter() - started:.0f} s"
          + (f"; {len(failed)} case(s) failed (see results.md and {log})" if failed else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
