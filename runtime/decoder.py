"""The exported LLM decoder driven by plain ONNX Runtime, with its KV cache (torch-free).

The graph (ONNX Runtime GenAI's model builder with ``exclude_embeds=true``) takes
``inputs_embeds``, ``attention_mask`` and ``past_key_values.{i}.key/value`` and returns
``logits`` and ``present.{i}.key/value``. Text tokens are embedded by looking up the exported
embedding table, so image embeddings can be spliced in between them.

The cache never goes through numpy: each step binds the previous step's ``present`` OrtValues
as the next step's ``past`` inputs (IO binding), on whatever device the session runs on, so a
GPU keeps the cache in device memory. The logits do come to the host. ftz-export's graph
computes the LM head inside the graph on the last position only (a Gather before the head:
``export/llm.py``, ``lm_head_on_last_position``), so ``logits`` are (B, 1, vocab) and one
(vocab,) row per sequence reaches the host per step, prefill included. A decoder that returns
every position (the builder's raw graph, bundles exported before that pass) still works: its
whole (B, T, vocab) ``logits`` come to the host and the last position is taken (``[:, -1]``).

This is our own loop rather than ONNX Runtime GenAI's generator because GenAI has no CUDA build
for aarch64 (Jetson), while plain onnxruntime runs everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ftz_edge.runtime import device

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32}
_DEVICE_OF_PROVIDER = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


class OnnxRuntimeTooOld(ValueError):  # a ValueError: every front end prints those as one line
    """The installed onnxruntime is older than the one the decoder graph needs."""


def check_onnxruntime(installed: str, needed: Optional[str]) -> None:
    """Raise OnnxRuntimeTooOld (one line) when ``installed`` is older than ``needed`` (the
    manifest's ``llm.min_onnxruntime``; None: nothing recorded, nothing checked)."""
    from packaging.version import Version  # an onnxruntime dependency, so present wherever it is

    if needed and Version(installed).release < Version(needed).release:
        raise OnnxRuntimeTooOld(f"this bundle's decoder needs onnxruntime >= {needed}, installed: {installed} "
                                f"(upgrade it, or re-export the bundle with this onnxruntime)")


class OnnxDecoder:
    def __init__(self, folder, model_file: str = "model.onnx", embeddings_file: str = "embed_tokens.npy",
                 providers: Optional[Sequence[str]] = None, session_options=None,
                 min_onnxruntime: Optional[str] = None):
        """``min_onnxruntime``: the manifest's ``llm.min_onnxruntime``; an older onnxruntime is
        refused in one line (OnnxRuntimeTooOld) rather than by the graph loader's traceback."""
        import onnxruntime as ort

        check_onnxruntime(ort.__version__, min_onnxruntime)
        self._ort = ort
        folder = Path(folder)
        config = json.loads((folder / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        self.num_layers = decoder["num_hidden_layers"]
        self.num_kv_heads = decoder["num_key_value_heads"]
        self.head_size = decoder["head_size"]
        self.context_length = config["context_length"]
        names = decoder["inputs"], decoder["outputs"]
        self.past_names = [names[0]["past_key_names"] % i for i in range(self.num_layers)] + \
                          [names[0]["past_value_names"] % i for i in range(self.num_layers)]
        self.present_names = [names[1]["present_key_names"] % i for i in range(self.num_layers)] + \
                             [names[1]["present_value_names"] % i for i in range(self.num_layers)]
        providers = list(providers or ["CPUExecutionProvider"])
        device.preload_gpu_libraries(providers)
        self.session = ort.InferenceSession(str(folder / model_file), sess_options=session_options, providers=providers)
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.embeds_dtype = _ORT_TO_NUMPY[types["inputs_embeds"]]
        self.cache_dtype = _ORT_TO_NUMPY[types[self.past_names[0]]]
        self.mask_dtype = _ORT_TO_NUMPY[types["attention_mask"]]
        self.device = _DEVICE_OF_PROVIDER.get(self.session.get_providers()[0], "cpu")
        # Memory-mapped: a 150k-token table stays on disk until rows are looked up.
        self.embeddings = np.load(folder / embeddings_file, mmap_mode="r")

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.embeddings[np.asarray(token_ids, dtype=np.int64)], dtype=self.embeds_dtype)

    def _on_device(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def empty_cache(self, batch: int = 1) -> Dict[str, object]:
        shape = (batch, self.num_kv_heads, 0, self.head_size)
        return {name: self._on_device(np.zeros(shape, self.cache_dtype)) for name in self.past_names}

    @staticmethod
    def cache_length(cache: Dict[str, object]) -> int:
        return next(iter(cache.values())).shape()[2]

    def forward(self, embeds: np.ndarray, cache: Dict[str, object]) -> Tuple[np.ndarray, Dict[str, object]]:
        """Run ``embeds`` (B, T, D) after the cached positions; returns the last position's logits
        (B, vocab) (float32, on the host) and the grown cache (OrtValues, on the session's device)."""
        past = self.cache_length(cache)
        batch, new = embeds.shape[:2]
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("inputs_embeds", self._on_device(embeds.astype(self.embeds_dtype, copy=False)))
        binding.bind_ortvalue_input("attention_mask", self._on_device(np.ones((batch, past + new), self.mask_dtype)))
        for name in self.past_names:
            binding.bind_ortvalue_input(name, cache[name])
        binding.bind_output("logits", self.device)
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(["logits", *self.present_names], binding.get_outputs()))
        logits = outputs["logits"].numpy()[:, -1].astype(np.float32)
        return logits, {past: outputs[present] for past, present in zip(self.past_names, self.present_names)}

    def greedy(self, prompt_embeds: np.ndarray, max_new_tokens: int, eos_token_ids: Sequence[int] = ()) -> List[int]:
        """Greedy tokens after ``prompt_embeds`` (T, D) or (1, T, D): the exporter's parity check."""
        embeds = prompt_embeds[None] if prompt_embeds.ndim == 2 else prompt_embeds
        logits, cache = self.forward(embeds, self.empty_cache())
        tokens: List[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0].argmax())
            tokens.append(token)
            if token in eos_token_ids:
                break
            logits, cache = self.forward(self.embed([token])[None], cache)
        return tokens
