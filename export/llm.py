"""The LLM part of a bundle: decoder with KV cache taking ``inputs_embeds``, embedding table,
tokenizer.

The decoder is built by ONNX Runtime GenAI's model builder (``exclude_embeds=true`` makes it take
``inputs_embeds``), which also does the weight-only INT4 / INT8 quantisation (MatMulNBits,
block-wise). We do not hand-write an exporter for what it already does. Two graph passes then
adapt its graph to the device (``build_decoder``): the LM head runs on the last position only,
and GroupQueryAttention loses its trailing empty inputs so that JetPack 6's onnxruntime 1.22
loads it. Every decoder written has loaded in an onnxruntime session. The embedding table is
saved separately (``embed_tokens.npy``) for the runtime to look text tokens up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ftz_edge import precision as precision_names
from ftz_edge.atomic import work_folder  # scratch folders that a killed export does not leak

# What the builder can make, per precision: the execution providers allowed (the vocabulary's
# table, which says why fp32 for cuda is left out).
BUILDER_TARGETS = precision_names.LLM_PROVIDERS

# The oldest onnxruntime the decoder loads in once its GroupQueryAttention inputs are trimmed
# (JetPack 6's onnxruntime-gpu wheels start at 1.22; CI runs the runtime on 1.22.1:
# tests/test_py310.py). A GQA node that really uses 12 inputs (head_sink) needs 1.23.
MIN_ONNXRUNTIME = "1.22"
GQA_MAX_INPUTS_1_22 = 11
# Targets the builder makes but onnxruntime cannot load, and why (check_target says so).
UNLOADABLE = {(precision_names.FP32, "cuda"): "its fp32 graph for CUDA does not load in onnxruntime"}
LM_HEAD_OPS = ("MatMul", "MatMulNBits")  # fp32/fp16: MatMul; int4/int8: MatMulNBits (block-wise weights)


class LlmExportError(RuntimeError):
    pass


def default_provider(precision: str) -> str:
    return BUILDER_TARGETS[precision][0]


def check_target(precision: str, provider: str) -> None:
    precision_names.parse(precision, BUILDER_TARGETS, "LLM precision")  # a ValueError listing the names
    if provider not in BUILDER_TARGETS[precision]:
        why = UNLOADABLE.get((precision, provider), "ONNX Runtime GenAI's model builder")
        raise ValueError(f"LLM precision {precision} can be built for {', '.join(BUILDER_TARGETS[precision])}, "
                         f"not {provider} ({why})")


def embeddings_dtype(precision: str):
    """fp32 decoders keep the embedding table exact; the others halve its size (it is only looked up)."""
    return np.float32 if precision == precision_names.FP32 else np.float16


def run_builder(hf_folder: Path, out: Path, precision: str, provider: str,
                block_size: int = precision_names.DEFAULT_LLM_BLOCK_SIZE) -> None:
    """ONNX Runtime GenAI's model builder: a Hugging Face folder -> ``out/model.onnx`` taking
    ``inputs_embeds`` (``exclude_embeds=true``) + ``genai_config.json``. Raises LlmExportError
    with the builder's last lines when it fails."""
    extra = ["exclude_embeds=true"]
    if precision in precision_names.QUANTIZED_LLM:
        # The option's name changed (int4_block_size, then block_size, the old one kept as an alias
        # that 0.18 ignores): both are given, and check_block_size reads what the graph got.
        extra += [f"block_size={block_size}", f"int4_block_size={block_size}"]
    with work_folder("ftz-builder-cache-") as cache:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
                   "-p", precision, "-e", provider, "-c", cache, "--extra_options", *extra]
        run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0 or not (Path(out) / "model.onnx").is_file():
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-15:])
        raise LlmExportError(f"ONNX Runtime GenAI's model builder failed ({' '.join(command[1:4])} ...):\n{tail}")


def _producers(graph) -> dict:
    return {name: node for node in graph.node for name in node.output}


