"""Vision tower latency: PyTorch (eager, bf16/fp16 on GPU, torch.compile), ONNX Runtime
(fp32 / fp16 / INT8 QDQ / INT8 dynamic), TensorRT (fp16 / INT8) when present.

The PyTorch case also times the anchor alone (a CLIP-only tower with the same pruning and
projector), the augmenter alone (its embeddings and the layers the fusion reads) and the same
FtZ tower without dead-layer pruning (every layer of both encoders run, the selected layer's
output used), so the report can give the fusion overhead, FtZ ÷ (anchor + augmenter), and the
pruning saving, pruned ÷ unpruned, as ratios from one process.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ftz_edge.bench import artifacts
from ftz_edge.bench.isolate import tick
from ftz_edge.bench.results import make_row
from ftz_edge.bench.timing import measure, measure_interleaved

PATH_FTZ, PATH_ANCHOR, PATH_AUGMENTER, PATH_UNPRUNED = ("FtZ tower", "anchor alone", "augmenter alone",
                                                        "FtZ tower, unpruned")


def pixel_inputs(shapes: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random preprocessed pixels (latency does not depend on their values)."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((batch, *shape), dtype=np.float32) for name, shape in shapes.items()}


def _unpruned_forward(vision, anchor_pixels, augmenter_pixels):
    """What a tower without dead-layer pruning computes: every augmenter layer, every anchor layer
    (fused at the same points), then the selected layer's tokens through the projector."""
    from ftz_edge import encoders

    wanted = {g for _, g in vision.fusion_layers}
    hidden = encoders.augmenter_embed(vision.augmenter, augmenter_pixels)
    states = {}
    for index, layer in enumerate(encoders.augmenter_layers(vision.augmenter), start=1):
        hidden = encoders.run_layer(layer, hidden)
        if index in wanted:
            states[index] = hidden
    fusion_at = dict((a, g) for a, g in vision.fusion_layers)
    hidden = encoders.anchor_embed(vision.anchor, anchor_pixels)
    selected = None
    for index, layer in enumerate(encoders.anchor_layers(vision.anchor), start=1):
        hidden = encoders.run_layer(layer, hidden)
        if index in fusion_at:
            hidden = vision.fusion[str(index)](hidden, states[fusion_at[index]])
        if index == vision.anchor_depth:
            selected = hidden
    return vision.projector(vision._select(selected))


def _anchor_only(vision):
    """A CLIP-only tower on the same anchor and projector (the same pruning)."""
    import dataclasses

    from ftz_edge.vision import FtZVision

    clip = FtZVision(dataclasses.replace(vision.config, kind="clip", fusion_layers=None), vision.anchor, None,
                     vision.projector[-1].out_features)
    clip.projector = vision.projector
    return clip.eval()


def torch_case(size: str, augmenter: Optional[str], precision: str, device: str, batches: Sequence[int],
               repeats: int, warmup: int, compile: bool = False, parts: bool = True) -> list[dict]:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    vision, shapes = artifacts.load_vision(size, augmenter)
    vision = vision.to(device=device, dtype=dtype).eval()
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    backend = "PyTorch " + ("torch.compile" if compile else "eager") + (" (CUDA)" if cuda else "")
    paths = {PATH_FTZ: vision}
    if parts and vision.augmenter is not None:
        wanted = {g for _, g in vision.fusion_layers} or {vision.augmenter_depth}
        paths[PATH_ANCHOR] = _anchor_only(vision)
        paths[PATH_AUGMENTER] = lambda a, g: vision._augmenter_states(g, wanted)
        paths[PATH_UNPRUNED] = lambda a, g: _unpruned_forward(vision, a, g)
    if compile:
        paths = {PATH_FTZ: torch.compile(vision)}
    rows = []
    for batch in batches:
        feeds = {k: torch.from_numpy(v).to(device=device, dtype=dtype) for k, v in pixel_inputs(shapes, batch).items()}
        args = list(feeds.values())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            # The tower and its parts in interleaved rounds: the fusion overhead is a ratio of them.
            timed = measure_interleaved({path: (lambda fn=fn: fn(*args)) for path, fn in paths.items()}, repeats,
                                        warmup if not compile else max(warmup, 2), sync=sync, on_sample=tick)
        memory = {"cuda_peak_mb": torch.cuda.max_memory_allocated() / (1 << 20)} if cuda else {}
        for path, m in timed.items():
            rows.append(make_row("vision", size, artifacts.vision_label(size, augmenter), path, backend, precision, batch,
                                 {"latency_ms": m}, memory=memory,
                                 info={"threads": torch.get_num_threads(), "device": device, "interleaved": len(timed) > 1}))
    if size != "default" or vision.augmenter is not None:
        from ftz_edge.sizes import tower_cost

        cost = tower_cost(vision, augmenter_image_size=shapes.get("augmenter_pixels", (3, 224, 224))[1])
        for row in rows:
            row["info"]["gflops_estimated"] = cost.gflops if row["path"] != PATH_UNPRUNED else cost.gflops_unpruned
            row["info"]["pruning_saving_estimated"] = cost.saving
    return rows


def ort_case(size: str, augmenter: Optional[str], precision: str, batches: Sequence[int], repeats: int,
             warmup: int, providers: Optional[list] = None) -> list[dict]:
    """The runtime's own vision backend (ftz_edge.runtime.vision.OrtVision) on the cached ONNX."""
    from ftz_edge.runtime.vision import OrtVision

    path = artifacts.vision_onnx(size, augmenter, precision)
    session = OrtVision(path, providers)
    shapes = {i.name: tuple(i.shape[1:]) for i in session.session.get_inputs()}
    rows = []
    for batch in batches:
        feeds = pixel_inputs(shapes, batch)
        m = measure(lambda: session(feeds), repeats, warmup, on_sample=tick)
        rows.append(make_row("vision", size, artifacts.vision_label(size, augmenter), PATH_FTZ, "ONNX Runtime",
                             precision, batch, {"latency_ms": m},
                             info={"provider": session.provider, "model_bytes": artifacts.folder_bytes(path.parent)}))
    return rows


def tensorrt_case(size: str, augmenter: Optional[str], precision: str, batches: Sequence[int], repeats: int,
                  warmup: int) -> list[dict]:
    """Build a strongly typed engine from the fp16 or INT8 (QDQ) ONNX on this GPU, then time it
    with the runtime's TensorRTVision. Written against TensorRT's documented API; not run where
    this project is developed (no TensorRT)."""
    import tempfile
    from pathlib import Path

    from ftz_edge.export import tensorrt
    from ftz_edge.runtime.vision import TensorRTVision

    onnx_path = artifacts.vision_onnx(size, augmenter, precision)
    with tempfile.TemporaryDirectory(prefix="ftz-bench-trt-") as work:
        shapes = None
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        shapes = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim[1:]) for i in model.graph.input}
        spec = tensorrt.EngineBuildSpec(onnx_path=onnx_path, engine_path=Path(work) / "vision.engine",
                                        precision=precision, input_shapes=shapes, batch_min=1,
                                        batch_opt=max(batches), batch_max=max(batches))
        tensorrt.build_engine(spec)
        engine = TensorRTVision(Path(work) / "vision.engine")
        rows = []
        for batch in batches:
            feeds = pixel_inputs(shapes, batch)
            m = measure(lambda: engine(feeds), repeats, warmup, on_sample=tick)
            rows.append(make_row("vision", size, artifacts.vision_label(size, augmenter), PATH_FTZ, "TensorRT",
                                 precision, batch, {"latency_ms": m}))
    return rows
