"""The FtZ training loop: LLaVA's two stages on accelerate (DeepSpeed ZeRO-2/3 via its config).

One process: ``ftz-train ...``. Several GPUs or nodes: ``accelerate launch --config_file
training/accelerate/zero2.yaml -m ftz_edge.training.train ...`` - the loop is the same, accelerate
and DeepSpeed do the distribution.

Output folder::

    metrics.jsonl                one line per logged step (loss, lr, grad norm, throughput, skipped records)
    data_report.json             records kept / skipped (by reason, named), also those skipped when loaded
    checkpoint-0000500/          resumable: accelerate state (model, optimizer, scheduler, RNG),
        state/  model/  trainer_state.json   the FtZ checkpoint, and the data position
    final/                       the FtZ checkpoint of the finished stage (+ train_config.json)
    final-hf/                    the same model in the transformers format (save_hf, the default):
                                 FtZForConditionalGeneration.from_pretrained / AutoModelForImageTextToText

Checkpoints are written to a temporary folder (``.checkpoint-N.tmp-HOST-PID``) and renamed, and
only the last ``keep_last`` are kept, so an interrupted write never replaces a good checkpoint
with a broken one; the next save removes the temporary folders of killed runs. ``--resume``
takes the newest checkpoint that loads, and says so when it had to pass over a broken one.

Pickles: accelerate writes ``state/optimizer.bin``, ``state/scheduler.bin`` and
``state/random_states_0.pkl`` with ``torch.save``; they are loaded with ``weights_only=True``
(tensors, numbers and numpy arrays only: no code runs). Model weights are safetensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ftz_edge.atomic import atomic_write_bytes, owner_tag, replace_folder, sweep_stale
from ftz_edge.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ftz_edge.config import FtZConfig
from ftz_edge.encoders import ComponentLoadError
from ftz_edge.mllm import FtZForCausalLM
from ftz_edge.prompt import IMAGE_TOKEN_ID
from ftz_edge.training.data import DataError, DataReport, LlavaDataset, collate
from ftz_edge.training.recipe import (
    STAGES,
    TrainConfig,
    available_recipes,
    load_recipe,
    recipe_model_config,
    recipe_stage_config,
)

logger = logging.getLogger("ftz_edge.training")
CHECKPOINT_PREFIX = "checkpoint-"
HF_FINAL = "final-hf"  # the final model in the transformers format (TrainConfig.save_hf)


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # per-process batches of this epoch already consumed
    skipped_at_load: dict = field(default_factory=dict)  # DataReport.load_skipped, kept across a resume


class EpochSampler(torch.utils.data.Sampler):
    """A random order fixed by (seed, epoch): a resumed run sees exactly the same batches."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def _optimizer(model: FtZForCausalLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # Biases and norm weights are not decayed (the usual transformer recipe).
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def checkpoints(output_dir: Path) -> list[Path]:
    """The training checkpoints in ``output_dir``, oldest first."""
    return sorted(p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())


# What a damaged checkpoint raises while loading: safetensors' SafetensorError (an Exception of
# its own), torch.load's RuntimeError on a broken zip, pickle's UnpicklingError (also
# weights_only refusing a global), EOFError, and OSError / JSON / key errors.
def _damage_errors() -> tuple:
    from safetensors import SafetensorError

    return (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, TypeError)


def resume_state(accelerator, output_dir: Path) -> tuple[TrainerState, Path]:
    """Load the newest checkpoint that loads; a damaged newer one is passed over with a warning
    naming it and the reason. Every load overwrites the whole state (model, optimizer,
    scheduler, RNG), so a failed attempt leaves nothing behind once an older one succeeds."""
    found = checkpoints(output_dir)
    if not found:
        raise FileNotFoundError(f"--resume: no {CHECKPOINT_PREFIX}* folder in {output_dir}")
    problems = []
    for checkpoint in reversed(found):
        try:
            state = TrainerState(**json.loads((checkpoint / "trainer_state.json").read_text()))
            # Explicit, whatever accelerate's default: optimizer and scheduler pickles load as data only.
            accelerator.load_state(str(checkpoint / "state"), load_kwargs={"weights_only": True})
        except torch.OutOfMemoryError:
            raise
        except _damage_errors() as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            problems.append(f"{checkpoint.name} ({reason})")
            logger.warning("checkpoint %s cannot be loaded (%s); falling back to the previous one", checkpoint, reason)
            continue
        if problems and accelerator.is_main_process:
            logger.warning("resumed from %s, the newest checkpoint that loads; passed over: %s",
                           checkpoint.name, "; ".join(problems))
        return state, checkpoint
    raise CheckpointError(f"--resume: no checkpoint in {output_dir} can be loaded: {'; '.join(problems)}")


