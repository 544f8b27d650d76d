"""Vision ONNX -> TensorRT engine, for TensorRT 10.x (JetPack 6: 10.3, JetPack 7.2: 10.16) and 11.x.

Precision lives in the ONNX, not in builder flags: TensorRT 11 removed BuilderFlag.FP16/INT8/BF16,
precision constraints and INT8 calibrators (10.x deprecated them), so the one portable path is a
STRONGLY TYPED network built from an FP16 ONNX (LayerNorm etc. kept FP32) or a Q/DQ ONNX (explicit
INT8). INT8 fused attention needs <= 512 tokens; CLIP-L/336 has 577, so its attention stays fp16.
Engines and timing caches are tied to the GPU model and the TensorRT version: each engine gets a
``<engine>.json`` record (``engine_compatible``, in ftz_edge.runtime.device, compares it with a
machine). A record is a claim, not a proof: ``check_engine`` runs a built engine against
onnxruntime on the same images (TensorRT 10.3 has built FP16 ViT engines that compute wrong).

The ONNX is parsed from its path, never from bytes, so a graph over 2 GB with its weights in
``<name>.data`` beside it builds. ``tensorrt`` is imported lazily: this module must import on
machines without it (CI, a CPU laptop). Tested against tests/fakes_tensorrt.py.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np

# GPU, TensorRT and engine-record checks live in the runtime (the device side needs them without
# this export package); re-exported here for the builder and its callers.
from ftz_edge.runtime.device import MIN_TENSORRT_MAJOR, cuda_device, cudart, engine_compatible  # noqa: F401
from ftz_edge.precision import parse_vision
from ftz_edge.runtime.device import import_tensorrt as _import_tensorrt
from ftz_edge.runtime.device import tensorrt_major

logger = logging.getLogger("ftz_edge.export.tensorrt")
INSTALL_HINT = ("Jetson: sudo apt install python3-libnvinfer and make the venv with --system-site-packages; "
                "desktop: pip install tensorrt --extra-index-url https://pypi.nvidia.com; or use --engine onnx")


class TensorRTUnavailable(RuntimeError):
    """--engine trt was asked for, but TensorRT or a GPU is missing."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build an engine from it."""


def tensorrt_available() -> bool:
    return _import_tensorrt()[0] is not None


def pick_engine(requested: str) -> tuple[str, str]:
    """(engine, reason) for --engine auto|onnx|trt; trt without TensorRT or a GPU raises TensorRTUnavailable."""
    if requested == "onnx":
        return "onnx", "requested"
    if requested not in ("auto", "trt"):
        raise ValueError(f"--engine must be auto, onnx or trt, not {requested!r}")
    trt, why = _import_tensorrt()
    if trt is None:
        missing = f"the TensorRT Python bindings are not importable ({why})"
    elif (device := cuda_device()) is None:
        missing = "no NVIDIA GPU found (cuda-python saw none and nvidia-smi found none or is not on PATH)"
    elif cudart() is None:
        # The engine is checked against onnxruntime right after the build, and the runtime runs
        # it, both through cuda-python: without it an engine could be built but never used.
        missing = "cuda-python is not installed (pip install cuda-python; the engine is run through it)"
    else:
        return "trt", f"TensorRT {trt.__version__} on {device['name']} (sm {device['compute_capability']})"
    if requested == "auto":
        return "onnx", missing
    raise TensorRTUnavailable(f"--engine trt needs TensorRT and a GPU, but {missing}. {INSTALL_HINT}")


@dataclass
class EngineBuildSpec:
    onnx_path: Path
    engine_path: Path
    precision: str  # the tag of the ONNX's own precision; nothing here converts it
    input_shapes: dict[str, tuple[int, int, int]]  # per input (C, H, W); batch is the only dynamic axis
    batch_min: int = 1
    batch_opt: int = 1
    batch_max: int = 8
    workspace_bytes: int = 2 << 30
    timing_cache_path: Optional[Path] = None

    def __post_init__(self):
        self.onnx_path, self.engine_path = Path(self.onnx_path), Path(self.engine_path)
        if self.timing_cache_path is not None:
            self.timing_cache_path = Path(self.timing_cache_path)
        parse_vision(self.precision, "precision")  # a ValueError listing the names
        if not 1 <= self.batch_min <= self.batch_opt <= self.batch_max:
            raise ValueError(f"batch sizes need 1 <= min <= opt <= max, got min={self.batch_min} "
                             f"opt={self.batch_opt} max={self.batch_max}")
        if not self.input_shapes:
            raise ValueError("input_shapes is empty: give (C, H, W) for every input of the ONNX")
        for name, shape in self.input_shapes.items():
            if len(shape) != 3 or any(int(d) < 1 for d in shape):
                raise ValueError(f"input {name!r}: shape must be (C, H, W) of positive sizes, got {tuple(shape)}")
        if self.workspace_bytes < 1:
            raise ValueError(f"workspace_bytes must be positive, got {self.workspace_bytes}")


