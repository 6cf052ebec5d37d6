"""Precision chosen by the hardware (allspark.precision): the capability check mocked both ways, the forced-dtype
warning, the CUDA path, the config round trip, every demo config on a CPU without native bf16, and the record
in metrics.json of a tiny training run."""
from __future__ import annotations

import json
import platform
import warnings

import pytest
import torch

from allspark import precision
from allspark.config import (Config, LLMConfig, TrainConfig, apply_overrides, config_from_yaml_text, from_dict,
                             list_modalities, load_config, save_config, to_dict)
from allspark.precision import Capability, PrecisionWarning, resolve_dtype, resolve_mixed_precision
from tests.helpers import TINY_HSI

NATIVE = Capability("cpu", True, False, "mocked: the CPU has AMX-BF16")
EMULATED = Capability("cpu", False, False, "mocked: the CPU has no bf16 instructions")
REAL_CAPABILITY = precision.capability


@pytest.fixture(autouse=True)
def _fresh_decisions(monkeypatch):
    """Each test starts with no cached capability, no warning given yet and no launcher override."""
    REAL_CAPABILITY.cache_clear()
    precision._WARNED.clear()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    yield
    REAL_CAPABILITY.cache_clear()
    precision._WARNED.clear()


def machine(monkeypatch, cap: Capability) -> None:
    """Play a machine whose capability check says ``cap`` (for every device type asked)."""
    monkeypatch.setattr(precision, "capability", lambda device_type: Capability(device_type, cap.bfloat16,
                                                                                 cap.float16, cap.reason))


def fake_speed(monkeypatch, gflops: dict[torch.dtype, float]) -> list[torch.dtype]:
    """Replace the matmul measurement with fixed numbers; returns the list of dtypes it was asked for."""
    calls: list[torch.dtype] = []

    def measure(dtype, device="cpu", **kwargs):
        calls.append(dtype)
        return gflops[dtype]

    monkeypatch.setattr(precision, "matmul_gflops", measure)
    return calls


# ---------------------------------------------------------------------------------------------------
# the decision


def test_auto_is_bf16_where_native_and_fp32_where_emulated_without_warning(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        machine(monkeypatch, NATIVE)
        dtype, reason = resolve_dtype("auto", "cpu")
        assert dtype == torch.bfloat16 and "AMX-BF16" in reason
        assert resolve_mixed_precision("auto", "cpu")[0] == "bf16"

        machine(monkeypatch, EMULATED)
        dtype, reason = resolve_dtype("auto", "cpu")
        assert dtype == torch.float32 and "no bf16 instructions" in reason
        assert resolve_mixed_precision("auto", "cpu")[0] == "no"
    # a pinned float32 LLM means a float32 run: no autocast even where bf16 is native
    machine(monkeypatch, NATIVE)
    mode, reason = resolve_mixed_precision("auto", "cpu", llm_dtype="float32")
    assert mode == "no" and "pinned to float32" in reason
    # a launcher's bf16 / fp16 wins over auto; its "no" is what `accelerate launch` passes when not told, so auto
    # decides (the README's `accelerate launch --cpu ...` gets bf16 autocast where bf16 is native), and an explicit
    # train.mixed_precision=no turns autocast off
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    machine(monkeypatch, EMULATED)
    mode, reason = resolve_mixed_precision("auto", "cpu")
    assert mode == "bf16" and "set by the launcher" in reason
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    machine(monkeypatch, NATIVE)
    assert resolve_mixed_precision("auto", "cpu")[0] == "bf16"
    assert resolve_mixed_precision("no", "cpu")[0] == "no"


def test_cpu_flags_decide_and_a_cached_benchmark_settles_bf16_without_amx(monkeypatch, tmp_path):
    monkeypatch.setenv("ALLSPARK_CACHE", str(tmp_path))
    base = {"amx_fp16": False, "source": "mocked", "onednn_cap": ""}
    calls = fake_speed(monkeypatch, {torch.float32: 100.0, torch.bfloat16: 250.0})

    monkeypatch.setattr(precision, "cpu_features", lambda: {**base, "amx_bf16": True, "bf16_dot": True})
    assert resolve_dtype("auto", "cpu")[0] == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_features", lambda: {**base, "amx_bf16": False, "bf16_dot": False})
    precision.capability.cache_clear()
    assert resolve_dtype("auto", "cpu")[0] == torch.float32
    assert calls == [], "AMX or no bf16 instructions at all: the flags decide, nothing is measured"

    # bf16 dot products without AMX: a micro-benchmark decides, once per machine fingerprint
    monkeypatch.setattr(precision, "cpu_features", lambda: {**base, "amx_bf16": False, "bf16_dot": True})
    precision.capability.cache_clear()
    dtype, reason = resolve_dtype("auto", "cpu")
    assert dtype == torch.bfloat16 and "2.50x fp32" in reason
    assert set(calls) == {torch.float32, torch.bfloat16}
    files = list((tmp_path / "precision").glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["gflops"] == {"float32": 100.0, "bfloat16": 250.0}
    assert record["fingerprint"]["threads"] == torch.get_num_threads()

    calls.clear()
    precision.capability.cache_clear()
    assert resolve_dtype("auto", "cpu")[0] == torch.bfloat16
    assert calls == [], "a second process on the same machine reads the cached measurement"

    # another thread count is another fingerprint: measured again, and here bf16 loses
    fake_speed(monkeypatch, {torch.float32: 100.0, torch.bfloat16: 60.0})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    precision.capability.cache_clear()
    dtype, reason = resolve_dtype("auto", "cpu")
    assert dtype == torch.float32 and "slower than fp32" in reason
    assert len(list((tmp_path / "precision").glob("*.json"))) == 2


def test_cpu_features_come_from_torch_then_its_helpers_then_cpuinfo(monkeypatch):
    assert precision._cpuinfo_flags("processor: 0\nFeatures: fp asimd bf16 i8mm\n") == {"fp", "asimd", "bf16",
                                                                                       "i8mm"}
    flags = precision._cpuinfo_flags()
    real = precision.cpu_features()
    if flags and platform.machine() == "x86_64":  # torch and the kernel agree on this machine's CPU
        assert real["amx_bf16"] == ("amx_bf16" in flags)
        assert real["bf16_dot"] == ("avx512_bf16" in flags)

    monkeypatch.setattr(torch.cpu, "get_capabilities", None, raising=False)  # an older torch
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False, raising=False)
    helpers = precision.cpu_features()
    assert helpers["source"] == "torch.cpu._is_*_supported()"
    assert helpers["bf16_dot"] and not helpers["amx_bf16"]

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda text=None: {"avx2", "fma"})
    from_cpuinfo = precision.cpu_features()
    assert from_cpuinfo["source"] == "/proc/cpuinfo"
    assert not from_cpuinfo["bf16_dot"] and not from_cpuinfo["amx_bf16"]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="ONEDNN_MAX_CPU_ISA names x86 instruction sets")
