"""LLM speed: prefill tokens/s for an image + 32 text tokens, decode tokens/s, time to first
token, peak memory, per precision, against transformers eager on the same weights.

Every path decodes greedily for exactly ``new_tokens`` tokens (no early stop: random weights may
emit EOS at any point), after a prompt of ``image_tokens + 32`` positions fed as embeddings
(transformers, ONNX Runtime) - the runtime's way of splicing an image in - or as as many token
ids (llama.cpp's Python API takes ids; the embedding lookup is a negligible part of a prefill).
Decode speed is also given as a fraction of the memory-bandwidth bound: weight bytes read per
token (every weight but the input embedding table, which is only looked up) ÷ the measured
bandwidth (ftz_edge.bench.memory).
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ftz_edge import precision as P
from ftz_edge.bench import artifacts
from ftz_edge.bench.isolate import tick
from ftz_edge.bench.results import make_row
from ftz_edge.bench.timing import collect

UNITS = {"prefill_ms": "ms", "time_to_first_token_ms": "ms", "prefill_tokens_per_s": "tok/s",
         "decode_tokens_per_s": "tok/s", "decode_ms_per_token": "ms"}
FASTER_IS_HIGHER = ("prefill_tokens_per_s", "decode_tokens_per_s")


def image_tokens(size: str) -> int:
    """Image tokens of a size's tower: the default model's, or CLIP-L/14-336's 576 patches."""
    if size == "default":
        import json

        manifest_free = json.loads((artifacts.DEFAULT_MODEL / "ftz_config.json").read_text())["tower"]
        anchor = json.loads((artifacts.DEFAULT_MODEL / "anchor" / "config.json").read_text())
        grid = anchor["image_size"] // anchor["patch_size"]
        return grid * grid + (1 if manifest_free["select_feature"] == "cls_patch" else 0)
    return (336 // 14) ** 2


def _generation_run(prefill, step, prompt_len: int, new_tokens: int):
    """One timed generation: ``prefill()`` -> first token, then ``new_tokens - 1`` ``step(token)``."""
    def run() -> dict:
        start = time.perf_counter()
        token = prefill()
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = step(token)
        end = time.perf_counter()
        tick()
        decode_s = end - first
        steps = max(new_tokens - 1, 1)
        return {"time_to_first_token_ms": (first - start) * 1e3,
                "prefill_tokens_per_s": prompt_len / (first - start),
                "decode_tokens_per_s": steps / decode_s if decode_s > 0 else 0.0,
                "decode_ms_per_token": decode_s * 1e3 / steps}
    return run


def _row(size, llm, path, backend, precision, metrics, weight_bytes, info=None, memory=None, prompt_len=0):
    info = {"weight_bytes_per_token": weight_bytes, "prompt_tokens": prompt_len, **(info or {})}
    return make_row("llm", size, artifacts.llm_label(size, llm), path, backend, precision, 1, metrics,
                    info=info, memory=memory)


def transformers_case(size: str, llm: Optional[str], precision: str, device: str, new_tokens: int,
                      repeats: int, warmup: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = AutoModelForCausalLM.from_pretrained(artifacts.llm_hf(size, llm), dtype=dtype).to(device).eval()
    prompt_len = image_tokens(size) + artifacts.TEXT_TOKENS
    width = model.config.hidden_size
    rng = np.random.default_rng(0)
    embeds = torch.from_numpy(rng.standard_normal((1, prompt_len, width), dtype=np.float32) * 0.02).to(device, dtype)
    cuda = device.startswith("cuda")
    state = {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    @torch.inference_mode()
    def prefill():
        out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return token

    @torch.inference_mode()
    def step(token):
        out = model(input_ids=token, past_key_values=state["past"], use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return token

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    metrics = collect(_generation_run(prefill, step, prompt_len, new_tokens), repeats, warmup, UNITS, FASTER_IS_HIGHER)
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    total = sum(params.values())
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    weight_bytes = total if tied else total - embedding.numel() * embedding.element_size()
    memory = {"cuda_peak_mb": torch.cuda.max_memory_allocated() / (1 << 20)} if cuda else {}
    backend = "transformers eager" + (" (CUDA)" if cuda else "")
    return [_row(size, llm, "LLM", backend, precision, metrics, weight_bytes,
                 {"threads": torch.get_num_threads(), "tied_embeddings": tied, "new_tokens": new_tokens},
                 memory, prompt_len)]


def ort_case(size: str, llm: Optional[str], precision: str, new_tokens: int, repeats: int, warmup: int,
             providers: Optional[list] = None, block_size: int = P.DEFAULT_LLM_BLOCK_SIZE) -> list[dict]:
    """The runtime's decoder (ftz_edge.runtime.decoder.OnnxDecoder) on the ORT GenAI build."""
    from ftz_edge.runtime.decoder import OnnxDecoder

    folder = artifacts.llm_ort(size, llm, precision, block_size)
    decoder = OnnxDecoder(folder, providers=providers)
    prompt_len = image_tokens(size) + artifacts.TEXT_TOKENS
    width = decoder.embeddings.shape[1]
    rng = np.random.default_rng(0)
    embeds = (rng.standard_normal((1, prompt_len, width), dtype=np.float32) * 0.02)
    state = {}

    def prefill():
        # The cache sized for the whole generation, as the runtime sizes it for a request.
        logits, state["cache"] = decoder.forward(embeds, decoder.empty_cache(capacity=prompt_len + new_tokens))
        return int(logits[0].argmax())

    def step(token):
        logits, state["cache"] = decoder.forward(decoder.embed([token])[None], state["cache"])
        return int(logits[0].argmax())

    metrics = collect(_generation_run(prefill, step, prompt_len, new_tokens), repeats, warmup, UNITS, FASTER_IS_HIGHER)
    weight_bytes = artifacts.folder_bytes(folder)
    return [_row(size, llm, "LLM", "ONNX Runtime (runtime decoder)", artifacts.llm_precision_label(precision, block_size),
                 metrics, weight_bytes, {"provider": decoder.provider, "new_tokens": new_tokens, "block_size": block_size},
                 None, prompt_len)]
