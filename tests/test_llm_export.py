"""The decoder graph ftz-export ships: the builder's graph with the LM head on the last position and
GroupQueryAttention loadable by onnxruntime 1.22; parity with the builder's own graph and with
transformers; targets that do not load are refused."""

import shutil
from importlib import metadata

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from ftz_edge import tiny
from ftz_edge.export import llm as llm_export
from ftz_edge.runtime.decoder import OnnxDecoder, OnnxRuntimeTooOld, check_onnxruntime

pytestmark = pytest.mark.slow  # one ONNX Runtime GenAI builder run per case (~7 s on 2 cores)

PROMPT = [5, 17, 42, 9, 3, 77, 12, 30, 8]


@pytest.fixture(scope="module")
def hf_llms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-llms")
    return {arch: tiny.save_llm(folder / arch, arch=arch) for arch in ("qwen2", "llama")}


def build_both(hf_folder, out, precision, provider="cpu"):
    """(the builder's raw graph folder, the shipped graph folder, its record): build_decoder's
    steps, with a copy of the builder's graph kept aside to compare with."""
    raw, shipped = out / "raw", out / "shipped"
    llm_export.run_builder(hf_folder, raw, precision, provider)
    shutil.copytree(raw, shipped)
    return raw, shipped, llm_export.finish_decoder(shipped, precision, provider)


def run_prompt_then_one_step(folder, table):
    """Last-position logits after the prompt and after one more token, through the runtime's decoder."""
    np.save(folder / "embed_tokens.npy", table)
    decoder = OnnxDecoder(folder)
    first, cache = decoder.forward(decoder.embed(PROMPT)[None], decoder.empty_cache())
    second, _ = decoder.forward(decoder.embed([int(first[0].argmax())])[None], cache)
    return first, second, decoder


def transformers_model(hf_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_folder).eval()


