"""How much memory a bundle (or a model not exported yet) needs, and where it fits (torch-free).

A budget has five lines, each with the rule that produced it:

* **weights** of the vision tower and of the LLM: for a bundle the sizes of its files (ONNX +
  external data, TensorRT engine, the LLM's embedding table); for a plan, parameters counted from
  the shipped reference configs (``ftz_edge/configs/*.json``) times the bytes per weight of the
  chosen precision (``LLM_BLOCK`` below says how INT4 / INT8 are stored);
* **KV cache** at the context length the runtime allows:
  ``2 (K and V) x layers x KV heads x head dim x context x bytes per element``; the runtime's
  decoder writes each step's ``present`` into new buffers while ``past`` is still alive, so a
  second copy is counted under activations;
* **activations** of one image and one prompt (batch 1): the vision tower's largest layer, the
  LLM's prefill (logits of every prompt position inside the graph — and copied to the host too
  for a bundle whose decoder is not trimmed to the last position — plus its largest layer), the
  TensorRT workspace limit recorded with an engine;
* **runtime overhead**: Python, onnxruntime and, on a GPU, the CUDA context and its libraries.
  An assumption, not a measurement (stated in the output).

Jetson modules share one memory between CPU and GPU, so a budget is checked against one pool
there; a discrete GPU is checked per pool (what runs on the GPU against its free memory, the rest
against the host's available RAM).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from importlib import resources
from typing import Callable, List, Optional

from ftz_edge import precision as P

MIB = 1 << 20
GIB = 1 << 30

# ONNX Runtime GenAI's builder stores INT4 / INT8 weights in MatMulNBits blocks of 32 with one
# scale (fp32 for a CPU build, fp16 for CUDA) and one zero point of the same bit width per block.
# Checked: Qwen2.5-0.5B at int4 for CPU comes to 316 MB by this rule, 317 MB measured (an ORT GenAI build on this project's machines).
LLM_BLOCK = P.DEFAULT_LLM_BLOCK_SIZE  # what ftz-export writes unless --llm-block-size says otherwise
# The vision tower: INT8 is Q/DQ weights with per-channel scales, and the FtZ fusion modules and
# embeddings stay FP16 by default (export/quantize.py): about 1.1 bytes per weight on average.
TOWER_BYTES_PER_WEIGHT = P.VISION_BYTES_PER_WEIGHT
# Assumptions (not measured here): what the process costs before any model is loaded.
OVERHEAD_CPU = 256 * MIB  # Python + numpy + onnxruntime + tokenizers
OVERHEAD_GPU = 1 * GIB  # + CUDA context, cuBLAS / cuDNN kernels, TensorRT
# A prompt for the activation estimate: one image plus this many text tokens.
PROMPT_TEXT_TOKENS = 64
# When a bundle does not say (it records neither the encoders' widths nor the LLM's MLP size):
ASSUMED_MLP_RATIO = 4  # MLP width / model width
ASSUMED_HEAD_DIM = 64


def llm_bytes_per_weight(precision: str, provider: str) -> float:
    """Bytes per MatMul weight of the exported decoder (``provider``: what it is built for)."""
    bits = P.LLM_WEIGHT_BITS[P.parse_llm(precision)]
    if precision not in P.QUANTIZED_LLM:
        return bits / 8
    scale_bits = 32 if provider == "cpu" else 16
    return (bits + (scale_bits + bits) / LLM_BLOCK) / 8


def embed_dtype_bytes(llm_precision: str) -> int:
    """export/llm.py keeps the embedding table fp32 for fp32 bundles, fp16 for all others."""
    return 4 if llm_precision == P.FP32 else 2


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, context: int, bytes_per_element: int, batch: int = 1) -> int:
    """K and V of every layer for ``context`` positions: 2 x layers x kv_heads x head_dim x context x bytes."""
    return 2 * layers * kv_heads * head_dim * context * bytes_per_element * batch


def layer_activation_elements(tokens: int, width: int, mlp: int, heads: int) -> int:
    """Largest live set of one transformer layer at batch 1: residual, norm output, Q, K, V and
    attention output (6 x tokens x width), the MLP's hidden (tokens x mlp), scores and softmax
    (2 x heads x tokens^2; fused attention kernels need less, so this is an upper estimate)."""
    return tokens * (6 * width + mlp) + 2 * heads * tokens * tokens


# -- what a model is made of ---------------------------------------------------------------------
@dataclass
class Encoder:
    """One ViT as far as activations go: its tokens per image and layer sizes."""

    tokens: int
    width: int
    mlp: int
    heads: int


@dataclass
class ModelSpec:
    """Everything a budget is computed from; built from a bundle or from reference configs."""

    label: str
    vision_precision: str
    vision_weight_bytes: int
    vision_weight_how: str
    vision_on_gpu: bool
    llm_precision: str
    llm_provider: str  # "cpu" | "cuda": what the decoder was built for (and so where it runs)
    llm_decoder_bytes: int  # model.onnx + external data
    llm_embed_bytes: int  # embed_tokens.npy (memory-mapped: only the rows used become resident)
    llm_weight_how: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    heads: int
    mlp: int
    vocab: int
    context: int
    kv_bytes_per_element: int
    image_tokens: int
    anchor: Encoder
    augmenter: Optional[Encoder]
    fusion_points: int
    tensorrt_workspace_bytes: int = 0
    # ftz-export trims the decoder's logits output to the last position (export/llm.py); older
    # bundles return every position, which is then copied to the host too.
    last_position_logits: bool = True
    # Bundles exported from ftz-edge 0.1 on with the LM head fed the last position only (manifest
    # llm.lm_head == "last position only"): one logits row exists at all, even inside the graph.
    lm_head_last_position: bool = True
    assumptions: List[str] = field(default_factory=list)
    checkpoint: str = "<your checkpoint>"  # for the ftz-export commands in suggestions

    @property
    def prefill_tokens(self) -> int:
        return min(self.context, self.image_tokens + PROMPT_TEXT_TOKENS)


@dataclass
class BudgetItem:
    name: str
    bytes: int
    how: str
    on_gpu: bool  # where it lives when the machine has a discrete GPU


@dataclass
class MemoryBudget:
    label: str
    vision_weights: BudgetItem
    llm_weights: BudgetItem
    kv_cache: BudgetItem
    activations: BudgetItem
    overhead: BudgetItem
    assumptions: List[str] = field(default_factory=list)

    @property
    def items(self) -> List[BudgetItem]:
        return [self.vision_weights, self.llm_weights, self.kv_cache, self.activations, self.overhead]

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    def pool_bytes(self, on_gpu: bool) -> int:
        return sum(item.bytes for item in self.items if item.on_gpu == on_gpu)

    def to_dict(self) -> dict:
        return {"label": self.label, "items": [asdict(item) for item in self.items], "total": self.total,
                "assumptions": list(self.assumptions)}


def budget(spec: ModelSpec, gpu: bool) -> MemoryBudget:
    """The memory ``spec`` needs; ``gpu``: the machine has a CUDA GPU (the overhead includes its context)."""
    # Activations are fp16 only where the graph is: a GPU tower below fp32, a CUDA LLM below fp32.
    act_vision = 2 if spec.vision_on_gpu and spec.vision_precision != P.FP32 else 4
    act_llm = 2 if spec.llm_provider == "cuda" and spec.llm_precision != P.FP32 else 4
    llm_on_gpu = spec.llm_provider == "cuda"
    kv = kv_cache_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.context, spec.kv_bytes_per_element)
    kv_how = (f"2 x {spec.num_layers} layers x {spec.num_kv_heads} KV heads x {spec.head_dim} head dim x "
              f"{spec.context} tokens x {spec.kv_bytes_per_element} bytes")

    encoders = [e for e in (spec.anchor, spec.augmenter) if e is not None]
    # The augmenter runs first; the states the fusion points read stay alive while the anchor runs.
    vision_peak = max(layer_activation_elements(e.tokens, e.width, e.mlp, e.heads) for e in encoders)
    kept = spec.fusion_points * spec.augmenter.tokens * spec.augmenter.width if spec.augmenter else 0
    vision_act = (vision_peak + kept + spec.image_tokens * spec.hidden) * act_vision
    t = spec.prefill_tokens
    # Older decoders computed every prompt position's logits inside the graph (the full
    # projection), and an untrimmed output also went to the host; now the head sees one row.
    if spec.lm_head_last_position:
        logits = spec.vocab * act_llm
        logits_how = "last position only"
    else:
        logits = (1 if spec.last_position_logits else 2) * t * spec.vocab * act_llm
        logits_how = "every position" + (" inside the graph" if spec.last_position_logits else " on device and host")
    llm_layer = layer_activation_elements(t, spec.hidden, 2 * spec.mlp, spec.heads) * act_llm
    activations = vision_act + logits + llm_layer + kv + spec.tensorrt_workspace_bytes
    act_how = (f"vision {_fmt(vision_act)} (largest encoder layer at batch 1 + fused-in states), LLM prefill of "
               f"{t} tokens {_fmt(logits + llm_layer)} (logits of the {logits_how}: "
               f"{_fmt(logits)}), second KV copy during a step {_fmt(kv)}")
    if spec.tensorrt_workspace_bytes:
        act_how += f", TensorRT workspace limit {_fmt(spec.tensorrt_workspace_bytes)}"
    overhead = OVERHEAD_GPU if gpu else OVERHEAD_CPU
    # The runtime's image-embedding cache may fill its whole budget (FtZRuntime(image_cache_mb=...)).
    cache = IMAGE_CACHE_BYTES
    return MemoryBudget(
        label=spec.label,
        vision_weights=BudgetItem("vision weights", spec.vision_weight_bytes, spec.vision_weight_how, spec.vision_on_gpu),
        llm_weights=BudgetItem("LLM weights", spec.llm_decoder_bytes + spec.llm_embed_bytes, spec.llm_weight_how, llm_on_gpu),
        kv_cache=BudgetItem("KV cache", kv, kv_how, llm_on_gpu),
        activations=BudgetItem("activations", activations, act_how, spec.vision_on_gpu or llm_on_gpu),
        overhead=BudgetItem("runtime overhead", overhead + cache,
                            "assumed: Python, onnxruntime" + (", CUDA context and libraries" if gpu else "") +
                            f"; plus the image-embedding cache's default budget {_fmt(cache)}", False),
        assumptions=list(spec.assumptions),
    )


IMAGE_CACHE_BYTES = 256 * MIB  # FtZRuntime's default image_cache_mb


# -- where it has to fit -------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    unified: bool  # one memory for CPU and GPU (a CPU-only machine, a Jetson)
    available: int  # unified: the usable total; discrete: the host RAM available
    gpu_free: Optional[int] = None  # discrete GPU only
    gpu: bool = True  # a CUDA GPU is there (for the overhead assumption)
    note: str = ""


# Usable memory on the Orin modules is an assumption, not measured here: about 5 GB for apps on
# an Orin Nano 8 GB; for the others, the total minus about 3 GB for the OS, desktop and carveouts.
JETSON_TARGETS = (
    Target("Jetson Orin Nano 8 GB", True, 5 * GIB, note="about 5 GB usable for apps (assumed)"),
    Target("Jetson Orin NX 16 GB", True, 13 * GIB, note="16 GB minus ~3 GB for the OS (assumed)"),
    Target("Jetson AGX Orin 32 GB", True, 29 * GIB, note="32 GB minus ~3 GB for the OS (assumed)"),
    Target("Jetson AGX Orin 64 GB", True, 61 * GIB, note="64 GB minus ~3 GB for the OS (assumed)"),
)


@dataclass
class Change:
    name: str
    how: str  # the command or edit that makes it
    apply: Callable[[ModelSpec], ModelSpec]


@dataclass
class Fit:
    target: str
    note: str
    needed: int
    available: int
    fits: bool
    detail: str
    changes: List[dict] = field(default_factory=list)  # {change, how, saving, fits_after}
    all_changes_fit: Optional[bool] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _fits(b: MemoryBudget, target: Target) -> tuple[bool, int, int, str]:
    if target.unified or target.gpu_free is None:
        return b.total <= target.available, b.total, target.available, \
            f"needs {_fmt(b.total)} of {_fmt(target.available)}"
    on_gpu, on_host = b.pool_bytes(True), b.pool_bytes(False)
    fits = on_gpu <= target.gpu_free and on_host <= target.available
    return fits, b.total, target.available + target.gpu_free, \
        f"GPU needs {_fmt(on_gpu)} of {_fmt(target.gpu_free)} free, host {_fmt(on_host)} of {_fmt(target.available)}"


def check_fit(spec: ModelSpec, target: Target) -> Fit:
    """Does ``spec`` fit ``target``; if not, each applicable change with its saving and whether it
    alone makes it fit, and whether all of them together would."""
    b = budget(spec, target.gpu)
    fits, needed, available, detail = _fits(b, target)
    fit = Fit(target.name, target.note, needed, available, fits, detail)
    if fits:
        return fit
    combined = spec
    for change in changes_for(spec):
        changed = change.apply(spec)
        after = budget(changed, target.gpu)
        fit.changes.append({"change": change.name, "how": change.how, "saving": b.total - after.total,
                            "fits_after": _fits(after, target)[0]})
        combined = change.apply(combined)
    if fit.changes:
        fit.all_changes_fit = _fits(budget(combined, target.gpu), target)[0]
    return fit


def changes_for(spec: ModelSpec) -> List[Change]:
    """The real ftz-export options (and the one config edit) that shrink ``spec``."""
    out = []
    export = f"ftz-export --checkpoint {spec.checkpoint}"
    if spec.llm_precision != P.INT4:
        provider = " --llm-provider cuda" if spec.llm_provider == "cuda" else ""
        out.append(Change("INT4 LLM", f"{export} --llm-precision int4{provider}", _to_int4))
    if spec.vision_precision == P.FP32:
        out.append(Change("FP16 vision tower", f"{export} --precision fp16", lambda s: _tower(s, P.FP16)))
    if spec.vision_precision in (P.FP32, P.FP16):
        out.append(Change("INT8 vision tower", f"{export} --precision int8 (measure its accuracy and speed: "
                          "INT8 ViT engines are often no faster than FP16)", lambda s: _tower(s, P.INT8)))
    shorter = max(spec.context // 2, spec.image_tokens + 128)
    if shorter < spec.context:
        out.append(Change(f"context {shorter} instead of {spec.context}",
                          f"set max_length to {shorter} in the checkpoint's ftz_config.json and re-export (ftz-export "
                          "has no context option; the runtime uses min(max_length, the LLM's context length))",
                          lambda s: replace(s, context=shorter)))
    if spec.tensorrt_workspace_bytes > GIB:
        out.append(Change("1 GB TensorRT workspace", f"{export} --engine trt --workspace-gb 1 (on the device)",
                          lambda s: replace(s, tensorrt_workspace_bytes=GIB)))
    return out


def _to_int4(spec: ModelSpec) -> ModelSpec:
    ratio = llm_bytes_per_weight(P.INT4, spec.llm_provider) / llm_bytes_per_weight(spec.llm_precision, spec.llm_provider)
    embed = spec.llm_embed_bytes * embed_dtype_bytes(P.INT4) // embed_dtype_bytes(spec.llm_precision)
    return replace(spec, llm_precision=P.INT4, llm_decoder_bytes=int(spec.llm_decoder_bytes * ratio), llm_embed_bytes=embed)


def _tower(spec: ModelSpec, precision: str) -> ModelSpec:
    ratio = TOWER_BYTES_PER_WEIGHT[precision] / TOWER_BYTES_PER_WEIGHT[spec.vision_precision]
    return replace(spec, vision_precision=precision, vision_weight_bytes=int(spec.vision_weight_bytes * ratio))


# -- reference models, counted by hand from the shipped configs (no torch) --------------------
REFERENCE_ANCHOR = "clip-vit-large-patch14-336"
AUGMENTERS = ("dinov2-small", "dinov2-base", "dinov2-large")
LLMS = ("qwen2.5-0.5b", "tinyllama-1.1b")
AUGMENTER_IMAGE_SIZE = 224  # DINOv2's processor crops 224 px (preprocessor_config of facebook/dinov2-*)


def reference_config(name: str) -> dict:
    return json.loads(resources.files("ftz_edge").joinpath("configs", f"{name}.json").read_text())


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def clip_layer_params(c: dict) -> int:
    d, m = c["hidden_size"], c["intermediate_size"]
    return 4 * _linear(d, d) + _linear(d, m) + _linear(m, d) + 2 * 2 * d  # q k v o, fc1 fc2, 2 LayerNorms


def clip_embedding_params(c: dict) -> int:
    d, p = c["hidden_size"], c["patch_size"]
    positions = (c["image_size"] // p) ** 2 + 1
    return d + 3 * p * p * d + positions * d + 2 * d  # class embedding, patch conv (no bias), positions, pre-LayerNorm


def clip_vision_params(c: dict) -> int:
    """CLIPVisionModel: embeddings + pre-LayerNorm, layers, post-LayerNorm."""
    return clip_embedding_params(c) + c["num_hidden_layers"] * clip_layer_params(c) + 2 * c["hidden_size"]


def dinov2_layer_params(c: dict) -> int:
    d = c["hidden_size"]
    m = d * c["mlp_ratio"]
    return 4 * _linear(d, d) + _linear(d, m) + _linear(m, d) + 2 * 2 * d + 2 * d  # + 2 LayerNorms, 2 layer scales


def dinov2_embedding_params(c: dict) -> int:
    d, p = c["hidden_size"], c["patch_size"]
    positions = (c["image_size"] // p) ** 2 + 1
    return 2 * d + positions * d + 3 * p * p * d + d  # CLS + mask tokens, positions, patch conv with bias


def dinov2_params(c: dict) -> int:
    """Dinov2Model: embeddings, layers, final LayerNorm."""
    return dinov2_embedding_params(c) + c["num_hidden_layers"] * dinov2_layer_params(c) + 2 * c["hidden_size"]


def fusion_params(anchor_width: int, augmenter_width: int) -> int:
    """One FtZ fusion point: W_proj + Q, K, V and output projections (ftz_edge.fusion)."""
    return _linear(augmenter_width, anchor_width) + 4 * _linear(anchor_width, anchor_width)


def projector_params(in_width: int, out_width: int, depth: int = 2) -> int:
    return _linear(in_width, out_width) + (depth - 1) * _linear(out_width, out_width)


def decoder_layer_params(c: dict) -> tuple[int, int]:
    """(MatMul weights, other parameters) of one Qwen2 / Llama decoder layer."""
    d, m = c["hidden_size"], c["intermediate_size"]
    head_dim = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    matmul = d * q + 2 * d * kv + q * d + 3 * d * m
    biases = q + 2 * kv if c["model_type"] == "qwen2" else 0  # Qwen2 has q/k/v biases, Llama none
    return matmul, biases + 2 * d  # + 2 RMSNorms


def llm_params(c: dict) -> int:
    """The Hugging Face causal LM's parameter count (a tied lm_head counted once)."""
    matmul, other = decoder_layer_params(c)
    embed = c["vocab_size"] * c["hidden_size"]
    lm_head = 0 if c.get("tie_word_embeddings") else embed
    return embed + c["num_hidden_layers"] * (matmul + other) + c["hidden_size"] + lm_head


