"""The prepared GPU run (bench/cuda_check.py): its logic on the CPU with the tiny model. The GPU
figures themselves come only from a run on a CUDA machine (none here)."""

import json

import torch

from ftz_edge.bench import cuda_check


def test_cuda_check_measures_training_and_the_tower_on_the_cpu(tmp_path):
    out = tmp_path / "gpu"
    assert cuda_check.main(["--out", str(out), "--device", "cpu", "--size", "tiny", "--steps", "1", "--warmup", "0",
                            "--batch", "2", "--tower-batches", "1"]) == 0
    result = json.loads((out / "cuda_check.json").read_text())
    training = result["training"]
    assert training["batch"] == 2 and training["steps"] == 1 and training["tokens_per_s"] > 0
    assert training["trainable_parameters"] > 0 and training["peak_memory_gib"] is None  # no CUDA memory on a CPU
    assert [(r["precision"], r["batch"]) for r in result["tower"]] == [("fp32", 1), ("bf16", 1)]
    assert "Training (SFT stage" in (out / "cuda_check.md").read_text()


def test_cuda_check_without_cuda_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        return  # on a GPU machine the run itself is the check
    assert cuda_check.main(["--out", str(tmp_path / "gpu")]) == 2
    assert capsys.readouterr().err.strip().startswith("cuda_check: error: no CUDA device here")
    assert not (tmp_path / "gpu").exists()
