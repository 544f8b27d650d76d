"""Build the shipped default model: a tiny FtZ VLM trained on the synthetic fine-grained set.

No pretrained weights can be downloaded where this project is developed, so the default model
is built here from scratch, reproducibly from a seed:

1. the synthetic set (ftz_edge.training.synthetic): colours, counts, positions, small text,
   yes/no existence; a held-out test split;
2. tiny components written with ``save_pretrained``: a CLIP vision tower with coarse 16-px
   patches (the "semantic", low-detail anchor), a DINOv2 with fine 8-px patches (the perceptual
   augmenter), a Qwen2-architecture LLM with a byte-level BPE tokenizer trained on the set's
   text. The encoders keep their random initialisation and stay frozen throughout, as the FtZ
   stages require (no encoder pretraining is done; README says so);
3. LLaVA's two stages with ``ftz_edge.training.train``: pretrain (fusion + W_proj + projector),
   then finetune (+ the LLM);
4. greedy answers on the held-out split, exact-match accuracy per question type;
5. the same budget for a CLIP-only model, for comparison.

The FtZ checkpoint is written self-contained (encoders included) to ``--out``, with
``eval.json`` / ``eval.md`` beside it and a few held-out images under ``examples/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPVisionModel, Dinov2Model

from ftz_edge import DEFAULT_MODEL, tiny
from ftz_edge.checkpoint import load_checkpoint
from ftz_edge.config import FtZConfig, TowerConfig
from ftz_edge.preprocess import clip_spec, dinov2_spec
from ftz_edge.training import encoder_pretrain, synthetic
from ftz_edge.training.recipe import TrainConfig
from ftz_edge.training.train import train

CALIBRATION_IMAGES = 32
DEFAULT_OUT = DEFAULT_MODEL


def build_components(folder: Path, seed: int, encoder_steps: int) -> tuple[dict[str, str], dict]:
    corpus = synthetic.all_questions() + synthetic.answer_vocabulary() * 4
    torch.manual_seed(seed)
    anchor = CLIPVisionModel(tiny.clip_vision_config(image_size=64, patch_size=16, width=64, layers=4, heads=4))
    augmenter = Dinov2Model(tiny.dinov2_config(image_size=64, patch_size=8, width=64, layers=4, heads=4))
    # The synthetic scenes fill the whole 64x64 frame: DINOv2's usual resize-then-crop (256 -> 224)
    # would cut shapes at the border, so the augmenter sees the full frame like the anchor does.
    anchor_spec, augmenter_spec = clip_spec(64), dinov2_spec(64, 64)
    encoder_report = {
        "anchor": encoder_pretrain.pretrain_anchor(anchor, anchor_spec, encoder_steps, seed),
        "augmenter": encoder_pretrain.pretrain_augmenter(augmenter, augmenter_spec, encoder_steps, seed + 1),
    }
    print("encoder pretraining:", json.dumps(encoder_report))
    for name, model, spec in (("anchor", anchor, anchor_spec), ("augmenter", augmenter, augmenter_spec)):
        model.save_pretrained(folder / name)
        (folder / name / "preprocessor_config.json").write_text(json.dumps(spec.to_processor_config(), indent=2))
    tiny.save_llm(folder / "llm", "qwen2", width=128, layers=2, heads=4, kv_heads=2, corpus=corpus, vocab_size=400,
                  seed=seed + 2)
    return {name: str(folder / name) for name in ("anchor", "augmenter", "llm")}, encoder_report


def model_config(paths: dict[str, str], kind: str) -> FtZConfig:
    # Last-layer features with CLS: the tiny encoders were pretrained through their final CLS
    # (scene labels, the character), so that is where their knowledge is; LLaVA's penultimate
    # patch tokens suit CLIP's contrastive pretraining, not this one.
    tower = TowerConfig(kind=kind, anchor=paths["anchor"], augmenter=None if kind == "clip" else paths["augmenter"],
                        num_fusion_points=2, fusion_heads=4, fusion_init="zero", select_layer=-1,
                        select_feature="cls_patch")  # zero init: as the shipped model was built
    return FtZConfig(tower=tower, llm=paths["llm"], max_length=256)


def train_two_stages(config: FtZConfig, data: Path, out: Path, pretrain_steps: int, finetune_steps: int, seed: int,
                     save_encoders: bool) -> Path:
    common = dict(data_path=str(data / "train.json"), per_device_batch_size=32, global_batch_size=32, max_length=256,
                  num_workers=0, gradient_checkpointing=False, seed=seed, log_every=25, keep_last=1, warmup_ratio=0.03)
    pretrain = TrainConfig(stage="pretrain", output_dir=str(out / "pretrain"), learning_rate=1e-3,
                           max_steps=pretrain_steps, save_every=pretrain_steps, **common)
    first = train(pretrain, config)
    finetune = TrainConfig(stage="finetune", output_dir=str(out / "finetune"), init_from=str(first), learning_rate=2e-3,
                           max_steps=finetune_steps, save_every=finetune_steps, save_encoders=save_encoders, **common)
    return train(finetune, None)


def evaluate_checkpoint(folder: Path, records: list[dict], image_root: Path) -> dict:
    model = load_checkpoint(folder).eval()
    predictions = []
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        predictions.append(model.answer(image_root / record["image"], question, max_new_tokens=4))
    return synthetic.evaluate(records, predictions)


def _one_per_type(records: list[dict]) -> list[dict]:
    seen, picked = set(), []
    for record in records:
        if record["qtype"] not in seen:
            seen.add(record["qtype"])
            picked.append(record)
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftz_edge.training.default_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=6000, help="training records")
    parser.add_argument("--test", type=int, default=500, help="held-out records")
    parser.add_argument("--encoder-steps", type=int, default=600, help="encoder pretraining steps (each)")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=1200)
    parser.add_argument("--components", type=Path, help="re-use anchor/, augmenter/, llm/ from --keep-components")
    parser.add_argument("--keep-components", type=Path, help="save the pretrained components here for re-use")
    parser.add_argument("--skip-baseline", action="store_true", help="do not train the CLIP-only comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="ftz-default-") as work:
        work = Path(work)
        synthetic.generate_dataset(work / "data", args.train, args.test, args.seed)
        if args.components:
            # Re-use the encoders (and LLM init) of an earlier build with the same seed: encoder
            # pretraining is the slow part on a CPU, and the FtZ stages keep the encoders frozen.
            paths = {name: str(args.components / name) for name in ("anchor", "augmenter", "llm")}
            report_file = args.components / "encoder_report.json"
            encoder_report = json.loads(report_file.read_text()) if report_file.is_file() else {"reused": str(args.components)}
        else:
            paths, encoder_report = build_components(work / "components", args.seed, args.encoder_steps)
            (work / "components" / "encoder_report.json").write_text(json.dumps(encoder_report, indent=2))
            if args.keep_components:
                shutil.copytree(work / "components", args.keep_components, dirs_exist_ok=True)
        test_records = json.loads((work / "data" / "test.json").read_text())
        results, timings = {}, {}
        for kind in ("ftz",) if args.skip_baseline else ("ftz", "clip"):
            start = time.perf_counter()
            final = train_two_stages(model_config(paths, kind), work / "data", work / kind, args.pretrain_steps,
                                     args.finetune_steps, args.seed, save_encoders=True)
            timings[kind] = time.perf_counter() - start
            results[kind] = evaluate_checkpoint(final, test_records, work / "data")
            print(f"\n{kind}: trained in {timings[kind]:.0f} s\n{synthetic.format_table(results[kind])}")
        staged = work / "staged"
        shutil.copytree(work / "ftz" / "finetune" / "final", staged)
        (staged / "examples").mkdir()
        examples = []
        for record in _one_per_type(test_records):
            shutil.copy(work / "data" / record["image"], staged / "examples" / Path(record["image"]).name)
            examples.append({"image": Path(record["image"]).name, "qtype": record["qtype"],
                             "question": record["conversations"][0]["value"].replace("<image>\n", ""),
                             "answer": record["conversations"][1]["value"]})
        (staged / "examples" / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")
        # Real images for INT8 calibration (ftz-export's default --calib-images): training scenes.
        (staged / "calibration").mkdir()
        for record in json.loads((work / "data" / "train.json").read_text())[:CALIBRATION_IMAGES]:
            shutil.copy(work / "data" / record["image"], staged / "calibration" / Path(record["image"]).name)
        report = {
            # encoder_steps is None when pretrained components were re-used (their report says how they were made)
            "settings": vars(args) | {"out": str(args.out), "encoder_steps": None if args.components else args.encoder_steps},
            "encoder_pretraining": encoder_report,
            "train_seconds": timings,
            "results": results,
            "machine": f"{torch.get_num_threads()} torch threads, CPU",
        }
        (staged / "eval.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (staged / "eval.md").write_text(
            "\n\n".join(f"### {kind}\n\n{synthetic.format_table(result)}" for kind, result in results.items()) + "\n"
        )
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.move(str(staged), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
