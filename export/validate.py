"""Parity of every exported model against the PyTorch model it came from.

Vision: cosine similarity and max abs error of the image embeddings per precision, on the
calibration / sample images, at batch 1 and at the full sample batch (the dynamic axis).
LLM: greedy tokens over 32 steps from the same prompt embeddings (image + question), exported
decoder (plain ONNX Runtime loop) against transformers' ``generate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ftz_edge import prompt
from ftz_edge.export.quantize import compare
from ftz_edge.precision import FP16, FP32, INT8, VISION_PRECISIONS

# Minimum cosine of image embeddings against PyTorch fp32, per precision (one for each of VISION_PRECISIONS).
VISION_TARGETS = {FP32: 0.9999, FP16: 0.999, INT8: 0.99}
assert tuple(VISION_TARGETS) == VISION_PRECISIONS
LLM_STEPS = 32
VALIDATION_QUESTION = "What is in the image? Describe it."


@dataclass
class ValidationReport:
    vision: list[dict] = field(default_factory=list)
    llm: Optional[dict] = None
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.warnings

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def table(self) -> str:
        lines = ["| model | precision | evaluated | batch | cosine (min) | max abs error | target | ok |",
                 "|---|---|---|---:|---:|---:|---:|---|"]
        for row in self.vision:
            ok = "-" if row["ok"] is None else ("yes" if row["ok"] else "NO")
            lines.append(f"| vision | {row['precision']} | {row['evaluated']} | {row['batch']} | {row['cosine']:.6f} | "
                         f"{row['max_abs']:.3e} | {row['target'] or '-'} | {ok} |")
        if self.llm:
            llm = self.llm
            if llm.get("skipped"):
                lines.append(f"| llm | {llm['precision']} | - | 1 | - | - | - | skipped: {llm['skipped']} |")
            else:
                lines.append(f"| llm | {llm['precision']} | onnxruntime | 1 | greedy tokens equal: {llm['matching_prefix']}/{llm['steps']} "
                             f"| - | {'identical' if llm['target_identical'] else 'reported'} | {'yes' if llm['ok'] else 'NO'} |")
        return "\n".join(lines)


def validate_vision(session_path: Path, torch_vision, pixels: dict[str, np.ndarray], precision: str,
                    report: ValidationReport) -> None:
    """Rows at batch 1 and the full batch against the target. An INT8 (Q/DQ) graph is judged as
    written - fake-quantized float arithmetic, which is what TensorRT's int8 kernels compute -
    and ONNX Runtime's own CPU int8 kernels are reported beside it, without a target (on CPUs
    without VNNI their u8 x s8 accumulation saturates; that is the kernel, not the graph)."""
    from ftz_edge.export.quantize import cpu_session

    with torch.no_grad():
        reference = torch_vision.float()(*[torch.from_numpy(v) for v in pixels.values()]).numpy()
    batch = next(iter(pixels.values())).shape[0]
    evaluations = [("as written" if precision == INT8 else "onnxruntime", cpu_session(session_path, optimize=precision != INT8))]
    if precision == INT8:
        evaluations.append(("onnxruntime CPU int8 kernels", cpu_session(session_path, optimize=True)))
    for how, session in evaluations:
        judged = how != "onnxruntime CPU int8 kernels"
        for size in sorted({1, batch}):
            exported = session.run(None, {name: value[:size] for name, value in pixels.items()})[0]
            result = compare(exported, reference[:size])
            target = VISION_TARGETS[precision] if judged else None
            row = {"precision": precision, "evaluated": how, "batch": size, "cosine": result["cosine"],
                   "max_abs": result["max_abs"], "target": target, "ok": None if target is None else result["cosine"] >= target}
            report.vision.append(row)
            if row["ok"] is False:
                report.warnings.append(f"vision {precision} batch {size}: cosine {result['cosine']:.6f} is below the "
                                       f"target {target} (max abs error {result['max_abs']:.3e})")


def validate_llm(decoder, model, image, precision: str, report: ValidationReport, eos_token_ids: list[int]) -> None:
    """Same prompt embeddings into both; fp32 must give identical greedy tokens."""
    anchor, augmenter = model.preprocess_images([image])
    ids = model.encode_conversation([prompt.user_turn_with_image(VALIDATION_QUESTION)])
    with torch.no_grad():
        inputs = model.build_inputs([ids], anchor, augmenter)
        reference = model.llm.generate(**inputs, max_new_tokens=LLM_STEPS, do_sample=False, eos_token_id=eos_token_ids,
                                       pad_token_id=model.tokenizer.pad_token_id)[0].tolist()
    exported = decoder.greedy(inputs["inputs_embeds"][0].float().numpy(), LLM_STEPS, eos_token_ids)
    prefix = 0
    for a, b in zip(exported, reference):
        if a != b:
            break
        prefix += 1
    identical = exported == reference
    must_match = precision == FP32
    report.llm = {"precision": precision, "steps": max(len(reference), len(exported)), "matching_prefix": prefix,
                  "identical": identical, "target_identical": must_match, "ok": identical or not must_match,
                  "exported_tokens": exported, "reference_tokens": reference}
    if must_match and not identical:
        report.warnings.append(f"llm fp32: greedy tokens differ from transformers after {prefix} steps")