def anchor_depth(anchor: dict, select_layer: int = -1) -> int:
    # -1: the paper preset's final-layer features (ftz_edge.config.TowerConfig.select_layer).
    return select_layer if select_layer > 0 else anchor["num_hidden_layers"] + 1 + select_layer


def deepest_augmenter_layer(anchor_layer: int, anchor_layers: int, augmenter_layers: int) -> int:
    """The augmenter layer paired with the last fusion point (ftz_edge.fusion.map_to_augmenter_layer:
    nearest relative depth, ties to the shallower); nothing deeper is run or exported."""
    target = Fraction(anchor_layer * augmenter_layers, anchor_layers)
    return min(max(math.ceil(target - Fraction(1, 2)), 1), augmenter_layers)


@dataclass
class ReferenceTower:
    """Parameters of a paper-preset FtZ tower of real size as exported (pruned layers left out:
    none with the paper's final-layer features; the llava preset's -2 leaves out the last ones)."""

    anchor_layers_run: int
    augmenter_layers_run: int
    anchor_params: int  # embeddings + the layers run
    augmenter_params: int
    fusion_params: int
    projector_params: int
    anchor_tokens: int
    augmenter_tokens: int

    @property
    def total(self) -> int:
        return self.anchor_params + self.augmenter_params + self.fusion_params + self.projector_params