def test_a_onednn_isa_cap_switches_off_what_onednn_may_not_use(monkeypatch):
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda text=None: {"avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(torch.cpu, "get_capabilities", None, raising=False)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert precision.cpu_features()["amx_bf16"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    f = precision.cpu_features()
    assert f["bf16_dot"] and not f["amx_bf16"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    f = precision.cpu_features()
    assert not f["bf16_dot"] and not f["amx_bf16"]
    assert resolve_dtype("auto", "cpu")[0] == torch.float32


# ---------------------------------------------------------------------------------------------------
# a forced dtype


def test_forced_bf16_on_an_emulated_machine_warns_once_naming_the_slowdown(monkeypatch, tmp_path):
    monkeypatch.setenv("ALLSPARK_CACHE", str(tmp_path))
    machine(monkeypatch, EMULATED)
    fake_speed(monkeypatch, {torch.float32: 111.0, torch.bfloat16: 0.3})
    with pytest.warns(PrecisionWarning) as record:
        dtype, reason = resolve_dtype("bfloat16", "cpu")
        again, _ = resolve_dtype("bfloat16", "cpu")
        mode, _ = resolve_mixed_precision("bf16", "cpu")
        from allspark.llm import load_llm

        loaded = load_llm(LLMConfig(name="tiny", dtype="bfloat16"), "cpu")
    assert dtype == again == torch.bfloat16 and mode == "bf16", "a forced dtype is obeyed"
    assert loaded.dtype == "bfloat16" and loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16
    messages = [str(w.message) for w in record if issubclass(w.category, PrecisionWarning)]
    assert len(messages) == 1, messages
    assert "370.0x slower than float32" in messages[0] and "0.30 vs 111.0 GFLOP/s" in messages[0]
    assert "370.0x slower" in reason and "370.0x slower" in loaded.dtype_reason


def test_forced_bf16_where_native_and_fp32_anywhere_do_not_warn(monkeypatch):
    calls = fake_speed(monkeypatch, {torch.float32: 1.0, torch.bfloat16: 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        machine(monkeypatch, NATIVE)
        assert resolve_dtype("bfloat16", "cpu")[0] == torch.bfloat16
        assert resolve_mixed_precision("bf16", "cpu")[0] == "bf16"
        machine(monkeypatch, EMULATED)
        assert resolve_dtype("float32", "cpu")[0] == torch.float32
        assert resolve_mixed_precision("no", "cpu")[0] == "no"
    assert calls == []
    with pytest.raises(ValueError, match=r"model.llm.dtype must be one of"):
        resolve_dtype("float64", "cpu")


# ---------------------------------------------------------------------------------------------------
# CUDA and the device of a run (mocked: the check needs no GPU)


@pytest.mark.parametrize("major, expected, mixed", [(9, torch.bfloat16, "bf16"), (8, torch.bfloat16, "bf16"),
                                                    (7, torch.float16, "fp16"), (6, torch.float32, "no")])
def test_cuda_capability_picks_bf16_then_fp16_then_fp32(monkeypatch, major, expected, mixed):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mocked GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: major >= 8
                        or including_emulation)
    dtype, reason = resolve_dtype("auto", "cuda")
    assert dtype == expected and f"compute capability {major}.0" in reason and "Mocked GPU" in reason
    assert resolve_mixed_precision("auto", torch.device("cuda", 0))[0] == mixed


def test_default_device_follows_the_accelerator_and_the_cpu_flag(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    assert precision.default_device() == torch.device("cuda")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert precision.default_device() == torch.device("cpu")
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert precision.default_device() == torch.device("cpu")


def test_make_accelerator_resolves_auto(monkeypatch):
    import allspark.distributed as dist

    monkeypatch.setattr(dist, "Accelerator", lambda **kw: kw)
    monkeypatch.setattr(dist, "default_device", lambda: torch.device("cpu"))
    machine(monkeypatch, NATIVE)
    assert dist.make_accelerator(mixed_precision="auto") == {"mixed_precision": "bf16"}
    assert dist.make_accelerator(mixed_precision="auto", llm_dtype="float32") == {"mixed_precision": "no"}
    machine(monkeypatch, EMULATED)
    assert dist.make_accelerator(mixed_precision="auto") == {"mixed_precision": "no"}
    assert dist.make_accelerator() == {}, "no mixed_precision given: accelerate's own default"


# ---------------------------------------------------------------------------------------------------
# configs


def test_auto_is_the_default_and_round_trips_through_the_config(tmp_path):
    assert LLMConfig().dtype == "auto" and TrainConfig().mixed_precision == "auto"
    cfg = load_config("hsi", overrides=["model.llm.dtype=float16"])
    assert cfg.model.llm.dtype == "float16"
    cfg = load_config("hsi")
    assert cfg.model.llm.dtype == "auto" and cfg.train.mixed_precision == "auto"
    save_config(cfg, tmp_path / "config.yaml")
    back = config_from_yaml_text((tmp_path / "config.yaml").read_text())
    assert back.model.llm.dtype == "auto" and back.train.mixed_precision == "auto"


def _stage_configs(cfg: Config) -> list[Config]:
    base = to_dict(cfg)
    base["train"]["stages"] = []
    return [cfg] + [from_dict(Config, apply_overrides(base, dict(s.get("overrides") or {}))) for s in cfg.train.stages]


@pytest.mark.parametrize("modality", list_modalities())
def test_every_demo_config_runs_at_full_speed_on_a_cpu_without_native_bf16(monkeypatch, modality):
    cfg = load_config(modality)
    assert cfg.uses_demo_data
    for run in _stage_configs(cfg):
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrecisionWarning)  # nothing forces an emulated dtype
            machine(monkeypatch, EMULATED)
            assert resolve_dtype(run.model.llm.dtype, "cpu")[0] == torch.float32
            assert resolve_mixed_precision(run.train.mixed_precision, "cpu", run.model.llm.dtype)[0] == "no"
            machine(monkeypatch, NATIVE)  # ... and where bf16 is native, the demo runs in bf16
            assert resolve_dtype(run.model.llm.dtype, "cpu")[0] == torch.bfloat16
            assert resolve_mixed_precision(run.train.mixed_precision, "cpu", run.model.llm.dtype)[0] == "bf16"


# ---------------------------------------------------------------------------------------------------
# the model and a run


def test_a_bf16_frozen_llm_trains_fp32_encoder_and_bridge(monkeypatch):
    from allspark.data import build_dataset
    from allspark.model import AllSpark

    cfg = load_config("hsi", overrides=TINY_HSI + ["model.llm.dtype=bfloat16"])
    dataset = build_dataset(cfg, "train")
    model = AllSpark(cfg, dataset.info())
    batch = dataset.collate([dataset[i] for i in range(4)])
    out = model(batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.llm.model.get_input_embeddings().weight.dtype == torch.bfloat16
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    for part in ("encoders.", "bridge."):
        grads = [p.grad for n, p in trainable.items() if n.startswith(part)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part


@pytest.mark.parametrize("cap, llm_dtype, mixed", [(NATIVE, "bfloat16", "bf16"), (EMULATED, "float32", "no")])
def test_train_and_evaluate_record_the_precision_in_metrics_json(monkeypatch, tmp_path, caplog, cap, llm_dtype,
                                                                 mixed):
    from allspark.evaluate_run import evaluate_checkpoint
    from allspark.training import train

    machine(monkeypatch, cap)
    cfg = load_config("hsi", overrides=TINY_HSI + ["train.epochs=1", "train.max_steps=2", "eval.baselines=[]",
                                                  "train.test_at_end=false"])
    with caplog.at_level("INFO", logger="allspark.training"):
        train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["precision"]["llm_dtype"] == llm_dtype
    assert saved["precision"]["mixed_precision"] == mixed
    assert cap.reason in saved["precision"]["reason"]
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
    assert len(started) == 1 and llm_dtype in started[0] and cap.reason in started[0]

    report = evaluate_checkpoint(tmp_path / "run", modality="hsi", output_dir=tmp_path / "eval")
    assert report["precision"] == saved["precision"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["precision"] == saved["precision"]
