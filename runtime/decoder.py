"""The exported LLM decoder driven by plain ONNX Runtime, with its KV cache (torch-free).

The graph (ONNX Runtime GenAI's model builder with ``exclude_embeds=true``) takes
``inputs_embeds``, ``attention_mask`` and ``past_key_values.{i}.key/value`` and returns
``logits`` and ``present.{i}.key/value``. Text tokens are embedded by looking up the exported
embedding table, so image embeddings can be spliced in between them.

This is our own loop rather than ONNX Runtime GenAI's generator because GenAI has no CUDA build
for aarch64 (Jetson), while plain onnxruntime runs everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32}


class OnnxDecoder:
    def __init__(self, folder: str | Path, model_file: str = "model.onnx", embeddings_file: str = "embed_tokens.npy",
                 providers: Optional[Sequence[str]] = None, session_options=None):
        import onnxruntime as ort

        folder = Path(folder)
        config = json.loads((folder / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        self.num_layers = decoder["num_hidden_layers"]
        self.num_kv_heads = decoder["num_key_value_heads"]
        self.head_size = decoder["head_size"]
        self.context_length = config["context_length"]
        self.key_names = [decoder["inputs"]["past_key_names"] % i for i in range(self.num_layers)]
        self.value_names = [decoder["inputs"]["past_value_names"] % i for i in range(self.num_layers)]
        self.present_key_names = [decoder["outputs"]["present_key_names"] % i for i in range(self.num_layers)]
        self.present_value_names = [decoder["outputs"]["present_value_names"] % i for i in range(self.num_layers)]
        self.session = ort.InferenceSession(str(folder / model_file), sess_options=session_options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.embeds_dtype = _ORT_TO_NUMPY[types["inputs_embeds"]]
        self.cache_dtype = _ORT_TO_NUMPY[types[self.key_names[0]]]
        self.mask_dtype = _ORT_TO_NUMPY[types["attention_mask"]]
        # Memory-mapped: a 150k-token table stays on disk until rows are looked up.
        self.embeddings = np.load(folder / embeddings_file, mmap_mode="r")

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.embeddings[np.asarray(token_ids, dtype=np.int64)], dtype=self.embeds_dtype)

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_size)
        return {name: np.zeros(shape, self.cache_dtype) for name in self.key_names + self.value_names}

    def forward(self, embeds: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``embeds`` (B, T, D) after the cached positions; returns last-position logits and the
        grown cache."""
        past = cache[self.key_names[0]].shape[2]
        batch, new = embeds.shape[:2]
        feeds = dict(cache)
        feeds["inputs_embeds"] = embeds.astype(self.embeds_dtype, copy=False)
        feeds["attention_mask"] = np.ones((batch, past + new), dtype=self.mask_dtype)
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(names, outputs))
        grown = {}
        for past_name, present_name in zip(self.key_names + self.value_names,
                                           self.present_key_names + self.present_value_names):
            grown[past_name] = result[present_name]
        return result["logits"][:, -1].astype(np.float32), grown

    def greedy(self, prompt_embeds: np.ndarray, max_new_tokens: int, eos_token_ids: Sequence[int] = ()) -> list[int]:
        """Greedy tokens after ``prompt_embeds`` (1, T, D): the reference the exporter validates."""
        logits, cache = self.forward(prompt_embeds[None] if prompt_embeds.ndim == 2 else prompt_embeds,
                                     self.empty_cache())
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0].argmax())
            tokens.append(token)
            if token in eos_token_ids:
                break
            logits, cache = self.forward(self.embed([token])[None], cache)
        return tokens
