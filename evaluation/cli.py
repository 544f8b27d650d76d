"""``ftz-eval``: accuracy of checkpoints and bundles side by side, on the same questions.

    ftz-eval --model runs/ftz-qwen --model int8=bundles/ftz-int8 --pope data/pope --out results/
    ftz-eval --model ftz=runs/ftz --model clip=runs/clip --model mof=runs/mof --mme data/MME --out results/
    ftz-eval --synthetic 500 --out results/          # the shipped default model on the synthetic set
    ftz-eval --model runs/ftz --mmmu data/MMMU --mmvet data/mm-vet --grader-url https://api.openai.com/v1 --out results/

Each --model is a training checkpoint (ftz_config.json) or an exported bundle (manifest.json),
detected from its folder. Every model answers every question greedily; the table (rows =
metrics, columns = models) is printed and written to OUT/eval.md, OUT/eval.json adds each
model's identity and every prediction, and OUT/eval.png shows the table as bars (with matplotlib). Bad inputs end with ``ftz-eval: error: ...`` (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import ftz_edge
from ftz_edge.cli.args import DataclassOptions, Flag
from ftz_edge.evaluation import readers
from ftz_edge.evaluation.errors import EvalDataError
from ftz_edge.evaluation.grader import ChatClient, GraderConfig, GraderError, grade_entries
from ftz_edge.evaluation.metrics import MMVET_DEFAULT_GRADER
from ftz_edge.evaluation.predictors import ModelSpec, identity, load_predictor, parse_models
from ftz_edge.evaluation.questions import Question
from ftz_edge.evaluation.report import markdown_table, table_rows, write_atomic, write_report
from ftz_edge.evaluation.scoring import score
from ftz_edge.precision import FP32, TORCH_DTYPES

# Short answers are all these benchmarks take; a few tokens past the answer leave room for
# "No, there is not ..." (POPE reads the first sentence) and multi-word TextVQA answers.
DEFAULT_MAX_NEW_TOKENS = {"pope": 8, "mme": 8, "textvqa": 16, "synthetic": 4,
                          # MMMU: a letter or a short answer (lmms-eval's mmmu_val: 16); MM-Vet: free-form
                          # answers, LLaVA-1.5's model_vqa.py generates up to 1024 tokens.
                          "mmmu": 16, "mmvet": 1024}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EvalConfig:
    models: List[str] = field(default_factory=list)  # PATH or LABEL=PATH; none: the shipped default
    out: Path = Path("ftz-eval")
    pope: Optional[Path] = None
    pope_images: Optional[Path] = None
    textvqa: Optional[Path] = None
    textvqa_questions: Optional[Path] = None
    textvqa_annotations: Optional[Path] = None
    textvqa_images: Optional[Path] = None
    textvqa_drop_ocr_tokens: bool = False
    mme: Optional[Path] = None
    synthetic: Optional[int] = None  # number of held-out questions
    synthetic_seed: int = 0
    mmmu: Optional[Path] = None  # the folder of MMMU/<Subject>/*.parquet
    mmmu_split: str = "validation"
    mmmu_prompt: str = "lmms-eval"  # one of readers.MMMU_PROMPTS
    mmvet: Optional[Path] = None  # the folder of mm-vet.json and images/
    grader_url: Optional[str] = None  # MM-Vet's grader: an OpenAI-compatible API; none: no MM-Vet score
    grader_model: str = MMVET_DEFAULT_GRADER
    grader_key_env: str = "OPENAI_API_KEY"
    limit: Optional[int] = None
    max_new_tokens: Optional[int] = None  # one value for every benchmark
    device: str = "auto"  # checkpoints: auto, cpu, cuda
    torch_dtype: str = FP32  # checkpoints: one of TORCH_DTYPES
    providers: Optional[List[str]] = None  # bundles: onnxruntime execution providers
    progress: bool = True

    def benchmarks_requested(self) -> List[str]:
        given = {"pope": self.pope, "mme": self.mme,
                 "textvqa": self.textvqa or self.textvqa_questions or self.textvqa_annotations or self.textvqa_images,
                 "synthetic": self.synthetic, "mmmu": self.mmmu, "mmvet": self.mmvet}
        return [name for name, value in given.items() if value is not None]


def load_benchmarks(config: EvalConfig) -> Dict[str, Dict[str, Any]]:
    """name -> {questions, source, max_new_tokens}; every file is read and checked here,
    before any model is loaded."""
    benchmarks: Dict[str, Dict[str, Any]] = {}
    for name in config.benchmarks_requested():
        if name == "pope":
            images = config.pope_images or readers.default_pope_images(config.pope)
            questions = readers.read_pope(config.pope, images, config.limit)
            source = {"annotations": str(config.pope), "images": str(images)}
        elif name == "mme":
            questions = readers.read_mme(config.mme, config.limit)
            source = {"folder": str(config.mme)}
        elif name == "textvqa":
            paths = readers.textvqa_paths(config.textvqa, config.textvqa_questions, config.textvqa_annotations,
                                          config.textvqa_images)
            questions = readers.read_textvqa(*paths, limit=config.limit, drop_ocr_tokens=config.textvqa_drop_ocr_tokens)
            source = dict(zip(("questions", "annotations", "images"), map(str, paths)))
        elif name == "mmmu":
            questions = readers.read_mmmu(config.mmmu, config.mmmu_split, config.limit, config.mmmu_prompt)
            source = {"folder": str(config.mmmu), "split": config.mmmu_split, "prompt": config.mmmu_prompt,
                      "images": "image_1 only (the MMMU repo's LLaVA run)"}
        elif name == "mmvet":
            questions = readers.read_mmvet(config.mmvet, limit=config.limit)
            source = {"folder": str(config.mmvet)}
            if config.grader_url:
                _grader_config(config).check()
                source.update(grader_url=config.grader_url, grader_model=config.grader_model)
            else:
                source["grader"] = "none: answers written in the official submission format, not scored"
        else:
            questions = readers.read_synthetic(config.synthetic, config.synthetic_seed, config.limit)
            source = {"generator": "ftz_edge.training.synthetic", "split": "test", "n": str(config.synthetic),
                      "seed": str(config.synthetic_seed)}
        benchmarks[name] = {"questions": questions, "source": source,
                            "max_new_tokens": config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[name]}
    return benchmarks


def _grader_config(config: EvalConfig) -> GraderConfig:
    return GraderConfig(url=config.grader_url or "", model=config.grader_model, key_env=config.grader_key_env)


def submission_path(out: Path, label: str) -> Path:
    """OUT/mmvet-LABEL.json, the label made safe for a file name."""
    safe = "".join(c if c.isalnum() or c in "._+-" else "_" for c in label)
    return out / f"mmvet-{safe}.json"


def finish_mmvet(config: EvalConfig, label: str, entries: List[Dict[str, Any]], progress: Callable) -> Dict[str, Any]:
    """After a model answered MM-Vet: its answers in the official submission format
    ({"v1_0": "answer", ...}, what LLaVA's convert_mmvet_for_eval.py writes and
    mm-vet_evaluator.py reads), then, with a grader, every answer graded (``grader.py``). A
    grader failure is kept (``grader_error``) and reported at the end; the answers stay saved."""
    path = submission_path(Path(config.out), label)
    write_atomic(path, json.dumps({e["id"]: e["prediction"] for e in entries}, indent=1, ensure_ascii=False) + "\n")
    info: Dict[str, Any] = {"submission": str(path)}
    if not config.grader_url:
        print(f"ftz-eval: {label}: MM-Vet answers written to {path} for the official evaluator; no --grader-url, "
              "so no MM-Vet score", file=sys.stderr)
        return info
    start = time.perf_counter()
    try:
        grade_entries(entries, ChatClient(_grader_config(config)), progress, f"{label} / mmvet grading")
    except GraderError as err:
        info["grader_error"] = str(err)
        print(f"ftz-eval: warning: {label}: {err}; MM-Vet left unscored (answers in {path})", file=sys.stderr)
    info["grading_seconds"] = round(time.perf_counter() - start, 3)
    return info


def _progress(config: EvalConfig) -> Callable:
    if config.progress:
        try:
            from tqdm import tqdm

            return lambda items, desc: tqdm(items, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # tqdm comes with the train extra; a runtime-only install may lack it
            pass
    return lambda items, desc: items


def answer_all(predictor, label: str, name: str, questions: List[Question], max_new_tokens: int,
               progress: Callable) -> List[Dict[str, Any]]:
    """Every question's entry. A question the model cannot take (an image that does not decode, a
    prompt past the context) gets the empty answer, which each benchmark's own rule then scores
    (MME and VQA: wrong; POPE's rule reads anything without "no" as yes); its error is kept in
    the entry, counted in the report and warned about, and the run goes on."""
    entries = []
    for question in progress(questions, f"{label} / {name}"):
        try:
            entry = question.entry(predictor(question.image, question.prompt, max_new_tokens))
        except ValueError as err:  # an unreadable image, a prompt longer than the context, ...
            print(f"ftz-eval: warning: {label}: {name} question {question.id} ({question.image_name}): {err}; "
                  "answered with an empty string", file=sys.stderr)
            entry = {**question.entry(""), "error": str(err)}
        entries.append(entry)
    return entries


def run(config: EvalConfig) -> Dict[str, Any]:
    benchmarks = load_benchmarks(config)
    if not benchmarks:
        raise EvalDataError("no benchmark given: use --pope, --mme, --textvqa, --mmmu, --mmvet and/or --synthetic N")
    specs: List[ModelSpec] = parse_models(config.models or [str(ftz_edge.DEFAULT_MODEL)])
    models = [identity(spec, config.torch_dtype) for spec in specs]
    progress = _progress(config)
    results: Dict[str, Dict[str, Any]] = {}
    for spec, model in zip(specs, models):
        predictor = load_predictor(spec, config.device, config.torch_dtype, config.providers)
        backends = getattr(getattr(predictor, "runtime", None), "backends", None)
        if backends:  # what actually ran (a TensorRT engine that cannot load here falls back to ONNX Runtime)
            model["backends"] = backends
            model["runtime"] = "tensorrt" if backends["vision"].startswith("tensorrt") else "onnxruntime"
        results[spec.label] = {}
        for name, bench in benchmarks.items():
            start = time.perf_counter()
            entries = answer_all(predictor, spec.label, name, bench["questions"], bench["max_new_tokens"], progress)
            seconds = time.perf_counter() - start
            extra = finish_mmvet(config, spec.label, entries, progress) if name == "mmvet" else {}
            results[spec.label][name] = {**score(name, entries).to_dict(), "seconds": round(seconds, 3),
                                         "errors": sum("error" in entry for entry in entries), **extra,
                                         "predictions": entries}
        del predictor  # one model in memory at a time
    rows = table_rows(models, results)
    report = {
        "tool": "ftz-eval", "ftz_edge_version": ftz_edge.__version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "models": models,
        "benchmarks": {name: {"questions": len(b["questions"]), "max_new_tokens": b["max_new_tokens"],
                              "source": b["source"]} for name, b in benchmarks.items()},
        "table": {"columns": [m["label"] for m in models], "rows": rows},
        "table_markdown": markdown_table(models, rows),
        "results": results,
    }
    report["files"] = {k: str(v) for k, v in write_report(Path(config.out), report).items()}
    return report


def _options() -> DataclassOptions:
    """ftz-eval's options: one per EvalConfig field (``--model`` for models, ``--provider`` for
    providers, ``--no-progress`` for progress)."""
    defaults = ", ".join(f"{k} {v}" for k, v in DEFAULT_MAX_NEW_TOKENS.items())
    return DataclassOptions(EvalConfig, flags={
        "models": Flag(flag="--model", metavar="[LABEL=]PATH",
                       help="checkpoint or bundle folder (repeatable; default: the shipped default model)"),
        "out": Flag(required=True, help="folder for eval.md, eval.json and eval.png"),
        "pope": Flag(metavar="PATH",
                     help="folder with coco_pope_{adversarial,popular,random}.json (or its coco/), or one such file"),
        "pope_images": Flag(metavar="DIR", help="COCO val2014 images (default: val2014/ beside)"),
        "textvqa": Flag(metavar="DIR", help=f"folder with {readers.TEXTVQA_QUESTIONS}, {readers.TEXTVQA_ANNOTATIONS}, "
                                            f"{readers.TEXTVQA_IMAGES}/"),
        "textvqa_questions": Flag(metavar="FILE", help="LLaVA's TextVQA question jsonl"),
        "textvqa_annotations": Flag(metavar="FILE", help="TextVQA_0.5.1_val.json"),
        "textvqa_images": Flag(metavar="DIR", help="TextVQA images"),
        "textvqa_drop_ocr_tokens": Flag(help="remove the 'Reference OCR token:' line from LLaVA's prompts (kept by "
                                             "default, as LLaVA-1.5)"),
        "mme": Flag(metavar="DIR", help="MME_Benchmark_release_version (or the folder holding it)"),
        "synthetic": Flag(metavar="N", help="N held-out questions of the synthetic fine-grained set"),
        "synthetic_seed": Flag(help="its seed (0: the shipped default model's eval)"),
        "mmmu": Flag(metavar="DIR", help="MMMU as the Hub ships it: MMMU/<Subject>/<split>-*.parquet (DIR or "
                                         "DIR/MMMU); needs pyarrow (the eval extra)"),
        "mmmu_split": Flag(choices=readers.MMMU_SPLITS, help="MMMU split (test's answers are not public)"),
        "mmmu_prompt": Flag(choices=readers.MMMU_PROMPTS,
                            help="MMMU prompt: lmms-eval's ('A. ...' options) or the MMMU repo's llava1.5 config "
                                 "('(A) ...')"),
        "mmvet": Flag(metavar="DIR", help="folder with mm-vet.json and images/ (or its mm-vet/)"),
        "grader_url": Flag(metavar="URL",
                           help="MM-Vet's grader: an OpenAI-compatible API base URL (e.g. https://api.openai.com/v1); "
                                "without it MM-Vet answers are saved in the official submission format, not scored"),
        "grader_model": Flag(metavar="NAME", help="the grader's model (the official evaluator's: %(default)s)"),
        "grader_key_env": Flag(metavar="VAR", help="environment variable holding the grader's API key"),
        "limit": Flag(metavar="N", help="first N questions per POPE split / MME subtask (whole images) / MMMU "
                                        "subject / TextVQA / MM-Vet / synthetic"),
        "max_new_tokens": Flag(metavar="N", help=f"for every benchmark (default: {defaults})"),
        "device": Flag(choices=DEVICES, help="checkpoints' device"),
        "torch_dtype": Flag(choices=TORCH_DTYPES, help="checkpoints' dtype"),
        "providers": Flag(flag="--provider", help="bundles: onnxruntime execution provider (repeatable, in order)"),
        "progress": Flag(help="no progress bar"),
    })


def build_parser(options: Optional[DataclassOptions] = None) -> argparse.ArgumentParser:
    options = options or _options()
    p = argparse.ArgumentParser(prog="ftz-eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Data is never downloaded: point at the benchmarks' local files (see README).")
    options.add_to(p, only=("models", "out"))
    options.add_to(p.add_argument_group("benchmarks (at least one)"),
                   only=("pope", "pope_images", "textvqa", "textvqa_questions", "textvqa_annotations", "textvqa_images",
                         "textvqa_drop_ocr_tokens", "mme", "synthetic", "synthetic_seed", "mmmu", "mmmu_split",
                         "mmmu_prompt", "mmvet"))
    options.add_to(p.add_argument_group("MM-Vet's grader (optional)"),
                   only=("grader_url", "grader_model", "grader_key_env"))
    options.add_to(p.add_argument_group("running"),
                   only=("limit", "max_new_tokens", "device", "torch_dtype", "providers", "progress"))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    options = _options()
    parser = build_parser(options)
    args = parser.parse_args(argv)
    for flag in ("limit", "max_new_tokens", "synthetic"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    config: EvalConfig = options.build(args)
    if not config.benchmarks_requested():
        parser.error("no benchmark given: use --pope, --mme, --textvqa, --mmmu, --mmvet and/or --synthetic N")
    try:
        report = run(config)
    except EvalDataError as err:
        print(f"ftz-eval: error: {err}", file=sys.stderr)
        return 2
    print(report["table_markdown"])
    files = [report["files"][k] for k in ("markdown", "json", "chart") if k in report["files"]]
    print(f"\nwrote {', '.join(files[:-1])} and {files[-1]}", file=sys.stderr)
    # A grader that failed (after its retries) left MM-Vet unscored: the run is not a success.
    failed = [(label, r["mmvet"]["grader_error"]) for label, r in report["results"].items()
              if "grader_error" in r.get("mmvet", {})]
    for label, error in failed:
        print(f"ftz-eval: error: {label}: {error} (MM-Vet not scored; answers in "
              f"{report['results'][label]['mmvet']['submission']})", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
