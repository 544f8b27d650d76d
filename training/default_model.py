"""Build the shipped default model: a tiny FtZ VLM, its baselines and ablations, on synthetic scenes.

No pretrained weights can be downloaded where this project is developed, so the default model
is built here from scratch, reproducibly from one seed:

1. the synthetic set (ftz_edge.training.synthetic) with the question types in ``--qtypes``;
   a held-out test split;
2. tiny components written with ``save_pretrained``: a CLIP vision tower with coarse 16-px
   patches (the scene-level anchor) and a DINOv2 with fine 8-px patches (the local-detail
   augmenter), each pretrained on synthetic scenes by ``training/encoder_pretrain.py`` and then
   frozen; a Qwen2-architecture LLM with a byte-level BPE tokenizer trained on the set's text.
   The encoders and the LLM's initial weights come from the build seed and are shared by every
   run below;
3. for each seed in ``--seeds``: LLaVA's two stages with ``ftz_edge.training.train`` (pretrain:
   fusion + W_proj + projector; finetune: + the LLM) for FtZ and for the paper's baselines,
   CLIP-only and Interleaved-MoF, on the same data and steps;
4. ablations on the first seed: other numbers of fusion points, zero-init fusion, and the
   trained FtZ model with its augmenter switched off at test time (the augmenter's hidden
   states replaced by zeros);
5. greedy answers on the held-out split, exact-match accuracy per question type, mean ± std
   over seeds; each fusion point's ||MHCA output|| / ||anchor hidden|| at init and after each
   stage, and each stage's loss curve.

The FtZ model of the first seed is written self-contained (encoders included) to ``--out``, with
``eval.json`` / ``eval.md`` beside it, a few held-out images under ``examples/`` and calibration
images under ``calibration/``. Runs go ``--jobs`` at a time, one torch thread each, so the result
does not depend on how many run together.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ftz_edge import DEFAULT_MODEL
from ftz_edge.config import FtZConfig, TowerConfig
from ftz_edge.training import synthetic

CALIBRATION_IMAGES = 32
DEFAULT_OUT = DEFAULT_MODEL
KINDS = ("ftz", "clip", "mof")
# The question types of the shipped model (see docs/model.md, "The shipped default model").
DEFAULT_QTYPES = synthetic.DEFAULT_MODEL_QTYPES
# Fine-grained types: the answer is in detail the coarse anchor does not encode.
FINE_GRAINED = ("text",)
ABLATIONS = ("points1", "points2", "zero_init", "augmenter_off")
NORM_IMAGES = 64


@dataclass
class Run:
    name: str
    kind: str
    seed: int
    num_fusion_points: int = 4
    fusion_init: str = "random"
    augmenter_off_eval: bool = False  # also answer the test set with the augmenter zeroed
    keep: bool = False  # copy the final checkpoint out of the worker folder
    settings: dict = field(default_factory=dict)


def build_components(folder: Path, seed: int, encoder_steps: tuple[int, int], jobs: int, batches: tuple[int, int],
                     n_train: int, qtypes: tuple, llm_steps: int) -> tuple[dict[str, str], dict]:
    """Anchor and augmenter pretrained on scenes, the LLM on the training text; all from ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=min(jobs, 2), initializer=_one_thread) as pool:
        futures = {name: pool.submit(_pretrain_encoder, name, str(folder), seed, steps, batch)
                   for name, steps, batch in zip(("anchor", "augmenter"), encoder_steps, batches)}
        futures["llm"] = pool.submit(_pretrain_llm, str(folder), seed, n_train, qtypes, llm_steps)
        report = {name: future.result() for name, future in futures.items()}
    print("component pretraining:", json.dumps(report), flush=True)
    return {name: str(folder / name) for name in ("anchor", "augmenter", "llm")}, report


