"""End to end through the runtime (ftz_edge.runtime.engine.FtZRuntime), and its start-up.

``e2e_case``: image + question -> first token and full answer, versus the sum of its parts
timed one by one in the same process (preprocessing, vision tower, prompt + splice, prefill,
the same number of decode steps): ``overhead_ms`` = answer - sum of parts is what the runtime
adds (tokenizer decoding, streaming, stop strings, sampling). The image-embedding cache is off,
so the vision tower runs on every request.

``torch_case``: the same request through PyTorch eager on the checkpoint the bundle came from
(``FtZForCausalLM.generate`` after ftz_edge.checkpoint.load_checkpoint in fp32 or bf16): the
baseline a user without the bundle has. Its first token is timed by a streamer (the moment
``generate`` hands over the first new token), its vision tower by hooks on the tower module, so
nothing runs twice.

The real-size row (``size="real"``, a paper-size bundle) records what its manifest says about
the export (``provenance.export_seconds``, ``stage_seconds``, ``peak_rss_gib``; the last two only
in bundles exported since ftz-export records them) and the bundle's size (the manifest's file
bytes). Its FLOP and bandwidth bounds are added by the parent (ftz_edge.bench.bounds).

``startup_case`` (run once per fresh process): *cold* is the first request of a runtime built
with ``warmup=False``; *warm-started* the first request of one built with ``warmup=True``;
*steady* a later request of the same runtime. Cache off here too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ftz_edge.bench import artifacts
from ftz_edge.bench.isolate import tick
from ftz_edge.bench.results import make_row
from ftz_edge.bench.timing import Measurement

PARTS = ("part_preprocess_ms", "part_vision_ms", "part_prompt_ms", "part_prefill_ms", "part_decode_ms")


def _runtime(bundle: str, warmup: bool = False):
    from ftz_edge.runtime.engine import FtZRuntime

    try:
        return FtZRuntime(bundle, image_cache_mb=0, warmup=warmup)
    except TypeError as err:  # a runtime from before warm start and the image cache
        raise RuntimeError(f"this runtime has no warm start / image cache options ({err})") from None


def _model_label(runtime) -> str:
    m = runtime.manifest
    return f"bundle: vision {m.vision.precision}, LLM {artifacts.llm_precision_label(m.llm.precision, m.llm.block_size)}"


def bundle_facts(runtime) -> dict:
    """What the bundle's manifest says about its size and its export (None where not recorded),
    and the decoder's weight bytes read per token (graph + external weights; the embedding table
    is only looked up)."""
    m = runtime.manifest
    provenance = m.provenance
    return {"bundle_bytes": sum(f.bytes for f in m.files.values()),
            "export_seconds": provenance.get("export_seconds"), "export_stage_seconds": provenance.get("stage_seconds"),
            "export_peak_rss_gib": provenance.get("peak_rss_gib", provenance.get("peak_rss_gb")), "export_options": provenance.get("options"),
            "vision_precision": m.vision.precision,
            "llm_precision": artifacts.llm_precision_label(m.llm.precision, m.llm.block_size),
            "weight_bytes_per_token": artifacts.folder_bytes(runtime.bundle / m.llm.folder)}


def e2e_case(bundle: Optional[str], new_tokens: int, repeats: int, warmup: int, question: Optional[str] = None,
             size: str = "default", model: Optional[str] = None, checkpoint: Optional[str] = None,
             ignore_eos: bool = False) -> list[dict]:
    """``question`` replaces the example's (the image stays the example's); ``size``/``model`` label
    the row (default: the bundle's precisions); ``checkpoint`` is recorded for the bounds.
    ``ignore_eos``: every answer runs ``new_tokens`` tokens (random weights may emit EOS anywhere;
    the decode speed is then over the same number of tokens as the PyTorch baseline's)."""
    import numpy as np

    from ftz_edge import prompt
    from ftz_edge.runtime.generation import GenerationConfig

    bundle = str(artifacts.default_bundle(bundle))
    image, example_question = artifacts.example()
    question = question or example_question
    runtime = _runtime(bundle)
    if ignore_eos:
        runtime.eos_token_ids = set()
    config = GenerationConfig(max_new_tokens=new_tokens)
    decoder = runtime.decoder
    samples: dict[str, list] = {}
    answer, generation = "", None
    for i in range(warmup + repeats):
        generation = runtime.ask(str(image), question, config).run()
        answer, t, generated = generation.text, generation.timings, list(generation.tokens)
        # What the runtime ran, piece by piece: the same calls, timed alone.
        clock = time.perf_counter
        start = clock()
        pixels = runtime.preprocess([str(image)])
        t1 = clock()
        embeds = runtime.vision(pixels)
        t2 = clock()
        ids = runtime.encode_prompt([prompt.user_turn_with_image(question)])
        spliced = runtime.splice(ids, embeds)
        t3 = clock()
        logits, cache = decoder.forward(spliced[None], decoder.empty_cache())
        first = int(np.argmax(logits[0]))
        t4 = clock()
        # The loop runs one forward per kept token, except after the last when max_new_tokens ended it.
        steps = len(generated) - (1 if len(generated) >= new_tokens else 0)
        token = generated[0] if generated else first
        for k in range(steps):
            logits, cache = decoder.forward(decoder.embed([token])[None], cache)
            token = generated[k + 1] if k + 1 < len(generated) else int(np.argmax(logits[0]))
        t5 = clock()
        tick()
        if i < warmup:
            continue
        parts = {"part_preprocess_ms": t1 - start, "part_vision_ms": t2 - t1, "part_prompt_ms": t3 - t2,
                 "part_prefill_ms": t4 - t3, "part_decode_ms": t5 - t4}
        parts = {k: v * 1e3 for k, v in parts.items()}
        values = {
            "time_to_first_token_ms": t.time_to_first_token_ms, "answer_ms": t.total_ms,
            "runtime_preprocess_ms": t.preprocess_ms, "runtime_vision_ms": t.vision_ms,
            "runtime_prefill_ms": t.prefill_ms, "decode_tokens_per_s": t.decode_tokens_per_s, **parts,
            "sum_of_parts_ms": sum(parts.values()),
            "first_token_sum_of_parts_ms": sum(parts[k] for k in PARTS[:4]),
        }
        values["overhead_ms"] = values["answer_ms"] - values["sum_of_parts_ms"]
        values["first_token_overhead_ms"] = values["time_to_first_token_ms"] - values["first_token_sum_of_parts_ms"]
        for k, v in values.items():
            samples.setdefault(k, []).append(v)
    metrics = {k: Measurement(v, "tok/s" if k.endswith("per_s") else "ms", warmup, k.endswith("per_s"))
               for k, v in samples.items()}
    info = {"bundle": bundle, "image": image.name, "question": question, "answer": answer,
            "new_tokens": len(generation.tokens), "max_new_tokens": new_tokens,
            "finish_reason": generation.finish_reason,
            "question_tokens": len(runtime.tokenizer.encode(question, add_special_tokens=False).ids),
            "prompt_tokens": generation.timings.prompt_tokens, "backends": runtime.backends,
            "checkpoint": checkpoint, **bundle_facts(runtime)}
    return [make_row("e2e", size, model or _model_label(runtime), "image + question -> answer", "ftz_edge runtime",
                     artifacts.manifest_precision(runtime.manifest), 1,
                     metrics, info=info)]


class _TokenClock:
    """A transformers streamer that only notes when each new token arrives (``put`` gets the
    prompt's ids first - none when generating from embeddings - then every new token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        if value.numel() and self.times is not None:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def torch_case(checkpoint: str, precision: str, new_tokens: int, repeats: int, warmup: int,
               question: Optional[str] = None, size: str = "real", model: Optional[str] = None) -> list[dict]:
    """PyTorch eager on the CPU, end to end: preprocessing, tower, splice, prefill and ``new_tokens``
    greedy tokens (EOS suppressed, so every run decodes the same number) through
    ``FtZForCausalLM.generate``."""
    import torch

    from ftz_edge import prompt
    from ftz_edge.checkpoint import load_checkpoint

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    ftz = load_checkpoint(checkpoint, dtype=dtype).eval()
    image, example_question = artifacts.example()
    question = question or example_question
    marks: dict = {}
    ftz.vision.register_forward_pre_hook(lambda *_: marks.__setitem__("vision_start", time.perf_counter()))
    ftz.vision.register_forward_hook(lambda *_: marks.__setitem__("vision_end", time.perf_counter()))
    samples: dict[str, list] = {}
    answer, prompt_tokens = "", 0
    for i in range(warmup + repeats):
        clock = _TokenClock()
        start = time.perf_counter()
        anchor, augmenter = ftz.preprocess_images([str(image)])
        ids = ftz.encode_conversation([prompt.user_turn_with_image(question)])
        prepared = time.perf_counter()
        out = ftz.generate([ids], anchor, augmenter, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, streamer=clock)
        end = time.perf_counter()
        tick()
        if i < warmup:
            continue
        if not clock.times:
            raise RuntimeError("generate streamed no token: the first-token time is unknown")
        first, last = clock.times[0], clock.times[-1]
        values = {"time_to_first_token_ms": (first - start) * 1e3, "answer_ms": (end - start) * 1e3,
                  "part_preprocess_ms": (prepared - start) * 1e3,
                  "part_vision_ms": (marks["vision_end"] - marks["vision_start"]) * 1e3,
                  "part_prefill_ms": (first - marks["vision_end"]) * 1e3,
                  "decode_tokens_per_s": (len(clock.times) - 1) / (last - first) if last > first else 0.0}
        for k, v in values.items():
            samples.setdefault(k, []).append(v)
        answer = ftz.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        prompt_tokens = len(ids)  # each image is its num_image_tokens positions in ids
    metrics = {k: Measurement(v, "tok/s" if k.endswith("per_s") else "ms", warmup, k.endswith("per_s"))
               for k, v in samples.items()}
    # Decode reads every LLM weight once per token; with tied embeddings the LM head is the table.
    llm = ftz.llm
    total = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in llm.parameters()}.values())
    embedding, head = llm.get_input_embeddings().weight, llm.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    weight_bytes = total if tied else total - embedding.numel() * embedding.element_size()
    info = {"checkpoint": str(checkpoint), "image": image.name, "question": question, "answer": answer,
            "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "threads": torch.get_num_threads(),
            "weight_bytes_per_token": weight_bytes, "tied_embeddings": tied}
    return [make_row("e2e", size, model or f"checkpoint {Path(checkpoint).name}", "image + question -> answer",
                     "PyTorch eager", precision, 1, metrics, info=info)]


def startup_case(bundle: Optional[str], mode: str, new_tokens: int, later: int = 3) -> list[dict]:
    """One sample (this process is fresh): load, optional warm-up, first request, later requests."""
    import statistics

    from ftz_edge.runtime.generation import GenerationConfig

    if mode not in ("cold", "warm"):
        raise ValueError("mode must be cold or warm")
    bundle = str(artifacts.default_bundle(bundle))
    image, question = artifacts.example()
    config = GenerationConfig(max_new_tokens=new_tokens)
    start = time.perf_counter()
    runtime = _runtime(bundle, warmup=(mode == "warm"))
    load_ms = (time.perf_counter() - start) * 1e3
    first = runtime.ask(str(image), question, config).run().timings
    steady_ttft, steady_vision = [], []
    for _ in range(later):
        later_timings = runtime.ask(str(image), question, config).run().timings
        steady_ttft.append(later_timings.time_to_first_token_ms)
        steady_vision.append(later_timings.vision_ms)
        if later_timings.cache_hit:
            raise RuntimeError("the image cache answered although it is off; the vision tower did not run")
    tick()
    values = {"load_ms": load_ms, "first_request_ttft_ms": first.time_to_first_token_ms,
              "first_request_vision_ms": first.vision_ms, "first_request_prefill_ms": first.prefill_ms,
              "steady_ttft_ms": statistics.median(steady_ttft), "steady_vision_ms": statistics.median(steady_vision),
              "ready_to_first_token_ms": load_ms + first.time_to_first_token_ms}
    if mode == "warm":
        values["warmup_ms"] = runtime.warmup_ms or 0.0
    metrics = {k: Measurement([v], "ms") for k, v in values.items()}
    label = "cold start (warmup=False)" if mode == "cold" else "warm start (warmup=True)"
    return [make_row("startup", "default", _model_label(runtime), label, "ftz_edge runtime",
                     artifacts.manifest_precision(runtime.manifest), 1, metrics,
                     info={"bundle": bundle, "later_requests": later})]