def profile_shapes(spec: EngineBuildSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """{input: (min, opt, max)} full NCHW shapes of the one optimization profile."""
    return {name: tuple((b, *map(int, chw)) for b in (spec.batch_min, spec.batch_opt, spec.batch_max))
            for name, chw in spec.input_shapes.items()}


def network_flags(trt) -> int:
    """STRONGLY_TYPED: types come from the ONNX (fp16 / Q/DQ), never from the builder's own choices.

    EXPLICIT_BATCH is never set: TensorRT 10 documents it as deprecated and ignored ("networks are
    always explicit batch"), 11 removed it, and TensorRT < 10 is refused before we get here. 11
    deprecates STRONGLY_TYPED too (always on, flag ignored), so it is set only while the enum has it.
    """
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


@dataclass
class EngineRecord:
    tensorrt_version: str
    gpu_name: Optional[str]
    compute_capability: Optional[str]
    precision: str
    profile_shapes: dict[str, dict[str, list[int]]]
    workspace_bytes: int
    timing_cache: Optional[str]  # path, or None when the build used none
    timing_cache_reused: bool  # an existing cache was loaded and accepted
    engine_sha256: str
    engine_bytes: int
    onnx_sha256: str
    built_at: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())

    def to_dict(self) -> dict:
        return asdict(self)


def record_path(engine_path: Path) -> Path:
    return Path(engine_path).with_name(Path(engine_path).name + ".json")


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same folder + os.replace: readers never see half an engine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_inputs(network, spec: EngineBuildSpec) -> None:
    """Spec vs the parsed ONNX, so a wrong name or size fails here and not deep inside the build."""
    inputs = {network.get_input(i).name: tuple(int(d) for d in network.get_input(i).shape)
              for i in range(network.num_inputs)}
    if set(inputs) != set(spec.input_shapes):
        raise EngineBuildError(f"{spec.onnx_path}: ONNX inputs {sorted(inputs)} != spec inputs {sorted(spec.input_shapes)}")
    for name, (lo, opt, hi) in profile_shapes(spec).items():
        dims = inputs[name]
        if len(dims) != 4 or any(d not in (-1, want) for d, want in zip(dims[1:], lo[1:])):
            raise EngineBuildError(f"{spec.onnx_path}: input {name!r} is {dims} in the ONNX, spec wants (N, *{lo[1:]})")
        if dims[0] != -1 and not lo[0] == opt[0] == hi[0] == dims[0]:
            raise EngineBuildError(f"{spec.onnx_path}: input {name!r} has a fixed batch of {dims[0]}; export a "
                                   f"dynamic batch axis or set batch min=opt=max={dims[0]}")


def _add_profile(builder, config, spec: EngineBuildSpec) -> dict:
    """The spec's one optimization profile, added to ``config``; its shapes. TensorRT's bindings
    raise on an inconsistent min/opt/max and ``add_optimization_profile`` returns -1 for a profile
    it finds invalid: both become an EngineBuildError, never a build from a profile it ignored."""
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(spec)
    for name, (lo, opt, hi) in shapes.items():
        try:
            profile.set_shape(name, lo, opt, hi)
        except (RuntimeError, TypeError, ValueError) as err:
            raise EngineBuildError(f"TensorRT refused the profile of input {name!r} (min {lo}, opt {opt}, "
                                   f"max {hi}): {err}") from None
    index = config.add_optimization_profile(profile)
    if index < 0:
        raise EngineBuildError(f"TensorRT refused the optimization profile {shapes} of {spec.onnx_path} "
                               f"(add_optimization_profile returned {index}); see the TensorRT log above")
    return shapes


def _attach_timing_cache(config, path: Path, version: str) -> bool:
    """Attach the timing cache at ``path`` (an empty one when there is none); True when the saved
    cache was accepted. A cache TensorRT cannot read (another TensorRT version, a damaged file:
    ``create_timing_cache`` gives None) or refuses (another GPU: ``set_timing_cache`` gives False;
    ``ignore_mismatch`` stays False, since the docs warn that foreign caches may give functional
    bugs) is replaced by a fresh one, and the log says so."""
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob) if blob else None
    if blob and cache is None:
        logger.warning("timing cache %s is not readable by TensorRT %s (written by another version, or damaged): "
                       "starting a fresh one", path, version)
    elif cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("timing cache %s was written on another GPU or TensorRT: starting a fresh one", path)
        cache = None
    if cache is not None:
        return True
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise EngineBuildError(f"TensorRT {version} could not start an empty timing cache (for {path})")
    return False