def _pretrain_llm(folder: str, seed: int, n_train: int, qtypes: tuple, steps: int) -> dict:
    from ftz_edge import tiny
    from ftz_edge.training import encoder_pretrain

    start = time.perf_counter()
    corpus = synthetic.all_questions() + synthetic.answer_vocabulary() * 4
    llm = Path(folder) / "llm"
    tiny.save_llm(llm, "qwen2", width=128, layers=2, heads=4, kv_heads=2, corpus=corpus, vocab_size=400, seed=seed + 2)
    report = {"text_pretraining": None}
    if steps:
        # The training split's scenes (regenerated from the seed), described in words.
        examples = list(synthetic.split_examples(n_train, seed, "train", qtypes=qtypes))
        report["text_pretraining"] = encoder_pretrain.pretrain_llm_text(llm, examples, steps, seed + 2)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def _one_thread() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)


def _pretrain_encoder(name: str, folder: str, seed: int, steps: int, batch: int) -> dict:
    from transformers import CLIPVisionModel, Dinov2Model

    from ftz_edge import tiny
    from ftz_edge.preprocess import clip_spec, dinov2_spec
    from ftz_edge.training import encoder_pretrain

    start = time.perf_counter()
    if name == "anchor":
        torch.manual_seed(seed)
        model = CLIPVisionModel(tiny.clip_vision_config(image_size=64, patch_size=16, width=64, layers=4, heads=4))
        spec = clip_spec(64)
        report = encoder_pretrain.pretrain_anchor(model, spec, steps, seed, batch)
    else:
        torch.manual_seed(seed + 1)
        model = Dinov2Model(tiny.dinov2_config(image_size=64, patch_size=8, width=64, layers=4, heads=4))
        # The synthetic scenes fill the whole 64x64 frame: DINOv2's usual resize-then-crop
        # (256 -> 224) would cut shapes at the border, so the augmenter sees the full frame.
        spec = dinov2_spec(64, 64)
        report = encoder_pretrain.pretrain_augmenter(model, spec, steps, seed + 1, batch)
    model.save_pretrained(Path(folder) / name)
    (Path(folder) / name / "preprocessor_config.json").write_text(json.dumps(spec.to_processor_config(), indent=2))
    report["steps"], report["batch"], report["seconds"] = steps, batch, round(time.perf_counter() - start, 1)
    return report


def model_config(paths: dict[str, str], kind: str, num_fusion_points: int = 4, fusion_init: str = "random") -> FtZConfig:
    # The paper's preset otherwise (4 fusion points, random init, last layer), but the tokens keep
    # CLS ("cls_patch"): the tiny encoders were pretrained through their final CLS (the anchor's
    # scene labels, the augmenter's character), so that is where much of their knowledge is.
    tower = TowerConfig(kind=kind, anchor=paths["anchor"], augmenter=None if kind == "clip" else paths["augmenter"],
                        num_fusion_points=num_fusion_points, fusion_heads=4, fusion_init=fusion_init, select_layer=-1,
                        select_feature="cls_patch")
    return FtZConfig(tower=tower, llm=paths["llm"], max_length=256)


def fusion_norms(model, images) -> dict[str, float]:
    """Per fusion point (anchor layer): ||MHCA output|| / ||anchor hidden state|| over the tokens
    of ``images`` (Frobenius norms), the size of what the augmenter adds to the anchor stream."""
    vision = getattr(model, "vision", None)
    if vision is None or not hasattr(vision, "fusion"):
        return {}
    sums: dict[str, list[float]] = {}
    hooks = []
    for layer, module in vision.fusion.items():
        def hook(mod, inputs, output, layer=layer):
            anchor = inputs[0]
            sums.setdefault(layer, [0.0, 0.0])
            sums[layer][0] += float((output - anchor).float().pow(2).sum())
            sums[layer][1] += float(anchor.float().pow(2).sum())
        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            anchor_px, augmenter_px = model.preprocess_images(images)
            vision(anchor_px, augmenter_px)
    finally:
        for h in hooks:
            h.remove()
    return {layer: round((out / max(anc, 1e-12)) ** 0.5, 4) for layer, (out, anc) in sorted(sums.items(), key=lambda kv: int(kv[0]))}


