"""The exported LLM decoder driven by plain ONNX Runtime, with its KV cache (torch-free).

The graph (ONNX Runtime GenAI's model builder with ``exclude_embeds=true``) takes
``inputs_embeds``, ``attention_mask`` and ``past_key_values.{i}.key/value`` and returns
``logits`` and ``present.{i}.key/value``. Text tokens are embedded by looking up the exported
embedding table, so image embeddings can be spliced in between them.

The cache is preallocated and never copied (``KVCache``): one (B, kv_heads, capacity, head)
buffer per ``past`` input, allocated once per request on the session's device (a GPU keeps it in
device memory), bound by IO binding as both the ``past`` input and the ``present`` output of every
step. That is GroupQueryAttention's shared past/present buffer mode (ONNX Runtime GenAI's
``past_present_share_buffer``): the kernel writes the new positions in place and reads the valid
length from ``attention_mask``, instead of allocating a longer cache and copying the old one into
it on every token (at Qwen2.5-0.5B's 600-token context that copy was a quarter of a decode step on
a 2-core CPU). A cache that fills up grows by doubling (one copy, through the host). The logits do
come to the host. ftz-export's graph
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

    def empty_cache(self, batch: int = 1, capacity: Optional[int] = None) -> "KVCache":
        """A cache for ``batch`` sequences holding ``capacity`` positions before it must grow (a
        request knows its size: prompt + max_new_tokens; None: sized by the first step, doubled as
        needed). Capped at the model's context length."""
        return KVCache(self, batch, capacity)

    def forward(self, embeds: np.ndarray, cache: "KVCache") -> Tuple[np.ndarray, "KVCache"]:
        """Run ``embeds`` (B, T, D) after the cached positions; returns the last position's logits
        (B, vocab) (float32, on the host) and the cache, which now holds these T positions too (it is
        written in place: the cache passed in is the one returned)."""
        batch, new = embeds.shape[:2]
        cache.reserve(cache.length + new)
        binding = cache.binding
        if binding is None:  # once per allocation: the cache buffers stay bound from step to step
            binding = cache.binding = self.session.io_binding()
            binding.bind_output("logits", self.device)  # first: get_outputs() lists outputs as bound
            for past, present in zip(self.past_names, self.present_names):
                binding.bind_ortvalue_input(past, cache.buffers[past])
                binding.bind_ortvalue_output(present, cache.buffers[past])  # same memory: written in place
        else:  # unallocated again: after a run the binding holds that run's logits, whose shape may not fit this one
            binding.bind_output("logits", self.device)
        binding.bind_ortvalue_input("inputs_embeds", self._on_device(embeds.astype(self.embeds_dtype, copy=False)))
        # Only its length matters to the graph (total_sequence_length; seqlens_k = its sum - 1).
        binding.bind_ortvalue_input("attention_mask",
                                    self._on_device(np.ones((batch, cache.length + new), self.mask_dtype)))
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()[:, -1].astype(np.float32)
        cache.length += new
        return logits, cache

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


class KVCache:
    """The decoder's past keys and values: one preallocated (B, kv_heads, capacity, head_size)
    buffer per ``past`` input on the session's device, of which the first ``length`` positions
    are valid. ``OnnxDecoder.forward`` binds each buffer as both ``past`` and ``present``."""

    GROW_MIN = 256  # spare positions at least, each time the cache (re)allocates on demand

    def __init__(self, decoder: OnnxDecoder, batch: int = 1, capacity: Optional[int] = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"a KV cache holds at least 1 position, not {capacity}")
        self.decoder = decoder
        self.batch = batch
        self.length = 0
        self.capacity = 0
        self.buffers: Dict[str, object] = {}
        self.binding = None  # the IO binding with these buffers bound (OnnxDecoder.forward makes it)
        if capacity is not None:
            self._allocate(min(capacity, decoder.context_length))

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        decoder = self.decoder
        shape = (self.batch, decoder.num_kv_heads, capacity, decoder.head_size)
        buffers = {}
        for name in decoder.past_names:
            array = np.zeros(shape, decoder.cache_dtype)
            if keep:  # growing: the valid positions move into the larger buffer (through the host)
                array[:, :, :keep] = self.buffers[name].numpy()[:, :, :keep]
            buffers[name] = decoder._on_device(array)
        self.buffers, self.capacity, self.binding = buffers, capacity, None

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions (a no-op while they fit; otherwise one grow)."""
        if needed <= self.capacity:
            return
        if needed > self.decoder.context_length:
            raise ValueError(f"{needed} positions do not fit the decoder's {self.decoder.context_length}-token context")
        grown = min(max(needed + self.GROW_MIN, 2 * self.capacity), self.decoder.context_length)
        self._allocate(grown, keep=self.length)
