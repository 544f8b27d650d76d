"""What a request costs at least on this machine: a FLOP bound and a bandwidth bound.

* **FLOP bound** of the first token: the work it needs - the vision tower's GFLOPs
  (ftz_edge.sizes.tower_cost, from the configs) plus the prefill's - divided by the fp32 matrix
  multiply rate numpy reaches here on every core (:func:`measure_matmul_gflops`). Prefill work:
  2 FLOPs per multiply-add over every weight matrix of the decoder layers for each prompt
  position, attention over the causal half (QK^T and the weighted sum), and the LM head once
  (the last position's logits only, as the bundle's decoder and transformers' generate compute
  them). Kernels in bf16, int8 or int4 can run above the fp32 rate, so there "of bound" may pass
  100 %: read the bound as the fp32 machine's, not a ceiling for every precision.
* **Bandwidth bound** of decoding: each token reads about every weight once, so at most
  ``read bandwidth / weight bytes per token`` tokens/s (ftz_edge.bench.memory.decode_bound).

The costs are estimates from the checkpoint's configs, built on the ``meta`` device (no memory,
no weights); nothing here is measured except the two machine rates.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ftz_edge.bench.timing import Measurement


def measure_matmul_gflops(n: int = 2048, repeats: int = 5) -> dict:
    """fp32 GEMM rate (GFLOP/s) of numpy's BLAS on an ``n`` x ``n`` product, all cores; median of
    ``repeats`` after one warm-up."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        samples.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return {"gflops": Measurement(samples, "GFLOP/s", 1, higher_is_better=True).to_dict(), "n": n,
            "dtype": "float32", "threads": os.cpu_count()}


def model_cost(checkpoint) -> dict:
    """Per-request work of an FtZ checkpoint, from its configs: the tower's GFLOPs per image and
    the decoder's per-position weights (for :func:`prefill_gflops` / :func:`decode_gflops`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    from ftz_edge import encoders
    from ftz_edge.checkpoint import check_checkpoint
    from ftz_edge.sizes import tower_cost
    from ftz_edge.vision import FtZVision

    folder = Path(checkpoint)
    config = check_checkpoint(folder)
    tower = config.tower
    anchor_path = encoders.resolve_component(tower.anchor, folder)
    llm_config = AutoConfig.from_pretrained(encoders.resolve_component(config.llm, folder))
    augmenter_size = None
    with torch.device("meta"):
        anchor = CLIPVisionModel(CLIPVisionConfig.from_pretrained(anchor_path))
        augmenter = None
        if tower.uses_augmenter:
            augmenter_path = encoders.resolve_component(tower.augmenter, folder)
            augmenter = Dinov2Model(Dinov2Config.from_pretrained(augmenter_path))
            augmenter_size = encoders.augmenter_spec(augmenter_path, augmenter.config).crop_height
        vision = FtZVision(tower, anchor, augmenter, llm_config.hidden_size, config.projector_depth, config.preset)
        llm = AutoModelForCausalLM.from_config(llm_config)
    cost = tower_cost(vision, augmenter_size) if augmenter_size else tower_cost(vision)
    layer_params = sum(p.numel() for name, p in llm.named_parameters() if ".layers." in name and p.dim() == 2)
    head = llm.get_output_embeddings()
    heads = llm_config.num_attention_heads
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // heads
    return {"vision_gflops": cost.gflops, "num_image_tokens": vision.num_image_tokens,
            "llm_layers": llm_config.num_hidden_layers, "llm_layer_params": layer_params,
            "lm_head_params": head.weight.numel() if head is not None else 0, "attention_width": heads * head_dim}


def prefill_gflops(cost: dict, tokens: int) -> float:
    """GFLOPs of one prefill of ``tokens`` positions (see the module's note)."""
    matrices = 2 * tokens * cost["llm_layer_params"]
    attention = cost["llm_layers"] * 2 * 2 * cost["attention_width"] * tokens * (tokens + 1) / 2
    return (matrices + attention + 2 * cost["lm_head_params"]) / 1e9


def decode_gflops(cost: dict, context: int) -> float:
    """GFLOPs of one decode step at ``context`` positions of cache."""
    attention = cost["llm_layers"] * 2 * 2 * cost["attention_width"] * context
    return (2 * (cost["llm_layer_params"] + cost["lm_head_params"]) + attention) / 1e9


def request_gflops(cost: dict, prompt_tokens: int, images: int = 1) -> dict:
    """GFLOPs to the first token of a request with ``images`` images and ``prompt_tokens`` positions."""
    vision = images * cost["vision_gflops"]
    prefill = prefill_gflops(cost, prompt_tokens)
    return {"vision": vision, "prefill": prefill, "first_token": vision + prefill,
            "decode_per_token": decode_gflops(cost, prompt_tokens)}


def first_token_bound_ms(gflops: Optional[dict], matmul_gflops: Optional[float]) -> Optional[float]:
    """Milliseconds to the first token if the work ran at the measured fp32 GEMM rate."""
    if not gflops or not matmul_gflops:
        return None
    return gflops["first_token"] / matmul_gflops * 1e3


MACHINE_KEYS = ("cpu", "cpu_flags", "logical_cores", "physical_cores", "ram_gib", "gpu", "os")


def annotate(rows: list[dict], machine: dict, bandwidth: Optional[dict], compute: Optional[dict], run: dict) -> None:
    """Give each real-size end-to-end row what its bounds need and where it was measured: the
    machine (CPU model and flags), the run (command, date), the machine's read bandwidth and fp32
    GEMM rate from this run, and the GFLOPs of its request from its checkpoint's configs. A row
    is then self-contained, so it keeps its meaning when merged into another machine's results
    (``ftz-bench --merge-into``)."""
    costs: dict = {}
    for row in rows:
        if row["suite"] != "e2e" or row["size"] != "real" or row["status"] != "ok":
            continue
        info = row["info"]
        info["machine"] = {k: machine.get(k) for k in MACHINE_KEYS}
        info["run"] = dict(run)
        if bandwidth:
            info["bandwidth_read_gbs"] = bandwidth["read_gbs"]["median"]
        if compute:
            info["matmul_gflops"] = compute["gflops"]["median"]
        checkpoint = info.get("checkpoint")
        if not checkpoint:
            info["bounds_note"] = "no checkpoint: the FLOPs are counted from its configs"
            continue
        if checkpoint not in costs:
            try:
                costs[checkpoint] = model_cost(checkpoint)
            except Exception as err:  # noqa: BLE001 - a bound is extra; the row stands without it
                costs[checkpoint] = f"{type(err).__name__}: {str(err).strip()[:200]}"
        cost = costs[checkpoint]
        if isinstance(cost, str):
            info["bounds_note"] = f"FLOPs not counted ({cost})"
            continue
        info["model_cost"] = cost
        info["gflops"] = request_gflops(cost, int(info.get("prompt_tokens") or 0))