def lm_head_on_last_position(model) -> None:
    """Make the LM head project the last position's hidden state only; ``logits`` becomes (B, 1, vocab).

    The builder's graph projects every prompt position (a 151,936 x 896 MatMul per position for
    Qwen2.5-0.5B: about a quarter of a 600-token prefill) and generation reads the last row. A
    Gather of the last position goes in front of the head's MatMul (MatMul or MatMulNBits; the
    final norm before it is per position, so gathering after it is exact). The runtime's
    ``[:, -1]`` is unchanged. Raises LlmExportError when ``logits`` do not come from such a head.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    output = next((o for o in graph.output if o.name == "logits"), None)
    producers = _producers(graph)
    if output is None or "logits" not in producers:
        raise LlmExportError("the builder's graph has no 'logits' output")
    # Walk back over dtype casts to the head: the tensors on the way change shape with it.
    path, head = ["logits"], producers["logits"]
    while head.op_type in ("Cast", "Identity") and head.input[0] in producers:
        path.append(head.input[0])
        head = producers[head.input[0]]
    if head.op_type not in LM_HEAD_OPS:
        raise LlmExportError(f"the builder's 'logits' come from a {head.op_type} node ({head.name}), "
                             f"not an LM head ({' or '.join(LM_HEAD_OPS)}); export/llm.py needs updating")
    hidden, last = head.input[0], head.input[0] + "/last_position"
    index = "lm_head_last_position_index"
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), index))
    graph.node.insert(list(graph.node).index(head),
                      helper.make_node("Gather", [hidden, index], [last], name="/lm_head/last_position", axis=1))
    head.input[0] = last
    # Shapes recorded for the path (sequence_length on axis 1) no longer hold: drop them.
    stale = [v for v in graph.value_info if v.name in path]
    for value in stale:
        graph.value_info.remove(value)
    position = output.type.tensor_type.shape.dim[1]
    position.Clear()
    position.dim_value = 1


def trim_attention_inputs(model) -> int:
    """Drop the trailing empty inputs of every GroupQueryAttention node; returns how many nodes changed.

    The builder writes all 12 of GQA's inputs, the optional ones as "" (onnxruntime 1.23's
    schema). onnxruntime 1.22 allows 7-11 and refuses the graph ("input size 12 not in range
    [min=7, max=11]"); an omitted trailing optional input means the same as an empty one.
    """
    changed = 0
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        inputs = list(node.input)
        while inputs and inputs[-1] == "":
            inputs.pop()
        if len(inputs) != len(node.input):
            del node.input[len(inputs):]
            changed += 1
    return changed


def block_sizes(model) -> set:
    """The ``block_size`` of every MatMulNBits node (empty for an unquantized graph)."""
    from onnx import helper

    return {helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "block_size"}


def check_block_size(model, expected: int) -> None:
    """Raise LlmExportError unless every quantized MatMul has ``expected`` weights per scale (a
    builder that ignored the option would otherwise ship the wrong trade-off silently)."""
    found = block_sizes(model)
    if found and found != {expected}:
        raise LlmExportError(f"asked the builder for quantization blocks of {expected} weights, its graph has "
                             f"{', '.join(map(str, sorted(found)))}: this onnxruntime-genai does not take the option")


def min_onnxruntime(model) -> str:
    """The oldest onnxruntime whose GroupQueryAttention schema takes this graph's nodes."""
    widest = max((len(n.input) for n in model.graph.node if n.op_type == "GroupQueryAttention"), default=0)
    return MIN_ONNXRUNTIME if widest <= GQA_MAX_INPUTS_1_22 else "1.23"


def adapt_graph(path: Path, block_size: Optional[int] = None) -> str:
    """Apply the graph passes to the decoder at ``path`` in place; returns the minimum onnxruntime.
    ``block_size``: checked against the quantized MatMuls (None: not checked).

    The weights stay in the builder's external data file (loaded neither here nor rewritten), so
    a decoder of any size costs only its graph's memory.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if block_size is not None:
        check_block_size(model, block_size)
    lm_head_on_last_position(model)
    trim_attention_inputs(model)
    needed = min_onnxruntime(model)
    onnx.save(model, str(path))
    return needed


def check_loads(path: Path, precision: str, provider: str) -> str:
    """Open the decoder in an onnxruntime CPU session (the CPU build also loads fp16 and int4
    graphs built for CUDA); returns onnxruntime's version. Raises LlmExportError in one line."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types: all mean "does not load"
        reason = " ".join(str(err).split())[-300:]
        raise LlmExportError(f"the {precision} decoder built for {provider} does not load in onnxruntime "
                             f"{ort.__version__}: {reason}") from None
    return ort.__version__


def _builder_version(metadata) -> Optional[str]:
    """onnxruntime-genai's version under whichever distribution name provides the module."""
    for name in ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def finish_decoder(out: Path, precision: str, provider: str, block_size: Optional[int] = None) -> dict:
    """The builder's decoder in ``out`` made the one a bundle ships: the graph passes, then the
    load check. Returns what the manifest records about it (versions, minimum onnxruntime)."""
    from importlib import metadata

    blockwise = precision in precision_names.QUANTIZED_LLM
    needed = adapt_graph(Path(out) / "model.onnx", block_size if blockwise else None)
    if precision == precision_names.INT8_DYNAMIC:
        quantize_dynamic_int8(Path(out) / "model.onnx")
    loaded_with = check_loads(Path(out) / "model.onnx", precision, provider)
    return {
        "builder": "onnxruntime_genai.models.builder (exclude_embeds=true)",
        "builder_version": _builder_version(metadata),
        "onnxruntime_version": loaded_with,
        "min_onnxruntime": needed,
        "lm_head": "last position only",
        **({"block_size": block_size} if blockwise and block_size else {}),
    }


def quantize_dynamic_int8(path: Path) -> None:
    """The fp32 decoder at ``path`` made ``int8-dynamic`` in place: ONNX Runtime's dynamic
    quantization of its MatMuls with constant weights (per output channel int8 weights, activations
    quantized per tensor at run time: MatMulInteger, the CPU provider's VNNI / AVX-512 kernels).
    GroupQueryAttention, norms and the embedding lookup stay fp32; the LM head, already fed the last
    position only, is quantized too. Its prefill is the fastest of the CPU decoders (docs/export.md);
    its weights read per token are those of ``int8``. Weights stay in an external data file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    with work_folder("ftz-int8-dynamic-") as work:
        target = Path(work) / path.name
        quantize_dynamic(str(path), str(target), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=True, use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        for stale in path.parent.glob(path.name + "*"):  # the fp32 graph and its weights file
            stale.unlink()
        for made in Path(work).iterdir():
            os.replace(made, path.parent / made.name)


def build_decoder(hf_folder: Path, out: Path, precision: str, provider: str,
                  block_size: int = precision_names.DEFAULT_LLM_BLOCK_SIZE) -> dict:
    """The decoder a bundle ships, from a Hugging Face folder (ftz-export and ftz-bench): the
    builder, then ``finish_decoder``. Raises ValueError for a target refused by check_target,
    LlmExportError when the builder fails or its graph does not load."""
    check_target(precision, provider)
    check_block_size_option(block_size)
    if precision == precision_names.INT8_DYNAMIC:  # the builder's fp32 decoder, quantized after the graph passes
        run_builder(hf_folder, out, precision_names.FP32, provider)
        return finish_decoder(out, precision, provider)
    run_builder(hf_folder, out, precision, provider, block_size)
    return finish_decoder(out, precision, provider, block_size)


def check_block_size_option(block_size: int) -> None:
    if block_size not in precision_names.LLM_BLOCK_SIZES:
        raise ValueError(f"LLM block size {block_size}: MatMulNBits takes "
                         f"{', '.join(map(str, precision_names.LLM_BLOCK_SIZES))}")


def export_llm(model, out: Path, precision: str, provider: str,
               block_size: int = precision_names.DEFAULT_LLM_BLOCK_SIZE) -> dict:
    """Build ``out/model.onnx`` (+ its weights file and ``genai_config.json``), ``out/embed_tokens.npy``
    and ``out/tokenizer.json`` from the model's (possibly fine-tuned) LLM; returns the manifest's
    ``llm`` entry. Raises ValueError for a target the builder cannot make, LlmExportError when the
    builder fails or its decoder does not load."""
    check_target(precision, provider)
    check_block_size_option(block_size)
    out.mkdir(parents=True, exist_ok=True)
    with work_folder("ftz-llm-") as work:
        hf_folder = Path(work) / "hf"
        # The builder reads a Hugging Face folder: write the LLM as the model holds it (trained or not).
        model.llm.save_pretrained(hf_folder)
        model.tokenizer.save_pretrained(hf_folder)
        graph_info = build_decoder(hf_folder, out, precision, provider, block_size)
    table = model.llm.get_input_embeddings().weight.detach().float().cpu().numpy()
    table_dtype = embeddings_dtype(precision)
    np.save(out / "embed_tokens.npy", table.astype(table_dtype))
    model.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    # The builder copies the HF tokenizer files and a chat template too; the runtime reads only
    # tokenizer.json and the manifest, so the duplicates are dropped to keep one source of truth.
    for extra in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (out / extra).unlink(missing_ok=True)
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    return {
        "file": "model.onnx",
        "genai_config": "genai_config.json",
        "embeddings": "embed_tokens.npy",
        "embeddings_dtype": np.dtype(table_dtype).name,
        "tokenizer": "tokenizer.json",
        "precision": precision,
        "execution_provider": provider,
        **graph_info,
        "hidden_size": genai["decoder"]["hidden_size"],
        "num_layers": genai["decoder"]["num_hidden_layers"],
        "num_kv_heads": genai["decoder"]["num_key_value_heads"],
        "head_size": genai["decoder"]["head_size"],
        "vocab_size": genai["vocab_size"],
        "context_length": genai["context_length"],
    }
