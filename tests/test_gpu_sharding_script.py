"""``benchmarks/gpu_sharding.py`` (a GPU check, run by hand on a machine with GPUs): its argument parsing, the runs
it plans, its comparison of two ``best/`` folders, and its no-GPU exit."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import ROOT, run

SCRIPT = ROOT / "benchmarks" / "gpu_sharding.py"


@pytest.fixture(scope="module")
def gpu_sharding():
    spec = importlib.util.spec_from_file_location("gpu_sharding", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_sharding"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_sharding", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit of a machine without a CUDA GPU")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    result = run([str(SCRIPT), "--out", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA GPU here" in result.stdout
    assert not (tmp_path / "out").exists(), "nothing written"


def test_arguments(gpu_sharding, capsys):
    args = gpu_sharding.parse_args(["--strategies", "fsdp, ddp,fsdp", "--steps", "4", "--num-processes", "2"])
    assert args.strategies == ["fsdp", "ddp"] and args.steps == 4 and args.num_processes == 2
    assert gpu_sharding.parse_args([]).strategies == ["ddp", "fsdp", "deepspeed"]
    for bad, message in ((["--strategies", "ddp,zero9"], "unknown ['zero9']"), (["--steps", "0"], "--steps must be >= 1"),
                         (["--num-processes", "0"], "--num-processes must be >= 1"), (["--atol", "-1"], "--atol")):
        with pytest.raises(SystemExit) as exited:
            gpu_sharding.parse_args(bad)
        assert exited.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        gpu_sharding.parse_args(["--help"])
    assert exited.value.code == 0 and "DeepSpeed ZeRO-3" in capsys.readouterr().out


def test_the_planned_runs(gpu_sharding, tmp_path):
    """One single-process reference of the global batch on one GPU, then one accelerate launch per strategy with
    its config file, process count and per-process batch; DeepSpeed is skipped when it is not installed."""
    args = gpu_sharding.parse_args(["--steps", "3", "--batch-size", "4", "--fsdp-layer", "Qwen2DecoderLayer"])
    runs = gpu_sharding.plan(args, num_gpus=2, work=tmp_path)
    assert [r.name for r in runs] == ["single", "ddp", "fsdp", "deepspeed"]
    single = runs[0]
    assert single.command[1] == str(ROOT / "train.py") and "data.batch_size=8" in single.command
    assert single.env["CUDA_VISIBLE_DEVICES"] and "," not in single.env["CUDA_VISIBLE_DEVICES"]
    for r, config in zip(runs[1:], ("ddp.yaml", "fsdp2.yaml", "deepspeed_zero3.yaml")):
        c = r.command
        assert c[1:3] == ["-m", "accelerate.commands.launch"]
        assert c[c.index("--config_file") + 1] == str(ROOT / "configs" / "accelerate" / config)
        assert Path(c[c.index("--config_file") + 1]).is_file()
        assert c[c.index("--num_processes") + 1] == "2" and "data.batch_size=4" in c
        assert "train.max_steps=3" in c and "model.llm.dtype=float32" in c and "train.mixed_precision=no" in c
        assert c[c.index("--output-dir") + 1] == str(tmp_path / r.name)
    fsdp = runs[2].command
    assert fsdp[fsdp.index("--fsdp_transformer_layer_cls_to_wrap") + 1] == "Qwen2DecoderLayer"
    assert (runs[3].skip is None) == (importlib.util.find_spec("deepspeed") is not None)
    with pytest.raises(SystemExit, match="--num-processes 4 but this machine has 2 GPU"):
        gpu_sharding.plan(gpu_sharding.parse_args(["--num-processes", "4"]), num_gpus=2, work=tmp_path)
    assert gpu_sharding.fitting_steps(6, 64, 284) == 4 and gpu_sharding.fitting_steps(3, 8, 284) == 3
    with pytest.raises(SystemExit, match="larger than the training split"):
        gpu_sharding.fitting_steps(3, 512, 284)


def _best(folder: Path, tensors: dict, oa: float) -> Path:
    (folder / "best").mkdir(parents=True)
    save_file(tensors, str(folder / "best" / "model.safetensors"))
    (folder / "metrics.json").write_text(json.dumps({"val/OA": oa, "OA": oa - 0.1}))
    return folder


def test_comparison_of_two_best_folders(gpu_sharding, tmp_path):
    ref = _best(tmp_path / "ref", {"a": torch.ones(3), "b": torch.zeros(2, 2)}, 0.5)
    close = _best(tmp_path / "close", {"a": torch.ones(3) + 1e-6, "b": torch.zeros(2, 2)}, 0.5)
    far = _best(tmp_path / "far", {"a": torch.tensor([1.0, 1.5, 1.0]), "b": torch.zeros(2, 2)}, 0.4)
    renamed = _best(tmp_path / "renamed", {"a": torch.ones(3), "c": torch.zeros(2, 2)}, 0.5)
    got = gpu_sharding.compare(ref, close, 1e-4, 1e-3)
    assert got["within_tolerance"] and got["max_abs_diff"] == pytest.approx(1e-6, rel=0.1)
    assert got["reference_val_OA"] == 0.5 and got["run_test_OA"] == pytest.approx(0.4)
    got = gpu_sharding.compare(ref, far, 1e-4, 1e-3)
    assert not got["within_tolerance"] and got["max_abs_diff"] == pytest.approx(0.5) and got["worst_tensor"] == "a"
    got = gpu_sharding.compare(ref, renamed, 1e-4, 1e-3)
    assert not got["within_tolerance"] and got["missing"] == ["b"] and got["extra"] == ["c"]
    text = gpu_sharding.table([{"strategy": "ddp", "processes": 2, "status": "finished", "max_abs_diff": 1e-6,
                                "ok": True}])
    assert text.splitlines()[0].startswith("| strategy | processes | status") and "| ddp | 2 | finished |" in text