def _losses(metrics: Path) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {"first": round(rows[0]["loss"], 4), "last": round(rows[-1]["loss"], 4),
            "curve": [[r["step"], round(r["loss"], 4)] for r in rows]}


def _answer_all(model, records: list[dict], image_root: Path) -> list[str]:
    predictions = []
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        predictions.append(model.answer(image_root / record["image"], question, max_new_tokens=4))
    return predictions


def _augmenter_off(model) -> None:
    """The augmenter's hidden states replaced by zeros: the fusion modules stay, but get no detail."""
    original = model.vision._augmenter_states

    def zeros(pixel_values, wanted):
        return {k: torch.zeros_like(v) for k, v in original(pixel_values, wanted).items()}
    model.vision._augmenter_states = zeros


def run_one(run: Run, paths: dict[str, str], data: str, work: str) -> dict:
    """Both stages of one run, its fusion norms and losses, and its held-out answers."""
    from accelerate.utils import set_seed
    from PIL import Image

    from ftz_edge.checkpoint import load_checkpoint
    from ftz_edge.mllm import FtZForCausalLM
    from ftz_edge.training.recipe import TrainConfig
    from ftz_edge.training.train import train

    torch.set_num_threads(1)
    start = time.perf_counter()
    s = run.settings
    data, out = Path(data), Path(work) / run.name
    test_records = json.loads((data / "test.json").read_text())
    norm_images = [Image.open(data / r["image"]).convert("RGB") for r in test_records[:NORM_IMAGES]]
    config = model_config(paths, run.kind, run.num_fusion_points, run.fusion_init)
    set_seed(run.seed)
    norms = {"init": fusion_norms(FtZForCausalLM.from_config(config), norm_images)}
    common = dict(data_path=str(data / "train.json"), per_device_batch_size=s["batch"], global_batch_size=s["batch"],
                  max_length=256, num_workers=0, gradient_checkpointing=False, seed=run.seed, log_every=s["log_every"],
                  keep_last=1, warmup_ratio=0.03)
    pretrain = TrainConfig(stage="pretrain", output_dir=str(out / "pretrain"), learning_rate=s["pretrain_lr"],
                           max_steps=s["pretrain_steps"], save_every=s["pretrain_steps"], **common)
    first = train(pretrain, config, progress=False)
    norms["pretrain"] = fusion_norms(load_checkpoint(first).eval(), norm_images)
    finetune = TrainConfig(stage="finetune", output_dir=str(out / "finetune"), init_from=str(first),
                           learning_rate=s["finetune_lr"], max_steps=s["finetune_steps"], save_every=s["finetune_steps"],
                           save_encoders=run.keep, **common)
    final = train(finetune, None, progress=False)
    train_seconds = time.perf_counter() - start
    model = load_checkpoint(final).eval()
    norms["finetune"] = fusion_norms(model, norm_images)
    result = {
        "run": asdict(run) | {"settings": None},
        "losses": {"pretrain": _losses(out / "pretrain" / "metrics.jsonl"),
                   "finetune": _losses(out / "finetune" / "metrics.jsonl")},
        "fusion_norms": norms if run.kind == "ftz" else None,
        "result": synthetic.evaluate(test_records, _answer_all(model, test_records, data)),
        "train_seconds": round(train_seconds, 1),
    }
    if run.augmenter_off_eval:
        _augmenter_off(model)
        result["augmenter_off"] = synthetic.evaluate(test_records, _answer_all(model, test_records, data))
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["final"] = str(final)
    print(f"{run.name}: {result['seconds']:.0f} s, overall {result['result']['overall']['accuracy']:.3f} "
          + " ".join(f"{q}={v['accuracy']:.2f}" for q, v in result["result"]["per_type"].items()), flush=True)
    return result