def transformers_logits(model, next_token):
    """The last-position logits after PROMPT and after PROMPT + [next_token]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT + [next_token]])).logits[0]
    return logits[-2].numpy(), logits[-1].numpy()


@pytest.mark.parametrize("arch, precision", [("qwen2", "fp32"), ("llama", "fp32"), ("qwen2", "int4"), ("llama", "int8")])
def test_lm_head_runs_on_the_last_position_only_with_unchanged_logits(hf_llms, tmp_path, arch, precision):
    raw, shipped, info = build_both(hf_llms[arch], tmp_path, precision)
    graph = onnx.load(str(shipped / "model.onnx"), load_external_data=False).graph
    producers = {name: node for node in graph.node for name in node.output}
    # The head's activation input is the Gather of the last position (axis 1), not every position.
    head = producers["logits"]
    assert head.op_type == {"fp32": "MatMul"}.get(precision, "MatMulNBits"), head.op_type
    gather = producers[head.input[0]]
    assert gather.op_type == "Gather" and onnx.helper.get_attribute_value(gather.attribute[0]) == 1
    index = next(t for t in graph.initializer if t.name == gather.input[1])
    assert onnx.numpy_helper.to_array(index).tolist() == [-1]
    logits_shape = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim
    assert logits_shape[1].dim_value == 1
    # GroupQueryAttention without trailing empty inputs: onnxruntime 1.22 takes at most 11.
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert attention and all(n.input[-1] and len(n.input) <= 11 for n in attention)
    assert info["min_onnxruntime"] == "1.22" and info["lm_head"] == "last position only"
    assert info["builder_version"] == metadata.version("onnxruntime-genai")
    assert info["onnxruntime_version"] == onnxruntime.__version__

    model = transformers_model(hf_llms[arch])
    table = model.get_input_embeddings().weight.detach().numpy()
    first, second, decoder = run_prompt_then_one_step(shipped, table)
    assert first.shape == (1, decoder.session.get_outputs()[0].shape[-1])
    # Against the builder's own graph (the same quantized weights): the same numbers.
    raw_first, raw_second, raw_decoder = run_prompt_then_one_step(raw, table)
    assert raw_decoder.session.get_outputs()[0].shape[1] == "sequence_length"  # it did output every position
    np.testing.assert_allclose(first, raw_first, rtol=0, atol=1e-5)
    np.testing.assert_allclose(second, raw_second, rtol=0, atol=1e-5)
    # Against transformers: fp32 to float precision; weight-only int4/int8 only close to it.
    first_hf, second_hf = transformers_logits(model, int(first[0].argmax()))
    if precision == "fp32":
        np.testing.assert_allclose(first[0], first_hf, atol=1e-4)
        np.testing.assert_allclose(second[0], second_hf, atol=1e-4)
    else:
        cosine = float(first[0] @ first_hf / np.linalg.norm(first[0]) / np.linalg.norm(first_hf))
        assert cosine > 0.98, cosine


def test_fp32_for_cuda_is_refused_before_building(capsys, tmp_path):
    with pytest.raises(ValueError, match="fp32 can be built for cpu, not cuda .its fp32 graph for CUDA does not load"):
        llm_export.check_target("fp32", "cuda")
    from ftz_edge.export import bundle as bundle_module

    code = bundle_module.main(["--out", str(tmp_path / "b"), "--llm-precision", "fp32", "--llm-provider", "cuda"])
    error = capsys.readouterr().err.strip()
    assert code != 0 and len(error.splitlines()) == 1 and "not cuda" in error, error
    assert not (tmp_path / "b").exists()


def test_a_decoder_that_does_not_load_stops_the_export_in_one_line(hf_llms, tmp_path, monkeypatch):
    # What the builder makes for fp32 + cuda does not load ("Graph output (present.0.key) does
    # not exist"): with the refusal lifted, the load check must catch it.
    monkeypatch.setitem(llm_export.BUILDER_TARGETS, "fp32", ("cpu", "cuda"))
    with pytest.raises(llm_export.LlmExportError) as caught:
        llm_export.build_decoder(hf_llms["qwen2"], tmp_path / "llm", "fp32", "cuda")
    message = str(caught.value)
    assert message.startswith("the fp32 decoder built for cuda does not load in onnxruntime") and "\n" not in message


def test_a_gqa_node_that_uses_its_12th_input_needs_onnxruntime_1_23():
    node = onnx.helper.make_node("GroupQueryAttention", ["q", "", ""] + ["x"] * 6 + ["", "", "sink"], ["o"],
                                 domain="com.microsoft")
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], []))
    node = model.graph.node[0]  # make_graph copies the node
    assert llm_export.trim_attention_inputs(model) == 0 and llm_export.min_onnxruntime(model) == "1.23"
    del node.input[-1]
    assert llm_export.trim_attention_inputs(model) == 1 and list(node.input)[-1] == "x"
    assert llm_export.min_onnxruntime(model) == "1.22"


def test_an_older_onnxruntime_is_refused_in_one_line():
    check_onnxruntime("1.22.1", "1.22")
    check_onnxruntime("1.30.0", None)
    with pytest.raises(OnnxRuntimeTooOld, match=r"needs onnxruntime >= 1.22, installed: 1.21.1"):
        check_onnxruntime("1.21.1", "1.22")


# -- the KV cache: one preallocated buffer per layer, past and present at once ------------------

def hidden_size(hf_llms):
    import json

    return json.loads((hf_llms["qwen2"] / "config.json").read_text())["hidden_size"]


def concatenating_reference(decoder, embeds_steps):
    """Last-position logits of each step through plain session.run, the cache grown by the graph's
    own present outputs (GQA's concatenating mode: what the runtime did before the shared buffer)."""
    shape = (1, decoder.num_kv_heads, 0, decoder.head_size)
    cache = {name: np.zeros(shape, decoder.cache_dtype) for name in decoder.past_names}
    length, out = 0, []
    for embeds in embeds_steps:
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, length + embeds.shape[1]), decoder.mask_dtype),
                 **cache}
        logits, *presents = decoder.session.run(["logits", *decoder.present_names], feeds)
        cache = dict(zip(decoder.past_names, presents))
        length += embeds.shape[1]
        out.append(logits[:, -1])
    return out


@pytest.mark.parametrize("capacity", [None, len(PROMPT) + 1, 64])
def test_the_shared_kv_cache_gives_the_concatenating_cache_logits(hf_llms, tmp_path, capacity):
    """Bit-identical logits over a prompt and 12 steps, whether the cache is sized by its first step
    (and grows), too small (grows mid-request, keeping what it held) or sized for the request."""
    llm_export.build_decoder(hf_llms["qwen2"], tmp_path, "fp32", "cpu")
    np.save(tmp_path / "embed_tokens.npy", np.random.default_rng(0).standard_normal((400, hidden_size(hf_llms))).astype(np.float32))
    decoder = OnnxDecoder(tmp_path)
    steps = [decoder.embed(PROMPT)[None]] + [decoder.embed([t])[None] for t in (7, 99, 3, 250, 11, 61, 5, 8, 13, 21, 34, 2)]
    expected = concatenating_reference(decoder, steps)
    cache = decoder.empty_cache(capacity=capacity)
    for step, (embeds, reference) in enumerate(zip(steps, expected)):
        logits, returned = decoder.forward(embeds, cache)
        assert returned is cache and cache.length == len(PROMPT) + step
        np.testing.assert_array_equal(logits, reference)
    assert cache.capacity >= cache.length