def build_engine(spec: EngineBuildSpec) -> EngineRecord:
    """Parse the ONNX, build one profile, write ``spec.engine_path`` and its ``.json`` record atomically."""
    trt, why = _import_tensorrt()
    if trt is None:
        raise TensorRTUnavailable(f"building an engine needs TensorRT ({why}). {INSTALL_HINT}")
    if (tensorrt_major(trt.__version__) or 0) < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: strongly typed builds need >= 10 (JetPack 6+)")
    if not spec.onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX at {spec.onnx_path}")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, trt_logger)
    # From the path, never from bytes: a graph over 2 GB keeps its weights in ``<name>.data`` beside
    # it, which the parser resolves relative to the graph's folder only when it knows that folder.
    if not parser.parse_from_file(str(spec.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["(the parser reported no details)"]
        raise EngineBuildError(f"TensorRT could not parse {spec.onnx_path}: " + " | ".join(errors))
    _check_inputs(network, spec)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    shapes = _add_profile(builder, config, spec)
    reused = False
    if spec.timing_cache_path is not None:
        reused = _attach_timing_cache(config, spec.timing_cache_path, trt.__version__)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT built no engine from {spec.onnx_path} (build_serialized_network returned "
                               f"None; see the TensorRT log above: unsupported layer, or workspace "
                               f"{spec.workspace_bytes >> 20} MiB too small?)")
    data = bytes(serialized)  # IHostMemory exposes the buffer protocol
    _atomic_write(spec.engine_path, data)
    if spec.timing_cache_path is not None:  # saved back so the next build (same GPU + TensorRT) skips timing
        _atomic_write(spec.timing_cache_path, bytes(config.get_timing_cache().serialize()))

    device = cuda_device() or {}
    record = EngineRecord(
        tensorrt_version=trt.__version__, gpu_name=device.get("name"), compute_capability=device.get("compute_capability"),
        precision=spec.precision,
        profile_shapes={n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in shapes.items()},
        workspace_bytes=spec.workspace_bytes,
        timing_cache=str(spec.timing_cache_path) if spec.timing_cache_path is not None else None,
        timing_cache_reused=reused, engine_sha256=hashlib.sha256(data).hexdigest(), engine_bytes=len(data),
        onnx_sha256=_sha256(spec.onnx_path),
    )
    _atomic_write(record_path(spec.engine_path), (json.dumps(record.to_dict(), indent=2) + "\n").encode())
    return record


def inspect_engine(engine_path: Path) -> list[dict]:
    """[{name, mode, dtype, shape}] of an engine's I/O tensors (deserializing needs this machine's GPU)."""
    trt, why = _import_tensorrt()
    if trt is None:
        raise TensorRTUnavailable(f"reading an engine needs TensorRT ({why}). {INSTALL_HINT}")
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise EngineBuildError(f"TensorRT could not load {engine_path}: built for another GPU or TensorRT version?")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return [{"name": n, "mode": "input" if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else "output",
             "dtype": str(engine.get_tensor_dtype(n)), "shape": tuple(engine.get_tensor_shape(n))} for n in names]


def check_engine(engine_path: Path, onnx_path: Path, pixels: Dict[str, np.ndarray], precision: str,
                 target: Optional[float] = None) -> dict:
    """Run a built engine and onnxruntime on the same ``pixels`` and compare: the guard against
    TensorRT builds that compute something else (TensorRT 10.3 has given wrong FP16 ViT results:
    NVIDIA/TensorRT#4419, #4330, #4723).

    The engine runs through the runtime's own ``TensorRTVision`` (what the device will run,
    chunked by the engine's profile); the reference is ``onnx_path`` (the fp32 graph) on the ORT CPU
    provider, one image at a time. Returns a ``validation.json`` vision row: {precision, evaluated,
    batch, cosine (min over images), max_abs, target, ok}; ``ok`` is None without a ``target``.
    Raises EngineBuildError when the engine does not load, does not run, or gives the wrong shape.
    """
    from ftz_edge.export.quantize import compare, cpu_session
    from ftz_edge.runtime.vision import TensorRTVision

    session = cpu_session(onnx_path)
    names = [i.name for i in session.get_inputs()]
    count = len(pixels[names[0]])
    reference = np.concatenate([session.run(None, {n: pixels[n][i:i + 1] for n in names})[0] for i in range(count)])
    try:
        engine = TensorRTVision(engine_path)
    except (ImportError, RuntimeError) as err:
        raise EngineBuildError(f"the engine {engine_path} does not load: {err}") from None
    try:
        output = engine({n: pixels[n] for n in names})
    except (RuntimeError, ValueError) as err:
        raise EngineBuildError(f"the engine {engine_path} does not run: {err}") from None
    finally:
        engine.close()
    if output.shape != reference.shape:
        raise EngineBuildError(f"the engine {engine_path} outputs {output.shape}, onnxruntime {reference.shape}")
    result = compare(output, reference)
    return {"precision": precision, "evaluated": f"TensorRT engine vs onnxruntime fp32 (batches of <= {engine.batch_max})",
            "batch": count, "cosine": result["cosine"], "max_abs": result["max_abs"], "target": target,
            "ok": None if target is None else bool(result["cosine"] >= target)}