def plan_runs(seeds: list[int], kinds: list[str], ablations: list[str], settings: dict) -> list[Run]:
    runs = []
    for i, seed in enumerate(seeds):
        for kind in kinds:
            runs.append(Run(f"{kind}-seed{seed}", kind, seed, keep=(i == 0 and kind == "ftz"),
                            augmenter_off_eval=(i == 0 and kind == "ftz" and "augmenter_off" in ablations),
                            settings=settings))
    seed = seeds[0]
    for ablation in ablations:
        if ablation.startswith("points"):
            runs.append(Run(f"ftz-{ablation}-seed{seed}", "ftz", seed, num_fusion_points=int(ablation[6:]), settings=settings))
        elif ablation == "zero_init":
            runs.append(Run(f"ftz-zero_init-seed{seed}", "ftz", seed, fusion_init="zero", settings=settings))
        elif ablation != "augmenter_off":
            raise ValueError(f"unknown ablation {ablation!r}; expected some of {ABLATIONS}")
    return runs


def mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(results: dict[str, dict], seeds: list[int], kinds: list[str]) -> dict:
    summary = {}
    for kind in kinds:
        per_seed = [results[f"{kind}-seed{seed}"]["result"] for seed in seeds if f"{kind}-seed{seed}" in results]
        if not per_seed:
            continue
        qtypes = list(per_seed[0]["per_type"])
        summary[kind] = {q: mean_std([r["per_type"][q]["accuracy"] for r in per_seed]) for q in qtypes}
        summary[kind]["overall"] = mean_std([r["overall"]["accuracy"] for r in per_seed])
        summary[kind]["fine_grained"] = mean_std(
            [statistics.fmean(r["per_type"][q]["accuracy"] for q in FINE_GRAINED if q in r["per_type"]) for r in per_seed])
    return summary


