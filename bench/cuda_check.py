"""The paper-size model on a CUDA GPU, in one short prepared run (issue 12 item 4).

``python -m ftz_edge.bench.cuda_check --out results/gpu-<name>`` builds a paper-size FtZ
(CLIP ViT-L/14-336 + DINOv2-L + Qwen2.5-0.5B by default, random weights from the shipped real
configs: latency and memory do not depend on the values) directly on the device, then measures:

* **training**: SFT-stage steps (fusion + W_proj + projector + LLM trainable, AdamW) in bf16
  autocast on bf16 weights, as LLaVA's recipes run: step time, peak GPU memory, tokens/s
  (image tokens count: they are in the sequence the LLM trains on);
* **the tower**: PyTorch eager fp32 and bf16 latency at batch 1 and 8.

It writes ``cuda_check.json`` and ``cuda_check.md``. Every figure is measured by this run; the
GPU, torch / CUDA versions and the settings are recorded beside them. On a machine without CUDA
``--device cpu --size tiny`` runs the same code on the shipped tiny model (what the tests do).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

from ftz_edge.atomic import atomic_write_bytes


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def build_model(size: str, device: str, dtype):
    """(FtZForCausalLM on ``device`` in ``dtype``, description)."""
    import torch

    from ftz_edge import DEFAULT_MODEL
    from ftz_edge.checkpoint import load_checkpoint

    if size == "tiny":
        return load_checkpoint(DEFAULT_MODEL, dtype=dtype).to(device), "shipped tiny default model"
    import tempfile

    from ftz_edge.config import FtZConfig, TowerConfig
    from ftz_edge.mllm import FtZForCausalLM
    from ftz_edge.sizes import save_reference_components

    with tempfile.TemporaryDirectory(prefix="ftz-cuda-check-") as work:
        parts = save_reference_components(work)
        config = FtZConfig(tower=TowerConfig(anchor=parts["anchor"], augmenter=parts["augmenter"]), llm=parts["llm"])
        torch.manual_seed(0)
        model = FtZForCausalLM.from_config(config, dtype=dtype).to(device)
    return model, "CLIP ViT-L/14-336 + DINOv2-L + Qwen2.5-0.5B (random weights, paper preset)"


def _batch(model, batch: int, text_tokens: int, device: str, dtype):
    import torch

    from ftz_edge import prompt

    a, g = model.anchor_spec, model.augmenter_spec
    anchor = torch.randn(batch, 3, a.crop_height, a.crop_width, device=device, dtype=dtype)
    augmenter = torch.randn(batch, 3, g.crop_height, g.crop_width, device=device, dtype=dtype) if g else None
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    image = [prompt.IMAGE_TOKEN_ID] * model.vision.num_image_tokens  # the image's positions, as prompt.tokenize writes them
    ids = [image + torch.randint(1, vocab, (text_tokens,)).tolist() for _ in range(batch)]
    return ids, anchor, augmenter


def measure_training(model, device: str, batch: int, text_tokens: int, steps: int, warmup: int) -> dict:
    import torch

    model.train()
    model.set_trainable(train_llm=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5)
    ids, anchor, augmenter = _batch(model, batch, text_tokens, device, next(model.parameters()).dtype)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            loss = model(ids, anchor, augmenter, labels=ids).loss
        loss.backward()
        optimizer.step()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = _timed(step, device, steps, warmup)
    tokens = batch * (model.vision.num_image_tokens + text_tokens)
    median = statistics.median(seconds)
    return {"batch": batch, "sequence_tokens": model.vision.num_image_tokens + text_tokens, "steps": steps,
            "step_s_median": round(median, 4), "step_s_min": round(min(seconds), 4), "step_s_max": round(max(seconds), 4),
            "tokens_per_s": round(tokens / median, 1), "trainable_parameters": sum(p.numel() for p in params),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / (1 << 30), 2) if device.startswith("cuda") else None}


def measure_tower(model, device: str, batches: list[int], repeats: int, warmup: int) -> list[dict]:
    import torch

    rows = []
    vision = model.vision.eval()
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        vision.to(dtype)
        for batch in batches:
            _, anchor, augmenter = _batch(model, batch, 1, device, dtype)
            with torch.no_grad():
                seconds = _timed(lambda: vision(anchor, augmenter), device, repeats, warmup)
            rows.append({"precision": dtype_name, "batch": batch, "latency_ms_median": round(1e3 * statistics.median(seconds), 2),
                         "latency_ms_min": round(1e3 * min(seconds), 2), "latency_ms_max": round(1e3 * max(seconds), 2)})
    return rows


def _environment(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / (1 << 30), 1),
                    compute_capability=f"{properties.major}.{properties.minor}")
    return info


def markdown(result: dict) -> str:
    t = result["training"]
    lines = [f"# FtZ on {result['environment'].get('gpu', result['environment']['device'])}", "",
             f"Model: {result['model']}. torch {result['environment']['torch']}, CUDA {result['environment']['cuda']}.", "",
             "**Training (SFT stage, bf16 autocast, AdamW)**", "",
             "| batch | sequence tokens | step s, median [min–max] | tokens/s | peak GPU memory GiB |", "|---:|---:|---|---:|---:|",
             f"| {t['batch']} | {t['sequence_tokens']} | {t['step_s_median']} [{t['step_s_min']}–{t['step_s_max']}] | "
             f"{t['tokens_per_s']} | {t['peak_memory_gib'] if t['peak_memory_gib'] is not None else '-'} |", "",
             "**Vision tower, PyTorch eager**", "", "| precision | batch | latency ms, median [min–max] |", "|---|---:|---|"]
    lines += [f"| {r['precision']} | {r['batch']} | {r['latency_ms_median']} [{r['latency_ms_min']}–{r['latency_ms_max']}] |"
              for r in result["tower"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftz_edge.bench.cuda_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for cuda_check.json and cuda_check.md")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (logic check only)")
    parser.add_argument("--size", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--batch", type=int, default=4, help="training batch (per device)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tower-batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("cuda_check: error: no CUDA device here (torch.cuda.is_available() is False); "
              "use --device cpu --size tiny for a logic check", file=sys.stderr)
        return 2
    model, description = build_model(args.size, args.device, torch.bfloat16)
    result = {"model": description, "environment": _environment(args.device), "settings": vars(args),
              "training": measure_training(model, args.device, args.batch, args.text_tokens, args.steps, args.warmup)}
    model.float()
    result["tower"] = measure_tower(model, args.device, args.tower_batches, max(3, args.steps), args.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "cuda_check.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(out / "cuda_check.md", markdown(result).encode())
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
