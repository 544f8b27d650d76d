"""``ftz-doctor``: can this machine run an FtZ bundle, and would a planned model fit a Jetson?

    ftz-doctor                         # this machine: Python, packages, providers, GPU, TensorRT, memory
    ftz-doctor --bundle ftz-bundle     # + the bundle: manifest, engine, a real run, its memory budget
    ftz-doctor --plan                  # + a real-size FtZ model (CLIP-L/336 + DINOv2-L + Qwen2.5-0.5B)
                                       #   at int4 / int8 / fp16 against this machine and the Orin modules
    ftz-doctor --json                  # the same, machine-readable

It prints:

* Python and package versions;
* every ONNX Runtime execution provider this onnxruntime lists, and whether a tiny real inference
  succeeds on it alone (a MatMul + Add model, and with ``--bundle`` the bundle's vision graph;
  CPU fallback turned off, outputs checked): on a Jetson a provider can be listed without working
  kernels;
* the GPU (cuda-python, else ``nvidia-smi``, else a Jetson's ``/proc/device-tree/model``), its
  compute capability and free memory, and the TensorRT version (``ftz_edge.runtime.device``);
  whether the bundle's engine was built for them (its build record), and, wherever TensorRT is
  installed, whether it really deserializes and runs (the runtime's own ``TensorRTVision``);
* which GPU backends actually run, not just import, each as runs / fails (with the one-line
  reason) / not listed or not installed: ONNX Runtime's CUDA and TensorRT providers (the tiny
  inference above), TensorRT's Python API (a builder, the tiny model built into an engine, that
  engine run by the runtime's ``TensorRTVision``) and cuda-python's view of the CUDA driver (its
  CUDA version, the device count);
* the providers the runtime gives the vision graph and the decoder, from the same function the
  runtime calls (``ftz_edge.runtime.vision.provider_plan``: never TensorRT for a decoder);
* the bundle's memory budget (ftz_edge.doctor.memory_budget: weights, KV cache, activations,
  overhead) against this machine and the Jetson Orin modules, with the ftz-export changes that
  would make it fit.

Exit status: 0 when everything the runtime needs works (and the bundle, if given, is intact and
fits here); 1 when something needed is missing or broken (two ONNX Runtime builds installed at
once, a provider the runtime would pick fails, the bundle fails verification, its engine claims
this GPU and TensorRT but does not run, its LLM does not run, or it does not fit this machine's
memory); an engine built for another GPU or TensorRT is a warning (the runtime falls back to the
vision ONNX), and so is TensorRT's Python API or cuda-python failing its own check (the runtime
needs them only for a bundle's engine, which ``--bundle`` checks); 2 for bad arguments, including
a --bundle that is not a bundle.
A plan never changes the exit status: it answers a question about a model not exported yet.

Torch-free (numpy, onnxruntime; tensorrt, cuda-python and psutil only if present), Python 3.10+.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

# One job per module: probes (Python, packages, providers), onnx_proto (the hand-encoded probe
# model), machine (GPU, Jetson, TensorRT via ftz_edge.runtime.device; memory), bundle_check (a
# bundle's manifest, engine, real runs and memory spec), memory_budget, report (text and JSON).
from ftz_edge import precision as P
from ftz_edge.doctor import memory_budget as mb
from ftz_edge.doctor.bundle_check import bundle_files, bundle_spec, check_bundle  # noqa: F401 - re-exported
from ftz_edge.doctor.machine import machine_info, tensorrt_check, this_machine_target
from ftz_edge.doctor.onnx_proto import tiny_model  # noqa: F401 - re-exported
from ftz_edge.doctor.probes import (  # noqa: F401 - re-exported
    CPU, PACKAGES, check_providers, gpu_provider_states, installed_versions, python_and_packages, run_on_provider,
)
from ftz_edge.doctor.report import format_report
from ftz_edge.doctor.report import jsonable as _jsonable
from ftz_edge.manifest import MANIFEST_NAME
from ftz_edge.runtime import device  # GPU, Jetson, TensorRT: tensorrt and cuda-python imported only when asked


class DoctorError(Exception):
    """Bad arguments (exit 2): one line, no traceback."""


# -- budgets against targets ----------------------------------------------------------------------
def budgets_for(spec: mb.ModelSpec, machine_target: Optional[mb.Target], machine_gpu: bool) -> dict:
    here = mb.budget(spec, machine_gpu)
    fits = [mb.check_fit(spec, t) for t in ([machine_target] if machine_target else []) + list(mb.JETSON_TARGETS)]
    return {"budget": here, "fits": fits, "here": fits[0] if machine_target else None}


def gpu_backends(providers: dict, packages: dict, machine: dict) -> List[dict]:
    """Which GPU backends actually run here: ONNX Runtime's CUDA and TensorRT providers (from the tiny
    inference on each alone), TensorRT's Python API (``tensorrt_check``: builder, tiny build, a run)
    and cuda-python's CUDA driver (``device.cuda_python_status``). Each {kind, name, state, detail}
    with state "runs" / "fails" / "not listed" / "not installed" (and "builds" for TensorRT when the
    run was skipped, "works" for the driver). Also stores ``machine["tensorrt"]["check"]`` and
    ``machine["cuda_python"]``."""
    backends = [{"kind": "provider", **state}
                for state in gpu_provider_states(providers, packages.get("onnxruntime-gpu") or packages.get("onnxruntime"))]

    check = machine["tensorrt"]["check"] = tensorrt_check() if machine["tensorrt"]["version"] else None
    name = "TensorRT Python API"
    if check is None:
        backends.append({"kind": "tensorrt", "name": name, "state": "not installed",
                         "detail": machine["tensorrt"]["error"] or "tensorrt is not importable"})
    else:
        steps = "; ".join(f"{s['step']} " + ("ok" if s["ok"] else "FAILED" if s["ok"] is False else "skipped")
                          + (f" ({s['detail']})" if s["ok"] is not False and s["step"] not in ("import", "builder")
                             else "") for s in check["steps"])
        if not check["ok"]:
            backends.append({"kind": "tensorrt", "name": name, "state": "fails", "detail": check["error"],
                             "steps": steps, "version": check["version"]})
        else:
            ran = check["steps"][-1]["ok"] is True
            backends.append({"kind": "tensorrt", "name": name, "state": "runs" if ran else "builds",
                             "detail": steps, "version": check["version"]})

    cuda = machine["cuda_python"] = device.cuda_python_status()
    name = "cuda-python (CUDA driver)"
    if not cuda["installed"]:
        backends.append({"kind": "cuda-python", "name": name, "state": "not installed",
                         "detail": "the runtime's TensorRT backend needs it for device memory: pip install "
                                   "'cuda-python>=12,<13' for CUDA 12, 13.x for CUDA 13"})
    elif cuda["error"]:
        backends.append({"kind": "cuda-python", "name": name, "state": "fails", "detail": cuda["error"],
                         "version": cuda["version"]})
    elif not cuda["device_count"]:
        backends.append({"kind": "cuda-python", "name": name, "state": "fails", "version": cuda["version"],
                         "detail": "the CUDA driver answers but reports no CUDA device (CUDA_VISIBLE_DEVICES?)"})
    else:
        driver = f"the driver supports CUDA {cuda['driver']}, " if cuda["driver"] else ""
        backends.append({"kind": "cuda-python", "name": name, "state": "works", "version": cuda["version"],
                         "detail": f"{driver}{cuda['device_count']} device(s)"})
    return backends


def run(bundle: Optional[str], plan: Optional[dict]) -> dict:
    if bundle is not None:  # a wrong path is a bad argument: say so before anything runs
        if not Path(bundle).is_dir():
            raise DoctorError(f"--bundle {bundle}: no such folder")
        if not (Path(bundle) / MANIFEST_NAME).is_file():
            raise DoctorError(f"--bundle {bundle}: not a bundle ({MANIFEST_NAME} is missing; make one with ftz-export)")
    report: dict = {"problems": [], "warnings": []}
    report["python"] = python_and_packages()
    report["warnings"] += report["python"]["notes"]
    report["problems"] += report["python"]["problems"]
    report["providers"] = providers = check_providers()
    if providers["error"]:
        report["problems"].append(providers["error"])
    for result in providers["results"]:
        if result["needed"] and not result["ok"]:
            missing_library = "cannot open shared object file" in (result["error"] or "")
            hint = ("; a CUDA, cuDNN or TensorRT library is not on the loader's path: the pip-installed ones need "
                    "LD_LIBRARY_PATH, see docs/desktop-gpu.md" if missing_library else "")
            report["problems"].append(f"{result['provider']} is listed and the runtime would pick it, but a tiny "
                                      f"inference fails on it ({result['error']}){hint}; fix the install "
                                      "(onnxruntime-gpu for this CUDA / JetPack) or pass --provider "
                                      "CPUExecutionProvider to ftz-chat")
    report["machine"] = machine = machine_info()
    version = machine["tensorrt"]["version"]
    if version and (device.tensorrt_major(version) or 0) < device.MIN_TENSORRT_MAJOR:
        report["warnings"].append(f"TensorRT {version} is too old for ftz-export's engines (needs >= 10: JetPack 6+)")
    report["gpu_backends"] = gpu_backends(providers, report["python"]["packages"], machine)
    for backend in report["gpu_backends"]:
        if backend["kind"] != "provider" and backend["state"] == "fails":
            report["warnings"].append(f"{backend['name']} fails: {backend['detail']} (the runtime needs it only "
                                      "for a bundle's TensorRT engine; without it the vision ONNX runs instead)")
    if machine["ram"] is None:
        report["warnings"].append("system memory not found (no psutil, no /proc/meminfo)")
    target = this_machine_target(machine)
    gpu_here = machine["gpu"] is not None

    if bundle is not None:
        result = check_bundle(Path(bundle), machine, providers)
        report["problems"] += result["problems"]
        report["warnings"] += result["warnings"]
        spec = result.pop("spec", None)
        if spec is not None:
            result["budgets"] = budgets_for(spec, target, gpu_here)
            here = result["budgets"]["here"]
            if here is not None and not here.fits:
                report["problems"].append(f"the bundle does not fit this machine's memory: {here.detail}")
        report["bundle"] = result

    if plan is not None:
        rows = []
        for precision in plan["llm_precisions"]:
            row = {"llm_precision": precision}
            if "cuda" in P.LLM_PROVIDERS[precision]:
                gpu_spec = mb.plan_spec(plan["augmenter"], plan["llm"], plan["tower_precision"], precision,
                                        plan["context"], gpu=True)
                row["gpu"] = budgets_for(gpu_spec, target if gpu_here else None, True)
            else:
                row["gpu_note"] = f"an {precision} LLM is built for the CPU only: not for a GPU"
            if not gpu_here and target is not None:
                if "cpu" not in P.LLM_PROVIDERS[precision]:
                    row["cpu_note"] = f"an {precision} LLM is built for CUDA only: not for this CPU machine"
                else:
                    cpu_spec = mb.plan_spec(plan["augmenter"], plan["llm"], plan["tower_precision"], precision,
                                            plan["context"], gpu=False)
                    row["cpu"] = budgets_for(cpu_spec, target, False)
            rows.append(row)
        report["plan"] = {**plan, "rows": rows}
    report["ok"] = not report["problems"]
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ftz-doctor", description="Check that this machine can run FtZ bundles, and what fits where.",
        epilog="exit status: 0 everything needed works; 1 something needed is missing or broken (a provider the "
               "runtime picks, the bundle's files, engine, decoder, or its memory); 2 bad arguments")
    parser.add_argument("--bundle", help="an ftz-export bundle folder to check and budget")
    parser.add_argument("--plan", action="store_true",
                        help="budget a real-size FtZ model from the shipped configs against this machine and Jetson Orin")
    parser.add_argument("--augmenter", default="dinov2-large", choices=mb.AUGMENTERS, help="--plan: the DINOv2 size")
    parser.add_argument("--llm", default="qwen2.5-0.5b", choices=mb.LLMS, help="--plan: the LLM")
    plan_llm_precisions = [P.INT4, P.INT8, P.FP16]
    parser.add_argument("--precision", default=P.DEFAULT_VISION_PRECISION, choices=P.VISION_PRECISIONS,
                        help="--plan: vision tower precision")
    parser.add_argument("--llm-precision", action="append", choices=P.LLM_PRECISIONS,
                        help=f"--plan: LLM precision (repeatable; default {', '.join(plan_llm_precisions[:-1])} and "
                             f"{plan_llm_precisions[-1]})")
    parser.add_argument("--context-length", type=int, default=2048,
                        help="--plan: context the runtime allows (FtZConfig.max_length; default 2048)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.context_length < 1:
        parser.error("--context-length must be positive")
    plan_only = {"--augmenter": args.augmenter != "dinov2-large", "--llm": args.llm != "qwen2.5-0.5b",
                 "--precision": args.precision != P.DEFAULT_VISION_PRECISION, "--llm-precision": bool(args.llm_precision),
                 "--context-length": args.context_length != 2048}
    if not args.plan and any(plan_only.values()):
        parser.error(f"{', '.join(k for k, v in plan_only.items() if v)} only apply with --plan")
    plan = None
    if args.plan:
        plan = {"augmenter": args.augmenter, "llm": args.llm, "tower_precision": args.precision,
                "llm_precisions": args.llm_precision or plan_llm_precisions, "context": args.context_length}
    try:
        report = run(args.bundle, plan)
    except DoctorError as err:
        print(f"ftz-doctor: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(_jsonable(report), indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