def build_model(cfg: TrainConfig, model_config: Optional[FtZConfig]) -> FtZForCausalLM:
    if cfg.init_from:
        model = load_checkpoint(cfg.init_from)
    elif model_config is not None:
        model = FtZForCausalLM.from_config(model_config)
    else:
        raise ValueError("give a model config (recipe) or init_from (an FtZ checkpoint)")
    if cfg.prompt_format is not None:  # the stage's format; the checkpoint it saves records it
        model.config.prompt_format = cfg.prompt_format
    train_llm = cfg.stage == "finetune"
    model.set_trainable(train_llm)
    model.config.llm_trained = model.config.llm_trained or train_llm
    model.config.max_length = cfg.max_length
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.vision.gradient_checkpointing = True
    return model


def train(cfg: TrainConfig, model_config: Optional[FtZConfig] = None, resume: bool = False,
          progress: bool = True, interrupt_after: Optional[int] = None) -> Path:
    """Run one stage; returns the final FtZ checkpoint folder.

    ``interrupt_after`` stops as if the process were killed after that many optimizer steps
    (tests use it to check that resuming ends where an uninterrupted run ends).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    output_dir = Path(cfg.output_dir)
    mixed_precision = cfg.mixed_precision if torch.cuda.is_available() else "no"
    # Accumulation reaches the requested global batch whatever the number of processes; DeepSpeed
    # reads it (and the micro batch) from the Accelerator, so its config says "auto" for both.
    accum = cfg.gradient_accumulation(PartialState().num_processes)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=accum)
    set_seed(cfg.seed)

    model = build_model(cfg, model_config)
    dataset = LlavaDataset(cfg.data_path, cfg.image_folder, model, cfg.max_length, cfg.strict)
    if accelerator.is_main_process:
        logger.info("%s", dataset.report.summary())
    sampler = EpochSampler(len(dataset), cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.per_device_batch_size, sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
    )
    batches_per_epoch = math.ceil(len(dataset) / (cfg.per_device_batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = cfg.max_steps or math.ceil(steps_per_epoch * cfg.num_epochs)
    optimizer = _optimizer(model, cfg)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(cfg.warmup_ratio * total_steps) * accelerator.num_processes, total_steps * accelerator.num_processes
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    state = TrainerState()
    if resume:
        state, checkpoint = resume_state(accelerator, output_dir)
        dataset.report.load_skipped.update(state.skipped_at_load)
        if accelerator.is_main_process:
            logger.info("resumed from %s at step %d", checkpoint, state.step)

    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.jsonl"
    bar = tqdm(total=total_steps, initial=state.step, desc=cfg.stage, disable=not (progress and accelerator.is_main_process))
    trainable = [p for p in model.parameters() if p.requires_grad]
    window = {"loss": 0.0, "batches": 0, "samples": 0, "tokens": 0, "start": time.perf_counter()}

    while state.step < total_steps:
        if state.batch_in_epoch >= batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        # Through the (possibly new, skipping) loader: accelerate passes its own epoch counter
        # down to the sampler at every pass, so it must hold the epoch we resume in.
        epoch_loader.set_epoch(state.epoch)
        for batch in epoch_loader:
            note_skipped(batch.pop("skipped"), dataset.report, cfg.strict, accelerator)
            if not batch["input_ids"]:
                raise DataError(f"{dataset.data_path}: {MAX_REPLACEMENTS_HINT}; {dataset.report.summary()}")
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            window["loss"] += loss.detach().float().item()
            window["batches"] += 1
            window["samples"] += len(batch["input_ids"])
            # Text tokens: the ids less their image positions (num_image_tokens sentinels per image).
            window["tokens"] += sum(len(ids) - ids.count(IMAGE_TOKEN_ID) for ids in batch["input_ids"])
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                _log(accelerator, metrics_path, bar, state, window, scheduler, grad_norm, dataset.report)
            if state.step % cfg.save_every == 0 or state.step == total_steps:
                state.skipped_at_load = dict(dataset.report.load_skipped)
                save_training_checkpoint(accelerator, model, cfg, state)
                write_data_report(accelerator, output_dir, dataset.report)
            if interrupt_after is not None and state.step >= interrupt_after:
                bar.close()
                raise KeyboardInterrupt(f"interrupted after step {state.step} (test hook)")
            if state.step >= total_steps:
                break
    bar.close()
    write_data_report(accelerator, output_dir, dataset.report)
    return save_final(accelerator, model, cfg)


MAX_REPLACEMENTS_HINT = ("every sample of a batch was unusable (its image and the next records' images failed to "
                         "decode): check the image folder")


def note_skipped(skipped: list, report: DataReport, strict: bool, accelerator) -> None:
    """Records the data loader found bad (``batch["skipped"]``): counted once per record in
    ``report``, each new one logged with its file, index, id and reason; with ``strict`` the
    first one stops training with one line. Several processes: each one's skips are gathered to
    all (one small collective per batch), so every process keeps the same report and a strict run
    stops on all of them together."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        skipped = gather_object(list(skipped))
    for record, reason in skipped:
        if strict:
            raise DataError(f"{record}: {reason} (--strict)")
        if report.skip_at_load(record, reason) and accelerator.is_main_process:
            logger.warning("skipped %s: %s", record, reason)