def test_a_request_sized_kv_cache_is_written_in_place(hf_llms, tmp_path):
    """Sized for the request, the cache allocates once: every step binds the same buffers as both
    past and present, the new positions land in them and the rest stays zero."""
    llm_export.build_decoder(hf_llms["qwen2"], tmp_path, "fp32", "cpu")
    np.save(tmp_path / "embed_tokens.npy", np.random.default_rng(0).standard_normal((400, hidden_size(hf_llms))).astype(np.float32))
    decoder = OnnxDecoder(tmp_path)
    cache = decoder.empty_cache(capacity=len(PROMPT) + 4)
    buffers = dict(cache.buffers)
    decoder.forward(decoder.embed(PROMPT)[None], cache)
    for token in (7, 99, 3):
        decoder.forward(decoder.embed([token])[None], cache)
    assert cache.buffers == buffers and cache.capacity == len(PROMPT) + 4  # no step reallocated
    key = cache.buffers[decoder.past_names[0]].numpy()
    assert np.all(np.abs(key[:, :, :cache.length]).sum(-1) > 0) and not key[:, :, cache.length:].any()


def test_a_kv_cache_past_the_context_is_refused(hf_llms, tmp_path):
    llm_export.build_decoder(hf_llms["qwen2"], tmp_path, "fp32", "cpu")
    np.save(tmp_path / "embed_tokens.npy", np.zeros((400, hidden_size(hf_llms)), np.float32))
    decoder = OnnxDecoder(tmp_path)
    cache = decoder.empty_cache(capacity=10 * decoder.context_length)
    assert cache.capacity == decoder.context_length  # capped
    with pytest.raises(ValueError, match=f"do not fit the decoder's {decoder.context_length}-token context"):
        cache.reserve(decoder.context_length + 1)


# -- the quantization block size ----------------------------------------------------------------

def test_the_block_size_reaches_the_graph_and_the_record(hf_llms, tmp_path):
    record = llm_export.build_decoder(hf_llms["qwen2"], tmp_path, "int4", "cpu", block_size=64)
    assert llm_export.block_sizes(onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)) == {64}
    assert record["block_size"] == 64


def test_a_builder_that_ignores_the_block_size_is_caught():
    from onnx import helper

    def graph_with(*sizes):
        nodes = [helper.make_node("MatMulNBits", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                  K=128, N=128, bits=4, block_size=size) for i, size in enumerate(sizes)]
        return helper.make_model(helper.make_graph(nodes, "g", [], []))

    llm_export.check_block_size(graph_with(128, 128), 128)
    llm_export.check_block_size(helper.make_model(helper.make_graph([], "g", [], [])), 128)  # fp32: nothing to check
    with pytest.raises(llm_export.LlmExportError, match="blocks of 128 weights, its graph has 32"):
        llm_export.check_block_size(graph_with(32, 32), 128)
    with pytest.raises(llm_export.LlmExportError, match="its graph has 32, 128"):
        llm_export.check_block_size(graph_with(32, 128), 128)
    with pytest.raises(ValueError, match="LLM block size 100: MatMulNBits takes 16, 32, 64, 128, 256"):
        llm_export.check_block_size_option(100)


# -- int8-dynamic: the builder's fp32 decoder, dynamically quantized ------------------------------

def test_the_int8_dynamic_decoder_is_integer_and_close_to_fp32(hf_llms, tmp_path):
    """int8-dynamic: the fp32 graph's passes (last-position head, trimmed GQA), then MatMulInteger
    with per-channel int8 weights; logits stay close to the fp32 decoder's, prompt and next step."""
    table = np.random.default_rng(0).standard_normal((400, hidden_size(hf_llms))).astype(np.float32)
    record = llm_export.build_decoder(hf_llms["qwen2"], tmp_path / "dyn", "int8-dynamic", "cpu")
    llm_export.build_decoder(hf_llms["qwen2"], tmp_path / "fp32", "fp32", "cpu")
    graph = onnx.load(str(tmp_path / "dyn" / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops and not ops & {"MatMul", "MatMulNBits"}
    assert record["lm_head"] == "last position only" and "block_size" not in record
    first, second, _ = run_prompt_then_one_step(tmp_path / "dyn", table)
    ref_first, ref_second, _ = run_prompt_then_one_step(tmp_path / "fp32", table)
    for got, ref in ((first, ref_first), (second, ref_second)):
        cosine = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
        assert cosine > 0.99, cosine


def test_int8_dynamic_is_a_cpu_only_llm_precision():
    from ftz_edge import precision as P

    assert P.parse_llm("int8-dynamic") == "int8-dynamic" and P.LLM_PROVIDERS["int8-dynamic"] == ("cpu",)
    with pytest.raises(ValueError, match="int8-dynamic can be built for cpu, not cuda"):
        llm_export.check_target("int8-dynamic", "cuda")
