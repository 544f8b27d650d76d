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