def write_data_report(accelerator, output_dir: Path, report: DataReport) -> None:
    if accelerator.is_main_process:
        atomic_write_bytes(output_dir / "data_report.json", (json.dumps(report.to_dict(), indent=2) + "\n").encode())


def _log(accelerator, path: Path, bar, state: TrainerState, window: dict, scheduler, grad_norm,
         report: DataReport) -> None:
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": window["loss"] / max(window["batches"], 1),
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "samples_per_s": window["samples"] * accelerator.num_processes / elapsed,
        "text_tokens_per_s": window["tokens"] * accelerator.num_processes / elapsed,
        "skipped_when_loaded": len(report.load_skipped),
    }
    window.update(loss=0.0, batches=0, samples=0, tokens=0, start=time.perf_counter())
    if accelerator.is_main_process:
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _save_model(accelerator, model, folder: Path, include_encoders: bool = False, extra_files=None,
                hf_folder: Optional[Path] = None) -> None:
    """The FtZ checkpoint of the wrapped model (gathers ZeRO-3 shards on every process), and with
    ``hf_folder`` the same model in the transformers format there (ftz_edge.hf; atomic too)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_checkpoint(unwrapped, folder, include_encoders=include_encoders, state_dict=state_dict,
                        extra_files=extra_files)
        if hf_folder is not None:
            from ftz_edge.hf import FtZForConditionalGeneration

            # The same modules and parameter names: the gathered state dict is the HF model's.
            FtZForConditionalGeneration.from_ftz(unwrapped).save_pretrained(hf_folder, state_dict=state_dict)


def save_training_checkpoint(accelerator, model, cfg: TrainConfig, state: TrainerState) -> Path:
    from accelerate.utils import broadcast_object_list

    output_dir = Path(cfg.output_dir)
    name = f"{CHECKPOINT_PREFIX}{state.step:07d}"
    # Every process writes into the main process's folder (RNG states are per process), so its
    # owner tag is shared; killed runs' folders are swept by the main process.
    tag = broadcast_object_list([owner_tag()])[0]
    tmp, final = output_dir / f".{name}.tmp-{tag}", output_dir / name
    if accelerator.is_main_process:
        sweep_stale(output_dir, f"{CHECKPOINT_PREFIX}*")
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    _save_model(accelerator, model, tmp / "model")
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
        (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        replace_folder(tmp, final)
        for old in sorted(output_dir.glob(f"{CHECKPOINT_PREFIX}*"))[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(accelerator, model, cfg: TrainConfig) -> Path:
    final = Path(cfg.output_dir) / "final"
    _save_model(accelerator, model, final, include_encoders=cfg.save_encoders,
                extra_files={"train_config.json": json.dumps(cfg.to_dict(), indent=2) + "\n"},
                hf_folder=Path(cfg.output_dir) / HF_FINAL if cfg.save_hf else None)
    accelerator.wait_for_everyone()
    return final


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ftz-train", description="Train FtZ checkpoints (LLaVA's two stages).")
    parser.add_argument("--recipe", help=f"a shipped recipe ({', '.join(available_recipes())}) or a YAML file")
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="default: pretrain, then finetune")
    parser.add_argument("--data-root", default=".", help="folder the recipe's data paths are relative to")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--init-from", help="FtZ checkpoint to start from (finetune: the pretrain result)")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--per-device-batch-size", type=int)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    parser.add_argument("--strict", action="store_true", default=None, help="fail on the first bad record instead of skipping")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    if not args.recipe:
        parser.error("--recipe is required")
    try:
        recipe = load_recipe(args.recipe)
        model_config = recipe_model_config(recipe)
        stages = STAGES if args.stage == "all" else (args.stage,)
        init_from = args.init_from
        for stage in stages:
            cfg = recipe_stage_config(
                recipe, stage, args.data_root, args.output_dir, init_from=init_from, max_steps=args.max_steps,
                per_device_batch_size=args.per_device_batch_size, strict=args.strict,
            )
            finished = (Path(cfg.output_dir) / "final" / "ftz_weights.safetensors").is_file() and (
                not cfg.save_hf or (Path(cfg.output_dir) / HF_FINAL / "config.json").is_file())
            if args.resume and finished:
                final = Path(cfg.output_dir) / "final"  # this stage finished before the interruption
            else:
                resume = args.resume and latest_checkpoint(Path(cfg.output_dir)) is not None
                final = train(cfg, model_config, resume=resume, progress=not args.no_progress)
            print(f"{stage}: wrote {final}")
            init_from = str(final)  # finetune starts from the pretrain result
    except (DataError, ValueError, FileNotFoundError, ComponentLoadError) as err:
        print(f"ftz-train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