def summary_table(summary: dict, chance: dict) -> str:
    kinds = list(summary)
    rows = [q for q in next(iter(summary.values())) if q not in ("overall", "fine_grained")] + ["overall"]
    lines = ["| qtype | chance | " + " | ".join(kinds) + " |", "|---|---:|" + "---:|" * len(kinds)]
    for q in rows:
        cells = [f"{summary[k][q]['mean']:.3f} ± {summary[k][q]['std']:.3f}" for k in kinds]
        lines.append(f"| {'**overall**' if q == 'overall' else q} | {chance[q]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(results: dict, seed: int, ablations: list[str]) -> str:
    base = results.get(f"ftz-seed{seed}")
    if base is None:
        return ""
    entries = [("FtZ, 4 fusion points, random init (the shipped model)", base["result"])]
    for a in ablations:
        if a == "augmenter_off" and "augmenter_off" in base:
            entries.append(("the same model, augmenter off at test time (its states zeroed)", base["augmenter_off"]))
        elif f"ftz-{a}-seed{seed}" in results:
            label = {"points1": "1 fusion point (anchor layer 4)", "points2": "2 fusion points (anchor layers 2, 4)",
                     "zero_init": "zero-init fusion (4 points)"}.get(a, a)
            entries.append((label, results[f"ftz-{a}-seed{seed}"]["result"]))
    clip = results.get(f"clip-seed{seed}")
    if clip is not None:
        entries.append(("CLIP-only (same seed)", clip["result"]))
    qtypes = list(base["result"]["per_type"])
    lines = ["| variant (seed %d) | " % seed + " | ".join(qtypes) + " | overall |", "|---|" + "---:|" * (len(qtypes) + 1)]
    for label, r in entries:
        lines.append(f"| {label} | " + " | ".join(f"{r['per_type'][q]['accuracy']:.3f}" for q in qtypes)
                     + f" | {r['overall']['accuracy']:.3f} |")
    return "\n".join(lines)


def cpu_flags() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and "model_name" not in info:
            info["model_name"] = value.strip()
        elif key == "flags" and "flags" not in info:
            info["flags"] = value.split()
    return info


# Shipped examples: the first held-out record of each type in this order, then a second of the
# fine-grained type (five in all; tests index them, and want the third to have a word answer).
EXAMPLE_ORDER = ("exists", "count", "color", "text")


def pick_examples(records: list[dict]) -> list[dict]:
    picked = []
    for qtype in EXAMPLE_ORDER:
        picked += [r for r in records if r["qtype"] == qtype][:1 + (qtype == FINE_GRAINED[0])]
    return picked


def write_examples(folder: Path, records: list[dict], image_root: Path) -> None:
    folder.mkdir()
    examples = []
    for record in pick_examples(records):
        shutil.copy(image_root / record["image"], folder / Path(record["image"]).name)
        examples.append({"image": Path(record["image"]).name, "qtype": record["qtype"],
                         "question": record["conversations"][0]["value"].replace("<image>\n", ""),
                         "answer": record["conversations"][1]["value"]})
    (folder / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftz_edge.training.default_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0, help="build seed: data, encoders, LLM init, first run seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the FtZ stages (seed, seed+1, ...) per kind")
    parser.add_argument("--kinds", default=",".join(KINDS), help="tower kinds to train per seed")
    parser.add_argument("--ablations", default=",".join(ABLATIONS), help=f"some of {ABLATIONS}, or 'none'")
    parser.add_argument("--qtypes", default=",".join(DEFAULT_QTYPES), help=f"question types, some of {synthetic.QTYPES}")
    parser.add_argument("--train", type=int, default=8000, help="training records")
    parser.add_argument("--test", type=int, default=500, help="held-out records")
    parser.add_argument("--anchor-steps", type=int, default=1000, help="anchor pretraining steps")
    parser.add_argument("--augmenter-steps", type=int, default=800, help="augmenter pretraining steps")
    parser.add_argument("--anchor-batch", type=int, default=128, help="anchor pretraining batch")
    parser.add_argument("--augmenter-batch", type=int, default=64, help="augmenter pretraining batch (65 tokens: the slow one)")
    parser.add_argument("--llm-steps", type=int, default=400, help="text-only LLM pretraining steps (0: random LLM)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=1200)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    parser.add_argument("--components", type=Path, help="re-use anchor/, augmenter/, llm/ from --keep-components")
    parser.add_argument("--keep-components", type=Path, help="save the pretrained components here for re-use")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    build_start = time.perf_counter()
    kinds = [k for k in args.kinds.split(",") if k]
    ablations = [] if args.ablations == "none" else [a for a in args.ablations.split(",") if a]
    qtypes = tuple(q for q in args.qtypes.split(",") if q)
    seeds = [args.seed + i for i in range(args.seeds)]
    settings = {"batch": args.batch, "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
                "pretrain_lr": args.pretrain_lr, "finetune_lr": args.finetune_lr, "log_every": 25}
    runs = plan_runs(seeds, kinds, ablations, settings)
    with tempfile.TemporaryDirectory(prefix="ftz-default-") as work:
        work = Path(work)
        synthetic.generate_dataset(work / "data", args.train, args.test, args.seed, qtypes=qtypes)
        encoder_start = time.perf_counter()
        if args.components:
            # Re-use the encoders (and LLM init) of an earlier build with the same seed.
            paths = {name: str(args.components / name) for name in ("anchor", "augmenter", "llm")}
            report_file = args.components / "encoder_report.json"
            encoder_report = json.loads(report_file.read_text()) if report_file.is_file() else {"reused": str(args.components)}
        else:
            paths, encoder_report = build_components(work / "components", args.seed,
                                                     (args.anchor_steps, args.augmenter_steps), args.jobs,
                                                     (args.anchor_batch, args.augmenter_batch),
                                                     args.train, qtypes, args.llm_steps)
            (work / "components" / "encoder_report.json").write_text(json.dumps(encoder_report, indent=2))
            if args.keep_components:
                shutil.copytree(work / "components", args.keep_components, dirs_exist_ok=True)
        encoder_seconds = time.perf_counter() - encoder_start
        test_records = json.loads((work / "data" / "test.json").read_text())
        results = {}
        with ProcessPoolExecutor(max_workers=args.jobs, initializer=_one_thread) as pool:
            futures = {run.name: pool.submit(run_one, run, paths, str(work / "data"), str(work / "runs")) for run in runs}
            for name, future in futures.items():
                results[name] = future.result()
        summary = summarize(results, seeds, kinds)
        chance = {q: v["chance"] for q, v in results[runs[0].name]["result"]["per_type"].items()}
        chance["overall"] = results[runs[0].name]["result"]["overall"]["chance"]
        main_table = summary_table(summary, chance) if summary else ""
        ablations_md = ablation_table(results, seeds[0], ablations)
        print("\n" + main_table + "\n\n" + ablations_md, flush=True)

        shipped = f"ftz-seed{seeds[0]}"
        staged = work / "staged"
        shutil.copytree(results[shipped]["final"], staged)
        write_examples(staged / "examples", test_records, work / "data")
        # Real images for INT8 calibration (ftz-export's default --calib-images): training scenes.
        (staged / "calibration").mkdir()
        for record in json.loads((work / "data" / "train.json").read_text())[:CALIBRATION_IMAGES]:
            shutil.copy(work / "data" / record["image"], staged / "calibration" / Path(record["image"]).name)
        build_minutes = (time.perf_counter() - build_start) / 60
        for r in results.values():
            r.pop("final", None)
        report = {
            # encoder_steps is None when pretrained components were re-used (their report says how they were made)
            "settings": vars(args) | {"out": str(args.out), "components": str(args.components) if args.components else None,
                                      "keep_components": None,
                                      "qtypes": list(qtypes), "seeds": seeds, "kinds": kinds, "ablations": ablations},
            "shipped": {"run": shipped, "rule": "the FtZ model of the first seed (fixed before the build; no selection)"},
            "fine_grained_qtypes": list(FINE_GRAINED),
            "encoder_pretraining": encoder_report | {"shared": "pretrained once from the build seed, shared by all runs"},
            "summary": summary,
            "runs": results,
            # What the test (tests/test_default_model.py) reproduces: the shipped model's answers.
            "results": {"ftz": results[shipped]["result"]},
            "build_minutes": round(build_minutes, 1),
            "encoder_seconds": round(encoder_seconds, 1),
            "machine": cpu_flags() | {"torch_threads_per_run": 1, "jobs": args.jobs},
        }
        (staged / "eval.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (staged / "eval.md").write_text(eval_markdown(report, main_table, ablations_md, results[shipped]["result"]))
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.move(str(staged), args.out)
    print(f"wrote {args.out} in {build_minutes:.1f} min")
    return 0


def eval_markdown(report: dict, main_table: str, ablations_md: str, shipped: dict) -> str:
    s = report["settings"]
    norms = report["runs"][report["shipped"]["run"]].get("fusion_norms") or {}
    norm_lines = ["| stage | " + " | ".join(f"layer {k}" for k in norms.get("init", {})) + " |",
                  "|---|" + "---:|" * len(norms.get("init", {}))]
    for stage, values in norms.items():
        norm_lines.append(f"| {stage} | " + " | ".join(f"{v:.3f}" for v in values.values()) + " |")
    return "\n\n".join([
        f"Held-out accuracy, mean ± std over seeds {s['seeds']} ({s['test']} questions each, greedy), "
        f"{report['build_minutes']:.0f}-minute build:",
        main_table,
        "Ablations (one seed each):",
        ablations_md,
        f"Fusion norms of the shipped model ({report['shipped']['run']}): ||MHCA output|| / ||anchor hidden||:",
        "\n".join(norm_lines),
        f"### The shipped model ({report['shipped']['run']})",
        synthetic.format_table(shipped),
    ]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