def reference_tower(augmenter: str = "dinov2-large", llm: str = "qwen2.5-0.5b", num_fusion_points: int = 4,
                    select_layer: int = -1) -> ReferenceTower:
    a, g, lm = reference_config(REFERENCE_ANCHOR), reference_config(augmenter), reference_config(llm)
    depth = anchor_depth(a, select_layer)
    g_depth = deepest_augmenter_layer(depth, a["num_hidden_layers"], g["num_hidden_layers"])
    return ReferenceTower(
        anchor_layers_run=depth, augmenter_layers_run=g_depth,
        anchor_params=clip_embedding_params(a) + depth * clip_layer_params(a),
        augmenter_params=dinov2_embedding_params(g) + g_depth * dinov2_layer_params(g),
        fusion_params=num_fusion_points * fusion_params(a["hidden_size"], g["hidden_size"]),
        projector_params=projector_params(a["hidden_size"], lm["hidden_size"]),
        anchor_tokens=(a["image_size"] // a["patch_size"]) ** 2 + 1,
        augmenter_tokens=(AUGMENTER_IMAGE_SIZE // g["patch_size"]) ** 2 + 1,
    )


def exported_llm_bytes(llm: str, precision: str, provider: str) -> tuple[int, int]:
    """(decoder, embedding table) bytes of ``llm`` from ONNX Runtime GenAI's builder with
    exclude_embeds: every MatMul (the lm_head too, also when tied) at the precision's bytes per
    weight, norms and biases in fp32 (CPU) / fp16 (CUDA); the table as export/llm.py writes it."""
    c = reference_config(llm)
    matmul, other = decoder_layer_params(c)
    d, vocab, layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    matmuls = layers * matmul + vocab * d
    others = layers * other + d
    decoder = matmuls * llm_bytes_per_weight(precision, provider) + others * (4 if provider == "cpu" else 2)
    return int(decoder), vocab * d * embed_dtype_bytes(precision)


def plan_spec(augmenter: str = "dinov2-large", llm: str = "qwen2.5-0.5b", tower_precision: str = P.DEFAULT_VISION_PRECISION,
              llm_precision: str = P.DEFAULT_LLM_PRECISION, context: Optional[int] = None, gpu: bool = True) -> ModelSpec:
    """A paper-preset FtZ model of real size (CLIP-L/336 + ``augmenter`` + ``llm``), exported at the
    given precisions, run on a GPU (vision and LLM on CUDA) or on the CPU."""
    if augmenter not in AUGMENTERS:
        raise ValueError(f"augmenter must be one of {', '.join(AUGMENTERS)}, got {augmenter!r}")
    if llm not in LLMS:
        raise ValueError(f"LLM must be one of {', '.join(LLMS)}, got {llm!r}")
    P.parse_vision(tower_precision, "tower precision")
    P.parse_llm(llm_precision)
    provider = "cuda" if gpu else "cpu"
    if provider not in P.LLM_PROVIDERS[llm_precision]:  # what ftz-export's LLM builder can make
        only = " and ".join(p.upper() for p in P.LLM_PROVIDERS[llm_precision])
        raise ValueError(f"an {llm_precision} LLM is built for {only} only (ONNX Runtime GenAI's builder)")
    tower = reference_tower(augmenter, llm)
    a, g, c = reference_config(REFERENCE_ANCHOR), reference_config(augmenter), reference_config(llm)
    # FtZConfig.max_length (2048) caps the runtime's context below Qwen's 32768 positions.
    context = min(context or 2048, c["max_position_embeddings"])
    decoder, embed = exported_llm_bytes(llm, llm_precision, provider)
    image_tokens = tower.anchor_tokens - 1  # LLaVA's patch tokens
    return ModelSpec(
        label=f"CLIP-L/336 + {augmenter} {tower_precision} tower, {llm} {llm_precision} LLM ({provider}), context {context}",
        vision_precision=tower_precision,
        vision_weight_bytes=int(tower.total * TOWER_BYTES_PER_WEIGHT[tower_precision]),
        vision_weight_how=(f"{tower.total / 1e6:.0f} M parameters (CLIP layers 1-{tower.anchor_layers_run}, "
                           f"{augmenter} layers 1-{tower.augmenter_layers_run}, 4 fusion points, projector) x "
                           f"{TOWER_BYTES_PER_WEIGHT[tower_precision]} bytes"),
        vision_on_gpu=gpu,
        llm_precision=llm_precision, llm_provider=provider, llm_decoder_bytes=decoder, llm_embed_bytes=embed,
        llm_weight_how=(f"{llm_params(c) / 1e6:.0f} M parameters; decoder {_fmt(decoder)} at "
                        f"{llm_bytes_per_weight(llm_precision, provider):.3g} bytes per MatMul weight, "
                        f"embedding table {_fmt(embed)}"),
        num_layers=c["num_hidden_layers"], num_kv_heads=c["num_key_value_heads"],
        head_dim=c["hidden_size"] // c["num_attention_heads"], hidden=c["hidden_size"], heads=c["num_attention_heads"],
        mlp=c["intermediate_size"], vocab=c["vocab_size"], context=context,
        kv_bytes_per_element=2 if gpu and llm_precision != P.FP32 else 4, image_tokens=image_tokens,
        anchor=Encoder(tower.anchor_tokens, a["hidden_size"], a["intermediate_size"], a["num_attention_heads"]),
        augmenter=Encoder(tower.augmenter_tokens, g["hidden_size"], g["hidden_size"] * g["mlp_ratio"],
                          g["num_attention_heads"]),
        fusion_points=4,
        assumptions=["parameters counted from ftz_edge/configs (paper preset, 4 fusion points, penultimate CLIP layer)",
                     f"INT4/INT8 LLM: MatMulNBits blocks of {LLM_BLOCK}, one scale + zero point per block"],
    )


def _fmt(n: float) -> str:
    """Bytes as MiB / GiB (binary units)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


fmt_bytes = _fmt
